"""Block hashes (xenbind/blockhash.py): what differs between two disks.

* Identical disks: no block differs; a change anywhere in a block (its first
  or last byte, the short last block) makes exactly that block differ.
* runs() coalesces adjacent blocks, splits at max_run, clips to the disk.
* Progress counts hashed blocks and bytes, step by step.
* HashesMessage round-trips, and a peer's message outside the geometry is
  refused before anything is kept.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from xenbind import blockhash as bh
from xenbind.errors import ProtocolError

BLOCK = 4096
SIZE = 10 * BLOCK + 1024  # a short last block


def _disk(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_diff_finds_exactly_the_changed_blocks(tmp_path: os.PathLike[str]) -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, SIZE, np.uint8).tobytes()
    a = _disk(os.path.join(tmp_path, "a"), base)
    same = _disk(os.path.join(tmp_path, "same"), base)
    changed = bytearray(base)
    for pos in (0, 3 * BLOCK + BLOCK - 1, SIZE - 1):  # blocks 0, 3 and the short 10
        changed[pos] ^= 1
    b = _disk(os.path.join(tmp_path, "b"), bytes(changed))
    ha = bh.hash_file(a, block=BLOCK)
    assert len(ha) == 11
    assert len(bh.diff(ha, bh.hash_file(same, block=BLOCK))) == 0
    assert bh.diff(ha, bh.hash_file(b, block=BLOCK)).tolist() == [0, 3, 10]
    with pytest.raises(ValueError):
        bh.diff(ha, ha[:-1])


def test_runs() -> None:
    changed = np.array([0, 1, 2, 5, 9, 10], np.int64)
    assert bh.runs(changed, SIZE, BLOCK, max_run=2 * BLOCK) == [
        (0, 2 * BLOCK),
        (2 * BLOCK, BLOCK),
        (5 * BLOCK, BLOCK),
        (9 * BLOCK, BLOCK + 1024),  # clipped at the disk's end
    ]
    assert bh.runs(np.zeros(0, np.int64), SIZE, BLOCK, max_run=BLOCK) == []


def test_progress_by_steps(tmp_path: os.PathLike[str]) -> None:
    path = _disk(os.path.join(tmp_path, "d"), bytes(SIZE))
    fd = os.open(path, os.O_RDONLY)
    try:
        h = bh.BlockHasher(fd, SIZE, block=BLOCK)
        assert h.step(4) == 4 and h.progress.hashed == 4 and not h.done
        assert h.progress.bytes_hashed == 4 * BLOCK
        while not h.done:
            h.step(3)
        assert h.progress.bytes_hashed == SIZE
        assert h.progress.fraction == 0.5  # hashed, nothing compared yet
        assert (h.hashes == bh.hash_file(path, block=BLOCK)).all()
    finally:
        os.close(fd)


def test_hashes_message() -> None:
    hashes = np.arange(5, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    m = bh.HashesMessage(1, BLOCK, 6, hashes)
    back = bh.HashesMessage.unpack(m.pack(), disk_sizes=[BLOCK, SIZE], block=BLOCK)
    assert back.disk == 1 and back.first == 6 and (back.hashes == hashes).all()
    bad = [
        (bh.HashesMessage(2, BLOCK, 0, hashes).pack(), "disk 2"),
        (bh.HashesMessage(1, 512, 0, hashes).pack(), "block size 512"),
        (bh.HashesMessage(1, BLOCK, 7, hashes).pack(), "disk 1 has 11"),
        (m.pack()[:-1], "bytes for 5 hashes"),
        (m.pack()[:5], "shorter than its head"),
    ]
    for payload, words in bad:
        with pytest.raises(ProtocolError, match=words):
            bh.HashesMessage.unpack(payload, disk_sizes=[BLOCK, SIZE], block=BLOCK)
