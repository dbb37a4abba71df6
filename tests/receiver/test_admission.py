"""The receiver while it admits a session (HELLO read, backup domain being
created, ACCEPT not yet sent), and the daemon's shutdown.

Seen in the Xen lab: ``xl create`` took longer than remusd's 5 s handshake
timeout, remusd gave up and reconnected with the same generation. The first
session thread then raised ``ProtocolError: accept() in state closed`` (the
reconnect had superseded it while it was still creating the backup), and
``daemon.shutdown()`` raised "cannot join thread before it is started".

A slow hypervisor is made two ways here: the backup host's process is stopped
(SIGSTOP) while the receiver asks it for the backup, or the backup host is a
simulated host with a slow toolstack (``--create-delay``, docs/simulator.md:
the backup domain exists at once, its create returns seconds later), the
window the lab's reconnect fell into.

And one domain's slow create must delay no other domain: while domain A's
backup is being created (and A's reconnect waits for it), domain B fails over
within its failover timeout and ``status`` answers at once (seen before the
fix: B's failover took 13 s instead of 0.6 s and status hung 12.5 s while a
4 GiB backup was created).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from receiver import connection as rx_connection
from receiver.config import load_config
from receiver.daemon import ReceiverDaemon
from receiver.server import Listener
from tests.receiver.test_daemon_process import Guest, Receiver, Sender, backup_state, wait_for
from tests.simhost import SimHost, host_pair, sim_dir
from xenbind.session import Accepted, Goodbye
from xenbind.sim.__main__ import CREATE_DELAY_ENV

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def hosts():
    with host_pair("rxadm") as pair:
        yield pair


@pytest.fixture
def slow_backup(monkeypatch) -> Iterator[SimHost]:
    """A backup host whose every create takes CREATE_DELAY_S (a slow xl create)."""
    monkeypatch.setenv(CREATE_DELAY_ENV, str(CREATE_DELAY_S))
    host = SimHost(sim_dir("rxadm-slow-")).start()
    monkeypatch.delenv(CREATE_DELAY_ENV)
    try:
        yield host
    finally:
        host.cleanup()


CREATE_DELAY_S = 1.5


def _on_host(host: SimHost, name: str) -> list[int]:
    return [i.domid for i in host.hv.list() if i.name == name]


def _read_until_eof(sock: socket.socket, timeout: float = 15.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _sessions(r: Receiver, name: str) -> list[dict]:
    return [s for s in r.status()["sessions"] if s["domain"] == name]


def test_peer_that_leaves_during_admission_gets_no_accept_and_no_backup(hosts, tmp_path):
    primary, backup = hosts
    r = Receiver(backup.dir, str(tmp_path))
    try:
        g = Guest(primary)
        s = Sender(r.port, g)
        os.kill(backup.pid, signal.SIGSTOP)  # the hypervisor is slow to create the backup
        try:
            s.sock.sendall(s.ss.hello())
            # the receiver has the HELLO and is admitting it (blocked on the host)
            wait_for(lambda: _sessions(r, g.name), 10, "the session registered")
            assert _sessions(r, g.name)[0]["backup_domid"] is None
            s.sock.shutdown(socket.SHUT_WR)  # remusd gives up the handshake
        finally:
            os.kill(backup.pid, signal.SIGCONT)
        # a peer that left is not answered: no ACCEPT (nor any frame)
        assert _read_until_eof(s.sock) == b""
        s.close()
        r.wait_log(
            rf"{g.name} .*session {s.hello.session_id[:8]}: peer left during admission "
            r"\(before ACCEPT\); backup domain \d+ destroyed \(nothing was committed\)"
        )
        assert backup_state(backup, g.name) is None
        assert _sessions(r, g.name) == []
        # the domain can be protected again at once
        s2 = Sender(r.port, g)
        assert isinstance(s2.handshake(), Accepted)
        _run_to_the_end(s2)
    finally:
        assert r.stop() == 0, r.log()[-3000:]
    assert "Traceback" not in r.log(), r.log()


def _run_to_the_end(s: Sender) -> None:
    """An accepted session: initial copy, one last checkpoint, both acknowledged, GOODBYE."""
    s.initial_copy()
    s.wait_ack(0)
    s.checkpoint(4, last=True)
    s.wait_ack(1)
    assert isinstance(s.next_event(), Goodbye)
    s.close()


def test_reconnect_that_supersedes_a_session_still_in_admission(hosts, slow_backup, tmp_path):
    primary, _ = hosts
    backup = slow_backup  # every create returns CREATE_DELAY_S after the domain exists
    r = Receiver(backup.dir, str(tmp_path))
    try:
        g = Guest(primary)
        first = Sender(r.port, g)
        first.sock.sendall(first.ss.hello())
        # the backup exists on the host, its create has not returned: no ACCEPT yet
        first_domid = wait_for(
            lambda: _on_host(backup, g.name), 10, "the first session's backup created"
        )[0]
        first.close()  # remusd gave up the handshake ...
        # ... and reconnects with the same protection (the same generation)
        again = Sender(r.port, g, generation=first.hello.generation)
        assert isinstance(again.handshake(), Accepted)
        r.wait_log(
            rf"session {first.hello.session_id[:8]} .*superseded by session "
            rf"{again.hello.session_id[:8]}"
        )
        # the first session ends with one clean line once its admission is over
        r.wait_log(
            rf"{g.name} .*session {first.hello.session_id[:8]} closed \(superseded\): "
            r"peer left during admission"
        )
        assert "accept() in state" not in r.log()
        st = _sessions(r, g.name)
        assert len(st) == 1 and st[0]["session"] == again.hello.session_id
        assert st[0]["backup_domid"] != first_domid
        # the first backup is gone; the new session's works
        assert _on_host(backup, g.name) == [st[0]["backup_domid"]]
        _run_to_the_end(again)
        wait_for(lambda: backup_state(backup, g.name) is None, 5, "backup destroyed")
    finally:
        assert r.stop() == 0, r.log()[-3000:]
    assert "Traceback" not in r.log(), r.log()


SLOW_CREATE_S = 6.0
FAILOVER_TIMEOUT_MS = 600


def test_a_slow_create_delays_no_other_domain(hosts, tmp_path, monkeypatch):
    """Domain A's backup takes SLOW_CREATE_S to create and A reconnects
    meanwhile (the lab's case); domain B loses its link during that time: B
    fails over within its failover timeout, and status answers at once."""
    primary, _ = hosts
    monkeypatch.setenv(CREATE_DELAY_ENV, str(SLOW_CREATE_S))
    slow = SimHost(sim_dir("rxadm-slower-")).start()
    monkeypatch.delenv(CREATE_DELAY_ENV)
    r = Receiver(slow.dir, str(tmp_path), "--failover-timeout", str(FAILOVER_TIMEOUT_MS))
    try:
        gb, ga = Guest(primary), Guest(primary)
        b = Sender(r.port, gb)
        assert isinstance(b.handshake(), Accepted)  # (its own create is slow too)
        b.initial_copy()
        b.wait_ack(0)
        assert r.session(gb.name)["state"] == "receiving"
        # A: its HELLO, then a reconnect while its backup is still being created
        a1 = Sender(r.port, ga)
        a1.sock.sendall(a1.ss.hello())
        t_create = time.monotonic()
        wait_for(lambda: _on_host(slow, ga.name), 10, "A's backup being created")
        a2 = Sender(r.port, ga, generation=a1.hello.generation)
        a2.sock.sendall(a2.ss.hello())
        time.sleep(0.5)  # its admission runs (the supersede must not wait for A's create)
        # B's primary dies
        b.close()
        t_lost = time.monotonic()
        t0 = time.monotonic()
        st = r.status()
        status_s = time.monotonic() - t0
        assert status_s < 1.0, f"status took {status_s:.1f} s during A's create"
        assert any(s["domain"] == gb.name for s in st["sessions"])
        wait_for(
            lambda: r.session(gb.name)["state"] == "failed-over",
            FAILOVER_TIMEOUT_MS / 1000 + 2.0,
            "B's failover",
        )
        took = time.monotonic() - t_lost
        assert took < FAILOVER_TIMEOUT_MS / 1000 + 1.5, f"B's failover took {took:.1f} s"
        # all of that happened while A's backup was still being created
        assert time.monotonic() - t_create < SLOW_CREATE_S, "A's create was not slow enough"
        assert backup_state(slow, gb.name) == "running"
        # A: the reconnect is served once the first create is over (and its
        # backup gone), after a create of its own
        a1.close()
        a2.sock.settimeout(3 * SLOW_CREATE_S)
        while a2.reply is None:
            data = a2.sock.recv(65536)
            assert data, "receiver closed without answering A's reconnect"
            a2.reply = next((e for e in a2.ss.feed(data) if isinstance(e, Accepted)), None)
        assert _on_host(slow, ga.name) == [_sessions(r, ga.name)[0]["backup_domid"]]
        r.wait_log(rf"superseded by session {a2.hello.session_id[:8]}")
        _run_to_the_end(a2)
    finally:
        assert r.stop() == 0, r.log()[-3000:]
        slow.cleanup()
    assert "Traceback" not in r.log(), r.log()


def test_shutdown_while_a_session_thread_is_being_started(hosts, tmp_path, monkeypatch):
    """SIGTERM arrives while the listener is starting a connection's thread:
    shutdown must skip the thread not started yet (it ends by itself: its
    connection is closing), and join the ones that run."""
    _, backup = hosts
    cfg = load_config(
        [
            "--listen",
            "127.0.0.1:0",
            "--insecure",
            "--config",
            os.devnull,
            "--sim-dir",
            backup.dir,
            "--control",
            str(tmp_path / "c.sock"),
            "--handshake-timeout",
            "5",
        ]
    )
    from xenbind.sim.client import SimHypervisor

    hv = SimHypervisor(backup.dir)
    daemon = ReceiverDaemon(cfg, hv)
    listener = Listener(daemon, "127.0.0.1", 0)
    port = int(listener.address.rsplit(":", 1)[1])
    errors: list = []
    starting: list = []
    real_thread = threading.Thread

    class ShutdownDuringStart(real_thread):
        def start(self) -> None:
            if self.name.startswith("session-"):
                starting.append(self)
                try:
                    daemon.shutdown()  # the stop lands between Thread() and start()
                except Exception as e:  # noqa: BLE001 - the test reports it
                    errors.append(e)
            super().start()

    monkeypatch.setattr(rx_connection.threading, "Thread", ShutdownDuringStart)
    try:
        daemon.start_monitor()
        listener.start()
        # only a whole HELLO gets a session thread (receiver.server): send one
        primary, _ = hosts
        s = Sender(port, Guest(primary))
        s.sock.sendall(s.ss.hello())
        wait_for(lambda: starting, 10, "the session thread being started")
        # the connection it belongs to was told to close: it ends without a reply
        assert _read_until_eof(s.sock) == b""
        s.close()
        starting[0].join(10)
        assert not starting[0].is_alive()
        assert errors == [], errors
        # shutdown stopped and joined the failover timer as well
        assert not daemon.monitor_alive()
        daemon.shutdown()  # again, with nothing left: still quiet
    finally:
        monkeypatch.undo()
        listener.close()
        hv.close()
