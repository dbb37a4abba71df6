"""Where a session's stream goes: the receiver over a Transport, or a file.

Two kinds of link behind one small interface the protector drives::

    link.open()                      connect + handshake (network) / create the file
    link.send(buffers)               write stream buffers in order (sendmsg / writev)
    link.send_checkpoint(i, buffers) the same, for the whole of checkpoint i
    link.next_acks(deadline)         block until ACKs arrived (or the deadline): them
    link.take_acks()                 the ACKs read meanwhile (by poll), without waiting
    link.poll()                      consume what the peer sent meanwhile (heartbeats)
    link.take_disk_hashes()          (network) the DISK_HASHES frames read so far
    link.heartbeat_if(due, data)     send a HEARTBEAT chunk if due() says so and no
                                     send is under way (remusd.pacer's one path)
    link.close()                     end it (after LAST_CHECKPOINT for a clean end)

``NetLink`` speaks the session protocol of ``xenbind.session`` (handshake,
then the legacy stream one way, ACK/HEARTBEAT frames the other) over a
``daemonkit.transport.Transport``; when the HELLO offered a wire codec
(``wire``, remusd.wire) and the ACCEPT took it, every send goes out as
xenbind.wirecomp segments, compressed always, or under ``auto`` only while
the network is the limit (remusd.wire's rule, fed from TCP_INFO after each
send). ``FileLink`` writes the bare legacy stream
(no handshake) like ``xl remus -b`` but kept; a checkpoint counts as
acknowledged once written and flushed.

Rules:
- Every wait has a deadline from configuration; a missed one raises
  ``LinkDown`` (the backup is gone as far as the primary can tell).
- A link reports ACKs in the order they came; whether an ACK is acceptable
  (the checkpoint in flight, monotonic) is the caller's ``remusd.core``.
- A receiver's REFUSE raises ``Refused`` carrying its code, so the protector
  can tell "try later" (busy, internal) from "never" (fenced, version...).
- ``LinkDown.fenced``: the receiver said its backup of the domain runs
  (ERROR failed-over on this session, or REFUSE fenced). When a send or recv
  fails, the frames the receiver queued before closing are read first, so an
  ERROR failed-over is not mistaken for a plain broken link. An ERROR ends
  the session at once (ACKs read before it in the same batch are dropped: no
  output is released on their account); a GOODBYE ends it once the ACKs
  read before it are taken.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import IO

from daemonkit.transport import PlainTransport, Transport
from xenbind import session as sp
from xenbind.blockhash import HashesMessage
from xenbind.errors import ProtocolError, RemusError
from xenbind.hypervisor import Domain
from xenbind.wirecomp import Encoder as WireEncoder

from .config import DEFAULT_ACCEPT_TIMEOUT, Target
from .wire import AUTO_WINDOW_S, OFF, TCP_INFO_LEN, AutoWire, WireMode, network_limited_us

log = logging.getLogger(__name__)

#: Refusal codes after which retrying the same receiver cannot help.
PERMANENT_REFUSALS = frozenset({"version", "bad-hello", "codec", "limit", "fenced"})


class LinkDown(RemusError):
    """The backup cannot be reached or stopped acknowledging."""

    def __init__(
        self,
        reason: str,
        *,
        permanent: bool = False,
        fenced: bool = False,
        shutdown: bool = False,
        error_code: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent or fenced
        self.fenced = fenced
        #: the ERR_* code of the receiver's ERROR that ended the session, if one did
        self.error_code = error_code
        #: the receiver said it is stopping (ERROR shutdown): it does not fail over
        self.shutdown = shutdown


class Refused(LinkDown):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(
            f"receiver refused the session ({code}): {reason}",
            permanent=code in PERMANENT_REFUSALS,
            fenced=code == "fenced",
        )
        self.code = code


#: ``due(now, last_sent)``: whether a heartbeat is due (remusd.core.Heartbeats.due)
HeartbeatDue = Callable[[float, "float | None"], bool]


class Link:
    kind = "abstract"
    #: whether HEARTBEAT tags go out on this link (a file has nobody to keep alive)
    heartbeats = True
    failover_timeout_ms: int | None = None
    #: who is at the other end, for messages
    peer = "?"
    #: once open: the receiver's address as connected, its certificate's names
    #: and expiry (TLS; else [] and None)
    peer_address: str | None = None
    peer_names: list[str] = []
    peer_not_after: float | None = None

    def open(self) -> None:
        raise NotImplementedError

    def send(self, buffers: Sequence) -> int:
        raise NotImplementedError

    def send_checkpoint(self, index: int, buffers: Sequence) -> int:
        """Send the buffers of the whole of checkpoint ``index``."""
        return self.send(buffers)

    def next_acks(self, deadline: float) -> list[sp.Ack]:
        """The ACKs that arrived, waiting for one until ``deadline`` ([] then)."""
        raise NotImplementedError

    def take_acks(self) -> list[sp.Ack]:
        """The ACKs read meanwhile (by ``poll``), without waiting."""
        return []

    def wait_ack(self, index: int, deadline: float) -> sp.Ack:
        """Block until checkpoint ``index`` is acknowledged, for a caller that
        drives a link by hand (tests/lab); LinkDown at ``deadline``. No
        heartbeat goes out meanwhile: heartbeats come from a session's pacer
        alone (remusd.pacer)."""
        while True:
            acks = self.next_acks(deadline)
            for ack in acks:
                if ack.index >= index:
                    return ack
            if not acks and time.monotonic() >= deadline:
                raise LinkDown(f"{self.peer} did not acknowledge checkpoint {index} in time")

    def poll(self) -> None:
        """Consume whatever the peer sent meanwhile (heartbeats); LinkDown if it left."""

    def heartbeat_if(self, due: HeartbeatDue, data: bytes) -> bool:
        """Send ``data`` (a HEARTBEAT chunk) if ``due(now, last_sent)`` and no
        send is under way; whether it went out."""
        return False

    def close(self) -> None:
        raise NotImplementedError

    def wire_status(self) -> dict | None:
        """The wire compression of this session (None: the raw stream)."""
        return None


class FileLink(Link):
    """The bare legacy stream into a file (``--to file:PATH``)."""

    kind = "file"
    heartbeats = False

    def __init__(self, path: str) -> None:
        self.path = path
        self.peer = path
        self._f: IO[bytes] | None = None
        self._acks: deque[sp.Ack] = deque()

    def open(self) -> None:
        try:
            self._f = open(self.path, "wb")  # noqa: SIM115 - lives as long as the link
        except OSError as e:
            raise LinkDown(f"cannot open {self.path}: {e.strerror}", permanent=True) from None

    def send(self, buffers: Sequence) -> int:
        assert self._f is not None
        try:
            n = 0
            for b in buffers:
                n += self._f.write(b)
            self._f.flush()
        except OSError as e:
            raise LinkDown(f"writing {self.path}: {e.strerror}") from None
        return n

    def send_checkpoint(self, index: int, buffers: Sequence) -> int:
        n = self.send(buffers)
        self._acks.append(sp.Ack(index))  # written and flushed: acknowledged
        return n

    def next_acks(self, deadline: float) -> list[sp.Ack]:
        return self.take_acks()

    def take_acks(self) -> list[sp.Ack]:
        acks = list(self._acks)
        self._acks.clear()
        return acks

    def wait_ack(self, index: int, deadline: float) -> sp.Ack:
        self._acks.clear()
        return sp.Ack(index)  # written and flushed: acknowledged

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError as e:
                log.warning("closing %s: %s", self.path, e.strerror)
            self._f = None


class NetLink(Link):
    """The session protocol over a Transport to a remus-receiver."""

    kind = "tcp"

    def __init__(
        self,
        target: Target,
        hello: sp.Hello,
        *,
        connect_timeout: float,
        io_timeout: float,
        accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT,
        connect: Callable[[str, int, float], Transport] | None = None,
        wire: WireMode = OFF,
    ) -> None:
        self.target = target
        self.hello = hello
        #: the configured wire compression (offered in the HELLO's options.wire)
        self.wire = wire
        self._encoder: WireEncoder | None = None
        self._auto: AutoWire | None = None
        self._probe: socket.socket | None = None  # a dup of the socket, for TCP_INFO
        self.connect_timeout = connect_timeout
        #: the receiver answers the HELLO once it has built the backup domain
        self.accept_timeout = accept_timeout
        self.io_timeout = io_timeout
        self._connect = connect or (lambda h, p, t: PlainTransport.connect(h, p, timeout=t))
        self.peer = str(target)
        self.t: Transport | None = None
        self.session: sp.SenderSession | None = None
        self.accept: sp.Accept | None = None
        self.last_heard = 0.0
        #: when the stream last sent anything (None: not started; HELLO aside)
        self.last_sent: float | None = None
        self._send_lock = threading.Lock()
        self._acks: deque[sp.Ack] = deque()
        self._goodbye: str | None = None
        self._disk_hashes: list[HashesMessage] = []

    # -- connection --------------------------------------------------------------

    def open(self) -> None:
        try:
            self.t = self._connect(self.target.host, self.target.port, self.connect_timeout)
        except OSError as e:
            raise LinkDown(f"cannot connect to {self.target}: {e.strerror or e}") from None
        self.session = sp.SenderSession(self.hello)
        self.t.settimeout(self.connect_timeout)
        deadline = time.monotonic() + self.accept_timeout
        try:
            self.t.sendall(self.session.hello())
            while self.accept is None:
                if time.monotonic() > deadline:
                    raise LinkDown(
                        f"{self.target} did not answer the HELLO within "
                        f"{self.accept_timeout} s (--accept-timeout; it builds the "
                        "backup domain before it answers)"
                    )
                for ev in self._read():
                    if isinstance(ev, sp.Refused):
                        raise Refused(ev.refuse.code, ev.refuse.reason)
                    if isinstance(ev, sp.Accepted):
                        self.accept = ev.accept
                    elif self.accept is not None:  # a frame that came with the ACCEPT
                        self._handle(ev)
        except LinkDown:
            self.close()
            raise
        except (OSError, TimeoutError) as e:
            self.close()
            raise LinkDown(f"handshake with {self.target}: {e}") from None
        self.failover_timeout_ms = self.accept.failover_timeout_ms
        try:
            self.peer_address = self.t.peer()
        except OSError:
            self.peer_address = None
        self.peer_names = list(getattr(self.t, "peer_names", None) or [])
        self.peer_not_after = getattr(self.t, "peer_not_after", None)
        self.t.settimeout(self.io_timeout)
        self.last_heard = time.monotonic()
        self._start_wire()

    def _start_wire(self) -> None:
        assert self.accept is not None and self.t is not None
        if not self.accept.wire:
            if self.wire.codec:
                log.info(
                    "%s takes no wire compression (an older receiver, or --wire-compression "
                    "off there): the stream goes raw",
                    self.target,
                )
            return
        self._encoder = WireEncoder(self.accept.wire, self.wire.level)
        if self.wire.auto:
            self._auto = AutoWire()
            try:
                self._probe = socket.socket(fileno=os.dup(self.t.fileno()))
            except OSError as e:
                log.warning("%s: no TCP_INFO for wire compression auto (%s): raw", self.target, e)
                self._auto = None
                self._encoder = None

    def wire_status(self) -> dict | None:
        enc = self._encoder
        if enc is None:
            return None
        c, auto = enc.counts, self._auto
        return {
            "mode": str(self.wire),
            "codec": c.codec,
            "compressing": True if auto is None else auto.compress,
            "stream_bytes": c.raw_bytes,
            "wire_bytes": c.wire_bytes,
            "ratio": round(c.ratio, 2),
            "network_limited": None if auto is None or auto.share is None else round(auto.share, 3),
            "switches": 0 if auto is None else auto.switches,
        }

    def _observe_wire(self, enc: WireEncoder, auto: AutoWire) -> None:
        """After a send under ``auto``: feed TCP_INFO to its rule."""
        probe = self._probe
        if probe is None:
            return
        try:
            info = probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        except OSError:
            return
        c = enc.counts
        if auto.observe(time.monotonic(), network_limited_us(info), c.raw_bytes, c.wire_bytes):
            log.info(
                "%s: wire compression %s (the network was the limit %.0f%% of the last %.1f s)",
                self.target,
                "on" if auto.compress else "off",
                100 * (auto.share or 0.0),
                AUTO_WINDOW_S,
            )

    def _read(self) -> list:
        """One recv (blocking up to the transport's timeout) fed to the session."""
        assert self.t is not None and self.session is not None
        try:
            data = self.t.recv(65536)
        except TimeoutError:
            return []
        except OSError as e:
            raise self._last_words(
                LinkDown(f"link to {self.target} broke: {e.strerror or e}")
            ) from None
        try:
            if not data:
                self.session.eof()
                raise LinkDown(f"{self.target} closed the connection")
            events = self.session.feed(data)
        except ProtocolError as e:
            raise LinkDown(f"{self.target} broke the session protocol: {e}") from None
        self.last_heard = time.monotonic()
        return events

    def _handle(self, ev: object) -> None:
        if self._goodbye is not None:
            return  # nothing counts after the receiver's GOODBYE
        if isinstance(ev, sp.Ack):
            self._acks.append(ev)
            if ev.mismatch:
                log.error(
                    "backup %s reports a memory digest mismatch at checkpoint %d",
                    self.target,
                    ev.index,
                )
        elif isinstance(ev, sp.Error):
            raise LinkDown(
                f"{self.target} ended the session ({ev.code_name}): {ev.reason}",
                fenced=ev.code == sp.ERR_FAILED_OVER,
                shutdown=ev.code == sp.ERR_SHUTDOWN,
                error_code=ev.code,
            )
        elif isinstance(ev, sp.Goodbye):
            self._goodbye = ev.reason  # raised once the ACKs before it are taken
        elif isinstance(ev, sp.DiskHashes):
            self._disk_hashes.append(ev.message)

    def take_disk_hashes(self) -> list[HashesMessage]:
        """The receiver's DISK_HASHES frames read so far (remusd.diskmirror)."""
        out, self._disk_hashes = self._disk_hashes, []
        return out

    def _check_goodbye(self) -> None:
        if self._goodbye is not None and not self._acks:
            raise LinkDown(f"{self.target} said goodbye: {self._goodbye}")

    # -- streaming ---------------------------------------------------------------

    def send(self, buffers: Sequence) -> int:
        with self._send_lock:
            return self._send(buffers)

    def _send(self, buffers: Sequence, last_words: bool = True) -> int:
        t = self.t
        if t is None:
            raise LinkDown(f"link to {self.target} is closed")
        enc, auto = self._encoder, self._auto
        try:
            if enc is None:
                n = t.send_buffers(buffers)
            else:
                before = enc.counts.raw_bytes
                t.send_buffers(enc.encode(buffers, True if auto is None else auto.compress))
                n = enc.counts.raw_bytes - before  # the stream bytes, as without compression
        except TimeoutError:
            raise LinkDown(f"sending to {self.target} stalled for {self.io_timeout} s") from None
        except OSError as e:
            down = LinkDown(f"sending to {self.target}: {e.strerror or e}")
            # only the session thread reads the socket (not the pacer)
            raise self._last_words(down) if last_words else down from None
        self.last_sent = time.monotonic()
        if auto is not None and enc is not None:
            self._observe_wire(enc, auto)
        return n

    def _last_words(self, down: LinkDown) -> LinkDown:
        """The link broke: if the receiver queued an ERROR (failed-over,
        superseded...) before closing, that is the reason, not the socket
        error. Reads only what is already queued (no wait)."""
        t, session = self.t, self.session
        if t is None or session is None:
            return down
        try:
            for _ in range(64):
                ready = t.wait_readable(0)  # TLS may hold decoded bytes select cannot see
                if not ready:
                    break
                data = t.recv(65536)
                if not data:
                    break
                for ev in session.feed(data):
                    self._handle(ev)
        except LinkDown as said:
            return said
        except (OSError, ValueError, ProtocolError):
            pass
        return down

    def heartbeat_if(self, due: HeartbeatDue, data: bytes) -> bool:
        """Send ``data`` if ``due(now, last_sent)`` and no send is under way
        (then bytes are flowing anyway).

        Called from the session's pacer thread; sends are whole chunk
        sequences under one lock, so the tag always lands between chunks.
        """
        if not due(time.monotonic(), self.last_sent):
            return False
        if not self._send_lock.acquire(blocking=False):
            return False
        try:
            if not due(time.monotonic(), self.last_sent):
                return False
            self._send([data], last_words=False)
            return True
        finally:
            self._send_lock.release()

    def poll(self) -> None:
        assert self.t is not None
        while True:
            self._check_goodbye()
            try:
                ready = self.t.wait_readable(0)
            except (OSError, ValueError):
                raise LinkDown(f"link to {self.target} is closed") from None
            if not ready:
                return
            for ev in self._read():
                self._handle(ev)

    def take_acks(self) -> list[sp.Ack]:
        acks = list(self._acks)
        self._acks.clear()
        return acks

    def next_acks(self, deadline: float) -> list[sp.Ack]:
        assert self.t is not None
        while not self._acks:
            self._check_goodbye()
            now = time.monotonic()
            if now >= deadline:
                return []
            try:
                ready = self.t.wait_readable(max(0.001, deadline - now))
            except (OSError, ValueError):
                raise LinkDown(f"link to {self.target} is closed") from None
            if ready:
                for ev in self._read():
                    self._handle(ev)
        return self.take_acks()

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self.t is not None:
            self.t.close()
            self.t = None


#: wraps the link and domain of a protector's session N (1 = the first) before
#: it opens (remusd.protector's ``Tuning.wrap``)
SessionWrap = Callable[[int, "Link", Domain], "tuple[Link, Domain]"]


def make_link(
    target: Target,
    hello: sp.Hello,
    *,
    connect_timeout: float,
    io_timeout: float,
    accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT,
    connect: Callable[[str, int, float], Transport] | None = None,
    wire: WireMode = OFF,
) -> Link:
    """``connect(host, port, timeout)`` makes the transport (remusd's choice at
    start: ``daemonkit.tls.TlsClient.connect`` or, with --insecure,
    ``daemonkit.tls.plaintext_connect``). ``wire``: the wire compression to
    offer (a file target never compresses)."""
    if target.kind == "file":
        return FileLink(os.path.abspath(target.path))
    return NetLink(
        target,
        hello,
        connect_timeout=connect_timeout,
        io_timeout=io_timeout,
        accept_timeout=accept_timeout,
        connect=connect,
        wire=wire,
    )
