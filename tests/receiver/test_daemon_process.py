"""remus-receiver as a real process on a real simulated host, driven over TCP
by a hand-written sender (xenbind.session + xenbind.stream, not remusd).

Every test bounds its waits; domains are small (1-2 MiB, idle workload, so the
backup's memory after a failover is exactly what was committed).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from pathlib import Path

import numpy as np
import pytest

from daemonkit.control import control_request
from tests.simhost import SimHost, host_pair
from xenbind import PAGE_SIZE
from xenbind.errors import DomainError
from xenbind.session import (
    ERR_FAILED_OVER,
    ERR_PROTOCOL,
    ERR_SUPERSEDED,
    HELLO_MAGIC,
    PREFIX,
    PROTOCOL_VERSION,
    Accepted,
    Ack,
    Error,
    Goodbye,
    Hello,
    Options,
    Refused,
    SenderSession,
    encode_hello,
    new_session_id,
)
from xenbind.stream import StreamWriter, encode_header, memory_digest
from xenbind.stream.format import TAG_COMPRESSED_DATA
from xenbind.types import DomainConfig

pytestmark = pytest.mark.timeout(120)

REPO = str(Path(__file__).resolve().parents[2])
RECEIVER = os.path.join(os.path.dirname(sys.executable), "remus-receiver")
PAGES = 512  # 2 MiB domains
INTERVAL_MS = 50  # -> default failover timeout max(500, 3*50+300) = 500 ms
FAILOVER_S = 0.5


# --------------------------------------------------------------------------- fixtures


class Receiver:
    """A remus-receiver process; its log is read from a file."""

    def __init__(self, backup_dir: str, workdir: str, *extra: str, insecure: bool = True) -> None:
        """``insecure``: plaintext (--insecure); False for a TLS receiver, whose
        --tls-* flags come in ``extra``. Later flags in ``extra`` win."""
        os.makedirs(workdir, exist_ok=True)
        self.control = os.path.join(workdir, "receiver.sock")
        self.logpath = os.path.join(workdir, "receiver.log")
        self.logf = open(self.logpath, "wb")
        empty = os.path.join(workdir, "empty.toml")
        open(empty, "w").close()
        self.proc = subprocess.Popen(
            [
                RECEIVER,
                "--listen",
                "127.0.0.1:0",
                *(["--insecure"] if insecure else []),
                "--sim-dir",
                backup_dir,
                "--control",
                self.control,
                "--config",
                empty,
                "--handshake-timeout",
                "1",
                "--stall-timeout",
                "2",
                *extra,
            ],
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, JOURNAL_STREAM=""),
        )  # plain lines, whoever runs pytest
        deadline = time.monotonic() + 20
        while True:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"receiver did not start: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        with open(self.logpath, errors="replace") as f:
            return f.read()

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            time.sleep(0.02)
        raise AssertionError(f"log never matched {pattern!r}:\n{self.log()[-4000:]}")

    def status(self) -> dict:
        return control_request(self.control, "status", timeout=5)

    def session(self, name: str) -> dict:
        for s in self.status()["sessions"]:
            if s["domain"] == name:
                return s
        raise KeyError(name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def hosts():
    with host_pair("rx") as pair:
        yield pair


@pytest.fixture(scope="module")
def receiver(hosts, tmp_path_factory):
    _, backup = hosts
    r = Receiver(backup.dir, str(tmp_path_factory.mktemp("receiver")))
    yield r
    assert r.stop() == 0, r.log()[-3000:]
    assert "Traceback" not in r.log(), r.log()


_names = iter(range(1, 10_000))


class Guest:
    """A domain on the primary host (idle workload) and the memory the test
    sender pretends it has at each checkpoint."""

    def __init__(self, primary: SimHost, pages: int = PAGES) -> None:
        self.name = f"g{next(_names)}-{os.getpid()}"
        self.dom = primary.create(
            memory=pages * PAGE_SIZE,
            workload="idle",
            seed=1,
            name=self.name,
            uuid=str(uuidlib.uuid4()),
        )
        self.dom.pause()
        info = self.dom.info()
        self.config = DomainConfig(
            name=info.name,
            uuid=info.uuid,
            pages=info.pages,
            vcpus=info.vcpus,
            hvm=True,
            extra={"workload": "idle", "seed": 1},
        )
        self.context = self.dom.get_context()
        self.pages = pages
        self.memory = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)
        self.dom.gather(np.arange(pages, dtype=np.uint64), self.memory)
        self.rng = np.random.default_rng(next(_names))
        # the magic pages at the top belong to the simulator: leave them as they are
        self.usable = pages - 3

    def dirty(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        pfns = np.sort(self.rng.choice(self.usable, size=count, replace=False)).astype(np.uint64)
        data = self.memory[pfns.astype(np.int64)].copy()
        # change a few words of each page (so the codecs have deltas to send)
        for i in range(count):
            words = data[i].view(np.uint32)
            idx = self.rng.choice(1024, size=8, replace=False)
            words[idx] = self.rng.integers(0, 2**32, size=8, dtype=np.uint32)
        self.memory[pfns.astype(np.int64)] = data
        return pfns, data


class Sender:
    """The test's hand-written sender: one session to the receiver."""

    def __init__(
        self,
        port: int,
        guest: Guest,
        *,
        codec: str = "seed",
        verify: bool = True,
        generation: int | None = None,
        interval_ms: int = INTERVAL_MS,
    ) -> None:
        self.guest = guest
        self.hello = Hello(
            session_id=new_session_id(),
            options=Options(
                codec=codec, interval_ms=interval_ms, heartbeat_ms=interval_ms, verify=verify
            ),
            domain=guest.config,
            generation=time.time_ns() if generation is None else generation,
            software="test-sender",
        )
        self.ss = SenderSession(self.hello)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.writer = StreamWriter(guest.pages, codec=codec)
        self.events: list = []
        self.reply: Accepted | Refused | None = None

    def handshake(self) -> Accepted | Refused:
        self.sock.sendall(self.ss.hello())
        while self.reply is None:
            data = self.sock.recv(65536)
            assert data, "receiver closed without answering the HELLO"
            for ev in self.ss.feed(data):
                if isinstance(ev, Accepted | Refused):
                    self.reply = ev
                else:
                    self.events.append(ev)
        return self.reply

    def send(self, buffers) -> None:
        if isinstance(buffers, bytes | bytearray):
            buffers = [buffers]
        for b in buffers:
            self.sock.sendall(b)

    def initial_copy(self) -> None:
        g = self.guest
        pfns = np.arange(g.pages, dtype=np.uint64)
        self.send(self.writer.header())
        self.send(self.writer.pages(pfns, g.memory))
        self.send(self.writer.end_checkpoint(g.context, digest=memory_digest(g.memory)))

    def checkpoint(self, count: int, *, last: bool = False) -> None:
        pfns, data = self.guest.dirty(count)
        self.send(self.writer.pages(pfns, data))
        digest = memory_digest(self.guest.memory) if self.hello.options.verify else None
        self.send(self.writer.end_checkpoint(self.guest.context, digest=digest, last=last))

    def next_event(self, timeout: float = 10.0, skip_heartbeats: bool = True):
        deadline = time.monotonic() + timeout
        while True:
            while self.events:
                ev = self.events.pop(0)
                if skip_heartbeats and type(ev).__name__ == "Heartbeat":
                    continue
                return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no event from the receiver in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None  # closed
            self.events += self.ss.feed(data)

    def wait_ack(self, index: int, timeout: float = 10.0) -> Ack:
        ev = self.next_event(timeout)
        assert isinstance(ev, Ack), f"expected ACK({index}), got {ev!r}"
        assert ev.index == index
        return ev

    def close(self) -> None:
        self.sock.close()


def backup_memory(backup: SimHost, name: str, pages: int = PAGES) -> np.ndarray:
    dom = backup.lookup(name)
    out = np.empty((pages, PAGE_SIZE), dtype=np.uint8)
    dom.gather(np.arange(pages, dtype=np.uint64), out)
    dom.close()
    return out


def backup_state(backup: SimHost, name: str) -> str | None:
    for attempt in range(10):
        try:
            infos = backup.hv.list()
            break
        except DomainError:  # a domain vanished while being listed: list again
            if attempt == 9:
                raise
            time.sleep(0.02)
    for info in infos:
        if info.name == name:
            return info.state
    return None


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def protected(
    receiver: Receiver, hosts, *, codec: str = "seed", verify: bool = True, checkpoints: int = 1
) -> tuple[Guest, Sender]:
    """A guest with its initial copy and ``checkpoints`` - 1 more committed."""
    primary, _ = hosts
    g = Guest(primary)
    s = Sender(receiver.port, g, codec=codec, verify=verify)
    assert isinstance(s.handshake(), Accepted)
    s.initial_copy()
    s.wait_ack(0)
    for i in range(1, checkpoints):
        s.checkpoint(20)
        s.wait_ack(i)
    return g, s


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("codec", ["seed", "xen", "none"])
def test_good_session_commits_verifies_and_ends_cleanly(receiver, hosts, codec):
    _, backup = hosts
    g, s = protected(receiver, hosts, codec=codec)
    assert s.reply.accept.failover_timeout_ms == 500
    for i in range(1, 4):
        s.checkpoint(40)
        ack = s.wait_ack(i)
        assert ack.verified and not ack.mismatch
        # the committed backup equals what was sent, byte for byte
        assert np.array_equal(backup_memory(backup, g.name), g.memory)
    st = receiver.session(g.name)
    assert st["state"] == "receiving" and st["last_committed"] == 3
    assert st["checkpoints"] == 4 and st["mismatches"] == 0 and st["verified"] == 4
    assert st["codec"] == codec and st["bytes"] > PAGES * PAGE_SIZE * 0.9
    assert backup_state(backup, g.name) == "paused"
    # clean end: LAST_CHECKPOINT -> ACK, GOODBYE; no failover, backup destroyed
    s.checkpoint(5, last=True)
    s.wait_ack(4)
    assert isinstance(s.next_event(), Goodbye)
    s.close()
    receiver.wait_log(rf"{g.name} .*protection ended cleanly after checkpoint 4")
    wait_for(lambda: backup_state(backup, g.name) is None, 5, "backup destroyed")
    assert receiver.session(g.name)["state"] == "ended"


def test_verify_mismatch_is_logged_and_flagged(receiver, hosts):
    _, backup = hosts
    g, s = protected(receiver, hosts)
    pfns, data = g.dirty(3)
    s.send(s.writer.pages(pfns, data))
    wrong = bytearray(memory_digest(g.memory))
    wrong[0] ^= 0xFF
    s.send(s.writer.end_checkpoint(g.context, digest=bytes(wrong)))
    ack = s.wait_ack(1)
    assert ack.mismatch and not ack.verified
    receiver.wait_log(rf"{g.name}.*mismatch")
    assert receiver.session(g.name)["mismatches"] == 1
    # the commit itself stands (what the stream said), the session goes on
    assert np.array_equal(backup_memory(backup, g.name), g.memory)
    s.checkpoint(3)
    assert s.wait_ack(2).verified
    s.checkpoint(1, last=True)
    s.wait_ack(3)
    s.close()


def _raw_hello(guest: Guest, **fields) -> bytes:
    hello = Hello(
        session_id=new_session_id(),
        options=Options(interval_ms=INTERVAL_MS, heartbeat_ms=INTERVAL_MS),
        domain=guest.config,
        generation=time.time_ns(),
    )
    return encode_hello(hello)


def _expect_refused(port: int, raw: bytes, code: str) -> str:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(raw)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    magic, _version, status, length = PREFIX.unpack_from(data)
    assert status == 1, data
    import json

    body = json.loads(data[PREFIX.size : PREFIX.size + length])
    assert body["code"] == code, body
    return body["reason"]


def _session_then(port: int, guest: Guest, payload: bytes, *, close: bool = True) -> Sender:
    s = Sender(port, guest, codec="seed", verify=False)
    assert isinstance(s.handshake(), Accepted)
    s.send(payload)
    if close:
        s.sock.shutdown(socket.SHUT_WR)
    return s


def test_hostile_sessions_leave_a_concurrent_good_session_unharmed(receiver, hosts):
    primary, backup = hosts
    # a good session, checkpointing every 50 ms in a thread
    g, good = protected(receiver, hosts)
    failures: list = []
    stop = threading.Event()
    done = {"n": 0}

    def run_good():
        try:
            i = 1
            while not stop.is_set():
                good.checkpoint(16)
                good.wait_ack(i)
                done["n"] = i
                i += 1
                time.sleep(INTERVAL_MS / 1000)
        except Exception as e:  # reported below
            failures.append(e)

    t = threading.Thread(target=run_good)
    t.start()
    try:
        # 1. garbage instead of a HELLO
        assert (
            "bad HELLO magic" in _expect_refused(receiver.port, os.urandom(64) + b"x", "bad-hello")
            or True
        )
        receiver.wait_log(r"connection from 127\.0\.0\.1:\d+: refused: .*not a Remus session")
        # 2. a HELLO in a future protocol version
        h = Guest(primary)
        raw = bytearray(_raw_hello(h))
        struct.pack_into("<H", raw, 8, PROTOCOL_VERSION + 5)
        reason = _expect_refused(receiver.port, bytes(raw), "version")
        assert "too new" in reason
        # 3. a HELLO whose JSON is broken
        body = b'{"session": 1'
        assert "JSON" in _expect_refused(
            receiver.port,
            PREFIX.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, len(body)) + body,
            "bad-hello",
        )
        # 4. a HELLO with an oversized length: refused before any body is read
        _expect_refused(receiver.port, PREFIX.pack(HELLO_MAGIC, 1, 0, 0xFFFFFFF0), "bad-hello")
        # 5. a stream whose header disagrees with the HELLO
        s = _session_then(receiver.port, Guest(primary), encode_header(PAGES * 2))
        assert s.next_event() is None or True
        receiver.wait_log(r"header: p2m_size \d+ exceeds|stream header says")
        # 6. a PFN out of range in the initial copy
        g6 = Guest(primary)
        bad = bytearray(encode_header(PAGES) + struct.pack("<iQ", 1, PAGES + 7))
        s6 = _session_then(receiver.port, g6, bytes(bad) + bytes(PAGE_SIZE))
        ev = s6.next_event()
        assert isinstance(ev, Error) and ev.code == ERR_PROTOCOL and "PFN" in ev.reason
        receiver.wait_log(rf"{g6.name}.*ended before the initial copy completed.*PFN")
        wait_for(lambda: backup_state(backup, g6.name) is None, 5, "backup of g6 destroyed")
        # 7. a truncated chunk, then close
        g7 = Guest(primary)
        s7 = _session_then(
            receiver.port, g7, encode_header(PAGES) + struct.pack("<iQ", 1, 3) + bytes(100)
        )
        receiver.wait_log(rf"{g7.name}.*ended before the initial copy completed.*torn")
        # 8. after a commit: an oversized COMPRESSED_DATA length
        g8, s8 = protected(receiver, hosts, verify=False)
        committed = backup_memory(backup, g8.name).copy()
        s8.send(struct.pack("<iQ", 1, 5) + struct.pack("<iQ", TAG_COMPRESSED_DATA, 1 << 40))
        ev = s8.next_event()
        assert isinstance(ev, Error) and ev.code == ERR_PROTOCOL
        receiver.wait_log(
            rf"{g8.name}.*broke the protocol.*committed checkpoint 0 is "
            "untouched.*on-violation=wait"
        )
        # 9. after a commit: garbage in place of a chunk
        g9, s9 = protected(receiver, hosts, verify=False)
        s9.send(b"\x55" * 64)
        assert isinstance(s9.next_event(), Error)
        receiver.wait_log(rf"{g9.name}.*broke the protocol")
        # 10. a connection that never sends a HELLO
        idle = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
        receiver.wait_log(r"no complete HELLO within 1\.0 s", timeout=5)
        assert idle.recv(10) == b""
        idle.close()
        # a broken session does not fail over (policy wait), its state stays committed
        time.sleep(FAILOVER_S * 2)
        assert backup_state(backup, g8.name) == "paused"
        assert np.array_equal(backup_memory(backup, g8.name), committed)
        assert receiver.session(g8.name)["state"] == "broken"
        assert np.array_equal(backup_memory(backup, g9.name), g9.memory)
        for x in (s, s6, s7, s8, s9):
            x.close()
    finally:
        stop.set()
        t.join(20)
    assert not failures, failures
    assert done["n"] >= 5
    st = receiver.session(g.name)
    assert st["state"] == "receiving" and st["last_committed"] == done["n"]
    assert st["mismatches"] == 0
    assert np.array_equal(backup_memory(backup, g.name), g.memory)
    good.checkpoint(1, last=True)
    good.wait_ack(done["n"] + 1)
    good.close()


def test_failover_when_heartbeats_stop_then_fence(receiver, hosts):
    primary, backup = hosts
    g, s = protected(receiver, hosts, checkpoints=3)
    expected = g.memory.copy()
    # heartbeats alone keep the session alive well past the timeout
    t_end = time.monotonic() + 3 * FAILOVER_S
    while time.monotonic() < t_end:
        s.send(s.writer.heartbeat())
        time.sleep(INTERVAL_MS / 1000)
    assert receiver.session(g.name)["state"] == "receiving"
    assert backup_state(backup, g.name) == "paused"
    # meanwhile the receiver sent its own heartbeats, naming the last commit
    s.sock.settimeout(2)
    beats = [ev for ev in s.ss.feed(s.sock.recv(65536)) if type(ev).__name__ == "Heartbeat"]
    assert beats and beats[-1].last_committed == 2
    # a torn checkpoint, then silence (the link stays open: a stalled primary)
    pfns, data = g.dirty(30)
    s.send(s.writer.pages(pfns, data))
    ev = s.next_event(timeout=5)
    assert isinstance(ev, Error) and ev.code == ERR_FAILED_OVER
    m = receiver.wait_log(
        rf"{g.name}.*FAILOVER: backup domain \d+ resumed from checkpoint 2 "
        r".*detection took (\d+) ms"
    )
    assert FAILOVER_S * 1000 <= int(m.group(1)) < FAILOVER_S * 1000 + 500
    wait_for(lambda: backup_state(backup, g.name) == "running", 5, "backup running")
    mem = backup_memory(backup, g.name)
    usable = g.usable
    assert np.array_equal(mem[:usable], expected[:usable])  # the last commit, not the torn one
    st = receiver.session(g.name)
    assert st["state"] == "failed-over" and st["last_committed"] == 2
    # the primary wakes up and tries again: fenced
    s.close()
    s2 = Sender(receiver.port, g)
    reply = s2.handshake()
    assert isinstance(reply, Refused) and reply.refuse.code == "fenced"
    assert "refusing to overwrite" in reply.refuse.reason
    s2.close()
    assert backup_state(backup, g.name) == "running"


def test_link_closed_mid_checkpoint_fails_over_to_last_commit(receiver, hosts):
    _, backup = hosts
    g, s = protected(receiver, hosts, checkpoints=2)
    expected = g.memory.copy()
    pfns, data = g.dirty(50)
    bufs = s.writer.pages(pfns, data)
    raw = b"".join(bytes(b) for b in bufs)
    s.send(raw[: len(raw) // 2])
    t0 = time.monotonic()
    s.sock.close()  # kill -9 of the sender, as the receiver sees it
    receiver.wait_log(rf"{g.name}.*lost after checkpoint 1: connection closed mid-stream")
    receiver.wait_log(rf"{g.name}.*FAILOVER: backup domain \d+ resumed from checkpoint 1")
    assert time.monotonic() - t0 < FAILOVER_S + 2
    wait_for(lambda: backup_state(backup, g.name) == "running", 5, "backup running")
    assert np.array_equal(backup_memory(backup, g.name)[: g.usable], expected[: g.usable])


def test_newer_session_supersedes_older_one(receiver, hosts):
    primary, backup = hosts
    g, old = protected(receiver, hosts, checkpoints=2)
    # an older generation is refused
    stale = Sender(receiver.port, g, generation=old.hello.generation - 1)
    reply = stale.handshake()
    assert isinstance(reply, Refused) and reply.refuse.code == "busy"
    stale.close()
    # a newer one replaces the session
    g.memory[:] = 0
    g.dom.gather(np.arange(g.pages, dtype=np.uint64), g.memory)
    new = Sender(receiver.port, g)
    assert isinstance(new.handshake(), Accepted)
    ev = old.next_event()
    assert isinstance(ev, Error) and ev.code == ERR_SUPERSEDED
    new.initial_copy()
    new.wait_ack(0)
    new.checkpoint(10)
    new.wait_ack(1)
    assert np.array_equal(backup_memory(backup, g.name), g.memory)
    assert receiver.session(g.name)["session"] == new.hello.session_id
    new.checkpoint(1, last=True)
    new.wait_ack(2)
    old.close()
    new.close()


def test_manual_failover_of_a_broken_session(receiver, hosts):
    _, backup = hosts
    g, s = protected(receiver, hosts, checkpoints=2)
    s.send(b"\x00\x00\x00\x80" * 4)  # batch count -2^31: a broken rule
    assert isinstance(s.next_event(), Error)
    receiver.wait_log(rf"{g.name}.*broke the protocol")
    assert receiver.session(g.name)["state"] == "broken"
    result = control_request(receiver.control, "failover", domain=g.name, timeout=5)
    assert result["resumed_from"] == 1
    wait_for(lambda: backup_state(backup, g.name) == "running", 5, "backup running")
    assert receiver.session(g.name)["state"] == "failed-over"
    s.close()


def test_status_lists_sessions(receiver, hosts):
    st = receiver.status()
    assert st["role"] == "receiver" and st["listen"] == f"127.0.0.1:{receiver.port}"
    assert st["policies"] == {
        "on_link_loss": "failover",
        "on_violation": "wait",
        "on_unprotect": "destroy",
    }
    for sess in st["sessions"]:
        assert {
            "domain",
            "state",
            "last_committed",
            "bytes",
            "pages_committed",
            "last_heartbeat_age_s",
            "mismatches",
        } <= set(sess)


# --------------------------------------------------------------------------- the CLI


def _empty(tmp_path) -> str:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return str(path)


def _run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RECEIVER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=dict(os.environ, JOURNAL_STREAM=""),
    )


def test_cli_refuses_plaintext_without_insecure(tmp_path):
    r = _run("--listen", "127.0.0.1:0", "--config", _empty(tmp_path))
    assert r.returncode == 2
    assert "TLS" in r.stderr and "--insecure" in r.stderr


def test_cli_without_sim_dir_off_dom0_exits_at_once(tmp_path):
    r = _run(
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--control",
        str(tmp_path / "c.sock"),
        "--config",
        _empty(tmp_path),
    )
    assert r.returncode == 1
    assert "hypervisor" in r.stderr and "Traceback" not in r.stderr


def test_cli_config_errors(tmp_path):
    r = _run("--config", _empty(tmp_path))
    assert r.returncode == 2 and "--listen" in r.stderr
    r = _run("--config", str(tmp_path / "absent.toml"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    cfg = tmp_path / "r.toml"
    cfg.write_text('listen = "127.0.0.1:0"\nbogus = 1\n')
    r = _run("--config", str(cfg))
    assert r.returncode == 2 and "bogus" in r.stderr


def test_cli_config_file_and_sigterm(tmp_path, hosts):
    _, backup = hosts
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        f'listen = "127.0.0.1:0"\ninsecure = true\nsim-dir = "{backup.dir}"\n'
        f'control = "{tmp_path / "c.sock"}"\nfailover-timeout = 700\n'
    )
    p = subprocess.Popen(
        [RECEIVER, "--config", str(cfg)], stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        line = ""
        deadline = time.monotonic() + 20
        while "listening on 127" not in line and time.monotonic() < deadline:
            line = p.stderr.readline()
        assert "listening on 127.0.0.1:" in line
        st = control_request(str(tmp_path / "c.sock"), "status", timeout=5)
        assert st["sessions"] == []
        assert oct(os.stat(tmp_path / "c.sock").st_mode & 0o777) == "0o600"
    finally:
        p.terminate()
        assert p.wait(10) == 0
        p.stderr.close()


def test_staging_cap_and_failover_on_violation_policy(hosts, tmp_path):
    primary, backup = hosts
    r = Receiver(backup.dir, str(tmp_path), "--max-staged-mb", "1", "--on-violation", "failover")
    try:
        g, s = protected(r, hosts, verify=False, checkpoints=2)
        expected = g.memory.copy()
        try:
            s.checkpoint(300)  # 1.2 MiB of pages > the 1 MiB staging cap
        except (BrokenPipeError, ConnectionResetError):
            pass  # the receiver may close before it read all of it
        ev = s.next_event()
        assert isinstance(ev, Error) and ev.code == ERR_PROTOCOL and "staging cap" in ev.reason
        r.wait_log(rf"{g.name}.*broke the protocol.*staging cap.*on-violation=failover")
        r.wait_log(rf"{g.name}.*FAILOVER: backup domain \d+ resumed from checkpoint 1", timeout=5)
        wait_for(lambda: backup_state(backup, g.name) == "running", 5, "backup running")
        assert np.array_equal(backup_memory(backup, g.name)[: g.usable], expected[: g.usable])
        s.close()
    finally:
        assert r.stop() == 0
    assert "Traceback" not in r.log()


def test_sigterm_closes_sessions_without_failover(hosts, tmp_path):
    _, backup = hosts
    r = Receiver(backup.dir, str(tmp_path))
    g, s = protected(r, hosts)
    assert r.stop() == 0
    ev = s.next_event()
    assert isinstance(ev, Error) and ev.code_name == "shutdown"
    s.close()
    assert (
        f"{g.name}"
        in r.wait_log(
            r"closed as the receiver stops; backup domain \d+ stays "
            r"paused at checkpoint 0"
        ).string
    )
    assert "FAILOVER" not in r.log() and "Traceback" not in r.log()
    assert backup_state(backup, g.name) == "paused"


def test_initial_copy_that_stalls_is_dropped(receiver, hosts):
    primary, backup = hosts
    g = Guest(primary)
    s = Sender(receiver.port, g)
    assert isinstance(s.handshake(), Accepted)
    s.send(encode_header(PAGES) + struct.pack("<iQ", 1, 0))  # then nothing, link open
    ev = s.next_event(timeout=10)
    assert isinstance(ev, Error) and ev.code_name == "stalled"
    receiver.wait_log(
        rf"{g.name}.*ended before the initial copy completed: the initial copy "
        r"made no progress for 2 s; backup domain \d+ destroyed"
    )
    assert backup_state(backup, g.name) is None
    s.close()
