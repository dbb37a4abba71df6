"""xenbind.compress: round trips, the sender's LRU cache, the receiver's pages.

Every codec round-trips arbitrary sequences of batches (unchanged pages, one
word, scattered words, runs longer than 127 words, every word, misses,
evictions, batches larger than the cache, page-table pages); the receiver
decodes each delta page on the page it holds (tests/xenbind/compress/
receiver.py), and after every batch every page in the sender's cache equals
the receiver's page for that PFN (the base the next delta decodes on); the
sender's cache equals an independent LRU model.
The xen encoder is checked byte for byte against a transliteration of
xc_compression.c's compress_page loop, the seed encoder against the seed's
grammar written out in Python.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.xenbind.compress.receiver import Receiver
from xenbind._codec import lib
from xenbind.compress import (
    CODECS,
    DEFAULT_CACHE_PAGES,
    MAX_CACHE_PAGES,
    CodecStats,
    Compressor,
    Decompressor,
    PageCache,
)
from xenbind.compress import formats as F
from xenbind.errors import ConfigError

PAGE = 4096
WORDS = 1024
CODEC_NAMES = ("seed", "xen")


# ---------------------------------------------------------------- oracles


def xen_reference(old: np.ndarray, new: np.ndarray) -> bytes:
    """One cached page as Xen's compress_page emits it: walk the words, close
    the current run when its kind changes or it holds 127 words, force the
    last one out at word 1024; a page with nothing but SKIPs is 0x00."""
    ow, nw = old.view("<u4"), new.view("<u4")
    out = bytearray()
    runlen = start = skipped = 0
    was = False
    for off in range(WORDS + 1):
        copying = bool(ow[off] != nw[off]) if off < WORDS else not was
        if runlen and (was != copying or runlen == 127):
            if was:
                out.append(runlen)
                out += nw[start:off].tobytes()
            else:
                out.append(0x80 | runlen)
                skipped += runlen
            runlen, start = 0, off
        runlen += 1
        was = copying
    return b"\x00" if skipped == WORDS else bytes(out)


def seed_reference(old: np.ndarray, new: np.ndarray) -> bytes:
    """One cached page in the seed format: BEGIN_PAGE + (offset, new word) per
    changed word, or FULL_PAGE when that would exceed 682 deltas."""
    ow, nw = old.view("<u4"), new.view("<u4")
    changed = np.flatnonzero(ow != nw)
    if len(changed) > 682:
        return struct.pack("<hI", -101, 0) + new.tobytes()
    return struct.pack("<hI", -100, 0) + b"".join(
        struct.pack("<hI", 4 * int(w), int(nw[w])) for w in changed
    )


def full_reference(codec: str, page: np.ndarray) -> bytes:
    head = struct.pack("<hI", -101, 0) if codec == "seed" else b"\x80"
    return head + page.tobytes()


ZERO_PAGE = np.zeros(PAGE, np.uint8)


class Model:
    """Independent model of the sender: an OrderedDict LRU and the reference
    encoders, page by page, and the known-zero rule: a miss on a PFN last sent
    whole in Format A as zeros (and not compressed since) is a delta against a
    zero page, unless it is a page table or the delta is not smaller."""

    def __init__(self, codec: str, capacity: int) -> None:
        self.codec, self.capacity = codec, capacity
        self.lru: OrderedDict[int, np.ndarray] = OrderedDict()
        self.zero: set[int] = set()  # PFNs the receiver holds as zeros
        self.zero_base = 0

    def note_raw(self, pfns, pages) -> None:
        for pfn, page in zip(pfns.tolist(), pages, strict=True):
            if page.any():
                self.zero.discard(pfn)
            else:
                self.zero.add(pfn)

    def encode(self, pfns, pages, pagetable) -> bytes:
        out = []
        for pfn, page, pt in zip(pfns.tolist(), pages, pagetable, strict=True):
            old = self.lru.get(pfn)
            known_zero = old is None and pfn in self.zero
            self.zero.discard(pfn)
            if old is None:
                if len(self.lru) >= self.capacity:
                    self.lru.popitem(last=False)
                full = full_reference(self.codec, page)
                if known_zero and not pt:
                    ref = xen_reference if self.codec == "xen" else seed_reference
                    blob = ref(ZERO_PAGE, page)
                    if len(blob) < len(full):
                        self.zero_base += 1
                        full = blob
                out.append(full)
            elif pt:
                out.append(full_reference(self.codec, page))
            else:
                ref = xen_reference if self.codec == "xen" else seed_reference
                out.append(ref(old, page))
            self.lru[pfn] = page.copy()
            self.lru.move_to_end(pfn)
        return b"".join(out)

    def order(self) -> list[int]:
        return list(reversed(self.lru))


# -------------------------------------------------------------- strategies


@st.composite
def page_change(draw, base: np.ndarray) -> np.ndarray:
    """New contents of a page from its previous contents."""
    new = base.copy()
    w = new.view(np.uint32)
    kind = draw(st.sampled_from(["same", "one", "scattered", "run", "all", "random", "mask"]))
    idx: npt.ArrayLike  # the words to change
    if kind == "one":
        idx = [draw(st.integers(0, WORDS - 1))]
    elif kind == "scattered":
        idx = draw(st.lists(st.integers(0, WORDS - 1), min_size=1, max_size=40, unique=True))
    elif kind == "run":
        start = draw(st.integers(0, WORDS - 1))
        length = draw(st.integers(1, WORDS - start))
        idx = list(range(start, start + length))
    elif kind == "all":
        idx = list(range(WORDS))
    elif kind == "random":
        return np.random.default_rng(draw(st.integers(0, 2**32))).integers(
            0, 256, PAGE, dtype=np.uint8
        )
    elif kind == "mask":
        rng = np.random.default_rng(draw(st.integers(0, 2**32)))
        idx = np.flatnonzero(rng.random(WORDS) < draw(st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.95])))
    else:
        idx = []
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx):
        w[idx] ^= np.uint32(draw(st.integers(1, 2**32 - 1)))
    return new


@st.composite
def histories(draw):
    """A cache size, a pfn universe and a few batches over it."""
    capacity = draw(st.integers(1, 6))
    universe = draw(st.integers(1, 10))
    nbatches = draw(st.integers(1, 5))
    mem = {p: np.full(PAGE, p, dtype=np.uint8) for p in range(universe)}
    batches = []
    for _ in range(nbatches):
        n = draw(st.integers(0, 12))
        # a PFN at most once per batch: the stream lists a PFN at most once
        # per Format B body, and the receiver decodes all of a blob's deltas
        # on the pages as they were before the blob
        n = min(n, universe)
        pfns = draw(st.lists(st.integers(0, universe - 1), min_size=n, max_size=n, unique=True))
        pages, pts = [], []
        for p in pfns:
            mem[p] = draw(page_change(mem[p]))
            pages.append(mem[p])
            pts.append(draw(st.booleans()) and draw(st.booleans()))
        arr = np.array(pages, dtype=np.uint8).reshape(n, PAGE)
        batches.append((np.array(pfns, dtype=np.uint64) * 7919, arr, np.array(pts, dtype=bool)))
    return capacity, batches


def assert_mirrors(c: Compressor, d: Receiver) -> None:
    """Every page the sender's cache holds is the receiver's page for that
    PFN: the base the next delta for it decodes on."""
    ck, cv = c.cache.snapshot()
    for p, v in zip(ck.tolist(), cv, strict=True):
        assert np.array_equal(d.page(p), v), p


# ------------------------------------------------------------------- tests


def test_public_constants() -> None:
    assert CODECS == ("seed", "xen", "none")
    assert DEFAULT_CACHE_PAGES == 8192
    assert Compressor("xen").cache.capacity == 8192
    assert lib.xb_max_encoded(F.CODEC_IDS["seed"]) == F.SEED_FULL_SIZE == 4102
    assert lib.xb_max_encoded(F.CODEC_IDS["xen"]) == F.XEN_WORST_SIZE == 4105
    assert F.SEED_MAX_DELTAS == 682


@pytest.mark.parametrize("cls", [Compressor, Decompressor])
def test_codec_none_and_unknown_are_config_errors(cls) -> None:
    with pytest.raises(ConfigError, match="Format A"):
        cls("none")
    with pytest.raises(ConfigError, match="unknown codec"):
        cls("gzip")


@pytest.mark.parametrize("size", [0, -1, MAX_CACHE_PAGES + 1, 2.5, "8"])
def test_cache_size_bounds(size) -> None:
    with pytest.raises(ConfigError, match="cache size"):
        PageCache(size)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(CODEC_NAMES), history=histories())
def test_round_trip_mirror_and_model(codec: str, history) -> None:
    capacity, batches = history
    c, d = Compressor(codec, capacity), Receiver(codec)
    model = Model(codec, capacity)
    for pfns, pages, pts in batches:
        blob = c.compress(pfns, pages, pts)
        assert blob == model.encode(pfns, pages, pts)
        out = d.decompress(blob, pfns)
        assert out.shape == pages.shape
        assert np.array_equal(out, pages)
        assert_mirrors(c, d)
        assert c.cache.order().tolist() == model.order()
        for pfn, page in model.lru.items():
            got = c.cache.get(pfn)
            assert got is not None and np.array_equal(got, page)
    # the receiver's hits are the delta pages: the sender's hits that were no
    # page tables (sent whole) plus its zero-base misses (none here)
    assert d.stats.hits + d.stats.misses == d.stats.pages
    assert d.stats.hits <= c.stats.hits and d.stats.evictions == 0
    assert c.stats.pages == d.stats.pages == sum(len(b[0]) for b in batches)
    assert c.stats.bytes_out == d.stats.bytes_in
    assert c.stats.bytes_in == d.stats.bytes_out


@settings(max_examples=60, deadline=None)
@given(
    codec=st.sampled_from(CODEC_NAMES),
    start=st.integers(0, WORDS - 1),
    data=st.data(),
)
def test_xen_and_seed_encoders_match_reference_on_one_page(codec, start, data) -> None:
    rng = np.random.default_rng(start)
    old = rng.integers(0, 256, PAGE, dtype=np.uint8)
    new = data.draw(page_change(old))
    c = Compressor(codec, 4)
    c.compress(np.array([5], np.uint64), old[None])
    blob = c.compress(np.array([5], np.uint64), new[None])
    ref = xen_reference if codec == "xen" else seed_reference
    assert blob == ref(old, new)
    assert len(blob) <= (F.XEN_WORST_SIZE if codec == "xen" else F.SEED_FULL_SIZE)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_batch_larger_than_cache_with_evictions(codec: str) -> None:
    rng = np.random.default_rng(7)
    n, cap = 3000, 1000
    pfns = rng.permutation(4000)[:n].astype(np.uint64)
    base = rng.integers(0, 256, (n, PAGE), dtype=np.uint8)
    c, d = Compressor(codec, cap), Receiver(codec)
    assert np.array_equal(d.decompress(c.compress(pfns, base), pfns), base)
    assert c.stats.misses == n and c.stats.evictions == n - cap
    # the last `cap` pages are cached: change one word in each page of the batch
    new = base.copy()
    new.view(np.uint32)[:, 17] ^= 1
    blob = c.compress(pfns, new)
    assert np.array_equal(d.decompress(blob, pfns), new)
    assert_mirrors(c, d)
    # first 2000 pages were evicted -> missed again and sent full, evicting the
    # last 1000 before their turn: every page of the second batch is a miss
    assert c.stats.misses == 2 * n
    assert len(blob) == n * (F.SEED_FULL_SIZE if codec == "seed" else F.XEN_FULL_SIZE)
    # a third pass over only the cached tail hits every page
    tail = slice(n - cap, n)
    blob = c.compress(pfns[tail], new[tail])
    assert c.stats.hits == cap
    assert len(blob) == cap * (6 if codec == "seed" else 1)
    assert np.array_equal(d.decompress(blob, pfns[tail]), new[tail])


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_same_pfn_twice_in_one_batch(codec: str) -> None:
    a = np.zeros(PAGE, np.uint8)
    b = a.copy()
    b[100] = 1
    pfns = np.array([3, 3, 3], np.uint64)
    pages = np.stack([a, b, b])
    c = Compressor(codec, 2)
    c.compress(pfns, pages)  # the sender takes it: a miss, then hits
    assert c.stats.misses == 1 and c.stats.hits == 2
    # the receiver: a PFN at most once per blob (the stream decoder refuses a
    # PFN twice in a Format B body), so one blob per occurrence decodes
    c, d = Compressor(codec, 2), Receiver(codec)
    for i in range(3):
        got = d.decompress(c.compress(pfns[i : i + 1], pages[i : i + 1]), pfns[i : i + 1])
        assert np.array_equal(got, pages[i : i + 1])


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_pagetable_pages_always_whole_but_cached(codec: str) -> None:
    page = np.arange(PAGE, dtype=np.uint32).astype(np.uint8)
    pfns = np.array([9], np.uint64)
    c, d = Compressor(codec, 4), Receiver(codec)
    d.decompress(c.compress(pfns, page[None]), pfns)
    blob = c.compress(pfns, page[None], np.array([True]))
    assert blob == full_reference(codec, page)
    assert np.array_equal(d.decompress(blob, pfns)[0], page)
    # still cached: the next non-page-table send is a delta
    assert len(c.compress(pfns, page[None], np.array([False]))) == (6 if codec == "seed" else 1)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_never_larger_than_format_a_plus_one_percent(codec: str) -> None:
    rng = np.random.default_rng(3)
    n = 64
    pfns = np.arange(n, dtype=np.uint64)
    old = rng.integers(0, 256, (n, PAGE), dtype=np.uint8)
    c = Compressor(codec, n)
    c.compress(pfns, old)
    for density in (0.3, 0.5, 0.66, 0.67, 0.7, 0.9, 1.0):
        new = old.copy()
        mask = rng.random((n, WORDS)) < density
        new.view(np.uint32)[mask] ^= 0xDEADBEEF
        blob = c.compress(pfns, new)
        assert len(blob) <= 1.01 * n * PAGE
        old = new


def test_decompress_into_out_and_argument_checks() -> None:
    pfns = np.arange(4, dtype=np.uint64)
    pages = np.random.default_rng(1).integers(0, 256, (4, PAGE), dtype=np.uint8)
    c, d = Compressor("xen", 8), Receiver("xen")
    blob = c.compress(pfns, pages)
    stage = np.zeros((6, PAGE), np.uint8)
    got = d.decompress(memoryview(blob), pfns, out=stage)
    assert got.base is stage and np.array_equal(stage[:4], pages)
    with pytest.raises(ValueError, match="out must"):
        d.decompress(b"", pfns, out=np.zeros((3, PAGE), np.uint8))
    with pytest.raises(ValueError, match="pages must"):
        c.compress(pfns, pages[:3])
    with pytest.raises(ValueError, match="pages must"):
        c.compress(pfns, pages.astype(np.int16))
    with pytest.raises(ValueError, match="pagetable must"):
        c.compress(pfns, pages, np.zeros(3, bool))
    assert d.decompress(b"", pfns).shape == (0, PAGE)
    assert c.compress(pfns[:0], pages[:0]) == b""


def test_stats_dataclass() -> None:
    pfns = np.arange(10, dtype=np.uint64)
    pages = np.zeros((10, PAGE), np.uint8)
    c = Compressor("xen", 4)
    c.compress(pfns, pages)
    c.compress(pfns[6:], pages[6:])
    s = c.stats
    assert isinstance(s, CodecStats)
    assert (s.hits, s.misses, s.evictions, s.pages) == (4, 10, 6, 14)
    assert s.bytes_in == 14 * PAGE and s.bytes_out == 10 * 4097 + 4
    assert s.ratio == pytest.approx(14 * PAGE / s.bytes_out)
    d = Receiver("xen")
    d.decompress(c.compress(pfns[:2], pages[:2]), pfns[:2])
    assert d.stats.ratio == pytest.approx(2 * PAGE / (2 * 4097))


def test_cache_hash_table_survives_heavy_churn() -> None:
    """Many pfns colliding in a small table, evicted and reinserted: the C
    hash table's backward-shift deletion must keep every entry findable."""
    rng = np.random.default_rng(11)
    cap = 37
    cache_model: OrderedDict[int, None] = OrderedDict()
    c = Compressor("seed", cap)
    page = np.zeros((1, PAGE), np.uint8)
    for pfn in rng.integers(0, 120, 5000).tolist():
        c.compress(np.array([pfn], np.uint64), page)
        cache_model[pfn] = None
        cache_model.move_to_end(pfn)
        if len(cache_model) > cap:
            cache_model.popitem(last=False)
    assert c.cache.order().tolist() == list(reversed(cache_model))
    for pfn in range(120):
        assert (pfn in c.cache) == (pfn in cache_model)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_any_uint64_pfn_is_a_key(codec: str) -> None:
    pfns = np.array([0, 2**64 - 1, 2**63, 0xFFFFFFFF, 2**32], np.uint64)
    pages = np.stack([np.full(PAGE, i, np.uint8) for i in range(5)])
    c, d = Compressor(codec, 3), Receiver(codec)
    assert np.array_equal(d.decompress(c.compress(pfns, pages), pfns), pages)
    pages[:, 0] += 1
    assert np.array_equal(d.decompress(c.compress(pfns[2:], pages[2:]), pfns[2:]), pages[2:])
    assert c.cache.order().tolist() == [2**32, 0xFFFFFFFF, 2**63]
    assert_mirrors(c, d)


RUN_SPANS = [
    (0, 64),
    (64, 128),
    (60, 200),
    (63, 65),
    (127, 129),
    (0, 1024),
    (1, 1023),
    (960, 1024),
    (0, 127),
    (0, 128),
    (0, 254),
    (897, 1024),
    (5, 6),
]


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_runs_across_mask_word_boundaries_match_reference(codec: str) -> None:
    """Runs that start, end or lie exactly on the encoder's 64-word groups,
    alone and several in one page."""
    rng = np.random.default_rng(5)
    old = rng.integers(0, 256, PAGE, dtype=np.uint8)
    ref = xen_reference if codec == "xen" else seed_reference
    spans = [[s] for s in RUN_SPANS] + [
        [(0, 64), (128, 192)],
        [(10, 70), (70, 71)],
        [(0, 64), (65, 129), (1000, 1024)],
    ]
    pfn = np.array([1], np.uint64)
    for group in spans:
        new = old.copy()
        for a, b in group:
            new.view(np.uint32)[a:b] ^= 0xA5A5A5A5
        c, d = Compressor(codec, 1), Receiver(codec)
        d.decompress(c.compress(pfn, old[None]), pfn)
        blob = c.compress(pfn, new[None])
        assert blob == ref(old, new), group
        assert np.array_equal(d.decompress(blob, pfn)[0], new)
        assert_mirrors(c, d)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_decode_into_unaligned_staging(codec: str) -> None:
    """Rows not 16-byte aligned take the plain-copy path; same pages."""
    rng = np.random.default_rng(8)
    pfns = np.arange(3, dtype=np.uint64)
    pages = rng.integers(0, 256, (3, PAGE), dtype=np.uint8)
    c, d = Compressor(codec, 4), Receiver(codec)
    raw = bytearray(3 * PAGE + 1)
    stage = np.frombuffer(raw, np.uint8, count=3 * PAGE, offset=1).reshape(3, PAGE)
    assert stage.ctypes.data % 16 != 0
    got = d.decompress(c.compress(pfns, pages), pfns, out=stage)
    assert np.array_equal(got, pages)
    new = pages.copy()
    new[:, 7] ^= 1
    assert np.array_equal(d.decompress(c.compress(pfns, new), pfns, out=stage), new)


def test_gather_copies_rows_and_checks_every_pfn_first() -> None:
    from xenbind.compress import gather

    mem = np.random.default_rng(3).integers(0, 256, (8, PAGE), dtype=np.uint8)
    out = np.zeros((4, PAGE), np.uint8)
    gather(mem, np.array([7, 0, 7], np.uint64), out)
    assert np.array_equal(out[:3], mem[[7, 0, 7]]) and not out[3].any()
    with pytest.raises(ValueError, match="past the image"):
        gather(mem, np.array([1, 8], np.uint64), out)
    assert np.array_equal(out[:3], mem[[7, 0, 7]])  # nothing copied
    with pytest.raises(ValueError, match="out must"):
        gather(mem, np.arange(5, dtype=np.uint64), out)
    gather(mem, np.zeros(0, np.uint64), out)
