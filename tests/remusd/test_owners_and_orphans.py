"""Issue 12 on remusd's side: one owner per domain (defect 1), a crashed remusd's
orphans (defect 3), the HELLO's ack_ms and the limit refusal (defect 4),
``protect --wait``, stopped rows, option messages, ERROR shutdown (defect 7),
and the metrics endpoint.

The daemons run as real processes on a simulated host. A small fake receiver
(xenbind.session's receiver side over a socket) answers a HELLO the way a test
needs (REFUSE fenced, REFUSE limit, ACCEPT then ERROR shutdown), so the sender's
answers are checked whatever the real receiver does."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from daemonkit.control import ControlError, control_request
from daemonkit.tls import plaintext_connect
from remusd.config import MIN_INTERVAL_MS, ProtectRequest, Target, build_parser
from remusd.control import Daemon
from remusd.owners import Store
from remusd.protector import Protector, Tuning
from xenbind import session as sp

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _wait(pred: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except (ControlError, OSError, KeyError, IndexError):
            v = None
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Remusd:
    """remusd on a simulated host (the environment's PYTHONPATH is kept, so a
    check against old code can put an old tree first)."""

    def __init__(self, sim_dir: str, workdir: Path, tag: str, *extra: str, env=None) -> None:
        self.ctl = str(workdir / f"remusd-{tag}.sock")
        self.log_path = workdir / f"remusd-{tag}.log"
        self.argv = [
            str(BIN / "remusd"),
            "--sim-dir",
            sim_dir,
            "--control",
            self.ctl,
            "--config",
            "/dev/null",
            "--insecure",
            "--log-level",
            "debug",
            *extra,
        ]
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Remusd:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, env=self.env)
        _wait(lambda: control_request(self.ctl, "status", timeout=2), what="remusd to answer")
        return self

    def status(self) -> dict:
        return control_request(self.ctl, "status", timeout=10)

    def domain(self, name: str) -> dict:
        for d in self.status()["domains"]:
            if d["name"] == name:
                return d
        raise KeyError(name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class FakeReceiver:
    """Accepts sessions and answers each HELLO with ``answer(hello)`` (bytes to
    send; the connection then stays open until the peer leaves). Records the
    HELLOs."""

    def __init__(self, answer: Callable[[sp.Hello, sp.ReceiverSession], bytes]) -> None:
        self.answer = answer
        self.hellos: list[sp.Hello] = []
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        rs = sp.ReceiverSession()
        with conn:
            conn.settimeout(30)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    for ev in rs.feed(data):
                        if isinstance(ev, sp.HelloReceived):
                            self.hellos.append(ev.hello)
                            conn.sendall(self.answer(ev.hello, rs))
            except (OSError, sp.HandshakeError, Exception):
                return

    def close(self) -> None:
        self._stop = True
        self.lsock.close()


def refuse(code: str, reason: str):
    return lambda hello, rs: rs.refuse(code, reason)


@pytest.fixture
def host(sim_host):
    return sim_host


def _record(store: Store, dom, target: str, **kw) -> None:
    info = dom.info()
    rec = {
        "uuid": info.uuid,
        "domid": info.domid,
        "name": info.name,
        "target": target,
        "interval_ms": 50,
        "codec": "xen",
        "verify": False,
        "generation": 1234,
        "pid": 999999,
        "session": "ab" * 16,
        "state": "protected",
        "case": "protected",
        "engaged": True,
        "held": None,
    }
    rec.update(kw)
    store.write_record(info.uuid, rec)


# ----------------------------------------------------------------- defect 1: two owners


def test_second_protect_from_another_remusd_is_refused_naming_the_owner(host, tmp_path):
    """Two remusd processes on one host: the second protect of the domain is
    refused (the lock under the state directory); the message names the
    owner's pid and target. Before: both were accepted."""
    dom = host.create("8M", "ledger", seed=3, rate=500, name="dup")
    a = Remusd(host.dir, tmp_path, "a").start()
    b = Remusd(host.dir, tmp_path, "b").start()
    try:
        control_request(a.ctl, "protect", domain="dup", target=f"file:{tmp_path}/a.stream")
        _wait(lambda: a.domain("dup")["state"] == "protected", what="a protects")
        assert a.proc is not None
        with pytest.raises(ControlError) as e:
            control_request(b.ctl, "protect", domain="dup", target=f"file:{tmp_path}/b.stream")
        msg = str(e.value)
        assert f"remusd pid {a.proc.pid}" in msg and "a.stream" in msg and "one owner" in msg
        assert b.status()["domains"] == [] and b.status()["owner_refusals"] == 1
        assert "TWO OWNERS" in b.log()
        # the owner protects on, alone
        n = a.domain("dup")["checkpoints"]
        _wait(lambda: a.domain("dup")["checkpoints"] > n + 3, what="more checkpoints")
        assert a.domain("dup")["state"] == "protected"
        # once it let go, another remusd may protect the domain
        control_request(a.ctl, "unprotect", domain="dup")
        control_request(b.ctl, "protect", domain="dup", target=f"file:{tmp_path}/b.stream")
        _wait(lambda: b.domain("dup")["state"] == "protected", what="b protects")
    finally:
        for d in (a, b):
            d.stop()
    assert dom.info().extra["logdirty"] is False


def test_a_tracker_outside_the_state_directory_is_seen_by_log_dirty(host, tmp_path):
    """A remusd with another state directory (or any other log-dirty user) is
    refused by the domain's log-dirty state, before anything is connected."""
    dom = host.create("8M", "ledger", seed=4, rate=500, name="dup2")
    a = Remusd(host.dir, tmp_path, "a").start()
    c = Remusd(host.dir, tmp_path, "c", "--state-dir", str(tmp_path / "elsewhere")).start()
    try:
        control_request(a.ctl, "protect", domain="dup2", target=f"file:{tmp_path}/a.stream")
        _wait(lambda: a.domain("dup2")["state"] == "protected", what="a protects")
        with pytest.raises(ControlError, match="log-dirty mode on"):
            control_request(c.ctl, "protect", domain="dup2", target=f"file:{tmp_path}/c.stream")
        assert c.status()["domains"] == []
        assert a.domain("dup2")["state"] == "protected"
    finally:
        for d in (a, c):
            d.stop()
    assert dom.info().extra["logdirty"] is False


def test_simulator_refuses_log_dirty_twice(host):
    """As Xen (EINVAL), never off-and-on behind the first tracker's back."""
    from xenbind.errors import DomainError

    dom = host.create("4M", "idle", name="ld")
    dom.enable_logdirty()
    assert dom.logdirty_enabled()
    with pytest.raises(DomainError, match="already on"):
        dom.enable_logdirty()
    dom.disable_logdirty()
    dom.enable_logdirty()
    dom.disable_logdirty()


# ----------------------------------------------------------------- defect 3: orphans


def test_orphan_whose_backup_took_over_is_fenced_not_split_brain(host, tmp_path):
    """A remusd died protecting a domain (its record, log-dirty on, the guest
    paused mid-checkpoint, output held). The restarted remusd adopts it at
    start-up; the receiver answers REFUSE fenced: the backup took over. The
    copy here stays paused, log-dirty goes off, its output is never released;
    the status and log say "fenced-backup-took-over", not split brain.
    Before: "no protected domains", and a new protect said possible SPLIT BRAIN."""
    fake = FakeReceiver(refuse("fenced", "domain orph failed over here at checkpoint 41"))
    dom = host.create("8M", "ledger", seed=5, rate=500, name="orph")
    dom.enable_logdirty()
    dom.output_barrier()
    dom.pause()  # the dead remusd's checkpoint_stop
    released = dom.status()["outputs_released"]
    _record(Store(os.path.join(host.dir, "remusd")), dom, fake.target)
    r = Remusd(host.dir, tmp_path, "r").start()
    try:
        d = _wait(
            lambda: (lambda d: d if d["state"] == "fenced" else None)(r.domain("orph")),
            what="the orphan fenced",
        )
        assert isinstance(d, dict)
        assert d["case"] == "fenced-backup-took-over" and d["adopted"] is True
        assert "split brain" not in d["reason"]
        assert fake.hellos and fake.hellos[0].generation == 1234  # the same protection
        st = dom.status()
        assert st["pause_count"] >= 1 and st["logdirty"] is False
        assert st["outputs_released"] == released
        assert "ORPHAN found" in r.log() and "SPLIT BRAIN" not in r.log()
        assert r.status()["orphans_found"] == 1
        # the operator's decision: destroy the stale copy
        with pytest.raises(ControlError, match="not protected by this remusd"):
            control_request(r.ctl, "destroy-stale", domain="nosuch")
        d = control_request(r.ctl, "destroy-stale", domain="orph")
        assert d["case"] == "destroyed-stale" and d["state"] == "stopped"
        assert "orph" not in [i.name for i in host.hv.list()]
    finally:
        r.stop()
        fake.close()


def test_fenced_copy_survives_a_restart_then_resume_here(host, tmp_path):
    """A fenced copy's record outlives a daemon stop (the guest stays paused),
    the next remusd reports it fenced, and ``remusctl resume-here`` runs it
    here: unpaused, output released, log-dirty off; refused on a domain that
    is not fenced."""
    fake = FakeReceiver(refuse("fenced", "failed over"))
    dom = host.create("8M", "ledger", seed=6, rate=500, name="fen")
    other = host.create("4M", "idle", name="plain")
    dom.enable_logdirty()
    dom.output_barrier()
    _record(Store(os.path.join(host.dir, "remusd")), dom, fake.target)
    r = Remusd(host.dir, tmp_path, "r1").start()
    try:
        _wait(lambda: r.domain("fen")["case"] == "fenced-backup-took-over", what="fenced")
    finally:
        r.stop()
    r2 = Remusd(host.dir, tmp_path, "r2").start()
    try:
        d = r2.domain("fen")
        assert d["state"] == "fenced" and d["case"] == "fenced-backup-took-over"
        assert dom.status()["pause_count"] >= 1
        with pytest.raises(ControlError, match="neither fenced nor orphaned"):
            control_request(r2.ctl, "resume-here", domain=str(other.domid))
        r = subprocess.run(
            [str(BIN / "remusctl"), "--control", r2.ctl, "resume-here", "fen"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert "resumed-here" in r.stdout and "two copies" in r.stdout
        st = dom.status()
        assert st["pause_count"] == 0 and st["logdirty"] is False
        step = dom.step
        _wait(lambda: dom.step > step + 10, what="the guest to run")
        _wait(lambda: dom.status()["outputs_released"] > 0, what="output released")
    finally:
        r2.stop()
        fake.close()


def test_kill9_mid_checkpoint_restart_resumes_protection(host, tmp_path):
    """remusd kill -9 with the guest paused inside a checkpoint (REMUSD_FAULT
    stall-paused): the guest stays paused, log-dirty on, output held. The
    restarted remusd adopts it, reconnects, undoes the stop, takes log-dirty
    over and protects it again; the dead session's held output is released
    with the new session's first ACK, never before."""
    dom = host.create("8M", "ledger", seed=7, rate=800, name="crash")
    stream = tmp_path / "c.stream"
    a = Remusd(host.dir, tmp_path, "a", env={"REMUSD_FAULT": "stall-paused:1:3"}).start()
    control_request(a.ctl, "protect", domain="crash", target=f"file:{stream}", interval_ms=20)
    _wait(lambda: "stalling" in a.log(), what="the fault point")
    a.kill()
    st = dom.status()
    assert st["pause_count"] == 1 and st["logdirty"] is True and st["outputs_buffered"] > 0
    b = Remusd(host.dir, tmp_path, "b").start()
    try:
        d = _wait(
            lambda: (lambda d: d if d["state"] == "protected" else None)(b.domain("crash")),
            what="protected again",
        )
        assert isinstance(d, dict) and d["adopted"] is True and d["case"] == "protected"
        # the dead owner's stop is undone: the pause count falls to 0. A look
        # may land inside one of the new session's 20 ms checkpoints (paused for
        # a moment, count 1), so look a few times; an undone stop never reads 0
        looks = [dom.status() for _ in range(20)]
        assert any(st["pause_count"] == 0 for st in looks), [st["pause_count"] for st in looks]
        assert all(st["logdirty"] is True for st in looks)
        n = dom.status()["outputs_released"]
        _wait(lambda: dom.status()["outputs_released"] > n, what="output flowing again")
        # the barriers do not pile up: one per checkpoint in flight at most
        assert dom.status()["barriers"] <= 2
        assert "ORPHAN found" in b.log() and "mid-checkpoint" in b.log()
        control_request(b.ctl, "unprotect", domain="crash")
        # a clean end removes the record: nothing left for a successor
        assert Store(os.path.join(host.dir, "remusd")).records() == []
    finally:
        b.stop()
        a.kill()


def test_unit_restarts_within_the_default_failover_timeout():
    """systemd/remusd.service restarts a crashed remusd fast enough for it to
    reconnect before a receiver's default failover timeout (900 ms at the
    default 200 ms interval); before: RestartSec=2."""
    text = (REPO / "systemd" / "remusd.service").read_text()
    m = re.search(r"^RestartSec=(\d+)(ms)?\s*$", text, re.M)
    assert m, "RestartSec missing"
    restart_s = int(m.group(1)) / (1000 if m.group(2) else 1)
    assert restart_s <= 0.2
    assert re.search(r"^Restart=(on-failure|always)\s*$", text, re.M)
    assert re.search(r"^RuntimeDirectoryPreserve=yes\s*$", text, re.M)  # the records survive


# ----------------------------------------------------------------- defect 4: ack_ms


def _tuning(**kw) -> Tuning:
    args = build_parser().parse_args(["--interval", "20", "--retry-min", "5", *kw.get("argv", [])])
    return Tuning.from_args(args, kw.get("connect"))


def test_hello_carries_the_median_ack_time_of_the_last_session(tmp_path):
    from tests.remusd.test_protector_and_faults import MemDomain

    dom = MemDomain("ackms")
    req = ProtectRequest("ackms", Target.parse(f"file:{tmp_path}/s.stream"), 20)
    p = Protector(dom, dom.info(), req, _tuning())
    assert p._hello().options.ack_ms == 0  # unknown before any session
    p.start()
    _wait(lambda: p.status()["checkpoints"] >= 5, what="checkpoints")
    p.stop()
    assert p.join(10)
    st = p.status()
    assert st["ack_median_ms"] >= 1
    hello = p._hello()
    assert hello.options.ack_ms == st["ack_median_ms"]
    # and a new protection of the domain starts from it
    q = Protector(dom, dom.info(), req, _tuning(), ack_ms=st["ack_median_ms"])
    assert q._hello().options.ack_ms == st["ack_median_ms"]


def test_refuse_limit_is_one_clear_line_and_permanent(tmp_path, caplog):
    from tests.remusd.test_protector_and_faults import MemDomain

    fake = FakeReceiver(
        refuse("limit", "failover timeout 500 ms cannot hold 2 x 200 ms + ack 300 ms")
    )
    dom = MemDomain("lim")
    req = ProtectRequest("lim", Target.parse(fake.target), 20)
    p = Protector(dom, dom.info(), req, _tuning(connect=plaintext_connect))
    with caplog.at_level("ERROR", logger="remusd.protector"):
        p.start()
        _wait(lambda: p.state == "unprotected", what="refused")
        time.sleep(0.3)
    try:
        st = p.status()
        assert st["reason"].endswith("(not retrying)") and st["case"] == "refused"
        lines = [r.getMessage() for r in caplog.records if "refuses" in r.getMessage()]
        assert len(lines) == 1 and "NOT PROTECTED" in lines[0] and "2 x 200 ms" in lines[0]
        assert len(fake.hellos) == 1  # not retried
    finally:
        p.stop()
        p.join(5)
        fake.close()


# ----------------------------------------------------------------- defect 7


def test_protect_wait_to_nothing_listening_fails_with_the_reason(host, tmp_path):
    host.create("4M", "idle", name="w")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening
    r = Remusd(host.dir, tmp_path, "w").start()
    try:
        t0 = time.monotonic()
        out = subprocess.run(
            [str(BIN / "remusctl"), "--control", r.ctl, "protect", "w", "--to", dead, "--wait=1.5"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 3, out.stderr
        assert time.monotonic() - t0 >= 1.5
        assert "not protected after 1.5 s" in out.stderr and "cannot connect" in out.stderr
        # a refusal ends the wait at once, exit 1
        fake = FakeReceiver(refuse("codec", "codec xen is not enabled here"))
        control_request(r.ctl, "unprotect", domain="w")
        out = subprocess.run(
            [str(BIN / "remusctl"), "--control", r.ctl, "protect", "w", "--to", fake.target]
            + ["--wait"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        fake.close()
        assert out.returncode == 1 and "codec xen is not enabled" in out.stderr
    finally:
        r.stop()


def test_stopped_rows_are_dropped_after_keep_stopped(tmp_path):
    from tests.remusd.test_protector_and_faults import MemDomain, OneDomainHv

    dom = MemDomain("gone")
    args = build_parser().parse_args(["--interval", "20", "--keep-stopped", "0.3"])
    daemon = Daemon(OneDomainHv(dom), args, None)
    daemon.protect(ProtectRequest("gone", Target.parse(f"file:{tmp_path}/g.stream"), 20))
    _wait(lambda: daemon.status()["domains"][0]["state"] == "protected", what="protected")
    daemon.unprotect("gone")
    assert daemon.status()["domains"][0]["state"] == "stopped"
    time.sleep(0.4)
    assert daemon.status()["domains"] == []


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--ack-timeout", "nan"], "'nan' is not a number of seconds"),
        (["--ack-timeout", "0"], "must be more than 0 seconds"),
        (["--precopy-rounds", "1.5"], "'1.5' is not a whole number of rounds"),
        (["--buffer-pages", "lots"], "'lots' is not a whole number of pages"),
        (["--interval", "fast"], "'fast' is not a whole number of ms"),
        (
            ["--interval", str(MIN_INTERVAL_MS - 1)],
            f"{MIN_INTERVAL_MS - 1} ms is out of range ({MIN_INTERVAL_MS} to 60000 ms)",
        ),
    ],
)
def test_option_errors_speak_the_operators_words(argv, says, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert says in err
    assert not re.search(r"invalid (int|float|conv) value", err)


def test_receiver_shutdown_is_not_called_a_failover(tmp_path, caplog):
    """ERROR shutdown: the receiver is stopping; its backup stays paused; say
    so, not that it will fail over."""
    from tests.remusd.test_protector_and_faults import MemDomain

    def accept_then_stop(hello: sp.Hello, rs: sp.ReceiverSession) -> bytes:
        return rs.accept(sp.Accept(hello.session_id, 600, 100)) + rs.error(
            sp.ERR_SHUTDOWN, "receiver stopping (SIGTERM)"
        )

    fake = FakeReceiver(accept_then_stop)
    dom = MemDomain("shut")
    req = ProtectRequest("shut", Target.parse(fake.target), 20)
    p = Protector(dom, dom.info(), req, _tuning(connect=plaintext_connect))
    with caplog.at_level("WARNING", logger="remusd.protector"):
        p.start()
        _wait(lambda: len(fake.hellos) >= 2, what="a reconnection")
    p.stop()
    p.join(10)
    fake.close()
    msgs = [r.getMessage() for r in caplog.records]
    stopping = [m for m in msgs if "is stopping" in m]
    assert stopping and "stays paused" in stopping[0] and "reconnecting" in stopping[0]
    assert not any("fails over after" in m for m in msgs)


# ----------------------------------------------------------------- metrics


def test_metrics_endpoint_passes_promtool(host, sim_host_factory, tmp_path):
    """A real remusd and receiver on the simulator, --metrics: the scrape has
    the per-domain families and passes `promtool check metrics`."""
    from tests.daemonkit.test_metrics import check_metrics
    from tests.e2e.conftest import Receiver, free_port

    backup = sim_host_factory()
    rx = Receiver(tmp_path, backup, free_port()).start()
    host.create("8M", "ledger", seed=9, rate=500, name="met")
    mport = free_port()
    r = Remusd(host.dir, tmp_path, "m", "--metrics", f"127.0.0.1:{mport}").start()
    try:
        control_request(r.ctl, "protect", domain="met", target=rx.target, interval_ms=30)
        _wait(lambda: r.domain("met")["checkpoints"] >= 10, what="checkpoints")
        d = r.domain("met")
        assert d["failover_timeout_ms"] and d["peer_address"].startswith("127.0.0.1:")
        assert d["checkpoint_rate"] and d["last_ack_age_s"] is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        check_metrics(text)
        for name in (
            'remusd_checkpoints_total{domain="met"}',
            'remusd_sent_bytes_total{domain="met"}',
            'remusd_pause_seconds_bucket{domain="met",le="0.001"}',
            'remusd_ack_seconds_count{domain="met"}',
            'remusd_dirty_pages_bucket{domain="met"',
            'remusd_domain_state{domain="met",state="protected"} 1.0',
            'remusd_domain_case{case="protected",domain="met"} 1.0',
            'remusd_failover_timeout_seconds{domain="met"}',
            'remusd_last_ack_age_seconds{domain="met"}',
            "remusd_owner_refusals_total 0.0",
        ):
            assert name in text, name
        # the human status shows the new columns
        out = subprocess.run(
            [str(BIN / "remusctl"), "--control", r.ctl, "status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "CASE" in out.stdout and "FAILOVER ms" in out.stdout and "protected" in out.stdout
        js = json.loads(
            subprocess.run(
                [str(BIN / "remusctl"), "--control", r.ctl, "status", "--json"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
        )
        assert {"case", "checkpoint_rate", "peer_names", "peer_not_after"} <= set(js["domains"][0])
    finally:
        r.stop()
        with contextlib.suppress(Exception):
            rx.stop()
