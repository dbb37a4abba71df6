"""The backup's disk images of one protected domain, and its session's epochs.

Layout under the receiver's disk directory (``--disk-dir``)::

    DISK_DIR/UUID/disk0.img, disk1.img ...   the backup's images, one per disk
                                             the HELLO names, in its order; kept
                                             across sessions (a reconnect copies
                                             only the blocks whose hashes differ)
    DISK_DIR/UUID/session-SID/               one session's epoch buffer
                                             (receiver.diskbuffer: staging files,
                                             the journal of the epoch being
                                             applied); removed when the session
                                             ends, recovered at start-up

    disks = BackupDisks(disk_dir, hello, mem_limit=.., max_epoch_bytes=..)
    hashes = disks.prepare()        images made or resized, then hashed (DISK_HASHES)
    disks.open(header)              the session's disk stream began
    disks.epochs()                  its DiskBuffer: write_direct / seal_direct
                                    (epoch 0, the initial sync), add / seal (a
                                    later epoch, buffered until its commit),
                                    commit (journal, apply, sync: receiver.backup,
                                    under the Protection's lock, with the memory)
    disks.close()                   the session ended: uncommitted epochs dropped
    recover_all(disk_dir)           start-up: finish what a dead receiver committed

Rules kept here:
- An image is written only through the DiskBuffer (epoch 0 direct, later
  epochs from their journal at their commit); the callers hold the
  Protection's lock around the writes that reach an image (receiver.backup).
- A session's buffer lives in its own directory: a superseded session that
  is still closing never deletes the files of the session that replaced it.
- ``prepare`` never shrinks what it cannot check: an image of the wrong
  size is resized (a grown or shrunk primary disk) and then hashed like any
  other, so the sync copies what differs.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

from xenbind import diskstream as ds
from xenbind.blockhash import MAX_HASHES_PER_MESSAGE, BlockHasher, HashesMessage
from xenbind.session import DISK_HASH_BLOCK, Hello

from .diskbuffer import DiskBuffer, DiskBufferError, DiskStats, Recovery, recover

log = logging.getLogger("receiver")

SESSION_PREFIX = "session-"


def image_name(index: int) -> str:
    return f"disk{index}.img"


@dataclass(frozen=True)
class DiskRecovery:
    """What start-up recovery did for one domain's disks."""

    uuid: str
    recovery: Recovery


class BackupDisks:
    def __init__(
        self,
        disk_dir: str,
        hello: Hello,
        *,
        mem_limit: int,
        max_epoch_bytes: int,
        max_write: int = ds.DEFAULT_MAX_WRITE,
    ) -> None:
        self.sizes = list(hello.domain.disks)
        self.dir = os.path.join(os.path.abspath(disk_dir), hello.domain.uuid)
        self.paths = [os.path.join(self.dir, image_name(i)) for i in range(len(self.sizes))]
        self.session_dir = os.path.join(self.dir, SESSION_PREFIX + hello.session_id)
        self.mem_limit = mem_limit
        self.max_epoch_bytes = max_epoch_bytes
        self.max_write = max_write
        self.buffer: DiskBuffer | None = None
        self.reused: list[bool] = []  # per image: it was there (same size) before
        self.hashed_bytes = 0
        self.stats = DiskStats()  # the buffer's, once open

    # ------------------------------------------------------------ admission

    def prepare(self) -> list[HashesMessage]:
        """Make each image (sparse) or fit an old one to its size, then hash
        them all: the DISK_HASHES the sender's initial sync compares with."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        out: list[HashesMessage] = []
        self.reused = []
        for i, (path, size) in enumerate(zip(self.paths, self.sizes, strict=True)):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                have = os.fstat(fd).st_size
                self.reused.append(have == size)
                if have != size:
                    if have:
                        log.warning(
                            "backup disk %s is %d bytes, the primary's disk %d: resized "
                            "(the initial sync copies what differs)",
                            path,
                            have,
                            size,
                        )
                    os.ftruncate(fd, size)
                hashes = BlockHasher(fd, size, block=DISK_HASH_BLOCK).run()
            finally:
                os.close(fd)
            self.hashed_bytes += size
            for first in range(0, len(hashes), MAX_HASHES_PER_MESSAGE):
                part = hashes[first : first + MAX_HASHES_PER_MESSAGE]
                out.append(HashesMessage(i, DISK_HASH_BLOCK, first, part))
        return out

    # ------------------------------------------------------------ the stream

    def open(self, header: ds.Header) -> None:
        if self.buffer is not None:
            raise DiskBufferError("a second disk stream header in one session")
        self.buffer = DiskBuffer(
            self.session_dir,
            self.paths,
            header,
            mem_limit=self.mem_limit,
            max_epoch_bytes=self.max_epoch_bytes,
            max_write=self.max_write,
        )
        self.stats = self.buffer.stats

    def epochs(self) -> DiskBuffer:
        """The session's epoch buffer (receiver.diskbuffer), once the stream's
        header opened it."""
        if self.buffer is None:
            raise DiskBufferError("disk records before the disk stream's header")
        return self.buffer

    def close(self) -> list[int]:
        """The session is over: drop its uncommitted epochs, close the images,
        remove its buffer directory. Returns the epochs dropped."""
        dropped: list[int] = []
        buf, self.buffer = self.buffer, None
        if buf is not None:
            try:
                dropped = buf.discard()
            finally:
                buf.close()
        shutil.rmtree(self.session_dir, ignore_errors=True)
        return dropped

    def status(self) -> dict[str, object]:
        s = self.stats
        return {
            "disks": [
                {"path": p, "size": z, "reused": r}
                for p, z, r in zip(
                    self.paths, self.sizes, self.reused or [False] * len(self.paths), strict=True
                )
            ],
            "epoch_buffer_bytes": s.mem_used,
            "epoch_spilled_bytes": s.spilled,
            "open_epoch_bytes": s.open_bytes,
            "epochs_applied": s.epochs_applied,
            "bytes_applied": s.bytes_applied,
            "bytes_synced": s.bytes_direct,
            "last_applied_epoch": s.last_applied,
        }


def recover_all(disk_dir: str) -> list[DiskRecovery]:
    """At start-up, before any session: finish applying every epoch a dead
    receiver had committed (its journal), drop every uncommitted one, and
    remove the sessions' buffer directories."""
    out: list[DiskRecovery] = []
    if not os.path.isdir(disk_dir):
        return out
    for uuid in sorted(os.listdir(disk_dir)):
        dom = os.path.join(disk_dir, uuid)
        if not os.path.isdir(dom):
            continue
        for name in sorted(os.listdir(dom)):
            sdir = os.path.join(dom, name)
            if not name.startswith(SESSION_PREFIX) or not os.path.isdir(sdir):
                continue
            rec = recover(sdir)  # JournalCorrupt propagates: the files stay for an operator
            shutil.rmtree(sdir, ignore_errors=True)
            if rec.applied or rec.discarded:
                out.append(DiskRecovery(uuid, rec))
    return out
