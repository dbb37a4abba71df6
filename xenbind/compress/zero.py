"""The known-zero set: PFNs the receiver holds as zeros (the zero base).

    z = KnownZero(size=p2m_size, limit=MAX_KNOWN_PFNS)
    z.note_raw(pfns, pages) -> int   pages sent/received whole in Format A
    z.forget(pfns)                   PFNs sent/received in Format A without data
    pfn in z                         known zero?
    z.pfns() -> uint64 array         the set, ascending (read-only view of it)

Layout: a bitmap, bit ``pfn & 7`` of byte ``pfn >> 3`` (the C kernel's
``zknown``/``zbits``, xenbind/compress/kernel.c), ``bits`` bits long.

Rules (the sender's: the Compressor keeps one; the receiver keeps none
since issue 15, it decodes every delta page on the page it holds, which for
a PFN in this set is those zeros):
    - ``note_raw``: a page all zero puts its PFN in the set, any other page
      takes it out; rows in order (a PFN twice: the later row counts). The
      zero test is the kernel's ``xb_note_raw`` (stops at a page's first
      non-zero word; only a zero page is read whole).
    - ``forget``: PFNs listed without data (XTAB, XALLOC, BROKEN) leave it.
    - The kernel's encoder takes out every PFN it encodes (whole or delta,
      hit or miss): its contents are in the cache.
    - Size: ``size`` bits up front (the stream's p2m_size), grown on demand
      (doubling) up to ``limit`` bits, at most MAX_KNOWN_PFNS (the 28-bit PFN
      field: 32 MiB). A PFN at or above the limit is never in the set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, SupportsInt, cast

import numpy as np
import numpy.typing as npt

from xenbind import PAGE_SIZE
from xenbind._codec import ffi, lib
from xenbind.types import PageArray, PfnArray

if TYPE_CHECKING:
    from xenbind._codec import CData  # the stub's type of a cffi pointer

#: PFNs the known-zero set can cover: the 28-bit PFN field of the stream
#: (2^28 bits = 32 MiB of bitmap at most); PFNs above it are simply unknown.
MAX_KNOWN_PFNS = 1 << 28


def _pfn_array(pfns: npt.ArrayLike) -> PfnArray:
    a = np.ascontiguousarray(pfns, dtype=np.uint64)
    if a.ndim != 1:
        raise ValueError(f"pfns must be one-dimensional, got shape {a.shape}")
    return a


def _page_rows(pages: PageArray, n: int) -> PageArray:
    pages = np.asarray(pages)
    if pages.dtype != np.uint8 or pages.shape != (n, PAGE_SIZE):
        raise ValueError(
            f"pages must be uint8 of shape ({n}, {PAGE_SIZE}), got {pages.dtype} {pages.shape}"
        )
    return np.ascontiguousarray(pages)


class KnownZero:
    """A bitmap of the PFNs the receiver holds as zeros (module rules)."""

    def __init__(self, size: int = 0, limit: int = MAX_KNOWN_PFNS) -> None:
        self.limit = min(max(0, int(limit)), MAX_KNOWN_PFNS)
        self.bitmap: npt.NDArray[np.uint8] = np.zeros(0, dtype=np.uint8)
        self._grow(max(0, int(size)))

    @property
    def bits(self) -> int:
        """PFNs the bitmap covers now (those >= it are not in the set)."""
        return min(len(self.bitmap) * 8, self.limit)

    def _grow(self, bits: int) -> None:
        """Cover PFNs below ``bits`` (capped at the limit)."""
        nbytes = (min(bits, self.limit) + 7) // 8
        if nbytes > len(self.bitmap):
            size = max(nbytes, min(2 * len(self.bitmap), (self.limit + 7) // 8))
            grown = np.zeros(size, np.uint8)
            grown[: len(self.bitmap)] = self.bitmap
            self.bitmap = grown

    def c_args(self) -> tuple[CData, int]:
        """(zknown, zbits) for the kernel: the bitmap and its length in bits."""
        if not len(self.bitmap):
            return ffi.NULL, 0
        return ffi.from_buffer("uint8_t[]", self.bitmap), self.bits

    def note_raw(self, pfns: npt.ArrayLike, pages: PageArray) -> int:
        """Pages sent (or received) whole in Format A, row i for pfns[i]:
        zero pages in, others out. Returns how many were all zero."""
        pfns = _pfn_array(pfns)
        pages = _page_rows(pages, len(pfns))
        if len(pfns):
            self._grow(int(pfns.max()) + 1)
        zk, bits = self.c_args()
        return int(
            lib.xb_note_raw(
                zk,
                bits,
                ffi.from_buffer("uint64_t[]", pfns),
                ffi.from_buffer("uint8_t[]", pages),
                len(pfns),
            )
        )

    def forget(self, pfns: npt.ArrayLike) -> None:
        """PFNs sent (or received) in Format A without data: out of the set."""
        a = _pfn_array(pfns)
        idx = a[a < np.uint64(self.bits)].astype(np.intp)
        if len(idx):
            np.bitwise_and.at(self.bitmap, idx >> 3, ~(np.uint8(1) << (idx & 7).astype(np.uint8)))

    def __contains__(self, pfn: object) -> bool:
        try:
            # any object: int() takes what it can (ints, numpy ints), the
            # except clause answers the rest
            p = int(cast(SupportsInt, pfn))
        except (TypeError, ValueError):
            return False
        return 0 <= p < self.bits and bool((self.bitmap[p >> 3] >> (p & 7)) & 1)

    def pfns(self) -> PfnArray:
        """The PFNs in the set, ascending (uint64; a fresh array)."""
        bits = np.unpackbits(self.bitmap, bitorder="little")[: self.bits]
        return np.flatnonzero(bits).astype(np.uint64)

    def __len__(self) -> int:
        return int(np.unpackbits(self.bitmap).sum())
