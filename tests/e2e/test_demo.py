"""``make demo`` (python -m remusd.demo) runs end to end and proves the guarantee."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_demo_passes_and_cleans_up():
    r = subprocess.run(
        [sys.executable, "-m", "remusd.demo", "--seconds", "2", "--memory", "32M"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=110,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "ledger-check: domain ledger: OK" in out
    assert "every acknowledged transaction survived: YES" in out
    workdir = out.splitlines()[0].split()[-1]
    assert workdir.startswith(("/dev/shm/remus-demo-", "/tmp/"))
    assert not os.path.exists(workdir), "the demo left its working directory behind"
    # nothing it started is still running
    ps = subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True)
    assert ps.stdout.strip() == ""
