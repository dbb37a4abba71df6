"""The Remus guarantee end to end: real hosts, real daemons, real TCP, kill -9.

* verify mode: every acknowledged checkpoint checked by the receiver (digest
  of the backup's memory after commit = the primary's at the checkpoint);
* kill -9 of the primary host and remusd at several points, one of them in
  the middle of a checkpoint's transmission: the backup holds the last
  acknowledged checkpoint byte for byte and ``ledger-check --acked`` passes
  with the primary's released outputs;
* the receiver killed and restarted: the guest runs unprotected meanwhile,
  then is protected again with a fresh initial copy.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from xenbind.stream.encoder import memory_digest

from .conftest import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def backup_digest(host, name: str) -> str:
    """xxh3-128 of the backup domain's whole memory (the remusd verify digest)."""
    dom = host.lookup(name)
    pages = dom.info().pages
    img = np.empty((pages, 4096), dtype=np.uint8)
    dom.gather(np.arange(pages, dtype=np.uint64), img)
    return memory_digest(img).hex()


def acked_outputs(primary, name: str, path) -> int:
    out = primary.cli("outputs", name).stdout
    path.write_text(out)
    return sum(1 for ln in out.splitlines() if ln.startswith("ack "))


def ledger_check(backup, name: str, acked) -> None:
    backup.cli("pause", name)  # a consistent view of a guest that runs
    r = backup.cli("ledger-check", name, "--acked", str(acked), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def power_cut(primary, remusd) -> None:
    """SIGKILL to the primary host and remusd, as close together as possible."""
    remusd.kill()
    primary.kill()


def test_verify_mode_every_checkpoint_matches(hosts, daemons):
    primary, backup = hosts
    primary.create("16M", "ledger", seed=5, rate=3000, name="ledger")
    primary.create("16M", "hotset", seed=6, rate=20000, name="hot")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary)
    for name in ("ledger", "hot"):
        remusd.ctl("protect", name, "--to", rx.target, "--interval", "30", "--verify")
    for name in ("ledger", "hot"):
        remusd.wait(
            lambda d: d["state"] == "protected" and d["checkpoints"] >= 20,
            name,
            what="20 verified checkpoints",
        )
    for name in ("ledger", "hot"):
        d = remusd.domain(name)
        assert d["verify_mismatches"] == 0 and d["acked_digest"]
        s = rx.session(name)
        assert s["verify"] and s["mismatches"] == 0
        assert s["verified"] >= 20, s
    assert "mismatch" not in rx.log().lower().replace("mismatches 0", "")
    # clean end: no failover, and nothing the receiver disliked
    for name in ("ledger", "hot"):
        remusd.ctl("unprotect", name)
        assert remusd.domain(name)["state"] == "stopped"
    wait_until(
        "the receiver to end both sessions",
        lambda: all(rx.session(n)["state"] == "ended" for n in ("ledger", "hot")),
        20,
    )


def test_kill_mid_checkpoint_backup_holds_last_acked(hosts, daemons, workdir):
    """The primary dies half-way through sending checkpoint 12: the receiver
    drops the torn checkpoint; its backup is byte for byte checkpoint 11."""
    primary, backup = hosts
    primary.create("32M", "ledger", seed=7, rate=3000, name="ledger")
    # wait: keep the backup paused at its last commit so its memory can be read
    rx = daemons.receiver(backup, "--on-link-loss", "wait")
    remusd = daemons.remusd(primary, env={"REMUSD_FAULT": "stall-mid-checkpoint:1:12"})
    remusd.ctl("protect", "ledger", "--to", rx.target, "--interval", "30", "--verify")
    wait_until(
        "remusd to stall inside checkpoint 12",
        lambda: "sent" in remusd.log() and "stalling" in remusd.log(),
        30,
    )
    d = remusd.domain("ledger")  # the control thread still answers
    assert d["acked"] == 11 and d["acked_digest"]
    wait_until(
        "the receiver to have committed checkpoint 11",
        lambda: rx.session("ledger")["last_committed"] == 11,
        10,
    )
    power_cut(primary, remusd)
    wait_until(
        "the receiver to see the link lost",
        lambda: rx.session("ledger")["state"] in ("link-lost", "broken"),
        20,
    )
    s = rx.session("ledger")
    assert s["last_committed"] == 11, s  # the torn checkpoint 12 was dropped
    assert backup_digest(backup, "ledger") == d["acked_digest"]
    # now fail over by hand: the backup runs from checkpoint 11
    out = rx.ctl("failover", "ledger").stdout  # remusctl against the receiver's socket
    assert "resumed from checkpoint 11" in out, out
    wait_until("failover", lambda: rx.session("ledger")["state"] == "failed-over", 10)
    assert "resumed from checkpoint 11" in rx.log()
    acked = workdir / "acked.txt"
    assert acked_outputs(primary, "ledger", acked) > 0
    time.sleep(0.3)
    ledger_check(backup, "ledger", acked)


@pytest.mark.parametrize("when", [0.0, 1.3])
def test_power_cut_backup_takes_over(hosts, daemons, workdir, when):
    """Kill -9 at a point in the epoch loop (right after protection, and later):
    the backup fails over by itself and every acknowledged transaction is there."""
    primary, backup = hosts
    primary.create("16M", "ledger", seed=11, rate=4000, name="ledger")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary)
    remusd.ctl("protect", "ledger", "--to", rx.target, "--interval", "20")
    remusd.wait(lambda d: d["state"] == "protected", "ledger", what="protection")
    time.sleep(when)
    seen = remusd.domain("ledger")["acked"]
    power_cut(primary, remusd)
    s = wait_until(
        "the backup to take over",
        lambda: (lambda s: s if s["state"] == "failed-over" else None)(rx.session("ledger")),
        20,
    )
    assert s["last_committed"] >= seen
    info = backup.lookup("ledger").info()
    assert info.state == "running"
    acked = workdir / "acked.txt"
    n = acked_outputs(primary, "ledger", acked)
    assert n > 0
    ledger_check(backup, "ledger", acked)


def test_receiver_restart_unprotected_then_reprotected(hosts, daemons):
    primary, backup = hosts
    dom = primary.create("16M", "ledger", seed=13, rate=2000, name="ledger")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(
        primary, "--ack-timeout", "1", "--retry-min", "0.2", "--retry-max", "0.5"
    )
    remusd.ctl("protect", "ledger", "--to", rx.target, "--interval", "20")
    remusd.wait(lambda d: d["state"] == "protected", "ledger", what="protection")
    rx.kill()
    d = remusd.wait(
        lambda d: d["state"] == "unprotected", "ledger", timeout=10, what="the unprotected state"
    )
    assert "backup lost" in d["reason"]
    # unprotected: outputs flow at once, without checkpoints
    n0 = len(primary.cli("outputs", str(dom.domid)).stdout.splitlines())
    time.sleep(0.5)
    n1 = len(primary.cli("outputs", str(dom.domid)).stdout.splitlines())
    assert n1 > n0
    retries = remusd.wait(lambda d: d["retries"] >= 2, "ledger", timeout=10, what="retries")[
        "retries"
    ]
    assert retries >= 2
    rx.start()
    d = remusd.wait(
        lambda d: d["state"] == "protected" and d["sessions"] == 2,
        "ledger",
        timeout=20,
        what="re-protection",
    )
    assert d["acked"] is not None
    wait_until(
        "the new receiver to commit",
        lambda: (
            rx.session("ledger")["last_committed"] is not None
            and rx.session("ledger")["state"] == "receiving"
        ),
        10,
    )
    # remusctl shows both sides
    out = remusd.ctl("status").stdout
    assert "ledger (1)" in out and "protected" in out
    out = remusd.ctl("--control", rx.control, "status").stdout
    assert "receiver" in out and "ledger" in out and "receiving" in out


def test_sender_buffer_corner_case_verified(hosts, daemons):
    """More dirty pages per epoch than the sender's page buffer: the body
    interleaves COMPRESSED_DATA chunks with PFN listings (the seed's corner
    case); verify mode checks every checkpoint on the backup. The buffer is
    shrunk to 64 pages and the cache to 256 (evictions) to make it cheap."""
    primary, backup = hosts
    primary.create("16M", "random", seed=21, rate=40000, name="rnd")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary, "--buffer-pages", "64", "--cache-pages", "256")
    remusd.ctl(
        "protect", "rnd", "--to", rx.target, "--interval", "50", "--verify", "--codec", "xen"
    )
    big = []

    def enough():
        d = remusd.domain("rnd")
        if d["dirty_pages"] and d["dirty_pages"] > 64:
            big.append(d["dirty_pages"])
        return d["state"] == "protected" and d["checkpoints"] >= 15 and big

    wait_until("15 checkpoints with more dirty pages than the buffer", enough, 30)
    s = rx.session("rnd")
    assert s["mismatches"] == 0 and s["verified"] >= 10, s
    assert remusd.domain("rnd")["verify_mismatches"] == 0


def test_backup_stops_acknowledging(hosts, daemons):
    """A receiver frozen (SIGSTOP) stops acknowledging: after ack-timeout the
    guest runs unprotected, with its outputs released at once."""
    import os
    import signal

    primary, backup = hosts
    dom = primary.create("16M", "ledger", seed=23, rate=2000, name="ledger")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary, "--ack-timeout", "0.5", "--retry-min", "5")
    remusd.ctl("protect", "ledger", "--to", rx.target, "--interval", "20")
    remusd.wait(lambda d: d["state"] == "protected", "ledger", what="protection")
    os.kill(rx.proc.pid, signal.SIGSTOP)
    try:
        d = remusd.wait(
            lambda d: d["state"] == "unprotected",
            "ledger",
            timeout=10,
            what="unprotected after the ack timeout",
        )
        assert "acknowledge" in d["reason"] or "stalled" in d["reason"], d["reason"]
        n0 = len(primary.cli("outputs", str(dom.domid)).stdout.splitlines())
        time.sleep(0.4)
        assert len(primary.cli("outputs", str(dom.domid)).stdout.splitlines()) > n0
    finally:
        os.kill(rx.proc.pid, signal.SIGCONT)


def test_sigterm_remusd_is_a_clean_end(hosts, daemons):
    """Stopping remusd (systemctl stop) ends the session with LAST_CHECKPOINT:
    the backup does not take over, the guest runs on, unprotected."""
    primary, backup = hosts
    primary.create("16M", "ledger", seed=25, rate=2000, name="ledger")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary)
    remusd.ctl("protect", "ledger", "--to", rx.target, "--interval", "20")
    remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 5, "ledger", what="protection"
    )
    assert remusd.stop() == 0
    wait_until(
        "the receiver to see the clean end", lambda: rx.session("ledger")["state"] == "ended", 10
    )
    time.sleep(1.0)  # longer than the failover timeout: still no failover
    assert rx.session("ledger")["state"] == "ended"
    assert "FAILOVER" not in rx.log()
    assert primary.lookup("ledger").info().state == "running"


def test_power_cut_during_initial_copy_no_failover(hosts, daemons):
    """The primary dies half-way through the initial copy: nothing was ever
    committed, so the backup must not run; the receiver drops it."""
    primary, backup = hosts
    primary.create("32M", "ledger", seed=27, rate=2000, name="ledger")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary, env={"REMUSD_FAULT": "stall-mid-checkpoint:1:0"})
    remusd.ctl("protect", "ledger", "--to", rx.target, "--interval", "20")
    wait_until("remusd to stall in the initial copy", lambda: "stalling" in remusd.log(), 20)
    assert remusd.domain("ledger")["state"] == "initial-copy"
    power_cut(primary, remusd)

    def ended():
        s = rx.session("ledger")
        return s is None or s["state"] == "gone"

    wait_until("the receiver to end the session", ended, 20)
    time.sleep(1.0)
    assert "FAILOVER" not in rx.log()
    names = [d.name for d in backup.hv.list()]
    assert "ledger" not in names, "a backup that never committed anything must not survive"
