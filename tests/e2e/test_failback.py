"""Failback (issue 14): A -> B by failure, B -> A by a planned switchover.

Real daemons on two simulated hosts; the ledger guest's acknowledged
transactions are checked on the host that runs it at each step:

1. A protects the guest to B; A's host and remusd die (power cut): B's
   receiver fails over, and the guest on B holds every transaction A's
   clients were answered for.
2. A is repaired: its host comes back with a receiver; B's remusd protects
   the guest to A. A's stale copy, when its host kept one (a hung remusd
   rather than a power cut: the second test), is removed by A's receiver,
   whose log and status say what was removed.
3. ``remusctl switchover`` on B: the guest stops at a last checkpoint, A's
   receiver resumes it, B's copy is fenced (stopped, every output it made
   released); the guest on A holds every transaction B's clients were
   answered for, and nothing B released is missing on A.
4. ``destroy-stale`` on B removes the stopped copy.

And the switchover's refusal of a domain that is not protected. The
failure path (a receiver that cannot resume the backup answers
switchover-failed; the guest runs on at the primary, protected again) is in
tests/e2e/test_witness.py, where etcd can be cut from the receiver.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from xenbind.mirrorclient import missing

from .conftest import Receiver, Remusd, free_port, wait_until
from .test_failover import acked_outputs, ledger_check, power_cut

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def exists(host, name: str) -> bool:
    try:
        host.lookup(name).close()
    except Exception:
        return False
    return True


def running(host, name: str) -> bool:
    try:
        return host.lookup(name).info().state == "running"
    except Exception:
        return False


@pytest.fixture
def swapped(workdir):
    """The daemons of the swapped roles: A's receiver (once A is repaired) and
    B's remusd, each with sockets and a log of its own (the ``daemons``
    fixture's names are taken by B's receiver and A's remusd)."""
    started: list = []

    class Swapped:
        def _start(self, d):
            started.append(d)
            return d.start()

        def receiver(self, host) -> Receiver:
            (workdir / "a").mkdir()
            return self._start(Receiver(workdir / "a", host, free_port()))

        def remusd(self, host) -> Remusd:
            (workdir / "b").mkdir()
            return self._start(Remusd(workdir / "b", host))

    yield Swapped()
    for d in started:
        d.kill()
        print(f"----- swapped {d.name} log (last 4000 chars) -----\n{d.log()[-4000:]}")


@pytest.mark.parametrize("disk", [0, 8 << 20], ids=["memory", "with-disk"])
def test_a_to_b_by_failure_then_back_by_switchover(hosts, daemons, workdir, swapped, disk):
    """``with-disk``: the guest's journal disk goes along (issue 13): B runs it
    on its receiver's image, protects it back to A's receiver, and the
    switchover brings it home with the journal matching memory and outputs."""
    a, b = hosts
    if disk and missing() is not None:
        pytest.skip(f"no block server here: {missing()}")
    a.create("16M", "ledger", seed=21, rate=3000, name="ledger", disks=[disk] if disk else ())
    rx_b = daemons.receiver(b)
    remusd_a = daemons.remusd(a)
    remusd_a.ctl("protect", "ledger", "--to", rx_b.target, "--interval", "25")
    remusd_a.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 10,
        "ledger",
        what="10 checkpoints",
    )

    # 1. A dies: B takes over, with everything A acknowledged
    power_cut(a, remusd_a)
    wait_until(
        "B's receiver to fail over",
        lambda: (lambda s: s and s["state"] == "failed-over")(rx_b.session("ledger")),
        20,
    )
    acked_a = workdir / "acked-a.txt"
    assert acked_outputs(a, "ledger", acked_a) > 0
    ledger_check(b, "ledger", acked_a)
    b.cli("unpause", "ledger")  # ledger_check paused it for a consistent view

    # 2. A is repaired: its host and a receiver come back; B protects the guest to A
    a.start()
    rx_a = swapped.receiver(a)
    remusd_b = swapped.remusd(b)
    remusd_b.ctl("protect", "ledger", "--to", rx_a.target, "--interval", "25")
    remusd_b.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 10, "ledger", what="B -> A"
    )
    assert rx_a.status()["removed"] == []  # the power cut left nothing on A
    home_by_switchover(a, b, rx_a, remusd_b, workdir)


def test_a_hung_primary_its_stale_copy_removed_and_said_so(hosts, daemons, workdir, swapped):
    """A -> B because A's remusd hangs (SIGSTOP): A's copy is fenced, stopped,
    and stays on A's host once its remusd is stopped. A's receiver removes it
    when B protects the guest to A (its log and its status say what was
    removed), and the switchover brings the guest home."""
    a, b = hosts
    a.create("16M", "ledger", seed=23, rate=3000, name="ledger")
    rx_b = daemons.receiver(b)
    remusd_a = daemons.remusd(a)
    remusd_a.ctl("protect", "ledger", "--to", rx_b.target, "--interval", "25")
    remusd_a.wait(lambda d: d["state"] == "protected" and d["checkpoints"] >= 10, "ledger")
    assert remusd_a.proc is not None
    os.kill(remusd_a.proc.pid, signal.SIGSTOP)
    try:
        wait_until(
            "B's receiver to fail over",
            lambda: (lambda s: s and s["state"] == "failed-over")(rx_b.session("ledger")),
            20,
        )
    finally:
        os.kill(remusd_a.proc.pid, signal.SIGCONT)
    remusd_a.wait(lambda d: d["state"] == "fenced", "ledger", timeout=20, what="A fenced")
    acked_a = workdir / "acked-a.txt"
    assert acked_outputs(a, "ledger", acked_a) > 0
    ledger_check(b, "ledger", acked_a)
    b.cli("unpause", "ledger")
    remusd_a.stop()  # A's remusd goes; its stopped copy stays on A's host
    stale = a.lookup("ledger").info()
    assert stale.state != "running"

    rx_a = swapped.receiver(a)
    remusd_b = swapped.remusd(b)
    remusd_b.ctl("protect", "ledger", "--to", rx_a.target, "--interval", "25")
    remusd_b.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 10, "ledger", what="B -> A"
    )
    removed = rx_a.status()["removed"]
    assert [(r["name"], r["domid"]) for r in removed] == [("ledger", stale.domid)], removed
    assert f"leftover domain {stale.domid}" in rx_a.log()
    home_by_switchover(a, b, rx_a, remusd_b, workdir)


def home_by_switchover(a, b, rx_a, remusd_b, workdir) -> None:
    """B -> A by remusctl switchover; the ledger checked on A; B's copy destroyed."""
    if "leftover domain" in rx_a.log():  # what A's host kept of the dead copy: removed, said so
        assert "destroying" in rx_a.log()

    # the planned way home
    r = remusd_b.ctl("switchover", "ledger", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fenced-backup-took-over" in r.stdout and "switched over" in r.stdout
    d = remusd_b.domain("ledger")
    assert d["state"] == "fenced" and d["case"] == "fenced-backup-took-over"
    s = rx_a.session("ledger")
    assert s["state"] == "failed-over"
    assert s["last_committed"] == d["acked"]  # resumed from the switchover's own checkpoint
    assert running(a, "ledger")
    assert b.lookup("ledger").info().state != "running"  # stopped at that checkpoint
    assert "SWITCHED OVER" in remusd_b.log()
    assert "switchover" in rx_a.log() and "FAILOVER" in rx_a.log()
    # every output B's guest made was released, none after the switchover
    acked_b = workdir / "acked-b.txt"
    n_b = acked_outputs(b, "ledger", acked_b)
    assert n_b > 0
    time.sleep(0.3)  # the guest runs on at A; B's copy releases nothing more
    assert acked_outputs(b, "ledger", acked_b) == n_b
    ledger_check(a, "ledger", acked_b)
    a.cli("unpause", "ledger")

    # the stale copy on B is cleaned
    r = remusd_b.ctl("destroy-stale", "ledger")
    assert "destroyed-stale" in r.stdout
    wait_until("B's stale copy to go", lambda: not exists(b, "ledger"), 10)
    assert running(a, "ledger")


def test_switchover_of_an_unprotected_domain_is_refused(hosts, daemons):
    primary, _backup = hosts
    primary.create("16M", "ledger", seed=22, rate=2000, name="ledger")
    remusd = daemons.remusd(primary)
    r = remusd.ctl("switchover", "ledger", check=False)
    assert r.returncode == 1 and "ledger" in r.stderr
    remusd.ctl("protect", "ledger", "--to", "file:/dev/null", "--codec", "none")
    remusd.wait(lambda d: d["state"] == "protected", "ledger", what="protected to a file")
    r = remusd.ctl("switchover", "ledger", check=False)
    assert r.returncode == 1 and "needs a receiver, not a file" in r.stderr
    assert remusd.domain("ledger")["state"] == "protected"  # nothing changed
