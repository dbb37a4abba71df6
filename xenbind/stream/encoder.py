"""Stream encoder, sans-IO: every function returns bytes (or a list of buffers).

The layout written is the one in ``xenbind.stream.format``. Functions:

    encode_header(p2m_size)                       unsigned long p2m_size
    encode_pfn_list(pfns, types=None)             +ve chunks, listing only (Format B)
    encode_body_a(pfns, pages, types=None)        +ve chunks with page data (Format A),
                                                  as a list of buffers
    encode_pages(...)                             the same, joined
    encode_body_b(pfns, pages, compressor, buffer_pages=8192, types=None)
                                                  Format B: listing chunks and
                                                  COMPRESSED_DATA chunks, interleaved
                                                  as Xen's sender does when its page
                                                  buffer fills
    encode_compressed(blob) / encode_enable_compression() / encode_last_checkpoint()
    encode_switchover()
    encode_tsc_info(mode, nsec, khz, incarnation) / encode_end() / encode_tail(ctx)
    encode_codec(codec, cache_pages) / encode_memory_digest(digest) / encode_heartbeat()
    memory_digest(memory)                         xxh3-128 of guest memory
    StreamWriter                                  a whole stream, checkpoint by checkpoint

Rules kept here:
* ``pages`` holds one row per entry that carries data (entries of type XTAB,
  XALLOC or BROKEN have no row); with ``types=None`` every entry is NOTAB.
* Batches hold at most 1024 entries; a PFN must fit in 28 bits.
* Misuse by the caller (wrong shapes, bad PFNs) raises ValueError: the encoder
  only ever sees this project's own data.
* Buffers returned may be memoryviews of the caller's ``pages`` (Format A):
  keep the array unchanged until they are written.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
import xxhash

from ..types import Context, PageArray, PfnArray

if TYPE_CHECKING:  # imported on first use at run time (the codec's C kernel)
    from ..compress import CodecStats, Compressor
from .format import (
    CHUNK_END,
    CODEC_IDS,
    DEFAULT_BUFFER_PAGES,
    DEVICE_MODEL_SIGNATURE,
    DIGEST_ALGORITHMS,
    DIGEST_IDS,
    LEGACY_CACHE_PAGES,
    MAX_BATCH,
    PAGE_SIZE,
    PFN_MASK,
    TAG_CODEC,
    TAG_COMPRESSED_DATA,
    TAG_DISK,
    TAG_ENABLE_COMPRESSION,
    TAG_HEARTBEAT,
    TAG_LAST_CHECKPOINT,
    TAG_MEMORY_DIGEST,
    TAG_SWITCHOVER,
    TAG_TSC_INFO,
    TYPE_HAS_DATA,
    TYPE_IS_PAGETABLE,
    TYPE_SHIFT,
    TYPE_VALID,
)

Buffer = bytes | memoryview

_INT = struct.Struct("<i")
_ULONG = struct.Struct("<Q")
_DISK_LEN = struct.Struct("<I")


class PageCompressor(Protocol):
    """What ``encode_body_b`` needs of ``xenbind.compress.Compressor``."""

    def compress(
        self, pfns: PfnArray, pages: PageArray, pagetable: npt.NDArray[np.bool_] | None = None
    ) -> bytes: ...


class _CompressView(Protocol):
    """``Compressor.compress_view``: what ``encode_body_b`` uses when the
    compressor has it (encodes in place, after ``headroom`` bytes)."""

    def __call__(
        self,
        pfns: PfnArray,
        pages: PageArray,
        pagetable: npt.NDArray[np.bool_] | None = None,
        *,
        headroom: int = 0,
    ) -> memoryview: ...


def encode_header(p2m_size: int) -> bytes:
    if not 1 <= p2m_size <= PFN_MASK + 1:
        raise ValueError(f"p2m_size {p2m_size} out of range 1..{PFN_MASK + 1}")
    return _ULONG.pack(p2m_size)


def _entries(
    pfns: npt.ArrayLike, types: npt.ArrayLike | None
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint8]]:
    """PFN entries (uint64 LE) and the per-entry type array, checked."""
    pfns = np.asarray(pfns)
    if pfns.ndim != 1:
        raise ValueError("pfns must be a 1-D array")
    pfns = pfns.astype(np.uint64, copy=False)
    if pfns.size and int(pfns.max()) > PFN_MASK:
        raise ValueError(f"PFN {int(pfns.max()):#x} does not fit in 28 bits")
    if types is None:
        t = np.zeros(pfns.shape, dtype=np.uint8)
    else:
        t = np.asarray(types)
        if t.shape != pfns.shape:
            raise ValueError("types must have the shape of pfns")
        if t.size and (int(t.min()) < 0 or int(t.max()) > 15 or not TYPE_VALID[t].all()):
            raise ValueError("invalid page type in types")
        t = t.astype(np.uint8, copy=False)
    entries = (pfns | (t.astype(np.uint64) << np.uint64(TYPE_SHIFT))).astype("<u8", copy=False)
    return entries, t


def _check_pages(pages: PageArray, count: int) -> PageArray:
    pages = np.asarray(pages)
    if pages.dtype != np.uint8 or pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
        raise ValueError("pages must be a uint8 array of shape (n, 4096)")
    if pages.shape[0] != count:
        raise ValueError(f"pages has {pages.shape[0]} rows, {count} entries carry data")
    return np.ascontiguousarray(pages)


def _batch_header(entries: npt.NDArray[np.uint64]) -> bytes:
    return _INT.pack(len(entries)) + entries.tobytes()


def encode_pfn_list(pfns: npt.ArrayLike, types: npt.ArrayLike | None = None) -> bytes:
    """Format B listing: +ve chunks of at most 1024 entries, no page data."""
    entries, _ = _entries(pfns, types)
    return b"".join(
        _batch_header(entries[s : s + MAX_BATCH]) for s in range(0, len(entries), MAX_BATCH)
    )


def encode_body_a(
    pfns: npt.ArrayLike, pages: PageArray, types: npt.ArrayLike | None = None
) -> list[Buffer]:
    """Format A: +ve chunks of at most 1024 entries, each followed by the data of
    its data-carrying entries. Page data are memoryviews of ``pages``."""
    entries, t = _entries(pfns, types)
    has_data = TYPE_HAS_DATA[t]
    pages = _check_pages(pages, int(has_data.sum()))
    flat = pages.reshape(-1).data  # memoryview(...): numpy types it for 3.12+ only
    out: list[Buffer] = []
    row = 0
    for s in range(0, len(entries), MAX_BATCH):
        e = min(s + MAX_BATCH, len(entries))
        out.append(_batch_header(entries[s:e]))
        k = int(has_data[s:e].sum())
        if k:
            out.append(flat[row * PAGE_SIZE : (row + k) * PAGE_SIZE])
            row += k
    return out


def encode_pages(
    pfns: npt.ArrayLike, pages: PageArray, types: npt.ArrayLike | None = None
) -> bytes:
    """``encode_body_a`` joined into one bytes object."""
    return b"".join(encode_body_a(pfns, pages, types))


def encode_body_b(
    pfns: npt.ArrayLike,
    pages: PageArray,
    compressor: PageCompressor,
    buffer_pages: int = DEFAULT_BUFFER_PAGES,
    types: npt.ArrayLike | None = None,
) -> list[Buffer]:
    """Format B page chunks for one batch of pages, as Xen's sender lays them out.

    PFNs are listed in +ve chunks of at most 1024 entries; the pages of each
    listed batch go into the sender's page buffer (``buffer_pages`` pages);
    each time it fills, a COMPRESSED_DATA chunk with exactly those pages goes
    out and listing carries on (the seed's corner case). Whatever remains is
    flushed at the end. The compressor's cache is updated in page order.
    """
    if buffer_pages < 1:
        raise ValueError("buffer_pages must be >= 1")
    entries, t = _entries(pfns, types)
    has_data = TYPE_HAS_DATA[t]
    data_pfns = (entries[has_data] & np.uint64(PFN_MASK)).astype(np.uint64)
    pagetable = TYPE_IS_PAGETABLE[t][has_data]
    pages = _check_pages(pages, len(data_pfns))
    any_pagetable = bool(pagetable.any())
    # data pages listed up to and including each entry
    listed = np.cumsum(has_data, dtype=np.int64)

    # a compressor that can encode in place (the project's Compressor) leaves
    # room for the chunk header before the payload: one buffer per chunk and
    # no copy of the payload
    in_place: _CompressView | None = getattr(compressor, "compress_view", None)

    def flush(lo: int, hi: int) -> Buffer:
        args = (data_pfns[lo:hi], pages[lo:hi], pagetable[lo:hi] if any_pagetable else None)
        if in_place is None:
            return encode_compressed(compressor.compress(*args))
        chunk = in_place(*args, headroom=COMPRESSED_HEADER)
        chunk[:COMPRESSED_HEADER] = compressed_header(len(chunk) - COMPRESSED_HEADER)
        return chunk

    out: list[Buffer] = []
    sent = 0  # data pages already compressed and emitted
    for s in range(0, len(entries), MAX_BATCH):
        e = min(s + MAX_BATCH, len(entries))
        out.append(_batch_header(entries[s:e]))
        have = int(listed[e - 1])
        while have - sent >= buffer_pages:
            out.append(flush(sent, sent + buffer_pages))
            sent += buffer_pages
    if sent < len(data_pfns):
        out.append(flush(sent, len(data_pfns)))
    return out


#: bytes before a COMPRESSED_DATA payload: int tag, unsigned long length
COMPRESSED_HEADER = 12


def compressed_header(length: int) -> bytes:
    """The COMPRESSED_HEADER bytes that open a COMPRESSED_DATA chunk."""
    if length == 0:
        raise ValueError("empty COMPRESSED_DATA chunk")
    return _INT.pack(TAG_COMPRESSED_DATA) + _ULONG.pack(length)


def encode_compressed(blob: bytes | memoryview) -> bytes:
    """-12 COMPRESSED_DATA: int tag, unsigned long length, the blob."""
    return compressed_header(len(blob)) + bytes(blob)


def encode_enable_compression() -> bytes:
    return _INT.pack(TAG_ENABLE_COMPRESSION)


def encode_last_checkpoint() -> bytes:
    return _INT.pack(TAG_LAST_CHECKPOINT)


def encode_switchover() -> bytes:
    return _INT.pack(TAG_SWITCHOVER)


def encode_heartbeat() -> bytes:
    return _INT.pack(TAG_HEARTBEAT)


def encode_disk(data: bytes | memoryview) -> bytes:
    """-1005 DISK: int tag, uint32 length, that piece of the disk stream."""
    if not 1 <= len(data) <= 0xFFFFFFFF:
        raise ValueError(f"a DISK chunk carries 1 to 2**32-1 bytes, not {len(data)}")
    return _INT.pack(TAG_DISK) + _DISK_LEN.pack(len(data)) + bytes(data)


def encode_end() -> bytes:
    return _INT.pack(CHUNK_END)


def encode_tsc_info(mode: int, nsec: int, khz: int, incarnation: int) -> bytes:
    """-7 TSC_INFO: uint32 mode, uint64 nsec, uint32 khz, uint32 incarnation."""
    return struct.pack("<iIQII", TAG_TSC_INFO, mode, nsec, khz, incarnation)


def encode_codec(codec: str, cache_pages: int) -> bytes:
    """Project tag CODEC: uint32 codec id, uint32 cache pages."""
    if codec not in CODEC_IDS:
        raise ValueError(f"codec {codec!r} has no id (known: {sorted(CODEC_IDS)})")
    if not 1 <= cache_pages <= 0xFFFFFFFF:
        raise ValueError("cache_pages out of range")
    return struct.pack("<iII", TAG_CODEC, CODEC_IDS[codec], cache_pages)


def encode_memory_digest(digest: bytes, algorithm: str = "xxh3-128") -> bytes:
    """Project tag MEMORY_DIGEST: uint32 algorithm, uint32 length, digest."""
    alg = DIGEST_IDS.get(algorithm)
    if alg is None:
        raise ValueError(f"unknown digest algorithm {algorithm!r}")
    if len(digest) != DIGEST_ALGORITHMS[alg][1]:
        raise ValueError(f"{algorithm} digest must be {DIGEST_ALGORITHMS[alg][1]} bytes")
    return struct.pack("<iII", TAG_MEMORY_DIGEST, alg, len(digest)) + bytes(digest)


def memory_digest(memory: bytes | memoryview | npt.NDArray[np.generic]) -> bytes:
    """xxh3-128 of the whole guest memory (canonical big-endian digest)."""
    if isinstance(memory, np.ndarray):
        memory = np.ascontiguousarray(memory).reshape(-1).data  # memoryview(...)
    return xxhash.xxh3_128(memory).digest()


def encode_tail(ctx: Context) -> bytes:
    """The HVM tail: 3 magic PFNs, HVM context, device-model record."""
    if len(ctx.magic_pfns) != 3:
        raise ValueError("magic_pfns must hold 3 PFNs")
    return b"".join(
        (
            struct.pack("<QQQ", *ctx.magic_pfns),
            struct.pack("<I", len(ctx.hvm_context)),
            bytes(ctx.hvm_context),
            DEVICE_MODEL_SIGNATURE,
            struct.pack("<I", len(ctx.device_model)),
            bytes(ctx.device_model),
        )
    )


class StreamWriter:
    """A whole stream, checkpoint by checkpoint, as the primary sends it.

    Checkpoint 0 (the initial copy) is Format A. With codec "xen" or "seed",
    its body closes with the codec announcement (when one is due) and
    ENABLE_COMPRESSION, and every later body is Format B through one
    ``Compressor`` whose LRU cache lives as long as the writer. With codec
    "none" every body is Format A and the stream is a pure legacy one.

        w = StreamWriter(p2m_size, codec="seed")
        bufs = [w.header()]
        bufs += w.checkpoint(pfns, pages, ctx)          # or, in pieces:
        bufs += w.pages(pfns, pages); bufs += w.end_checkpoint(ctx)

    Each ``pages`` call in Format B flushes its own page buffer at its end.
    ``heartbeat()``, ``tsc_info()`` may be called between any two calls.

    With a codec, the compressor exists from the first Format A body on and
    is told of every page sent whole there (``Compressor.note_sent_raw``;
    entries without data: ``forget_raw``), so a later cache miss on a PFN
    the receiver holds as zeros can travel as a delta against a zero page
    (docs/codecs.md, "zero base").
    """

    def __init__(
        self,
        p2m_size: int,
        codec: str = "none",
        cache_pages: int = LEGACY_CACHE_PAGES,
        buffer_pages: int = DEFAULT_BUFFER_PAGES,
    ) -> None:
        if codec not in ("none", *CODEC_IDS):
            raise ValueError(f"unknown codec {codec!r}")
        self.p2m_size = p2m_size
        self.codec = codec
        self.cache_pages = cache_pages
        self.buffer_pages = buffer_pages
        self.index = 0  # the checkpoint being written
        self.format = "A"
        self._compressor: Compressor | None = None  # made on first use
        self._last = False

    def header(self) -> bytes:
        return encode_header(self.p2m_size)

    @property
    def codec_stats(self) -> CodecStats | None:
        """The Format B compressor's running totals (``CodecStats``: cache
        hits/misses, pages, bytes), or None before the first Format B body."""
        return None if self._compressor is None or self.format == "A" else self._compressor.stats

    def _codec(self) -> Compressor:
        """The session's Compressor (codec "xen" or "seed"), made on first use."""
        if self._compressor is None:
            from ..compress import Compressor

            self._compressor = Compressor(self.codec, self.cache_pages, known_pfns=self.p2m_size)
        return self._compressor

    def _check_open(self) -> None:
        if self._last:
            raise ValueError("the stream already ended with LAST_CHECKPOINT")

    def pages(
        self, pfns: npt.ArrayLike, pages: PageArray, types: npt.ArrayLike | None = None
    ) -> list[Buffer]:
        """Page chunks for the current body (Format A or B as the stream stands)."""
        self._check_open()
        if self.format == "A":
            out = encode_body_a(pfns, pages, types)  # checks the arguments
            if self.codec != "none":
                # what the receiver now holds whole: known zeros for the codec
                pfns = np.asarray(pfns).astype(np.uint64, copy=False)
                comp = self._codec()
                if types is None:
                    comp.note_sent_raw(pfns, pages)
                else:
                    has_data = TYPE_HAS_DATA[np.asarray(types)]
                    comp.note_sent_raw(pfns[has_data], pages)
                    comp.forget_raw(pfns[~has_data])
            return out
        return list(encode_body_b(pfns, pages, self._codec(), self.buffer_pages, types))

    def tsc_info(self, mode: int, nsec: int, khz: int, incarnation: int) -> bytes:
        return encode_tsc_info(mode, nsec, khz, incarnation)

    def heartbeat(self) -> bytes:
        return encode_heartbeat()

    def end_checkpoint(
        self,
        ctx: Context,
        *,
        digest: bytes | None = None,
        last: bool = False,
        switchover: bool = False,
    ) -> list[Buffer]:
        """Closing chunks of the current body, the end chunk and the tail.
        ``switchover`` (with ``last``): the receiver resumes its backup."""
        self._check_open()
        if switchover and not last:
            raise ValueError("SWITCHOVER stands only in the last checkpoint")
        out: list[Buffer] = []
        enable = self.index == 0 and self.codec != "none"
        if enable and (self.codec != "xen" or self.cache_pages != LEGACY_CACHE_PAGES):
            out.append(encode_codec(self.codec, self.cache_pages))
        if enable:
            out.append(encode_enable_compression())
        if digest is not None:
            out.append(encode_memory_digest(digest))
        if switchover:
            out.append(encode_switchover())
        if last:
            out.append(encode_last_checkpoint())
            self._last = True
        out.append(encode_end())
        out.append(encode_tail(ctx))
        self.index += 1
        if enable:
            self.format = "B"
        return out

    def checkpoint(
        self,
        pfns: npt.ArrayLike,
        pages: PageArray,
        ctx: Context,
        types: npt.ArrayLike | None = None,
        *,
        digest: bytes | None = None,
        last: bool = False,
        switchover: bool = False,
    ) -> list[Buffer]:
        """One whole checkpoint: page chunks, closing chunks, end, tail."""
        return self.pages(pfns, pages, types) + self.end_checkpoint(
            ctx, digest=digest, last=last, switchover=switchover
        )
