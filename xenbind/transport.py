"""The replication link's transport: a byte pipe under the session protocol.

The session protocol (``xenbind.session``) and the stream it carries never see
a socket: they produce and consume bytes. This layer moves those bytes. It is
its own layer so that TLS (a later issue) slots in as another ``Transport``
without touching the protocol: today there is one kind, ``PlainTransport``,
a TCP socket, which the daemons only use when told ``--insecure``.

Rules:
- Every blocking call has a timeout (``settimeout``); a timeout raises
  ``TimeoutError``, a dead link ``ConnectionError``/``OSError``; no call blocks
  forever unless the caller set ``None`` on purpose.
- ``send_buffers`` writes a list of buffers (bytes, memoryview, numpy arrays)
  in as few system calls as the kernel allows (``sendmsg``), handling partial
  writes; it never concatenates the buffers into one copy.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError

#: sendmsg accepts at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024


def parse_hostport(text: str, *, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ConfigError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class Transport:
    """A connected, bidirectional byte stream."""

    kind = "abstract"

    def settimeout(self, seconds: float | None) -> None:
        raise NotImplementedError

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at end of stream."""
        raise NotImplementedError

    def recv_into(self, buf: Any) -> int:
        raise NotImplementedError

    def sendall(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def send_buffers(self, buffers: Sequence[Any]) -> int:
        """Write every buffer, in order; returns the byte count."""
        total = 0
        for b in buffers:
            mv = memoryview(b).cast("B")
            self.sendall(mv)
            total += mv.nbytes
        return total

    def shutdown_write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def peer(self) -> str:
        return "?"

    def fileno(self) -> int:
        raise NotImplementedError


class PlainTransport(Transport):
    """Plaintext TCP (needs ``--insecure`` on both daemons)."""

    kind = "plain"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def connect(cls, host: str, port: int, *, timeout: float) -> PlainTransport:
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls(sock)

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def recv_into(self, buf: Any) -> int:
        return self.sock.recv_into(buf)

    def sendall(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def send_buffers(self, buffers: Sequence[Any]) -> int:
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if v.nbytes]
        total = sum(v.nbytes for v in views)
        i = 0
        while i < len(views):
            sent = self.sock.sendmsg(views[i:i + _IOV_MAX])
            # drop what went out; keep the tail of a partly sent buffer
            while sent and i < len(views):
                if sent >= views[i].nbytes:
                    sent -= views[i].nbytes
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0
        return total

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def peer(self) -> str:
        try:
            host, port = self.sock.getpeername()[:2]
        except OSError:
            return "?"
        return f"{host}:{port}"

    def fileno(self) -> int:
        return self.sock.fileno()
