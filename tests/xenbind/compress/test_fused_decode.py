"""The fused decode: a base source that is memory (``xenbind.compress.Rows``)
is read in place by the kernel (xb_decode_from, one pass), without the
gather of the bases into the output first (docs/codecs.md, "The receiver").

* Property: for random committed memory, staged batches laid over it (a PFN
  in several, the latest winning) and blobs of delta, zero-base and whole
  pages, the fused decode equals the reference decode (a base source that
  answers, PFN by PFN in Python, the latest page held) and the gather path
  (the same Rows called as ``base(pfns, out)``), with memory None (every
  page zero) too.
* Mutated blobs: the fused decode (one pass, no separate scan) refuses
  exactly what the gather path (xb_scan first) refuses, with the same
  message, and decodes the rest to the same pages.
* Bounds: a delta page whose PFN lies past the memory (and is not staged)
  is refused (ValueError naming the page and PFN; ``out`` is then
  undefined, as after any decode error); a whole page
  or a staged page there needs no row and decodes; ``out`` overlapping the
  memory is refused; staged arrays that are not C-contiguous still decode.
* Through the stream Decoder: a stream of several checkpoints fed in one
  piece (so each checkpoint's bases include the pages of the ones completed
  in the same feed, which the decoder lays over the user's Rows) and fed in
  pieces decodes to the sender's memory, event for event as the Image
  (gather) path does.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.xenbind.stream.common import decode, normal
from xenbind.compress import Compressor, Decompressor, Rows
from xenbind.errors import CodecError
from xenbind.stream import CheckpointEnd, Decoder, Pages, StreamWriter
from xenbind.types import Context

PAGE = 4096
CODECS = ("seed", "xen")
CTX = Context((0, 0, 0), b"\x01" * 16, b"")


def reference_base(memory: np.ndarray | None, staged: list) -> object:
    """The latest page held for each PFN, one by one (no kernel, no numpy tricks)."""

    def base(pfns: np.ndarray, out: np.ndarray) -> None:
        for i, p in enumerate(pfns.tolist()):
            page = np.zeros(PAGE, np.uint8) if memory is None else memory[p]
            for bp, data in staged:
                for j, q in enumerate(bp.tolist()):
                    if q == p:
                        page = data[j]
            out[i] = page

    return base


def held_page(memory: np.ndarray | None, staged: list, p: int) -> np.ndarray:
    out = np.empty((1, PAGE), np.uint8)
    reference_base(memory, staged)(np.array([p], np.uint64), out)  # type: ignore[operator]
    return out[0]


def change(rng: np.random.Generator, page: np.ndarray, how: int) -> np.ndarray:
    new = page.copy()
    w = new.view(np.uint32)
    if how == 0:
        pass
    elif how == 1:
        w[rng.integers(0, 1024)] ^= 0xA5A5A5A5
    elif how == 2:
        w[rng.choice(1024, 16, replace=False)] ^= 0x01010101
    elif how == 3:
        s = int(rng.integers(0, 960))
        w[s : s + 64] ^= 0x5A5A5A5A
    else:
        new[:] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    return new


@st.composite
def scenarios(draw):
    rows = draw(st.integers(1, 24))
    n = draw(st.integers(1, min(rows, 12)))
    pfns = draw(st.lists(st.integers(0, rows - 1), min_size=n, max_size=n, unique=True))
    has_memory = draw(st.booleans())
    batches = draw(
        st.lists(st.lists(st.integers(0, rows - 1), max_size=6, unique=True), max_size=3)
    )
    hows = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    # per page: 0 a hit (delta on the held page), 1 a miss (whole), 2 zero base
    kinds = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    return rows, pfns, has_memory, batches, hows, kinds, draw(st.integers(0, 2**32 - 1))


def build(codec: str, scenario):
    """(blob, pfns, memory, staged, want): a blob of the scenario's pages,
    encoded against what the receiver holds (memory + staged)."""
    rows, pfns, has_memory, batches, hows, kinds, seed = scenario
    rng = np.random.default_rng(seed)
    memory = rng.integers(0, 256, (rows, PAGE), dtype=np.uint8) if has_memory else None
    if memory is not None:
        memory[rng.random(rows) < 0.3] = 0  # some committed pages are zeros
    staged = [
        (np.array(b, np.uint64), rng.integers(0, 256, (len(b), PAGE), dtype=np.uint8))
        for b in batches
    ]
    c = Compressor(codec, 64, known_pfns=rows)
    held = [held_page(memory, staged, p) for p in pfns]
    arr = np.array(pfns, np.uint64)
    hit = np.array([k == 0 for k in kinds])
    if hit.any():  # the sender's cache holds what the receiver holds
        c.compress(arr[hit], np.array([h for h, k in zip(held, hit, strict=True) if k]))
    for p, h, k in zip(pfns, held, kinds, strict=True):
        if k == 2 and not h.any():  # zero base: the receiver holds zeros there
            c.note_sent_raw(np.array([p], np.uint64), h[None])
    want = np.array([change(rng, h, w) for h, w in zip(held, hows, strict=True)])
    return c.compress(arr, want), arr, memory, staged, want


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_fused_decode_equals_the_reference_and_the_gather_path(codec: str, scenario) -> None:
    blob, pfns, memory, staged, want = build(codec, scenario)
    rows = Rows(memory, staged)
    fused = Decompressor(codec).decompress(blob, pfns, rows)
    ref = Decompressor(codec).decompress(blob, pfns, reference_base(memory, staged))  # type: ignore[arg-type]
    gathered = Decompressor(codec).decompress(blob, pfns, rows.__call__)
    assert np.array_equal(ref, want)
    assert np.array_equal(fused, want)
    assert np.array_equal(gathered, want)
    # into a staging array, as the receiver decodes
    out = np.full((len(pfns) + 2, PAGE), 0x5A, np.uint8)
    got = Decompressor(codec).decompress(blob, pfns, rows, out=out)
    assert np.array_equal(got, want) and np.shares_memory(got, out)


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenario=scenarios(),
    cuts=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4),
    trunc=st.integers(0, 2**16),
)
def test_mutated_blobs_fused_refuses_what_gather_refuses(
    codec: str, scenario, cuts, trunc: int
) -> None:
    blob, pfns, memory, staged, _ = build(codec, scenario)
    bad = bytearray(blob)
    for at, v in cuts:
        bad[at % len(bad)] = v
    bad = bad[: max(1, len(bad) - trunc % 8)]
    rows = Rows(memory, staged)
    outcomes: list[np.ndarray | str] = []
    for base in (rows, rows.__call__):
        try:
            outcomes.append(Decompressor(codec).decompress(bytes(bad), pfns, base).copy())
        except CodecError as e:
            outcomes.append(str(e))
    a, b = outcomes
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
    else:
        assert np.array_equal(a, b)


@pytest.mark.parametrize("codec", CODECS)
def test_a_delta_page_past_the_memory_is_refused(codec: str) -> None:
    memory = np.zeros((4, PAGE), np.uint8)
    c = Compressor(codec, 8)
    pfns = np.array([1, 7], np.uint64)
    pages = np.zeros((2, PAGE), np.uint8)
    c.compress(pfns, pages)  # cached: the next batch is delta pages
    pages[:, 8] = 3
    blob = c.compress(pfns, pages)
    with pytest.raises(ValueError, match="page 1 .pfn 0x7.: row 0x7"):
        Decompressor(codec).decompress(blob, pfns, Rows(memory))
    # the same PFN staged: its base is the staged page, no memory row needed
    staged = [(np.array([7], np.uint64), np.zeros((1, PAGE), np.uint8))]
    got = Decompressor(codec).decompress(blob, pfns, Rows(memory, staged))
    assert np.array_equal(got, pages)
    # staged in a batch too short for its PFN list: refused as well
    short = [(np.array([3, 7], np.uint64), np.zeros((1, PAGE), np.uint8))]
    with pytest.raises(ValueError, match="pfn 0x7"):
        Decompressor(codec).decompress(blob, pfns, Rows(memory, short))
    # a page sent whole needs no base: a PFN past the memory decodes
    whole = Compressor(codec, 8).compress(np.array([9], np.uint64), pages[:1])
    got = Decompressor(codec).decompress(whole, np.array([9], np.uint64), Rows(memory))
    assert np.array_equal(got, pages[:1])


@pytest.mark.parametrize("codec", CODECS)
def test_zero_pages_out_overlap_and_strided_staged_pages(codec: str) -> None:
    c = Compressor(codec, 8, known_pfns=8)
    pfns = np.array([2, 5], np.uint64)
    c.note_sent_raw(pfns, np.zeros((2, PAGE), np.uint8))
    pages = np.zeros((2, PAGE), np.uint8)
    pages[0, 100] = 1
    pages[1, 4000] = 2
    blob = c.compress(pfns, pages)  # zero-base deltas
    assert len(blob) < 100
    assert np.array_equal(Decompressor(codec).decompress(blob, pfns, Rows(None)), pages)
    memory = np.zeros((8, PAGE), np.uint8)
    with pytest.raises(ValueError, match="overlaps"):
        Decompressor(codec).decompress(blob, pfns, Rows(memory), out=memory[:2])
    # staged pages in a strided array (every other row of a bigger one)
    big = np.zeros((4, PAGE), np.uint8)
    staged = [(np.array([2, 5], np.uint64), big[::2])]
    assert not staged[0][1].flags.c_contiguous
    got = Decompressor(codec).decompress(blob, pfns, Rows(np.ones((8, PAGE), np.uint8), staged))
    assert np.array_equal(got, pages)


# ------------------------------------------------------------ the stream Decoder


class RowsReceiver:
    """A receiver whose base source is a Rows over its memory: checkpoint 0
    straight into memory, later ones staged until their CheckpointEnd."""

    def __init__(self, p2m: int) -> None:
        self.rows = Rows(np.zeros((p2m, PAGE), np.uint8), [])
        self.committed = 0

    def handle(self, events: list) -> list:
        for e in events:
            if isinstance(e, Pages):
                if self.committed == 0:
                    assert self.rows.memory is not None
                    self.rows.memory[e.pfns.astype(np.intp)] = e.data
                else:
                    self.rows.staged = [*self.rows.staged, (e.pfns, e.data)]
            elif isinstance(e, CheckpointEnd):
                assert self.rows.memory is not None
                for p, d in self.rows.staged:
                    self.rows.memory[p.astype(np.intp)] = d
                self.rows.staged = []
                self.committed += 1
        return events


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("pieces", [1, 7, 300])
def test_stream_decoder_with_rows_decodes_as_the_image_does(codec: str, pieces: int) -> None:
    p2m = 96
    rng = np.random.default_rng(pieces)
    mem = rng.integers(0, 256, (p2m, PAGE), dtype=np.uint8)
    mem[60:] = 0  # zero pages of the initial copy: zero-base misses later
    w = StreamWriter(p2m, codec=codec, cache_pages=32)
    everything = np.arange(p2m, dtype=np.uint64)
    data = [w.header(), *w.checkpoint(everything, mem, CTX)]
    for _ in range(6):  # the same PFNs again and again: deltas on the last checkpoint's
        pfns = np.sort(rng.choice(p2m, 24, replace=False)).astype(np.uint64)
        for p in pfns.tolist():
            mem[p] = change(rng, mem[p], int(rng.integers(0, 5)))
        data += w.checkpoint(pfns, mem[pfns.astype(np.intp)], CTX)
    stream = b"".join(bytes(b) for b in data)
    recv = RowsReceiver(p2m)
    d = Decoder(base=recv.rows)
    events: list = []
    cuts = np.linspace(0, len(stream), pieces + 1).astype(int)
    for a, b in zip(cuts, cuts[1:], strict=False):
        events += recv.handle(d.feed(stream[a:b]))
    d.eof()
    assert d.checkpoints == 7
    assert recv.rows.memory is not None and np.array_equal(recv.rows.memory, mem)
    want, _ = decode(stream)  # the Image: gather + overlay
    assert normal(events) == normal(want)
