"""One replication session on the receiver: one connection, one thread.

    tls         unless --insecure: the TLS handshake and the peer's name check
                (daemonkit.tls) within handshake-timeout; a refused peer is
                closed before one byte of its session is read
    handshake   read the HELLO (within handshake-timeout), ask the daemon to
                admit it (it creates the paused backup domain or refuses),
                answer ACCEPT or REFUSE; a peer that left while the backup
                was created (EOF, reset), or a session the daemon closed
                meanwhile (a reconnect superseded it, shutdown), gets no
                ACCEPT: the session ends there and its backup is destroyed
    stream      feed the legacy stream to xenbind.stream.Decoder; checkpoint 0
                (the initial copy) goes straight into the paused backup;
                every later checkpoint is staged (receiver.staging) and
                committed at its CheckpointEnd, pages and context together,
                under the Protection's lock; then ACK (and, in verify mode, the
                digest check first)
    heartbeat   a HEARTBEAT frame whenever nothing was sent for heartbeat-ms
    end         EOF, reset, a broken rule, a stall, or the daemon closing the
                session (failover, a newer session, shutdown); the daemon's
                policy decides what happens to the backup (receiver.daemon)

Rules kept here:
- Nothing is written into the backup outside the Protection's lock, and only
  while the Protection is in a commit state (never after a failover).
- A torn checkpoint is dropped: the staged pages never reach the backup.
- Every wait on the socket has a timeout (at most heartbeat-ms), so a session
  notices within that time that the daemon closed it.
- ``closing`` and the session protocol's state change together, under
  ``_rs_lock``: ACCEPT is produced only if the daemon has not closed the
  session, and the daemon's ERROR frame (``close_from_daemon``) is sent only
  once ACCEPT was (before it the sender waits for ACCEPT/REFUSE, not a frame).
- ``thread`` is set only once the thread runs, so ``join`` never meets a
  thread that is not started.
- Events a failing ``feed`` decoded before the offending item are handled
  first: a checkpoint that arrived whole before garbage is still committed.
- Every Decoder cap comes from the configuration (max-pages via the HELLO,
  max-compressed-mb, max-context-mb, max-device-model-mb, max-cache-pages).
- An ended session holds nothing big: when ``run`` returns, the decoder is
  closed (its codec cache, up to max-cache-pages x 4 KiB, and its item buffer
  are freed at once) and dropped, and the staged pages are dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from daemonkit.tls import TlsRefused
from daemonkit.transport import Transport
from xenbind.errors import DomainError, ProtocolError, RemusError, StreamError
from xenbind.session import (
    ERR_INTERNAL,
    ERR_PROTOCOL,
    ERR_STALLED,
    Accept,
    HandshakeError,
    HelloReceived,
    ReceiverSession,
    StreamData,
)
from xenbind.stream import (
    CheckpointEnd,
    CodecAnnounce,
    Decoder,
    EnableCompression,
    Header,
    Heartbeat,
    LastCheckpoint,
    MemoryDigest,
    Pages,
    Tail,
)
from xenbind.stream.decoder import MalformedStream, TruncatedStream

from .physmap import Physmap
from .staging import Staging

log = logging.getLogger("receiver")

RECV_SIZE = 1 << 20  # bytes read per recv
#: an item with at least this much still to come is received into the decoder's buffer
DIRECT_RECV_MIN = 64 << 10
SOFTWARE = "remus-receiver 0.1.0"
#: closing: how long and how much of the peer's input to drain (see _linger)
LINGER_S = 0.2
LINGER_MAX_BYTES = 16 << 20
#: TEST-ONLY fault hook (tests/receiver/test_admission.py): seconds every
#: admission waits between "backup domain created" and ACCEPT, to widen the
#: window a slow ``xl create`` opened in the Xen lab. Unset in production.
ADMIT_DELAY_ENV = "REMUS_RECEIVER_TEST_ADMIT_DELAY_S"


class _End(Exception):
    """Ends the stream loop: ``kind`` is clean, link-lost, stalled, violation,
    corrupt or closed (the daemon ended the session)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class Connection:
    def __init__(self, daemon, transport: Transport) -> None:
        self.daemon = daemon
        self.cfg = daemon.cfg
        self.t = transport
        self.peer = transport.peer()
        self.rs = ReceiverSession()
        self.prot = None  # receiver.protection.Protection once admitted
        self.closing = threading.Event()
        self._rs_lock = threading.Lock()  # closing + self.rs's state, see the rules
        self._send_lock = threading.Lock()
        self._last_sent = time.monotonic()
        self.thread: threading.Thread | None = None
        self.decoder: Decoder | None = None  # during the stream only
        self.staging: Staging | None = None

    # ------------------------------------------------------------- plumbing

    def start(self) -> None:
        thread = threading.Thread(target=self.run, name=f"session-{self.peer}", daemon=True)
        thread.start()
        self.thread = thread  # only now: shutdown may look at it any time

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the session thread, if it was started."""
        thread = self.thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)

    def send(self, data: bytes) -> bool:
        with self._send_lock:
            try:
                self.t.sendall(data)
            except OSError:
                return False
            self._last_sent = time.monotonic()
            return True

    def close_from_daemon(self, code: int, reason: str) -> None:
        """End this session from another thread (failover, newer session,
        shutdown): an ERROR frame (``code``, ``reason``) if ACCEPT was sent
        (before it, nothing: the session thread sends no ACCEPT once
        ``closing`` is set); the session thread notices within heartbeat-ms
        and closes the connection."""
        with self._rs_lock:
            self.closing.set()
            frame = self.rs.error(code, reason) if self.rs.state == "streaming" else None
        if frame is not None:
            self.send(frame)

    def _error_frame(self, code: int, reason: str) -> bytes | None:
        """ERROR for this session's own end, unless closed already (the
        daemon's ERROR went first) or never accepted."""
        with self._rs_lock:
            return self.rs.error(code, reason) if self.rs.state == "streaming" else None

    def who(self) -> str:
        if self.prot is not None:
            return (
                f"session {self.prot.hello.session_id[:8]} from {self.peer} ({self.prot.label()})"
            )
        return f"connection from {self.peer}"

    def run(self) -> None:
        try:
            if self._secure() and self._handshake():
                self._stream()
        except Exception:  # a bug must end one session, never the daemon
            log.exception("%s: internal error; session ended", self.who())
            if self.prot is not None:
                frame = self._error_frame(ERR_INTERNAL, "internal error on the receiver")
                if frame is not None:
                    self.send(frame)
                self.daemon.session_ended(
                    self.prot, self, "violation", "internal error on the receiver (see log)"
                )
        finally:
            self._release()
            self._linger()
            self.t.close()
            self.daemon.connection_closed(self)

    def _release(self) -> None:
        """The session is over: free the decoder's codec cache and buffers
        and the staged pages now, whoever still holds this Connection."""
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        if self.staging is not None:
            self.staging.discard()
            self.staging = None
        self.context = None  # the last tail's records (device model: up to max-device-model)

    def _linger(self) -> None:
        """Close our side first and drain what the peer still sends, briefly:
        closing a socket with unread input makes the kernel send RST, and the
        peer may then lose the REFUSE / ERROR / GOODBYE we just sent."""
        self.t.shutdown_write()
        deadline = time.monotonic() + LINGER_S
        drained = 0
        try:
            while drained < LINGER_MAX_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.t.settimeout(left)
                n = len(self.t.recv(RECV_SIZE))
                if n == 0:
                    return
                drained += n
        except OSError:
            return

    # ------------------------------------------------------------- handshake

    def _secure(self) -> bool:
        """With TLS configured: the TLS handshake and the peer's name check,
        here in the session thread, within handshake-timeout. A refused peer
        is closed before a byte of its session is read."""
        tls = self.daemon.tls
        if tls is None:
            return True
        try:
            self.t = tls.accept(self.t, self.cfg.handshake_timeout)
        except TlsRefused as e:
            self.daemon.tls_refused += 1
            log.warning(
                "connection from %s refused before the session handshake: %s%s",
                self.peer,
                e.reason,
                f" ({e.detail})" if e.detail else "",
            )
            if e.plaintext_hello:
                # tell a plaintext remusd why, in its own protocol (none of its bytes is read)
                self.t.settimeout(1.0)
                self.send(
                    self.rs.refuse(
                        "bad-hello",
                        "this receiver requires TLS: configure "
                        "remusd with tls-cert, tls-key and tls-ca",
                    )
                )
            return False
        log.debug("connection from %s: TLS established (%s)", self.peer, self.t.describe())
        return True

    def _handshake(self) -> bool:
        deadline = time.monotonic() + self.cfg.handshake_timeout
        hello = None
        while hello is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closing.is_set():
                log.warning(
                    "%s: no complete HELLO within %.1f s; closed",
                    self.who(),
                    self.cfg.handshake_timeout,
                )
                return False
            self.t.settimeout(min(remaining, 0.5))
            try:
                data = self.t.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                log.warning("%s: connection lost during the handshake: %s", self.who(), e)
                return False
            try:
                if not data:
                    self.rs.eof()
                    log.info("%s: closed before sending a HELLO", self.who())
                    return False
                events = self.rs.feed(data)
            except HandshakeError as e:
                log.warning("%s: refused: %s (code %s)", self.who(), e, e.code)
                self.send(self.rs.refuse(e.code, str(e)))
                return False
            except ProtocolError as e:
                log.warning("%s: refused: %s", self.who(), e)
                self.send(self.rs.refuse("bad-hello", str(e)))
                return False
            for ev in events:
                if isinstance(ev, HelloReceived):
                    hello = ev.hello
        from .daemon import Refusal

        try:
            prot = self.daemon.admit(hello, self)
        except Refusal as r:
            log.warning(
                "connection from %s: refused session %s for domain %s (%s): %s",
                self.peer,
                hello.session_id[:8],
                hello.domain.name,
                hello.domain.uuid,
                r.reason,
            )
            self.send(self.rs.refuse(r.code, r.reason))
            return False
        self.prot = prot
        delay = os.environ.get(ADMIT_DELAY_ENV)
        if delay:  # test-only, see ADMIT_DELAY_ENV
            time.sleep(float(delay))
        # creating the backup may take seconds (xl create): is anyone still there?
        gone = self._gone_during_admission()
        with self._rs_lock:
            if gone is None and self.closing.is_set():
                gone = "closed by the receiver during admission (before ACCEPT)"
            accept = (
                None
                if gone is not None
                else self.rs.accept(
                    Accept(
                        session_id=hello.session_id,
                        failover_timeout_ms=round(prot.failover_timeout * 1000),
                        heartbeat_ms=self.cfg.heartbeat_ms,
                        limits={
                            "max_pages": self.cfg.max_pages,
                            "max_staged_bytes": self.cfg.max_staged_bytes,
                            "max_compressed": self.cfg.max_compressed,
                            "max_context": self.cfg.max_context,
                            "max_device_model": self.cfg.max_device_model,
                            "max_cache_pages": self.cfg.max_cache_pages,
                        },
                        software=SOFTWARE,
                    )
                )
            )
        if accept is None:
            # nothing was committed: the daemon destroys the backup (or a
            # newer session already did) and logs the one line
            self.daemon.session_ended(prot, self, "admission", gone)
            return False
        prot.life()  # the stall and failover clocks start now, not at the HELLO
        if not self.send(accept):
            self.daemon.session_ended(prot, self, "link-lost", "connection lost sending ACCEPT")
            return False
        return True

    def _gone_during_admission(self) -> str | None:
        """Why the peer cannot be served any more (it closed or reset the
        connection while its backup was created; it pushed too much stream
        before ACCEPT), or None. Reads only what has already arrived: stream
        bytes sent early are kept by ``self.rs`` for after ACCEPT."""
        try:
            while self.t.wait_readable(0):
                self.t.settimeout(0.05)  # readable: at most a partial TLS record to wait for
                data = self.t.recv(65536)
                if not data:
                    return "peer left during admission (before ACCEPT)"
                self.rs.feed(data)
        except TimeoutError:
            return None
        except OSError as e:
            return f"peer left during admission (before ACCEPT): {e.strerror or e}"
        except ProtocolError as e:
            self.send(self.rs.refuse("bad-hello", str(e)))
            return f"refused during admission: {e}"
        return None

    # ------------------------------------------------------------- stream

    def _stream(self) -> None:
        prot = self.prot
        hello = prot.hello
        opts = hello.options
        cfg = self.cfg
        self.decoder = Decoder(
            max_p2m_size=hello.domain.pages,
            max_compressed=cfg.max_compressed,
            max_context=cfg.max_context,
            max_device_model=cfg.max_device_model,
            max_cache_pages=cfg.max_cache_pages,
            cache_pages=opts.cache_pages if opts.codec != "none" else None,
        )
        self.staging = Staging(hello.domain.pages, self.cfg.max_staged_bytes)
        try:
            # which backup PFNs have memory: the ones the stream fills and the
            # backup lacks are populated before they are written
            self.physmap = Physmap(prot.backup, hello.domain.pages)
        except DomainError as e:
            self._finish(_End("corrupt", f"cannot probe the backup's physmap: {e}"))
            return
        self.context = None
        self.digest = None
        self.last_flag = False
        self.initial_pages = 0
        try:
            self._loop()
        except _End as end:
            self._finish(end)

    def _loop(self) -> None:
        prot = self.prot
        hb = self.cfg.heartbeat_ms / 1000
        buf = bytearray(RECV_SIZE)
        mv = memoryview(buf)
        # bytes that came with the HELLO
        self._consume(self.rs.feed(b""))
        while True:
            if self.closing.is_set():
                raise _End("closed", "closed by the receiver")
            now = time.monotonic()
            wait = hb - (now - self._last_sent)
            if wait <= 0:
                if not self.send(self.rs.heartbeat(prot.last_committed)):
                    # a frame may be half-written: the link is unusable
                    raise _End(
                        "link-lost",
                        "cannot send to the sender (connection lost, or it stopped reading)",
                    )
                wait = hb
            if prot.state == "initial-copy" and now - prot.last_life > self.cfg.stall_timeout:
                raise _End(
                    "stalled",
                    f"the initial copy made no progress for {self.cfg.stall_timeout:.0f} s",
                )
            self.t.settimeout(wait)
            # a batch's page data is received straight into the decoder's
            # buffer for it (one copy of an initial copy's bytes fewer)
            direct = self.decoder.get_buffer(DIRECT_RECV_MIN) if self.rs.passthrough else None
            try:
                n = self.t.recv_into(buf if direct is None else direct)
            except TimeoutError:
                continue
            except OSError as e:
                raise _End("link-lost", f"connection lost: {e.strerror or e}") from None
            if n == 0:
                self._eof()
            prot.bytes_in += n
            # any byte from the primary proves it alive: a checkpoint whose one
            # COMPRESSED_DATA chunk takes longer than the failover timeout to
            # arrive completes no event until its end (seen in bench/e2e: a
            # false failover under load with the 500 ms timeout of 25 ms epochs)
            prot.life()
            if direct is not None:
                self.rs.streamed(n)
                self._decode(self.decoder.buffer_updated, n)
                continue
            try:
                events = self.rs.feed(mv[:n])
            except ProtocolError as e:  # cannot happen after ACCEPT, but never crash
                raise _End("violation", str(e)) from None
            self._consume(events)

    def _consume(self, session_events: list) -> None:
        for sev in session_events:
            if isinstance(sev, StreamData):
                self._decode(self.decoder.feed, sev.data)

    def _decode(self, step, arg) -> None:
        """Run one decoder step (feed(data) or buffer_updated(n)) and handle its events."""
        try:
            events = step(arg)
        except MalformedStream as e:
            self._handle(e.events)  # what arrived whole before the offending item
            raise _End("violation", f"stream error at {e}") from None
        except StreamError as e:
            raise _End("violation", f"stream error at {e}") from None
        self._handle(events)

    def _eof(self) -> None:
        try:
            self.decoder.eof()
        except TruncatedStream as e:
            dropped = self.staging.pages
            self.staging.discard()
            raise _End(
                "link-lost",
                f"connection closed mid-stream ({e}; {dropped} staged pages "
                "of the torn checkpoint dropped)",
            ) from None
        except StreamError as e:
            raise _End("link-lost", f"connection closed: {e}") from None
        raise _End("link-lost", "connection closed between checkpoints")

    # ------------------------------------------------------------- events

    def _handle(self, events: list) -> None:
        if not events:
            return
        prot = self.prot
        opts = prot.hello.options
        beat = False
        for ev in events:
            if isinstance(ev, Pages):
                if prot.state == "initial-copy":
                    # checkpoint 0 goes straight into the paused backup
                    with prot.lock:
                        if not prot.commit_allowed():
                            raise _End("closed", f"backup is {prot.state}")
                        self.physmap.ensure(ev.pfns)
                        prot.backup.scatter(ev.pfns, ev.data)
                    self.initial_pages += len(ev.pfns)
                else:
                    try:
                        self.staging.add(ev.pfns, ev.data)
                    except RemusError as e:
                        raise _End("violation", str(e)) from None
            elif isinstance(ev, Heartbeat):
                beat = True
            elif isinstance(ev, Header):
                if ev.p2m_size != prot.config.pages:
                    raise _End(
                        "violation",
                        f"stream header says {ev.p2m_size} pages, the "
                        f"HELLO said {prot.config.pages}",
                    )
            elif isinstance(ev, Tail):
                self.context = ev.context
            elif isinstance(ev, MemoryDigest):
                self.digest = ev
            elif isinstance(ev, LastCheckpoint):
                self.last_flag = True
            elif isinstance(ev, CodecAnnounce | EnableCompression):
                if opts.codec == "none" or ev.codec != opts.codec:
                    raise _End(
                        "violation",
                        f"stream switches to codec {ev.codec}, the HELLO said {opts.codec}",
                    )
            elif isinstance(ev, CheckpointEnd):
                self._commit(ev)
        prot.life(heartbeat=beat)

    def _commit(self, end: CheckpointEnd) -> None:
        prot = self.prot
        t0 = time.monotonic()
        verified = mismatch = False
        with prot.lock:
            if not prot.commit_allowed():
                self.staging.discard()
                raise _End("closed", f"backup is {prot.state}; checkpoint {end.index} dropped")
            try:
                if prot.state == "initial-copy":
                    prot.backup.set_context(self.context)
                    n = self.initial_pages
                else:
                    n = self.staging.commit(prot.backup, self.context, self.physmap)
            except DomainError as e:
                raise _End(
                    "corrupt", f"commit of checkpoint {end.index} failed half-way: {e}"
                ) from None
            first = prot.state == "initial-copy"
            prot.state = "receiving"
            prot.last_committed = end.index
            prot.committed_at = time.monotonic()
            prot.checkpoints += 1
            prot.pages_committed += n
            prot.last_checkpoint_pages = n
            prot.life()
            if self.digest is not None:
                verified, mismatch = self._verify(end.index, self.digest)
                self.digest = None
        commit_ms = (time.monotonic() - t0) * 1000
        if first:
            log.info(
                "%s: initial copy committed (%d pages, %.1f MB received); the backup is "
                "failover-capable",
                self.who(),
                n,
                prot.bytes_in / 1e6,
            )
        else:
            log.debug(
                "%s: checkpoint %d committed (%d pages, %.2f ms)",
                self.who(),
                end.index,
                n,
                commit_ms,
            )
        if not self.send(self.rs.ack(end.index, verified=verified, mismatch=mismatch)):
            raise _End("link-lost", f"connection lost sending ACK({end.index})")
        if self.last_flag:
            raise _End("clean", f"LAST_CHECKPOINT: protection ended after checkpoint {end.index}")

    def _verify(self, index: int, digest: MemoryDigest) -> tuple[bool, bool]:
        """Digest the backup's memory (xxh3-128 over every page, in PFN order)
        and compare it with the stream's; returns (verified, mismatch)."""
        prot = self.prot
        if digest.algorithm != "xxh3-128":
            log.warning(
                "%s: checkpoint %d: digest algorithm %s not supported; not verified",
                self.who(),
                index,
                digest.algorithm,
            )
            return False, False
        got = prot.digest()
        if got == digest.digest:
            prot.verified += 1
            return True, False
        prot.mismatches += 1
        log.error(
            "%s: verify MISMATCH at checkpoint %d: the backup's memory digest %s differs "
            "from the primary's %s (mismatch #%d)",
            self.who(),
            index,
            got.hex(),
            digest.digest.hex(),
            prot.mismatches,
        )
        return False, True

    # ------------------------------------------------------------- end

    def _finish(self, end: _End) -> None:
        frames = {
            "violation": (ERR_PROTOCOL, end.message),
            "stalled": (ERR_STALLED, end.message),
            "corrupt": (ERR_INTERNAL, end.message),
        }
        frame = None
        with self._rs_lock:
            if self.rs.state == "streaming":  # else the daemon's ERROR went first
                if end.kind == "clean":
                    frame = self.rs.goodbye(end.message)
                elif end.kind in frames:
                    frame = self.rs.error(*frames[end.kind])
        if frame is not None:
            self.send(frame)
        self.staging.discard()
        self.daemon.session_ended(self.prot, self, end.kind, end.message)
