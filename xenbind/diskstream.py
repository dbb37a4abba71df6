"""The disk mirror stream: layout, encoder and decoder (sans-IO), and its rules.

One stream per protected domain carries, in order, every write the guest's
disks completed on the primary, cut into epochs by SEAL records: epoch N is
everything between SEAL(N-1) (or the header) and SEAL(N), and SEAL(N) is
placed by the primary's block server while checkpoint N's guest is paused
(docs/disk.md). The same layout is the receiver's on-disk journal of one
committed epoch (``receiver/diskbuffer.py``). This module uses the standard
library only, so the block server (nbdkit's embedded Debian Python) imports it
as the daemons do.

All integers are little-endian.

HEADER (24 + 8 x D bytes)
    char[8]   magic  89 52 4D 44 0D 0A 1A 0A  ("\\x89RMD\\r\\n\\x1a\\n", PNG-style)
    uint16    version                      1
    uint16    sector_shift                 9..12: every offset and length is a
                                           multiple of 1 << sector_shift
    uint32    D, the number of disks       1..MAX_DISKS
    uint64    first_epoch                  the epoch the first SEAL closes
                                           (0 on the wire; N in epoch N's journal)
    D x uint64  disk sizes in bytes        each 1 sector .. max_disk_bytes, a
                                           multiple of the sector

RECORD = a 32-byte head, then (WRITE only) ``length`` bytes of data
    uint32    type                         WRITE 1, ZERO 2, SEAL 3
    uint16    disk                         index into the header's disks (SEAL: 0)
    uint16    flags                        WRITE: FLAG_SYNC may be set; else 0
    uint64    a                            WRITE/ZERO: byte offset on the disk
                                           SEAL: the epoch it closes
    uint64    b                            WRITE/ZERO: length in bytes
                                           SEAL: number of WRITE + ZERO records in
                                           the epoch
    uint64    c                            WRITE/ZERO: 0
                                           SEAL: CRC-32 (zlib's; ``crc32``) of
                                           every byte of the epoch's records,
                                           heads and data, in stream order, the
                                           header's bytes first for the first
                                           epoch (high 32 bits 0)

    WRITE   the guest (or, FLAG_SYNC, the initial synchronisation) wrote
            ``data`` at ``offset``. 1 sector <= length <= max_write.
    ZERO    ``length`` bytes at ``offset`` now read as zeros (NBD WRITE_ZEROES,
            TRIM). 1 sector <= length; no data follows.
    SEAL    closes epoch ``a``: seals carry first_epoch, first_epoch + 1, ...
            with no gap. A record count or CRC other than what arrived is an error.

RULES (the decoder enforces every one, raising DiskStreamError at the offset of
the offending item's first byte, naming what was wrong)
    * magic, version, sector_shift, disk count and sizes as above; the header
      is checked field by field before the next is buffered.
    * a record's type is known; its disk exists; reserved fields and unknown
      flag bits are zero.
    * WRITE/ZERO: offset and length multiples of the sector; length >= 1 sector;
      offset + length <= the disk's size (a write outside the disk is an error,
      never an event); WRITE length <= max_write, checked before a byte of the
      data is buffered.
    * SEAL: the next epoch in sequence, the record count and CRC of the epoch.

MEMORY: the decoder holds at most one record: its 32-byte head and a WRITE's
data, which grows with the bytes that actually arrive (a claim of max_write
followed by nothing costs nothing), never past the claimed length. Nothing
else grows with the stream: an epoch's size is the consumer's bound to keep
(``receiver/diskbuffer.py``).
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import StreamError

MAGIC = b"\x89RMD\r\n\x1a\n"
VERSION = 1


def _isal_crc32() -> Callable[[int, Any, int], int] | None:
    """ISA-L's ``crc32_gzip_refl`` (Debian's libisal2), or None without it."""
    try:
        lib = ctypes.CDLL("libisal.so.2")
    except OSError:
        return None
    fn = lib.crc32_gzip_refl
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64]
    ok: bool = fn(0, b"123456789", 9) == zlib.crc32(b"123456789")
    return fn if ok else None


_ISAL = _isal_crc32()


def crc32(data: Any, value: int = 0) -> int:
    """The stream's checksum: zlib's CRC-32 of ``data`` continued from ``value``.

    The same function as ``zlib.crc32``, computed by ISA-L where Debian's
    libisal2 is installed (folding with carry-less multiplies: 21 against
    zlib 1.2.13's 283 us per MiB here, and the disk stream is checksummed up
    to three times on each side) and by zlib otherwise. ctypes lets the GIL
    go for the call. Only ``bytes`` and writable contiguous buffers go to
    ISA-L (ctypes needs an address; anything else goes to zlib): the value
    never depends on which computed it."""
    if _ISAL is not None:
        if type(data) is bytes:
            return int(_ISAL(value, data, len(data)))
        if isinstance(data, bytearray | memoryview):
            view = memoryview(data)
            if not view.readonly and view.c_contiguous and view.nbytes:
                n = view.nbytes
                return int(_ISAL(value, (ctypes.c_char * n).from_buffer(view.cast("B")), n))
    return zlib.crc32(data, value)


#: Sector sizes a stream may declare: 512 B (what blkback and the kernel's
#: nbd driver send) up to 4 KiB.
MIN_SECTOR_SHIFT = 9
MAX_SECTOR_SHIFT = 12
#: Disks per stream (one domain's disks).
MAX_DISKS = 64

HEADER_FIXED = struct.Struct("<8sHHIQ")  # magic, version, sector_shift, D, first_epoch
DISK_SIZE = struct.Struct("<Q")
RECORD_HEAD = struct.Struct("<IHHQQQ")  # type, disk, flags, a, b, c
RECORD_HEAD_SIZE = RECORD_HEAD.size  # 32

WRITE = 1
ZERO = 2
SEAL = 3
RECORD_NAMES = {WRITE: "WRITE", ZERO: "ZERO", SEAL: "SEAL"}

#: WRITE flag: the data comes from the initial synchronisation, not the guest.
FLAG_SYNC = 1
WRITE_FLAGS = FLAG_SYNC

#: Decoder limits (configurable per Decoder).
DEFAULT_MAX_WRITE = 4 << 20  # one WRITE's data: the block server splits larger writes
DEFAULT_MAX_DISK_BYTES = 1 << 44  # 16 TiB


class DiskStreamError(StreamError):
    """The disk stream broke a rule (``offset``: where the offending item starts)."""


class TruncatedDiskStream(DiskStreamError):
    """The stream ended inside an item or inside an epoch. ``torn_epoch``: the
    epoch that did not get its SEAL (None if the header was cut)."""

    def __init__(self, offset: int, reason: str, torn_epoch: int | None) -> None:
        super().__init__(offset, reason)
        self.torn_epoch = torn_epoch


# ------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Header:
    sector_shift: int
    disk_sizes: tuple[int, ...]
    first_epoch: int

    @property
    def sector(self) -> int:
        return 1 << self.sector_shift


@dataclass(frozen=True, slots=True)
class Write:
    """``data`` was written at ``offset`` of disk ``disk`` (checked in bounds)."""

    disk: int
    offset: int
    data: bytes
    sync: bool = False


@dataclass(frozen=True, slots=True)
class Zero:
    """``length`` bytes at ``offset`` of disk ``disk`` read as zeros."""

    disk: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Seal:
    """Epoch ``epoch`` is whole: ``records`` WRITE/ZERO records, ``nbytes``
    bytes written or zeroed, CRC ``crc`` (already checked)."""

    epoch: int
    records: int
    nbytes: int
    crc: int


Event = Header | Write | Zero | Seal


# ------------------------------------------------------------------ encoder


class Encoder:
    """Writes one stream: ``header()`` once, then records. Every method returns
    bytes (``write`` a list of two buffers: the head and the caller's data, so
    the data is not copied). Misuse raises ValueError: the encoder sees only
    this project's own data, and checks it by the decoder's rules so that what
    it writes always decodes."""

    def __init__(self, disk_sizes: list[int], *, sector_shift: int = 9, first_epoch: int = 0):
        if not MIN_SECTOR_SHIFT <= sector_shift <= MAX_SECTOR_SHIFT:
            raise ValueError(f"sector_shift {sector_shift} outside 9..12")
        if not 1 <= len(disk_sizes) <= MAX_DISKS:
            raise ValueError(f"{len(disk_sizes)} disks: 1..{MAX_DISKS} allowed")
        self.sector = 1 << sector_shift
        for i, size in enumerate(disk_sizes):
            if size < self.sector or size % self.sector:
                raise ValueError(f"disk {i}: size {size} is not a positive multiple of the sector")
        self.sector_shift = sector_shift
        self.disk_sizes = list(disk_sizes)
        self.epoch = first_epoch  # the epoch being written
        self._first_epoch = first_epoch
        self._crc = crc32(self.header())  # the first SEAL covers the header too
        self._records = 0
        self._nbytes = 0

    def header(self) -> bytes:
        fixed = HEADER_FIXED.pack(
            MAGIC, VERSION, self.sector_shift, len(self.disk_sizes), self._first_epoch
        )
        return fixed + b"".join(DISK_SIZE.pack(s) for s in self.disk_sizes)

    def _check(self, disk: int, offset: int, length: int) -> None:
        if not 0 <= disk < len(self.disk_sizes):
            raise ValueError(f"disk {disk} does not exist")
        if offset < 0 or offset % self.sector or length <= 0 or length % self.sector:
            raise ValueError(f"disk {disk}: {length} bytes at {offset} not sector-aligned")
        if offset + length > self.disk_sizes[disk]:
            raise ValueError(f"disk {disk}: {length} bytes at {offset} past its end")

    def _head(self, kind: int, disk: int, flags: int, a: int, b: int, c: int) -> bytes:
        return RECORD_HEAD.pack(kind, disk, flags, a, b, c)

    def write(
        self, disk: int, offset: int, data: bytes | bytearray | memoryview, *, sync: bool = False
    ) -> list[bytes | bytearray | memoryview]:
        n = memoryview(data).nbytes
        self._check(disk, offset, n)
        head = self._head(WRITE, disk, FLAG_SYNC if sync else 0, offset, n, 0)
        self._crc = crc32(data, crc32(head, self._crc))
        self._records += 1
        self._nbytes += n
        return [head, data]

    def zero(self, disk: int, offset: int, length: int) -> bytes:
        self._check(disk, offset, length)
        head = self._head(ZERO, disk, 0, offset, length, 0)
        self._crc = crc32(head, self._crc)
        self._records += 1
        self._nbytes += length
        return head

    def seal(self) -> bytes:
        """Close the current epoch; returns the SEAL record."""
        out = self._head(SEAL, 0, 0, self.epoch, self._records, self._crc)
        self.epoch += 1
        self._crc = self._records = self._nbytes = 0
        return out

    @property
    def pending_records(self) -> int:
        """WRITE/ZERO records written in the current epoch."""
        return self._records

    @property
    def pending_crc(self) -> int:
        """The CRC the current epoch's SEAL will carry."""
        return self._crc

    @property
    def pending_bytes(self) -> int:
        """Bytes written or zeroed in the current epoch."""
        return self._nbytes


# ------------------------------------------------------------------ decoder

_ST_HEADER = 0
_ST_DISKS = 1
_ST_HEAD = 2
_ST_DATA = 3


class Decoder:
    """Incremental decoder: ``feed(bytes) -> [events]`` with any split of the
    stream; ``eof()`` says whether the stream may end here. After an error the
    decoder is dead and raises it again on every call.

    Read-only attributes: ``received`` (bytes fed), ``header`` (None before
    it), ``epoch`` (the open epoch), ``epoch_records`` / ``epoch_bytes`` (its
    WRITE/ZERO records and bytes so far), ``buffered`` (bytes held now)."""

    def __init__(
        self, *, max_write: int = DEFAULT_MAX_WRITE, max_disk_bytes: int = DEFAULT_MAX_DISK_BYTES
    ) -> None:
        if max_write < 1 << MIN_SECTOR_SHIFT:
            raise ValueError(f"max_write {max_write} is below one sector")
        self.max_write = max_write
        self.max_disk_bytes = max_disk_bytes
        self.received = 0
        self.header: Header | None = None
        self.epoch = 0
        self.epoch_records = 0
        self.epoch_bytes = 0
        self._crc = 0
        self._error: DiskStreamError | None = None
        self._state = _ST_HEADER
        self._start = 0  # stream offset of the item being read
        self._buf = bytearray()
        self._want = HEADER_FIXED.size
        self._head: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
        self._head_bytes = b""
        self._disks = 0
        self._shift = 0
        self._sizes: list[int] = []
        self._header_bytes = b""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _fail(self, offset: int, reason: str) -> DiskStreamError:
        self._error = DiskStreamError(offset, reason)
        self._buf = bytearray()
        return DiskStreamError(offset, reason)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise DiskStreamError(self._error.offset, self._error.reason)
        mv = memoryview(data).cast("B")
        out: list[Event] = []
        i, n = 0, len(mv)
        while True:
            if len(self._buf) == self._want:
                self._item(out)
                continue
            if i >= n:
                return out
            take = min(self._want - len(self._buf), n - i)
            self._buf += mv[i : i + take]  # grows with what arrives, never past _want
            self.received += take
            i += take

    def eof(self) -> None:
        """Quiet when the stream may end here (after the header or a SEAL);
        else TruncatedDiskStream naming the torn epoch. A probe: changes nothing."""
        if self._error is not None:
            raise DiskStreamError(self._error.offset, self._error.reason)
        if self.header is None:
            raise TruncatedDiskStream(self.received, "stream ends inside the header", None)
        if self._state == _ST_HEAD and not self._buf and self.epoch_records == 0:
            return
        what = "inside a record" if self._buf else f"with {self.epoch_records} records unsealed"
        raise TruncatedDiskStream(
            self.received, f"stream ends {what}: epoch {self.epoch} is torn", self.epoch
        )

    # -------------------------------------------------------------- items

    def _next(self, state: int, want: int) -> None:
        self._state = state
        self._want = want
        self._start = self.received
        self._buf = bytearray()

    def _item(self, out: list[Event]) -> None:
        buf = bytes(self._buf)
        at = self._start
        if self._state == _ST_HEADER:
            magic, version, shift, disks, first = HEADER_FIXED.unpack(buf)
            if magic != MAGIC:
                raise self._fail(at, f"bad magic {magic!r}: not a disk mirror stream")
            if version != VERSION:
                raise self._fail(at + 8, f"version {version}: this decoder reads {VERSION}")
            if not MIN_SECTOR_SHIFT <= shift <= MAX_SECTOR_SHIFT:
                raise self._fail(at + 10, f"sector_shift {shift} outside 9..12")
            if not 1 <= disks <= MAX_DISKS:
                raise self._fail(at + 12, f"{disks} disks: 1..{MAX_DISKS} allowed")
            self._disks, self._shift, self.epoch = disks, shift, first
            self._header_bytes = buf
            self._next(_ST_DISKS, DISK_SIZE.size)
        elif self._state == _ST_DISKS:
            (size,) = DISK_SIZE.unpack(buf)
            sector = 1 << self._shift
            k = len(self._sizes)
            if size < sector or size % sector or size > self.max_disk_bytes:
                raise self._fail(
                    at,
                    f"disk {k}: size {size} is not a multiple of the {sector}-byte sector "
                    f"between 1 sector and {self.max_disk_bytes}",
                )
            self._sizes.append(size)
            if len(self._sizes) < self._disks:
                self._next(_ST_DISKS, DISK_SIZE.size)
            else:
                self.header = Header(self._shift, tuple(self._sizes), self.epoch)
                self._crc = crc32(self._header_bytes + b"".join(map(DISK_SIZE.pack, self._sizes)))
                out.append(self.header)
                self._next(_ST_HEAD, RECORD_HEAD_SIZE)
        elif self._state == _ST_HEAD:
            self._record_head(buf, at, out)
        else:
            kind, disk, flags, a, b, _ = self._head
            self._crc = crc32(buf, crc32(self._head_bytes, self._crc))
            self._count(b)
            out.append(Write(disk, a, buf, bool(flags & FLAG_SYNC)))
            self._next(_ST_HEAD, RECORD_HEAD_SIZE)

    def _count(self, nbytes: int) -> None:
        self.epoch_records += 1
        self.epoch_bytes += nbytes

    def _record_head(self, buf: bytes, at: int, out: list[Event]) -> None:
        assert self.header is not None
        kind, disk, flags, a, b, c = RECORD_HEAD.unpack(buf)
        name = RECORD_NAMES.get(kind)
        if name is None:
            raise self._fail(at, f"unknown record type {kind}")
        if kind == SEAL:
            if disk or flags:
                raise self._fail(at, f"SEAL with disk {disk} / flags {flags:#x}: must be 0")
            if a != self.epoch:
                raise self._fail(at, f"SEAL of epoch {a}: the open epoch is {self.epoch}")
            if b != self.epoch_records:
                raise self._fail(
                    at, f"SEAL of epoch {a} counts {b} records, {self.epoch_records} arrived"
                )
            if c != self._crc:
                raise self._fail(
                    at, f"SEAL of epoch {a}: CRC {c:#x}, the records arrived give {self._crc:#x}"
                )
            out.append(Seal(a, b, self.epoch_bytes, c))
            self.epoch += 1
            self.epoch_records = self.epoch_bytes = 0
            self._crc = 0
            self._next(_ST_HEAD, RECORD_HEAD_SIZE)
            return
        if disk >= len(self.header.disk_sizes):
            raise self._fail(at + 4, f"{name} on disk {disk}: the stream has {self._disks} disks")
        allowed = WRITE_FLAGS if kind == WRITE else 0
        if flags & ~allowed:
            raise self._fail(at + 6, f"{name} with unknown flags {flags & ~allowed:#x}")
        if c:
            raise self._fail(at + 24, f"{name} with reserved field {c:#x}: must be 0")
        sector = self.header.sector
        if a % sector or b % sector or b == 0:
            raise self._fail(
                at + 8, f"{name} of {b} bytes at {a} on disk {disk}: not {sector}-byte aligned"
            )
        size = self.header.disk_sizes[disk]
        if a + b > size:
            raise self._fail(
                at + 8,
                f"{name} of {b} bytes at {a} on disk {disk}: outside the disk ({size} bytes)",
            )
        if kind == WRITE and b > self.max_write:
            raise self._fail(at + 16, f"WRITE of {b} bytes: larger than max_write {self.max_write}")
        if kind == ZERO:
            self._crc = crc32(buf, self._crc)
            self._count(b)
            out.append(Zero(disk, a, b))
            self._next(_ST_HEAD, RECORD_HEAD_SIZE)
            return
        self._head = (kind, disk, flags, a, b, c)
        self._head_bytes = buf
        self._state = _ST_DATA
        self._want = b
        self._buf = bytearray()  # the data's start is still the record's: errors name the head
