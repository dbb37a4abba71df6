"""Golden vectors: pages whose exact encodings are written out by hand from
the formats (docs/codecs.md), checked byte for byte in both directions."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tests.xenbind.compress.receiver import Receiver
from xenbind.compress import Compressor

PAGE = 4096
BEGIN = struct.pack("<hI", -100, 0)  # 9c ff 00 00 00 00
FULL = struct.pack("<hI", -101, 0)  # 9b ff 00 00 00 00


def delta(offset: int, value: int) -> bytes:
    return struct.pack("<hI", offset, value)


def words(n: int, first: int) -> bytes:
    return struct.pack(f"<{n}I", *range(first, first + n))


def base_page() -> np.ndarray:
    """A recognisable old page: word i holds 0xA0000000 + i."""
    return (np.arange(1024, dtype="<u4") + 0xA0000000).view(np.uint8).copy()


def changed(page: np.ndarray, start: int, values: bytes) -> np.ndarray:
    new = page.copy()
    new[4 * start : 4 * start + len(values)] = np.frombuffer(values, np.uint8)
    return new


OLD = base_page()


def golden_cases():
    """(name, new page, seed bytes, xen bytes) for a page cached as OLD."""
    cases = [("unchanged", OLD, BEGIN, b"\x00")]
    # word 0 changed
    new = changed(OLD, 0, struct.pack("<I", 0x11223344))
    cases.append(
        (
            "word 0",
            new,
            BEGIN + bytes.fromhex("0000 44332211"),
            b"\x01" + bytes.fromhex("44332211") + b"\xff" * 8 + b"\x87",  # skip 1023 = 8*127 + 7
        )
    )
    # last word changed
    new = changed(OLD, 1023, struct.pack("<I", 7))
    cases.append(
        (
            "word 1023",
            new,
            BEGIN + delta(4092, 7),
            b"\xff" * 8 + b"\x87" + b"\x01" + struct.pack("<I", 7),
        )
    )
    # two scattered words: 2 and 5
    new = changed(changed(OLD, 2, struct.pack("<I", 0xCAFE)), 5, struct.pack("<I", 0xBEEF))
    cases.append(
        (
            "words 2 and 5",
            new,
            BEGIN + delta(8, 0xCAFE) + delta(20, 0xBEEF),
            # skip 2, run 1, skip 2, run 1, skip 1018 = 8*127 + 2
            b"\x82\x01"
            + struct.pack("<I", 0xCAFE)
            + b"\x82\x01"
            + struct.pack("<I", 0xBEEF)
            + b"\xff" * 8
            + b"\x82",
        )
    )
    # a run of 200 words at word 10: split 127 + 73
    vals = words(200, 1)
    new = changed(OLD, 10, vals)
    cases.append(
        (
            "run of 200",
            new,
            BEGIN + b"".join(delta(4 * (10 + i), 1 + i) for i in range(200)),
            b"\x8a"
            + b"\x7f"
            + vals[: 127 * 4]
            + b"\x49"
            + vals[127 * 4 :]
            + b"\xff" * 6
            + b"\xb4",  # skip 814 = 6*127 + 52
        )
    )
    # run of exactly 127 words then exactly 127 unchanged at the end
    vals = words(127, 0x500)
    new = changed(OLD, 1024 - 254, vals)
    cases.append(
        (
            "run of 127",
            new,
            BEGIN + b"".join(delta(4 * (770 + i), 0x500 + i) for i in range(127)),
            b"\xff" * 6 + b"\x88" + b"\x7f" + vals + b"\xff",  # skip 770 = 6*127 + 8
        )
    )
    # every word changed: seed sends FULL_PAGE, xen 8 runs of 127 + one of 8
    vals = words(1024, 0x10000)
    new = changed(OLD, 0, vals)
    cases.append(
        (
            "all words",
            new,
            FULL + vals,
            b"".join(b"\x7f" + vals[508 * i : 508 * (i + 1)] for i in range(8))
            + b"\x08"
            + vals[4064:],
        )
    )
    # 682 changed words (0..681): still deltas in seed (6 + 6 * 682 = 4098 bytes)
    vals = words(682, 0)
    new = changed(OLD, 0, vals)
    cases.append(
        (
            "682 words",
            new,
            BEGIN + b"".join(delta(4 * i, i) for i in range(682)),
            # run 682 = 5*127 + 47, skip 342 = 2*127 + 88
            b"".join(b"\x7f" + vals[508 * i : 508 * (i + 1)] for i in range(5))
            + b"\x2f"
            + vals[2540:]
            + b"\xff\xff\xd8",
        )
    )
    # 683 changed words: one more than the seed's delta budget -> FULL_PAGE
    vals = words(683, 0)
    new = changed(OLD, 0, vals)
    cases.append(
        (
            "683 words",
            new,
            FULL + new.tobytes(),
            b"".join(b"\x7f" + vals[508 * i : 508 * (i + 1)] for i in range(5))
            + b"\x30"
            + vals[2540:]
            + b"\xff\xff\xd7",
        )
    )
    return cases


CASES = golden_cases()


@pytest.mark.parametrize("codec", ["seed", "xen"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cached_page_golden_both_directions(codec, case) -> None:
    name, new, seed_bytes, xen_bytes = case
    want = seed_bytes if codec == "seed" else xen_bytes
    pfn = np.array([0x1234], np.uint64)
    c = Compressor(codec, 2)
    assert c.compress(pfn, OLD[None]) == (FULL if codec == "seed" else b"\x80") + OLD.tobytes()
    assert c.compress(pfn, new[None]) == want  # encode
    d = Receiver(codec)
    d.decompress((FULL if codec == "seed" else b"\x80") + OLD.tobytes(), pfn)
    assert np.array_equal(d.decompress(want, pfn)[0], new)  # decode


@pytest.mark.parametrize("codec", ["seed", "xen"])
def test_multi_page_blob_golden(codec) -> None:
    """One batch: a miss (pfn 7), a hit with one word (pfn 1), an unchanged
    hit (pfn 2), a page-table page that is cached (pfn 1 again)."""
    p1, p2, p7 = base_page(), np.zeros(PAGE, np.uint8), np.full(PAGE, 0x55, np.uint8)
    c, d = Compressor(codec, 8), Receiver(codec)
    first = c.compress(np.array([1, 2], np.uint64), np.stack([p1, p2]))
    d.decompress(first, np.array([1, 2], np.uint64))
    p1b = changed(p1, 3, struct.pack("<I", 0xFFFFFFFF))
    pfns = np.array([7, 1, 2, 1], np.uint64)
    pages = np.stack([p7, p1b, p2, p1b])
    if codec == "seed":
        want = FULL + p7.tobytes() + BEGIN + delta(12, 0xFFFFFFFF) + BEGIN + FULL + p1b.tobytes()
    else:
        want = (
            b"\x80"
            + p7.tobytes()
            + b"\x83\x01\xff\xff\xff\xff"
            + b"\xff" * 8
            + b"\x84"  # skip 3, run 1, skip 1020 = 8*127 + 4
            + b"\x00"
            + b"\x80"
            + p1b.tobytes()
        )
    assert c.compress(pfns, pages, np.array([False, False, False, True])) == want
    assert np.array_equal(d.decompress(want, pfns), pages)


def test_xen_alternating_words_vector() -> None:
    """Every even word changed: Xen's loop emits 512 pairs RUN 1 + word, SKIP 1
    (the last SKIP covers word 1023); a page of 3072 bytes."""
    new = OLD.copy()
    new.view("<u4")[0:1024:2] = np.arange(512, dtype="<u4")
    want = b"".join(b"\x01" + struct.pack("<I", i) + b"\x81" for i in range(512))
    pfn = np.array([1], np.uint64)
    c = Compressor("xen", 1)
    c.compress(pfn, OLD[None])
    assert c.compress(pfn, new[None]) == want
    d = Receiver("xen")
    d.decompress(b"\x80" + OLD.tobytes(), pfn)
    assert np.array_equal(d.decompress(want, pfn)[0], new)
