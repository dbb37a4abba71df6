"""The sender's zero-copy paths (bench/e2e's phase 2): same bytes as the copying ones.

Rules checked: ``Compressor.compress_view`` encodes exactly what ``compress``
does (cache included) and leaves ``headroom`` bytes for a chunk header;
``encode_body_b`` gives byte-identical streams with and without it, one
buffer per chunk.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from xenbind.compress import Compressor
from xenbind.stream.encoder import COMPRESSED_HEADER, encode_body_b
from xenbind.stream.format import TAG_COMPRESSED_DATA


class CopyingOnly:
    """A compressor without compress_view: the encoder's fallback path."""

    def __init__(self, codec: str) -> None:
        self.c = Compressor(codec)

    def compress(self, pfns, pages, pagetable=None) -> bytes:
        return self.c.compress(pfns, pages, pagetable)


def _epochs(rng: np.random.Generator, n: int, rounds: int):
    pfns = np.sort(rng.choice(4 * n, n, replace=False)).astype(np.uint64)
    pages = rng.integers(0, 256, (n, 4096), dtype=np.uint8)
    for _ in range(rounds):
        rows = rng.integers(0, n, n // 3)
        pages[rows, rng.integers(0, 4096, len(rows))] ^= 0x5A
        yield pfns, pages.copy()


@pytest.mark.parametrize("codec", ["seed", "xen"])
def test_compress_view_matches_compress(codec: str) -> None:
    rng = np.random.default_rng(3)
    a, b = Compressor(codec, cache_pages=256), Compressor(codec, cache_pages=256)
    for pfns, pages in _epochs(rng, 100, 4):
        want = a.compress(pfns, pages)
        got = b.compress_view(pfns, pages, headroom=COMPRESSED_HEADER)
        assert len(got) == COMPRESSED_HEADER + len(want)
        assert bytes(got[COMPRESSED_HEADER:]) == want
        got[:COMPRESSED_HEADER] = b"\xff" * COMPRESSED_HEADER  # the caller's to fill
    assert (a.stats.hits, a.stats.misses) == (b.stats.hits, b.stats.misses)
    assert a.stats.hits > 0


@pytest.mark.parametrize("codec", ["seed", "xen"])
def test_body_b_same_bytes_one_buffer_per_chunk(codec: str) -> None:
    rng = np.random.default_rng(4)
    fast, slow = Compressor(codec), CopyingOnly(codec)
    for pfns, pages in _epochs(rng, 2500, 3):
        got = encode_body_b(pfns, pages, fast, buffer_pages=1000)
        want = encode_body_b(pfns, pages, slow, buffer_pages=1000)
        assert b"".join(got) == b"".join(want)
        assert len(got) == len(want)
        blobs = [bytes(x) for x in got if struct.unpack_from("<i", x)[0] == TAG_COMPRESSED_DATA]
        assert len(blobs) == 3  # 1000 + 1000 + 500 pages
        for blob in blobs:
            assert struct.unpack_from("<Q", blob, 4)[0] == len(blob) - COMPRESSED_HEADER
