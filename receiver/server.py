"""The listening socket and the pre-session stage: one selector thread for every
connection that has not yet delivered a whole, valid HELLO.

    accept      non-blocking, in the selector thread. Plaintext (--insecure):
                a peer outside --insecure-allow gets a REFUSE naming the
                option and is closed (nothing of it is read)
    peek        (TLS) the first byte: not a TLS handshake record means a
                plaintext client; one that starts with HELLO_MAGIC is told in
                a plaintext REFUSE that TLS is required
    tls         (TLS) ``do_handshake`` on the non-blocking socket
                (SSLWantRead/WriteError: wait in the selector), then the
                certificate's names against --allow-peer (daemonkit.tls)
    hello       bytes into a fresh ReceiverCore until it asks to Admit (a
                whole, valid HELLO) or ends (REFUSE bad-hello...)
    handover    only now a Connection and its session thread exist
                (receiver.connection), starting with the core's Admit
    linger      after a refusal: our side shut, the peer's bytes drained for
                LINGER_S so the REFUSE is not lost to a RST, then closed

Rules kept here:
- An unauthenticated connection costs a socket and a small record, never a
  thread: a flood of idle or trickling connections cannot exhaust threads
  nor the session slots (2 x max-sessions + 8, for admitted connections only).
- At most --max-pending unauthenticated connections (plaintext before its
  HELLO; TLS before its certificate was accepted) are held. A new one past
  the cap drops the oldest of the source address holding the most of them,
  so a flood from a few addresses cannot keep a real sender out, and a
  peer whose TLS certificate was accepted is never dropped for room.
- Each pending connection is dropped when silent for IDLE_S (or
  handshake-timeout, if shorter) and in any case at handshake-timeout.
- Log lines about pending connections are throttled per kind (at most ten a
  second, with a count of the ones held back); the counts are in ``status``
  and the metrics. Nothing a peer does ends this thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemonkit.tls import TLS_HANDSHAKE_RECORD, TlsRefused, name_allowed, peer_names, refusal_of
from daemonkit.transport import PlainTransport, TlsTransport
from xenbind.errors import ConfigError
from xenbind.session import HELLO_MAGIC, Refuse, encode_refuse

from .connection import Connection, limits_of
from .core import Action, Admit, End, ReceiverCore, Send

if TYPE_CHECKING:
    from .daemon import ReceiverDaemon

log = logging.getLogger("receiver")

#: the longest a pending connection may stay silent before its next byte
IDLE_S = 2.0
#: after a refusal: how long the peer's input is drained before the close
LINGER_S = 0.2
#: how often deadlines are checked (and the longest select wait)
TICK_S = 0.05
#: connections accepted per wake-up of the listening socket
ACCEPT_BATCH = 128
#: bytes read from a pending connection at a time
READ_SIZE = 65536

PEEK = "peek"
TLS = "tls"
HELLO = "hello"
LINGER = "linger"

#: End kinds of a core before admission and the level they are logged at
_EARLY_ENDS = {"bad-hello": logging.WARNING, "lost": logging.INFO, "left": logging.INFO}


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    host: str
    peer: str
    opened: float
    stage: str
    core: ReceiverCore
    last: float = 0.0  # the last byte (or readiness) seen
    authenticated: bool = False  # TLS: the certificate was accepted
    transport: TlsTransport | None = None
    linger_until: float = 0.0
    events: int = selectors.EVENT_READ
    counted: bool = False  # in Listener._unauth (unauthenticated, not lingering)


class _Throttle:
    """At most ``burst`` log lines per kind a second; the lines held back are
    counted into the next one that is written."""

    def __init__(self, burst: int = 10, every: float = 1.0) -> None:
        self.burst = burst
        self.every = every
        self._window: dict[str, tuple[float, int]] = {}  # kind -> (start, lines written)
        self._held: Counter[str] = Counter()

    def log(self, level: int, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        start, written = self._window.get(kind, (-1e9, 0))
        if now - start >= self.every:
            start, written = now, 0
        if written >= self.burst:
            self._held[kind] += 1
            self._window[kind] = (start, written)
            return
        held = self._held.pop(kind, 0)
        if held:
            msg += f" ({held} more like it not logged)"
        self._window[kind] = (start, written + 1)
        log.log(level, msg, *args)


def _fmt_peer(addr: tuple) -> tuple[str, str]:
    host = str(addr[0])
    return host, (f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}")


class Listener:
    def __init__(self, daemon: ReceiverDaemon, host: str, port: int) -> None:
        self.daemon = daemon
        self.cfg = daemon.cfg
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self.sock = sock
        bound = sock.getsockname()
        self.address = (
            f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
        )
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._sel = selectors.DefaultSelector()
        #: every pending connection, oldest first (dicts keep insertion order)
        self._pending: dict[int, _Pending] = {}
        self._unauth: Counter[str] = Counter()  # unauthenticated pending, per source host
        self._throttle = _Throttle()
        self._accept_paused_until = 0.0
        self._idle = min(IDLE_S, self.cfg.handshake_timeout)
        daemon.pending_connections = self.pending_count

    # ------------------------------------------------------------- plumbing

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="handshakes", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pending_count(self) -> int:
        """Connections in the TLS handshake or before their HELLO (not lingering)."""
        return sum(1 for p in list(self._pending.values()) if p.stage != LINGER)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _running(self) -> bool:
        return not (self._closed.is_set() or self.daemon.stopping.is_set())

    # ------------------------------------------------------------- the loop

    def _loop(self) -> None:
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        next_tick = time.monotonic()
        try:
            while self._running():
                for key, _mask in self._sel.select(TICK_S):
                    if key.data is None:
                        self._accept()
                    else:
                        self._step(key.data)
                now = time.monotonic()
                if now >= next_tick:
                    self._expire(now)
                    if self._accept_paused_until and now >= self._accept_paused_until:
                        self._accept_paused_until = 0.0
                        self._sel.register(self.sock, selectors.EVENT_READ, None)
                    next_tick = now + TICK_S
        except Exception:  # never expected: say so, the watchdog sees the thread gone
            log.exception("the handshake thread failed")
            raise
        finally:
            for p in list(self._pending.values()):
                self._close(p)
            self._sel.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._throttle.log(
                        logging.WARNING,
                        "fds",
                        "accept failed: %s; dropping the oldest pending connection "
                        "(raise LimitNOFILE, or lower max-pending)",
                        e.strerror,
                    )
                    if not self._evict():
                        # nothing to free: stop accepting for a moment
                        self._sel.unregister(self.sock)
                        self._accept_paused_until = time.monotonic() + 0.1
                        return
                    continue
                log.warning("accept failed: %s", e)
                return
            self._admit_socket(sock, addr)

    def _admit_socket(self, sock: socket.socket, addr: tuple) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, peer = _fmt_peer(addr)
        now = time.monotonic()
        tls = self.daemon.tls
        core = ReceiverCore(limits_of(self.cfg), now)
        p = _Pending(sock, host, peer, now, PEEK if tls else HELLO, core, last=now)
        if tls is None and not self.cfg.insecure_allowed(host):
            self.daemon.insecure_refused += 1
            allowed = ", ".join(str(n) for n in self.cfg.insecure_allow)
            self._throttle.log(
                logging.WARNING,
                "insecure",
                "plaintext connection from %s refused: its address is not in insecure-allow (%s)",
                peer,
                allowed,
            )
            self._register(p)
            self._refuse(
                p,
                "bad-hello",
                f"this receiver accepts plaintext sessions only from {allowed} "
                "(insecure-allow): use TLS, or add the sender's address to insecure-allow",
            )
            return
        if sum(self._unauth.values()) >= self.cfg.max_pending:
            self._evict()
        self._unauth[host] += 1
        p.counted = True
        self._register(p)

    def _register(self, p: _Pending) -> None:
        self._pending[id(p)] = p
        p.events = selectors.EVENT_READ
        self._sel.register(p.sock, p.events, p)

    def _want(self, p: _Pending, events: int) -> None:
        if p.events != events:
            p.events = events
            self._sel.modify(p.sock, events, p)

    def _evict(self) -> bool:
        """Drop the oldest unauthenticated pending connection of the source
        address holding the most of them; False if there is none."""
        if not self._unauth:
            return False
        host, _ = self._unauth.most_common(1)[0]
        for p in self._pending.values():
            if p.host == host and p.counted:
                self.daemon.pending_dropped += 1
                self._throttle.log(
                    logging.WARNING,
                    "evicted",
                    "connection from %s dropped before its HELLO: %d unauthenticated "
                    "connections pending (max-pending), %d of them from %s",
                    p.peer,
                    sum(self._unauth.values()),
                    self._unauth[host],
                    host,
                )
                self._close(p)
                return True
        return False

    def _close(self, p: _Pending) -> None:
        if self._pending.pop(id(p), None) is None:
            return
        self._forget_unauth(p)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(p.sock)
        with contextlib.suppress(OSError):
            p.sock.close()
        p.core.abandon()

    def _forget_unauth(self, p: _Pending) -> None:
        if not p.counted:
            return
        p.counted = False
        self._unauth[p.host] -= 1
        if self._unauth[p.host] <= 0:
            del self._unauth[p.host]

    def _expire(self, now: float) -> None:
        for p in list(self._pending.values()):
            if p.stage == LINGER:
                if now >= p.linger_until:
                    self._close(p)
                continue
            total, idle = now - p.opened, now - p.last
            if total < self.cfg.handshake_timeout and idle < self._idle:
                continue
            self.daemon.pending_dropped += 1
            if p.stage in (PEEK, TLS):
                detail = f"silent for {idle:.1f} s, {total:.1f} s after connecting"
                self._tls_refused(p, TlsRefused("handshake timeout", detail))
            else:
                self._throttle.log(
                    logging.WARNING,
                    "timeout",
                    "connection from %s: no complete HELLO within %.1f s (silent for %.1f s); "
                    "closed",
                    p.peer,
                    total,
                    idle,
                )
            self._close(p)

    # ------------------------------------------------------------- one connection

    def _step(self, p: _Pending) -> None:
        if id(p) not in self._pending:
            return
        p.last = time.monotonic()
        try:
            if p.stage == PEEK:
                self._peek(p)
            elif p.stage == TLS:
                self._handshake(p)
            elif p.stage == HELLO:
                self._hello(p)
            else:
                self._drain(p)
        except Exception:  # a bug must drop one connection, never this thread
            log.exception("connection from %s: internal error in the handshake stage", p.peer)
            self._close(p)

    def _peek(self, p: _Pending) -> None:
        tls = self.daemon.tls
        assert tls is not None
        magic = tls.plaintext_magic or HELLO_MAGIC
        try:
            head = p.sock.recv(len(magic), socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as e:
            self._tls_refused(p, TlsRefused("connection lost during the TLS handshake", str(e)))
            return
        if not head:
            log.debug("connection from %s closed before the TLS handshake", p.peer)
            self._close(p)
            return
        if head[0] != TLS_HANDSHAKE_RECORD:
            if len(head) < len(magic) and magic.startswith(head):
                return  # maybe a plaintext HELLO: wait for its magic
            hello = magic.startswith(head)
            plain = " (a remusd HELLO: the sender runs with --insecure)" if hello else ""
            self._tls_refused(
                p,
                TlsRefused(
                    "plaintext client", f"first byte 0x{head[0]:02x} is not a TLS handshake{plain}"
                ),
            )
            if hello:
                # tell a plaintext remusd why, in its own protocol (none of its bytes is read)
                self._refuse(
                    p,
                    "bad-hello",
                    "this receiver requires TLS: configure remusd with tls-cert, "
                    "tls-key and tls-ca",
                )
            else:
                self._close(p)
            return
        ctx = tls.source.context()
        self._sel.unregister(p.sock)
        try:
            p.sock = ctx.wrap_socket(p.sock, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as e:
            self._tls_refused(p, refusal_of(e))
            self._close(p)
            return
        p.stage = TLS
        p.events = selectors.EVENT_READ
        self._sel.register(p.sock, p.events, p)
        self._handshake(p)

    def _handshake(self, p: _Pending) -> None:
        ssock = p.sock
        assert isinstance(ssock, ssl.SSLSocket)
        try:
            ssock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(p, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(p, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as e:
            self._tls_refused(p, refusal_of(e))
            self._linger(p, b"")  # the alert is not lost to a RST
            return
        tls = self.daemon.tls
        assert tls is not None
        names = peer_names(ssock.getpeercert())
        allowed = tls.settings.allow_peers
        if not names or name_allowed(names, allowed) is None:
            detail = (
                f"certificate names {', '.join(names)}; allowed: {', '.join(allowed)}"
                if names
                else "the certificate carries no name"
            )
            self._tls_refused(p, TlsRefused("name not allowed", detail))
            self._linger(p, b"")
            return
        p.transport = TlsTransport(ssock, names)
        p.authenticated = True  # never dropped for room from now on
        self._forget_unauth(p)
        log.debug("connection from %s: TLS established (%s)", p.peer, p.transport.describe())
        p.stage = HELLO
        self._want(p, selectors.EVENT_READ)
        self._hello(p)  # TLS may hold decrypted bytes already

    def _tls_refused(self, p: _Pending, e: TlsRefused) -> None:
        self.daemon.tls_refused += 1
        self._throttle.log(
            logging.WARNING,
            "tls",
            "connection from %s refused before the session handshake: %s%s",
            p.peer,
            e.reason,
            f" ({e.detail})" if e.detail else "",
        )

    def _hello(self, p: _Pending) -> None:
        for _ in range(64):  # bounded: the HELLO is <= 64 KiB, early stream <= 1 MiB
            try:
                data = p.sock.recv(READ_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                return
            except (ssl.SSLError, OSError) as e:
                self._finish(p, p.core.connection_lost(ConnectionError(str(e))))
                return
            actions = p.core.receive_data(data) if data else p.core.receive_eof()
            if any(isinstance(a, Admit) for a in actions):
                self._handover(p, actions)
                return
            if actions or not data:
                self._finish(p, actions)
                return

    def _finish(self, p: _Pending, actions: list[Action]) -> None:
        """The core ended before admission: say why (throttled), send its
        REFUSE if any, close."""
        reply = b"".join(a.data for a in actions if isinstance(a, Send))
        for a in actions:
            if isinstance(a, End) and a.kind in _EARLY_ENDS:
                self._throttle.log(
                    _EARLY_ENDS[a.kind], a.kind, "connection from %s: %s", p.peer, a.message
                )
        if reply:
            self._linger(p, reply)
        else:
            self._close(p)

    def _refuse(self, p: _Pending, code: str, reason: str) -> None:
        self._linger(p, encode_refuse(Refuse(code, reason)))

    def _linger(self, p: _Pending, reply: bytes) -> None:
        """Send ``reply`` (a REFUSE: small, the socket's buffer takes it),
        shut our side and drain the peer's bytes briefly, then close."""
        if reply:
            with contextlib.suppress(OSError):
                p.sock.send(reply)
        self._forget_unauth(p)
        p.stage = LINGER
        p.linger_until = time.monotonic() + LINGER_S
        with contextlib.suppress(OSError):
            p.sock.shutdown(socket.SHUT_WR)
        self._want(p, selectors.EVENT_READ)

    def _drain(self, p: _Pending) -> None:
        try:
            while p.sock.recv(READ_SIZE):
                pass
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            pass
        self._close(p)  # EOF or an error: done

    def _handover(self, p: _Pending, actions: list[Action]) -> None:
        """A whole, valid HELLO: the session gets a thread of its own."""
        self._pending.pop(id(p), None)
        self._forget_unauth(p)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(p.sock)
        p.sock.setblocking(True)
        p.sock.settimeout(1.0)
        transport = p.transport if p.transport is not None else PlainTransport(p.sock)
        conn = Connection(self.daemon, transport, core=p.core, first=actions, peer=p.peer)
        if not self.daemon.connection_opened(conn):
            self._throttle.log(
                logging.WARNING,
                "full",
                "connection from %s refused: too many sessions open or being admitted",
                p.peer,
            )
            p.sock.setblocking(False)
            self._pending[id(p)] = p
            p.events = selectors.EVENT_READ
            self._sel.register(p.sock, p.events, p)
            refusal = p.core.refuse("busy", "too many sessions open or being admitted")
            self._linger(p, b"".join(a.data for a in refusal if isinstance(a, Send)))
            return
        log.debug("connection from %s: HELLO received, session thread started", p.peer)
        conn.start()
