"""The LRU page cache: last contents sent for recently dirtied pages.

Storage (numpy arrays, shared with the C kernel through an xb_cache struct):
    data   (capacity, 4096) uint8   page contents, one slot per row
    pfn    (capacity,) uint64        pfn held by each slot (slots < used)
    prev, next (capacity,) uint32    LRU list of slots, head = most recent
    table  (2^k >= 2*capacity,) uint32  hash pfn -> slot + 1, 0 = empty

Rules (kept by kernel.c, identical on sender and receiver):
    - keyed by PFN; capacity fixed at creation (1 .. MAX_CACHE_PAGES).
    - a page found in the cache moves to the head (most recently used).
    - a page not found takes the next never-used slot while there is one,
      else the tail slot (the least recently used page is evicted), and
      moves to the head.
    - every page encoded or decoded, however it was sent (delta or whole,
      page-table pages included), leaves its new contents in its slot.
    - a miss sent as a delta against a zero page (codec.py, "zero base") is
      a miss like any other; its decoded contents go in its slot.
Only the kernel mutates the cache; this class creates it and lets tests and
tools look inside without changing the LRU order.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from xenbind import PAGE_SIZE
from xenbind._codec import ffi, lib
from xenbind.errors import ConfigError
from xenbind.types import PageArray, PfnArray

DEFAULT_CACHE_PAGES = 8192  # Xen's DELTA_CACHE_SIZE / page size
MAX_CACHE_PAGES = 1 << 18  # 1 GiB of cache: the most a peer may make us allocate
NIL = 0xFFFFFFFF  # end of the LRU list


class PageCache:
    """An LRU cache of page contents keyed by PFN (see the module rules)."""

    def __init__(self, capacity: int = DEFAULT_CACHE_PAGES) -> None:
        if not isinstance(capacity, int | np.integer) or not 1 <= capacity <= MAX_CACHE_PAGES:
            raise ConfigError(
                f"cache size {capacity!r} pages: must be an integer in 1..{MAX_CACHE_PAGES}"
            )
        capacity = int(capacity)
        tsize = 1 << max(1, (2 * capacity - 1).bit_length())
        self.capacity = capacity
        self.data: PageArray = np.zeros((capacity, PAGE_SIZE), dtype=np.uint8)
        self.pfn: PfnArray = np.zeros(capacity, dtype=np.uint64)
        self.prev: npt.NDArray[np.uint32] = np.full(capacity, NIL, dtype=np.uint32)
        self.next: npt.NDArray[np.uint32] = np.full(capacity, NIL, dtype=np.uint32)
        self.table: npt.NDArray[np.uint32] = np.zeros(tsize, dtype=np.uint32)
        self._bufs = [
            ffi.from_buffer("uint8_t[]", self.data),
            ffi.from_buffer("uint64_t[]", self.pfn),
            ffi.from_buffer("uint32_t[]", self.prev),
            ffi.from_buffer("uint32_t[]", self.next),
            ffi.from_buffer("uint32_t[]", self.table),
        ]
        c = ffi.new("xb_cache *")
        c.data, c.pfn, c.prev, c.next, c.table = self._bufs
        c.cap = capacity
        c.used = 0
        c.head = c.tail = NIL
        c.tmask = tsize - 1
        self.c = c

    @property
    def hits(self) -> int:
        return int(self.c.hits)

    @property
    def misses(self) -> int:
        return int(self.c.misses)

    @property
    def evictions(self) -> int:
        return int(self.c.evictions)

    @property
    def zero_base(self) -> int:
        """Misses sent (or received) as deltas against a zero page."""
        return int(self.c.zero_base)

    def __len__(self) -> int:
        return int(self.c.used)

    def __contains__(self, pfn: int) -> bool:
        return lib.xb_cache_slot(self.c, int(pfn)) >= 0

    def get(self, pfn: int) -> PageArray | None:
        """A copy of the cached contents of `pfn`, or None; no LRU effect."""
        s = lib.xb_cache_slot(self.c, int(pfn))
        return None if s < 0 else self.data[s].copy()

    def _slots(self) -> npt.NDArray[np.int64]:
        """Slot indices from the head (most recent) to the tail of the LRU list."""
        slots: list[int] = []
        s = int(self.c.head)
        while s != NIL and len(slots) <= self.capacity:
            slots.append(s)
            s = int(self.next[s])
        return np.array(slots, dtype=np.int64)

    def order(self) -> PfnArray:
        """The cached PFNs from most to least recently used."""
        return self.pfn[self._slots()]

    def snapshot(self) -> tuple[PfnArray, PageArray]:
        """(pfns MRU->LRU, their contents in that order): the cache's whole state."""
        idx = self._slots()
        return self.pfn[idx], self.data[idx]
