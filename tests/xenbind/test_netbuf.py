"""xenbind.netbuf (the plug-qdisc output buffer of real Xen) with the real
``ip``/``tc`` in a private network namespace; an IFB device stands in for a
guest's ``vif7.0`` (this machine has no Xen backend interfaces)."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from xenbind.netbuf import ifb_name, vifs_of

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    from xenbind.netbuf import OutputBuffer
    from xenbind.errors import DomainError

    def sh(*a):
        return subprocess.run(a, capture_output=True, text=True).stdout
    subprocess.run(["ip", "link", "add", "vif7.0", "type", "ifb"], check=True)
    subprocess.run(["ip", "link", "set", "vif7.0", "up"], check=True)
    res = {}
    b = OutputBuffer(7, ["vif7.0"])
    try:
        b.barrier()
        res["plug"] = True
        res["qdisc"] = sh("tc", "qdisc", "show", "dev", "rifb7.0")
        res["filter"] = sh("tc", "filter", "show", "dev", "vif7.0", "parent", "ffff:")
        b.release()
        b.barrier()
        b.unplug()
    except DomainError as e:
        res["plug"] = False
        res["error"] = str(e)
    res["links_after"] = sh("ip", "-o", "link")
    res["vif_qdisc_after"] = sh("tc", "qdisc", "show", "dev", "vif7.0")
    print(json.dumps(res))
    """
)


def _netns_available() -> bool:
    if not (shutil.which("unshare") and shutil.which("tc") and shutil.which("ip")):
        return False
    r = subprocess.run(
        ["unshare", "-n", "ip", "link", "add", "x", "type", "ifb"], capture_output=True, timeout=10
    )
    return r.returncode == 0


def test_vif_discovery_and_ifb_names(tmp_path):
    for name in ("vif3.0", "vif3.1", "vif3.10", "vif30.0", "vif3.0-emu", "eth0", "vif3"):
        (tmp_path / name).mkdir()
    assert vifs_of(3, str(tmp_path)) == ["vif3.0", "vif3.1", "vif3.10"]
    assert vifs_of(4, str(tmp_path)) == []
    assert vifs_of(3, str(tmp_path / "missing")) == []
    assert ifb_name("vif3.1") == "rifb3.1"
    assert len(ifb_name("vif32751.99")) <= 15


@pytest.mark.skipif(not _netns_available(), reason="no unshare -n / ip / tc / ifb here")
def test_plug_buffer_cycle_or_clear_error_in_a_netns():
    out = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["plug"]:
        assert "plug" in res["qdisc"]
        assert "rifb7.0" in res["filter"] and "redirect" in res["filter"].lower()
    else:
        # this kernel has no sch_plug: the error says so, naming domain and command
        assert "domain 7" in res["error"] and "plug" in res["error"] and "sch_plug" in res["error"]
    # either way nothing is left behind: no IFB, no ingress redirect on the vif
    assert "rifb7.0" not in res["links_after"]
    assert "ingress" not in res["vif_qdisc_after"]
