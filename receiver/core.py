"""The receiver's side of one session, sans-IO (h11's Connection, for the receiver).

Inputs: bytes (``receive_data``, or ``get_buffer``/``buffer_updated`` for the
zero-copy path), ``receive_eof``, ``connection_lost``, timer ticks
(``tick(now)``: time is passed in, never read) and the driver's answers
(``accept``/``refuse`` to an ``Admit``, ``close`` from the daemon, ``fail``,
``send_failed``). Every input returns a list of actions, to carry out in
order:

    Send(data, on_failure)  write these bytes; if they cannot be written and
                            ``on_failure`` is set, drop the rest of the list and
                            carry out ``send_failed(send)`` instead
    Admit(hello)            ask the daemon to admit this HELLO, then answer with
                            ``accept(...)`` or ``refuse(...)``
    HeartbeatSeen()         the sender's HEARTBEAT arrived (for status)
    Handover(index)         the switchover checkpoint ``index`` is committed and
                            acknowledged: the daemon resumes the backup and
                            ends the session with ``close`` (its verdict)
    End(kind, message)      the session is over; always the last action, once

Session states (CORE_TABLE; ``_move`` is the one function that changes it)::

    state         event      new state     what happens
    handshake     hello      admitting     a whole, valid HELLO: Admit(hello)
    admitting     accept     initial-copy  ACCEPT sent; decoder and staging made
    initial-copy  committed  checkpoints   checkpoint 0 committed: ACK
    checkpoints   committed  checkpoints   checkpoint N committed: ACK
    checkpoints   handover   handover      N carried SWITCHOVER: ACK, Handover(N);
                                           input is ignored until the daemon's
                                           ``close`` (its verdict, as an ERROR)
    (any)         end        ended         End(kind, message), nothing big kept

End kinds: before admission ``bad-hello`` (REFUSE sent), ``timeout`` (no
HELLO within handshake-timeout), ``lost``, ``left``, ``refused`` (the
driver's refusal); from admission on ``admission`` (before ACCEPT),
``clean``, ``link-lost``, ``stalled``, ``violation``, ``corrupt``, ``closed``
(receiver.policy turns them into the Protection's next state).

The pages go into the backup through the ``Backup`` passed to ``accept``
(receiver.backup for a real Protection; a test's in-memory one): ``write``
for the initial copy's pages (checkpoint 0 goes straight into the paused
backup), ``commit`` for a checkpoint (staged pages, the checkpoint's save
records and context, at its CheckpointEnd), ``read`` for the bases of delta
pages. A delta page decodes in place on the receiver's own copy of its page,
as Xen's restore does: the decoder's base source is ``read`` (the backup's
committed pages) with the staged pages of a checkpoint the decoder has ended
but the core not yet committed laid over it (xenbind.stream.overlay; only
then, so the common case is one gather per COMPRESSED_DATA chunk).
``BackupClosed`` from any of them ends the session ``closed`` (after the
daemon's ERROR it carries, if the daemon closed the session meanwhile);
``DomainError`` ends it ``corrupt``.

Disks (a HELLO that names them, docs/disk.md): the DISK chunks' bytes are
the disk mirror stream, read here by a ``xenbind.diskstream`` decoder and
handed to the DiskSink given to ``accept``: ``disk_open`` at its header, ``disk_write`` for each
WRITE/ZERO (``direct`` in epoch 0, the initial sync, which goes straight to
the paused backup's disks as checkpoint 0's pages do; buffered in its epoch
after), ``disk_seal`` at each SEAL. Checkpoint N commits only once SEAL(N)
arrived (``CommitRequest.disk_epoch``: the Backup journals and applies disk
epoch N with checkpoint N's memory); a SEAL for any epoch but the
checkpoint being read, a tail before its SEAL, or a broken disk stream ends
the session ``violation``.

Save records: the VCPU_INFO, HVM parameter and TOOLSTACK chunks Xen's sender
writes in every checkpoint; the core keeps the last value of each for the
checkpoint being read and hands them to ``commit`` (``CommitRequest.records``,
a ``xenbind.hypervisor.SaveRecords``), never before.

Rules kept here:
- The core never touches a socket, a clock, a thread or a lock, and never
  calls the hypervisor: only its Backup does.
- A torn checkpoint is dropped: staged pages reach the Backup only at their
  checkpoint's CheckpointEnd, and are discarded at EOF or any other end.
- Events a failing feed decoded before the offending item are handled first:
  a checkpoint that arrived whole before garbage is still committed.
- Every Decoder cap comes from ``Limits`` (the configuration); the guest's
  size from the HELLO.
- Bad input from the peer never raises out of the core: it ends the session
  (End) with a clear message; only a bug does.
- An ended session holds nothing big: at End the decoder is closed and
  dropped, the staged pages and the last tail are dropped.
- A HEARTBEAT frame is due whenever nothing was sent for heartbeat-ms
  (``tick``); the initial copy ends ``stalled`` after stall-timeout without a
  byte or a commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from xenbind import diskstream as ds
from xenbind.blockhash import HashesMessage
from xenbind.compress import Rows
from xenbind.errors import DomainError, ProtocolError, RemusError, StreamError
from xenbind.session import (
    ERR_INTERNAL,
    ERR_PROTOCOL,
    ERR_STALLED,
    Accept,
    HandshakeError,
    Hello,
    HelloReceived,
    ReceiverSession,
    StreamBroken,
    StreamData,
    pick_wire,
)
from xenbind.stream import (
    CheckpointEnd,
    CodecAnnounce,
    Decoder,
    DiskData,
    EnableCompression,
    Header,
    Heartbeat,
    HvmParam,
    LastCheckpoint,
    MemoryDigest,
    Pages,
    Switchover,
    Tail,
    Toolstack,
    VcpuInfo,
    overlay,
)
from xenbind.stream.decoder import MalformedStream, TruncatedStream
from xenbind.stream.events import Event
from xenbind.stream.format import DEFAULT_MAX_DISK_CHUNK
from xenbind.types import Context, SaveRecords

from .staging import Staging

#: an item with at least this much still to come is received into the decoder's buffer
DIRECT_RECV_MIN = 64 << 10
#: the longest wait for a HELLO between two ticks (seconds)
HANDSHAKE_POLL_S = 0.5

HANDSHAKE = "handshake"
ADMITTING = "admitting"
INITIAL_COPY = "initial-copy"
CHECKPOINTS = "checkpoints"
HANDOVER = "handover"  # a switchover's checkpoint committed: the daemon's verdict awaited
ENDED = "ended"

CORE_TABLE: dict[tuple[str, str], str] = {
    (HANDSHAKE, "hello"): ADMITTING,
    (ADMITTING, "accept"): INITIAL_COPY,
    (INITIAL_COPY, "committed"): CHECKPOINTS,
    (CHECKPOINTS, "committed"): CHECKPOINTS,
    (CHECKPOINTS, "handover"): HANDOVER,
    (HANDSHAKE, "end"): ENDED,
    (ADMITTING, "end"): ENDED,
    (INITIAL_COPY, "end"): ENDED,
    (CHECKPOINTS, "end"): ENDED,
    (HANDOVER, "end"): ENDED,
}

STREAMING = (INITIAL_COPY, CHECKPOINTS)

#: End kinds that send the sender an ERROR frame, with its code
_ERROR_CODES = {"violation": ERR_PROTOCOL, "stalled": ERR_STALLED, "corrupt": ERR_INTERNAL}


# --- configuration and the backup ---------------------------------------------------


class Refusal(RemusError):
    """A HELLO the receiver will not serve (raised by the daemon's admission);
    ``code`` and ``reason`` go into the REFUSE frame."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What the configuration fixes for every session (receiver.config)."""

    max_pages: int
    max_staged_bytes: int
    max_compressed: int
    max_context: int
    max_device_model: int
    max_cache_pages: int
    heartbeat_ms: int
    handshake_timeout: float  # seconds
    stall_timeout: float  # seconds
    software: str = ""
    max_disk_write: int = ds.DEFAULT_MAX_WRITE  # one disk WRITE's data
    max_disk_chunk: int = DEFAULT_MAX_DISK_CHUNK  # one DISK chunk of the legacy stream
    max_disk_epoch_bytes: int = 1 << 30  # one disk epoch, records and heads
    #: take the second-stage wire compression a HELLO offers (xenbind.wirecomp)
    wire_compression: bool = True

    def accept_limits(self) -> dict[str, int]:
        return {
            "max_pages": self.max_pages,
            "max_staged_bytes": self.max_staged_bytes,
            "max_compressed": self.max_compressed,
            "max_context": self.max_context,
            "max_device_model": self.max_device_model,
            "max_cache_pages": self.max_cache_pages,
            "max_disk_write": self.max_disk_write,
            "max_disk_epoch_bytes": self.max_disk_epoch_bytes,
        }


class BackupClosed(RemusError):
    """The backup takes no more writes (it failed over, or was replaced).

    ``error``: the ERROR (code, reason) the daemon closed the session with,
    when it did. The backup can be closed by another thread while the core
    decodes; the core then sends that ERROR itself (the daemon's ``close``
    would come after the core ended): a sender that gets a bare EOF instead
    of "failed-over" takes it for a broken link and reconnects.
    """

    def __init__(self, message: str, error: tuple[int, str] | None = None) -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True)
class CommitRequest:
    """Checkpoint ``index`` arrived whole: write it into the backup."""

    index: int
    first: bool  # checkpoint 0: its pages are in the backup already (``write``)
    staging: Staging  # the checkpoint's pages (empty for checkpoint 0)
    context: Context
    digest: MemoryDigest | None  # verify mode: compare the backup's memory after
    pages: int  # checkpoint 0: the pages written by ``write``
    records: SaveRecords = SaveRecords()  # the checkpoint's save records (last of each)
    #: the sealed disk epoch that commits with it (a session with disks), else None
    disk_epoch: int | None = None


@dataclass(frozen=True)
class Committed:
    pages: int
    verified: bool = False
    mismatch: bool = False


class Backup(Protocol):
    def write(self, pfns: np.ndarray, data: np.ndarray) -> None:
        """Checkpoint 0's pages, straight into the paused backup."""

    def read(self, pfns: np.ndarray, out: np.ndarray) -> None:
        """The backup's current pages ``pfns`` into ``out[:len(pfns)]`` (the
        bases of delta pages); a PFN the backup has no memory at reads as
        zeros (a fresh page, as Xen's restore would allocate)."""

    def commit(self, req: CommitRequest) -> Committed:
        """Staged pages, save records and context, whole, with the disk epoch
        ``req.disk_epoch`` (journaled, then applied); then the digest check
        if asked."""


class DiskSink(Protocol):
    """Where a session's disk stream goes (a HELLO with disks)."""

    def disk_open(self, header: ds.Header) -> None:
        """The session's disk stream begins (its header, checked against the
        HELLO's disks)."""

    def disk_write(self, record: ds.Write | ds.Zero, direct: bool) -> None:
        """One disk record: ``direct`` (epoch 0) onto the backup's disks now,
        else kept in the open epoch until its checkpoint commits."""

    def disk_seal(self, seal: ds.Seal) -> None:
        """The open disk epoch is whole (epoch 0: the direct writes are made
        durable)."""


# --- actions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    data: bytes
    on_failure: str | None = None  # the End message if it cannot be sent; None: ignore


@dataclass(frozen=True)
class Admit:
    hello: Hello


@dataclass(frozen=True)
class HeartbeatSeen:
    pass


@dataclass(frozen=True)
class Handover:
    """The switchover checkpoint ``index`` (SWITCHOVER, the last) is committed
    and acknowledged: the daemon resumes the backup, then closes the session
    with its verdict (ERROR failed-over or switchover-failed)."""

    index: int


@dataclass(frozen=True)
class End:
    kind: str
    message: str


Action = Send | Admit | HeartbeatSeen | Handover | End


class _End(Exception):
    """Unwinds the handling of one input to its End (internal)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# --- the core ---------------------------------------------------------------------


class ReceiverCore:
    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.state = HANDSHAKE
        self.rs = ReceiverSession()
        self.hello: Hello | None = None
        self.decoder: Decoder | None = None  # from ACCEPT to the End
        self.staging: Staging | None = None
        self.backup: Backup | None = None
        self.last_committed: int | None = None
        self.disk: ds.Decoder | None = None  # a session with disks, from ACCEPT to the End
        self.disk_sink: DiskSink | None = None
        self._disk_epoch = 0  # the disk epoch the next SEAL closes
        self._disk_sealed: int | None = None  # the last disk epoch sealed
        self._now = now
        self._started = now
        self._last_sent = now
        self._last_life = now
        self._early = False  # stream bytes that came with the HELLO wait for after ACCEPT
        self._context: Context | None = None
        self._digest: MemoryDigest | None = None
        self._last_flag = False
        self._switchover = False  # SWITCHOVER in the checkpoint being read
        self._initial_pages = 0
        # the save records of the checkpoint being read (last value of each)
        self._params: dict[int, int] = {}
        self._vcpus: VcpuInfo | None = None
        self._toolstack: bytes | None = None
        self._out: list[Action] = []

    # ------------------------------------------------------------- the table

    def _move(self, event: str) -> None:
        new = CORE_TABLE.get((self.state, event))
        if new is None:
            raise ProtocolError(f"receiver core: {event!r} in state {self.state!r}")
        self.state = new

    @property
    def ended(self) -> bool:
        return self.state == ENDED

    # ------------------------------------------------------------- inputs

    def tick(self, now: float) -> list[Action]:
        """Time passed: a heartbeat when due, the handshake and stall timeouts."""
        self._now = now
        if self.state == HANDSHAKE and now - self._started >= self.limits.handshake_timeout:
            return self._end(
                "timeout", f"no complete HELLO within {self.limits.handshake_timeout:.1f} s; closed"
            )
        if self.state not in STREAMING:
            return []
        return self._run(self._tick)

    def next_wait(self, now: float) -> float:
        """Seconds the driver may wait for input before the next ``tick``."""
        if self.state == HANDSHAKE:
            left = self.limits.handshake_timeout - (now - self._started)
            return max(0.0, min(left, HANDSHAKE_POLL_S))
        if self.state in STREAMING:
            return max(0.0, self.limits.heartbeat_ms / 1000 - (now - self._last_sent))
        return HANDSHAKE_POLL_S

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Action]:
        if self.state == ENDED:
            return []
        if self.state == HANDSHAKE:
            return self._handshake_data(data)
        if self.state == ADMITTING:
            try:
                self.rs.feed(data)  # kept for after ACCEPT
            except ProtocolError as e:
                self._out.append(Send(self.rs.refuse("bad-hello", str(e))))
                return self._end("admission", f"refused during admission: {e}")
            return []
        return self._run(self._stream_data, data)

    def get_buffer(self) -> memoryview | None:
        """Where to receive the next bytes directly (a batch's page data goes
        straight into the decoder's buffer for it), or None: use receive_data."""
        if self.state not in STREAMING or self._early or self.decoder is None:
            return None
        if not self.rs.passthrough:
            return None
        buf = self.decoder.get_buffer(DIRECT_RECV_MIN)
        limit = self.rs.direct_limit  # wire compression: inside one raw segment only
        if buf is not None and limit is not None and limit < len(buf):
            return buf[:limit]
        return buf

    def buffer_updated(self, n: int) -> list[Action]:
        """``n`` bytes were received into ``get_buffer()``'s buffer."""
        return self._run(self._direct, n)

    def receive_eof(self) -> list[Action]:
        if self.state == HANDSHAKE:
            try:
                self.rs.eof()
            except ProtocolError as e:
                self._out.append(Send(self.rs.refuse("bad-hello", str(e))))
                return self._end("bad-hello", f"refused: {e}")
            return self._end("left", "closed before sending a HELLO")
        if self.state == ADMITTING:
            return self._end("admission", "peer left during admission (before ACCEPT)")
        if self.state in STREAMING:
            return self._run(self._eof)
        if self.state == HANDOVER:
            return self._end("link-lost", "connection closed after the switchover's checkpoint")
        return []

    def connection_lost(self, error: OSError) -> list[Action]:
        why = error.strerror or error
        if self.state == HANDSHAKE:
            return self._end("lost", f"connection lost during the handshake: {error}")
        if self.state == ADMITTING:
            return self._end("admission", f"peer left during admission (before ACCEPT): {why}")
        if self.state in STREAMING or self.state == HANDOVER:
            return self._end("link-lost", f"connection lost: {why}")
        return []

    def accept(
        self,
        failover_timeout_ms: int,
        backup: Backup,
        now: float,
        disk_hashes: list[HashesMessage] | None = None,
        disks: DiskSink | None = None,
    ) -> list[Action]:
        """The daemon admitted the HELLO and made the backup (which may have
        taken seconds, hence ``now``): ACCEPT. A HELLO with disks needs
        ``disk_hashes``: the backup disks' block hashes (DISK_HASHES frames
        after the ACCEPT, for the sender's initial sync) and ``disks``, where
        the disk stream goes."""
        hello = self.hello
        if self.state != ADMITTING or hello is None:
            raise ProtocolError(f"receiver core: accept in state {self.state!r}")
        lim = self.limits
        frame = self.rs.accept(
            Accept(
                session_id=hello.session_id,
                failover_timeout_ms=failover_timeout_ms,
                heartbeat_ms=lim.heartbeat_ms,
                limits=lim.accept_limits(),
                software=lim.software,
                switchover=True,  # this receiver resumes at a SWITCHOVER checkpoint
                disks=bool(hello.domain.disks),
                wire=pick_wire(hello.options.wire) if lim.wire_compression else "",
            )
        )
        if hello.domain.disks and (disk_hashes is None or disks is None):
            raise ProtocolError(
                "receiver core: a HELLO with disks is accepted with their hashes and sink"
            )
        self._move("accept")
        if hello.domain.disks:
            self.disk = ds.Decoder(max_write=lim.max_disk_write)
            self.disk_sink = disks
        self.decoder = Decoder(
            max_p2m_size=hello.domain.pages,
            max_compressed=lim.max_compressed,
            max_context=lim.max_context,
            max_device_model=lim.max_device_model,
            max_cache_pages=lim.max_cache_pages,
            max_toolstack=lim.max_context,  # a toolstack record is bounded as a context is
            max_disk_chunk=lim.max_disk_chunk,
            base=self._base,
        )
        self.staging = Staging(hello.domain.pages, lim.max_staged_bytes)
        self.backup = backup
        self._now = now
        self._last_life = now  # the stall clock starts now, not at the HELLO
        self._early = True
        out: list[Action] = [self._send(frame, "connection lost sending ACCEPT")]
        for msg in disk_hashes or ():
            out.append(self._send(self.rs.disk_hashes(msg), "connection lost sending DISK_HASHES"))
        return out

    def read_in_place(self, rows: np.ndarray) -> None:
        """The backup's committed memory (``rows``, (pages, 4096)) may be read
        in place: delta bases decode straight from it (the fused decode,
        xenbind.compress.Rows) instead of through ``Backup.read``. Only
        reads; pages still reach the backup only through ``commit``."""
        if self.decoder is not None:
            self.decoder.set_base(Rows(rows))

    def refuse(self, code: str, reason: str) -> list[Action]:
        """REFUSE the HELLO (the daemon's decision, or the TLS check's)."""
        if self.state not in (HANDSHAKE, ADMITTING):
            return []
        self._out.append(Send(self.rs.refuse(code, reason)))
        return self._end("refused", reason)

    def close(self, code: int, reason: str) -> list[Action]:
        """The daemon ends the session (failover, a newer session, shutdown):
        ERROR ``code`` once ACCEPT was sent, nothing before."""
        if self.state == HANDSHAKE:
            return self._end(
                "timeout", f"no complete HELLO within {self.limits.handshake_timeout:.1f} s; closed"
            )
        if self.state == ADMITTING:
            return self._end("admission", "closed by the receiver during admission (before ACCEPT)")
        if self.state in STREAMING or self.state == HANDOVER:
            self._out.append(Send(self.rs.error(code, reason)))
            return self._end("closed", "closed by the receiver")
        return []

    def fail(self, kind: str, message: str) -> list[Action]:
        """The driver ends the session for a reason of its own (kind as End)."""
        if self.state == ENDED:
            return []
        return self._finish(_End(kind, message))

    def internal_error(self) -> list[Action]:
        """A bug in the receiver: ERROR internal (once accepted), then End violation."""
        if self.state == ENDED:
            return []
        if self.state in STREAMING and self.rs.state == "streaming":
            self._out.append(Send(self.rs.error(ERR_INTERNAL, "internal error on the receiver")))
        return self._end("violation", "internal error on the receiver (see log)")

    def abandon(self) -> None:
        """The driver is done with this session, however it ended: free everything."""
        self._release()
        self.state = ENDED

    def send_failed(self, send: Send, error: OSError | None = None) -> list[Action]:
        """``send`` could not be written: the link is unusable. ``error`` is
        the socket's (named as ``connection_lost`` names it): a reset the send
        met first is consumed by it, and the log must still say it was a reset."""
        if send.on_failure is None:
            return []
        self._release()
        self.state = ENDED
        why = "" if error is None else f": {error.strerror or error}"
        return [End("link-lost", f"{send.on_failure}{why}")]

    # ------------------------------------------------------------- plumbing

    def _send(self, data: bytes, on_failure: str | None = None) -> Send:
        self._last_sent = self._now
        return Send(data, on_failure)

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _run(self, step: Callable[..., None], *args: object) -> list[Action]:
        """Handle one streaming input; an _End becomes the End action."""
        if self.state not in STREAMING:
            return []
        try:
            if self._early and self.state in STREAMING:
                self._early = False
                self._stream_data(b"")
            if self.state in STREAMING:  # (not once the early bytes made a Handover)
                step(*args)
        except _End as end:
            return self._finish(end)
        return self._take()

    def _end(self, kind: str, message: str) -> list[Action]:
        self._release()
        self._move("end")
        self._out.append(End(kind, message))
        return self._take()

    def _finish(self, end: _End) -> list[Action]:
        """The session's own end after ACCEPT: GOODBYE or ERROR, then End."""
        if self.rs.state == "streaming":  # else the daemon's ERROR went first
            if end.kind == "clean":
                self._out.append(Send(self.rs.goodbye(end.message)))
            elif end.kind in _ERROR_CODES:
                self._out.append(Send(self.rs.error(_ERROR_CODES[end.kind], end.message)))
        return self._end(end.kind, end.message)

    def _closed(self, e: BackupClosed, message: str) -> _End:
        """The backup was closed under the decoder: the daemon's ERROR goes
        out first (``_finish`` then adds none), the session ends ``closed``."""
        if e.error is not None and self.rs.state == "streaming":
            self._out.append(Send(self.rs.error(*e.error)))
        return _End("closed", message)

    def _release(self) -> None:
        """Nothing big outlives the session: the decoder's cache and buffers,
        the staged pages, the last tail."""
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        if self.staging is not None:
            self.staging.discard()
            self.staging = None
        self._context = None
        self._digest = None
        self._reset_records()
        self.backup = None
        self.disk = None
        self.disk_sink = None

    def _reset_records(self) -> None:
        self._params = {}
        self._vcpus = None
        self._toolstack = None

    # ------------------------------------------------------------- handshake

    def _handshake_data(self, data: bytes | bytearray | memoryview) -> list[Action]:
        try:
            events = self.rs.feed(data)
        except HandshakeError as e:
            self._out.append(Send(self.rs.refuse(e.code, str(e))))
            return self._end("bad-hello", f"refused: {e} (code {e.code})")
        except ProtocolError as e:
            self._out.append(Send(self.rs.refuse("bad-hello", str(e))))
            return self._end("bad-hello", f"refused: {e}")
        for ev in events:
            if isinstance(ev, HelloReceived):
                self.hello = ev.hello
                self._move("hello")
                return [Admit(ev.hello)]
        return []

    # ------------------------------------------------------------- stream

    def _tick(self) -> None:
        if self._now - self._last_sent >= self.limits.heartbeat_ms / 1000:
            self._out.append(
                self._send(
                    self.rs.heartbeat(self.last_committed),
                    # a frame may be half-written: the link is unusable
                    "cannot send to the sender (connection lost, or it stopped reading)",
                )
            )
        if self.state == INITIAL_COPY and self._now - self._last_life > self.limits.stall_timeout:
            raise _End(
                "stalled",
                f"the initial copy made no progress for {self.limits.stall_timeout:.0f} s",
            )

    def _stream_data(self, data: bytes | bytearray | memoryview) -> None:
        if len(data):
            self._last_life = self._now
        try:
            events = self.rs.feed(data)
        except StreamBroken as e:  # a bad wire segment: what came whole before it counts
            for broken in e.events:
                self._decode(broken.data)
                if self.state == HANDOVER:
                    return  # the switchover's checkpoint came whole; what follows is ignored
            raise _End("violation", f"wire compression: {e}") from None
        except ProtocolError as e:  # cannot happen after ACCEPT, but never crash
            raise _End("violation", str(e)) from None
        for sev in events:
            if isinstance(sev, StreamData):
                self._decode(sev.data)

    def _direct(self, n: int) -> None:
        self._last_life = self._now
        self.rs.streamed(n)
        self._decode(None, n)

    def _decode(self, data: bytes | bytearray | memoryview | None, n: int = 0) -> None:
        """One decoder step (feed(data), or buffer_updated(n)) and its events."""
        decoder = self.decoder
        if decoder is None:
            raise _End("violation", "stream data after the end")
        try:
            events = decoder.feed(data) if data is not None else decoder.buffer_updated(n)
        except MalformedStream as e:
            self._handle(e.events)  # what arrived whole before the offending item
            if self.state == HANDOVER:
                return  # the switchover's checkpoint came whole; what follows is ignored
            raise _End("violation", f"stream error at {e}") from None
        except StreamError as e:
            raise _End("violation", f"stream error at {e}") from None
        # from the base source (the decoder is dead: the session ends)
        except BackupClosed as e:
            raise self._closed(e, str(e)) from None
        except DomainError as e:
            raise _End("corrupt", f"cannot read the backup's pages: {e}") from None
        self._handle(events)

    def _base(self, pfns: np.ndarray, out: np.ndarray) -> None:
        """The decoder's base source: the backup's pages, with the staged
        pages laid over them while the decoder is past the checkpoint they
        belong to (it ended in the feed being decoded, not yet committed).
        Otherwise the staging holds the checkpoint being decoded, which lists
        a PFN at most once: nothing of it can be a base."""
        backup, staging, decoder = self.backup, self.staging, self.decoder
        if backup is None or staging is None or decoder is None:
            raise BackupClosed("the session is over")
        backup.read(pfns, out)
        staged_index = 0 if self.last_committed is None else self.last_committed + 1
        if staging.pages and decoder.checkpoints > staged_index:
            overlay(staging.batches, pfns, out)

    def _eof(self) -> None:
        decoder, staging = self.decoder, self.staging
        if decoder is None or staging is None:
            raise _End("link-lost", "connection closed")
        try:
            decoder.eof()
        except TruncatedStream as e:
            dropped = staging.pages
            staging.discard()
            raise _End(
                "link-lost",
                f"connection closed mid-stream ({e}; {dropped} staged pages "
                "of the torn checkpoint dropped)",
            ) from None
        except StreamError as e:
            raise _End("link-lost", f"connection closed: {e}") from None
        raise _End("link-lost", "connection closed between checkpoints")

    def _handle(self, events: list[Event]) -> None:
        hello, staging, backup = self.hello, self.staging, self.backup
        if not events or hello is None or staging is None or backup is None:
            return
        opts = hello.options
        beat = False
        for ev in events:
            if self.state == HANDOVER:
                break  # nothing after the switchover's checkpoint counts
            if isinstance(ev, Pages):
                if self.state == INITIAL_COPY:
                    try:
                        backup.write(ev.pfns, ev.data)
                    except BackupClosed as e:
                        raise self._closed(e, str(e)) from None
                    except DomainError as e:
                        raise _End("corrupt", f"cannot write the initial copy: {e}") from None
                    self._initial_pages += len(ev.pfns)
                else:
                    try:
                        staging.add(ev.pfns, ev.data)
                    except RemusError as e:
                        raise _End("violation", str(e)) from None
            elif isinstance(ev, Heartbeat):
                beat = True
            elif isinstance(ev, DiskData):
                self._disk_data(ev.data)
            elif isinstance(ev, Header):
                if ev.p2m_size != hello.domain.pages:
                    raise _End(
                        "violation",
                        f"stream header says {ev.p2m_size} pages, the "
                        f"HELLO said {hello.domain.pages}",
                    )
            elif isinstance(ev, Tail):
                self._context = ev.context
            elif isinstance(ev, MemoryDigest):
                self._digest = ev
            elif isinstance(ev, LastCheckpoint):
                self._last_flag = True
            elif isinstance(ev, Switchover):
                self._switchover = True  # the decoder checks it stands beside LAST_CHECKPOINT
            elif isinstance(ev, HvmParam):
                self._params[ev.index] = ev.value
            elif isinstance(ev, VcpuInfo):
                self._vcpus = ev
            elif isinstance(ev, Toolstack):
                self._toolstack = ev.data
            elif isinstance(ev, CodecAnnounce | EnableCompression):
                if opts.codec == "none" or ev.codec != opts.codec:
                    raise _End(
                        "violation",
                        f"stream switches to codec {ev.codec}, the HELLO said {opts.codec}",
                    )
            elif isinstance(ev, CheckpointEnd):
                self._commit(ev, backup, staging)
        self._last_life = self._now
        if beat and self.state != HANDOVER:  # (Handover stays the last action)
            self._out.append(HeartbeatSeen())

    def _disk_data(self, data: bytes) -> None:
        """A DISK chunk: its records to the DiskSink (module docstring, Disks)."""
        hello, sink = self.hello, self.disk_sink
        if self.disk is None or hello is None or sink is None:
            raise _End("violation", "DISK chunk in a session whose HELLO named no disks")
        try:
            records = self.disk.feed(data)
        except ds.DiskStreamError as e:
            raise _End("violation", f"disk stream error at {e}") from None
        reading = 0 if self.last_committed is None else self.last_committed + 1
        try:
            for rec in records:
                if isinstance(rec, ds.Header):
                    if rec.disk_sizes != hello.domain.disks or rec.first_epoch != 0:
                        raise _End(
                            "violation",
                            f"disk stream header names disks {list(rec.disk_sizes)} from "
                            f"epoch {rec.first_epoch}; the HELLO said {list(hello.domain.disks)} "
                            "from epoch 0",
                        )
                    sink.disk_open(rec)
                elif isinstance(rec, ds.Seal):
                    if rec.epoch != reading:
                        raise _End(
                            "violation",
                            f"disk SEAL({rec.epoch}) while checkpoint {reading} is being read "
                            "(a checkpoint's disk epoch is sealed before its body)",
                        )
                    sink.disk_seal(rec)
                    self._disk_sealed = rec.epoch
                    self._disk_epoch = rec.epoch + 1
                else:
                    sink.disk_write(rec, self._disk_epoch == 0)
        except BackupClosed as e:
            raise self._closed(e, str(e)) from None
        except RemusError as e:  # the disk buffer's rules (count, CRC, epoch bound)
            raise _End("violation", f"disk stream: {e}") from None
        except OSError as e:
            raise _End("corrupt", f"cannot keep the disk stream: {e}") from None

    def _commit(self, end: CheckpointEnd, backup: Backup, staging: Staging) -> None:
        context = self._context
        if context is None:  # the decoder yields a Tail before every CheckpointEnd
            raise _End("violation", f"checkpoint {end.index} ended without a tail")
        disk_epoch = None
        if self.disk is not None:
            if self._disk_sealed != end.index:
                raise _End(
                    "violation",
                    f"checkpoint {end.index} ended before its disk epoch's SEAL({end.index})",
                )
            disk_epoch = end.index
        first = self.state == INITIAL_COPY
        vcpus = self._vcpus
        records = SaveRecords(
            hvm_params=self._params,
            max_vcpu_id=vcpus.max_vcpu_id if vcpus is not None else None,
            vcpumap=vcpus.vcpumap if vcpus is not None else b"",
            toolstack=self._toolstack,
        )
        req = CommitRequest(
            end.index,
            first,
            staging,
            context,
            self._digest,
            self._initial_pages,
            records,
            disk_epoch,
        )
        try:
            done = backup.commit(req)
        except BackupClosed as e:
            staging.discard()
            raise self._closed(e, f"{e}; checkpoint {end.index} dropped") from None
        except (DomainError, OSError) as e:
            raise _End(
                "corrupt", f"commit of checkpoint {end.index} failed half-way: {e}"
            ) from None
        staging.discard()  # (the Backup's commit emptied it already)
        self._digest = None
        self._reset_records()
        self._move("committed")
        self.last_committed = end.index
        self._last_life = self._now
        self._out.append(
            self._send(
                self.rs.ack(end.index, verified=done.verified, mismatch=done.mismatch),
                f"connection lost sending ACK({end.index})",
            )
        )
        if self._last_flag and self._switchover:
            self._move("handover")
            self._out.append(Handover(end.index))
        elif self._last_flag:
            raise _End("clean", f"LAST_CHECKPOINT: protection ended after checkpoint {end.index}")
