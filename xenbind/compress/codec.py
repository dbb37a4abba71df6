"""Compressor and Decompressor: one batch of pages <-> one COMPRESSED_DATA payload.

    c = Compressor("xen")                      # or "seed"; cache_pages=8192
    blob = c.compress(pfns, pages, pagetable)  # pages: (n, 4096) uint8
    d = Decompressor("xen")
    pages = d.decompress(blob, pfns)           # (k, 4096), k pages in blob

    c.note_sent_raw(pfns, pages)               # pages sent whole in Format A
    d = Decompressor("xen", known_zero=z)      # z: the receiver's KnownZero (zero.py),
    d.note_received_raw(pfns, pages)           #   kept from Format A as the sender keeps its

Rules:
    - Both sides hold a PageCache of the same capacity and run the same LRU
      operations page by page (cache.py), so the receiver's mirror equals
      the sender's cache and needs no other base.
    - Page-table pages (pagetable[i] True) are always sent whole, and (like
      every page sent) leave their contents in the cache. The receiver can
      therefore keep its mirror from the blob alone, without page types.
    - Zero base: a miss may travel as a delta page (seed BEGIN_PAGE + deltas,
      xen 0x00 or markers) against an all-zero page. The Compressor does so
      only for a PFN it knows the receiver holds as zeros: its last contents
      sent were all zero, sent whole in Format A (note_sent_raw), and it has
      not been compressed since (every PFN compressed leaves that set; after
      an eviction the receiver holds whatever was last sent). Page-table
      pages stay whole; a zero-base page not smaller than the page whole is
      sent whole. Such a miss is still a miss for the LRU (free slot or
      evicted tail). The Decompressor keeps the same set from what it
      receives (note_received_raw / forget_raw, every PFN decoded leaves it):
      a delta page for a PFN its mirror lacks is decoded against zeros only
      when that PFN is in its set (then cached as a miss, exactly as the
      sender did), and is refused otherwise (error 9: the two sides are out
      of step, or the stream lies). Xen's receiver (deltas applied to the
      backup's memory, which holds those zeros) decodes it the same way.
    - decompress() returns k <= len(pfns) pages; a blob holding more pages
      than pfns given, or anything malformed, raises CodecError naming the
      byte offset in the blob, the page index and the reason. Pages before
      the fault have reached the mirror, so a Decompressor that raised is
      out of step with its sender: it refuses every later call (the session
      ends; a new session starts with new caches).
    - No allocation is sized by the data's content: the output holds at most
      min(len(pfns), len(data) // smallest page encoding) pages.
    - Codec "none" (Format A) has no compressed form: ConfigError.
    - One object, one thread: the kernel runs without the GIL and does not
      lock the cache. A Compressor keeps a scratch buffer of the largest
      batch's worst-case size (4105 bytes a page) between calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from xenbind import PAGE_SIZE
from xenbind._codec import ffi, lib
from xenbind.compress.cache import DEFAULT_CACHE_PAGES, PageCache
from xenbind.compress.formats import (
    CODEC_IDS,
    CODECS,
    ERROR_REASONS,
    MAX_ENCODED_PAGE,
    MIN_ENCODED_PAGE,
    NO_BASE,
)
from xenbind.compress.zero import MAX_KNOWN_PFNS, KnownZero, _page_rows, _pfn_array
from xenbind.errors import CodecError, ConfigError
from xenbind.types import PageArray, PfnArray

if TYPE_CHECKING:
    from xenbind._codec import CData  # the stub's type of a cffi pointer

__all__ = ["CODECS", "MAX_KNOWN_PFNS", "CodecStats", "Compressor", "Decompressor", "KnownZero"]


@dataclass
class CodecStats:
    """Running totals of one Compressor or Decompressor.

    hits/misses/evictions: cache lookups (a page sent whole for a pfn already
    cached counts as a hit). zero_base: the misses that travelled as deltas
    against a zero page (counted in misses too). bytes_in/bytes_out: what
    went in and came out (page bytes -> blob bytes when compressing, the
    reverse when decompressing).
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    pages: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    zero_base: int = 0

    @property
    def ratio(self) -> float:
        """Page bytes per compressed byte (0.0 before any data)."""
        page_bytes = self.pages * PAGE_SIZE
        # one side of the count is the page bytes, the other the blob bytes
        blob_bytes = self.bytes_in + self.bytes_out - page_bytes
        return page_bytes / blob_bytes if blob_bytes else 0.0


def _codec_id(codec: str) -> int:
    if codec == "none":
        raise ConfigError(
            "codec 'none' sends pages uncompressed (Format A page data); "
            "it has no Compressor/Decompressor"
        )
    if codec not in CODEC_IDS:
        raise ConfigError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
    return CODEC_IDS[codec]


class Compressor:
    """The sender's side: encodes batches of pages against its page cache.

    ``known_pfns`` sizes the known-zero set up front (the stream's p2m_size);
    it grows on demand up to MAX_KNOWN_PFNS anyway."""

    def __init__(
        self, codec: str, cache_pages: int = DEFAULT_CACHE_PAGES, known_pfns: int = 0
    ) -> None:
        self.codec = codec
        self._id = _codec_id(codec)
        self.cache = PageCache(cache_pages)
        self.stats = CodecStats()
        self._out = np.empty(0, dtype=np.uint8)
        #: PFNs the receiver holds as zeros (zero.py); read it, do not change it
        self.zero = KnownZero(known_pfns)

    def note_sent_raw(self, pfns: npt.ArrayLike, pages: PageArray) -> int:
        """Record pages sent whole in Format A (row i for pfns[i], in order):
        an all-zero page makes its PFN known zero at the receiver, any other
        page makes it unknown. Returns how many pages were all zero. The
        test stops at a page's first non-zero word; only zero pages are read
        whole."""
        return self.zero.note_raw(pfns, pages)

    def forget_raw(self, pfns: npt.ArrayLike) -> None:
        """Record PFNs sent in Format A without data (XTAB, XALLOC, BROKEN):
        what the receiver holds there is no longer known."""
        self.zero.forget(pfns)

    def known_zero(self, pfn: int) -> bool:
        """Whether the receiver is known to hold ``pfn`` as zeros."""
        return pfn in self.zero

    def known_zero_pfns(self) -> PfnArray:
        """The known-zero set, ascending (a fresh uint64 array)."""
        return self.zero.pfns()

    def compress(
        self,
        pfns: npt.ArrayLike,
        pages: PageArray,
        pagetable: npt.ArrayLike | None = None,
    ) -> bytes:
        """Encode `pages` (row i belongs to pfns[i]) in order; the payload of one
        COMPRESSED_DATA chunk. Updates the cache page by page."""
        pfns = _pfn_array(pfns)
        need = len(pfns) * MAX_ENCODED_PAGE[self.codec]
        if len(self._out) < need:
            self._out = np.empty(need, dtype=np.uint8)
        return self._out[: self._encode(pfns, pages, pagetable, self._out)].tobytes()

    def compress_view(
        self,
        pfns: npt.ArrayLike,
        pages: PageArray,
        pagetable: npt.ArrayLike | None = None,
        *,
        headroom: int = 0,
    ) -> memoryview:
        """``compress`` without the copy into a bytes object (the sender's
        path): the payload is encoded into a fresh numpy buffer, which numpy
        backs with huge pages when large (4 KiB page faults are the dearest
        part of a big copy), at byte ``headroom`` of the view returned; the
        bytes before it are the caller's to fill (a chunk header), so one
        buffer carries the whole chunk."""
        pfns = _pfn_array(pfns)
        out = np.empty(headroom + max(1, len(pfns) * MAX_ENCODED_PAGE[self.codec]), np.uint8)
        size = self._encode(pfns, pages, pagetable, out[headroom:])
        # .data is memoryview(array); numpy types the buffer protocol for 3.12+ only
        return out[: headroom + size].data

    def _encode(
        self,
        pfns: PfnArray,
        pages: PageArray,
        pagetable: npt.ArrayLike | None,
        out: npt.NDArray[np.uint8],
    ) -> int:
        """Run the kernel into ``out`` (room for the worst case); the size."""
        n = len(pfns)
        pages = _page_rows(pages, n)
        pt: CData = ffi.NULL
        if pagetable is not None:
            pt_arr = np.ascontiguousarray(pagetable, dtype=np.bool_)
            if pt_arr.shape != (n,):
                raise ValueError(f"pagetable must have shape ({n},), got {pt_arr.shape}")
            pt = ffi.from_buffer("uint8_t[]", pt_arr.view(np.uint8))
        size = lib.xb_encode(
            self.cache.c,
            self._id,
            ffi.from_buffer("uint64_t[]", pfns),
            ffi.from_buffer("uint8_t[]", pages),
            pt,
            n,
            ffi.from_buffer("uint8_t[]", out),
            *self.zero.c_args(),
        )
        self._account(n, n * PAGE_SIZE, size)
        return size

    def _account(self, pages: int, bytes_in: int, bytes_out: int) -> None:
        s = self.stats
        s.hits, s.misses, s.evictions = self.cache.hits, self.cache.misses, self.cache.evictions
        s.zero_base = self.cache.zero_base
        s.pages += pages
        s.bytes_in += bytes_in
        s.bytes_out += bytes_out


class Decompressor:
    """The receiver's side: decodes blobs against a mirror of the sender's cache.

    ``known_zero``: the receiver's known-zero set, kept from the Format A
    pages received before this Decompressor existed (the stream Decoder
    hands over its own and goes on noting into it); by default an empty one.
    A delta page for a PFN neither in the mirror nor in that set is refused
    (error 9)."""

    def __init__(
        self,
        codec: str,
        cache_pages: int = DEFAULT_CACHE_PAGES,
        known_zero: KnownZero | None = None,
    ) -> None:
        self.codec = codec
        self._id = _codec_id(codec)
        self.cache = PageCache(cache_pages)
        self.stats = CodecStats()
        self.failed: str | None = None  # the error that put this decoder out of step
        #: PFNs the receiver holds as zeros (zero.py); the kernel clears the
        #: bit of every PFN decoded
        self.zero = known_zero if known_zero is not None else KnownZero()

    def note_received_raw(self, pfns: npt.ArrayLike, pages: PageArray) -> int:
        """Record pages received whole in Format A (the sender's
        ``note_sent_raw``, on the receiving side). Returns the zero pages."""
        return self.zero.note_raw(pfns, pages)

    def forget_raw(self, pfns: npt.ArrayLike) -> None:
        """Record PFNs received in Format A without data."""
        self.zero.forget(pfns)

    def known_zero(self, pfn: int) -> bool:
        """Whether this receiver holds ``pfn`` as known zeros."""
        return pfn in self.zero

    def known_zero_pfns(self) -> PfnArray:
        """The known-zero set, ascending (a fresh uint64 array)."""
        return self.zero.pfns()

    def decompress(
        self,
        data: bytes | bytearray | memoryview | npt.NDArray[np.uint8],
        pfns: npt.ArrayLike,
        out: PageArray | None = None,
    ) -> PageArray:
        """Decode the pages in `data`; the i-th belongs to pfns[i]. Returns a
        (k, 4096) uint8 array, k = pages in data (<= len(pfns)).

        `out`, if given, is a C-contiguous uint8 array of shape (>= len(pfns),
        4096) (a staging area, already faulted in): the pages are decoded into
        out[:k] and that view is returned, saving a fresh allocation. Rows of
        `out` past k, and all of it after an error, are left undefined."""
        if self.failed is not None:
            raise CodecError(f"decompressor out of step since an earlier error ({self.failed})")
        pfns = _pfn_array(pfns)
        src = ffi.from_buffer("uint8_t[]", data)
        length = len(src)
        rows = min(len(pfns), length // MIN_ENCODED_PAGE[self.codec])
        if out is None:
            out = np.empty((rows, PAGE_SIZE), dtype=np.uint8)
        elif (
            not isinstance(out, np.ndarray)
            or out.dtype != np.uint8
            or out.ndim != 2
            or out.shape[1] != PAGE_SIZE
            or out.shape[0] < len(pfns)
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ValueError(
                f"out must be a writeable C-contiguous uint8 array of shape (>= {len(pfns)}, "
                f"{PAGE_SIZE})"
            )
        err = ffi.new("xb_error *")
        k = lib.xb_decode(
            self.cache.c,
            self._id,
            src,
            length,
            ffi.from_buffer("uint64_t[]", pfns),
            len(pfns),
            ffi.from_buffer("uint8_t[]", out),
            rows,
            err,
            *self.zero.c_args(),
        )
        if k < 0:
            page = int(err.page)
            where = f"page {page}" + (f", pfn {int(pfns[page]):#x}" if page < len(pfns) else "")
            detail = int(err.detail)
            if err.code == NO_BASE:
                detail &= (1 << 64) - 1  # a pfn (uint64 in the int64 field)
            reason = ERROR_REASONS.get(err.code, "error code {detail}").format(detail=detail)
            message = f"{self.codec} data byte {int(err.offset)} ({where}): {reason}"
            self.failed = message
            self._account(0, 0)
            raise CodecError(message)
        self._account(k, length)
        return out[:k]

    def _account(self, pages: int, bytes_in: int) -> None:
        s = self.stats
        s.hits, s.misses, s.evictions = self.cache.hits, self.cache.misses, self.cache.evictions
        s.zero_base = self.cache.zero_base
        s.pages += pages
        s.bytes_in += bytes_in
        s.bytes_out += pages * PAGE_SIZE
