"""The zero base: a cache miss on a PFN the receiver holds as zeros travels as
a delta against an all-zero page (docs/codecs.md, "Zero base").

The zero base is the sender's: the receiver keeps no known-zero set (it
decodes every delta page on the page it holds, which for such a PFN is the
zeros it received; tests/xenbind/compress/receiver.py).

* Property: random interleavings of Format A sends (some pages zero, some
  entries without data) and compressed batches (hits, misses, known-zero
  misses, page tables) decode to exactly the input; after every batch every
  page of the sender's cache is the receiver's page, and the cache equals the
  independent model (tests.xenbind.compress.test_codec_roundtrips.Model, with
  the known-zero rule), byte for byte; after every step the sender's
  known-zero set equals the model's. The same through the StreamWriter and
  the stream Decoder (decoding on the memory its events rebuild).
* The ledger case: a zero page of the initial copy that gets 32 bytes is a
  blob of a few dozen bytes, through the StreamWriter and the stream Decoder.
* The rule's edges: a known-zero PFN whose page is not zero, a PFN noted
  non-zero, forgotten, evicted, a page table, a delta not smaller than the
  page whole; the zero test at every boundary; the bitmap's bounds.
* The kernel's error codes equal formats.ERROR_REASONS (9 retired, kept).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.xenbind.compress.receiver import Receiver
from tests.xenbind.compress.test_codec_roundtrips import (
    Model,
    assert_mirrors,
    full_reference,
    page_change,
)
from tests.xenbind.stream.common import decoder, take
from xenbind.compress import Compressor
from xenbind.compress import formats as F
from xenbind.compress.codec import MAX_KNOWN_PFNS
from xenbind.compress.zero import KnownZero
from xenbind.stream import CheckpointEnd, Pages, StreamWriter
from xenbind.stream.encoder import Buffer
from xenbind.stream.format import (
    TYPE_BROKEN,
    TYPE_HAS_DATA,
    TYPE_L1TAB,
    TYPE_NOTAB,
    TYPE_XALLOC,
    TYPE_XTAB,
)
from xenbind.types import Context

PAGE = 4096
CODECS = ("seed", "xen")
KERNEL = Path(__file__).resolve().parents[3] / "xenbind" / "compress" / "kernel.c"
BEGIN = struct.pack("<hI", -100, 0)
#: page types of Format A entries the strategies draw from: with data, and without
TYPES = [TYPE_NOTAB, TYPE_NOTAB, TYPE_NOTAB, TYPE_L1TAB, TYPE_XTAB, TYPE_XALLOC, TYPE_BROKEN]
CTX = Context((1, 2, 3), b"hvm", b"dm")


def zeros(n: int = 1) -> np.ndarray:
    return np.zeros((n, PAGE), np.uint8)


def u64(*pfns: int) -> np.ndarray:
    return np.array(pfns, np.uint64)


# ------------------------------------------------------------ the property


@st.composite
def interleavings(draw):
    """A cache size and a list of steps over a small PFN universe:
    ("raw", pfns, pages, has_data) = sent in Format A (about half the pages
    zero; entries without data have no row), ("batch", pfns, pages,
    pagetable) = one compressed batch."""
    capacity = draw(st.integers(1, 5))
    universe = draw(st.integers(1, 9))
    mem = {p: np.zeros(PAGE, np.uint8) for p in range(universe)}
    steps = []
    for _ in range(draw(st.integers(1, 7))):
        n = min(draw(st.integers(0, 8)), universe)
        raw = draw(st.booleans())
        # a PFN at most once per compressed batch (the stream's rule)
        pfns = draw(st.lists(st.integers(0, universe - 1), min_size=n, max_size=n, unique=not raw))
        pages = []
        if raw:
            has = np.array([draw(st.integers(0, 4)) > 0 for _ in pfns], bool)
            for p, h in zip(pfns, has, strict=True):
                if not h:
                    continue
                if draw(st.booleans()):
                    mem[p] = np.zeros(PAGE, np.uint8)
                else:
                    mem[p] = draw(page_change(mem[p]))
                pages.append(mem[p])
            steps.append(("raw", u64(*pfns), np.array(pages, np.uint8).reshape(-1, PAGE), has))
        else:
            pts = []
            for p in pfns:
                mem[p] = draw(page_change(mem[p]))
                pages.append(mem[p])
                pts.append(draw(st.integers(0, 5)) == 0)
            steps.append(
                (
                    "batch",
                    u64(*pfns),
                    np.array(pages, np.uint8).reshape(n, PAGE),
                    np.array(pts, bool),
                )
            )
    # Format A only before Format B, as in a stream (checkpoint 0, then
    # compressed checkpoints): a page sent raw after the sender cached it
    # would leave the sender's copy behind the receiver's
    steps.sort(key=lambda step: step[0] != "raw")
    return capacity, universe, steps


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(CODECS), history=interleavings())
def test_interleavings_round_trip_mirror_and_model(codec: str, history) -> None:
    capacity, universe, steps = history
    c, d = Compressor(codec, capacity), Receiver(codec)
    model = Model(codec, capacity)
    for step in steps:
        if step[0] == "raw":
            _, pfns, pages, has = step
            zero = c.note_sent_raw(pfns[has], pages)
            assert zero == int((~pages.any(axis=1)).sum())
            c.forget_raw(pfns[~has])
            d.note_received_raw(pfns[has], pages)
            model.note_raw(pfns[has], pages)
            model.zero -= set(pfns[~has].tolist())
        else:
            _, pfns, pages, pts = step
            blob = c.compress(pfns, pages, pts)
            assert blob == model.encode(pfns, pages, pts)
            out = d.decompress(blob, pfns)
            assert np.array_equal(out, pages)
            assert_mirrors(c, d)
            assert c.cache.order().tolist() == model.order()
            for pfn, page in model.lru.items():
                got = c.cache.get(pfn)
                assert got is not None and np.array_equal(got, page)
        want = sorted(model.zero)
        assert c.known_zero_pfns().tolist() == want
        for p in range(universe):
            assert c.known_zero(p) == (p in model.zero), p
    assert c.stats.zero_base == model.zero_base


@st.composite
def stream_histories(draw):
    """p2m_size, cache size, then Format A calls of the initial copy
    (pfns unique per call, types with and without data) and Format B
    checkpoints (pfns unique, page tables among them, entries without data)."""
    p2m = draw(st.integers(1, 12))
    cache = draw(st.integers(1, 4))
    steps = []
    for kind, count in (("A", draw(st.integers(1, 4))), ("B", draw(st.integers(1, 5)))):
        for _ in range(count):
            pfns = draw(st.lists(st.integers(0, p2m - 1), max_size=p2m, unique=True))
            types = [draw(st.sampled_from(TYPES)) for _ in pfns]
            steps.append(
                (
                    kind,
                    pfns,
                    types,
                    [draw(st.sampled_from(["zero", "change", "word"])) for _ in pfns],
                )
            )
    return p2m, cache, steps


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(CODECS), history=stream_histories())
def test_stream_decoder_decodes_every_zero_base_page(codec: str, history) -> None:
    """Through StreamWriter and Decoder (decoding on the memory its events
    rebuild): every page decodes to what was sent, the zero-base ones too."""
    p2m, cache, steps = history
    rng = np.random.default_rng(len(steps))
    mem = np.zeros((p2m, PAGE), np.uint8)
    got = np.zeros_like(mem)
    w = StreamWriter(p2m, codec=codec, cache_pages=cache)
    dec, img = decoder()

    def send(bufs) -> None:
        for e in take(img, dec.feed(b"".join(bytes(b) for b in bufs))):
            if isinstance(e, Pages):
                got[e.pfns.astype(np.intp)] = e.data

    send([w.header()])
    format_b = False
    for kind, pfns, types, how in steps:
        if kind == "B" and not format_b:
            send(w.end_checkpoint(CTX))  # ENABLE_COMPRESSION
            format_b = True
        has = TYPE_HAS_DATA[np.array(types, np.uint8)] if types else np.zeros(0, bool)
        for p, h, k in zip(pfns, has, how, strict=True):
            if not h:
                continue
            if k == "zero":
                mem[p] = 0
            elif k == "word":
                mem[p].view(np.uint32)[rng.integers(0, 1024)] ^= 0x5A5A
            else:
                mem[p] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        arr = u64(*pfns)
        send(w.pages(arr, mem[arr[has].astype(np.intp)], np.array(types, np.uint8)))
        if format_b:
            send(w.end_checkpoint(CTX))
        sent = arr[has].astype(np.intp)
        assert np.array_equal(got[sent], mem[sent])
    if not format_b:
        send(w.end_checkpoint(CTX))
    assert dec.checkpoints >= 1


# ------------------------------------------------------------ the ledger case


@pytest.mark.parametrize("codec", CODECS)
def test_log_entry_in_a_page_of_zeros_is_tiny(codec: str) -> None:
    """Initial copy of zero pages, then one page gets a 32-byte log entry."""
    n = 64
    c = Compressor(codec, 8)
    assert c.note_sent_raw(np.arange(n, dtype=np.uint64), zeros(n)) == n
    page = zeros()
    page[0, 1024:1056] = np.arange(1, 33, dtype=np.uint8)
    blob = c.compress(u64(17), page)
    assert len(blob) < 64, len(blob)
    d = Receiver(codec)
    d.note_received_raw(np.arange(n, dtype=np.uint64), zeros(n))
    assert np.array_equal(d.decompress(blob, u64(17)), page)
    assert_mirrors(c, d)
    assert c.stats.misses == 1 and d.stats.hits == 1  # a delta page, decoded on zeros
    assert c.stats.zero_base == 1 and d.based == [17]
    assert not c.known_zero(17) and c.known_zero(16)
    # the next entry in the same page is an ordinary hit
    page[0, 1056:1088] = 0xEE
    blob = c.compress(u64(17), page)
    assert len(blob) < 64 and c.stats.hits == 1
    assert np.array_equal(d.decompress(blob, u64(17)), page)


@pytest.mark.parametrize("codec", CODECS)
def test_stream_writer_tells_the_compressor_of_format_a(codec: str) -> None:
    """Through the StreamWriter and the stream Decoder: the initial copy's
    zero pages make later misses tiny; XTAB entries and non-zero pages do not."""
    p2m = 48
    ctx = Context((1, 2, 3), b"hvm", b"dm")
    w = StreamWriter(p2m, codec=codec, cache_pages=4)
    mem = np.zeros((p2m, PAGE), np.uint8)
    mem[40:] = 0x11  # non-zero pages
    data_pfns = np.arange(44, dtype=np.uint64)
    types = np.zeros(44, np.uint8)
    types[30:34] = TYPE_XTAB  # holes: sent without data
    has_data = types != TYPE_XTAB
    bufs: list[Buffer] = [w.header()]
    bufs += w.pages(data_pfns, mem[:44][has_data], types)
    bufs += w.pages(np.arange(44, p2m, dtype=np.uint64), mem[44:])
    bufs += w.end_checkpoint(ctx)
    stream = [b"".join(bytes(b) for b in bufs)]
    assert w.codec_stats is not None and w.codec_stats.pages == 0
    sizes = []
    # checkpoint k writes 32 bytes into one page of each kind
    for k, pfn in enumerate([5, 31, 41, 6, 7]):
        mem[pfn, 64 * k : 64 * k + 32] = 0xA0 + k
        body = w.checkpoint(u64(pfn), mem[pfn : pfn + 1], ctx)
        sizes.append(sum(len(b) for b in body))
        stream.append(b"".join(bytes(b) for b in body))
    st_ = w.codec_stats
    assert (st_.misses, st_.zero_base) == (5, 3)  # pfns 5, 6, 7; not 31 (XTAB) nor 41
    whole = sizes[1]
    assert sizes[2] == whole
    for k in (0, 3, 4):  # the page whole against a few dozen bytes
        assert whole - sizes[k] > 4000, sizes

    dec, img = decoder()
    got = np.zeros_like(mem)
    ends = 0
    for piece in stream:
        for e in take(img, dec.feed(piece)):
            if isinstance(e, Pages):
                got[e.pfns.astype(np.intp)] = e.data
            elif isinstance(e, CheckpointEnd):
                ends += 1
    assert ends == 6
    assert np.array_equal(got, mem)


# ------------------------------------------------------------ the rule's edges


@pytest.mark.parametrize("codec", CODECS)
def test_known_zero_pfn_with_any_contents_round_trips(codec: str) -> None:
    rng = np.random.default_rng(4)
    c, d = Compressor(codec, 16), Receiver(codec)
    pfns = np.arange(8, dtype=np.uint64)
    c.note_sent_raw(pfns, zeros(8))
    d.note_received_raw(pfns, zeros(8))
    pages = zeros(8)
    pages[1, :8] = 1  # two words
    pages[2] = rng.integers(0, 256, PAGE, dtype=np.uint8)  # every word: whole
    pages[3].view(np.uint32)[::2] = 7  # 512 words: seed deltas, xen markers
    pages[4].view(np.uint32)[:683] = 9  # 683 words: seed whole (> 682)
    pages[5].view(np.uint32)[:] = 5  # all words but one: xen's delta > 4097
    pages[5].view(np.uint32)[511] = 0
    # pages[0]: still zero
    blob = c.compress(pfns[:6], pages[:6])
    assert np.array_equal(d.decompress(blob, pfns[:6]), pages[:6])
    assert_mirrors(c, d)
    sizes = [len(c.compress(u64(int(p)), pages[p : p + 1])) for p in range(6)]  # now hits
    assert sizes == [6 if codec == "seed" else 1] * 6
    # page by page on a fresh sender: which went as deltas, which whole
    fresh = Compressor(codec, 16)
    fresh.note_sent_raw(pfns, zeros(8))
    one = [len(fresh.compress(u64(p), pages[p : p + 1])) for p in range(6)]
    if codec == "seed":
        assert one == [
            6,
            6 + 2 * 6,
            F.SEED_FULL_SIZE,
            6 + 512 * 6,
            F.SEED_FULL_SIZE,
            F.SEED_FULL_SIZE,
        ]
        assert fresh.stats.zero_base == 3
    else:
        assert one[0] == 1 and one[1] == 1 + 8 + 8 + 1  # RUN(2), SKIP 127 x 8, SKIP 6
        assert one[2] == F.XEN_FULL_SIZE and one[5] == F.XEN_FULL_SIZE  # not smaller: whole
        assert one[3] < F.XEN_FULL_SIZE and one[4] < F.XEN_FULL_SIZE
        assert fresh.stats.zero_base == 4
    assert fresh.stats.misses == 6


@pytest.mark.parametrize("codec", CODECS)
def test_when_the_zero_base_is_not_used(codec: str) -> None:
    page = zeros()
    page[0, :4] = 1
    full = full_reference(codec, page[0])
    c = Compressor(codec, 2)
    c.note_sent_raw(u64(1, 2, 3, 4, 5), zeros(5))
    # noted non-zero afterwards (a later pre-copy round): whole
    c.note_sent_raw(u64(1), page)
    assert not c.known_zero(1)
    assert c.compress(u64(1), page) == full
    # forgotten (sent without data): whole
    c.forget_raw(u64(2))
    assert not c.known_zero(2) and c.known_zero(3)
    assert c.compress(u64(2), page) == full
    # a page table: whole, and the PFN leaves the set
    assert c.compress(u64(3), page, np.array([True])) == full
    assert not c.known_zero(3)
    # compressed once (a zero-base delta), then evicted: the receiver holds
    # what was last sent, not zeros, so the next miss is whole
    assert len(c.compress(u64(4), page)) < 20
    c.compress(u64(6, 7), zeros(2))  # cache of 2: evicts 4
    assert 4 not in c.cache
    assert c.compress(u64(4), page) == full
    # never noted at all: whole (the behaviour of a sender without Format A knowledge)
    assert c.compress(u64(9), page) == full
    assert c.stats.zero_base == 1


@pytest.mark.parametrize("codec", CODECS)
def test_same_known_zero_pfn_twice_in_one_batch(codec: str) -> None:
    """The sender's side (the stream never lists a PFN twice in a body)."""
    a, b = zeros(), zeros()
    a[0, 8] = 1
    b[0, 8:12] = 2
    c = Compressor(codec, 2)
    c.note_sent_raw(u64(3), zeros())
    pages = np.concatenate([a, b, b])
    c.compress(u64(3, 3, 3), pages)
    assert (c.stats.misses, c.stats.hits, c.stats.zero_base) == (1, 2, 1)


def test_xen_without_format_a_knowledge_is_unchanged() -> None:
    """Noting only non-zero pages leaves the xen encoder's bytes as before:
    a miss is 0x80 + the page, as Xen's sender emits it."""
    rng = np.random.default_rng(12)
    pfns = np.arange(16, dtype=np.uint64)
    pages = rng.integers(0, 256, (16, PAGE), dtype=np.uint8)
    pages[:, :4] = 1  # never an all-zero page
    plain, noted = Compressor("xen", 8), Compressor("xen", 8)
    assert noted.note_sent_raw(pfns, pages) == 0
    for _ in range(3):
        new = pages.copy()
        new.view(np.uint32)[:, rng.integers(0, 1024, 5)] ^= 3
        assert plain.compress(pfns, new) == noted.compress(pfns, new)
        pages = new
    assert plain.compress(pfns[:2], zeros(2)) == noted.compress(pfns[:2], zeros(2))
    assert noted.stats.zero_base == 0


@pytest.mark.parametrize("codec", CODECS)
def test_delta_page_for_a_pfn_held_as_zeros_decodes_on_them(codec: str) -> None:
    """A delta page for a PFN the receiver holds as zeros is that delta
    applied to zeros, whatever the sender's cache holds."""
    d = Receiver(codec)
    d.note_received_raw(u64(2, 3), zeros(2))
    if codec == "seed":
        blob = BEGIN + struct.pack("<hI", 8, 0xDEADBEEF)
    else:
        blob = b"\x82\x01" + struct.pack("<I", 0xDEADBEEF) + b"\xff" * 8 + b"\x85"
    got = d.decompress(blob, u64(2))
    want = zeros()
    want[0, 8:12] = np.frombuffer(struct.pack("<I", 0xDEADBEEF), np.uint8)
    assert np.array_equal(got, want) and np.array_equal(d.page(2), want[0])
    empty = b"\x00" if codec == "xen" else BEGIN
    assert np.array_equal(d.decompress(empty, u64(3)), zeros())
    assert d.based == [2, 3]


# ------------------------------------------------------------ zero test, bitmap


def test_zero_test_sees_one_byte_anywhere() -> None:
    positions = [0, 1, 3, 4, 15, 16, 63, 64, 127, 128, 129, 2047, 2048, 4032, 4094, 4095]
    pages = zeros(len(positions) + 1)
    for i, pos in enumerate(positions):
        pages[i, pos] = 0x80
    c = Compressor("seed", 4)
    pfns = np.arange(len(pages), dtype=np.uint64)
    assert c.note_sent_raw(pfns, pages) == 1
    assert [c.known_zero(p) for p in range(len(pages))] == [False] * len(positions) + [True]
    # strided and non-contiguous inputs are accepted (made contiguous)
    assert c.note_sent_raw(pfns[::2], pages[::2]) == 1


def test_known_zero_bitmap_bounds() -> None:
    c = Compressor("xen", 4)  # no size given: grows on demand
    assert not c.known_zero(5) and not c.known_zero(-1)
    c.note_sent_raw(u64(1000), zeros())
    assert c.known_zero(1000) and not c.known_zero(999)
    # past the 28-bit PFN space: simply unknown, nothing allocated for it
    big = u64(MAX_KNOWN_PFNS, 2**64 - 1)
    assert c.note_sent_raw(big, zeros(2)) == 2
    assert not c.known_zero(MAX_KNOWN_PFNS) and not c.known_zero(2**64 - 1)
    assert c.zero.bitmap.nbytes <= MAX_KNOWN_PFNS // 8
    c.forget_raw(big)  # ignored too
    page = zeros()
    page[0, 0] = 1
    assert c.compress(big[:1], page) == full_reference("xen", page[0])
    # sized up front from p2m_size
    assert Compressor("seed", 4, known_pfns=100).zero.bitmap.nbytes == 13
    # capped at a limit (PFNs above it are never in the set)
    z = KnownZero(10, limit=10)
    assert z.note_raw(u64(9, 10, 11), zeros(3)) == 3
    assert z.pfns().tolist() == [9] and 10 not in z and z.bits == 10 and len(z) == 1
    z.forget(u64(9, 10, 2**63))
    assert len(z) == 0
    with pytest.raises(ValueError, match="pages must"):
        c.note_sent_raw(u64(1, 2), zeros(1))


def test_error_codes_match_the_kernel() -> None:
    src = KERNEL.read_text()
    enum = {int(v): k for k, v in re.findall(r"\b(XB_E_\w+)\s*=\s*(\d+)", src)}
    assert set(enum) - {0} == set(F.ERROR_REASONS)
    # 9 is retired (the receiver keeps no mirror: every PFN has a base),
    # its number kept so that the others keep theirs
    assert enum[9] == "XB_E_NO_BASE" and F.NO_BASE == 9
    assert "retired" in F.ERROR_REASONS[9]
    assert "XB_E_NO_BASE," not in src.replace(" ", "")
