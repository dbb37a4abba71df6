"""The replication link's transport: a byte pipe under the session protocol.

The session protocol (``xenbind.session``) and the stream it carries never see
a socket: they produce and consume bytes. This layer moves those bytes. It is
its own layer so that TLS slots in as another ``Transport`` without touching
the protocol. Two kinds:

    PlainTransport  a TCP socket; the daemons use it only when told ``--insecure``
    TlsTransport    TLS 1.3 over TCP, mutually authenticated; the default. Who
                    may connect, the handshake and the certificates are
                    ``daemonkit.tls``'s job; this class only moves bytes.

Rules:
- Every blocking call has a timeout (``settimeout``); a timeout raises
  ``TimeoutError``, a dead link ``ConnectionError``/``OSError``; no call blocks
  forever unless the caller set ``None`` on purpose.
- ``send_buffers`` writes a list of buffers (bytes, memoryview, numpy arrays)
  in as few system calls as the kernel allows (``sendmsg``), handling partial
  writes; it never concatenates the buffers into one copy (TlsTransport
  coalesces small buffers into one TLS record: encryption copies anyway).
- ``wait_readable`` is how a caller waits for input (never ``select`` on
  ``fileno()`` alone: TLS may hold decrypted bytes the kernel does not show).
- One thread may read while another writes (a heartbeat during a read):
  TlsTransport serializes its calls into OpenSSL, which allows one thread in a
  connection at a time; neither a read nor a write holds the lock while it
  waits for the peer.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

from xenbind.errors import ConfigError

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

    def pending(self) -> int:
        """Bytes already received and decoded that ``recv`` returns without waiting."""
        return 0

    def wait_readable(self, timeout: float) -> bool:
        """True when ``recv`` has something (data or EOF) within ``timeout`` seconds."""
        if self.pending():
            return True
        ready, _, _ = select.select([self.fileno()], [], [], max(0.0, timeout))
        return bool(ready)


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
            sent = self.sock.sendmsg(views[i : i + _IOV_MAX])
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


#: TlsTransport.send_buffers: buffers smaller than this are gathered into one
#: write (one TLS record holds up to 16 KiB; fewer records, fewer syscalls).
_COALESCE_BELOW = 16384
_COALESCE_MAX = 65536
#: TlsTransport.recv_into: a first read this long (a full TLS record's
#: plaintext) suggests more records behind it, worth reading without waiting
_FULL_RECORD = 16384
#: What one SSL_write is given: a few records, so that a reader waiting for
#: the lock gets it between chunks, and the syscalls stay few.
_WRITE_CHUNK = 262144


class TlsTransport(PlainTransport):
    """TLS over TCP (an ``ssl.SSLSocket`` after its handshake, see ``daemonkit.tls``).

    ``peer_names`` are the names of the peer's verified certificate,
    ``peer_not_after`` its expiry (seconds since the epoch). An
    ``ssl.SSLError`` while reading (an alert, a bad record) is raised as a
    ``ConnectionError`` whose message says what the peer's TLS reported.

    One thread at a time in the TLS connection: OpenSSL forbids two threads
    in one ``SSL`` object, and Python's ``ssl`` (3.11) does not prevent it (it
    lets go of the GIL inside SSL_read and SSL_write). remusd's pacer writes a
    heartbeat while its session thread reads; unserialized, the read can come
    back with a false end of stream. Every call into OpenSSL holds the
    transport's lock; a read waits for input and a write for room in the
    send buffer *outside* it (``select`` on the socket, per the timeout), so a
    heartbeat never waits for a read that waits for the peer, and two ends
    that both write a lot never wait on each other's reader. ``pending()``
    answers from a count kept by the reads
    (what SSL_pending said after the last one: only a read changes it), so a
    peek from another thread (the receiver's failover timer) never waits for
    the lock.
    """

    kind = "tls"
    sock: ssl.SSLSocket

    def __init__(self, sock: ssl.SSLSocket, peer_names: list[str] | None = None) -> None:
        super().__init__(sock)
        self.peer_names = list(peer_names or [])
        cert = sock.getpeercert()
        not_after = cert.get("notAfter") if cert else None
        self.peer_not_after: float | None = (
            float(ssl.cert_time_to_seconds(not_after)) if isinstance(not_after, str) else None
        )
        self.version = sock.version()
        cipher = sock.cipher()
        self.cipher = cipher[0] if cipher else None
        self._lock = threading.Lock()  # held for every call into the SSL object
        self._pending = self._ssl_pending()  # decoded bytes not yet read (reads keep it)

    def _ssl_pending(self) -> int:
        try:
            return self.sock.pending()
        except (OSError, ValueError):
            return 0

    def _wait_input(self) -> None:
        """Wait, per the socket's timeout, until a read has something to
        return (decoded bytes, or input on the socket); TimeoutError if none
        came. A timeout of 0 does not wait (the read then says it would block)."""
        if self._pending:
            return
        timeout = self.sock.gettimeout()
        if timeout == 0.0:
            return
        try:
            ready, _, _ = select.select([self.sock], [], [], timeout)
        except ValueError:  # closed meanwhile
            raise OSError(9, "the TLS connection is closed") from None
        if not ready:
            raise TimeoutError("timed out")

    def recv(self, n: int) -> bytes:
        self._wait_input()
        with self._lock:
            try:
                return self.sock.recv(n)
            except ssl.SSLError as e:
                raise ConnectionError(_tls_reason(e)) from None
            finally:
                self._pending = self._ssl_pending()

    def recv_into(self, buf: Any) -> int:
        """Like a TCP socket's: waits (per the timeout) for the first bytes, then
        returns what is already here, up to ``buf``'s size. A TLS read returns
        one record (<= 16 KiB) per call, so after the first one the records
        the kernel already holds are decrypted into the rest of ``buf``
        without waiting (the socket's timeout at 0 for the while): one call of
        the caller's loop a buffer, as over plain TCP, not one a record."""
        self._wait_input()
        with self._lock:
            try:
                return self._recv_into(buf)
            finally:
                self._pending = self._ssl_pending()

    def _recv_into(self, buf: Any) -> int:
        try:
            n = self.sock.recv_into(buf)
        except ssl.SSLError as e:
            raise ConnectionError(_tls_reason(e)) from None
        if not n:
            return 0
        view = memoryview(buf).cast("B")
        size = view.nbytes
        if n >= size or n < _FULL_RECORD:
            return n  # full, or a short record: most likely nothing behind it
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0.0)
        try:
            while n < size:
                try:
                    k = self.sock.recv_into(view[n:])
                except OSError:
                    # nothing complete waiting (SSLWantReadError), or an error
                    # or end of stream: the next call sees it, after these bytes
                    break
                if not k:
                    break
                n += k
        finally:
            self.sock.settimeout(timeout)
        return n

    def _sendall(self, data: Any) -> None:
        """Write all of ``data``, holding the lock only while OpenSSL runs.

        Each chunk goes to SSL_write with the socket non-blocking; when the
        kernel's send buffer is full, the wait for room (per the timeout)
        happens outside the lock, so that this end's reader can go on taking
        the peer's bytes meanwhile. Held across the wait, two ends writing at
        once would each wait for the other to read: a deadlock until the
        timeout. OpenSSL asks that a write that would block be repeated with
        the same bytes: after a wait the chunk at the same offset is given
        again; what a write took (its return value) is never given twice."""
        view = memoryview(data).cast("B")
        timeout = self.sock.gettimeout()
        pos = 0
        while pos < view.nbytes:
            with self._lock:
                self.sock.settimeout(0.0)
                try:
                    pos += self.sock.send(view[pos : pos + _WRITE_CHUNK])
                    continue
                except ssl.SSLWantWriteError:
                    want: tuple[list[Any], list[Any]] = ([], [self.sock])
                except ssl.SSLWantReadError:  # a TLS 1.3 post-handshake message
                    want = ([self.sock], [])
                except ssl.SSLError as e:
                    raise ConnectionError(_tls_reason(e)) from None
                finally:
                    self.sock.settimeout(timeout)
            self._wait_room(want, timeout)

    def _wait_room(self, want: tuple[list[Any], list[Any]], timeout: float | None) -> None:
        if timeout == 0.0:
            raise BlockingIOError(11, "the TLS connection's send buffer is full")
        try:
            r, w, _ = select.select(want[0], want[1], [], timeout)
        except ValueError:  # closed meanwhile
            raise OSError(9, "the TLS connection is closed") from None
        if not r and not w:
            raise TimeoutError("timed out")

    def sendall(self, data: bytes | memoryview) -> None:
        self._sendall(data)

    def send_buffers(self, buffers: Sequence[Any]) -> int:
        total = 0
        small = bytearray()
        for b in buffers:
            mv = memoryview(b).cast("B")
            n = mv.nbytes
            if not n:
                continue
            total += n
            if n < _COALESCE_BELOW:
                small += mv
                if len(small) >= _COALESCE_MAX:
                    self._sendall(small)
                    small.clear()
                continue
            if small:
                self._sendall(small)
                small.clear()
            self._sendall(mv)
        if small:
            self._sendall(small)
        return total

    def pending(self) -> int:
        return self._pending

    def describe(self) -> str:
        return f"{self.version} {self.cipher}, peer {', '.join(self.peer_names) or '?'}"


def _tls_reason(e: ssl.SSLError) -> str:
    reason = (e.reason or "").lower().replace("_", " ")
    if "alert" in reason:
        return f"the peer's TLS ended the connection ({reason})"
    return f"TLS error: {reason or e}"
