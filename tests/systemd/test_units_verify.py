"""The systemd units pass ``systemd-analyze verify``.

verify insists that ExecStart's binary exists. The units name the installed
path (/usr/local/bin/...); here the daemons live in the venv. So each unit is
copied to a temporary directory with ONLY the binary path of ExecStart
rewritten to the venv's entry point (same arguments, every other line
untouched) and verified there; the test also checks that nothing else
differs, so what is verified is the unit as shipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = {"remusd.service": "remusd", "remus-receiver.service": "remus-receiver"}
VENV_BIN = Path(sys.executable).parent


def _rewrite(text: str, binary: str) -> str:
    pattern = re.compile(r"^(ExecStart=)(\S*/)?" + re.escape(binary) + r"(\s|$)", re.M)
    new, n = pattern.subn(lambda m: f"{m.group(1)}{VENV_BIN / binary}{m.group(3)}", text)
    assert n == 1, f"ExecStart of the {binary} unit does not run {binary}"
    return new


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_verifies(unit, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd)")
    src = ROOT / "systemd" / unit
    if not src.exists():
        pytest.fail(f"systemd/{unit} is missing")
    binary = UNITS[unit]
    assert (VENV_BIN / binary).exists(), f"{binary} is not installed in the venv"
    text = src.read_text()
    rewritten = _rewrite(text, binary)
    diff = [
        (a, b) for a, b in zip(text.splitlines(), rewritten.splitlines(), strict=True) if a != b
    ]
    assert len(diff) == 1 and diff[0][0].startswith("ExecStart=")
    (tmp_path / unit).write_text(rewritten)
    r = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # verify is silent on a clean unit; any warning about ours is a defect
    noise = [ln for ln in (r.stdout + r.stderr).splitlines() if unit in ln]
    assert not noise, noise


def test_remusd_unit_contract():
    text = (ROOT / "systemd" / "remusd.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "RuntimeDirectory=remus"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    # the daemon needs Xen's device nodes: no PrivateDevices
    assert not re.search(r"^PrivateDevices=yes", text, re.M)
