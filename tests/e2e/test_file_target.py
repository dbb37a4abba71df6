"""``--to file:PATH``: the captured stream replays to the primary's memory at its
last checkpoint; with codec none, Xen's convert-legacy-stream reads it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ENV, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

XEN_TOOLS = [
    Path(os.environ.get("XEN_TOOLS_ROOT", "/nonexistent")),
    Path(__file__).resolve().parents[2] / ".cache" / "xen-tools",
    Path("/"),
]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("codec", ["seed", "xen", "none"])
def test_file_stream_replays_to_last_checkpoint(sim_host, daemons, workdir, codec):
    dom = sim_host.create("16M", "ledger", seed=3, rate=2000, name="ledger")
    remusd = daemons.remusd(sim_host)
    stream = workdir / f"ledger-{codec}.stream"
    remusd.ctl("protect", "ledger", "--to", f"file:{stream}", "--interval", "20", "--codec", codec)
    remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 15,
        "ledger",
        what="15 checkpoints",
    )
    # freeze the guest (an operator pause; remusd's own pauses are counted on
    # top), so the last checkpoint, taken by the clean end, is its memory now
    sim_host.cli("pause", str(dom.domid))
    r = remusd.ctl("unprotect", "ledger")
    assert "stopped" in r.stdout
    d = remusd.domain("ledger")
    assert d["state"] == "stopped" and d["checkpoints"] >= 16
    if codec != "none":
        assert d["compression_ratio"] is not None and d["compression_ratio"] > 1
    primary = sim_host.cli("digest", str(dom.domid)).stdout.split()[0]

    image = workdir / "image"
    rep = subprocess.run(
        [sys.executable, "-m", "xenbind.stream", "replay", str(stream), "-o", str(image)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert rep.returncode == 0, rep.stderr
    assert os.path.getsize(image) == dom.info().pages * 4096
    assert _sha256(image) == primary, "replayed image differs from the primary's memory"

    ins = subprocess.run(
        [sys.executable, "-m", "xenbind.stream", "inspect", str(stream)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert ins.returncode == 0, ins.stderr

    if codec == "none":
        root = next(
            (r for r in XEN_TOOLS if (r / "usr/lib/xen-4.17/bin/convert-legacy-stream").exists()),
            None,
        )
        if root is None:
            pytest.fail("Xen's convert-legacy-stream is missing (scripts/install-system-deps)")
        tools = root / "usr/lib/xen-4.17"
        env = dict(ENV, PYTHONPATH=str(tools / "lib/python"))
        v2 = workdir / "v2.stream"
        conv = subprocess.run(
            [
                "python3",
                str(tools / "bin/convert-legacy-stream"),
                "-i",
                str(stream),
                "-o",
                str(v2),
                "-w",
                "64",
                "-g",
                "hvm",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert conv.returncode == 0, conv.stdout + conv.stderr
        ver = subprocess.run(
            ["python3", str(tools / "bin/verify-stream-v2"), "-i", str(v2)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert ver.returncode == 0, ver.stdout + ver.stderr


def test_heavy_writer_precopy_rounds_and_full_buffers(sim_host, daemons, workdir):
    """A guest dirtying more pages per epoch than the sender's 8192-page buffer
    (Xen's default): several live pre-copy rounds, then bodies that interleave
    COMPRESSED_DATA chunks with PFN listings; the stream still replays to the
    primary's memory at the last checkpoint."""
    dom = sim_host.create("64M", "scan", seed=4, rate=400_000, name="scan")
    remusd = daemons.remusd(sim_host, "--precopy-threshold", "64")
    stream = workdir / "scan.stream"
    remusd.ctl("protect", "scan", "--to", f"file:{stream}", "--interval", "50", "--codec", "xen")
    big = []

    def enough():
        d = remusd.domain("scan")
        if (d["dirty_pages"] or 0) > 8192:
            big.append(d["dirty_pages"])
        return d["state"] == "protected" and d["checkpoints"] >= 6 and big

    wait_until("checkpoints larger than the sender buffer", enough, 60)
    sim_host.cli("pause", str(dom.domid))
    remusd.ctl("unprotect", "scan")
    log = remusd.log()
    rounds = [int(x) for x in re.findall(r"in (\d+) round\(s\)", log)]
    assert rounds and rounds[0] > 1, "expected several live pre-copy rounds"
    ins = subprocess.run(
        [sys.executable, "-m", "xenbind.stream", "inspect", "--json", str(stream)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert ins.returncode == 0, ins.stderr
    summary = json.loads(ins.stdout)
    # some body needed more than one COMPRESSED_DATA chunk: the buffer filled mid-body
    assert any(c["compressed_chunks"] > 1 for c in summary["per_checkpoint"])
    image = workdir / "image"
    rep = subprocess.run(
        [sys.executable, "-m", "xenbind.stream", "replay", str(stream), "-o", str(image)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert rep.returncode == 0, rep.stderr
    assert _sha256(image) == sim_host.cli("digest", str(dom.domid)).stdout.split()[0]
