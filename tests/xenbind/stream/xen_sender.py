"""An independent writer of Remus streams as Xen 4.5's sender writes them, and
its restore (no tests of its own).

Written from Xen's C code (tools/libxc at RELEASE-4.5.0), not from this
project's encoder, so that a test can check the receiver against what Xen
itself sends:

* xc_compression.c (the sender's compressor and restore's decompressor)
  - an LRU list of ``cache_pages`` slots, all free at first, the head the most
    recently used; a miss takes the tail slot (evicting its PFN), moves it to
    the head and sends the page whole: FULL_PAGE 0x80 + 4096 bytes
    (add_full_page), copied into the slot;
  - a hit moves the slot to the head and sends compress_page's runs: walk
    the 1024 words, close the current run when its kind changes or it holds
    127 words, force the last one out at word 1024; a RUN marker (bit 7
    clear) + its new words, which also go into the cached copy; a SKIP
    marker (bit 7 set); a page with nothing but SKIPs is EMPTY_PAGE 0x00;
  - a page-table page (``israw`` from xc_domain_save) is first dropped from
    the cache (invalidate_cache_page: its slot goes to the tail as free),
    then sent whole and NOT cached;
  - pages wait in a page buffer of ``buffer_pages`` (8192); when it fills, and
    at the end of the checkpoint, they are compressed into COMPRESSED_DATA
    chunks: ``int -12, unsigned long length, payload``; a chunk closes when
    the next page may not fit (write_compressed: the outbuf must hold
    4105 bytes for a delta page, 4097 for a whole one).
  - uncompress_page applies a page in place on the restore's copy of it:
    0x00 leaves it, 0x80 overwrites it, RUNs overwrite their words.
* xc_domain_save.c (what a checkpoint body holds)
  - batches of at most 1024 entries: ``int count``, ``count`` unsigned longs
    ``pfn | type << 28``; in Format A the 4096-byte pages of the entries
    with data follow; when compressing, no page data (the pages go to the
    compressor's buffer, flushed inline when it fills);
  - once every page is listed: (the rest of the compressed pages, after the
    guest is resumed), then VCPU_INFO ``int -2, int max_vcpu_id, uint64
    vcpumap[max_vcpu_id / 64 + 1]`` (every checkpoint), the HVM parameters
    that are not zero, each ``int id, uint32 pad, uint64 value``, in the
    order GENERATION_ID_ADDR, IDENT_PT, PAGING_RING, ACCESS_RING,
    SHARING_RING, VM86_TSS, CONSOLE_PFN, ACPI_IOPORTS_LOCATION, VIRIDIAN,
    IOREQ_SERVER_PFN, NR_IOREQ_SERVER_PAGES, then TOOLSTACK ``int -18,
    uint32 len, data`` (libxl's), LAST_CHECKPOINT ``-9`` if it is the last,
    ENABLE_COMPRESSION ``-13`` once (in the first, uncompressed checkpoint),
    ``int 0``; TSC_INFO ``-7`` before the initial copy's last round;
  - the HVM tail: three uint64 magic PFNs, uint32 length + HVM context; the
    toolstack then adds its device-model record ("DeviceModelRecord0002",
    uint32 length, data: Remus's libxl).
* xc_domain_restore.c accepts an empty COMPRESSED_DATA chunk (length 0);
  ``empty_chunks`` writes one before and after every flush.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

PAGE = 4096
WORDS = 1024
MAX_BATCH = 1024
INVALID = None

XTAB = 0xF
TSC_INFO = struct.pack("<iIQII", -7, 0, 123456789, 2_000_000, 1)

#: (tag, the HVM_PARAM_* it carries), in the order xc_domain_save.c writes them
HVM_PARAM_ORDER = [
    (-14, 34),  # HVM_GENERATION_ID_ADDR, HVM_PARAM_VM_GENERATION_ID_ADDR
    (-3, 12),  # HVM_IDENT_PT
    (-15, 27),  # HVM_PAGING_RING_PFN
    (-16, 28),  # HVM_ACCESS_RING_PFN
    (-17, 29),  # HVM_SHARING_RING_PFN
    (-4, 15),  # HVM_VM86_TSS
    (-8, 17),  # HVM_CONSOLE_PFN
    (-10, 19),  # HVM_ACPI_IOPORTS_LOCATION
    (-11, 9),  # HVM_VIRIDIAN
    (-19, 32),  # HVM_IOREQ_SERVER_PFN
    (-20, 33),  # HVM_NR_IOREQ_SERVER_PAGES
]


class _Slot:
    __slots__ = ("next", "page", "pfn", "prev")

    def __init__(self) -> None:
        self.pfn: int | None = INVALID
        self.page = bytearray(PAGE)
        self.prev: _Slot | None = None
        self.next: _Slot | None = None


class XenCache:
    """xc_compression.c's cache: a doubly linked list of slots and pfn2cache."""

    def __init__(self, pages: int) -> None:
        self.slots = [_Slot() for _ in range(pages)]
        for a, b in zip(self.slots, self.slots[1:], strict=False):
            a.next, b.prev = b, a
        self.head, self.tail = self.slots[0], self.slots[-1]
        self.pfn2cache: dict[int, _Slot] = {}

    def _to_head(self, item: _Slot) -> None:
        if item is self.head:
            return
        if item is self.tail:
            self.tail = item.prev  # type: ignore[assignment]
            self.tail.next = None
        else:
            item.prev.next = item.next  # type: ignore[union-attr]
            item.next.prev = item.prev  # type: ignore[union-attr]
        item.prev = None
        item.next = self.head
        self.head.prev = item
        self.head = item

    def get(self, pfn: int) -> tuple[_Slot, bool]:
        """get_cache_page: (the slot, whether it was a miss)."""
        item = self.pfn2cache.get(pfn)
        raw = item is None
        if item is None:
            item = self.tail
            if item.pfn is not INVALID:
                del self.pfn2cache[item.pfn]
            item.pfn = pfn
            self.pfn2cache[pfn] = item
        self._to_head(item)
        return item, raw

    def invalidate(self, pfn: int) -> None:
        """invalidate_cache_page: a page-table page leaves the cache; its slot
        goes to the tail, free."""
        item = self.pfn2cache.get(pfn)
        if item is None:
            return
        if item is not self.tail:
            if item is self.head:
                self.head = item.next  # type: ignore[assignment]
                self.head.prev = None
            else:
                item.prev.next = item.next  # type: ignore[union-attr]
                item.next.prev = item.prev  # type: ignore[union-attr]
            item.next = None
            item.prev = self.tail
            self.tail.next = item
            self.tail = item
        del self.pfn2cache[pfn]
        self.tail.pfn = INVALID

    def pfns(self) -> set[int]:
        return set(self.pfn2cache)


def compress_page(src: bytes, cache_page: bytearray) -> bytes:
    """compress_page_literal's output, computed per run instead of per word
    (the same walk: maximal runs of changed / unchanged words, each cut into
    pieces of 127 words from its start); updates cache_page."""
    new = np.frombuffer(src, "<u4")
    old = np.frombuffer(bytes(cache_page), "<u4")
    diff = old != new
    if not diff.any():
        return b"\x00"
    cuts = np.flatnonzero(diff[1:] != diff[:-1]) + 1
    dest = bytearray()
    for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), WORDS], strict=True):
        copying = bool(diff[a])
        for c in range(a, b, 127):
            n = min(127, b - c)
            if copying:
                dest.append(n)
                dest += src[4 * c : 4 * (c + n)]
            else:
                dest.append(0x80 | n)
    cache_page[:] = src  # every changed word was copied in; the rest equal
    return bytes(dest)


def compress_page_literal(src: bytes, cache_page: bytearray) -> bytes:
    """xc_compression.c's compress_page, word for word; updates cache_page."""
    new = struct.unpack(f"<{WORDS}I", src)
    old = struct.unpack(f"<{WORDS}I", bytes(cache_page))
    dest = bytearray()
    runptr = runlen = 0
    wascopying = copying = False
    bytes_skipped = 0
    for off in range(WORDS + 1):
        copying = (old[off] != new[off]) if off < WORDS else not wascopying
        if runlen and (wascopying != copying or runlen == 127):
            runbytes = runlen * 4
            dest.append(runlen | (0 if wascopying else 0x80))
            if wascopying:
                pageoff = runptr * 4
                dest += src[pageoff : pageoff + runbytes]
                cache_page[pageoff : pageoff + runbytes] = src[pageoff : pageoff + runbytes]
            else:
                bytes_skipped += runbytes
            runlen = 0
            runptr = off
        runlen += 1
        wascopying = copying
    if bytes_skipped == PAGE:
        return b"\x00"
    return bytes(dest)


def uncompress_page(buf: bytes, pos: int, dest: bytearray) -> int:
    """xc_compression_uncompress_page: apply one page at buf[pos:] in place on
    ``dest``; the position after it (AssertionError on malformed data)."""
    m = buf[pos]
    if m == 0x00:
        return pos + 1
    if m == 0x80:
        assert pos + 1 + PAGE <= len(buf)
        dest[:] = buf[pos + 1 : pos + 1 + PAGE]
        return pos + 1 + PAGE
    pagepos = 0
    while True:
        flag, n = buf[pos] & 0x80, (buf[pos] & 0x7F) * 4
        assert n
        pos += 1
        if not flag:
            assert pos + n <= len(buf) and pagepos + n <= PAGE
            dest[pagepos : pagepos + n] = buf[pos : pos + n]
            pos += n
        pagepos += n
        if not (pagepos < PAGE and pos < len(buf)):
            break
    assert pagepos == PAGE
    return pos


@dataclass
class XenSender:
    """One Remus stream of one guest, as Xen 4.5's xc_domain_save writes it.

    ``memory`` (p2m_size x 4096, uint8) is the guest's memory: change it, then
    call ``checkpoint(pfns)`` with the PFNs dirtied. ``types[pfn]`` is its
    page type (0 data, 1-4 page tables, 9-0xC pinned ones, 0xF a hole).
    ``restored`` is what Xen's restore holds after each checkpoint it
    received whole (uncompress_page in place on it)."""

    p2m_size: int
    cache_pages: int = 8192
    buffer_pages: int = 8192
    outbuf: int = 16 << 20  # write_compressed's output buffer, per chunk
    hvm_params: dict[int, int] = field(default_factory=dict)  # tag -> value
    max_vcpu_id: int = 0
    online: tuple[int, ...] = (0,)
    toolstack: bytes | None = None
    empty_chunks: bool = False
    hvm_context: bytes = b"hvm-context"
    device_model: bytes = b"qemu-state"
    magic_pfns: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        self.memory = np.zeros((self.p2m_size, PAGE), np.uint8)
        self.types = np.zeros(self.p2m_size, np.uint8)
        self.cache = XenCache(self.cache_pages)
        self.restored = np.zeros((self.p2m_size, PAGE), np.uint8)
        self.compressing = False
        self._buffer: list[tuple[int | None, bytes]] = []  # (pfn or None if raw, page)
        self.index = 0
        self.deltas = 0  # pages sent as compress_page's runs (or 0x00)
        self.whole = 0  # pages sent whole in COMPRESSED_DATA

    # ------------------------------------------------------------ pieces

    def header(self) -> bytes:
        return struct.pack("<Q", self.p2m_size)

    def _batch(self, pfns: list[int]) -> bytes:
        entries = [p | (int(self.types[p]) << 28) for p in pfns]
        return struct.pack(f"<i{len(entries)}Q", len(entries), *entries)

    def _flush(self) -> bytes:
        """write_compressed: the buffered pages as COMPRESSED_DATA chunks."""
        out = bytearray()
        if self.empty_chunks:
            out += struct.pack("<iQ", -12, 0)
        chunk = bytearray()
        for pfn, page in self._buffer:
            need = PAGE + 1 if pfn is None else PAGE + 9
            if chunk and len(chunk) + need > self.outbuf:
                out += struct.pack("<iQ", -12, len(chunk)) + chunk
                chunk = bytearray()
            if pfn is None:  # a page-table page: whole, not cached
                chunk += b"\x80" + page
                self.whole += 1
                continue
            slot, raw = self.cache.get(pfn)
            if raw:  # add_full_page, into the slot
                slot.page[:] = page
                chunk += b"\x80" + page
                self.whole += 1
            else:
                chunk += compress_page(page, slot.page)
                self.deltas += 1
        if chunk:
            out += struct.pack("<iQ", -12, len(chunk)) + chunk
        if self.empty_chunks:
            out += struct.pack("<iQ", -12, 0)
        self._buffer = []
        return bytes(out)

    def _records(self, last: bool) -> bytes:
        out = bytearray()
        words = self.max_vcpu_id // 64 + 1
        vmap = [0] * words
        for v in self.online:
            vmap[v // 64] |= 1 << (v % 64)
        out += struct.pack(f"<ii{words}Q", -2, self.max_vcpu_id, *vmap)
        for tag, _index in HVM_PARAM_ORDER:
            value = self.hvm_params.get(tag, 0)
            if value:
                out += struct.pack("<iIQ", tag, 0, value)
        if self.toolstack is not None:
            out += struct.pack("<iI", -18, len(self.toolstack)) + self.toolstack
        if last:
            out += struct.pack("<i", -9)
        return bytes(out)

    def _tail(self) -> bytes:
        return (
            struct.pack("<QQQ", *self.magic_pfns)
            + struct.pack("<I", len(self.hvm_context))
            + self.hvm_context
            + b"DeviceModelRecord0002"
            + struct.pack("<I", len(self.device_model))
            + self.device_model
        )

    # ------------------------------------------------------------ checkpoints

    def initial(self) -> bytes:
        """Checkpoint 0: every PFN, uncompressed (Format A), then
        ENABLE_COMPRESSION (XCFLAGS_CHECKPOINT_COMPRESS)."""
        out = bytearray(TSC_INFO)
        pfns = list(range(self.p2m_size))
        for i in range(0, len(pfns), MAX_BATCH):
            batch = pfns[i : i + MAX_BATCH]
            out += self._batch(batch)
            for p in batch:
                if self.types[p] != XTAB:
                    out += self.memory[p].tobytes()
                    self.restored[p] = self.memory[p]
        out += self._records(last=False) + struct.pack("<i", -13) + struct.pack("<i", 0)
        out += self._tail()
        self.compressing = True
        self.index = 1
        return bytes(out)

    def checkpoint(self, dirty: list[int] | np.ndarray, last: bool = False) -> bytes:
        """One compressed checkpoint of the dirty PFNs (ascending, as Xen's
        loop over N finds them)."""
        assert self.compressing
        out = bytearray()
        pfns = sorted(int(p) for p in dirty)
        for i in range(0, len(pfns), MAX_BATCH):
            batch = pfns[i : i + MAX_BATCH]
            out += self._batch(batch)
            for p in batch:
                t = int(self.types[p])
                if t == XTAB:
                    continue
                pagetable = 1 <= (t & 7) <= 4
                if pagetable:
                    self.cache.invalidate(p)  # xc_compression_add_page(israw=1)
                self._buffer.append((None if pagetable else p, self.memory[p].tobytes()))
                if len(self._buffer) == self.buffer_pages:  # add_page returned -1
                    out += self._flush()
        out += self._flush()  # after postcopy: the rest, then the tail buffer
        out += self._records(last) + struct.pack("<i", 0) + self._tail()
        self._restore(bytes(out), pfns)
        self.index += 1
        return bytes(out)

    def _restore(self, body: bytes, pfns: list[int]) -> None:
        """Xen's restore of that checkpoint: every compressed page applied in
        place on its page, in listing order (apply_batch)."""
        blob = bytearray()
        pos = 0
        while True:
            (t,) = struct.unpack_from("<i", body, pos)
            pos += 4
            if t > 0:
                pos += 8 * t
            elif t == -12:
                (n,) = struct.unpack_from("<Q", body, pos)
                blob += body[pos + 8 : pos + 8 + n]
                pos += 8 + n
            elif t == -2:
                (mx,) = struct.unpack_from("<i", body, pos)
                pos += 4 + 8 * (mx // 64 + 1)
            elif t == -18:
                (n,) = struct.unpack_from("<I", body, pos)
                pos += 4 + n
            elif t == -9:
                pass
            elif t == 0:
                break
            else:
                pos += 12  # an HVM parameter
        at = 0
        for p in pfns:
            if self.types[p] == XTAB:
                continue
            page = bytearray(self.restored[p].tobytes())
            at = uncompress_page(bytes(blob), at, page)
            self.restored[p] = np.frombuffer(bytes(page), np.uint8)
        assert at == len(blob)
