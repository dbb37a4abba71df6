"""The fuzz targets' oracles: one function per target, bytes in, rules checked.

Each ``check_*`` function takes one fuzzer input and returns normally when the
code under test behaved; anything it raises is a finding (a crash):

* an exception that is not a ``xenbind.errors.RemusError`` (IndexError,
  struct.error, ValueError, MemoryError, numpy errors ...) escaping the
  decoder: untrusted bytes must only ever produce the project's own errors;
* ``AssertionError`` from a rule checked here on the decoder's output.

Delta pages decode on the receiver's own pages (docs/codecs.md): the stream
oracles give the Decoder a memory image rebuilt from its events, the codec
oracle a dict of the pages the receiver holds, the core oracle a backup that
reads zeros.

Rules checked on every input (the "differential" one catches state kept
wrongly across ``feed`` calls):

    split       the same bytes fed whole and fed in pieces (cut points drawn
                from a hash of the input, so a crash replays exactly) give the
                same events and the same outcome (error or not, and where)
    stream      every Pages event: pfns uint64 1-D, every PFN < p2m_size,
                data uint8 of shape (len(pfns), 4096); every PageBatch: PFNs of
                entries that name a page < p2m_size, at most 1024 entries;
                CheckpointEnd indexes count up from 0 with no gap; a Format B
                body never yields more pages than it listed; the Header comes
                first and once; nothing follows LAST_CHECKPOINT's checkpoint
    core        receiver.core.ReceiverCore over a connection's bytes: only its
                documented End comes out, no torn checkpoint is committed, no
                page past p2m_size is written, staging stays bounded; with
                disks (target core-disk) the disk stream's epochs reach the
                disks only at their checkpoints' commits, no write outside a
                disk is handed on, and the disks end as the stream implies
                (below)
    session     the receiver's stream bytes after ACCEPT are exactly the input
                after the HELLO; a HELLO is only yielded with fields within the
                protocol's caps; errors are ProtocolError

Nothing here imports atheris: ``tests/fuzz/test_short_run.py`` runs the same
oracles on hypothesis-generated inputs inside the normal suite.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypedDict

from xenbind.errors import ProtocolError, RemusError, StreamError

if TYPE_CHECKING:
    from receiver.staging import Staging

#: At most this many cut points when an input is fed in pieces.
MAX_CUTS = 6


# --- splitting ---------------------------------------------------------------


def pieces(data: bytes, seed: int | None = None) -> list[bytes]:
    """``data`` cut at 1..MAX_CUTS points drawn from ``seed`` (default: a CRC of
    the data, so the same input always splits the same way)."""
    rng = random.Random(zlib.crc32(data) if seed is None else seed)
    n = len(data)
    cuts = sorted({rng.randrange(n + 1) for _ in range(rng.randint(1, MAX_CUTS))})
    out, prev = [], 0
    for c in [*cuts, n]:
        out.append(data[prev:c])
        prev = c
    return out


# --- the session protocol ----------------------------------------------------


def _receiver_session_run(chunks: list[bytes]) -> tuple:
    """Feed a ReceiverSession; return (hello, stream bytes, error type, eof error)."""
    from xenbind.session import (
        MAX_CACHE_PAGES,
        MAX_NAME_LEN,
        MAX_PAGES,
        PREFIX,
        Accept,
        HelloReceived,
        ReceiverSession,
        StreamData,
    )

    sess = ReceiverSession()
    hello = None
    stream = bytearray()
    error = None

    def take(events: list) -> None:
        nonlocal hello
        for ev in events:
            if isinstance(ev, HelloReceived):
                assert hello is None, "two HelloReceived events"
                hello = ev.hello
                h = ev.hello
                assert 1 <= h.domain.pages <= MAX_PAGES
                assert 1 <= h.options.cache_pages <= MAX_CACHE_PAGES
                assert 0 < len(h.domain.name) <= MAX_NAME_LEN
                assert len(h.session_id) == 32
                sess.accept(Accept(h.session_id, 1000, 100, {}))
                take(sess.feed(b""))
            elif isinstance(ev, StreamData):
                assert hello is not None, "stream data before the HELLO"
                stream.extend(ev.data)
            else:
                raise AssertionError(f"unexpected event {ev!r}")

    try:
        for c in chunks:
            take(sess.feed(c))
    except ProtocolError as exc:
        error = type(exc).__name__
    eof_error = None
    if error is None:
        try:
            sess.eof()
        except ProtocolError as exc:
            eof_error = type(exc).__name__
    if hello is not None:
        data = b"".join(chunks)
        body_len = PREFIX.unpack_from(data)[3]
        assert bytes(stream) == data[PREFIX.size + body_len :], "stream bytes altered"
    return hello, bytes(stream), error, eof_error


def check_receiver_session(data: bytes) -> None:
    """Target ``session``: the receiver's side of the handshake."""
    whole = _receiver_session_run([data])
    split = _receiver_session_run(pieces(data))
    assert whole == split, f"whole {whole!r} != split {split!r}"


def _sender_session_run(chunks: list[bytes]) -> tuple:
    from xenbind.session import (
        MAX_REASON_BYTES,
        Accepted,
        Ack,
        Error,
        Goodbye,
        Heartbeat,
        Hello,
        Options,
        Refused,
        SenderSession,
    )
    from xenbind.types import DomainConfig

    hello = Hello(
        session_id=SENDER_SESSION_ID,
        options=Options(),
        domain=DomainConfig("fuzz", "12345678-9abc-def0-1234-56789abcdef0", 256, 1),
    )
    sess = SenderSession(hello)
    sess.hello()
    events: list = []
    error = None
    try:
        for c in chunks:
            events.extend(sess.feed(c))
        sess.eof()
    except ProtocolError as exc:
        error = type(exc).__name__
    for i, ev in enumerate(events):
        assert isinstance(ev, Accepted | Refused | Ack | Heartbeat | Error | Goodbye), ev
        if i == 0:
            assert isinstance(ev, Accepted | Refused)
        else:
            assert not isinstance(ev, Accepted | Refused), "a second reply"
        if isinstance(ev, Ack):
            assert 0 <= ev.index < 1 << 64
        if isinstance(ev, Error | Goodbye):
            assert len(ev.reason.encode("utf-8", "surrogatepass")) <= 3 * MAX_REASON_BYTES
    return events, error


#: The session id the sender-side target announces (the fuzzer learns it from
#: the seeds).
SENDER_SESSION_ID = "0123456789abcdef0123456789abcdef"


def check_sender_session(data: bytes) -> None:
    """Target ``reply``: the sender's side (ACCEPT/REFUSE, then frames)."""
    whole_events, whole_error = _sender_session_run([data])
    split_events, split_error = _sender_session_run(pieces(data))
    assert (whole_error is None) == (split_error is None), (whole_error, split_error)
    if whole_error is None:
        assert whole_events == split_events, (whole_events, split_events)


# --- the stream decoder (+ codecs + staging) ---------------------------------

#: The Decoder's caps while fuzzing: small, so the fuzzer reaches every cap
#: check, yet large enough for every seed.
FUZZ_CAPS = dict(
    max_p2m_size=1 << 20,
    max_compressed=1 << 16,
    max_context=1 << 12,
    max_device_model=1 << 12,
    max_cache_pages=8192,
    max_toolstack=1 << 12,
)
#: The staging cap while fuzzing (bytes of page data in one checkpoint).
FUZZ_STAGING_BYTES = 1 << 20


def _norm(event) -> object:
    """An event as a comparable value (arrays by dtype, shape and content)."""
    import hashlib

    from xenbind.stream import PageBatch, Pages

    if isinstance(event, Pages):
        return (
            "Pages",
            event.pfns.dtype.str,
            event.pfns.tobytes(),
            event.data.dtype.str,
            event.data.shape,
            hashlib.sha1(event.data.tobytes()).digest(),
            event.compressed_bytes,
        )
    if isinstance(event, PageBatch):
        return (
            "PageBatch",
            event.pfns.dtype.str,
            event.pfns.tobytes(),
            event.types.dtype.str,
            event.types.tobytes(),
        )
    return event


def _error_key(exc: StreamError | None) -> object:
    if exc is None:
        return None
    return (
        type(exc).__name__,
        exc.offset,
        exc.reason,
        getattr(exc, "torn_checkpoint", None),
        getattr(exc, "checkpoints", None),
    )


def decode_all(chunks: list[bytes], caps: dict | None = None) -> tuple[list, StreamError | None]:
    """Feed ``chunks`` to one Decoder, then eof(); (all events, the error or None).

    Delta pages decode on the memory the events rebuild (an Image, fed each
    call's events before the next call, as a receiver commits; the decoder
    itself covers a checkpoint that ended inside the call), so the events fed
    whole and fed split must be identical. Only StreamError may come out of
    the Decoder; anything else propagates (a finding). A decoder that raised
    must raise again on the next call.
    """
    from xenbind.stream import Decoder, Image

    img = Image()
    d = Decoder(**(FUZZ_CAPS if caps is None else caps), base=img.base)
    events: list = []
    try:
        for c in chunks:
            got = d.feed(c)
            for e in got:
                img.handle(e)
            events.extend(got)
    except StreamError as exc:
        events.extend(getattr(exc, "events", []))
        for again in (lambda: d.feed(b"\x00"), d.eof):
            try:
                again()
            except StreamError:
                pass
            else:
                raise AssertionError("the decoder went on after an error") from None
        # the decoder keeps its error, whose traceback holds the decoder's
        # frames: a cycle that would keep its buffers until a full GC
        exc.__traceback__ = None
        return events, exc
    try:
        d.eof()
    except StreamError as exc:
        exc.__traceback__ = None
        return events, exc
    return events, None


class StreamModel:
    """The rules the events must keep, checked one event at a time, and the
    receiver's staging fed from them the way the receiver feeds it."""

    def __init__(self, max_p2m_size: int, max_context: int, max_device_model: int) -> None:
        self.max_p2m_size = max_p2m_size
        self.max_context = max_context
        self.max_device_model = max_device_model
        self.p2m_size: int | None = None
        self.checkpoints = 0
        self.format = "A"
        self.enabled = False
        self.last = False  # LAST_CHECKPOINT seen in the current body
        self.switchover = False  # SWITCHOVER seen in the current body
        self.ended = False  # the LAST_CHECKPOINT checkpoint completed
        self.pages = 0  # page contents in the current checkpoint
        self.in_tail = False
        self.awaiting: list[int] = []  # Format A: the data PFNs of the last batch
        self.fifo: list[int] = []  # Format B: data PFNs listed, not yet received
        self.fifo_head = 0
        self.staging: Staging | None = None

    def _stage(self, pfns, data) -> None:
        try:
            from receiver.staging import Staging
        except ImportError:  # the receiver's staging has not landed
            return
        if self.staging is None:
            assert self.p2m_size is not None  # event(): pages come only after the header
            self.staging = Staging(self.p2m_size, FUZZ_STAGING_BYTES)
        try:
            self.staging.add(pfns, data)
        except RemusError:
            pass  # StagingFull: the receiver ends the session; not a finding

    def event(self, e) -> None:
        import numpy as np

        from xenbind.stream import (
            CheckpointEnd,
            CodecAnnounce,
            EnableCompression,
            EndOfBody,
            Header,
            Heartbeat,
            HvmParam,
            LastCheckpoint,
            MemoryDigest,
            PageBatch,
            Pages,
            Switchover,
            Tail,
            Toolstack,
            TscInfo,
            VcpuInfo,
        )
        from xenbind.stream.format import (
            HVM_PARAM_OF_TAG,
            MAX_BATCH,
            MAX_VCPUS,
            TYPE_HAS_DATA,
            TYPE_VALID,
            TYPE_XTAB,
            vcpumap_size,
        )

        assert not self.ended, f"event {type(e).__name__} after the LAST_CHECKPOINT checkpoint"
        if isinstance(e, Header):
            assert self.p2m_size is None, "two headers"
            assert 1 <= e.p2m_size <= self.max_p2m_size
            self.p2m_size = e.p2m_size
            return
        assert self.p2m_size is not None, f"{type(e).__name__} before the header"
        p2m = self.p2m_size
        if isinstance(e, Heartbeat):
            assert not self.in_tail
            return
        if isinstance(e, PageBatch):
            assert not self.in_tail and not self.awaiting, "a batch before the last one's data"
            assert e.pfns.dtype == np.uint64 and e.types.dtype == np.uint8
            assert e.pfns.shape == e.types.shape and 1 <= len(e.pfns) <= MAX_BATCH
            assert TYPE_VALID[e.types].all()
            named = e.pfns[e.types != TYPE_XTAB]
            assert (named < p2m).all(), "a PFN at or past p2m_size"
            assert len(np.unique(named)) == len(named), "a PFN twice in one batch"
            data_pfns = [int(x) for x in e.pfns[TYPE_HAS_DATA[e.types]]]
            if self.format == "A":
                self.awaiting = data_pfns
            else:
                listed = set(self.fifo)
                assert not listed.intersection(named.tolist()), "a PFN twice in a Format B body"
                self.fifo.extend(data_pfns)
            return
        if isinstance(e, Pages):
            assert not self.in_tail
            assert e.pfns.dtype == np.uint64 and e.pfns.ndim == 1 and len(e.pfns) >= 1
            assert e.data.dtype == np.uint8 and e.data.shape == (len(e.pfns), 4096)
            assert (e.pfns < p2m).all(), "Pages with a PFN at or past p2m_size"
            got = [int(x) for x in e.pfns]
            if self.format == "A":
                assert e.compressed_bytes is None
                assert got == self.awaiting, "Format A page data for other PFNs than listed"
                self.awaiting = []
            else:
                assert e.compressed_bytes is not None and e.compressed_bytes >= 1
                want = self.fifo[self.fifo_head : self.fifo_head + len(got)]
                assert got == want, "Format B pages out of listing order"
                self.fifo_head += len(got)
            self.pages += len(got)
            self._stage(e.pfns, e.data)
            return
        if isinstance(e, VcpuInfo):
            assert not self.in_tail and 0 <= e.max_vcpu_id < MAX_VCPUS
            assert len(e.vcpumap) == vcpumap_size(e.max_vcpu_id)
            return
        if isinstance(e, HvmParam):
            assert not self.in_tail and HVM_PARAM_OF_TAG[e.tag] == e.index
            assert 0 <= e.value < 1 << 64
            return
        if isinstance(e, Toolstack):
            assert not self.in_tail and len(e.data) <= FUZZ_CAPS["max_toolstack"]
            return
        if isinstance(e, TscInfo | MemoryDigest | CodecAnnounce | EnableCompression):
            assert not self.in_tail
            if isinstance(e, EnableCompression):
                assert not self.enabled, "compression enabled twice"
                self.enabled = True
            if isinstance(e, CodecAnnounce):
                assert not self.enabled, "CODEC after ENABLE_COMPRESSION"
            return
        if isinstance(e, LastCheckpoint):
            self.last = True
            return
        if isinstance(e, Switchover):
            assert not self.in_tail and not self.switchover, "a second SWITCHOVER"
            self.switchover = True
            return
        if isinstance(e, EndOfBody):
            assert not self.in_tail and not self.awaiting
            assert self.last or not self.switchover, "SWITCHOVER in a body without LAST_CHECKPOINT"
            assert e.index == self.checkpoints
            if self.format == "B":
                assert self.fifo_head == len(self.fifo), "a Format B body ended short of pages"
            self.in_tail = True
            return
        if isinstance(e, Tail):
            assert self.in_tail
            c = e.context
            assert len(c.hvm_context) <= self.max_context
            assert len(c.device_model) <= self.max_device_model
            assert len(c.magic_pfns) == 3
            return
        if isinstance(e, CheckpointEnd):
            assert self.in_tail and e.index == self.checkpoints
            assert e.format == self.format and e.pages == self.pages
            self.checkpoints += 1
            self.in_tail = False
            self.pages = 0
            self.fifo, self.fifo_head = [], 0
            if self.enabled:
                self.format = "B"
            if self.staging is not None:
                self.staging.discard()  # (commit needs a domain: the receiver's own tests)
            if self.last:
                self.ended = True
            return
        raise AssertionError(f"unknown event {e!r}")


def check_stream(data: bytes) -> None:
    """Target ``stream``: the Decoder (with the Decompressor inside it for
    Format B) and the receiver's staging, whole and split."""
    whole_events, whole_error = decode_all([data])
    split_events, split_error = decode_all(pieces(data))
    assert _error_key(whole_error) == _error_key(split_error), (
        f"whole: {whole_error!r}; split: {split_error!r}"
    )
    assert [_norm(e) for e in whole_events] == [_norm(e) for e in split_events], (
        "events differ between whole and split feeding"
    )
    model = StreamModel(
        FUZZ_CAPS["max_p2m_size"], FUZZ_CAPS["max_context"], FUZZ_CAPS["max_device_model"]
    )
    for e in whole_events:
        model.event(e)
    if whole_error is None:
        # eof() was quiet: the stream ended between checkpoints
        assert not model.in_tail and model.pages == 0 and not model.awaiting
        assert model.fifo_head == len(model.fifo)


# --- structure-aware streams ----------------------------------------------------
#
# Target ``chunks``: the input is a program that writes a stream, one chunk at
# a time, so the fuzzer mutates decisions (which chunk, how many entries,
# which PFN, which length) instead of raw bytes of page data. Each op byte:
#
#     op % 15   0 batch: n = next % 6 + 1 entries, each entry = next byte as PFN
#                 (p2m_size - 4 .. p2m_size + 3 window for high bytes) and a
#                 type nibble; Format A page data follows if the program says so
#               1 page data for k = next % 4 pages, each filled with next byte
#               2 COMPRESSED_DATA: length L = next % 64, then L bytes taken
#                 from the input (xen format: 0x00 = unchanged page, ...)
#               3 full-page COMPRESSED_DATA: k = next % 3 + 1 pages, 0x80 + 4096
#                 bytes of the next byte each
#               4 TSC_INFO  5 LAST_CHECKPOINT  6 ENABLE_COMPRESSION
#               7 CODEC(next % 3, next % 9)  8 MEMORY_DIGEST(16 bytes)
#               9 HEARTBEAT  10 end of body + tail  11 a raw int32 chunk type
#               12 VCPU_INFO(max id = next - 8: some negative, some past
#                  the map; the map's next bytes)  13 an HVM parameter (Xen's
#                  tag next % 11 of them, 12 bytes)  14 TOOLSTACK(L = next % 16)
# p2m_size is the first byte + 1. The stream is then checked by check_stream.


def chunks_program(data: bytes) -> bytes:
    """The stream written by the ``chunks`` program ``data``."""
    import struct

    from xenbind.stream.format import (
        DEVICE_MODEL_SIGNATURE,
        HVM_PARAM_OF_TAG,
        TAG_CODEC,
        TAG_COMPRESSED_DATA,
        TAG_ENABLE_COMPRESSION,
        TAG_HEARTBEAT,
        TAG_LAST_CHECKPOINT,
        TAG_MEMORY_DIGEST,
        TAG_TSC_INFO,
    )

    it = iter(data)

    def nxt() -> int:
        return next(it, 0)

    p2m = nxt() + 1
    out = [struct.pack("<Q", p2m)]
    for _ in range(len(data)):
        op = next(it, None)
        if op is None:
            break
        op %= 15
        if op == 0:
            n = nxt() % 6 + 1
            entries = []
            for _ in range(n):
                b = nxt()
                pfn = b if b < 0xF8 else p2m - 4 + (b - 0xF8)
                typ = nxt() >> 4
                entries.append((max(pfn, 0) & 0x0FFF_FFFF) | (typ << 28))
            out.append(struct.pack(f"<i{n}Q", n, *entries))
        elif op == 1:
            for _ in range(nxt() % 4):
                out.append(bytes([nxt()]) * 4096)
        elif op == 2:
            n = nxt() % 64
            out.append(struct.pack("<iQ", TAG_COMPRESSED_DATA, n) + bytes(nxt() for _ in range(n)))
        elif op == 3:
            k, fill = nxt() % 3 + 1, nxt()
            blob = (b"\x80" + bytes([fill]) * 4096) * k
            out.append(struct.pack("<iQ", TAG_COMPRESSED_DATA, len(blob)) + blob)
        elif op == 4:
            out.append(struct.pack("<iIQII", TAG_TSC_INFO, 1, 2, 3, 4))
        elif op == 5:
            out.append(struct.pack("<i", TAG_LAST_CHECKPOINT))
        elif op == 6:
            out.append(struct.pack("<i", TAG_ENABLE_COMPRESSION))
        elif op == 7:
            out.append(struct.pack("<iII", TAG_CODEC, nxt() % 3, nxt() % 9))
        elif op == 8:
            out.append(struct.pack("<iII", TAG_MEMORY_DIGEST, 1, 16) + bytes(16))
        elif op == 9:
            out.append(struct.pack("<i", TAG_HEARTBEAT))
        elif op == 10:
            ctx, dm = bytes(nxt() % 8), bytes(nxt() % 8)
            out.append(
                struct.pack("<iQQQI", 0, 1, 2, 3, len(ctx))
                + ctx
                + DEVICE_MODEL_SIGNATURE
                + struct.pack("<I", len(dm))
                + dm
            )
        elif op == 11:
            out.append(
                struct.pack(
                    "<i", int.from_bytes(bytes([nxt(), nxt(), nxt(), nxt()]), "little", signed=True)
                )
            )
        elif op == 12:
            max_id = nxt() - 8
            words = max(0, max_id) // 64 + 1
            out.append(struct.pack("<ii", -2, max_id) + bytes(nxt() for _ in range(8 * words)))
        elif op == 13:
            tag = sorted(HVM_PARAM_OF_TAG)[nxt() % len(HVM_PARAM_OF_TAG)]
            out.append(struct.pack("<iIQ", tag, nxt(), nxt() << 12))
        else:
            n = nxt() % 16
            out.append(struct.pack("<iI", -18, n) + bytes(nxt() for _ in range(n)))
    return b"".join(out)


def check_chunks(data: bytes) -> None:
    """Target ``chunks``: a stream written by a fuzzed program, then check_stream."""
    check_stream(chunks_program(data))


# --- the codecs (xenbind.compress, C kernel) -------------------------------
#
# Input layout of target ``codec`` (the seeds write it; docs/fuzzing.md):
#
#     byte 0      bit 0: codec (0 = seed, 1 = xen); bits 1-3: cache pages - 1
#     byte 1      n: number of PFNs listed (0..255)
#     n bytes     the PFNs, one byte each (small, so the cache collides)
#     2 bytes     uint16 LE: length L of the first blob (clamped to what is left)
#     L bytes     the first blob, then the rest: the second blob. Both are
#                 decoded in turn by one Decompressor, so cache state carries
#                 over from one to the next
#
# Before the blobs, the receiver holds full pages for PFNs 0 .. cache-1
# (contents from prime_page, decoded by both from one blob the seeds'
# Compressor writes) and zeros everywhere else (PFNs KNOWN_ZERO, 8..15, are
# named in the seeds: a page the receiver holds as zeros). Every delta page
# decodes on the receiver's page for its PFN as it was before the blob (a
# PFN listed twice in one blob: both on that page; the stream never lists a
# PFN twice in a body), and after a blob that decodes, each side's receiver
# holds its pages: the two must stay equal. The kernel and the reference
# keep one such memory each.

#: Most PFNs one codec input may list.
CODEC_MAX_PFNS = 255
#: PFNs both sides hold as known zero before a codec input's blobs.
KNOWN_ZERO = range(8, 16)


def prime_page(pfn: int) -> bytes:
    """The contents both sides cache for ``pfn`` before a codec input."""
    return bytes((pfn * 7 + i) & 0xFF for i in range(256)) * 16


def codec_input(
    codec: str, cache_pages: int, pfns: list[int], blob1: bytes, blob2: bytes = b""
) -> bytes:
    """A ``codec`` input (for the seed generator and the tests)."""
    assert codec in ("seed", "xen") and 1 <= cache_pages <= 8 and len(pfns) <= CODEC_MAX_PFNS
    assert len(blob1) < 1 << 16
    flags = (1 if codec == "xen" else 0) | ((cache_pages - 1) << 1)
    return bytes([flags, len(pfns), *pfns]) + len(blob1).to_bytes(2, "little") + blob1 + blob2


class ReferenceDecoder:
    """A slow, obvious decoder of both formats (formats.py), the C kernel
    must agree with it exactly. It holds the receiver's memory (``held``: PFN
    -> page, zeros for a PFN never decoded): a delta page applies to a copy
    of the page held before the blob; a blob that decodes is then applied,
    page by page (a later page for a PFN wins). Nothing else is kept: no
    cache, no known-zero set."""

    def __init__(self, codec: str) -> None:
        self.codec = codec
        self.held: dict[int, bytes] = {}

    def _base(self, pfn: int) -> bytearray:
        return bytearray(self.held.get(pfn, bytes(4096)))

    def decode(self, blob: bytes, pfns: list[int]) -> tuple[list[bytes], bool]:
        """(pages decoded, whether it stopped on an error); applied only when
        the whole blob decodes."""
        out: list[bytes] = []
        pos = 0
        step = self._seed_page if self.codec == "seed" else self._xen_page
        while pos < len(blob):
            if len(out) >= len(pfns):
                return out, True
            r = step(blob, pos, pfns[len(out)])
            if r is None:
                return out, True
            page, pos = r
            out.append(page)
        for pfn, page in zip(pfns, out, strict=False):
            self.held[pfn] = page
        return out, False

    def _seed_page(self, blob: bytes, pos: int, pfn: int):
        import struct

        if len(blob) - pos < 6:
            return None
        off, val = struct.unpack_from("<hI", blob, pos)
        if off not in (-100, -101) or val != 0:
            return None
        if off == -101:
            if len(blob) - pos < 6 + 4096:
                return None
            return bytes(blob[pos + 6 : pos + 6 + 4096]), pos + 6 + 4096
        page = self._base(pfn)
        q, prev, deltas = pos + 6, -1, []
        while q < len(blob):
            if len(blob) - q < 6:
                return None
            d, v = struct.unpack_from("<hI", blob, q)
            if d in (-100, -101):
                break
            if d < 0 or d >= 4096 or d % 4 or d <= prev:
                return None
            deltas.append((d, v))
            prev = d
            q += 6
        for d, v in deltas:
            page[d : d + 4] = v.to_bytes(4, "little")
        return bytes(page), q

    def _xen_page(self, blob: bytes, pos: int, pfn: int):
        if blob[pos] == 0x80:
            if len(blob) - pos < 1 + 4096:
                return None
            return bytes(blob[pos + 1 : pos + 1 + 4096]), pos + 1 + 4096
        new = self._base(pfn)
        if blob[pos] == 0x00:
            return bytes(new), pos + 1
        q, covered = pos, 0
        while covered < 4096:
            if q >= len(blob):
                return None
            m = blob[q]
            n = 4 * (m & 0x7F)
            if n == 0 or covered + n > 4096:
                return None
            if m & 0x80:
                q += 1
            else:
                if len(blob) - q - 1 < n:
                    return None
                new[covered : covered + n] = blob[q + 1 : q + 1 + n]
                q += 1 + n
            covered += n
        return bytes(new), q


def parse_codec_input(data: bytes) -> tuple[str, int, list[int], bytes, bytes] | None:
    """(codec, cache pages, pfns, first blob, second blob) or None if too short."""
    if len(data) < 2 or len(data) < 4 + data[1]:
        return None
    codec = "xen" if data[0] & 1 else "seed"
    cache_pages = ((data[0] >> 1) & 7) + 1
    n = data[1]
    pfns = list(data[2 : 2 + n])
    first = int.from_bytes(data[2 + n : 4 + n], "little")
    rest = data[4 + n :]
    return codec, cache_pages, pfns, rest[:first], rest[first:]


def check_codec(data: bytes) -> None:
    """Target ``codec``: Decompressor (C kernel) against the reference decoder."""
    import numpy as np

    from xenbind.compress import Compressor, Decompressor
    from xenbind.errors import CodecError

    parsed = parse_codec_input(data)
    if parsed is None:
        return
    codec, cache_pages, pfns, blob1, blob2 = parsed
    dec = Decompressor(codec)
    held: dict[int, np.ndarray] = {}  # the kernel side's receiver

    def base(bp: np.ndarray, out: np.ndarray) -> None:
        for i, p in enumerate(bp.tolist()):
            out[i] = held.get(p, 0)

    def kernel(blob: bytes, listed: np.ndarray) -> np.ndarray:
        got = dec.decompress(blob, listed, base)
        for p, page in zip(listed.tolist(), got, strict=False):
            held[p] = page.copy()
        return got

    ref = ReferenceDecoder(codec)
    prime_pfns = np.arange(cache_pages, dtype=np.uint64)
    prime = np.frombuffer(b"".join(prime_page(p) for p in range(cache_pages)), np.uint8)
    prime_blob = Compressor(codec, cache_pages).compress(prime_pfns, prime.reshape(-1, 4096))
    got = kernel(prime_blob, prime_pfns)
    want, failed = ref.decode(prime_blob, list(range(cache_pages)))
    assert not failed and got.tobytes() == b"".join(want), "priming disagrees"

    pfn_array = np.array(pfns, dtype=np.uint64)
    for blob in (blob1, blob2):
        if not blob:
            continue
        want, ref_failed = ref.decode(blob, pfns)
        try:
            got = kernel(blob, pfn_array)
        except CodecError:
            assert ref_failed, "the C kernel refused a blob the reference decodes"
            continue  # stateless: the next blob decodes on the same memory
        assert not ref_failed, "the C kernel accepted a blob the reference refuses"
        assert got.dtype == np.uint8 and got.shape == (len(want), 4096), got.shape
        assert got.tobytes() == b"".join(want), "decoded pages differ from the reference"
        assert held.keys() == ref.held.keys(), "the receivers hold different PFNs"
        assert all(held[p].tobytes() == ref.held[p] for p in held), "the receivers differ"


# --- the receiver's core ---------------------------------------------------------
#
# Targets ``core`` and ``core-disk`` (one oracle, check_core; core-disk's seeds
# are sessions whose HELLO names disks, their DISK chunks carrying the disk
# mirror stream): receiver.core.ReceiverCore driven with the input as the
# bytes of one connection (a HELLO, then the stream), fed whole, and in pieces
# through receive_data and the zero-copy get_buffer/buffer_updated path, then
# EOF and a late tick. Rules: nothing but End comes out as the end (no
# exception), End comes once and last; every page written lies below the
# HELLO's p2m_size; a commit happens only for a checkpoint the stream decoder
# itself completed (never a torn one), with exactly its pages; staged pages
# stay within max-staged; the ended core holds no decoder, staging nor disk
# decoder. Whole and split runs make the same calls on the backup and its
# disks.
#
# Disks (the DiskSink is RecordingDiskBackup, which keeps the disks as
# receiver.core's docstring and tests/receiver/test_core.py's DiskMemoryBackup
# do: epoch 0's writes applied at once, a later epoch's kept until the commit
# that carries its disk_epoch). Checked on every call:
#
#     sink      disk_open once, before any record, with the HELLO's disks from
#               epoch 0; every WRITE/ZERO lies inside its disk, sector-aligned,
#               at least a sector, a WRITE at most max-disk-write (checked here,
#               not trusted to the decoder); ``direct`` exactly in epoch 0; a
#               SEAL closes the open epoch with its records and bytes; at most
#               one sealed epoch waits for its commit
#     commit    a session with disks commits checkpoint N with disk_epoch N,
#               only after SEAL(N), and applies that epoch then (never before);
#               one without disks commits with disk_epoch None
#     memory    the disk decoder buffers at most one record (its ``buffered``
#               at every sink call and after every input); an epoch keeps at most max-disk-epoch-bytes
#               (the sink refuses more, as receiver.diskbuffer does, and the
#               core must end ``violation``)
#     reference the calls the sink saw are a prefix of those the stream implies
#               (reference_disk_session: the legacy events decoded apart, their
#               DISK bytes read by ReferenceDiskStream, which shares no code
#               with xenbind.diskstream, under the core's rules), all of them
#               when the session ended on a disk rule, on LAST_CHECKPOINT, a
#               switchover or EOF; a disk stream the reference finds broken
#               ends the session ``violation``, and a disk ``violation`` comes
#               only from one; the disks after the session (and after each
#               commit) are the image the valid prefix implies at the last
#               committed checkpoint

#: HELLOs for more pages than this are refused (the daemon's max-pages)
CORE_MAX_PAGES = 4096


class CoreLimits(TypedDict):
    """receiver.core.Limits as keyword arguments (its ``software`` left default)."""

    max_pages: int
    max_staged_bytes: int
    max_compressed: int
    max_context: int
    max_device_model: int
    max_cache_pages: int
    heartbeat_ms: int
    handshake_timeout: float
    stall_timeout: float
    max_disk_write: int
    max_disk_epoch_bytes: int


CORE_LIMITS = CoreLimits(
    max_pages=CORE_MAX_PAGES,
    max_staged_bytes=64 * 4096,
    max_compressed=1 << 20,
    max_context=1 << 16,
    max_device_model=1 << 16,
    max_cache_pages=1024,
    heartbeat_ms=100,
    handshake_timeout=5.0,
    stall_timeout=30.0,
    # small, so the fuzzer reaches both caps within max_len
    max_disk_write=4096,
    max_disk_epoch_bytes=8192,
)

#: What one kept (not direct) disk record costs the sink's epoch bound: its
#: head, and a WRITE's data.
DISK_HEAD_BYTES = 32

#: The most the disk decoder may hold between two inputs: one record (a head,
#: or a WRITE's data), or a piece of the header.
DISK_DECODER_MAX = max(24, DISK_HEAD_BYTES, CORE_LIMITS["max_disk_write"])

#: End messages of the core's disk rules (a ``violation`` the disk stream caused).
DISK_VIOLATION = re.compile(
    r"^(DISK chunk in a session|disk stream|disk SEAL|checkpoint \d+ ended before its disk)"
)


class DiskImage:
    """Disks as sparse sectors ((disk, byte offset) -> the sector's bytes, only
    sectors that are not all zeros): a HELLO may name 16 TiB disks."""

    def __init__(self, sector: int) -> None:
        self.sector = sector
        self.sectors: dict[tuple[int, int], bytes] = {}

    def write(self, disk: int, offset: int, data: bytes) -> None:
        s = self.sector
        assert len(data) % s == 0 and offset % s == 0
        zero = bytes(s)
        for i in range(0, len(data), s):
            piece = data[i : i + s]
            if piece == zero:
                self.sectors.pop((disk, offset + i), None)
            else:
                self.sectors[(disk, offset + i)] = piece

    def zero(self, disk: int, offset: int, length: int) -> None:
        end = offset + length
        if length // self.sector <= len(self.sectors):
            for at in range(offset, end, self.sector):
                self.sectors.pop((disk, at), None)
        else:  # a huge ZERO: visit what is held instead
            for key in [k for k in self.sectors if k[0] == disk and offset <= k[1] < end]:
                del self.sectors[key]

    def apply(self, op: tuple) -> None:
        """One log entry ("write", disk, offset, data, ...) or ("zero", disk, offset, length, ...)."""
        if op[0] == "write":
            self.write(op[1], op[2], op[3])
        else:
            self.zero(op[1], op[2], op[3])

    def copy(self) -> DiskImage:
        out = DiskImage(self.sector)
        out.sectors = dict(self.sectors)
        return out

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DiskImage)
            and self.sector == other.sector
            and self.sectors == other.sectors
        )

    def __repr__(self) -> str:
        return f"DiskImage(sector={self.sector}, {len(self.sectors)} sectors set)"


class RecordingBackup:
    """The core's Backup as a list of what it was asked to do (and zeros for
    every base it is asked to read). ``log``: the commits (and, for disks,
    every DiskSink call) as comparable tuples."""

    def __init__(self, p2m_size: int, max_staged: int) -> None:
        self.p2m_size = p2m_size
        self.max_staged = max_staged
        self.pending: list[int] = []  # checkpoint 0's pages written so far
        self.commits: list[tuple[int, list[int]]] = []
        self.log: list[tuple] = []

    def write(self, pfns, data) -> None:
        assert (pfns < self.p2m_size).all(), "an initial-copy page past p2m_size"
        assert data.shape == (len(pfns), 4096)
        self.pending.extend(int(p) for p in pfns)

    def read(self, pfns, out) -> None:
        assert (pfns < self.p2m_size).all(), "a base read past p2m_size"
        assert out.shape[0] >= len(pfns) and out.shape[1:] == (4096,)
        out[: len(pfns)] = 0

    def _commit_disks(self, req) -> None:
        assert req.disk_epoch is None, "a disk epoch committed in a session without disks"

    def commit(self, req):
        from receiver.core import Committed

        staged = [int(p) for pfns, _ in req.staging._batches for p in pfns]
        assert req.staging.bytes <= self.max_staged, "staged past max-staged"
        assert all(p < self.p2m_size for p in staged), "a staged page past p2m_size"
        pages = self.pending if req.first else staged
        assert req.first == (not self.commits)
        self._commit_disks(req)
        self.commits.append((req.index, pages))
        self.log.append(("commit", req.index, req.disk_epoch))
        self.pending = []
        req.staging.discard()
        return Committed(len(pages))


class RecordingDiskBackup(RecordingBackup):
    """RecordingBackup and the session's DiskSink (see the rules above)."""

    def __init__(self, p2m_size: int, max_staged: int, disks: tuple[int, ...]) -> None:
        super().__init__(p2m_size, max_staged)
        self.disks = disks
        self.header = None
        self.image: DiskImage | None = None  # the applied disks (from disk_open)
        self.open_epoch = 0  # the epoch the next SEAL closes
        self.epoch_records = 0  # WRITE/ZERO of the open epoch
        self.epoch_bytes = 0
        self.kept = 0  # bytes the open epoch keeps (not direct)
        self.waiting: dict[int, list[tuple]] = {}  # epoch -> its records, kept to its commit
        self.images: list[DiskImage] = []  # the applied disks after each commit
        self.core: object = (
            None  # the ReceiverCore it serves: its disk decoder is checked at each call
        )

    def _check_held(self) -> None:
        """Between two feeds (the sink is called after one), the disk decoder
        holds at most one record."""
        held = getattr(self.core, "disk", None)
        if held is not None:
            assert held.buffered <= DISK_DECODER_MAX, f"the disk decoder holds {held.buffered} B"

    def disk_open(self, header) -> None:
        self._check_held()
        assert self.header is None, "disk_open twice"
        assert header.disk_sizes == self.disks, "disk_open with other disks than the HELLO's"
        assert header.first_epoch == 0, "disk_open from an epoch but 0"
        self.header = header
        self.image = DiskImage(header.sector)
        self.log.append(("open", header.disk_sizes, header.sector_shift))

    def disk_write(self, rec, direct: bool) -> None:
        self._check_held()
        from receiver.diskbuffer import EpochTooLarge
        from xenbind import diskstream as ds

        h, image = self.header, self.image
        assert h is not None and image is not None, "a disk record before the disk header"
        assert isinstance(rec, ds.Write | ds.Zero), f"disk_write({rec!r})"
        if isinstance(rec, ds.Write):
            assert isinstance(rec.data, bytes)
            length = len(rec.data)
            assert length <= CORE_LIMITS["max_disk_write"], "a WRITE past max-disk-write"
            op: tuple = ("write", rec.disk, rec.offset, rec.data, rec.sync, direct)
        else:
            length = rec.length
            op = ("zero", rec.disk, rec.offset, rec.length, direct)
        assert 0 <= rec.disk < len(h.disk_sizes), "a record on a disk the stream does not have"
        assert rec.offset % h.sector == 0 and length % h.sector == 0, "an unaligned disk record"
        assert length >= h.sector, "a disk record of less than a sector"
        assert 0 <= rec.offset and rec.offset + length <= h.disk_sizes[rec.disk], (
            "a disk record outside its disk"
        )
        assert direct == (self.open_epoch == 0), (
            f"direct={direct} in disk epoch {self.open_epoch} (only epoch 0 is direct)"
        )
        if not direct:
            cost = DISK_HEAD_BYTES + (length if op[0] == "write" else 0)
            if self.kept + cost > CORE_LIMITS["max_disk_epoch_bytes"]:
                raise EpochTooLarge(f"disk epoch {self.open_epoch} past the fuzz bound")
            self.kept += cost
            self.waiting.setdefault(self.open_epoch, []).append(op)
        else:
            image.apply(op)
        self.epoch_records += 1
        self.epoch_bytes += length
        self.log.append(op)

    def disk_seal(self, seal) -> None:
        self._check_held()
        assert self.header is not None, "a SEAL before the disk header"
        assert seal.epoch == self.open_epoch, (
            f"SEAL({seal.epoch}) with epoch {self.open_epoch} open"
        )
        assert (seal.records, seal.nbytes) == (self.epoch_records, self.epoch_bytes), (
            "a SEAL that does not count its epoch"
        )
        self.open_epoch += 1
        self.epoch_records = self.epoch_bytes = self.kept = 0
        assert len(self.waiting) <= 1, "two sealed disk epochs wait for their commits"
        self.log.append(("seal", seal.epoch, seal.records, seal.nbytes, seal.crc))

    def _commit_disks(self, req) -> None:
        assert req.disk_epoch == req.index, (
            f"checkpoint {req.index} committed with disk epoch {req.disk_epoch}"
        )
        assert self.open_epoch > req.index, f"checkpoint {req.index} committed before its SEAL"
        assert all(e >= req.index for e in self.waiting), "a sealed disk epoch never committed"
        assert self.image is not None
        for op in self.waiting.pop(req.index, []):
            self.image.apply(op)
        self.images.append(self.image.copy())


class _Broken(Exception):
    """A rule of the disk stream broken (ReferenceDiskStream, internal)."""


class ReferenceDiskStream:
    """A slow, obvious reader of the disk mirror stream, written from
    xenbind/diskstream.py's layout and rules and sharing no code with its
    Decoder. ``feed`` returns (records, broken): the records whose last byte
    arrived, as log-like tuples ("header", sizes, shift, first_epoch),
    ("write", disk, offset, data, sync), ("zero", disk, offset, length),
    ("seal", epoch, records, bytes, crc); ``broken`` once a rule is broken,
    from then on. An item is judged as soon as its bytes are in: the header's
    fixed part, each disk size, a record's head (a WRITE's length against
    max_write too), a WRITE's data."""

    MAGIC = b"\x89RMD\r\n\x1a\n"

    def __init__(self, max_write: int, max_disk_bytes: int = 1 << 44) -> None:
        self.max_write = max_write
        self.max_disk_bytes = max_disk_bytes
        self.buf = bytearray()
        self.pos = 0
        self.state = "fixed"
        self.broken = False
        self.header_bytes = b""
        self.sector = 0
        self.count = 0
        self.sizes: list[int] = []
        self.epoch = 0
        self.crc = 0
        self.records = 0
        self.nbytes = 0
        self.head = b""
        self.write_at = (0, 0, 0, False)  # disk, offset, length, sync

    def feed(self, data: bytes) -> tuple[list[tuple], bool]:
        if self.broken:
            return [], True
        self.buf += data
        out: list[tuple] = []
        try:
            while self._step(out):
                pass
        except _Broken:
            self.broken = True
            self.buf = bytearray()
            return out, True
        del self.buf[: self.pos]
        self.pos = 0
        return out, False

    def _take(self, n: int) -> bytes | None:
        if len(self.buf) - self.pos < n:
            return None
        item = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return item

    @staticmethod
    def _rule(ok: bool) -> None:
        if not ok:
            raise _Broken

    def _step(self, out: list[tuple]) -> bool:
        """Read one item if its bytes are in (False: they are not)."""
        import struct

        if self.state == "fixed":
            item = self._take(24)
            if item is None:
                return False
            magic, version, shift, count, first = struct.unpack("<8sHHIQ", item)
            self._rule(magic == self.MAGIC and version == 1)
            self._rule(9 <= shift <= 12 and 1 <= count <= 64)
            self.header_bytes, self.sector, self.count = item, 1 << shift, count
            self.epoch = first
            self.state = "size"
        elif self.state == "size":
            item = self._take(8)
            if item is None:
                return False
            (size,) = struct.unpack("<Q", item)
            self._rule(self.sector <= size <= self.max_disk_bytes and size % self.sector == 0)
            self.header_bytes += item
            self.sizes.append(size)
            if len(self.sizes) == self.count:
                shift = self.sector.bit_length() - 1
                out.append(("header", tuple(self.sizes), shift, self.epoch))
                self.crc = zlib.crc32(self.header_bytes)
                self.state = "head"
        elif self.state == "head":
            item = self._take(32)
            if item is None:
                return False
            kind, disk, flags, a, b, c = struct.unpack("<IHHQQQ", item)
            if kind == 3:  # SEAL
                self._rule(disk == 0 and flags == 0)
                self._rule(a == self.epoch and b == self.records and c == self.crc)
                out.append(("seal", a, b, self.nbytes, c))
                self.epoch += 1
                self.crc = self.records = self.nbytes = 0
                return True
            self._rule(kind in (1, 2) and disk < self.count and c == 0)
            self._rule(flags & ~(1 if kind == 1 else 0) == 0)
            self._rule(a % self.sector == 0 and b % self.sector == 0 and b > 0)
            self._rule(a + b <= self.sizes[disk])
            if kind == 2:  # ZERO
                self.crc = zlib.crc32(item, self.crc)
                self.records += 1
                self.nbytes += b
                out.append(("zero", disk, a, b))
                return True
            self._rule(b <= self.max_write)
            self.head = item
            self.write_at = (disk, a, b, bool(flags & 1))
            self.state = "data"
        else:
            disk, a, b, sync = self.write_at
            item = self._take(b)
            if item is None:
                return False
            self.crc = zlib.crc32(item, zlib.crc32(self.head, self.crc))
            self.records += 1
            self.nbytes += b
            out.append(("write", disk, a, item, sync))
            self.state = "head"
        return True


class DiskReference:
    """What the core must hand the DiskSink for a stream (reference_disk_session)."""

    def __init__(self) -> None:
        self.log: list[tuple] = []  # as RecordingBackup.log
        self.images: list[DiskImage] = []  # the disks after each commit
        self.fault: str | None = None  # the disk rule that ends the session, if one does


def reference_disk_session(events: list, disks: tuple[int, ...]) -> DiskReference:
    """The DiskSink calls (and commits) the core's rules (receiver/core.py,
    "Disks") imply for the legacy stream's ``events`` in a session whose HELLO
    named ``disks``, read with ReferenceDiskStream and kept as
    RecordingDiskBackup keeps them. It stops at the first broken disk rule
    (``fault``), or after the LAST_CHECKPOINT checkpoint's commit; the core's
    other rules (staging, codec, header) are not modelled: the core may end
    before."""
    from xenbind.stream import CheckpointEnd, DiskData, LastCheckpoint

    ref = DiskReference()
    reader = ReferenceDiskStream(CORE_LIMITS["max_disk_write"])
    image: DiskImage | None = None
    waiting: dict[int, list[tuple]] = {}
    open_epoch, sealed, reading, kept, last = 0, None, 0, 0, False
    for e in events:
        if isinstance(e, DiskData):
            if not disks:
                ref.fault = "a DISK chunk without disks"
                return ref
            records, broken = reader.feed(e.data)
            if broken:  # the core hands none of the chunk's records
                ref.fault = "a broken disk stream"
                return ref
            for rec in records:
                kind = rec[0]
                if kind == "header":
                    if rec[1] != disks or rec[3] != 0:
                        ref.fault = "disk header against the HELLO"
                        return ref
                    image = DiskImage(1 << rec[2])
                    ref.log.append(("open", rec[1], rec[2]))
                elif kind == "seal":
                    if rec[1] != reading:
                        ref.fault = f"SEAL({rec[1]}) while checkpoint {reading} is read"
                        return ref
                    sealed, open_epoch, kept = rec[1], rec[1] + 1, 0
                    ref.log.append(rec)
                else:
                    assert image is not None  # (the reader yields the header first)
                    op = (*rec, open_epoch == 0)
                    if open_epoch == 0:
                        image.apply(op)
                    else:
                        kept += DISK_HEAD_BYTES + (len(rec[3]) if kind == "write" else 0)
                        if kept > CORE_LIMITS["max_disk_epoch_bytes"]:
                            ref.fault = f"disk epoch {open_epoch} past the sink's bound"
                            return ref
                        waiting.setdefault(open_epoch, []).append(op)
                    ref.log.append(op)
        elif isinstance(e, LastCheckpoint):
            last = True
        elif isinstance(e, CheckpointEnd):
            if disks and sealed != e.index:
                ref.fault = f"checkpoint {e.index} ended before SEAL({e.index})"
                return ref
            if disks:
                assert image is not None  # (SEAL(0) came, after the header)
                for op in waiting.pop(e.index, []):
                    image.apply(op)
                ref.images.append(image.copy())
            ref.log.append(("commit", e.index, e.index if disks else None))
            reading = e.index + 1
            if last:
                return ref
    return ref


class CoreRun:
    """One run of the core over an input: its End, what its backup saw."""

    def __init__(self, kind: str, message: str, backup: RecordingBackup | None, hello) -> None:
        self.kind = kind
        self.message = message
        self.backup = backup
        self.hello = hello

    @property
    def commits(self) -> list[tuple[int, list[int]]]:
        return self.backup.commits if self.backup is not None else []

    @property
    def log(self) -> list[tuple]:
        return self.backup.log if self.backup is not None else []


def _core_run(data: bytes, cuts: list[bytes] | None, direct: bool) -> CoreRun:
    from receiver.core import Admit, End, Handover, Limits, ReceiverCore, Send
    from xenbind.session import ERR_FAILED_OVER

    core = ReceiverCore(Limits(**CORE_LIMITS), now=0.0)
    backup: RecordingBackup | None = None
    ends: list[End] = []

    def run(actions: list) -> None:
        nonlocal backup
        for i, a in enumerate(actions):
            if isinstance(a, Admit):
                p2m = a.hello.domain.pages
                if p2m > CORE_MAX_PAGES:
                    run(core.refuse("limit", "too big"))
                    continue
                disks = a.hello.domain.disks
                if disks:
                    sink = RecordingDiskBackup(p2m, CORE_LIMITS["max_staged_bytes"], disks)
                    sink.core = core
                    backup = sink
                    run(core.accept(1000, sink, 0.0, disk_hashes=[], disks=sink))
                else:
                    backup = RecordingBackup(p2m, CORE_LIMITS["max_staged_bytes"])
                    run(core.accept(1000, backup, 0.0))
            elif isinstance(a, Handover):
                # a switchover's checkpoint: the daemon resumes, then closes with its verdict
                assert i == len(actions) - 1 and backup is not None, "Handover not last"
                assert backup.commits and backup.commits[-1][0] == a.index
                run(core.close(ERR_FAILED_OVER, "switched over"))
            elif isinstance(a, End):
                assert i == len(actions) - 1 and not ends, "End not last, or twice"
                ends.append(a)
            else:
                assert isinstance(a, Send) or type(a).__name__ == "HeartbeatSeen"
        held = core.disk
        if held is not None:  # the disk decoder holds at most one record
            assert held.buffered <= DISK_DECODER_MAX, f"the disk decoder holds {held.buffered} B"

    run(core.tick(0.0))
    for piece in cuts if cuts is not None else [data]:
        view = memoryview(piece)
        while len(view) and not ends:
            buf = core.get_buffer() if direct else None
            if buf is not None:
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                view = view[n:]
                run(core.buffer_updated(n))
            else:
                run(core.receive_data(view))
                view = view[len(view) :]
    if not ends:
        run(core.receive_eof())
    run(core.tick(1e6))
    assert len(ends) == 1, f"ends {ends}"
    assert core.decoder is None and core.staging is None, "an ended core holds its buffers"
    assert core.disk is None and core.disk_sink is None, "an ended core holds its disk stream"
    return CoreRun(ends[0].kind, ends[0].message, backup, core.hello)


def check_core(data: bytes) -> None:
    """Targets ``core`` and ``core-disk``: the receiver's ReceiverCore over one
    connection's bytes (the disk rules when the HELLO names disks; wire
    segments when it offers a wire codec: target ``core-wire``)."""
    from xenbind.session import PREFIX, pick_wire
    from xenbind.stream import CheckpointEnd, Pages

    whole = _core_run(data, None, False)
    split = _core_run(data, pieces(data), True)
    assert (whole.kind, whole.commits) == (split.kind, split.commits), (
        f"whole {whole.kind, whole.commits!r} != split {split.kind, split.commits!r}"
    )
    assert whole.log == split.log, "the backup saw other calls whole and split"
    hello = whole.hello
    if whole.backup is None:
        return  # refused, or no HELLO
    # every commit is a checkpoint the decoder completed, with exactly its pages
    body = data[PREFIX.size + PREFIX.unpack_from(data)[3] :]
    wire = pick_wire(hello.options.wire)
    if wire:  # the stream is what the segments decode to, as far as they do
        body = wire_decoded(body, wire)
    caps = dict(
        max_p2m_size=hello.domain.pages,
        max_compressed=CORE_LIMITS["max_compressed"],
        max_context=CORE_LIMITS["max_context"],
        max_device_model=CORE_LIMITS["max_device_model"],
        max_cache_pages=CORE_LIMITS["max_cache_pages"],
        max_toolstack=CORE_LIMITS["max_context"],
    )
    events, _ = decode_all([body], caps)
    commits = whole.commits
    if commits:
        whole_ckpts: list[tuple[int, list[int]]] = []
        pages: list[int] = []
        for e in events:
            if isinstance(e, Pages):
                pages.extend(int(p) for p in e.pfns)
            elif isinstance(e, CheckpointEnd):
                whole_ckpts.append((e.index, pages))
                pages = []
        assert commits == whole_ckpts[: len(commits)], "a commit that is not a whole checkpoint"
    check_disks(whole, events)


def check_disks(run: CoreRun, events: list) -> None:
    """The disk rules of one accepted session's run (see above)."""
    hello, backup = run.hello, run.backup
    assert backup is not None
    disks = hello.domain.disks
    ref = reference_disk_session(events, disks)
    log = backup.log
    assert log == ref.log[: len(log)], "the disk sink saw calls the stream does not imply"
    disk_end = run.kind == "violation" and DISK_VIOLATION.match(run.message) is not None
    if ref.fault is not None:
        assert run.kind == "violation", (
            f"{ref.fault}: the session ended {run.kind!r} ({run.message}), not 'violation'"
        )
    if disk_end:
        assert ref.fault is not None, f"a disk violation of a sound disk stream: {run.message}"
        assert log == ref.log, "a disk violation before the stream's disk fault"
    if run.kind in ("clean", "link-lost", "closed"):
        assert log == ref.log, f"the session ended {run.kind!r} short of the stream's disk calls"
    if not disks:
        return
    assert isinstance(backup, RecordingDiskBackup)
    n = len(run.commits)
    assert backup.images == ref.images[:n], "the disks at a commit are not the stream's"
    if n:
        assert backup.image == ref.images[n - 1], (
            "the disks after the session are not the last committed checkpoint's"
        )


# --- wire compression (xenbind.wirecomp) -------------------------------------


def wire_decoded(data: bytes, codec: str) -> bytes:
    """The stream bytes of the segments in ``data`` that decode whole, up to
    the first bad one: an independent reader of the segment layout (not
    xenbind.wirecomp's), using the codecs' libraries directly."""
    import lz4.block
    import zstandard

    from xenbind.wirecomp import CODECS, KIND_RAW, MAX_SEGMENT_RAW, SEGMENT, max_stored

    out = bytearray()
    at = 0
    while at + SEGMENT.size <= len(data):
        kind, reserved, stored, raw = SEGMENT.unpack_from(data, at)
        if kind not in (KIND_RAW, CODECS[codec]) or reserved != bytes(3):
            break
        if not 1 <= raw <= MAX_SEGMENT_RAW or not 1 <= stored <= max_stored(kind, raw):
            break
        if kind == KIND_RAW and stored != raw:
            break
        payload = data[at + SEGMENT.size : at + SEGMENT.size + stored]
        if kind == KIND_RAW:
            out += payload  # a raw segment's bytes count as they arrive, whole or not
            if len(payload) < stored:
                break
        else:
            if len(payload) < stored:
                break
            try:
                if codec == "zstd":
                    if zstandard.frame_content_size(payload) != raw:
                        break
                    piece = zstandard.ZstdDecompressor().decompress(
                        payload, max_output_size=raw, allow_extra_data=False
                    )
                else:
                    piece = lz4.block.decompress(payload, uncompressed_size=raw)
            except (zstandard.ZstdError, lz4.block.LZ4BlockError):
                break
            if len(piece) != raw:
                break
            out += piece
        at += SEGMENT.size + stored
    return bytes(out)


def _wire_run(codec: str, chunks: list[bytes]) -> tuple[bytes, str | None, int]:
    """Feed a wirecomp.Decoder; (stream bytes out, error text, largest buffer held)."""
    from xenbind.wirecomp import SEGMENT, Decoder, max_stored

    d = Decoder(codec, offset=100)
    out = bytearray()
    error = None
    held = 0
    try:
        for c in chunks:
            for piece in d.feed(c):
                out += piece
            held = max(held, len(d._payload) + len(d._head))
    except ProtocolError as exc:
        for piece in getattr(exc, "out", []):  # decoded before the bad segment
            out += piece
        error = str(exc)
        assert str(exc).startswith("byte "), f"an error without its offset: {exc}"
        # dead from then on, with the same error
        try:
            d.feed(b"x")
        except ProtocolError as again:
            assert str(again) == error, "a dead decoder changed its error"
        else:
            raise AssertionError("a decoder fed after an error did not raise")
    cap = SEGMENT.size + max_stored(1, 1 << 20)
    assert held <= cap, f"the wire decoder held {held} bytes"
    return bytes(out), error, d.counts.raw_bytes


def check_wire(data: bytes) -> None:
    """Target ``wire``: xenbind.wirecomp.Decoder alone. The first byte picks
    the codec; the rest is the wire. Whole and split feeds agree, the output
    is what an independent reader of the layout decodes, only ProtocolError
    comes out, and no more than one segment is buffered."""
    if not data:
        return
    codec = ("zstd", "lz4")[data[0] & 1]
    wire = data[1:]
    whole = _wire_run(codec, [wire])
    split = _wire_run(codec, pieces(wire))
    assert whole == split, f"whole {whole[1:]!r} != split {split[1:]!r}"
    assert whole[0] == wire_decoded(wire, codec), "the decoder and the reference disagree"
    assert whole[2] == len(whole[0]), "counts.raw_bytes is not what came out"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "stream": check_stream,
    "chunks": check_chunks,
    "session": check_receiver_session,
    "reply": check_sender_session,
    "codec": check_codec,
    "core": check_core,
    "core-disk": check_core,
    "core-wire": check_core,
    "wire": check_wire,
}


def all_findings(data: bytes) -> Iterator[str]:  # pragma: no cover - debugging aid
    """Run every target on ``data``; yield 'target: exception' for each finding."""
    for name, fn in TARGETS.items():
        try:
            fn(data)
        except Exception as exc:  # noqa: BLE001 - a finding is any exception
            yield f"{name}: {type(exc).__name__}: {exc}"


__all__ = ["TARGETS", "pieces", "RemusError", "StreamError"]
