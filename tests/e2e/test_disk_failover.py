"""Disk replication end to end (issue 13): simulated guests with disks,
protected by the real daemons over TCP, the primary host power-cut.

* After the failover the backup's disk is the primary's disk as of the last
  committed checkpoint: the ledger's journal on disk agrees with its memory
  and with every acknowledged transaction (``ledger-check``), and a hotset
  guest's disk holds exactly the blocks its memory's step says it wrote
  (``disk-check``): nothing of the uncommitted epoch, nothing missing.
* The guest goes on writing its disk on the backup after the failover.
* A second session of the same domain (after the first one is torn) copies
  only the blocks whose hashes differ, not the whole disk.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import wait_until
from tests.e2e.test_failover import acked_outputs, ledger_check, power_cut
from xenbind.mirrorclient import missing

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(missing() is not None, reason=f"no block server here: {missing()}"),
]

DISK = 8 << 20


def _step(host, name: str) -> int:
    dom = host.lookup(name)
    try:
        return int(dom.step)
    finally:
        dom.close()


def test_power_cut_leaves_the_backup_disk_at_the_committed_checkpoint(hosts, daemons, workdir):
    primary, backup = hosts
    primary.create("16M", "ledger", seed=5, rate=2000, name="ledger", disks=[DISK])
    primary.create("16M", "hotset", seed=6, rate=5000, name="hot", disks=[DISK], disk_every=2)
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary)
    for n in ("ledger", "hot"):
        remusd.ctl("protect", n, "--to", rx.target, "--interval", "30")
    for n in ("ledger", "hot"):
        remusd.wait(lambda d: d["state"] == "protected" and d["checkpoints"] >= 20, n, what="20")
        d = remusd.domain(n)
        assert d["disks"]["seals"] >= 20 and d["disks"]["disks"][0]["sync"]["done"], d["disks"]
        s = rx.session(n)
        assert s["disks"]["epochs_applied"] >= 10, s["disks"]
    assert remusd.domain("hot")["disks"]["mirrored_bytes"] > 0
    shown = remusd.ctl("status").stdout  # the operator's table says it per disk
    assert "disks:" in shown and "hot disk0 8.0 MiB: sync done" in shown, shown
    power_cut(primary, remusd)
    for n in ("ledger", "hot"):
        wait_until(f"failover of {n}", lambda n=n: rx.session(n)["state"] == "failed-over", 20)
    acked = workdir / "acked.txt"
    assert acked_outputs(primary, "ledger", acked) > 0
    ledger_check(backup, "ledger", acked)  # memory, disk journal and acked outputs agree
    backup.cli("pause", "hot")
    r = backup.cli("disk-check", "hot", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # the guest writes on, on the backup's disk
    at = _step(backup, "hot")
    backup.cli("unpause", "hot")
    wait_until("the backup guest runs on", lambda: _step(backup, "hot") > at + 200, 20)
    backup.cli("pause", "hot")
    r = backup.cli("disk-check", "hot", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_new_session_copies_only_the_blocks_that_differ(hosts, daemons):
    """The receiver is SIGKILLed and started again on the same disk directory:
    the next session reuses its image and the initial sync sends only the
    blocks written since (hashes), not the whole disk; a power cut after it
    still leaves the backup's disk at the committed checkpoint."""
    primary, backup = hosts
    primary.create("16M", "hotset", seed=8, rate=20000, name="hot", disks=[64 << 20], disk_every=1)
    # fill the disk unprotected, then slow the guest down: its writes during
    # the receiver's absence are what the second sync must find
    wait_until("the disk is written", lambda: _step(primary, "hot") >= 30000, 30)
    primary.cli("set-rate", "hot", "5")  # ~5 blocks/s of the disk's 1024
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary)
    remusd.ctl("protect", "hot", "--to", rx.target, "--interval", "30")
    d = remusd.wait(lambda d: d["state"] == "protected" and d["checkpoints"] >= 10, "hot")
    first = d["disks"]["disks"][0]["sync"]
    assert first["done"] and first["differing"] >= first["blocks"] * 0.9, first
    sessions = d["sessions"]
    rx.kill()
    rx2 = daemons.receiver(backup, port=rx.port)
    d = remusd.wait(
        lambda d: d["sessions"] > sessions and d["state"] == "protected" and d["checkpoints"] >= 10,
        "hot",
        what="a second session",
    )
    second = d["disks"]["disks"][0]["sync"]
    assert second["done"] and 0 < second["differing"] < first["blocks"] // 4, (first, second)
    assert second["bytes_sent"] < first["bytes_sent"] // 4
    s = rx2.session("hot")
    assert s["disks"]["disks"][0]["reused"], s["disks"]
    power_cut(primary, remusd)
    wait_until("failover", lambda: rx2.session("hot")["state"] == "failed-over", 20)
    backup.cli("pause", "hot")
    r = backup.cli("disk-check", "hot", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
