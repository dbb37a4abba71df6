"""A protected domain's disks during one session: mirror, initial sync, seals.

The domain's disks are served by a mirroring block server
(``xenbind/nbdmirror.py``, one per domain, all its disks in one stream):
every write the guest's disks complete is appended to the disk mirror stream
(``xenbind.diskstream``) before it completes. This module starts that stream,
runs the initial synchronisation against the receiver's block hashes, places
SEAL(N) inside checkpoint N's pause and turns the stream into DISK chunks of
the legacy stream (``xenbind.stream``, tag -1005) on the session's link::

    disks = SessionDisks.of(domain, name)   # None: the domain has no disks
    disks.sizes                             # the HELLO's DomainConfig.disks
    disks.start()                           # mirror on (before the primary is hashed)
    disks.sync(link, deadline)              # epoch 0: the blocks whose hashes differ
    disks.forward(link)                     # what the stream holds now, as DISK chunks
    point = disks.seal()                    # inside the pause: SEAL(N)
    bufs = disks.through(point) + body      # epoch N's last bytes go before body N
    disks.over_budget()                     # the open epoch is large: checkpoint early
    disks.close()

Rules kept here:
- ``seal`` runs only inside a checkpoint's pause (``remusd.epoch.capture``
  calls it): every write the guest saw complete before the pause is before
  SEAL(N) in the stream, every write after the resume is after it.
- The bytes through SEAL(N) go out before checkpoint N's body; the bytes after
  it are epoch N+1's and may go at any chunk boundary (``forward``), so the
  receiver buffers them in its open epoch and a checkpoint's send carries only
  what the guest wrote since the last forward.
- The initial sync reads nothing itself: the block server sends each
  differing run, read under the lock its writes take, in stream order with
  the guest's writes (docs/disk.md, "Initial synchronisation").
- Bounded: the stream is forwarded between page slices and every wait of the
  epoch loop; the sync asks for at most SYNC_BATCH_BYTES of runs at a time
  and forwards them before the next; the epoch loop checkpoints early once
  the open epoch passes half the receiver's max_disk_epoch_bytes.
- A mirror that ends (the block server died, or dropped a consumer it
  thought stalled) ends the session: ``LinkDown``; the next session's sync
  repairs the backup by its hashes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from xenbind.blockhash import BlockHasher, HashArray, HashesMessage, block_count, diff, runs
from xenbind.errors import RemusError
from xenbind.hypervisor import Domain
from xenbind.mirrorclient import MirrorClient, MirrorError, MirrorStream, SealPoint
from xenbind.session import DISK_HASH_BLOCK
from xenbind.stream.encoder import encode_disk
from xenbind.stream.format import DISK_CHUNK_BYTES
from xenbind.types import DiskInfo

from .link import Link, LinkDown

log = logging.getLogger(__name__)

#: Runs asked of the block server per sync request (then forwarded).
SYNC_BATCH_BYTES = 64 << 20
#: The longest run of one sync record group.
SYNC_MAX_RUN = 4 << 20
#: Blocks hashed between two forwards of the stream while the primary is hashed.
HASH_STEP_BLOCKS = 256
#: Seconds to wait for the stream to reach a SEAL the block server placed.
SEAL_TAKE_TIMEOUT = 5.0
#: The open epoch's share of the receiver's max_disk_epoch_bytes that makes
#: the epoch loop checkpoint early.
EARLY_FRACTION = 0.5


class DiskSetupError(RemusError):
    """The domain's disks cannot be mirrored as they are configured."""


@dataclass
class SyncProgress:
    """One disk's initial synchronisation, for ``remusctl status``."""

    size: int
    blocks: int
    hashed: int = 0
    differing: int = 0
    bytes_sent: int = 0
    done: bool = False


@dataclass
class DiskFigures:
    mirrored_bytes: int = 0  # disk stream bytes forwarded to the receiver, this session
    seals: int = 0
    last_seal_ms: float = 0.0
    sync: list[SyncProgress] = field(default_factory=list)


def zero_hashes(size: int, block: int) -> HashArray:
    """The block hashes of a disk of zeros (what a fresh backup image holds)."""
    n = block_count(size, block)
    out = np.full(n, xxhash.xxh3_64_intdigest(bytes(block)), np.uint64)
    tail = size - (n - 1) * block
    if tail != block:
        out[-1] = xxhash.xxh3_64_intdigest(bytes(tail))
    return out


class SessionDisks:
    """The disks of one domain during one session (module docstring)."""

    def __init__(self, disks: list[DiskInfo], name: str) -> None:
        controls = {d.control for d in disks}
        if len(controls) != 1:
            raise DiskSetupError(
                f"domain {name}: its disks are served by {len(controls)} block servers "
                f"({', '.join(sorted(controls))}); this release mirrors one block server "
                "per domain, serving all its disks"
            )
        self.disks = disks
        self.name = name
        self.sizes = tuple(d.size for d in disks)
        self.client = MirrorClient(disks[0].control)
        self.stream: MirrorStream | None = None
        self.figures = DiskFigures(
            sync=[SyncProgress(d.size, block_count(d.size, DISK_HASH_BLOCK)) for d in disks]
        )
        self.early_bytes: int | None = None  # from the receiver's ACCEPT limits
        self._epoch_bytes = 0  # stream bytes forwarded since the last SEAL

    @classmethod
    def of(cls, domain: Domain, name: str) -> SessionDisks | None:
        disks = domain.disks()
        return cls(disks, name) if disks else None

    # ------------------------------------------------------------ the mirror

    def start(self, limits: dict[str, Any] | None = None) -> None:
        """Mirror on: from here every completed guest write is in the stream."""
        try:
            info = self.client.info()
            have = tuple(int(d["size"]) for d in info["disks"])
            if have != self.sizes:  # configuration, not the link: retrying cannot help
                raise LinkDown(
                    f"domain {self.name}: the block server at {self.client.control_path} "
                    f"serves disks of {list(have)} bytes, the domain has {list(self.sizes)}",
                    permanent=True,
                )
            self.stream = self.client.start(first_epoch=0)
        except MirrorError as e:
            raise LinkDown(f"domain {self.name}: cannot start the disk mirror: {e}") from None
        epoch_max = (limits or {}).get("max_disk_epoch_bytes")
        if isinstance(epoch_max, int) and epoch_max > 0:
            self.early_bytes = int(epoch_max * EARLY_FRACTION)

    def _stream(self) -> MirrorStream:
        s = self.stream
        if s is None:
            raise LinkDown(f"domain {self.name}: the disk mirror is not started")
        if s.lost is not None and s.buffered == 0:
            raise LinkDown(f"domain {self.name}: the disk mirror stream ended: {s.lost}")
        return s

    def _chunks(self, pieces: list[bytes]) -> list[bytes]:
        data = b"".join(pieces)
        self.figures.mirrored_bytes += len(data)
        self._epoch_bytes += len(data)
        return [
            encode_disk(data[i : i + DISK_CHUNK_BYTES])
            for i in range(0, len(data), DISK_CHUNK_BYTES)
        ]

    def forward(self, link: Link) -> int:
        """Send what the stream holds now as DISK chunks; returns the bytes sent."""
        bufs = self._chunks(self._stream().take_available())
        return link.send(bufs) if bufs else 0

    def seal(self) -> SealPoint:
        """SEAL the open epoch. Only inside a checkpoint's pause."""
        t0 = time.perf_counter()
        try:
            point = self.client.seal()
        except MirrorError as e:
            raise LinkDown(f"domain {self.name}: cannot seal the disk epoch: {e}") from None
        self.figures.last_seal_ms = (time.perf_counter() - t0) * 1e3
        self.figures.seals += 1
        return point

    def through(self, point: SealPoint | None) -> list[bytes]:
        """DISK chunks of the stream up to the end of SEAL ``point`` (to go
        before its checkpoint's body)."""
        if point is None:
            raise LinkDown(f"domain {self.name}: a checkpoint without its disk SEAL")
        try:
            pieces = self._stream().take(point.end, timeout=SEAL_TAKE_TIMEOUT)
        except MirrorError as e:
            raise LinkDown(
                f"domain {self.name}: the disk stream did not reach SEAL({point.epoch}): {e}"
            ) from None
        out = self._chunks(pieces)
        self._epoch_bytes = 0
        return out

    @property
    def open_epoch_bytes(self) -> int:
        """Stream bytes of the open epoch: forwarded since its SEAL, and read, not yet sent."""
        s = self.stream
        return self._epoch_bytes + (s.buffered if s is not None else 0)

    def over_budget(self) -> bool:
        """The open epoch is past the share of the receiver's epoch bound."""
        return self.early_bytes is not None and self.open_epoch_bytes >= self.early_bytes

    # ------------------------------------------------------------ initial sync

    def sync(self, link: Link, deadline: float) -> int:
        """Epoch 0: hash each primary disk, compare with the receiver's hashes
        (a file target: a disk of zeros), ask the block server for the runs
        that differ. Returns the stream bytes forwarded meanwhile."""
        sent = 0
        backups = self._backup_hashes(link, deadline)
        for i, disk in enumerate(self.disks):
            prog = self.figures.sync[i]
            fd = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                hasher = BlockHasher(fd, disk.size, block=DISK_HASH_BLOCK)
                while not hasher.done:
                    hasher.step(HASH_STEP_BLOCKS)
                    prog.hashed = hasher.progress.hashed
                    sent += self.forward(link)
                    link.poll()
            finally:
                os.close(fd)
            changed = diff(hasher.hashes, backups[i])
            prog.differing = len(changed)
            todo = runs(changed, disk.size, DISK_HASH_BLOCK, max_run=SYNC_MAX_RUN)
            batch: list[tuple[int, int, int]] = []
            batch_bytes = 0
            for off, n in todo:
                batch.append((i, off, n))
                batch_bytes += n
                if batch_bytes >= SYNC_BATCH_BYTES:
                    sent += self._sync_batch(link, batch, prog)
                    batch, batch_bytes = [], 0
            if batch:
                sent += self._sync_batch(link, batch, prog)
            prog.done = True
            log.info(
                "domain %s: disk %d (%d MiB): %d of %d blocks differ from the backup's, %d MiB "
                "sent",
                self.name,
                i,
                disk.size >> 20,
                prog.differing,
                prog.blocks,
                prog.bytes_sent >> 20,
            )
        return sent

    def _sync_batch(self, link: Link, batch: list[tuple[int, int, int]], prog: SyncProgress) -> int:
        try:
            prog.bytes_sent += self.client.sync(batch, timeout=None)
        except MirrorError as e:
            raise LinkDown(f"domain {self.name}: the initial disk sync failed: {e}") from None
        link.poll()
        return self.forward(link)

    def _backup_hashes(self, link: Link, deadline: float) -> list[HashArray]:
        """The receiver's DISK_HASHES, whole for every disk (a file link: zeros)."""
        take = getattr(link, "take_disk_hashes", None)
        if take is None:  # a file capture replays onto a disk of zeros
            return [zero_hashes(d.size, DISK_HASH_BLOCK) for d in self.disks]
        out = [np.zeros(p.blocks, np.uint64) for p in self.figures.sync]
        have = [np.zeros(p.blocks, bool) for p in self.figures.sync]
        while True:
            msgs: list[HashesMessage] = take()
            for m in msgs:
                out[m.disk][m.first : m.first + len(m.hashes)] = m.hashes
                have[m.disk][m.first : m.first + len(m.hashes)] = True
            if all(h.all() for h in have):
                return out
            if time.monotonic() > deadline:
                missing = sum(int((~h).sum()) for h in have)
                raise LinkDown(
                    f"{link.peer} did not send its disk hashes in time ({missing} blocks missing)"
                )
            link.poll()
            time.sleep(0.005)

    # ------------------------------------------------------------ status, end

    def status(self) -> dict[str, Any]:
        f = self.figures
        return {
            "disks": [
                {
                    "path": d.path,
                    "size": d.size,
                    "sync": {
                        "blocks": p.blocks,
                        "hashed": p.hashed,
                        "differing": p.differing,
                        "bytes_sent": p.bytes_sent,
                        "done": p.done,
                    },
                }
                for d, p in zip(self.disks, f.sync, strict=True)
            ],
            "mirrored_bytes": f.mirrored_bytes,
            "open_epoch_bytes": self.open_epoch_bytes,
            "seals": f.seals,
            "last_seal_ms": round(f.last_seal_ms, 3),
        }

    def close(self) -> None:
        """End the mirror (the next session starts a new one)."""
        try:
            if self.stream is not None:
                try:
                    self.client.stop()
                except MirrorError as e:
                    log.warning("domain %s: stopping the disk mirror: %s", self.name, e)
                self.stream.close()
        finally:
            self.stream = None
            self.client.close()
