"""Guest workloads of the simulated host, and their registers (the context blob).

A workload is a deterministic function of (registers, guest memory): it runs
in *steps*, and step ``i`` computes everything it needs from ``(seed, i)``
with a counter-based hash (splitmix64), so the registers are a handful of
integers and a backup domain given the same memory and registers continues
exactly where the primary stopped. How many steps run per batch (a matter of
timing) never changes the result.

The registers' format is that of version 1 (``SIMREGS1``) unchanged: the
disk rate and the max-rate mode live in bits of ``flags`` that were always
zero, so a register set of a guest without a disk, at a set rate, packs to
the same 64 bytes as before.

Registers = ``Context.hvm_context`` (64 bytes, little-endian)::

    offset size  field
     0      8    magic  b"SIMREGS1"
     8      4    kind   0 idle, 1 random, 2 hotset, 3 scan, 4 ledger
    12      4    flags  bit 0: crashed (the guest found its memory unusable);
                        bit 1: max rate (run as fast as the vCPU can, no rate
                        cap; ``rate`` keeps the last set rate, which a reader
                        that predates the bit runs at);
                        bits 8..31: disk_every K (random, hotset: every K-th
                        step writes a disk block; 0: no disk writes)
    16      8    seed
    24      8    step   steps completed
    32      8    rate   steps per second (float64)
    40      8    a      hotset: working-set pages; ledger: accounts
    48      8    b      hotset: Zipf exponent (float64)
    56      8    outputs emitted so far

Device model record = ``Context.device_model`` (32 bytes): magic b"SIMQEMU1",
step, outputs emitted, CRC-32 of the registers (u64): the small device state
a device model would carry; it must agree with the registers.

Page-writing workloads (``random``, ``hotset``, ``scan``): a step writes one
64-byte record into one page: at slot ``h(seed, i, 1) % 64`` (byte offset
slot*64) the words ``h(seed, i, 2) ^ j*K`` for j = 0..6 and then ``i``.
Which page: ``random`` uniform over the usable pages, ``hotset`` a
Zipf(b)-distributed rank in a working set of ``a`` pages spread over memory
by a seeded stride, ``scan`` page ``i mod usable`` (so N steps dirty exactly
min(N, usable) distinct pages). ``idle`` writes nothing. One step is one page
write, so ``rate`` is pages written per second. The three magic PFNs at the
top of memory are never written by a workload ("usable" pages exclude them).

Disk writes (``random``, ``hotset`` with a disk and disk_every K > 0): step
``i`` with ``i % K == K - 1`` also writes one 4 KiB block of disk 0, through
the guest's NBD connection (xenbind.sim.disk), before the batch's memory
writes: block ``h(seed, i, 4) % (disk size // 4096)``, holding the uint64
words ``i``, the block number, then ``h(seed, i, 5) ^ j*K`` for j = 2..511.
So after T steps block b holds the data of the last such step below T that
chose b, or zeros if none did (``expected_disk``, ``check_disk``).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import PAGE_SIZE
from .disk import DiskError, GuestDisk

KINDS = ("idle", "random", "hotset", "scan", "ledger")
KIND_ID = {name: i for i, name in enumerate(KINDS)}

REGS_MAGIC = b"SIMREGS1"
REGS_FORMAT = "<8sIIQQdQdQ"
REGS_SIZE = struct.calcsize(REGS_FORMAT)  # 64
FLAG_CRASHED = 1 << 0
#: run without a rate cap (set_rate(inf)): as many steps as the vCPU runs
FLAG_MAX_RATE = 1 << 1
#: flags bits 8..31: every how many steps a page workload writes a disk block
DISK_EVERY_SHIFT = 8
MAX_DISK_EVERY = (1 << 24) - 1
#: a disk write of a page workload: one 4 KiB block
DISK_BLOCK = 4096
DISK_BLOCK_WORDS = DISK_BLOCK // 8
#: disk writes per batch at most: each is an NBD round trip (~50 us), and a
#: pause is answered only between batches (Xen pauses at once: a simulated
#: pause must not wait for many writes; 8 added ~0.25 ms to a writing guest's pause)
DISK_WRITES_PER_BATCH = 2

DM_MAGIC = b"SIMQEMU1"
DM_FORMAT = "<8sQQQ"
DM_SIZE = struct.calcsize(DM_FORMAT)  # 32

#: magic PFNs (ioreq, buffered ioreq, xenstore) sit in the top three pages
MAGIC_PAGES = 3
#: bytes written by one step of a page-writing workload
RECORD_BYTES = 64
RECORD_WORDS = RECORD_BYTES // 8
SLOTS_PER_PAGE = PAGE_SIZE // RECORD_BYTES
WORDS_PER_PAGE = PAGE_SIZE // 8

DEFAULT_RATE = {"idle": 0.0, "random": 1000.0, "hotset": 1000.0, "scan": 10000.0, "ledger": 1000.0}
DEFAULT_WSS = 1024  # hotset working-set pages
DEFAULT_ZIPF = 1.1  # hotset Zipf exponent
DEFAULT_ACCOUNTS = 1000  # ledger accounts

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_K_WORD = 0xD6E8FEB86659FD93


class RegistersError(ValueError):
    """A context blob that is not a valid register set."""


@dataclass
class Registers:
    kind: int
    seed: int
    step: int = 0
    rate: float = 0.0
    a: int = 0
    b: float = 0.0
    outputs: int = 0
    flags: int = 0

    @property
    def kind_name(self) -> str:
        return KINDS[self.kind]

    @property
    def disk_every(self) -> int:
        """Every how many steps a page workload writes a disk block (0: never)."""
        return (self.flags >> DISK_EVERY_SHIFT) & MAX_DISK_EVERY

    @disk_every.setter
    def disk_every(self, every: int) -> None:
        if not 0 <= every <= MAX_DISK_EVERY:
            raise RegistersError(f"disk_every must be 0 to {MAX_DISK_EVERY}, got {every}")
        self.flags = (self.flags & ~(MAX_DISK_EVERY << DISK_EVERY_SHIFT)) | (
            every << DISK_EVERY_SHIFT
        )

    @property
    def max_rate(self) -> bool:
        """Whether the guest runs as fast as it can (``rate`` is then not a cap)."""
        return bool(self.flags & FLAG_MAX_RATE)

    @max_rate.setter
    def max_rate(self, on: bool) -> None:
        self.flags = (self.flags | FLAG_MAX_RATE) if on else (self.flags & ~FLAG_MAX_RATE)

    def set_rate(self, rate: float) -> None:
        """A rate in steps per second; ``inf``: the max-rate mode (the rate
        field keeps the last finite rate)."""
        if rate == math.inf:
            self.max_rate = True
            return
        if not (math.isfinite(rate) and rate >= 0):
            raise RegistersError(f"rate must be a non-negative number or inf, got {rate}")
        self.rate = float(rate)
        self.max_rate = False

    def pack(self) -> bytes:
        return struct.pack(
            REGS_FORMAT,
            REGS_MAGIC,
            self.kind,
            self.flags,
            self.seed,
            self.step,
            self.rate,
            self.a,
            self.b,
            self.outputs,
        )

    @classmethod
    def unpack(cls, blob: bytes) -> Registers:
        if len(blob) != REGS_SIZE:
            raise RegistersError(f"register blob is {len(blob)} bytes, expected {REGS_SIZE}")
        magic, kind, flags, seed, step, rate, a, b, outputs = struct.unpack(REGS_FORMAT, blob)
        if magic != REGS_MAGIC:
            raise RegistersError(f"register blob magic {magic!r}, expected {REGS_MAGIC!r}")
        if kind >= len(KINDS):
            raise RegistersError(f"unknown workload kind {kind}")
        if not (math.isfinite(rate) and rate >= 0) or not math.isfinite(b):
            raise RegistersError("rate/parameter is not a finite non-negative number")
        return cls(kind, seed, step, rate, a, b, outputs, flags)

    def device_model(self) -> bytes:
        return struct.pack(DM_FORMAT, DM_MAGIC, self.step, self.outputs, zlib.crc32(self.pack()))

    def check_device_model(self, blob: bytes) -> None:
        if len(blob) != DM_SIZE:
            raise RegistersError(f"device model record is {len(blob)} bytes, expected {DM_SIZE}")
        magic, step, outputs, crc = struct.unpack(DM_FORMAT, blob)
        if magic != DM_MAGIC:
            raise RegistersError(f"device model magic {magic!r}, expected {DM_MAGIC!r}")
        if (step, outputs, crc) != (self.step, self.outputs, zlib.crc32(self.pack())):
            raise RegistersError("device model record does not match the registers")


# --- counter-based randomness: splitmix64 finaliser ---------------------------------


def mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (one 64-bit word)."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def h64(seed: int, step: int, lane: int) -> int:
    """The random word number ``lane`` of step ``step`` (scalar version)."""
    return mix64(mix64(seed + _GOLDEN) ^ ((step * 8 + lane) & _M64))


def h64v(seed: int, steps: np.ndarray, lane: int) -> np.ndarray:
    """Vectorised ``h64`` over a uint64 array of steps (same values)."""
    key = np.uint64(mix64(seed + _GOLDEN))
    x = key ^ (steps * np.uint64(8) + np.uint64(lane))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# --- page-writing workloads -----------------------------------------------------------

Marker = Callable[[np.ndarray], None]


class PageWorkload:
    """random / hotset / scan / idle: one 64-byte record per step."""

    #: steps per batch, so a batch (and so a pause) takes well under a millisecond
    max_batch = 2048
    emits_output = False
    #: (the ledger's early end of a batch; a page batch is one numpy pass: unused)
    interrupted: Callable[[], bool] | None = None

    def __init__(self, regs: Registers, usable: int, disk: GuestDisk | None = None) -> None:
        if usable < 1:
            raise RegistersError("domain has no usable pages")
        self.regs = regs
        self.usable = usable
        self.disk = disk
        #: why the guest's disk failed it (set by run; the worker crashes the guest)
        self.disk_failure: str | None = None
        self._prepare()

    def _prepare(self) -> None:
        r = self.regs
        every = r.disk_every
        if every and r.kind_name not in DISK_KINDS:
            raise RegistersError(f"workload {r.kind_name} writes no disk (disk_every {every})")
        if every and self.disk is None:
            raise RegistersError(
                f"the registers write a disk block every {every} steps, but this domain has no disk"
            )
        self.max_batch = PageWorkload.max_batch
        if every and self.disk is not None:
            self.nblocks = self.disk.size // DISK_BLOCK
            self.max_batch = max(1, min(self.max_batch, DISK_WRITES_PER_BATCH * every))
        if r.kind_name == "hotset":
            wss = int(r.a) or DEFAULT_WSS
            self.wss = max(1, min(wss, self.usable))
            s = r.b if r.b > 0 else DEFAULT_ZIPF
            weights = 1.0 / np.arange(1, self.wss + 1, dtype=np.float64) ** s
            cdf = np.cumsum(weights)
            self.cdf = cdf / cdf[-1]
            self.stride, self.offset = _stride(r.seed, self.usable)

    def reset(self, regs: Registers) -> None:
        self.regs = regs
        self._prepare()

    def pages_for(self, start: int, stop: int) -> np.ndarray:
        """The page each step in [start, stop) writes (int64 array)."""
        steps = np.arange(start, stop, dtype=np.uint64)
        kind = self.regs.kind_name
        if kind == "random":
            return (h64v(self.regs.seed, steps, 0) % np.uint64(self.usable)).astype(np.int64)
        if kind == "scan":
            return (steps % np.uint64(self.usable)).astype(np.int64)
        if kind == "hotset":
            u = (h64v(self.regs.seed, steps, 0) >> np.uint64(11)).astype(np.float64) * 2.0**-53
            rank = np.minimum(np.searchsorted(self.cdf, u, side="right"), self.wss - 1)
            return (rank.astype(np.int64) * self.stride + self.offset) % self.usable
        return np.empty(0, dtype=np.int64)

    def init_memory(self, mem64: np.ndarray) -> None:
        """Fresh guest memory needs nothing for these workloads."""

    def check_memory(self, mem64: np.ndarray) -> str | None:
        return None

    def run(self, mem64: np.ndarray, n: int, mark: Marker | None) -> list[bytes]:
        """Run steps regs.step .. regs.step+n-1 on the flat uint64 view of memory."""
        if n <= 0 or self.regs.kind_name == "idle":
            return []
        start = self.regs.step
        if self.regs.disk_every and self.disk is not None:
            n = self._write_disk(start, n)
            if n == 0:
                return []
        steps = np.arange(start, start + n, dtype=np.uint64)
        pages = self.pages_for(start, start + n)
        slots = (h64v(self.regs.seed, steps, 1) % np.uint64(SLOTS_PER_PAGE)).astype(np.int64)
        base = pages * WORDS_PER_PAGE + slots * RECORD_WORDS
        # later steps win where two steps of a batch hit the same slot, as if
        # they had run one by one
        _, last = np.unique(base[::-1], return_index=True)
        keep = np.sort(n - 1 - last)
        base, steps = base[keep], steps[keep]
        word = h64v(self.regs.seed, steps, 2)
        idx = base[:, None] + np.arange(RECORD_WORDS, dtype=np.int64)[None, :]
        vals = np.empty((len(base), RECORD_WORDS), dtype=np.uint64)
        vals[:, :-1] = word[:, None] ^ (
            np.arange(RECORD_WORDS - 1, dtype=np.uint64)[None, :] * np.uint64(_K_WORD)
        )
        vals[:, -1] = steps
        mem64[idx] = vals
        if mark is not None:
            mark(pages)
        self.regs.step = start + n
        return []

    def _write_disk(self, start: int, n: int) -> int:
        """The disk writes of steps [start, start+n), in step order, each
        complete before the next; how many steps may then run (n, or the
        steps before the first write that failed, recorded in disk_failure)."""
        assert self.disk is not None
        every = self.regs.disk_every
        first = start + (every - 1 - start) % every
        for step in range(first, start + n, every):
            block, data = disk_write(self.regs.seed, step, self.nblocks)
            try:
                self.disk.pwrite(data, block * DISK_BLOCK)
            except DiskError as e:
                self.disk_failure = str(e)
                return step - start
        return n


#: the workloads that can write a disk (disk_every)
DISK_KINDS = ("random", "hotset")


def disk_write(seed: int, step: int, nblocks: int) -> tuple[int, bytes]:
    """The block a disk-writing step writes, and its 4 KiB of data."""
    block = h64(seed, step, 4) % nblocks
    return block, disk_data(seed, np.array([step], dtype=np.uint64), np.array([block]))[0].tobytes()


def disk_data(seed: int, steps: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """The data (uint64, shape (n, 512)) steps ``steps`` write to ``blocks``."""
    steps = steps.astype(np.uint64)
    out = np.empty((len(steps), DISK_BLOCK_WORDS), dtype=np.uint64)
    out[:, 0] = steps
    out[:, 1] = blocks.astype(np.uint64)
    j = np.arange(2, DISK_BLOCK_WORDS, dtype=np.uint64)[None, :]
    out[:, 2:] = h64v(seed, steps, 5)[:, None] ^ (j * np.uint64(_K_WORD))
    return out


def expected_disk(seed: int, every: int, step: int, nblocks: int) -> tuple[np.ndarray, np.ndarray]:
    """What a page workload's disk holds after ``step`` steps: (blocks, steps),
    sorted by block: block ``blocks[k]`` holds the data step ``steps[k]``
    wrote (``disk_data``); every other block is zero."""
    if every <= 0 or step < every:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint64)
    writers = np.arange(every - 1, step, every, dtype=np.uint64)
    blocks = (h64v(seed, writers, 4) % np.uint64(nblocks)).astype(np.int64)
    # the last writer of each block wins
    uniq, last = np.unique(blocks[::-1], return_index=True)
    return uniq, writers[len(writers) - 1 - last]


def check_disk(
    image: np.ndarray, seed: int, every: int, step: int, limit: int = 5
) -> tuple[list[str], dict]:
    """Compare a page workload's disk image (uint8, the whole disk) with what
    ``step`` steps of (seed, every) must have left on it. Returns
    (problems, summary): no problem means every block is as expected."""
    nblocks = len(image) // DISK_BLOCK
    words = image[: nblocks * DISK_BLOCK].view("<u8").reshape(nblocks, DISK_BLOCK_WORDS)
    blocks, writers = expected_disk(seed, every, step, nblocks)
    summary = {"step": step, "disk_every": every, "blocks": nblocks, "written": len(blocks)}
    problems: list[str] = []
    bad = 0

    def say(block: int, expected: int | None) -> None:
        nonlocal bad
        bad += 1
        if len(problems) >= limit:
            return
        got = words[block]
        want = "zeros" if expected is None else f"the write of step {expected}"
        if not got.any():
            found = "zeros"
        else:
            s = int(got[0])
            real = disk_data(seed, np.array([s], dtype=np.uint64), np.array([block]))[0]
            if np.array_equal(got, real):
                found = f"the write of step {s}"
                if s >= step:
                    found += f" (ahead: the registers are at step {step})"
                elif expected is not None:
                    found += " (behind)" if s < expected else " (ahead)"
            else:
                found = "data no step writes (corrupted)"
        problems.append(f"disk block {block}: expected {want}, found {found}")

    chunk = 4096  # blocks compared at once (16 MiB of expected data)
    for a in range(0, len(blocks), chunk):
        bl, st = blocks[a : a + chunk], writers[a : a + chunk]
        differ = np.flatnonzero((words[bl] != disk_data(seed, st, bl)).any(axis=1))
        for k in differ.tolist():
            say(int(bl[k]), int(st[k]))
    written = np.zeros(nblocks, dtype=bool)
    written[blocks] = True
    for a in range(0, nblocks, chunk):
        nonzero = words[a : a + chunk].any(axis=1) & ~written[a : a + chunk]
        for k in np.flatnonzero(nonzero).tolist():
            say(a + k, None)
    if bad > len(problems):
        problems.append(f"{bad} blocks differ in all")
    return problems, summary


def _stride(seed: int, usable: int) -> tuple[int, int]:
    """A seeded stride coprime with ``usable`` and an offset: rank -> page is injective."""
    if usable == 1:
        return 1, 0
    stride = h64(seed, 0, 7) % usable or 1
    while math.gcd(stride, usable) != 1:
        stride = stride + 1 if stride + 1 < usable else 1
    return stride, h64(seed, 0, 6) % usable


def new_registers(
    kind: str, seed: int, rate: float | None, a: int = 0, b: float = 0.0, disk_every: int = 0
) -> Registers:
    if kind not in KIND_ID:
        raise RegistersError(f"unknown workload {kind!r} (one of {', '.join(KINDS)})")
    if rate is None:
        rate = DEFAULT_RATE[kind]
    if not (math.isfinite(rate) and rate >= 0):
        # (a domain's meta and a HELLO carry the rate as JSON: no inf there)
        raise RegistersError(
            f"rate must be a non-negative number, got {rate} (no rate cap: create, then "
            "set the rate to inf)"
        )
    if kind == "hotset":
        a = a or DEFAULT_WSS
        b = b or DEFAULT_ZIPF
    if kind == "ledger":
        a = a or DEFAULT_ACCOUNTS
    if disk_every and kind not in DISK_KINDS:
        raise RegistersError(
            f"workload {kind} writes no disk blocks (disk writes: {', '.join(DISK_KINDS)})"
        )
    regs = Registers(KIND_ID[kind], seed & _M64, 0, float(rate), int(a), float(b))
    regs.disk_every = int(disk_every)
    return regs
