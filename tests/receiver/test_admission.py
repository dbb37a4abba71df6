"""The receiver while it admits a session (HELLO read, backup domain being
created, ACCEPT not yet sent), and the daemon's shutdown.

Seen in the Xen lab: ``xl create`` took longer than remusd's 5 s handshake
timeout, remusd gave up and reconnected with the same generation. The first
session thread then raised ``ProtocolError: accept() in state closed`` (the
reconnect had superseded it while it was still creating the backup), and
``daemon.shutdown()`` raised "cannot join thread before it is started".

A slow hypervisor is made two ways here: the backup host's process is stopped
(SIGSTOP) while the receiver asks it for the backup, or the receiver's
test-only fault hook ``REMUS_RECEIVER_TEST_ADMIT_DELAY_S`` (receiver.connection)
holds a session between "backup created" and ACCEPT, the window the lab's
reconnect fell into.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest

from receiver import connection as rx_connection
from receiver.config import load_config
from receiver.daemon import ReceiverDaemon
from receiver.server import Listener
from tests.receiver.test_daemon_process import Guest, Receiver, Sender, backup_state, wait_for
from tests.simhost import host_pair
from xenbind.session import Accepted, Goodbye

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def hosts():
    with host_pair("rxadm") as pair:
        yield pair


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


def test_reconnect_that_supersedes_a_session_still_in_admission(hosts, tmp_path, monkeypatch):
    primary, backup = hosts
    # every admission waits 1.5 s between "backup created" and ACCEPT (test-only hook)
    monkeypatch.setenv(rx_connection.ADMIT_DELAY_ENV, "1.5")
    r = Receiver(backup.dir, str(tmp_path))
    try:
        g = Guest(primary)
        first = Sender(r.port, g)
        first.sock.sendall(first.ss.hello())
        # the backup exists, ACCEPT is not sent yet
        wait_for(
            lambda: any(x["backup_domid"] is not None for x in _sessions(r, g.name)),
            10,
            "the first session's backup created",
        )
        first_domid = _sessions(r, g.name)[0]["backup_domid"]
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
        infos = [i for i in backup.hv.list() if i.name == g.name]
        assert [i.domid for i in infos] == [st[0]["backup_domid"]]
        _run_to_the_end(again)
        wait_for(lambda: backup_state(backup, g.name) is None, 5, "backup destroyed")
    finally:
        assert r.stop() == 0, r.log()[-3000:]
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
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        wait_for(lambda: starting, 10, "the session thread being started")
        # the connection it belongs to was told to close: it ends without a reply
        assert _read_until_eof(sock) == b""
        sock.close()
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
