"""remusd's NetLink handshake against a receiver slow to build its backup.

The receiver answers the HELLO only once the backup domain exists; building a
large one takes seconds (Xen allocates and scrubs its memory, so does the
simulator). remusd waits --accept-timeout for that answer, apart from
--connect-timeout (the TCP connect, and each silence of the socket).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from remusd.config import Target
from remusd.link import LinkDown, NetLink
from xenbind import session as sp
from xenbind.types import DomainConfig


def _slow_receiver(delay: float) -> tuple[socket.socket, threading.Thread]:
    """A TCP server speaking the real session: reads the HELLO, waits ``delay``
    seconds (the backup being built), then accepts."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            rs = sp.ReceiverSession()
            hello = None
            while hello is None:
                data = conn.recv(65536)
                if not data:
                    return
                for ev in rs.feed(data):
                    if isinstance(ev, sp.HelloReceived):
                        hello = ev.hello
            time.sleep(delay)
            try:
                conn.sendall(rs.accept(sp.Accept(hello.session_id, 1000, 100)))
                conn.recv(1)  # hold the connection until the sender closes it
            except OSError:
                pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return srv, th


def _link(port: int, accept_timeout: float) -> NetLink:
    hello = sp.Hello(
        session_id=sp.new_session_id(),
        options=sp.Options(codec="xen", interval_ms=100, heartbeat_ms=100),
        domain=DomainConfig(
            name="slow", uuid="5c8c3d6e-4bd4-4a0c-9f43-0d4b5f3f7a10", pages=1024, vcpus=1
        ),
        generation=time.time_ns(),
        software="test_remusd_link",
    )
    return NetLink(
        Target("tcp", "127.0.0.1", port),
        hello,
        connect_timeout=0.3,
        io_timeout=2,
        accept_timeout=accept_timeout,
    )


def test_a_backup_slower_to_build_than_the_connect_timeout_is_waited_for():
    srv, th = _slow_receiver(1.2)
    link = _link(srv.getsockname()[1], accept_timeout=10)
    try:
        link.open()  # 4 x the connect timeout of silence, then ACCEPT
        assert link.accept is not None and link.failover_timeout_ms == 1000
    finally:
        link.close()
        srv.close()
        th.join(5)


def test_no_answer_within_the_accept_timeout_is_a_clear_link_error():
    srv, th = _slow_receiver(5)
    link = _link(srv.getsockname()[1], accept_timeout=0.8)
    t0 = time.monotonic()
    try:
        with pytest.raises(
            LinkDown, match=r"did not answer the HELLO within 0.8 s \(--accept-timeout"
        ):
            link.open()
        assert time.monotonic() - t0 < 3
    finally:
        link.close()
        srv.close()
