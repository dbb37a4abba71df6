"""One protected domain as the receiver sees it: its backup, its state, its figures.

States (``Protection.state``)::

    initial-copy  the backup domain exists, paused; checkpoint 0 is arriving
                  (written straight into the paused backup). Not failover-capable.
    receiving     at least one checkpoint committed, the session is open
    link-lost     the session ended by EOF / reset / silence after a commit;
                  the failover timer runs (policy on-link-loss = failover)
                  or not (wait)
    broken        the session broke a rule after a commit; the failover timer
                  runs only with policy on-violation = failover
    failed-over   the backup was resumed from the last committed checkpoint and
                  runs: the domain is FENCED here (sessions for it are refused)
    ended         clean end of protection (LAST_CHECKPOINT committed, then close)
    superseded    a newer session for the same domain replaced this one
    corrupt       a commit failed half-way (hypervisor error): the backup must
                  not run, the failover timer is off, an operator must look
    gone          the session ended before anything was committed: the backup
                  was destroyed

Rules kept here:
- ``lock`` serialises a commit against a failover: a failover never runs in the
  middle of a commit, and a commit never writes into a backup that failed over
  or was replaced (``commit_allowed`` is checked under the lock).
- ``state`` and ``armed`` (whether the failover timer runs) change only by
  receiver.policy's table (``policy.advance``, under ``lock``); ``armed`` is
  set only once something is committed.
- ``lock`` is this domain's alone, never held across creating the backup
  (``created`` says when the admission's create is over), and never taken
  while the daemon's registry lock is held.
- Times are ``time.monotonic()`` seconds; wall-clock times only for display.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from daemonkit.metrics import Histogram
from xenbind import PAGE_SIZE
from xenbind.blockhash import HashesMessage
from xenbind.hypervisor import Domain
from xenbind.session import Hello
from xenbind.types import DomainConfig
from xenbind.wirecomp import WireCounts

from .backupdisks import BackupDisks
from .policy import COMMIT_STATES, FAILOVER_STATES, INITIAL_COPY

if TYPE_CHECKING:
    from .connection import Connection

DIGEST_SLAB = 4096  # pages gathered at a time to digest the backup's memory

__all__ = ["COMMIT_STATES", "FAILOVER_STATES", "Protection"]


@dataclass
class Protection:
    hello: Hello
    peer: str
    failover_timeout: float  # seconds
    backup: Domain | None = None
    backup_domid: int | None = None
    state: str = INITIAL_COPY  # receiver.policy's table moves it
    armed: bool = False  # receiver.policy's table moves it
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: set once the admission's create_backup is over (done or failed)
    created: threading.Event = field(default_factory=threading.Event)
    connection: Connection | None = None  # while the session is open
    started_wall: float = field(default_factory=time.time)
    last_life: float = field(default_factory=time.monotonic)
    last_heartbeat: float | None = None
    last_committed: int | None = None
    committed_at: float | None = None
    checkpoints: int = 0  # committed, the initial copy included
    bytes_in: int = 0  # bytes received (on the wire)
    #: the session's wire decoder's counts, when the stream comes compressed
    #: (xenbind.wirecomp; None: the raw stream, bytes_in is the stream)
    wire: WireCounts | None = None
    pages_committed: int = 0  # page contents written into the backup, all checkpoints
    last_checkpoint_pages: int = 0
    verified: int = 0
    mismatches: int = 0
    failed_over_wall: float | None = None
    detection_ms: float | None = None
    failover_digest: str | None = None  # verify mode: the backup's memory as it resumed
    #: the witness (docs/witness.md): the revision our winning claim got, the
    #: key we hold since, and while a challenge waits: why, and when to retry
    fencing_revision: int | None = None
    witness_key: Any = None  # daemonkit.witness.OwnerKey, once won
    #: the backup's disk images and this session's epoch buffer (a HELLO with disks)
    disks: BackupDisks | None = None
    #: the images' block hashes, sent after ACCEPT for the sender's initial sync
    disk_hashes: list[HashesMessage] = field(default_factory=list)
    witness_wait: str | None = None
    challenge_at: float = 0.0
    last_error: str | None = None
    #: who sent the HELLO: ("address", HOST) for plaintext, ("certificate",
    #: "name1,name2") for TLS; only the same identity may supersede a live session
    identity: tuple[str, str] = ("address", "?")
    peer_cert_names: list[str] | None = None  # TLS only
    peer_cert_not_after: float | None = None  # TLS only: the peer certificate's expiry
    #: seconds each commit took, observed by receiver.backup (the metrics' histogram)
    commit_seconds: Histogram = field(default_factory=Histogram)
    _slab: np.ndarray | None = None

    @property
    def config(self) -> DomainConfig:
        return self.hello.domain

    @property
    def uuid(self) -> str:
        return self.hello.domain.uuid

    @property
    def name(self) -> str:
        return self.hello.domain.name

    @property
    def generation(self) -> int:
        return self.hello.generation

    def label(self) -> str:
        return f"domain {self.name} ({self.uuid})"

    def life(self, heartbeat: bool = False) -> None:
        now = time.monotonic()
        self.last_life = now
        if heartbeat:
            self.last_heartbeat = now

    def digest(self) -> bytes:
        """xxh3-128 of the backup's whole memory in PFN order (the digest
        remusd's verify mode sends); reads DIGEST_SLAB pages at a time."""
        pages = self.config.pages
        if self._slab is None:
            self._slab = np.empty((min(DIGEST_SLAB, pages), PAGE_SIZE), dtype=np.uint8)
        h = xxhash.xxh3_128()
        for lo in range(0, pages, DIGEST_SLAB):
            hi = min(pages, lo + DIGEST_SLAB)
            out = self._slab[: hi - lo]
            assert self.backup is not None, "digest of a destroyed backup"
            self.backup.gather(np.arange(lo, hi, dtype=np.uint64), out)
            h.update(out.data.cast("B"))
        return h.digest()

    def commit_allowed(self) -> bool:
        return self.state in COMMIT_STATES

    def status(self) -> dict:
        now = time.monotonic()
        o = self.hello.options
        return {
            "domain": self.name,
            "uuid": self.uuid,
            "backup_domid": self.backup_domid,
            "state": self.state,
            "peer": self.peer,
            "session": self.hello.session_id,
            "generation": self.generation,
            "codec": o.codec,
            "interval_ms": o.interval_ms,
            "verify": o.verify,
            "pages": self.config.pages,
            "last_committed": self.last_committed,
            "checkpoints": self.checkpoints,
            "committed_age_s": None
            if self.committed_at is None
            else round(now - self.committed_at, 3),
            "bytes": self.bytes_in,
            "wire": None
            if self.wire is None
            else {
                "codec": self.wire.codec,
                "stream_bytes": self.wire.raw_bytes,
                "segments": self.wire.segments,
                "compressed_segments": self.wire.compressed_segments,
                "ratio": round(self.wire.ratio, 2),
            },
            "pages_committed": self.pages_committed,
            "last_checkpoint_pages": self.last_checkpoint_pages,
            "last_life_age_s": round(now - self.last_life, 3),
            "last_heartbeat_age_s": None
            if self.last_heartbeat is None
            else round(now - self.last_heartbeat, 3),
            "failover_timeout_ms": round(self.failover_timeout * 1000),
            "armed": self.armed,
            "verified": self.verified,
            "mismatches": self.mismatches,
            "failed_over_at": self.failed_over_wall,
            "detection_ms": None if self.detection_ms is None else round(self.detection_ms, 1),
            "failover_digest": self.failover_digest,
            "fencing_revision": self.fencing_revision,
            "witness_wait": self.witness_wait,
            "started_at": self.started_wall,
            "error": self.last_error,
            "peer_cert_names": self.peer_cert_names,
            "peer_cert_not_after": self.peer_cert_not_after,
            "disks": None if self.disks is None else self.disks.status(),
        }
