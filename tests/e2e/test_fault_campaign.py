"""Faults: a short run of bench/faults.py's scenarios, and the fixes they led to.

* one run of each scenario of ``bench.faults`` (real hosts, daemons, TCP; the
  campaign's own checks: the checkpoint the backup resumed from, its memory
  digest against the primary's, ``ledger-check --acked``; for SIGSTOP the
  fencing of the stale primary; for a TCP reset no failover; for a full disk
  a clean refusal);
* the simulator: ``list()`` leaves out a domain destroyed while it is being
  listed; a domain's memory is allocated at create (ENOSPC there, never
  SIGBUS later); released output on a full filesystem waits in a backlog;
* ``REMUSD_FAULT`` parsing.

The full campaign is ``python -m bench.faults --runs 100`` (docs/faults.md).
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bench import faults as bf
from remusd import faults as rf
from tests.simhost import SimHost
from xenbind.errors import DomainError
from xenbind.mirrorclient import missing
from xenbind.sim.client import SimHypervisor
from xenbind.sim.outputs import OutputBuffer

ROOT = os.geteuid() == 0


@pytest.fixture
def small_tmpfs():
    """A mounted tmpfs of the given size (root only); unmounted after."""
    if not ROOT:
        pytest.skip("needs root to mount a tmpfs")
    mounted: list[str] = []

    def make(size: str) -> str:
        mnt = tempfile.mkdtemp(prefix="remus-test-tmpfs-")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        os.rmdir(mnt)


# --------------------------------------------------------------------- the campaign


@pytest.fixture(scope="module")
def campaign():
    root = Path(tempfile.mkdtemp(prefix="remus-faults-test-"))
    camp = bf.Campaign(root, seed=20261127, keep_logs=root.parent)
    yield camp
    camp.close()
    import shutil

    shutil.rmtree(root, ignore_errors=True)


CAMPAIGN = [s for s in bf.SCENARIOS if s != "receiver-restart"]  # tests/e2e has it


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("scenario", CAMPAIGN)
def test_fault_scenario(campaign, scenario):
    if scenario in bf.DISK_SCENARIOS and missing() is not None:
        pytest.skip(f"no block server here: {missing()}")
    r = campaign.run(scenario, CAMPAIGN.index(scenario))
    if r.ok and r.detail.startswith("skipped"):
        pytest.skip(r.detail)
    assert r.ok, f"{r.error} (logs kept in {r.logs})"
    assert r.detail


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(missing() is not None, reason=f"no block server here: {missing()}")
def test_disk_power_cut_smoke(campaign):
    """Two more power cuts of guests with disks: the backup's disks are the
    acknowledged checkpoint's (correctness only; docs/faults.md has the
    campaign's figures)."""
    for i in range(2):
        r = campaign.run("disk-power-cut", 100 + i)
        assert r.ok, f"{r.error} (logs kept in {r.logs})"
        assert r.figures["disk_differs"] == 0 and r.figures["ledger_check_failed"] == 0
        assert r.figures["run_on_failed"] == 0


def test_scenarios_cover_the_issue():
    kinds = {bf.KILL_POINTS[s][0] for s in bf.KILL_POINTS}
    assert kinds == set(rf.KINDS)
    assert {"kill-random", "sigstop", "tcp-reset", "receiver-restart", "disk-full"} <= set(
        bf.SCENARIOS
    )
    assert {"disk-power-cut", "disk-receiver-kill"} <= set(bf.SCENARIOS)
    assert set(bf.RUNNERS) == set(bf.SCENARIOS)


def test_summary_counts():
    rs = [
        bf.Result("a", 0, True, 1.0, "x"),
        bf.Result("a", 1, False, 3.0, error="boom"),
        bf.Result("b", 2, True, 2.0, "skipped: no root"),
    ]
    per = bf.summarize(rs)
    assert per["a"] == {
        "runs": 2,
        "ok": 1,
        "failed": 1,
        "skipped": 0,
        "seconds_mean": 2.0,
        "seconds_max": 3.0,
    }
    assert per["b"]["skipped"] == 1 and per["b"]["ok"] == 0


# --------------------------------------------------------------------- REMUSD_FAULT


@pytest.mark.parametrize(
    "spec,want",
    [
        ("stall-paused:1:3", rf.Fault("stall-paused", 1, 3)),
        ("stall-after-ack:2:0", rf.Fault("stall-after-ack", 2, 0)),
        ("stall-mid-checkpoint:1:0", rf.Fault("stall-mid-checkpoint", 1, 0)),
        ("stall-paused:1:0", None),  # no paused capture of its own in checkpoint 0
        ("stall-mid-chunk:0:4", None),  # sessions count from 1
        ("explode:1:1", None),
        ("stall-paused:x:1", None),
        ("stall-paused", None),
    ],
)
def test_fault_spec(monkeypatch, spec, want):
    monkeypatch.setenv(rf.ENV, spec)
    assert rf.from_env() == want


def test_fault_unset(monkeypatch):
    monkeypatch.delenv(rf.ENV, raising=False)
    assert rf.from_env() is None
    assert rf.Fault("stall-paused", 1, 3).at("stall-paused", 1, 3)
    assert not rf.Fault("stall-paused", 1, 3).at("stall-paused", 2, 3)


# --------------------------------------------------------------------- the simulator


class _DestroyWhileListing(SimHypervisor):
    """The host's list answer arrives, then ``victim`` is destroyed before the
    client reads the domains' status pages: the race the receiver hit when a
    backup was destroyed by another session while it listed the host."""

    victim: str | None = None

    def request(self, req: dict, op: str, ref=None) -> dict:
        reply = super().request(req, op, ref)
        if req.get("op") == "list" and self.victim is not None:
            super().request({"op": "destroy", "ref": self.victim}, "destroy", self.victim)
            self.victim = None
        return reply


def test_list_leaves_out_a_domain_destroyed_while_listed(sim_host):
    sim_host.create("1M", "idle", name="stays")
    sim_host.create("1M", "idle", name="goes")
    hv = _DestroyWhileListing(sim_host.dir)
    hv.victim = "goes"
    names = [i.name for i in hv.list()]
    assert names == ["stays"]
    assert [i.name for i in hv.list()] == ["stays"]


def test_list_still_reports_a_dead_domain(sim_host):
    dom = sim_host.create("1M", "idle", name="dies")
    os.kill(dom.status()["pid"], 9)
    hv = SimHypervisor(sim_host.dir)
    deadline = time.monotonic() + 10  # until the host reaped the worker
    while {i.name: i for i in hv.list()}["dies"].state != "shutdown":
        assert time.monotonic() < deadline, "the dead domain is not listed as shut down"
        time.sleep(0.05)


def test_list_fails_when_the_host_is_down(tmp_path):
    with pytest.raises(DomainError, match="not running"):
        SimHypervisor(tmp_path).list()


def test_create_on_a_full_filesystem_is_refused_cleanly(small_tmpfs):
    mnt = small_tmpfs("4m")
    with SimHost(os.path.join(mnt, "host")) as host:
        with pytest.raises(DomainError, match="No space left on device"):
            host.hv.create_backup(_config("big", 8 << 20))
        assert not [p for p in os.listdir(host.dir) if p.startswith("dom-")]
        assert host.hv.ping()["pid"] == host.pid  # the host serves on
        small = host.hv.create_backup(_config("small", 1 << 20))
        # the memory is allocated: filling the filesystem cannot make a write
        # into the domain fault later
        fill = Path(mnt) / "filler"
        bf.fill(fill)
        import numpy as np

        pages = np.full((small.pages, 4096), 7, dtype=np.uint8)
        small.scatter(np.arange(small.pages, dtype=np.uint64), pages)
        out = np.empty_like(pages)
        small.gather(np.arange(small.pages, dtype=np.uint64), out)
        assert (out == 7).all()


def _config(name: str, size: int):
    import uuid

    from xenbind.types import DomainConfig

    return DomainConfig(
        name=name,
        uuid=str(uuid.uuid4()),
        pages=size // 4096,
        vcpus=1,
        hvm=True,
        extra={"workload": "idle", "seed": 1},
    )


def test_output_on_a_full_filesystem_waits_in_a_backlog(small_tmpfs):
    mnt = small_tmpfs("64k")
    path = os.path.join(mnt, "dom.out")
    buf = OutputBuffer(path)
    filler = Path(mnt) / "filler"
    bf.fill(filler)
    records = [f"ack {i}\n".encode() for i in range(2000)]
    rng = random.Random(3)
    i = 0
    while i < 1000:  # unplugged: released at once, but the file is full
        n = rng.randint(1, 50)
        buf.emit(records[i : i + n])
        i += n
    assert buf.released == i and buf.backlog
    os.unlink(filler)
    buf.emit(records[i:])
    buf.close()
    assert not buf.backlog and buf.released == len(records)
    assert Path(path).read_bytes() == b"".join(records)  # late, never lost or reordered


# --------------------------------------------------------------------- remusd's fencing


def _scripted_receiver(lsock, then_error, close_how: str):
    """Accept one session, ACCEPT it, wait for ``then_error``, send ERROR
    failed-over, then close (``rst``: SO_LINGER 0; ``fin``: a plain close)."""
    import socket
    import struct

    from xenbind import session as sp

    c, _ = lsock.accept()
    rs = sp.ReceiverSession()
    hello = None
    while hello is None:
        hello = next(
            (e.hello for e in rs.feed(c.recv(65536)) if isinstance(e, sp.HelloReceived)), None
        )
    c.sendall(
        rs.accept(sp.Accept(session_id=hello.session_id, failover_timeout_ms=500, heartbeat_ms=100))
    )
    then_error.wait(10)
    c.sendall(rs.error(sp.ERR_FAILED_OVER, "the backup took over from checkpoint 7"))
    time.sleep(0.05)
    if close_how == "rst":
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


@pytest.mark.parametrize("close_how", ["rst", "fin"])
def test_send_error_after_failover_reports_fenced(close_how):
    """remusd frozen while its receiver failed over: when it wakes, its next
    send fails (the receiver closed); the ERROR failed-over queued before the
    close must be the reason (fenced), not the socket error (a retry after
    releasing the guest's output)."""
    import socket
    import threading
    import uuid

    from remusd.config import Target
    from remusd.link import LinkDown, NetLink
    from xenbind import session as sp
    from xenbind.types import DomainConfig

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    go = threading.Event()
    th = threading.Thread(target=_scripted_receiver, args=(lsock, go, close_how), daemon=True)
    th.start()
    hello = sp.Hello(
        session_id=sp.new_session_id(),
        options=sp.Options(),
        domain=DomainConfig(
            name="g", uuid=str(uuid.uuid4()), pages=64, vcpus=1, hvm=True, extra={}
        ),
        generation=1,
    )
    link = NetLink(
        Target("tcp", "127.0.0.1", lsock.getsockname()[1]), hello, connect_timeout=5, io_timeout=5
    )
    link.open()
    go.set()
    th.join(10)
    time.sleep(0.2)  # the ERROR, the FIN or RST are all here: the sender "wakes up"
    with pytest.raises(LinkDown) as exc:
        for _ in range(100):  # a send may land in the socket buffer before the reset shows
            link.send([b"\0" * 65536])
            time.sleep(0.01)
    link.close()
    lsock.close()
    assert exc.value.fenced and exc.value.permanent, exc.value.reason
    assert "took over from checkpoint 7" in exc.value.reason
