"""Malformed compressed data: every rule of the decoders, truncation at every
byte offset, and random garbage. Each failure is a CodecError naming the byte
offset and the reason; the whole blob is checked before anything is applied,
so a failing blob asks for no base and changes nothing the receiver holds; the
decompressor keeps no state, so the next blob decodes as if nothing happened.
A delta page for a PFN the sender never cached (never sent, or sent non-zero
in Format A) is no error any more: it decodes on the receiver's page."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.xenbind.compress.receiver import Receiver
from xenbind.compress import Compressor
from xenbind.errors import CodecError

PAGE = 4096
BEGIN = struct.pack("<hI", -100, 0)
FULL = struct.pack("<hI", -101, 0)
RNG = np.random.default_rng(99)
OLD = RNG.integers(0, 256, PAGE, dtype=np.uint8)  # cached for pfn 1
RAW = RNG.integers(0, 256, PAGE, dtype=np.uint8).tobytes()


def delta(offset: int, value: int) -> bytes:
    return struct.pack("<hI", offset, value)


def primed(codec: str) -> Receiver:
    """A receiver holding pfn 1 (OLD, decoded whole), and pfn 3 all zero and
    pfn 2 non-zero received in Format A."""
    d = Receiver(codec)
    d.decompress((FULL if codec == "seed" else b"\x80") + OLD.tobytes(), np.array([1], np.uint64))
    raw = np.zeros((2, PAGE), np.uint8)
    raw[0, 4095] = 1
    d.note_received_raw(np.array([2, 3], np.uint64), raw)
    d.based.clear()
    return d


SEED_BAD = [
    ("short record", BEGIN[:5], [1], 0, r"truncated: 5 byte\(s\) left"),
    ("short full page", FULL + RAW[:100], [1], 0, r"truncated full page: 100 of 4096"),
    ("begin value", struct.pack("<hI", -100, 1), [1], 0, r"marker with value 0x1, must be 0"),
    ("full value", struct.pack("<hI", -101, 7) + RAW, [1], 0, r"marker with value 0x7"),
    ("negative offset", BEGIN + delta(-5, 0), [1], 6, r"invalid offset -5"),
    ("unknown marker", struct.pack("<hI", -102, 0), [1], 0, r"invalid offset -102"),
    ("offset 4096", BEGIN + delta(4096, 0), [1], 6, r"delta offset 4096 outside the page"),
    ("offset 32764", BEGIN + delta(32764, 0), [1], 6, r"delta offset 32764 outside"),
    ("misaligned", BEGIN + delta(2, 0), [1], 6, r"delta offset 2 not a multiple of 4"),
    ("descending", BEGIN + delta(8, 0) + delta(4, 0), [1], 12, r"offset 4 not above"),
    ("duplicate", BEGIN + delta(8, 0) + delta(8, 1), [1], 12, r"offset 8 not above"),
    ("delta first", delta(0, 5), [1], 0, r"not preceded by BEGIN_PAGE"),
    ("delta after full", FULL + RAW + delta(0, 1), [1, 1], 4102, r"not preceded by BEGIN_PAGE"),
    # a delta page for a pfn held as zeros (the sender's zero base),
    # malformed, fails like any other
    ("zero base descending", BEGIN + delta(8, 0) + delta(4, 0), [3], 12, r"offset 4 not above"),
    (
        "zero base later",
        FULL + RAW + BEGIN + delta(2, 1),
        [1, 3],
        4108,
        r"delta offset 2 not a multiple of 4",
    ),
    ("too many pages", BEGIN + BEGIN, [1], 6, r"more pages in the data than the 1 pfns"),
    ("cut delta", BEGIN + delta(8, 1) + b"\x00\x00\x00", [1], 12, r"truncated: 3 byte"),
]

XEN_BAD = [
    ("zero base past end", b"\x01abcd" + b"\xff" * 8 + b"\x88", [3], 13, r"SKIP ends at byte 4100"),
    ("zero base cut", b"\x00\x01abcd", [1, 3], 6, r"data ends inside a page \(4 of 4096"),
    ("short full page", b"\x80" + RAW[:100], [1], 0, r"truncated full page: 100 of 4096"),
    ("zero skip inside", b"\x81\x80", [1], 1, r"zero-length marker 0x80"),
    ("zero run inside", b"\x81\x00", [1], 1, r"zero-length marker 0x00"),
    ("run past end", b"\xff" * 8 + b"\x84" + b"\x05" + RAW[:20], [1], 9, r"RUN ends at byte 4100"),
    ("skip past end", b"\xff" * 9, [1], 8, r"SKIP ends at byte 4572"),
    ("cut run", b"\x02" + RAW[:4], [1], 0, r"truncated RUN: 8 bytes"),
    ("ends in page", b"\xff", [1], 1, r"data ends inside a page \(508 of 4096"),
    ("ends in 2nd page", b"\x00\x81", [1, 1], 2, r"data ends inside a page \(4 of 4096"),
    ("run then ends", b"\x01abcd\xff", [1], 6, r"data ends inside a page \(512 of 4096"),
    ("runs then zero", b"\x02abcdefgh\x81\x01ijkl\x00", [1], 15, r"zero-length marker 0x00"),
    (
        "runs then past",
        b"\x7f" + RAW[:508] + b"\xff" * 7 + b"\x7f" + RAW[:508],
        [1],
        516,
        r"RUN ends at byte 4572",
    ),
    ("too many pages", b"\x00\x00", [1], 1, r"more pages in the data than the 1 pfns"),
]


@pytest.mark.parametrize(
    "codec,case",
    [("seed", c) for c in SEED_BAD] + [("xen", c) for c in XEN_BAD],
    ids=[f"seed-{c[0]}" for c in SEED_BAD] + [f"xen-{c[0]}" for c in XEN_BAD],
)
def test_malformed_rejected(codec, case) -> None:
    name, blob, pfns, offset, reason = case
    d = primed(codec)
    before = {p: v.copy() for p, v in d.held.items()}
    with pytest.raises(CodecError) as exc:
        d.decompress(blob, np.array(pfns, np.uint64))
    msg = str(exc.value)
    assert re.search(rf"^{codec} data byte {offset} \(page \d+", msg), msg
    assert re.search(reason, msg), msg
    # checked whole before anything: no base asked for, nothing applied
    assert d.based == []
    assert d.held.keys() == before.keys()
    assert all(np.array_equal(d.held[p], before[p]) for p in before)
    # no state: the next blob decodes
    assert np.array_equal(
        d.decompress(FULL + RAW if codec == "seed" else b"\x80" + RAW, [5])[0],
        np.frombuffer(RAW, np.uint8),
    )


@pytest.mark.parametrize("codec", ["seed", "xen"])
def test_delta_page_for_any_pfn_decodes_on_the_receivers_page(codec) -> None:
    """What error 9 refused: a delta page for a PFN the sender does not hold
    in its cache (sent non-zero in Format A: pfn 2; never sent: pfn 7, which
    the receiver holds as zeros). Xen's restore decodes it in place on the
    backup's page; so does this receiver."""
    d = primed(codec)
    one = (
        (BEGIN + delta(8, 0xAABBCCDD))
        if codec == "seed"
        else (b"\x82\x01" + struct.pack("<I", 0xAABBCCDD) + b"\xff" * 8 + b"\x85")
    )
    got = d.decompress(one + one + (BEGIN if codec == "seed" else b"\x00"), [2, 7, 3])
    want2 = d.page(2).copy()
    assert d.based == [2, 7, 3]
    p2 = np.zeros(PAGE, np.uint8)
    p2[4095] = 1
    p2[8:12] = np.frombuffer(struct.pack("<I", 0xAABBCCDD), np.uint8)
    p7 = np.zeros(PAGE, np.uint8)
    p7[8:12] = p2[8:12]
    assert np.array_equal(got[0], p2) and np.array_equal(want2, p2)
    assert np.array_equal(got[1], p7)
    assert not got[2].any()


def test_a_xen_page_of_runs_only_asks_for_no_base() -> None:
    """A xen delta page whose RUNs cover all 4096 bytes overwrites every word
    of its base: the base source is not asked for it, only for the delta
    pages that keep words of their base, and each page lands on its own row
    whatever the mix (whole, covered, on its base, unchanged)."""
    d = primed("xen")
    new = RNG.integers(0, 256, PAGE, dtype=np.uint8)
    runs = b"".join(
        bytes([min(127, 1024 - w)]) + new[4 * w : 4 * min(1024, w + 127)].tobytes()
        for w in range(0, 1024, 127)
    )
    one = b"\x82\x01" + struct.pack("<I", 0xAABBCCDD) + b"\xff" * 8 + b"\x85"
    blob = runs + one + b"\x80" + RAW + runs + b"\x00"
    got = d.decompress(blob, [5, 2, 6, 7, 1])
    assert d.based == [2, 1]
    p2 = d.page(2).copy()
    assert np.array_equal(got[0], new) and np.array_equal(got[3], new)
    assert got[1, 8:12].tobytes() == struct.pack("<I", 0xAABBCCDD) and got[1, 4095] == 1
    assert np.array_equal(got[1], p2)
    assert got[2].tobytes() == RAW and np.array_equal(got[4], OLD)
    # a page of runs that stops short of 4096 bytes (its last RUN, 8 words, cut) is refused
    with pytest.raises(CodecError, match=r"data ends inside a page \(4064 of 4096 bytes covered\)"):
        d.decompress(runs[:-33], [5])


def history_and_batch(codec: str):
    """A sender with some history and a batch of four pages of every kind:
    a miss, a delta page, an unchanged page, a long run."""
    c = Compressor(codec, 8)
    pfns0 = np.array([1, 3, 4], np.uint64)
    base = RNG.integers(0, 256, (3, PAGE), dtype=np.uint8)
    prime = c.compress(pfns0, base)
    p1 = base[0].copy()
    p1.view(np.uint32)[[0, 5, 6, 7, 900]] ^= 0x01020304
    p4 = base[2].copy()
    p4.view(np.uint32)[100:400] ^= 0xFFFF
    pfns = np.array([9, 1, 3, 4], np.uint64)
    pages = np.stack([OLD, p1, base[1], p4])
    return c, (pfns0, base, prime), pfns, pages


@pytest.mark.parametrize("codec", ["seed", "xen"])
def test_truncation_at_every_byte(codec) -> None:
    c, (pfns0, base, prime), pfns, pages = history_and_batch(codec)
    # page boundaries: encode the same batch page by page on a twin sender
    twin = Compressor(codec, 8)
    assert twin.compress(pfns0, base) == prime
    parts = [twin.compress(pfns[i : i + 1], pages[i : i + 1]) for i in range(len(pfns))]
    blob = c.compress(pfns, pages)
    assert b"".join(parts) == blob
    bounds = np.cumsum([0] + [len(p) for p in parts]).tolist()
    decoded_any_partial_page = False
    for cut in range(len(blob)):
        d = Receiver(codec)
        d.decompress(prime, pfns0)
        k_full = max(i for i, b in enumerate(bounds) if b <= cut)  # whole pages in the prefix
        try:
            got = d.decompress(blob[:cut], pfns)
        except CodecError as e:
            assert cut not in bounds, f"valid prefix of {k_full} pages rejected at {cut}: {e}"
            continue
        if cut in bounds:
            assert len(got) == k_full
            assert np.array_equal(got, pages[:k_full])
        else:
            # only the seed format lets a cut between two deltas of the last
            # page parse: that page comes back with only its first deltas
            assert codec == "seed", f"xen prefix cut inside page accepted at {cut}"
            assert len(got) == k_full + 1
            assert (cut - bounds[k_full]) % 6 == 0
            assert np.array_equal(got[:k_full], pages[:k_full])
            decoded_any_partial_page = True
    assert decoded_any_partial_page == (codec == "seed")


@settings(max_examples=300, deadline=None)
@given(codec=st.sampled_from(["seed", "xen"]), data=st.binary(max_size=200), n=st.integers(0, 5))
def test_random_garbage_never_crashes(codec, data, n) -> None:
    d = primed(codec)
    pfns = np.ones(n, np.uint64)
    try:
        got = d.decompress(data, pfns)
    except CodecError as e:
        assert re.match(rf"{codec} data byte \d+ \(page \d+", str(e))
    else:
        assert got.shape[1] == PAGE and len(got) <= n


@settings(max_examples=200, deadline=None)
@given(codec=st.sampled_from(["seed", "xen"]), pos=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_mutated_blob_never_crashes(codec, pos, byte) -> None:
    c, (pfns0, _, prime), pfns, pages = history_and_batch(codec)
    blob = bytearray(c.compress(pfns, pages))
    blob[pos % len(blob)] = byte
    d = Receiver(codec)
    d.decompress(prime, pfns0)
    try:
        got = d.decompress(bytes(blob), pfns)
    except CodecError:
        return
    assert got.shape[1] == PAGE and len(got) <= len(pfns)
