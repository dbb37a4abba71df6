"""The receiver's disk epochs: buffer, spill, journal, apply, recover.

One ``DiskBuffer`` per protected domain holds the disk writes of the epochs
that are not committed yet and applies each epoch to the backup's disk files
when, and only when, its checkpoint commits (docs/disk.md).

    buf = DiskBuffer(directory, disk_paths, header, mem_limit=.., max_epoch_bytes=..)
    buf.recovered                         what start-up recovery did (see below)
    buf.add(write_or_zero)                the open epoch (diskstream Write / Zero events)
    buf.seal(seal)                        diskstream Seal: the open epoch is whole
    buf.commit(epoch)                     checkpoint `epoch` commits: journal, apply
    buf.discard()                         the session ended: drop what is not committed
    buf.write_direct(ev) / flush_direct() epoch 0 of a session (initial sync): straight to disk
    buf.seal_direct(seal)                 epoch 0's SEAL: made durable, epoch 1 opens

Files in ``directory`` (one directory per domain, the receiver's own):

    disks.json          the backup disk paths and sizes, written at creation
    epoch-N.staging     epoch N's records past the memory bound (open or sealed,
                        not committed); a diskstream file without its SEAL
    epoch-N.journal     epoch N committed: a whole diskstream file (header with
                        first_epoch N, the records, SEAL(N) with count and CRC),
                        fsynced, then renamed from .staging (and the directory
                        fsynced) before a byte of it reaches a disk

Rules kept here:
- A backup disk is written only by ``_apply`` (from a journal, whole and
  fsynced) and by ``write_direct`` (epoch 0, before the backup can fail over).
  Every record is bounds-checked again by the diskstream decoder reading the
  journal: nothing outside a disk is ever written.
- The journal is durable (file fsync, rename, directory fsync) before the
  apply starts; the disks are fdatasync'd before the journal is removed
  (that removal is the "applied" mark). Applying is idempotent (the same
  records in the same order), so a receiver killed anywhere in between
  finishes the epoch on its next start: ``recover`` applies every journal,
  in epoch order, after checking it whole (CRC and count) before writing
  anything from it. A journal that does not check out is never applied:
  ``JournalCorrupt``, and the file is kept for an operator.
- An epoch that is not committed (open, or sealed with its checkpoint's tail
  not arrived) never reaches a disk: ``discard`` and ``recover`` delete its
  staging file.
- Bounded: records are held in memory up to ``mem_limit`` bytes (both
  epochs that may be in flight together, the sealed one waiting for its
  commit and the open one); past it the epoch spills to its staging file,
  and it stays there. An epoch larger than ``max_epoch_bytes`` (records and
  heads) raises ``EpochTooLarge`` before it is kept: the session ends, nothing
  is dropped silently (the sender is told the bound and checkpoints early).
- At most one sealed epoch waits for its commit; seals come in order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from xenbind import diskstream as ds
from xenbind.errors import RemusError

#: Bytes read from a journal per decoder feed while applying it.
APPLY_CHUNK = 1 << 20
#: Zeroes are written in pieces of this size.
ZERO_CHUNK = 1 << 20
DISKS_FILE = "disks.json"


class DiskBufferError(RemusError):
    """A rule of the epoch buffer was broken (out of order, too large...)."""


class EpochTooLarge(DiskBufferError):
    """An epoch past ``max_epoch_bytes``: the sender should have checkpointed."""


class JournalCorrupt(DiskBufferError):
    """A journal that does not check out; it is kept and never applied."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_of(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)  # block devices report st_size 0


def _staging(directory: str, epoch: int) -> str:
    return os.path.join(directory, f"epoch-{epoch}.staging")


def _journal(directory: str, epoch: int) -> str:
    return os.path.join(directory, f"epoch-{epoch}.journal")


def _epoch_of(name: str, suffix: str) -> int | None:
    if not (name.startswith("epoch-") and name.endswith(suffix)):
        return None
    num = name[len("epoch-") : -len(suffix)]
    return int(num) if num.isdigit() else None


@dataclass
class Recovery:
    """What start-up recovery did: the epochs it finished applying, and the
    uncommitted epochs whose staging files it deleted."""

    applied: list[int] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)
    records: int = 0
    nbytes: int = 0


@dataclass
class DiskStats:
    """Counters for ``status``."""

    mem_used: int = 0  # record bytes held in memory now
    spilled: int = 0  # record bytes in staging files now
    open_bytes: int = 0  # guest bytes in the open epoch
    epochs_applied: int = 0
    bytes_applied: int = 0  # guest bytes written or zeroed by applied epochs
    bytes_direct: int = 0  # written by write_direct (initial sync)
    last_applied: int | None = None


class _Epoch:
    """One epoch's records, encoded (so its staging file and journal are plain
    diskstream files, and the encoder's CRC cross-checks the sender's)."""

    def __init__(self, index: int, sizes: list[int], shift: int, wire_crc: int) -> None:
        self.index = index
        self.enc = ds.Encoder(sizes, sector_shift=shift, first_epoch=index)
        #: the CRC the sender's SEAL carries: of the records as they came (the
        #: wire's header first in the wire's first epoch); the journal's own
        #: SEAL covers the journal's header instead
        self.wire_crc = wire_crc
        self.mem: list[bytes] = []
        self.mem_bytes = 0
        self.total = 0  # record bytes, heads included
        self.file: int | None = None  # staging fd once spilled
        self.sealed: bytes | None = None  # the SEAL record once sealed


class DiskBuffer:
    def __init__(
        self,
        directory: str,
        disk_paths: list[str],
        header: ds.Header,
        *,
        mem_limit: int,
        max_epoch_bytes: int,
        max_write: int = ds.DEFAULT_MAX_WRITE,
        on_apply: Callable[[int], None] | None = None,
    ) -> None:
        if len(disk_paths) != len(header.disk_sizes):
            raise DiskBufferError(
                f"{len(disk_paths)} backup disks for a stream of {len(header.disk_sizes)}"
            )
        if mem_limit < 0 or max_epoch_bytes <= 0:
            raise DiskBufferError("mem_limit and max_epoch_bytes must be positive")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.header = header
        self.mem_limit = mem_limit
        self.max_epoch_bytes = max_epoch_bytes
        self.max_write = max_write
        self._on_apply = on_apply  # called with each record's index while applying (tests)
        self.recovered = recover(directory, max_write=max_write, on_apply=on_apply)
        self._paths = [os.path.abspath(p) for p in disk_paths]
        self._fds: list[int] = []
        try:
            for path, size in zip(self._paths, header.disk_sizes, strict=True):
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(fd)
                have = _size_of(fd)
                if have != size:
                    raise DiskBufferError(f"backup disk {path} has {have} bytes, the stream {size}")
        except BaseException:
            self.close()
            raise
        self._write_disks_file()
        self.stats = DiskStats(last_applied=max(self.recovered.applied, default=None))
        self._open = self._new_epoch(header.first_epoch)
        self._sealed: _Epoch | None = None

    # ---------------------------------------------------------------- setup

    def _write_disks_file(self) -> None:
        path = os.path.join(self.directory, DISKS_FILE)
        tmp = path + ".tmp"
        doc = {"disks": self._paths, "sizes": list(self.header.disk_sizes)}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.directory)

    def _new_epoch(self, index: int) -> _Epoch:
        h = self.header
        wire_crc = 0
        if index == h.first_epoch:  # the wire's first SEAL covers the wire's header
            wire = ds.Encoder(list(h.disk_sizes), sector_shift=h.sector_shift, first_epoch=index)
            wire_crc = ds.crc32(wire.header())
        return _Epoch(index, list(h.disk_sizes), h.sector_shift, wire_crc)

    def close(self) -> None:
        """Close the disks (uncommitted epochs stay as they are: ``discard`` first)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    # ------------------------------------------------------------ the epochs

    @property
    def open_epoch(self) -> int:
        return self._open.index

    @property
    def sealed_epoch(self) -> int | None:
        return self._sealed.index if self._sealed is not None else None

    def add(self, ev: ds.Write | ds.Zero) -> None:
        """Keep a record of the open epoch (bounds were checked by the decoder;
        the encoder checks them again)."""
        ep = self._open
        try:
            if isinstance(ev, ds.Write):
                parts = ep.enc.write(ev.disk, ev.offset, ev.data, sync=ev.sync)
                rec = b"".join(parts)
            else:
                rec = ep.enc.zero(ev.disk, ev.offset, ev.length)
        except ValueError as e:
            raise DiskBufferError(f"epoch {ep.index}: {e}") from None
        if ep.total + len(rec) > self.max_epoch_bytes:
            raise EpochTooLarge(
                f"epoch {ep.index} past max_epoch_bytes {self.max_epoch_bytes}: "
                "the sender must take a checkpoint before its epoch grows this large"
            )
        ep.wire_crc = ds.crc32(rec, ep.wire_crc)
        self._keep(ep, rec)
        self.stats.open_bytes = ep.enc.pending_bytes

    def _keep(self, ep: _Epoch, rec: bytes) -> None:
        ep.total += len(rec)
        if ep.file is None and self.stats.mem_used + len(rec) <= self.mem_limit:
            ep.mem.append(rec)
            ep.mem_bytes += len(rec)
            self.stats.mem_used += len(rec)
            return
        if ep.file is None:
            self._spill(ep)
        assert ep.file is not None
        _write_all(ep.file, rec)
        self.stats.spilled += len(rec)

    def _spill(self, ep: _Epoch) -> None:
        """Move the epoch to its staging file: the header, what memory held, and
        from now on every record (the order of the stream is kept)."""
        fd = os.open(
            _staging(self.directory, ep.index),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o600,
        )
        ep.file = fd
        _write_all(fd, ep.enc.header())
        for rec in ep.mem:
            _write_all(fd, rec)
        self.stats.mem_used -= ep.mem_bytes
        self.stats.spilled += ep.mem_bytes
        ep.mem = []
        ep.mem_bytes = 0

    def seal(self, ev: ds.Seal) -> None:
        """The open epoch is whole (its SEAL arrived); it waits for its commit."""
        ep = self._open
        if self._sealed is not None:
            raise DiskBufferError(
                f"SEAL of epoch {ev.epoch} while epoch {self._sealed.index} waits for its commit"
            )
        if ev.epoch != ep.index:
            raise DiskBufferError(f"SEAL of epoch {ev.epoch}: the open epoch is {ep.index}")
        if ev.records != ep.enc.pending_records:
            raise DiskBufferError(
                f"SEAL of epoch {ev.epoch} counts {ev.records} records, "
                f"{ep.enc.pending_records} were kept"
            )
        if ep.wire_crc != ev.crc:
            raise DiskBufferError(
                f"epoch {ev.epoch}: CRC {ep.wire_crc:#x} of the records kept, "
                f"the sender's {ev.crc:#x}"
            )
        ep.sealed = ep.enc.seal()
        self._sealed = ep
        self._open = self._new_epoch(ep.index + 1)
        self.stats.open_bytes = 0

    def commit(self, epoch: int) -> int:
        """Checkpoint ``epoch`` commits: journal its sealed disk epoch durably,
        apply it to the disks, mark it applied. Returns the guest bytes applied."""
        ep = self._sealed
        if ep is None or ep.index != epoch:
            raise DiskBufferError(
                f"commit of checkpoint {epoch}: no sealed disk epoch {epoch} "
                f"(sealed: {self.sealed_epoch})"
            )
        assert ep.sealed is not None
        if ep.file is None:
            ep.file = os.open(
                _staging(self.directory, ep.index),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                0o600,
            )
            _write_all(ep.file, b"".join([ep.enc.header(), *ep.mem, ep.sealed]))
        else:
            self.stats.spilled -= ep.total
            _write_all(ep.file, ep.sealed)
        self.stats.mem_used -= ep.mem_bytes
        ep.mem = []
        ep.mem_bytes = 0
        fd, ep.file = ep.file, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        journal = _journal(self.directory, ep.index)
        os.replace(_staging(self.directory, ep.index), journal)
        _fsync_dir(self.directory)
        self._sealed = None
        # The epoch is committed from here on: whatever happens, it is applied.
        records, nbytes = _apply(journal, self._fds, self.max_write, self._on_apply)
        _mark_applied(journal, self._fds)
        self.stats.epochs_applied += 1
        self.stats.bytes_applied += nbytes
        self.stats.last_applied = ep.index
        return nbytes

    def discard(self) -> list[int]:
        """Drop every epoch not committed (the session ended torn); returns the
        indices of those that held something (a sealed one, or records)."""
        dropped = []
        for ep in (self._sealed, self._open):
            if ep is None:
                continue
            if ep is self._sealed or ep.total:
                dropped.append(ep.index)
            self.stats.mem_used -= ep.mem_bytes
            if ep.file is not None:
                os.close(ep.file)
                ep.file = None
                self.stats.spilled -= ep.total
            try:
                os.unlink(_staging(self.directory, ep.index))
            except FileNotFoundError:
                pass
        self._sealed = None
        self._open = self._new_epoch(self._open.index + 1)
        self.stats.open_bytes = 0
        return dropped

    # ------------------------------------------------------------ epoch 0

    def write_direct(self, ev: ds.Write | ds.Zero) -> None:
        """Epoch 0 of a session (the initial synchronisation and the guest's
        writes during it): written to the disk at once, as checkpoint 0's
        memory is, because the backup cannot fail over before checkpoint 0
        commits. A torn epoch 0 is repaired by the next sync (block hashes)."""
        _apply_one(ev, self._fds)
        self.stats.bytes_direct += ev.length if isinstance(ev, ds.Zero) else len(ev.data)

    def flush_direct(self) -> None:
        for fd in self._fds:
            os.fdatasync(fd)

    def seal_direct(self, ev: ds.Seal) -> None:
        """The SEAL of the direct epoch (its count and CRC were checked by the
        stream's decoder): its writes are made durable and the next epoch,
        buffered, opens."""
        ep = self._open
        if ev.epoch != ep.index or ep.total or self._sealed is not None:
            raise DiskBufferError(
                f"SEAL of direct epoch {ev.epoch}: the open epoch is {ep.index} "
                f"and holds {ep.total} buffered bytes"
            )
        self.flush_direct()
        self._open = self._new_epoch(ev.epoch + 1)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def _apply_one(ev: ds.Write | ds.Zero, fds: list[int]) -> None:
    fd = fds[ev.disk]
    if isinstance(ev, ds.Write):
        mv = memoryview(ev.data)
        off = ev.offset
        while mv:
            n = os.pwrite(fd, mv, off)
            mv, off = mv[n:], off + n
        return
    zeros = bytes(min(ZERO_CHUNK, ev.length))
    off, end = ev.offset, ev.offset + ev.length
    while off < end:
        n = os.pwrite(fd, memoryview(zeros)[: min(len(zeros), end - off)], off)
        off += n


def _read_journal(
    path: str, max_write: int, sink: Callable[[ds.Write | ds.Zero], None] | None
) -> tuple[ds.Header, int, int]:
    """Decode a journal whole (bounds, count, CRC); hand each record to ``sink``.
    Returns the header, records and guest bytes. Raises JournalCorrupt."""
    dec = ds.Decoder(max_write=max_write)
    seal: ds.Seal | None = None
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(APPLY_CHUNK)
            if not chunk:
                break
            try:
                events = dec.feed(chunk)
            except ds.DiskStreamError as e:
                raise JournalCorrupt(f"journal {path}: {e}") from None
            for ev in events:
                if seal is not None:
                    raise JournalCorrupt(f"journal {path}: records after its SEAL")
                if isinstance(ev, ds.Seal):
                    seal = ev
                elif isinstance(ev, ds.Write | ds.Zero) and sink is not None:
                    sink(ev)
    if dec.header is None or seal is None:
        raise JournalCorrupt(f"journal {path}: no SEAL: it ends after {dec.received} bytes")
    if seal.epoch != dec.header.first_epoch:
        raise JournalCorrupt(f"journal {path}: seals epoch {seal.epoch}, not its header's")
    return dec.header, seal.records, seal.nbytes


def _apply(
    path: str, fds: list[int], max_write: int, on_apply: Callable[[int], None] | None
) -> tuple[int, int]:
    count = 0

    def sink(ev: ds.Write | ds.Zero) -> None:
        nonlocal count
        if on_apply is not None:
            on_apply(count)
        _apply_one(ev, fds)
        count += 1

    _, records, nbytes = _read_journal(path, max_write, sink)
    return records, nbytes


def _mark_applied(journal: str, fds: list[int]) -> None:
    for fd in fds:
        os.fdatasync(fd)
    os.unlink(journal)
    _fsync_dir(os.path.dirname(journal))


def recover(
    directory: str,
    *,
    max_write: int = ds.DEFAULT_MAX_WRITE,
    on_apply: Callable[[int], None] | None = None,
) -> Recovery:
    """At start-up: finish applying every committed epoch (journal), in epoch
    order, each checked whole before it is applied; delete the staging files
    of epochs never committed. The disks are those named in ``disks.json``."""
    out = Recovery()
    if not os.path.isdir(directory):
        return out
    names = sorted(os.listdir(directory))
    for name in names:
        ep = _epoch_of(name, ".staging")
        if ep is not None:
            os.unlink(os.path.join(directory, name))
            out.discarded.append(ep)
    journals = sorted(
        (ep, os.path.join(directory, name))
        for name in names
        if (ep := _epoch_of(name, ".journal")) is not None
    )
    if out.discarded:
        _fsync_dir(directory)
    if not journals:
        return out
    try:
        with open(os.path.join(directory, DISKS_FILE), encoding="utf-8") as f:
            doc = json.load(f)
        paths = [str(p) for p in doc["disks"]]
        sizes = [int(s) for s in doc["sizes"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JournalCorrupt(f"{directory}: journals but no readable {DISKS_FILE}: {e}") from None
    for ep, path in journals:
        header, _, _ = _read_journal(path, max_write, None)  # whole before a byte is written
        if list(header.disk_sizes) != sizes:
            raise JournalCorrupt(f"journal {path}: disk sizes {header.disk_sizes}, not {sizes}")
        fds = [os.open(p, os.O_RDWR | os.O_CLOEXEC) for p in paths]
        try:
            for fd, p, size in zip(fds, paths, sizes, strict=True):
                if _size_of(fd) != size:
                    raise JournalCorrupt(f"backup disk {p} is not {size} bytes: journal {path}")
            records, nbytes = _apply(path, fds, max_write, on_apply)
            _mark_applied(path, fds)
        finally:
            for fd in fds:
                os.close(fd)
        out.applied.append(ep)
        out.records += records
        out.nbytes += nbytes
    return out
