"""The disk step's checker (lab/checks/labdisk.py) against images built here
by the C formula of lab/guest/labguest.c."""

from __future__ import annotations

import struct

import numpy as np

from lab.checks import labdisk as L

BLOCKS = 8


def _write(img: np.ndarray, seq: int, counter: int = 0) -> None:
    b = seq % BLOCKS
    blk = bytearray(L.BLOCK)
    blk[:32] = L.MAGIC + struct.pack("<QQQ", seq, b, counter)
    for k in range(32, L.BLOCK):
        blk[k] = (seq * 13 + k * 7 + 0x3C) & 0xFF
    img[b * L.BLOCK : (b + 1) * L.BLOCK] = np.frombuffer(bytes(blk), dtype=np.uint8)


def _image(upto: int) -> np.ndarray:
    img = np.zeros(BLOCKS * L.BLOCK, dtype=np.uint8)
    for s in range(1, upto + 1):
        _write(img, s, counter=s * 10 + 3)
    return img


def test_latest_seq():
    assert [L.latest_seq(b, 3, BLOCKS) for b in range(BLOCKS)] == [0, 1, 2, 3, 0, 0, 0, 0]
    assert [L.latest_seq(b, 10, BLOCKS) for b in range(BLOCKS)] == [8, 9, 10, 3, 4, 5, 6, 7]
    assert L.latest_seq(0, 0, BLOCKS) == 0


def test_a_prefix_passes_with_and_without_wrapping():
    for upto in (0, 3, 8, 21):
        s = L.scan(_image(upto), BLOCKS)
        assert s.top == upto and not s.malformed
        assert L.prefix_errors(s, upto, BLOCKS) == []


def test_a_missing_or_extra_write_is_named():
    img = _image(12)
    _write(img, 13)  # a write past the prefix
    s = L.scan(img, BLOCKS)
    assert s.top == 13 and L.prefix_errors(s, 13, BLOCKS) == []
    assert L.prefix_errors(s, 12, BLOCKS)  # 13 is one too many for prefix 12
    old = _image(12)
    _write(old, 3)  # block 3 goes back to write 3: write 11 lost
    errs = L.prefix_errors(L.scan(old, BLOCKS), 12, BLOCKS)
    assert errs and "block 3 holds write 3" in errs[0]


def test_a_torn_block_is_malformed():
    img = _image(5)
    img[2 * L.BLOCK + 100] ^= 1
    s = L.scan(img, BLOCKS)
    assert s.malformed == [2] and L.prefix_errors(s, 5, BLOCKS)


def test_disk_state_and_same_blocks():
    page = np.zeros(4096, dtype=np.uint8)
    page[16:32] = np.frombuffer(struct.pack("<QQ", 77, 4096), dtype=np.uint8)
    assert L.disk_state(page) == (77, 4096)
    a, b = _image(6), _image(6)
    _write(b, 6, counter=1)  # same write, another counter
    assert L.same_blocks(a, b, BLOCKS, list(range(BLOCKS))) == [6]
