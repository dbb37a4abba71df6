"""The protector driven in-process (an in-memory domain, a file target), the fault
wrappers of remusd.faults, and the pacer: what the campaign (tests/e2e) does not
pin down on its own."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from remusd import faults
from remusd.config import ProtectRequest, Target, build_parser
from remusd.control import Daemon
from remusd.core import Heartbeats
from remusd.epoch import CheckpointBuffer, capture
from remusd.link import Link
from remusd.pacer import Pacer
from remusd.protector import Protector, Tuning
from xenbind import PAGE_SIZE
from xenbind.hypervisor import Domain, Hypervisor
from xenbind.types import Context, DomainInfo

PAGES = 64


class MemDomain(Domain):
    """A domain in memory that records what was done to it, in order."""

    def __init__(self, name: str = "mem") -> None:
        self.domid = 7
        self.name = name
        self.mem = np.zeros((PAGES, PAGE_SIZE), dtype=np.uint8)
        self.paused = 0
        self.events: list[str] = []
        self.dirty = np.arange(0, PAGES, 8, dtype=np.uint64)
        self.on_barrier = lambda: None

    def info(self) -> DomainInfo:
        return DomainInfo(
            self.domid, self.name, "0" * 8 + "-0000-4000-8000-" + "0" * 12, PAGES, 1, "running"
        )

    def pause(self) -> None:
        self.paused += 1
        self.events.append("pause")

    def unpause(self) -> None:
        self.paused -= 1
        self.events.append("unpause")

    def enable_logdirty(self) -> None:
        self.events.append("logdirty-on")

    def disable_logdirty(self) -> None:
        self.events.append("logdirty-off")

    def read_and_clear_dirty(self) -> np.ndarray:
        return self.dirty.copy()

    def gather(self, pfns: np.ndarray, out: np.ndarray) -> None:
        out[:] = self.mem[pfns.astype(np.intp)]

    def scatter(self, pfns: np.ndarray, pages: np.ndarray) -> None:
        self.mem[pfns.astype(np.intp)] = pages

    def get_context(self) -> Context:
        return Context((1, 2, 3), b"regs", b"dm")

    def set_context(self, ctx: Context) -> None:
        pass

    def output_barrier(self) -> None:
        self.events.append("barrier")
        self.on_barrier()

    def output_release(self) -> None:
        self.events.append("release")

    def output_unplug(self) -> None:
        self.events.append("unplug")

    def destroy(self) -> None:
        pass


class OneDomainHv(Hypervisor):
    kind = "test"

    def __init__(self, dom: Domain) -> None:
        self.dom = dom

    def lookup(self, ref: int | str) -> Domain:
        return self.dom

    def list(self) -> list[DomainInfo]:
        return [self.dom.info()]

    def create_backup(self, config):  # pragma: no cover - not used by a sender
        raise NotImplementedError


def _args(*argv: str):
    return build_parser().parse_args(["--interval", "20", *argv])


def _tuning(wrap=None) -> Tuning:
    return Tuning.from_args(_args(), None, wrap=wrap)


def _wait(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ------------------------------------------------------------------- the protector


def test_protector_releases_after_each_ack_and_never_leaves_the_guest_paused(tmp_path):
    dom = MemDomain()
    req = ProtectRequest("mem", Target.parse(f"file:{tmp_path}/s"), interval_ms=20)
    p = Protector(dom, dom.info(), req, _tuning()).start()
    _wait(lambda: p.status()["checkpoints"] >= 5, what="5 checkpoints")
    p.stop()
    assert p.join(10)
    st = p.status()
    assert (st["state"], st["reason"]) == ("stopped", "unprotected on request")
    assert dom.paused == 0
    # one release per acknowledged checkpoint, each after that checkpoint's capture
    # (a capture ends with the barrier), then everything unplugged once at the end
    assert dom.events.count("release") == st["checkpoints"]
    ev = [e for e in dom.events if e in ("barrier", "release", "unplug")]
    assert ev[-1] == "unplug" and ev[:-1] == ["barrier", "release"] * st["checkpoints"]
    assert st["acked"] == st["checkpoints"] - 1 and st["sessions"] == 1
    assert (tmp_path / "s").stat().st_size > PAGES * PAGE_SIZE


def test_status_answers_while_the_session_is_stuck_in_the_domain(tmp_path):
    """No lock the control socket needs is held while the session thread waits
    on the domain (here: inside the paused capture) or on a socket."""
    dom = MemDomain()
    stuck, go = threading.Event(), threading.Event()
    calls = [0]

    def barrier() -> None:
        calls[0] += 1
        if calls[0] == 3:  # checkpoint 2's capture
            stuck.set()
            go.wait(20)

    dom.on_barrier = barrier
    daemon = Daemon(OneDomainHv(dom), _args(), None)
    daemon.tuning = dataclasses.replace(daemon.tuning, retry_min=0.1)
    daemon.handle({"cmd": "protect", "domain": "mem", "target": f"file:{tmp_path}/s"})
    try:
        assert stuck.wait(10)
        t0 = time.monotonic()
        st = daemon.handle({"cmd": "status", "history": True})
        assert time.monotonic() - t0 < 0.5
        d = st["domains"][0]
        assert d["state"] == "protected" and d["acked"] == 1 and dom.paused == 1
        assert d["history"]["index"] == [1]
        assert daemon.counts() == {"protected": 1}
    finally:
        go.set()
    daemon.stop_all(10)
    assert daemon.status()["domains"][0]["state"] == "stopped" and dom.paused == 0


def test_a_file_that_cannot_be_opened_is_not_retried(tmp_path):
    dom = MemDomain()
    req = ProtectRequest("mem", Target.parse(f"file:{tmp_path}/no/such/dir/s"), interval_ms=20)
    p = Protector(dom, dom.info(), req, _tuning()).start()
    _wait(lambda: "not retrying" in (p.reason or ""), what="the refusal")
    assert p.state == "unprotected" and p.alive
    time.sleep(0.3)
    assert p.status()["retries"] == 0 and dom.events == []  # never engaged the domain
    p.stop()
    assert p.join(5)
    assert (p.state, p.reason) == ("stopped", "unprotected on request")


def test_the_session_hook_sees_each_session(tmp_path):
    seen = []

    def wrap(session, link, domain):
        seen.append((session, type(link).__name__))
        return link, domain

    dom = MemDomain()
    req = ProtectRequest("mem", Target.parse(f"file:{tmp_path}/s"), interval_ms=20)
    p = Protector(dom, dom.info(), req, _tuning(wrap)).start()
    _wait(lambda: p.status()["checkpoints"] >= 2)
    p.stop()
    assert p.join(10)
    assert seen == [(1, "FileLink")]


# ------------------------------------------------------------------- fault wrappers


class Hung(Exception):
    pass


class RecLink(Link):
    kind = "tcp"
    peer = "rec"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.checkpoints: list[int] = []
        self.beats = 0

    def open(self) -> None:
        pass

    def send(self, buffers) -> int:
        data = b"".join(bytes(b) for b in buffers)
        self.sent.append(data)
        return len(data)

    def send_checkpoint(self, index, buffers) -> int:
        self.checkpoints.append(index)
        return self.send(buffers)

    def next_acks(self, deadline):
        return []

    def heartbeat_if(self, due, data) -> bool:
        self.beats += 1
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def hang(monkeypatch):
    said = []

    def fake(what: str):
        said.append(what)
        raise Hung(what)

    monkeypatch.setattr(faults, "hang", fake)
    return said


def _wrapped(spec: str, session: int = 1, dom: Domain | None = None):
    kind, s, n = spec.split(":")
    link, dom = RecLink(), dom or MemDomain()
    flink, fdom = faults.wrapper(faults.Fault(kind, int(s), int(n)))(session, link, dom)
    return link, dom, flink, fdom


def test_mid_chunk_sends_half_the_first_chunk_then_no_heartbeat(hang):
    link, _, flink, _ = _wrapped("stall-mid-chunk:1:2")
    assert flink.heartbeat_if(lambda now, last: True, b"hb") and link.beats == 1
    flink.send_checkpoint(1, [b"a" * 10, b"t"])
    with pytest.raises(Hung, match="sent 50 of the 100 bytes of checkpoint 2's first chunk"):
        flink.send_checkpoint(2, [b"x" * 100, b"y" * 30, b"tail"])
    assert link.sent[-1] == b"x" * 50 and link.checkpoints == [1]
    assert not flink.heartbeat_if(lambda now, last: True, b"hb") and link.beats == 1


def test_before_tail_and_mid_checkpoint(hang):
    link, _, flink, _ = _wrapped("stall-before-tail:1:0")
    with pytest.raises(Hung, match="sent checkpoint 0 but its tail"):
        flink.send_checkpoint(0, [b"body", b"end", b"TAIL"])
    assert link.sent == [b"bodyend"]
    link, _, flink, _ = _wrapped("stall-mid-checkpoint:1:3")
    for i in (1, 2):
        flink.send_checkpoint(i, [b"ok"])
    with pytest.raises(Hung, match="sent 5 of 10 bytes of checkpoint 3"):
        flink.send_checkpoint(3, [b"abcdef", b"ghij"])
    assert link.sent[-1] == b"abcde"


def test_mid_checkpoint_zero_counts_the_initial_copy(hang):
    link, _, flink, _ = _wrapped("stall-mid-checkpoint:1:0")  # half of 64 pages
    half = PAGES * PAGE_SIZE // 2
    flink.send([b"h" * 100])
    flink.send([b"p" * (half - 200)])
    with pytest.raises(Hung, match=f"sent {half + 100} bytes of the initial copy"):
        flink.send([b"p" * 200])
    assert len(link.sent) == 3  # the crossing send went out whole
    assert not flink.heartbeat_if(lambda now, last: True, b"hb")


def test_paused_hangs_inside_the_capture_of_checkpoint_n(hang, monkeypatch):
    dom = MemDomain()
    paused_at_hang = []
    fake = faults.hang

    def record(what: str):
        paused_at_hang.append(dom.paused)
        fake(what)

    monkeypatch.setattr(faults, "hang", record)
    _, _, _, fdom = _wrapped("stall-paused:1:1", dom=dom)
    cb = CheckpointBuffer(PAGES, verify=False)
    capture(fdom, cb)  # checkpoint 0 (the initial copy's final round)
    with pytest.raises(Hung, match="guest paused in the capture of checkpoint 1"):
        capture(fdom, cb)
    assert paused_at_hang == [1]  # paused, after the copy and the barrier
    assert dom.events[-2:] == ["barrier", "unpause"]  # (a real hang never returns)


@pytest.mark.parametrize("kind,released", [("stall-after-ack", 1), ("stall-after-release", 2)])
def test_after_ack_and_after_release(hang, kind, released):
    dom = MemDomain()
    _, _, _, fdom = _wrapped(f"{kind}:1:1", dom=dom)
    fdom.output_release()  # checkpoint 0's
    with pytest.raises(Hung, match="checkpoint 1 acknowledged"):
        fdom.output_release()
    assert dom.events.count("release") == released


def test_other_sessions_are_not_wrapped():
    link, dom = RecLink(), MemDomain()
    wrap = faults.wrapper(faults.Fault("stall-paused", 2, 1))
    assert wrap(1, link, dom) == (link, dom)
    flink, fdom = wrap(2, link, dom)
    assert isinstance(flink, faults.FaultyLink) and isinstance(fdom, faults.FaultyDomain)
    assert fdom.info() == dom.info() and flink.kind == "tcp"


def test_session_wrapper_reads_the_environment(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.session_wrapper() is None
    monkeypatch.setenv(faults.ENV, "stall-after-ack:1:0")
    assert callable(faults.session_wrapper())


# ------------------------------------------------------------------- the pacer


def test_pacer_sends_through_the_link_and_stops_for_good():
    link = RecLink()
    pacer = Pacer(link, b"hb", Heartbeats(idle_s=0.01), "t")
    _wait(lambda: link.beats >= 3, what="heartbeats")
    pacer.stop()
    n = link.beats
    time.sleep(0.05)
    assert link.beats == n and pacer.schedule.closed


def test_no_pacer_thread_for_a_link_without_heartbeats():
    link = RecLink()
    link.heartbeats = False
    pacer = Pacer(link, b"hb", Heartbeats(idle_s=0.001), "t")
    time.sleep(0.03)
    pacer.stop()
    assert link.beats == 0
