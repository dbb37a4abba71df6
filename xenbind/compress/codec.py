"""Compressor and Decompressor: one batch of pages <-> one COMPRESSED_DATA payload.

    c = Compressor("xen")                      # or "seed"; cache_pages=8192
    blob = c.compress(pfns, pages, pagetable)  # pages: (n, 4096) uint8
    d = Decompressor("xen")
    pages = d.decompress(blob, pfns, base)     # (k, 4096), k pages in blob
    # base(pfns, out): fill out[i] with the receiver's copy of page pfns[i]
    pages = d.decompress(blob, pfns, Rows(memory, staged))  # the fused decode

    c.note_sent_raw(pfns, pages)               # pages sent whole in Format A

Rules:
    - The sender holds a PageCache (cache.py, an LRU of the last contents it
      sent); a cached page travels as a delta against that copy, any other
      page whole. The receiver decodes every delta page in place on its own
      copy of that PFN (its committed page), as Xen's restore does
      (apply_batch -> xc_compression_uncompress_page): it keeps no mirror of
      the sender's cache, so any cache size or eviction policy on the sender
      decodes, page-table pages dropped from Xen's cache included. The two
      agree because the receiver holds every page the sender sent (each
      checkpoint is committed whole before the next is decoded).
    - ``base`` is called at most once per blob, with the PFNs of the blob's
      delta pages that read their base (in blob order) and a C-contiguous
      (m, 4096) uint8 array to fill; whole pages need no base, nor does a
      xen delta page made of RUNs only (every word of it travels). Whatever ``base`` raises
      propagates; the pages of that blob are then undefined.
    - Page-table pages (pagetable[i] True) are always sent whole, and (like
      every page sent) leave their contents in the sender's cache.
    - Zero base (sender): a miss may travel as a delta page (seed
      BEGIN_PAGE + deltas, xen 0x00 or markers) against an all-zero page.
      The Compressor does so only for a PFN it knows the receiver holds as
      zeros: its last contents sent were all zero, sent whole in Format A
      (note_sent_raw), and it has not been compressed since (every PFN
      compressed leaves that set). Page-table pages stay whole; a zero-base
      page not smaller than the page whole is sent whole. Such a miss is
      still a miss for the LRU. The receiver needs no such set: its copy of
      that PFN is those zeros, and it decodes against its copy.
    - decompress() validates the whole blob before anything is applied
      (kernel xb_scan), then applies it (xb_apply); it returns k <=
      len(pfns) pages. With a ``Rows`` base (memory the kernel reads in
      place: committed rows by PFN, staged batches over them) it is one pass
      instead (xb_decode_from: no gather, no scan first): each page is
      validated and written in turn, so after an error ``out`` is undefined
      (as it always was to the caller); a base row past its memory raises
      ValueError. A blob holding more pages than pfns given, or
      anything malformed, raises CodecError naming the byte offset in the
      blob, the page index and the reason. A Decompressor holds no state
      between blobs: a failure leaves nothing out of step.
    - No allocation is sized by the data's content: the output holds at most
      min(len(pfns), len(data) // smallest page encoding) pages.
    - Codec "none" (Format A) has no compressed form: ConfigError.
    - One object, one thread: the kernel runs without the GIL and does not
      lock the cache. A Compressor keeps a scratch buffer of the largest
      batch's worst-case size (4105 bytes a page) between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
)
from xenbind.compress.zero import MAX_KNOWN_PFNS, KnownZero, _page_rows, _pfn_array
from xenbind.errors import CodecError, ConfigError
from xenbind.types import PageArray, PfnArray

if TYPE_CHECKING:
    from xenbind._codec import CData, XbError  # the stub's types of cffi pointers

__all__ = [
    "CODECS",
    "gather",
    "MAX_KNOWN_PFNS",
    "BaseSource",
    "CodecStats",
    "Rows",
    "Compressor",
    "Decompressor",
    "KnownZero",
]

#: What a Decompressor decodes delta pages against: ``base(pfns, out)`` fills
#: ``out[i]`` (a C-contiguous (len(pfns), 4096) uint8 array) with the
#: receiver's copy of page ``pfns[i]`` (uint64, in blob order).
BaseSource = Callable[[PfnArray, PageArray], None]

#: Staged pages laid over a memory image: (pfns, data) batches in stream
#: order, data a (>= len(pfns), 4096) uint8 array; a later batch wins.
Batches = Sequence[tuple[PfnArray, PageArray]]

#: kernel.c's XB_SEG_ZERO ("the base is a zero page") and XB_E_BAD_BASE
_SEG_ZERO = 0xFFFFFFFF
_BAD_BASE = 17


class Rows:
    """A base source that is memory: ``memory[pfn]`` is the receiver's
    committed page ``pfn`` (a (rows, 4096) uint8 array or memory map; None:
    every page reads as zeros), and the pages of ``staged`` (``Batches``)
    are laid over it, a later batch winning. Given to
    ``Decompressor.decompress`` as ``base``, the kernel reads each delta
    page's base where it is (``xb_apply_from``: no gather into the output
    first, the fused decode); called as ``base(pfns, out)`` it is the
    gather path (``gather`` + the overlay) every base source offers.

    A PFN at or past ``len(memory)`` (and not staged) is refused
    (ValueError), as ``gather`` refuses it. The owner may rebind
    ``memory`` and ``staged`` between blobs; both are read per call."""

    def __init__(self, memory: PageArray | None, staged: Batches = ()) -> None:
        self.memory = memory
        self.staged = staged

    def base_rows(self) -> tuple[PageArray | None, Batches]:
        """What the fused decode reads: (committed memory, staged batches)."""
        return self.memory, self.staged

    def __call__(self, pfns: PfnArray, out: PageArray) -> None:
        n = len(pfns)
        if self.memory is None:
            out[:n] = 0
        else:
            gather(self.memory, pfns, out)
        if self.staged:
            idx, which, at = staged_refs(self.staged, pfns)
            for b in np.unique(which):
                sel = which == b
                out[idx[sel]] = self.staged[int(b)][1][at[sel]]


def staged_refs(
    batches: Batches, pfns: PfnArray
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Which of ``pfns`` have a page among ``batches`` (the latest wins):
    (i, b, r) arrays, pfns[i]'s page is row r of batch b. Vectorised: one
    sort of the batches' PFNs, one search."""
    none = np.empty(0, np.intp)
    if not batches:
        return none, none, none
    lens = np.array([len(b[0]) for b in batches], dtype=np.intp)
    every = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
    if not len(every) or not len(pfns):
        return none, none, none
    # the last occurrence of each PFN: the first in the reversed array
    uniq, first_rev = np.unique(every[::-1], return_index=True)
    last = len(every) - 1 - first_rev
    pos = np.minimum(np.searchsorted(uniq, pfns), len(uniq) - 1)
    idx = np.flatnonzero(uniq[pos] == pfns)
    where = last[pos[idx]]  # index into `every`
    ends = np.cumsum(lens)
    which = np.searchsorted(ends, where, side="right")  # the batch holding it
    return idx, which, where - (ends - lens)[which]


def _rows_arg(a: PageArray, what: str) -> PageArray:
    if (
        not isinstance(a, np.ndarray)
        or a.dtype != np.uint8
        or a.ndim != 2
        or a.shape[1] != PAGE_SIZE
    ):
        raise ValueError(f"{what} must be a uint8 array of shape (rows, {PAGE_SIZE})")
    return np.ascontiguousarray(a)


#: What xb_scan marks each page of a blob with (kernel.c, XB_D_*): sent
#: whole; a delta applied on its base (the only kind ``base`` is asked for);
#: a xen delta of RUNs only, which overwrites every word of its base.
PAGE_WHOLE, PAGE_ON_BASE, PAGE_COVERED = 0, 1, 2


@dataclass
class CodecStats:
    """Running totals of one Compressor or Decompressor.

    hits/misses/evictions: the Compressor's cache lookups (a page sent whole
    for a pfn already cached counts as a hit); for a Decompressor, hits
    counts the delta pages (decoded on a base) and misses the whole pages.
    zero_base: the misses that travelled as deltas against a zero page
    (counted in misses too; sender only). bytes_in/bytes_out: what went in
    and came out (page bytes -> blob bytes when compressing, the reverse when
    decompressing).
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


def gather(memory: PageArray, pfns: npt.ArrayLike, out: PageArray) -> None:
    """``out[i] = memory[pfns[i]]`` for every i: rows of 4096 bytes, copied in
    C (the kernel's xb_gather, about memcpy's speed; numpy's ``take`` of
    rows runs at a third of it). What a base source over a memory image (an
    array or a memory map) runs once per chunk. Every PFN is checked against
    the image's rows before anything is copied (ValueError)."""
    idx = _pfn_array(pfns)
    n = len(idx)
    if (
        not isinstance(memory, np.ndarray)
        or memory.dtype != np.uint8
        or memory.ndim != 2
        or memory.shape[1] != PAGE_SIZE
        or not memory.flags.c_contiguous
    ):
        raise ValueError(f"memory must be a C-contiguous uint8 array of shape (rows, {PAGE_SIZE})")
    if (
        out.dtype != np.uint8
        or out.ndim != 2
        or out.shape[0] < n
        or out.shape[1] != PAGE_SIZE
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ValueError(
            f"out must be a writeable C-contiguous uint8 array of shape (>= {n}, 4096)"
        )
    if not n:
        return
    rc = lib.xb_gather(
        ffi.from_buffer("uint8_t[]", memory),
        len(memory),
        ffi.from_buffer("uint64_t[]", idx),
        n,
        ffi.from_buffer("uint8_t[]", out),
    )
    if rc < 0:
        raise ValueError(f"a PFN of {int(idx.max()):#x} is past the image's {len(memory)} pages")


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
    """The receiver's side: decodes blobs in place on the receiver's own pages.

    No cache, no known-zero set: the base of a delta page is what
    ``base`` returns for its PFN (module rules)."""

    def __init__(self, codec: str) -> None:
        self.codec = codec
        self._id = _codec_id(codec)
        self.stats = CodecStats()

    def decompress(
        self,
        data: bytes | bytearray | memoryview | npt.NDArray[np.uint8],
        pfns: npt.ArrayLike,
        base: BaseSource,
        out: PageArray | None = None,
    ) -> PageArray:
        """Decode the pages in `data`; the i-th belongs to pfns[i]. Returns a
        (k, 4096) uint8 array, k = pages in data (<= len(pfns)).

        `base` is called once (if any page is a delta) with the delta pages'
        PFNs and the rows to fill with their current contents. `out`, if
        given, is a C-contiguous uint8 array of shape (>= len(pfns), 4096):
        the pages are decoded into out[:k] and that view is returned, saving
        a fresh allocation. Rows of `out` past k, and all of it after an
        error, are left undefined."""
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
        delta = np.empty(rows, np.uint8)
        err = ffi.new("xb_error *")
        rows_of = getattr(base, "base_rows", None)
        if rows_of is not None:
            k = self._decode_from(src, length, pfns, rows_of(), out, delta, err)
        else:
            k = self._decode_gathered(src, length, pfns, base, out, delta, err)
        s = self.stats
        whole = int(np.count_nonzero(delta[:k] == PAGE_WHOLE))
        s.hits += k - whole
        s.misses += whole
        s.pages += k
        s.bytes_in += length
        s.bytes_out += k * PAGE_SIZE
        return out[:k]

    def _decode_gathered(
        self,
        src: CData,
        length: int,
        pfns: PfnArray,
        base: BaseSource,
        out: PageArray,
        delta: npt.NDArray[np.uint8],
        err: XbError,
    ) -> int:
        """The gather path: xb_scan validates the whole blob, ``base`` fills
        the first rows with the bases, xb_apply moves them and applies."""
        rows = len(delta)
        starts = np.empty(rows, np.uint64)
        c_starts = ffi.from_buffer("uint64_t[]", starts)
        c_delta = ffi.from_buffer("uint8_t[]", delta)
        k = int(lib.xb_scan(self._id, src, length, len(pfns), rows, c_starts, c_delta, err))
        if k < 0:
            raise CodecError(self._message(err, pfns))
        if not k:
            return 0
        flags = delta[:k] == PAGE_ON_BASE
        m = int(np.count_nonzero(flags))
        if m:
            # the bases of the pages that need one, in blob order, into
            # out[:m]; the kernel moves each to its own row as it applies
            # (back to front)
            base(pfns[:k][flags] if m < k else pfns[:k], out[:m])
        c_out = ffi.from_buffer("uint8_t[]", out)
        if lib.xb_apply(self._id, src, length, c_starts, c_delta, k, c_out, len(out), err) < 0:
            raise CodecError(self._message(err, pfns))
        return k

    def _decode_from(
        self,
        src: CData,
        length: int,
        pfns: PfnArray,
        where: tuple[PageArray | None, Batches],
        out: PageArray,
        delta: npt.NDArray[np.uint8],
        err: XbError,
    ) -> int:
        """The fused decode (xb_decode_from): one pass, each base read where
        it is; source 0 the committed memory (row = PFN), 1.. the staged
        batches (the latest page of each listed PFN)."""
        memory, staged = where
        sources = [] if memory is None else [_rows_arg(memory, "memory")]
        sources += [_rows_arg(data, "staged pages") for _, data in staged]
        for a in sources:
            if np.may_share_memory(a, out):
                raise ValueError("out overlaps the memory the bases are read from")
        rows = len(delta)
        seg: npt.NDArray[np.uint32] | None = None
        row: npt.NDArray[np.uint64] | None = None
        if memory is None or staged:
            first = 0 if memory is None else 1  # the source of staged batch 0
            seg = np.full(rows, _SEG_ZERO if memory is None else 0, np.uint32)
            row = pfns[:rows].copy()
            idx, which, at = staged_refs(staged, pfns[:rows])
            seg[idx] = which + first
            row[idx] = at
        bufs = [ffi.from_buffer("uint8_t[]", a) for a in sources]
        k = int(
            lib.xb_decode_from(
                self._id,
                src,
                length,
                len(pfns),
                rows,
                ffi.new("uint8_t *[]", bufs) if bufs else ffi.NULL,
                ffi.new("uint64_t[]", [len(a) for a in sources]) if bufs else ffi.NULL,
                len(sources),
                ffi.from_buffer("uint64_t[]", pfns),
                ffi.NULL if seg is None else ffi.from_buffer("uint32_t[]", seg),
                ffi.NULL if row is None else ffi.from_buffer("uint64_t[]", row),
                ffi.from_buffer("uint8_t[]", out),
                len(out),
                ffi.from_buffer("uint8_t[]", delta),
                err,
            )
        )
        if k >= 0:
            return k
        if err.code == _BAD_BASE:
            i = int(err.page)
            raise ValueError(
                f"the base of page {i} (pfn {int(pfns[i]):#x}): row {int(err.detail):#x} is "
                "past the pages of the memory it is read from"
            )
        raise CodecError(self._message(err, pfns))

    def _message(self, err: XbError, pfns: PfnArray) -> str:
        page = int(err.page)
        where = f"page {page}" + (f", pfn {int(pfns[page]):#x}" if page < len(pfns) else "")
        detail = int(err.detail)
        reason = ERROR_REASONS.get(err.code, "error code {detail}").format(detail=detail)
        return f"{self.codec} data byte {int(err.offset)} ({where}): {reason}"
