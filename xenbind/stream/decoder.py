"""Incremental stream decoder, sans-IO: bytes in (split anywhere), events out.

    d = Decoder(max_p2m_size=..., max_compressed=..., max_context=...,
                max_device_model=..., max_cache_pages=..., max_toolstack=...,
                base=base)           # base(pfns, out): the user's pages (below)
    for ev in d.feed(data): ...      # any split of the stream, any number of calls
    d.eof()                          # the peer closed: clean end, or TruncatedStream
    d.close()                        # optional: drop the codec cache and buffers now

The layout and every rule checked are in ``xenbind.stream.format``. What this
module adds:

* Errors. A broken rule raises ``MalformedStream`` (a ``StreamError``) whose
  ``offset`` is the absolute byte offset of the offending item: the chunk for a
  bad chunk type, batch size, COMPRESSED_DATA length or content, misplaced tag
  or short Format B body; the PFN entry for a bad entry; the length field for
  an over-long tail record; the signature for a wrong device-model signature.
  ``.events`` holds the events decoded in that ``feed`` call before the error
  (a checkpoint completed before the error is still there to commit). After an
  error the decoder is dead: every later call raises the same error again (same
  type, offset and reason; a fresh instance with no ``events``, as that call
  decoded nothing).
* Truncation. ``eof()`` returns quietly when the stream ends between
  checkpoints (or right after the header, or after the LAST_CHECKPOINT one),
  and raises ``TruncatedStream`` otherwise; its ``torn_checkpoint`` is the
  index of the checkpoint cut short (None when the header itself is cut) and
  ``checkpoints`` the number that arrived whole.
* Memory. At most one item is buffered: a PFN array (8 KiB), one Format A
  batch's pages (<= 4 MiB), one COMPRESSED_DATA payload (<= max_compressed,
  checked before any byte of it is buffered), one tail record (<= its cap).
  Per Format B body the decoder also keeps a bitmap of p2m_size bytes and the
  listed-but-not-yet-decoded PFNs (<= 8 bytes per guest page). No codec
  state spans checkpoints (no page cache: see "Bases"); a TOOLSTACK record is
  capped by max_toolstack, VCPU_INFO by MAX_VCPUS.
  A COMPRESSED_DATA payload's buffer grows with the bytes that actually arrive
  (never past the claimed length): it starts at what the current ``feed``
  holds (at least ``GROW_MIN``) and grows ``GROW_FACTOR``-fold when full, so
  a peer that claims 64 MiB and sends 100 bytes costs 64 KiB, the buffer
  stays within GROW_FACTOR times what arrived (or GROW_MIN), and the copies
  made growing it total less than 4/3 of the payload (linear, not
  quadratic). A payload that arrives in one ``feed`` is allocated once, at
  its size.
* Freeing. A Decoder holds no reference to itself (the handler of the item
  being read is a plain function, called with the decoder; the error kept for
  later calls has no traceback), so a dropped Decoder and its buffers are
  freed by reference counting at once, not at Python's next cyclic
  collection. When the decoder raises it drops the Decompressor, the buffers
  and the per-body state at once (it is dead). ``eof()`` is a probe that
  changes nothing (the decoder may be fed on), so it frees nothing; the
  Decompressor goes as soon as the LAST_CHECKPOINT checkpoint completes
  (nothing may follow it), and ``close()`` drops everything of a decoder its
  caller keeps but is done with.
* Codec. ENABLE_COMPRESSION makes a ``xenbind.compress.Decompressor`` for
  the announced codec (default "xen"; the cache size the stream announces is
  reported, and bounded by max_cache_pages, but the receiver keeps no cache:
  any sender's cache size or eviction decodes).
* Bases. A delta page decodes in place on the user's copy of its page, as
  Xen's restore does: for each COMPRESSED_DATA chunk the decoder calls
  ``base(pfns, out)`` once, with the PFNs of the chunk's delta pages (uint64,
  in blob order) and a C-contiguous (len(pfns), 4096) uint8 array to fill
  with the user's copy of each: the latest page it holds for that PFN among
  everything EARLIER ``feed``/``buffer_updated`` calls returned, committed
  or staged (the page staged in the checkpoint it has not committed yet,
  else its committed page; ``overlay`` lays staged pages over committed
  ones). Pages of checkpoints that ended within the current call, which the
  user has not seen yet, the decoder lays over that itself. A PFN is listed
  at most once per Format B body, so the base is always the page as of the
  end of the previous checkpoint, as in Xen's restore, which applies a
  checkpoint only once it arrived whole. A ``base`` that is memory the codec
  reads in place (``xenbind.compress.Rows``: it has ``base_rows``) is handed
  to the codec as it is, the pages of checkpoints completed in the current
  call laid over it (one pass, no gather). Without ``base`` (None) a delta page
  does not decode (a MalformedStream at its chunk). Whatever ``base`` raises
  (the backup failed over, cannot be read) propagates out of ``feed``
  unchanged, and the decoder is dead from then on (later calls raise a
  MalformedStream saying so).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..errors import CodecError, StreamError
from ..types import Context, PageArray, PfnArray
from . import events as ev
from .format import (
    CODEC_NAMES,
    DEFAULT_MAX_CACHE_PAGES,
    DEFAULT_MAX_COMPRESSED,
    DEFAULT_MAX_CONTEXT,
    DEFAULT_MAX_DEVICE_MODEL,
    DEFAULT_MAX_DISK_CHUNK,
    DEFAULT_MAX_P2M_SIZE,
    DEFAULT_MAX_TOOLSTACK,
    DEVICE_MODEL_SIGNATURE,
    DIGEST_ALGORITHMS,
    DISK_LENGTH_SIZE,
    HVM_PARAM_OF_TAG,
    HVM_PARAM_SIZE,
    LEGACY_CACHE_PAGES,
    LEGACY_CODEC,
    MAX_BATCH,
    MAX_VCPUS,
    PAGE_SIZE,
    PFN_MASK,
    TAG_CODEC,
    TAG_COMPRESSED_DATA,
    TAG_DISK,
    TAG_ENABLE_COMPRESSION,
    TAG_HEARTBEAT,
    TAG_LAST_CHECKPOINT,
    TAG_MEMORY_DIGEST,
    TAG_NAMES,
    TAG_SWITCHOVER,
    TAG_TOOLSTACK,
    TAG_TSC_INFO,
    TAG_VCPU_INFO,
    TOOLSTACK_LENGTH_SIZE,
    TYPE_HAS_DATA,
    TYPE_VALID,
    TYPE_XTAB,
    VCPU_INFO_HEADER_SIZE,
    vcpumap_size,
)

if TYPE_CHECKING:  # imported on first use at run time (the codec's C kernel)
    from ..compress import Decompressor

#: What the decoder decodes delta pages against (see "Bases"):
#: ``base(pfns, out)`` fills out[i] with the user's copy of page pfns[i].
BaseSource = Callable[[PfnArray, PageArray], None]

_INT = struct.Struct("<i")
_UINT = struct.Struct("<I")
_ULONG = struct.Struct("<Q")
_TSC = struct.Struct("<IQII")
_II = struct.Struct("<II")
_HVM_PARAM = struct.Struct("<IQ")  # padding, value

#: The least a growing COMPRESSED_DATA buffer starts with (bytes); it is
#: also about the most a claim costs before its bytes arrive.
GROW_MIN = 64 << 10
#: A growing buffer's new size is at least this times the old one. Every
#: buffer but the last is smaller than the payload and each is at most
#: 1/GROW_FACTOR of the next, so growing copies less than 4/3 of the payload
#: in all (2 would copy up to twice it: +17% decode time on 32 MiB payloads
#: fed in 1 MiB pieces, against +6% for 4), and a buffer stays within 4x the
#: bytes at hand (np.empty does not touch it: only what is written is resident).
GROW_FACTOR = 4


class MalformedStream(StreamError):
    """The stream broke a rule. ``events``: what the failing ``feed`` call
    decoded before the offending item."""

    def __init__(self, offset: int, reason: str, events: list[ev.Event] | None = None) -> None:
        super().__init__(offset, reason)
        self.events: list[ev.Event] = events if events is not None else []


class TruncatedStream(StreamError):
    """The stream ended inside an item. ``torn_checkpoint``: the index of the
    checkpoint cut short, or None if the header was; ``checkpoints``: how many
    arrived whole."""

    def __init__(
        self, offset: int, reason: str, torn_checkpoint: int | None, checkpoints: int
    ) -> None:
        super().__init__(offset, reason)
        self.torn_checkpoint = torn_checkpoint
        self.checkpoints = checkpoints


class _PfnFifo:
    """Data-carrying PFNs listed in a Format B body and not yet decoded."""

    def __init__(self) -> None:
        self._parts: deque[PfnArray] = deque()
        self._head = 0  # entries of _parts[0] already taken
        self.count = 0

    def push(self, pfns: PfnArray) -> None:
        if len(pfns):
            self._parts.append(pfns)
            self.count += len(pfns)

    def peek(self, n: int) -> PfnArray:
        """The next ``n`` PFNs (n <= count); copies at most n entries."""
        first = self._parts[0][self._head :]
        if len(first) >= n:
            return first[:n]
        got = [first]
        have = len(first)
        for part in list(self._parts)[1:]:
            if have >= n:
                break
            got.append(part[: n - have])
            have += len(got[-1])
        return np.concatenate(got)

    def pop(self, k: int) -> None:
        self.count -= k
        while k:
            avail = len(self._parts[0]) - self._head
            if k >= avail:
                self._parts.popleft()
                self._head = 0
                k -= avail
            else:
                self._head += k
                k = 0

    def clear(self) -> None:
        self._parts.clear()
        self._head = 0
        self.count = 0


#: What reads a completed item: a plain function of the Decoder and the item's
#: buffer (``Decoder._on_*``, unbound: a bound method kept in the decoder
#: would make a reference cycle).
Handler = Callable[["Decoder", Any], None]


def _again(err: StreamError) -> StreamError:
    """A fresh copy of ``err`` (type, message, offset, reason, ...) with no
    traceback and no ``events``: what a dead decoder raises on later calls.
    A fresh instance, so the one kept never gets a traceback, whose frames
    would hold the decoder (a cycle) and the caller's buffers."""
    cls = type(err)
    out = cls.__new__(cls)
    out.args = err.args
    out.__dict__.update(err.__dict__)
    if isinstance(out, MalformedStream):
        out.events = []
    return out


class Decoder:
    """The incremental decoder. Read-only attributes for callers:

    ``offset``      bytes parsed into complete items so far
    ``received``    bytes fed so far
    ``p2m_size``    from the header (None before it)
    ``checkpoints`` number of checkpoints that arrived whole
    ``format``      "A" or "B": the format of the body being read
    ``codec``       the Format B codec once compression is enabled, else None
    ``cache_pages`` the cache size the stream announced (or Xen's 8192) once
                    compression is enabled, else None: reported, not needed
    ``last``        True once a LAST_CHECKPOINT checkpoint completed
    """

    def __init__(
        self,
        *,
        max_p2m_size: int = DEFAULT_MAX_P2M_SIZE,
        max_compressed: int = DEFAULT_MAX_COMPRESSED,
        max_context: int = DEFAULT_MAX_CONTEXT,
        max_device_model: int = DEFAULT_MAX_DEVICE_MODEL,
        max_cache_pages: int = DEFAULT_MAX_CACHE_PAGES,
        max_toolstack: int = DEFAULT_MAX_TOOLSTACK,
        max_disk_chunk: int = DEFAULT_MAX_DISK_CHUNK,
        base: BaseSource | None = None,
    ) -> None:
        self.max_p2m_size = min(max_p2m_size, PFN_MASK + 1)
        self.max_compressed = max_compressed
        self.max_context = max_context
        self.max_device_model = max_device_model
        self.max_cache_pages = max_cache_pages
        self.max_toolstack = max_toolstack
        self.max_disk_chunk = max_disk_chunk
        self._base_source = base

        self.received = 0
        self.offset = 0
        self.p2m_size: int | None = None
        self.checkpoints = 0
        self.format = "A"
        self.codec: str | None = None
        self.cache_pages: int | None = None
        self.last = False

        self._events: list[ev.Event] = []
        self._error: StreamError | None = None  # kept without traceback: see _again
        self._closed = False  # close() was called
        self._chunk_start = 0  # offset of the chunk being read
        # the item being read: _want bytes into _dest (through _view, of
        # _cap bytes: less than _want while a growing buffer fills), _have so far
        self._want = 0
        self._have = 0
        self._cap = 0
        self._dest: bytearray | npt.NDArray[np.uint8] = bytearray()
        self._view = memoryview(self._dest)
        self._handler: Handler = Decoder._on_header
        self._what = ""
        # the checkpoint being read
        self._started = False  # a chunk other than HEARTBEAT was seen
        self._pages = 0  # page contents received in this checkpoint
        self._last_here = False  # LAST_CHECKPOINT in this body
        self._switchover_here = False  # SWITCHOVER in this body
        self._announced: tuple[str, int] | None = None
        self._enabled = False  # ENABLE_COMPRESSION seen
        self._decompressor: Decompressor | None = None
        # Pages of this call, not yet seen by the user (see "Bases"): of the
        # checkpoint being read, and of checkpoints completed in this call
        self._call_pages: list[ev.Pages] = []
        self._fresh: list[ev.Pages] = []
        self._vcpu_max = 0  # a VCPU_INFO's max_vcpu_id, until its map arrives
        self._param_tag = 0  # the HVM parameter tag being read
        # Format B body state
        self._seen: npt.NDArray[np.bool_] | None = None
        self._listed: list[PfnArray] = []
        self._pending = _PfnFifo()
        self._batch_pfns: PfnArray | None = None
        # tail pieces
        self._magic: tuple[int, int, int] = (0, 0, 0)
        self._hvm_context = b""

        self._expect(8, Decoder._on_header, "the header")

    # ------------------------------------------------------------------ driver

    def feed(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """Consume ``data`` (any piece of the stream); return the events it completes."""
        if self._error is not None:
            raise _again(self._error)
        if self._closed:
            raise ValueError("feed() on a closed Decoder")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        events: list[ev.Event] = []
        self._events = events
        self._call_pages = []
        self._fresh = []
        n = len(mv)
        i = 0
        try:
            while True:
                if self._have == self._want:
                    self.offset = self.received
                    self._handler(self, self._dest)
                    continue
                if i >= n:
                    break
                take = min(self._want - self._have, n - i)
                if self._have + take > self._cap:
                    self._grow(n - i)
                self._view[self._have : self._have + take] = mv[i : i + take]
                self._have += take
                self.received += take
                i += take
        except MalformedStream as e:
            e.events = events
            self._die(e)
            raise
        finally:
            self._events = []
            self._call_pages = []
            self._fresh = []
        return events

    # ------------------------------------------------------------ direct receive

    def get_buffer(self, least: int = 1) -> memoryview | None:
        """Where the next stream bytes may be written directly, skipping the
        copy ``feed`` makes (asyncio's BufferedProtocol, without the I/O).

        A writable view of the rest of the item being read, when the decoder
        already holds a buffer of the item's whole length (a batch's page
        data) and at least ``least`` bytes of it are still to come; else None.
        The caller writes ``n`` bytes at the view's start (``recv_into``) and
        calls ``buffer_updated(n)`` before any other call."""
        if self._error is not None or self._closed:
            return None
        left = self._want - self._have
        if left < max(1, least) or self._cap < self._want:
            return None
        return self._view[self._have : self._want]

    def buffer_updated(self, n: int) -> list[ev.Event]:
        """``n`` bytes were written at the start of the view ``get_buffer``
        returned: the events they complete (as ``feed`` returns them)."""
        if self._error is not None:
            raise _again(self._error)
        if not 0 <= n <= min(self._want, self._cap) - self._have:
            raise ValueError(
                f"buffer_updated({n}) with {self._want - self._have} bytes of the item to come"
            )
        self._have += n
        self.received += n
        return self.feed(b"")

    def eof(self) -> None:
        """The stream ended. Quiet if it ended between checkpoints; otherwise
        ``TruncatedStream`` saying where and which checkpoint is torn.

        A probe: it does not disturb the decoder, which may be fed on (the
        tests call it after every byte). A caller done with the decoder drops
        it or calls ``close()``."""
        if self._error is not None:
            raise _again(self._error)
        if self.last and self._have == 0:
            return
        if self.p2m_size is None:
            raise TruncatedStream(
                self.received,
                f"stream ends inside the header ({self._have} of 8 bytes)",
                None,
                0,
            )
        if self._handler is Decoder._on_chunk_type and self._have == 0 and not self._started:
            return
        idx = self.checkpoints
        where = (
            f"before {self._what}"
            if self._have == 0
            else f"inside {self._what} ({self._have} of {self._want} bytes)"
        )
        raise TruncatedStream(
            self.received,
            f"stream ends {where}: checkpoint {idx} is torn, {self.checkpoints} arrived whole",
            idx,
            self.checkpoints,
        )

    def _die(self, err: StreamError) -> None:
        """``err`` is being raised: keep a traceback-free copy for later
        calls and drop everything the dead decoder no longer needs."""
        self._error = _again(err)
        self._release()

    def close(self) -> None:
        """The caller is done with this decoder (the session ended): drop the
        Decompressor and every buffer now. Later ``feed`` calls raise; later
        ``eof`` calls answer as before ``close``. Idempotent."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Drop everything a finished decoder holds: the codec state and the
        item buffer (``_want``, ``_have`` stay: ``eof()`` reports them). Only
        once no ``feed`` will run again: the decoder raised, or ``close()``."""
        self._release_codec()
        self._dest = bytearray()
        self._view = memoryview(self._dest)
        self._cap = 0
        self._batch_pfns = None
        self._hvm_context = b""

    def _release_codec(self) -> None:
        """Drop the Decompressor, the base source and the Format B body state
        (a bitmap of p2m_size bytes, the listed PFNs). Also done when the
        LAST_CHECKPOINT checkpoint completes: any byte after it is an error,
        so no page will be decoded again."""
        self._decompressor = None
        self._base_source = None
        self._seen = None
        self._listed = []
        self._pending = _PfnFifo()

    # ----------------------------------------------------------------- helpers

    def _expect(
        self,
        n: int,
        handler: Handler,
        what: str,
        dest: bytearray | npt.NDArray[np.uint8] | None = None,
        *,
        grow: bool = False,
    ) -> None:
        """Read the next ``n`` bytes into ``dest`` (a fresh bytearray by
        default), then call ``handler(self, dest)``. ``grow``: no buffer yet;
        ``_grow`` makes a uint8 array that grows to ``n`` as bytes arrive."""
        if grow:
            dest = np.empty(0, np.uint8)
        elif dest is None:
            dest = bytearray(n)
        self._dest = dest
        # (.data: memoryview(array); numpy types the buffer protocol for 3.12+ only)
        self._view = dest.reshape(-1).data if isinstance(dest, np.ndarray) else memoryview(dest)
        self._cap = len(self._view)
        self._want = n
        self._have = 0
        self._handler = handler
        self._what = what

    def _grow(self, arriving: int) -> None:
        """Make room in the growing buffer: ``arriving`` bytes are at hand in
        this ``feed``. The new size is at least GROW_FACTOR times the old
        one (so the copies stay linear), at least what is at hand, at least
        GROW_MIN, and never more than the item's length."""
        have = self._have
        size = min(self._want, max(GROW_FACTOR * self._cap, have + arriving, GROW_MIN))
        # np.empty, not bytearray(size): no zero-fill, and numpy backs a
        # large buffer with huge pages (fresh 4 KiB pages cost more than the copy)
        dest = np.empty(size, np.uint8)
        dest[:have] = self._dest[:have]
        self._dest = dest
        self._view = dest.data
        self._cap = size

    def _fail(self, offset: int, reason: str) -> MalformedStream:
        return MalformedStream(offset, reason)

    def _emit(self, event: ev.Event) -> None:
        self._events.append(event)

    def _expect_chunk(self) -> None:
        self._chunk_start = self.received
        self._expect(4, Decoder._on_chunk_type, "a chunk type")

    def _ckpt(self) -> str:
        return f"checkpoint {self.checkpoints}"

    # ----------------------------------------------------------------- handlers

    def _on_header(self, buf: bytearray) -> None:
        (p2m,) = _ULONG.unpack(buf)
        if p2m == 0:
            raise self._fail(0, "header: p2m_size is 0")
        if p2m > self.max_p2m_size:
            raise self._fail(
                0, f"header: p2m_size {p2m} exceeds the limit of {self.max_p2m_size} pages"
            )
        self.p2m_size = p2m
        self._emit(ev.Header(p2m))
        self._expect_chunk()

    def _on_chunk_type(self, buf: bytearray) -> None:
        (t,) = _INT.unpack(buf)
        at = self._chunk_start
        if t == TAG_HEARTBEAT:
            self._emit(ev.Heartbeat())
            self._expect_chunk()
            return
        if t == TAG_DISK:  # like HEARTBEAT, anywhere a chunk may start
            self._expect(DISK_LENGTH_SIZE, Decoder._on_disk_length, "a DISK length")
            return
        self._started = True
        if t > 0:
            if t > MAX_BATCH:
                raise self._fail(
                    at, f"{self._ckpt()}: batch of {t} pages exceeds the maximum of {MAX_BATCH}"
                )
            self._expect(8 * t, Decoder._on_pfns, "the PFN array of a batch")
        elif t == 0:
            self._on_end_body()
        elif t == TAG_TSC_INFO:
            self._expect(_TSC.size, Decoder._on_tsc, "a TSC_INFO chunk")
        elif t == TAG_LAST_CHECKPOINT:
            self._last_here = True
            self._emit(ev.LastCheckpoint())
            self._expect_chunk()
        elif t == TAG_SWITCHOVER:
            if self._switchover_here:
                raise self._fail(at, f"a second SWITCHOVER in {self._ckpt()}")
            self._switchover_here = True
            self._emit(ev.Switchover())
            self._expect_chunk()
        elif t == TAG_COMPRESSED_DATA:
            if not self._enabled:
                raise self._fail(at, "COMPRESSED_DATA before ENABLE_COMPRESSION")
            if self.format != "B":
                raise self._fail(
                    at,
                    f"COMPRESSED_DATA in the Format A body of {self._ckpt()} "
                    "(compression starts with the body after ENABLE_COMPRESSION)",
                )
            self._expect(8, Decoder._on_compressed_length, "a COMPRESSED_DATA length")
        elif t == TAG_ENABLE_COMPRESSION:
            self._on_enable_compression()
        elif t == TAG_CODEC:
            if self._enabled:
                raise self._fail(at, "CODEC after ENABLE_COMPRESSION")
            if self._announced is not None:
                raise self._fail(at, "CODEC announced twice")
            self._expect(8, Decoder._on_codec, "a CODEC chunk")
        elif t == TAG_MEMORY_DIGEST:
            self._expect(8, Decoder._on_digest_header, "a MEMORY_DIGEST chunk")
        elif t in HVM_PARAM_OF_TAG:
            self._param_tag = t
            self._expect(HVM_PARAM_SIZE, Decoder._on_hvm_param, f"a {TAG_NAMES[t]} chunk")
        elif t == TAG_VCPU_INFO:
            self._expect(VCPU_INFO_HEADER_SIZE, Decoder._on_vcpu_header, "a VCPU_INFO chunk")
        elif t == TAG_TOOLSTACK:
            self._expect(TOOLSTACK_LENGTH_SIZE, Decoder._on_toolstack_length, "a TOOLSTACK length")
        elif t in TAG_NAMES:
            raise self._fail(at, f"unsupported chunk type {t} ({TAG_NAMES[t]})")
        else:
            raise self._fail(at, f"unknown chunk type {t}")

    def _on_pfns(self, buf: bytearray) -> None:
        raw = np.frombuffer(buf, dtype="<u8")
        base = self._chunk_start + 4
        p2m = self.p2m_size
        assert p2m is not None
        ckpt = self._ckpt()
        high = raw >> np.uint64(32)
        if high.any():
            i = int(np.argmax(high != 0))
            raise self._fail(base + 8 * i, f"{ckpt}: PFN entry {int(raw[i]):#x} has bits 32-63 set")
        types = ((raw >> np.uint64(28)) & np.uint64(0xF)).astype(np.uint8)
        valid = TYPE_VALID[types]
        if not valid.all():
            i = int(np.argmin(valid))
            raise self._fail(
                base + 8 * i,
                f"{ckpt}: PFN entry {int(raw[i]):#x} has invalid page type {types[i]:#x}",
            )
        pfns = raw & np.uint64(PFN_MASK)
        named = types != TYPE_XTAB
        all_named = bool(named.all())
        where = np.arange(len(pfns)) if all_named else np.flatnonzero(named)
        pn = pfns if all_named else pfns[named]
        over = pn >= np.uint64(p2m)
        if over.any():
            i = int(where[np.argmax(over)])
            raise self._fail(
                base + 8 * i, f"{ckpt}: PFN {int(pfns[i]):#x} is not below p2m_size {p2m:#x}"
            )
        if len(pn) > 1:
            order = np.argsort(pn, kind="stable")
            s = pn[order]
            same = s[1:] == s[:-1]
            if same.any():
                j = int(np.argmax(same))
                i = int(where[order[j + 1]])
                raise self._fail(
                    base + 8 * i, f"{ckpt}: PFN {int(pfns[i]):#x} appears twice in one batch"
                )
        if self.format == "B":
            assert self._seen is not None
            again = self._seen[pn]
            if again.any():
                i = int(where[np.argmax(again)])
                raise self._fail(
                    base + 8 * i,
                    f"{ckpt}: PFN {int(pfns[i]):#x} listed twice in one Format B body",
                )
            self._seen[pn] = True
            self._listed.append(pn)
        self._emit(ev.PageBatch(pfns, types))
        has_data = TYPE_HAS_DATA[types]
        data_pfns = pfns if has_data.all() else pfns[has_data]
        if self.format == "B":
            self._pending.push(data_pfns)
            self._expect_chunk()
        elif len(data_pfns):
            self._batch_pfns = data_pfns
            dest = np.empty((len(data_pfns), PAGE_SIZE), dtype=np.uint8)
            self._expect(
                len(data_pfns) * PAGE_SIZE, Decoder._on_page_data, "the page data of a batch", dest
            )
        else:
            self._expect_chunk()

    def _on_page_data(self, pages: PageArray) -> None:
        assert self._batch_pfns is not None
        event = ev.Pages(self._batch_pfns, pages)
        self._emit(event)
        self._call_pages.append(event)
        self._pages += len(pages)
        self._batch_pfns = None
        self._expect_chunk()

    def _on_tsc(self, buf: bytearray) -> None:
        self._emit(ev.TscInfo(*_TSC.unpack(buf)))
        self._expect_chunk()

    def _on_enable_compression(self) -> None:
        at = self._chunk_start
        if self._enabled:
            raise self._fail(at, "ENABLE_COMPRESSION sent twice")
        codec, cache = self._announced or (LEGACY_CODEC, LEGACY_CACHE_PAGES)
        from ..compress import Decompressor

        self._decompressor = Decompressor(codec)
        self._enabled = True
        self.codec, self.cache_pages = codec, cache
        self._emit(ev.EnableCompression(codec, cache))
        self._expect_chunk()

    def _on_codec(self, buf: bytearray) -> None:
        codec_id, cache = _II.unpack(buf)
        at = self._chunk_start
        if codec_id not in CODEC_NAMES:
            raise self._fail(at, f"CODEC: unknown codec id {codec_id}")
        if not 1 <= cache <= self.max_cache_pages:
            raise self._fail(
                at, f"CODEC: cache of {cache} pages is outside 1..{self.max_cache_pages}"
            )
        self._announced = (CODEC_NAMES[codec_id], cache)
        self._emit(ev.CodecAnnounce(CODEC_NAMES[codec_id], cache))
        self._expect_chunk()

    def _on_hvm_param(self, buf: bytearray) -> None:
        _pad, value = _HVM_PARAM.unpack(buf)  # the padding is ignored, as Xen's restore does
        tag = self._param_tag
        self._emit(ev.HvmParam(tag, HVM_PARAM_OF_TAG[tag], value))
        self._expect_chunk()

    def _on_vcpu_header(self, buf: bytearray) -> None:
        (max_id,) = _INT.unpack(buf)
        if not 0 <= max_id < MAX_VCPUS:
            raise self._fail(
                self._chunk_start, f"VCPU_INFO: max_vcpu_id {max_id} is outside 0..{MAX_VCPUS - 1}"
            )
        self._vcpu_max = max_id
        self._expect(vcpumap_size(max_id), Decoder._on_vcpumap, "a VCPU_INFO map")

    def _on_vcpumap(self, buf: bytearray) -> None:
        self._emit(ev.VcpuInfo(self._vcpu_max, bytes(buf)))
        self._expect_chunk()

    def _on_toolstack_length(self, buf: bytearray) -> None:
        (n,) = _UINT.unpack(buf)
        if n > self.max_toolstack:
            raise self._fail(
                self._chunk_start,
                f"TOOLSTACK record of {n} bytes exceeds the cap of {self.max_toolstack}",
            )
        self._expect(n, Decoder._on_toolstack, "a TOOLSTACK record")

    def _on_toolstack(self, buf: bytearray) -> None:
        self._emit(ev.Toolstack(bytes(buf)))
        self._expect_chunk()

    def _on_digest_header(self, buf: bytearray) -> None:
        alg, length = _II.unpack(buf)
        at = self._chunk_start
        if alg not in DIGEST_ALGORITHMS:
            raise self._fail(at, f"MEMORY_DIGEST: unknown algorithm id {alg}")
        name, size = DIGEST_ALGORITHMS[alg]
        if length != size:
            raise self._fail(at, f"MEMORY_DIGEST: {name} digest of {length} bytes, expected {size}")
        self._digest_name = name
        self._expect(length, Decoder._on_digest, "a MEMORY_DIGEST chunk")

    def _on_disk_length(self, buf: bytearray) -> None:
        (n,) = _UINT.unpack(buf)
        if not 1 <= n <= self.max_disk_chunk:
            raise self._fail(
                self._chunk_start,
                f"DISK chunk of {n} bytes (1 to the cap of {self.max_disk_chunk} allowed)",
            )
        self._expect(n, Decoder._on_disk, "a DISK chunk", grow=True)

    def _on_disk(self, buf: bytearray | npt.NDArray[np.uint8]) -> None:
        self._emit(ev.DiskData(bytes(buf)))
        self._expect_chunk()

    def _on_digest(self, buf: bytearray) -> None:
        self._emit(ev.MemoryDigest(self._digest_name, bytes(buf)))
        self._expect_chunk()

    def _on_compressed_length(self, buf: bytearray) -> None:
        (n,) = _ULONG.unpack(buf)
        at = self._chunk_start
        if n == 0:  # Xen's restore accepts one (it carries no page)
            self._expect_chunk()
            return
        if n > self.max_compressed:
            raise self._fail(
                at, f"COMPRESSED_DATA of {n} bytes exceeds the cap of {self.max_compressed}"
            )
        if self._pending.count == 0:
            raise self._fail(at, "COMPRESSED_DATA but no listed page awaits its contents")
        # buffered as it arrives, not at the claimed length (see "Memory")
        self._expect(n, Decoder._on_compressed, "a COMPRESSED_DATA payload", grow=True)

    def _on_compressed(self, buf: npt.NDArray[np.uint8]) -> None:
        at = self._chunk_start
        n = len(buf)
        # Every page costs at least one byte of compressed data, so a chunk of
        # n bytes holds at most n pages: the window stays O(n).
        window = self._pending.peek(min(self._pending.count, n))
        # COMPRESSED_DATA is only read once ENABLE_COMPRESSION made the
        # Decompressor, which goes only when the decoder is done
        assert self._decompressor is not None
        failed: str | None
        try:
            pages = self._decompressor.decompress(buf, window, self._chunk_base())
        except CodecError as e:
            failed = str(e)
        except Exception as e:
            # the user's base source failed (BackupClosed, DomainError ...):
            # it goes to the user as it is; this decoder is dead
            self._die(MalformedStream(at, f"COMPRESSED_DATA: the base source failed: {e!r}"))
            raise
        else:
            failed = None
        if failed is not None:
            # raised outside the except clause: a __context__ (even a
            # suppressed one) would keep the CodecError's traceback, and the
            # Decompressor in its frames, alive as long as the caller keeps
            # the MalformedStream
            raise self._fail(at, f"COMPRESSED_DATA does not decode: {failed}")
        k = len(pages)
        if k == 0 or k > len(window) or pages.shape[1:] != (PAGE_SIZE,):
            raise self._fail(
                at, f"COMPRESSED_DATA decodes to {k} pages, {len(window)} listed pages await data"
            )
        self._pending.pop(k)
        self._pages += k
        event = ev.Pages(np.array(window[:k], dtype=np.uint64), pages, n)
        self._emit(event)
        self._call_pages.append(event)
        self._expect_chunk()

    def set_base(self, base: BaseSource) -> None:
        """Replace the base source (before the next feed), e.g. with a
        ``xenbind.compress.Rows`` once the receiver knows its backup's memory
        can be read in place."""
        self._base_source = base

    def _chunk_base(self) -> BaseSource:
        """The base source for one chunk: the user's own when the codec reads
        it in place (it has ``base_rows``, as ``xenbind.compress.Rows``), the
        pages of checkpoints completed in this call laid over it; else
        ``_base`` (the gather path)."""
        src = self._base_source
        rows_of = getattr(src, "base_rows", None)
        if rows_of is None:
            return self._base
        assert src is not None
        if not self._fresh:
            return src
        from ..compress import Rows

        memory, staged = rows_of()
        return Rows(memory, [*staged, *((p.pfns, p.data) for p in self._fresh)])

    def _base(self, pfns: PfnArray, out: PageArray) -> None:
        """The bases of a chunk's delta pages: the user's, then the pages of
        checkpoints completed in this call laid over them (see "Bases")."""
        if self._base_source is None:
            raise CodecError(
                f"{len(pfns)} delta page(s) (first pfn {int(pfns[0]):#x}) and this Decoder "
                "has no base source (Decoder(base=...))"
            )
        self._base_source(pfns, out)
        if self._fresh:
            overlay([(p.pfns, p.data) for p in self._fresh], pfns, out)

    def _on_end_body(self) -> None:
        at = self._chunk_start
        if self._switchover_here and not self._last_here:
            raise self._fail(
                at, f"SWITCHOVER in {self._ckpt()}, which is not the last (no LAST_CHECKPOINT)"
            )
        if self.format == "B":
            if self._pending.count:
                raise self._fail(
                    at,
                    f"end of the Format B body of {self._ckpt()}: {self._pending.count} "
                    f"listed pages never arrived ({self._pages} decoded)",
                )
            assert self._seen is not None
            for pn in self._listed:
                self._seen[pn] = False
            self._listed.clear()
        self._emit(ev.EndOfBody(self.checkpoints))
        self._expect(24, Decoder._on_magic, "the tail's magic PFNs")

    def _on_magic(self, buf: bytearray) -> None:
        self._magic = struct.unpack("<QQQ", buf)
        self._expect(4, Decoder._on_context_length, "the tail's HVM context length")

    def _on_context_length(self, buf: bytearray) -> None:
        (n,) = _UINT.unpack(buf)
        if n > self.max_context:
            raise self._fail(
                self.received - 4,
                f"{self._ckpt()}: HVM context of {n} bytes exceeds the cap of {self.max_context}",
            )
        self._expect(n, Decoder._on_context, "the tail's HVM context")

    def _on_context(self, buf: bytearray) -> None:
        self._hvm_context = bytes(buf)
        self._expect(
            len(DEVICE_MODEL_SIGNATURE), Decoder._on_signature, "the device-model signature"
        )

    def _on_signature(self, buf: bytearray) -> None:
        if bytes(buf) != DEVICE_MODEL_SIGNATURE:
            raise self._fail(
                self.received - len(DEVICE_MODEL_SIGNATURE),
                f"{self._ckpt()}: device-model record signature {bytes(buf)!r}, "
                f"expected {DEVICE_MODEL_SIGNATURE!r}",
            )
        self._expect(4, Decoder._on_device_model_length, "the device-model record length")

    def _on_device_model_length(self, buf: bytearray) -> None:
        (n,) = _UINT.unpack(buf)
        if n > self.max_device_model:
            raise self._fail(
                self.received - 4,
                f"{self._ckpt()}: device-model record of {n} bytes exceeds the cap of "
                f"{self.max_device_model}",
            )
        self._expect(n, Decoder._on_device_model, "the device-model record")

    def _on_device_model(self, buf: bytearray) -> None:
        ctx = Context(self._magic, self._hvm_context, bytes(buf))
        self._hvm_context = b""
        # the user has not seen this checkpoint: its pages are bases for
        # the rest of this call (see "Bases")
        self._fresh.extend(self._call_pages)
        self._call_pages = []
        self._emit(ev.Tail(ctx))
        self._emit(ev.CheckpointEnd(self.checkpoints, self.format, self._pages, self.received))
        self.checkpoints += 1
        self._pages = 0
        self._started = False
        if self._enabled and self.format == "A":
            self.format = "B"
            if self._seen is None:
                self._seen = np.zeros(self.p2m_size or 0, dtype=bool)
        if self._last_here:
            self.last = True
            self._release_codec()
            self._expect(1, Decoder._on_after_last, "data after the last checkpoint")
        else:
            self._expect_chunk()

    def _on_after_last(self, buf: bytearray) -> None:
        raise self._fail(
            self.received - 1, "data after the checkpoint that carried LAST_CHECKPOINT"
        )


def overlay(batches: Sequence[tuple[PfnArray, PageArray]], pfns: PfnArray, out: PageArray) -> None:
    """Lay over ``out[i]`` the latest page for ``pfns[i]`` among ``batches``
    ((pfns, data) pairs in stream order; a later one wins), where there is
    one. Vectorised: one sort, then one copy per batch that holds a page.
    What a user's base source uses for the pages it staged and has not
    committed yet (see "Bases"); the decoder uses it for its own."""
    if not batches:
        return
    lens = np.array([len(b[0]) for b in batches], dtype=np.intp)
    every = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
    if not len(every):
        return
    # the last occurrence of each PFN: the first in the reversed array
    uniq, first_rev = np.unique(every[::-1], return_index=True)
    last = len(every) - 1 - first_rev
    pos = np.minimum(np.searchsorted(uniq, pfns), len(uniq) - 1)
    rows = np.flatnonzero(uniq[pos] == pfns)
    if not len(rows):
        return
    where = last[pos[rows]]  # index into `every`
    ends = np.cumsum(lens)
    which = np.searchsorted(ends, where, side="right")  # the batch holding it
    starts = ends - lens
    for b in np.unique(which):
        sel = which == b
        out[rows[sel]] = batches[int(b)][1][where[sel] - starts[b]]
