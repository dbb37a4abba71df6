"""Block hashes of a disk, for the initial synchronisation and its resume.

A disk is cut into fixed-size blocks (``block`` bytes, a multiple of the
sector; the last block may be shorter). Each block's hash is xxh3-64 of its
bytes, seeded with nothing; a disk's hashes are a uint64 array, block ``i``
covering ``[i * block, min((i + 1) * block, size))``. The receiver hashes its
backup disk and sends the hashes (``HashesMessage``); the sender hashes its
disk after the mirror is on and asks its block server to send the blocks
whose hashes differ (``diff`` / ``runs``). Why this is enough, whatever the
timing of the two hashings against the mirrored writes: docs/disk.md,
"Initial synchronisation".

    h = BlockHasher(fd, size, block=64 << 10)
    while not h.done: h.step(max_blocks=256)       # interleave with other work
    h.hashes, h.progress                            # uint64 array; counters
    changed = diff(primary_hashes, backup_hashes)   # block indices that differ
    for offset, length in runs(changed, size, block, max_run=4 << 20): ...

    HashesMessage(disk, block, first, hashes).pack() / HashesMessage.unpack(payload, ..)

Rules kept here:
- Two hash arrays compare only when they describe the same disk geometry
  (size and block): ``diff`` refuses otherwise.
- ``HashesMessage.unpack`` is given the expected geometry and checks a
  peer's message against it before keeping anything: a disk index, block
  size, first block or count outside it is a ``ProtocolError``; a message
  never holds more than ``MAX_HASHES_PER_MESSAGE`` hashes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from .errors import ProtocolError

DEFAULT_BLOCK = 64 << 10
MIN_BLOCK = 512
MAX_BLOCK = 64 << 20
#: Hashes in one HashesMessage (512 KiB of payload).
MAX_HASHES_PER_MESSAGE = 1 << 16
_MSG_HEAD = struct.Struct("<HHIQI")  # disk, reserved 0, block, first block, count
#: The longest packed HashesMessage.
MAX_MESSAGE_BYTES = _MSG_HEAD.size + 8 * MAX_HASHES_PER_MESSAGE

HashArray = npt.NDArray[np.uint64]


def block_count(size: int, block: int) -> int:
    return -(-size // block)


@dataclass
class Progress:
    """Counters of one disk's synchronisation (remusctl status)."""

    blocks: int = 0  # blocks of the disk
    hashed: int = 0  # blocks hashed so far
    compared: bool = False  # both sides hashed and compared
    differing: int = 0  # blocks found different (once compared)
    sent: int = 0  # differing blocks handed to the block server so far
    bytes_hashed: int = 0
    bytes_sent: int = 0

    @property
    def fraction(self) -> float:
        """0..1: hashing counts for the first half, sending for the second."""
        if self.blocks == 0:
            return 1.0
        h = self.hashed / self.blocks
        if not self.compared:
            return 0.5 * h
        return 0.5 * h + 0.5 * (self.sent / self.differing if self.differing else 1.0)


class BlockHasher:
    """Hashes a disk (an open fd: file or block device) step by step, reading
    ``block`` bytes at a time into one reused buffer."""

    def __init__(self, fd: int, size: int, *, block: int = DEFAULT_BLOCK) -> None:
        check_geometry(size, block)
        self.fd = fd
        self.size = size
        self.block = block
        self.hashes: HashArray = np.zeros(block_count(size, block), np.uint64)
        self.progress = Progress(blocks=len(self.hashes))
        self._buf = bytearray(block)

    @property
    def done(self) -> bool:
        return self.progress.hashed == len(self.hashes)

    def step(self, max_blocks: int = 256) -> int:
        """Hash up to ``max_blocks`` more blocks; returns how many were hashed."""
        view = memoryview(self._buf)
        i0 = self.progress.hashed
        i1 = min(len(self.hashes), i0 + max_blocks)
        for i in range(i0, i1):
            off = i * self.block
            want = min(self.block, self.size - off)
            got = 0
            while got < want:
                n = os.preadv(self.fd, [view[got:want]], off + got)
                if n == 0:
                    raise OSError(f"disk ends at {off + got}, expected {self.size} bytes")
                got += n
            self.hashes[i] = xxhash.xxh3_64_intdigest(view[:want])
            self.progress.bytes_hashed += want
        self.progress.hashed = i1
        return i1 - i0

    def run(self) -> HashArray:
        while not self.done:
            self.step(4096)
        return self.hashes


def check_geometry(size: int, block: int) -> None:
    if size <= 0:
        raise ValueError(f"disk size {size} must be positive")
    if not MIN_BLOCK <= block <= MAX_BLOCK or block % MIN_BLOCK:
        raise ValueError(f"block size {block}: a multiple of 512 between 512 and 64 MiB")


def hash_file(path: str, *, block: int = DEFAULT_BLOCK) -> HashArray:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return BlockHasher(fd, size, block=block).run()
    finally:
        os.close(fd)


def diff(primary: HashArray, backup: HashArray) -> npt.NDArray[np.int64]:
    """Indices of the blocks whose hashes differ (ascending)."""
    if primary.shape != backup.shape:
        raise ValueError(f"{len(primary)} primary blocks against {len(backup)} on the backup")
    return np.flatnonzero(primary != backup).astype(np.int64)


def runs(
    changed: npt.NDArray[np.int64], size: int, block: int, *, max_run: int
) -> list[tuple[int, int]]:
    """Coalesce changed block indices into (offset, length) byte runs of at
    most ``max_run`` bytes (a multiple of ``block``), clipped to the disk."""
    if max_run < block:
        raise ValueError(f"max_run {max_run} is below the block size {block}")
    per = max_run // block
    out: list[tuple[int, int]] = []
    if len(changed) == 0:
        return out
    breaks = np.flatnonzero(np.diff(changed) != 1) + 1
    for seg in np.split(changed, breaks):
        first, last = int(seg[0]), int(seg[-1])
        for b in range(first, last + 1, per):
            start = b * block
            end = min((min(b + per, last + 1)) * block, size)
            out.append((start, end - start))
    return out


@dataclass(frozen=True)
class HashesMessage:
    """A run of one disk's block hashes, as the receiver sends them back."""

    disk: int
    block: int
    first: int
    hashes: HashArray

    def pack(self) -> bytes:
        if len(self.hashes) > MAX_HASHES_PER_MESSAGE:
            raise ValueError(f"{len(self.hashes)} hashes: at most {MAX_HASHES_PER_MESSAGE}")
        head = _MSG_HEAD.pack(self.disk, 0, self.block, self.first, len(self.hashes))
        return head + self.hashes.astype("<u8").tobytes()

    @classmethod
    def unpack(cls, payload: bytes, *, disk_sizes: list[int], block: int) -> HashesMessage:
        if len(payload) < _MSG_HEAD.size:
            raise ProtocolError(f"disk hashes: {len(payload)} bytes, shorter than its head")
        disk, reserved, blk, first, count = _MSG_HEAD.unpack_from(payload)
        if disk >= len(disk_sizes):
            raise ProtocolError(f"disk hashes for disk {disk}: the domain has {len(disk_sizes)}")
        if reserved:
            raise ProtocolError(f"disk hashes: reserved field {reserved:#x}")
        if blk != block:
            raise ProtocolError(f"disk hashes with block size {blk}, agreed {block}")
        if count > MAX_HASHES_PER_MESSAGE:
            raise ProtocolError(
                f"disk hashes: {count} in one message, at most {MAX_HASHES_PER_MESSAGE}"
            )
        total = block_count(disk_sizes[disk], block)
        if first + count > total:
            raise ProtocolError(
                f"disk hashes for blocks {first}..{first + count - 1}: disk {disk} has {total}"
            )
        if len(payload) != _MSG_HEAD.size + 8 * count:
            raise ProtocolError(
                f"disk hashes: {len(payload)} bytes for {count} hashes "
                f"(expected {_MSG_HEAD.size + 8 * count})"
            )
        hashes = np.frombuffer(payload, "<u8", count, _MSG_HEAD.size).astype(np.uint64)
        return cls(disk, blk, first, hashes)
