"""The lab guest's disk workload (lab/guest/labguest.c, "DISK") as a checker
sees it: the block layout, and what a disk image must hold when it is one
prefix of the guest's write sequence.

labguest writes number seq (1, 2, ...) to 4 KiB block ``seq % blocks``:

    bytes 0..7     b"LABDISKB"
    bytes 8..15    uint64 seq
    bytes 16..23   uint64 block index
    bytes 24..31   uint64 the guest's counter when written (not predictable)
    bytes 32..4095 byte k = (seq * 13 + k * 7 + 0x3c) & 0xff

and stores seq at byte 16 of its counter page (``DISK_SEQ_OFFSET``) once the
write completed (O_DIRECT|O_DSYNC), the disk's block count at byte 24.

A disk that holds exactly writes 1..L ("prefix L") has, in block b, the
largest seq <= L with seq % blocks == b, or zeros if there is none.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

BLOCK = 4096
MAGIC = b"LABDISKB"
DISK_SEQ_OFFSET = 16
DISK_BLOCKS_OFFSET = 24
COUNTER_FIELD = slice(24, 32)


def disk_state(counter_page: np.ndarray) -> tuple[int, int]:
    """(last completed seq, disk blocks) from the guest's counter page."""
    raw = counter_page.tobytes()
    seq, blocks = struct.unpack_from("<QQ", raw, DISK_SEQ_OFFSET)
    return seq, blocks


def expected_block(seq: int, b: int) -> np.ndarray:
    """Block ``b`` after write ``seq`` (the counter field left zero)."""
    k = np.arange(BLOCK, dtype=np.uint64)
    out = ((seq * 13 + k * 7 + 0x3C) & 0xFF).astype(np.uint8)
    out[:24] = np.frombuffer(MAGIC + struct.pack("<QQ", seq, b), dtype=np.uint8)
    out[COUNTER_FIELD] = 0
    return out


def latest_seq(b: int, prefix: int, blocks: int) -> int:
    """The last write <= ``prefix`` to block ``b`` (0: none)."""
    if prefix <= 0:
        return 0
    s = prefix - ((prefix - b) % blocks)
    return s if s >= 1 else 0


@dataclass(frozen=True)
class Scan:
    """What an image holds: the seq in each block (0: zeros), the largest,
    and the blocks whose bytes are neither zeros nor a well-formed write."""

    seqs: np.ndarray
    top: int
    malformed: list[int]


def scan(image: np.ndarray, blocks: int) -> Scan:
    """``image``: uint8 array of at least ``blocks`` * BLOCK bytes."""
    img = image[: blocks * BLOCK].reshape(blocks, BLOCK)
    seqs = np.zeros(blocks, dtype=np.uint64)
    malformed: list[int] = []
    for b in range(blocks):
        row = img[b]
        if not row.any():
            continue
        raw = row[:24].tobytes()
        seq, idx = struct.unpack_from("<QQ", raw, 8)
        want = expected_block(int(seq), b)
        got = row.copy()
        got[COUNTER_FIELD] = 0
        if raw[:8] != MAGIC or idx != b or seq % blocks != b or not np.array_equal(got, want):
            malformed.append(b)
            continue
        seqs[b] = seq
    return Scan(seqs, int(seqs.max()) if blocks else 0, malformed)


def prefix_errors(s: Scan, prefix: int, blocks: int) -> list[str]:
    """Why the scanned image is not exactly prefix ``prefix`` ([] if it is)."""
    errs = [f"block {b}: not zeros and not a labguest write" for b in s.malformed[:4]]
    wrong = []
    for b in range(blocks):
        if b in s.malformed:
            continue
        want = latest_seq(b, prefix, blocks)
        if int(s.seqs[b]) != want:
            wrong.append((b, int(s.seqs[b]), want))
    errs += [
        f"block {b} holds write {got}, prefix {prefix} puts {want} there"
        for b, got, want in wrong[:4]
    ]
    if len(wrong) > 4:
        errs.append(f"... {len(wrong)} blocks in all")
    return errs


def same_blocks(a: np.ndarray, b: np.ndarray, blocks: int, which: list[int]) -> list[int]:
    """Of the blocks ``which``, those whose bytes differ between images a and b."""
    ra = a[: blocks * BLOCK].reshape(blocks, BLOCK)
    rb = b[: blocks * BLOCK].reshape(blocks, BLOCK)
    return [i for i in which if not np.array_equal(ra[i], rb[i])]
