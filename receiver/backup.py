"""The core's Backup for one Protection: where a session's pages meet the domain.

    ProtectionBackup(prot, who, closed_by)
                                  who(): the session's name for log lines;
                                  closed_by(): the daemon's ERROR, once it closed
    open()                        probe the backup's physmap (receiver.physmap)
    write(pfns, data)             checkpoint 0's pages, into the paused backup
    read(pfns, out)               the backup's pages (the bases of delta pages;
                                  a PFN without memory reads as zeros)
    commit(req)                   a whole checkpoint: its disk epoch (journal,
                                  apply), save records, pages + context
                                  (Domain.set_save_records), then the
                                  policy's ``committed`` move and the figures;
                                  in verify mode the digest check
    disk_open / disk_write / disk_seal   the session's disk stream, into the
                                  Protection's BackupDisks (receiver.backupdisks)

Rules kept here:
- Nothing is written into the backup outside the Protection's lock, and only
  while the Protection is in a commit state (never after a failover, never
  into a replaced backup): else ``BackupClosed``, carrying the ERROR the
  daemon closed the session with, so the sender hears why.
- The lock is the Protection's own: a commit (and its digest) delays only
  this domain's failover, never another domain's.
- A backup disk is written under the same lock and the same check as its
  memory: epoch 0 as it arrives, epoch N inside checkpoint N's commit, before
  its pages. A failover (which takes the lock) therefore finds the disks and
  the memory at the same checkpoint, and nothing reaches a disk after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from xenbind import diskstream as ds
from xenbind.errors import DomainError
from xenbind.hypervisor import Domain
from xenbind.stream import MemoryDigest

from . import policy
from .backupdisks import BackupDisks
from .core import BackupClosed, CommitRequest, Committed
from .physmap import Physmap
from .protection import Protection

log = logging.getLogger("receiver")


class ProtectionBackup:
    """``closed_by()``: the ERROR (code, reason) the daemon closed the session
    with, None while it has not (the connection's close_from_daemon, called
    under the same lock hold as the policy move that closes the backup)."""

    def __init__(
        self,
        prot: Protection,
        who: Callable[[], str],
        closed_by: Callable[[], tuple[int, str] | None] = lambda: None,
    ) -> None:
        self.prot = prot
        self.who = who
        self.closed_by = closed_by
        self.physmap: Physmap | None = None

    def _domain(self) -> Domain:
        backup = self.prot.backup
        if not self.prot.commit_allowed() or backup is None:
            raise BackupClosed(f"backup is {self.prot.state}", self.closed_by())
        return backup

    def open(self) -> None:
        """Which backup PFNs have memory: the ones the stream fills and the
        backup lacks are populated before they are written."""
        with self.prot.lock:
            self.physmap = Physmap(self._domain(), self.prot.config.pages)

    def rows(self) -> np.ndarray | None:
        """The backup's memory to read delta bases in place (the fused decode),
        when the domain offers it (the simulator) and every PFN has memory;
        else None (``read``, the gather path). Only reads go there: every
        write still goes through the lock and the commit."""
        with self.prot.lock:
            domain = self._domain()
            if self.physmap is not None and not bool(self.physmap.backed.all()):
                return None
            return domain.memory_rows()

    def write(self, pfns: np.ndarray, data: np.ndarray) -> None:
        with self.prot.lock:
            domain = self._domain()
            if self.physmap is not None:
                self.physmap.ensure(pfns)
            domain.scatter(pfns, data)

    def read(self, pfns: np.ndarray, out: np.ndarray) -> None:
        """Domain.gather of the populated ones; zeros for a PFN the backup has
        no memory at (what a page populated for it would hold)."""
        n = len(pfns)
        with self.prot.lock:
            domain = self._domain()
            pm = self.physmap
            if pm is None or not n:
                domain.gather(pfns, out)
                return
            if int(pfns.max()) >= pm.pages:
                raise DomainError(
                    domain.domid, "read", f"PFN {int(pfns.max()):#x} is past the last page"
                )
            backed = pm.backed[pfns.astype(np.intp)]
            if backed.all():
                domain.gather(pfns, out)
                return
            rows = out[:n]
            rows[~backed] = 0
            if backed.any():
                have = np.empty((int(backed.sum()), rows.shape[1]), np.uint8)
                domain.gather(pfns[backed], have)
                rows[backed] = have

    def _disks(self) -> BackupDisks:
        disks = self.prot.disks
        if disks is None:  # the core reads disks only for a HELLO that named them
            raise BackupClosed("this backup has no disks")
        return disks

    def disk_open(self, header: ds.Header) -> None:
        self._disks().open(header)

    def disk_write(self, record: ds.Write | ds.Zero, direct: bool) -> None:
        epochs = self._disks().epochs()
        if not direct:
            epochs.add(record)  # into the epoch buffer: no image is touched
            return
        with self.prot.lock:
            self._domain()
            epochs.write_direct(record)

    def disk_seal(self, seal: ds.Seal) -> None:
        epochs = self._disks().epochs()
        if seal.epoch:
            epochs.seal(seal)
            return
        with self.prot.lock:
            self._domain()
            epochs.seal_direct(seal)

    def commit(self, req: CommitRequest) -> Committed:
        prot = self.prot
        t0 = time.monotonic()
        verified = mismatch = False
        with prot.lock:
            domain = self._domain()
            first = prot.state == policy.INITIAL_COPY
            if req.disk_epoch is not None and not first:
                # the disk epoch first: journaled (its commit point) and
                # applied before the memory, under the same lock hold
                self._disks().epochs().commit(req.disk_epoch)
            if req.records:
                domain.set_save_records(req.records)
            if first:
                domain.set_context(req.context)
                n = req.pages
            else:
                n = req.staging.commit(domain, req.context, self.physmap)
            policy.advance(prot, "committed")
            prot.last_committed = req.index
            prot.committed_at = time.monotonic()
            prot.checkpoints += 1
            prot.pages_committed += n
            prot.last_checkpoint_pages = n
            if req.digest is not None:
                verified, mismatch = self._verify(req.index, req.digest)
            # after the digest: the receiver's own work (it may take a while on a
            # loaded host) is not the primary's silence; the sender waits for this ACK
            prot.life()
        took = time.monotonic() - t0
        prot.commit_seconds.observe(took)
        commit_ms = took * 1000
        if first:
            log.info(
                "%s: initial copy committed (%d pages, %.1f MB received); the backup is "
                "failover-capable",
                self.who(),
                n,
                prot.bytes_in / 1e6,
            )
        else:
            log.debug(
                "%s: checkpoint %d committed (%d pages, %.2f ms)",
                self.who(),
                req.index,
                n,
                commit_ms,
            )
        return Committed(n, verified, mismatch)

    def _verify(self, index: int, digest: MemoryDigest) -> tuple[bool, bool]:
        """Digest the backup's memory (xxh3-128 over every page, in PFN order)
        and compare it with the stream's; returns (verified, mismatch)."""
        prot = self.prot
        if digest.algorithm != "xxh3-128":
            log.warning(
                "%s: checkpoint %d: digest algorithm %s not supported; not verified",
                self.who(),
                index,
                digest.algorithm,
            )
            return False, False
        got = prot.digest()
        if got == digest.digest:
            prot.verified += 1
            return True, False
        prot.mismatches += 1
        log.error(
            "%s: verify MISMATCH at checkpoint %d: the backup's memory digest %s differs "
            "from the primary's %s (mismatch #%d)",
            self.who(),
            index,
            got.hex(),
            digest.digest.hex(),
            prot.mismatches,
        )
        return False, True
