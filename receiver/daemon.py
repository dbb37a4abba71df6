"""The receiver daemon's core: admission, the end-of-session policies, failover.

Before a HELLO is read (receiver.server): plaintext senders from outside
--insecure-allow are closed at once with a REFUSE; TLS peers are checked by
their certificate; unauthenticated connections are bounded apart (--max-pending).

Admission of a HELLO (``admit``), in this order:
    the receiver is stopping                    -> REFUSE busy
    domain larger than max-pages                -> REFUSE limit
    plaintext, and the domain larger than
      insecure-max-mb                           -> REFUSE limit
    the failover timeout for the session below
      2 x interval_ms + the sender's ack_ms     -> REFUSE limit (it would fail over
                                                   a healthy primary)
    too many open sessions                      -> REFUSE busy
    (codec seed/xen) a cache larger than
      max-cache-pages, or a sender buffer whose
      COMPRESSED_DATA chunks could exceed
      max-compressed-mb (buffer_pages x the
      codec's worst encoded page)               -> REFUSE limit (not mid-stream)
    the domain failed over here and its backup
      still exists                              -> REFUSE fenced (never overwrite it)
    a session for the domain is open or waiting
      with a larger generation                  -> REFUSE busy (an older protection)
      still open (a live session) and the new
      HELLO from another address (plaintext) or
      a certificate with other names (TLS)      -> REFUSE busy (a forged HELLO must
                                                   not take a session over)
      with an equal or smaller generation       -> the old one is superseded (the same
                                                   protection reconnecting, or a newer
                                                   one): its
                                                   connection gets ERROR superseded,
                                                   its paused backup is destroyed
    a domain with the backup's UUID runs on this
      host (not one of our paused backups)      -> REFUSE fenced
    a paused leftover with the backup's UUID (a
      backup of an earlier receiver run)        -> destroyed, with a warning
    (the backup's UUID is the primary's, or with backup-rename, test/lab
    only, one derived from it: receiver.rename; every other key here is the
    primary's UUID)
    superseded (see above) while it waited to
      create its backup                         -> REFUSE busy, no backup created
    then the backup domain is created paused    -> ACCEPT (receiver.connection),
                                                   unless the peer left or the
                                                   session was closed meanwhile

End of a session (``session_ended``), by what ended it (receiver.policy
turns the end kind and the configuration into an event of its table; the
table is the one place a Protection's state changes):
    before checkpoint 0 committed (any cause)   the backup is destroyed: it holds
                                                nothing usable
      admission (no ACCEPT sent: the peer left
      while the backup was created, or shutdown) the same, logged as a warning
    clean (LAST_CHECKPOINT committed, GOODBYE)  no failover; on-unprotect:
                                                destroy (default) or keep paused
    link-lost (EOF, reset, silence)             state link-lost; on-link-loss:
                                                failover (default) once the
                                                failover timeout has passed since
                                                the last sign of life, unless a
                                                newer session for the domain
                                                arrives first; or wait
    violation (the stream broke a rule)         state broken; on-violation: wait
                                                (default: no failover, the backup
                                                stays paused at its last commit
                                                until the primary reconnects or an
                                                operator sends `failover`), or
                                                failover as for link-lost
    corrupt (a commit failed half-way)          state corrupt: never resumed
                                                automatically

Failover (``failover``): under the Protection's lock (so never in the middle of
a commit), the backup is unpaused with the memory and context of the last
committed checkpoint; the domain is then fenced. The log says which checkpoint
it resumed from and how long detection took (the silence before the decision).

The failover timer (``monitor``): one thread checks every 10 ms each
Protection whose timer is armed, and every open session (receiving):
    receiving     silent[on-link-loss]: failover, or (wait) the session is
                  ended as stalled
    link-lost     armed when on-link-loss = failover
    broken        armed when on-violation = failover
Each expiry runs in a thread of its own, so a domain whose lock is held (a
long commit, a digest, a destroy) never delays another domain's failover.

Locks (one domain's create, destroy, commit or digest never delays another
domain's failover, admission or ``status``):
- ``self.lock`` guards the registry and the connection set only; it is never
  held across a hypervisor call or a send, nor while taking a Protection's lock.
- A Protection's ``lock`` serialises that domain's commit, failover, destroy
  and supersede; it is never held across ``create_backup``.
- No hypervisor-wide lock: create, list and destroy run unlocked, side by side.

Shutdown (``shutdown``): every connection is closed (ERROR shutdown once
accepted, nothing before), then the session threads and the failover timer
are joined, within one deadline (SHUTDOWN_JOIN_S), and only threads that were
started: a connection whose thread the listener is starting right now has
none yet (``Connection.thread`` is set once it runs); it sees ``closing`` and
ends by itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from daemonkit.tls import TlsServer, cert_not_after
from daemonkit.transport import TlsTransport
from daemonkit.witness import (
    ClaimRefused,
    OwnerKey,
    WitnessError,
    WitnessUnreachable,
    no_witness_status,
)
from xenbind import PAGE_SIZE
from xenbind.compress.formats import MAX_ENCODED_PAGE
from xenbind.errors import DomainError, RemusError
from xenbind.hypervisor import Domain, Hypervisor
from xenbind.session import (
    ERR_FAILED_OVER,
    ERR_SHUTDOWN,
    ERR_STALLED,
    ERR_SUPERSEDED,
    ERR_SWITCHOVER_FAILED,
    Hello,
)
from xenbind.types import DomainConfig, DomainInfo

from . import policy
from .backupdisks import BackupDisks, recover_all
from .config import ReceiverConfig
from .core import Refusal
from .protection import Protection
from .rename import backup_config

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("receiver")

MONITOR_PERIOD = 0.01  # seconds between failover-timer checks
SHUTDOWN_JOIN_S = 3.0  # shutdown: how long to wait for all session threads, together
#: a superseding admission waits at most this long for the older one's create to end
CREATE_WAIT_S = 120.0
#: the ERROR code of each policy close action
#: how many removals of stale copies the status keeps
REMOVED_KEPT = 32

CLOSE_CODES = {
    policy.CLOSE_SUPERSEDED: ERR_SUPERSEDED,
    policy.CLOSE_FAILED_OVER: ERR_FAILED_OVER,
    policy.CLOSE_STALLED: ERR_STALLED,
}


def check_timeout(timeout_ms: int, interval_ms: int, ack_ms: int) -> None:
    """REFUSE limit a session whose failover timeout cannot hold two checkpoint
    intervals plus the sender's ack time: it would fail over a healthy primary
    (issue 12: 50 ms against a 200 ms interval failed over 150 ms after ACCEPT)."""
    need = 2 * interval_ms + ack_ms
    if timeout_ms < need:
        raise Refusal(
            "limit",
            f"failover timeout {timeout_ms} ms cannot hold two checkpoint intervals of "
            f"{interval_ms} ms plus the sender's ack time of {ack_ms} ms (needs at least "
            f"{need} ms): raise the receiver's failover-timeout or shorten the interval",
        )


class ReceiverDaemon:
    def __init__(self, cfg: ReceiverConfig, hypervisor: Hypervisor) -> None:
        self.cfg = cfg
        self.hv = hypervisor
        #: the registry and the connection set only: never held across a
        #: hypervisor call, a send, or while taking a Protection's lock
        self.lock = threading.RLock()
        self.protections: dict[str, Protection] = {}  # by UUID
        self.connections: set[Connection] = set()
        self._expiring: set[int] = set()  # id() of the Protections an expiry thread handles
        self.listen_address: str | None = None
        #: None for plaintext (--insecure)
        self.tls: TlsServer | None = None
        self.tls_refused = 0  # connections refused by the TLS handshake or the name check
        #: failovers per (domain name, UUID) since the start (the metrics' counter)
        self.failovers: dict[tuple[str, str], int] = {}
        #: unauthenticated connections the listener holds now (receiver.server sets it)
        self.pending_connections: Callable[[], int] = lambda: 0
        #: pending connections dropped (evicted by a newer one, or silent too long)
        self.pending_dropped = 0
        #: the last stale copies removed from this host (status "removed")
        self.removed: deque[dict] = deque(maxlen=REMOVED_KEPT)
        #: plaintext connections refused for an address outside --insecure-allow
        self.insecure_refused = 0
        self._own_cert: tuple[int, float | None] = (-1, None)  # (tls loads, notAfter)
        self.stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    # ------------------------------------------------------------- connections

    def connection_opened(self, conn: Connection) -> bool:
        """False if too many connections are open (the caller closes it)."""
        with self.lock:
            if len(self.connections) >= 2 * self.cfg.max_sessions + 8:
                return False
            self.connections.add(conn)
            return True

    def connection_closed(self, conn: Connection) -> None:
        with self.lock:
            self.connections.discard(conn)

    def open_sessions(self) -> int:
        return sum(1 for p in self.protections.values() if p.connection is not None)

    # ------------------------------------------------------------- admission

    def admit(self, hello: Hello, conn: Connection) -> Protection:
        """Admit ``hello`` (the table in this module's docstring) and create
        its backup. No lock another domain needs is held across a
        hypervisor call: the registry lock only for the registry itself, the
        old Protection's lock (this domain's) for superseding it, none at all
        across create_backup."""
        cfg = self.cfg
        d = hello.domain
        if self.stopping.is_set():
            raise Refusal("busy", "the receiver is shutting down")
        if d.pages > cfg.max_pages:
            raise Refusal(
                "limit",
                f"domain {d.name} has {d.pages} pages, more than this "
                f"receiver's max-pages {cfg.max_pages}",
            )
        if self.tls is None and d.pages * PAGE_SIZE > cfg.insecure_max_bytes:
            raise Refusal(
                "limit",
                f"domain {d.name} has {d.pages * PAGE_SIZE >> 20} MiB of memory, more than "
                f"this receiver lets a plaintext session protect (insecure-max-mb "
                f"{cfg.insecure_max_bytes >> 20}): use TLS, or raise insecure-max-mb",
            )
        timeout_ms = cfg.failover_timeout_for(hello.options.interval_ms, hello.options.heartbeat_ms)
        check_timeout(timeout_ms, hello.options.interval_ms, hello.options.ack_ms)
        self._check_options(hello)
        self._check_witness(hello)  # etcd I/O: no lock held
        with self.lock:
            if self.open_sessions() >= cfg.max_sessions:
                raise Refusal("busy", f"{cfg.max_sessions} sessions already open (max-sessions)")
        timeout = timeout_ms / 1000
        prot = Protection(hello=hello, peer=conn.peer, failover_timeout=timeout)
        prot.identity = conn.identity()
        if isinstance(conn.t, TlsTransport):
            prot.peer_cert_names = list(conn.t.peer_names)
            prot.peer_cert_not_after = conn.t.peer_not_after
        prot.connection = conn
        # reserve the UUID (superseding an older protection first), so two
        # HELLOs cannot race past each other
        while True:
            with self.lock:
                old = self.protections.get(d.uuid)
                if old is None:
                    if self.open_sessions() >= cfg.max_sessions:
                        raise Refusal(
                            "busy", f"{cfg.max_sessions} sessions already open (max-sessions)"
                        )
                    self.protections[d.uuid] = prot
                    break
            self._resolve_old(old, hello, prot.identity)  # this domain's lock only; look again
        try:
            # the backup's own identity: the primary's, unless backup-rename
            # (test/lab) derives another one; the fence checks that identity
            bd = backup_config(d, cfg.backup_rename)
            if bd is not d:
                log.warning(
                    "domain %s (%s): backup-rename (test/lab only): the backup is "
                    "created as %s (%s)",
                    d.name,
                    d.uuid,
                    bd.name,
                    bd.uuid,
                )
            self._check_host(bd)
            with prot.lock:
                if prot.state != policy.INITIAL_COPY:
                    # a reconnect superseded it while it waited: create nothing for it
                    raise Refusal(
                        "busy",
                        f"{prot.label()}: a newer session of the domain "
                        "replaced this one during admission",
                    )
            if d.disks:
                self._prepare_disks(prot)  # reads every image: no lock held
            paths = prot.disks.paths if prot.disks is not None else ()
            created = self.hv.create_backup(bd, paths)  # seconds, maybe: no lock held
            backup: Domain | None = created
            with prot.lock:
                if prot.state == policy.INITIAL_COPY:
                    prot.backup = created
                    prot.backup_domid = created.domid
                    backup = None
            if backup is not None:
                # superseded while it was created: the newer session destroyed
                # nothing of it (there was nothing yet), so this admission does
                try:
                    backup.destroy()
                except DomainError as e:
                    log.warning(
                        "%s: destroying backup domain %s (superseded during admission) failed: %s",
                        prot.label(),
                        backup.domid,
                        e,
                    )
                return prot  # the connection sees ``closing`` and sends no ACCEPT
        except Refusal:
            self._forget(prot)
            raise
        except RemusError as e:  # ConfigError (a derived name too long) included
            self._forget(prot)
            raise Refusal("internal", f"cannot create the backup domain: {e}") from None
        finally:
            prot.created.set()
        o = hello.options
        log.info(
            "%s from %s: session %s accepted (generation %d, %d pages, %d vCPU, codec %s, "
            "interval %d ms, verify %s); backup domain %d created paused; failover "
            "timeout %d ms",
            prot.label(),
            conn.peer,
            hello.session_id[:8],
            hello.generation,
            d.pages,
            d.vcpus,
            o.codec,
            o.interval_ms,
            "on" if o.verify else "off",
            prot.backup_domid,
            round(timeout * 1000),
        )
        if not isinstance(conn.t, TlsTransport):
            log.warning(
                "%s: session %s runs over plaintext TCP (--insecure): anyone on the "
                "path can read or forge this guest's memory",
                prot.label(),
                hello.session_id[:8],
            )
        else:
            log.info(
                "%s: session %s over %s", prot.label(), hello.session_id[:8], conn.t.describe()
            )
        return prot

    def _check_options(self, hello: Hello) -> None:
        """REFUSE limit now what the Decoder would refuse mid-stream: a codec
        cache above max-cache-pages, or a sender buffer whose COMPRESSED_DATA
        chunks may exceed max-compressed (each page of it encodes to at most
        MAX_ENCODED_PAGE[codec] bytes). Codec none sends neither."""
        cfg = self.cfg
        o = hello.options
        if o.codec == "none":
            return
        if o.cache_pages > cfg.max_cache_pages:
            raise Refusal(
                "limit",
                f"options: a {o.codec} cache of {o.cache_pages} pages, more "
                f"than this receiver's max-cache-pages {cfg.max_cache_pages}",
            )
        per_page = MAX_ENCODED_PAGE[o.codec]
        worst = o.buffer_pages * per_page
        if worst > cfg.max_compressed:
            raise Refusal(
                "limit",
                f"options: a sender buffer of {o.buffer_pages} pages makes "
                f"{o.codec} COMPRESSED_DATA chunks of up to {worst} bytes, more than "
                f"this receiver's max-compressed-mb {cfg.max_compressed >> 20} "
                f"(buffer-pages {cfg.max_compressed // per_page} at most)",
            )

    def _check_witness(self, hello: Hello) -> None:
        """The HELLO's claim must be the owner key's holder now (docs/witness.md,
        contract step 3): REFUSE witness if not, REFUSE fenced if a later claim
        (a failover) moved the epoch past it. Called with no lock held."""
        w = self.cfg.witness
        claim = hello.witness
        if w is None or claim is None:
            return
        d = hello.domain
        expect = w.owner_key(d.uuid)
        if claim.key != expect:
            raise Refusal(
                "witness",
                f"the HELLO's owner key {claim.key} is not this receiver's {expect}: "
                "the two daemons use different witness prefixes or clusters",
            )
        key = OwnerKey(w, d.uuid, role="backup", session=hello.session_id)
        try:
            holder, epoch = key.holder()
        except WitnessUnreachable as e:
            raise Refusal("busy", f"{e}: cannot check the HELLO's witness claim") from None
        finally:
            key.close()
        if epoch > claim.revision:
            raise Refusal(
                "fenced",
                f"witness: {expect} was claimed at revision {epoch}, after the HELLO's "
                f"claim (revision {claim.revision}): the backup took over",
            )
        if holder is None or holder.revision != claim.revision:
            who = (
                "nobody"
                if holder is None
                else f"{holder.role} {holder.host} (revision {holder.revision})"
            )
            raise Refusal(
                "witness",
                f"witness: the HELLO claims {expect} at revision {claim.revision}, but it is "
                f"held by {who}: a stale claim (claim again)",
            )

    def _resolve_old(self, old: Protection, hello: Hello, identity: tuple[str, str]) -> None:
        """A HELLO for a domain we already hold: refuse it, or move the old
        Protection out of the way (policy ``replaced`` / ``superseded``).
        Called with no lock held; takes the old Protection's lock only."""
        exists = self._exists(old) if old.state in (policy.FAILED_OVER, policy.ENDED) else False
        waiting = None
        with old.lock:
            if old.state == policy.FAILED_OVER and exists:
                raise Refusal(
                    "fenced",
                    f"{old.label()} failed over to this host at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(old.failed_over_wall))} "
                    f"from checkpoint {old.last_committed} and runs here as domain "
                    f"{old.backup_domid}; refusing to overwrite it (destroy it "
                    "here first to protect the guest again)",
                )
            if policy.allows(old.state, "replaced"):
                if not exists:
                    old.backup = None  # nothing left to destroy
                self._carry_out(
                    old,
                    policy.advance(old, "replaced"),
                    "a new protection of the domain replaces the kept backup",
                )
                return
            if hello.generation < old.generation:
                raise Refusal(
                    "busy",
                    f"{old.label()} is already protected by session "
                    f"{old.hello.session_id[:8]} of a newer protection (state "
                    f"{old.state}, generation {old.generation} > {hello.generation})",
                )
            if old.connection is not None and old.identity != identity:
                # a live session is replaced only by its own sender (the same
                # address, or a certificate with the same names): else a forged
                # HELLO with the victim's UUID and a large generation takes it over
                raise Refusal(
                    "busy",
                    f"{old.label()} is protected by a live session from {old.identity[0]} "
                    f"{old.identity[1]}; a HELLO from {identity[0]} {identity[1]} may not "
                    "replace it (it can once that session has ended)",
                )
            # a newer protection of the same domain: it replaces the old one
            prev = old.state
            actions = policy.advance(old, "superseded")
            log.warning(
                "%s: session %s (generation %d, %s) superseded by session %s "
                "(generation %d); its backup domain %s is destroyed",
                old.label(),
                old.hello.session_id[:8],
                old.generation,
                prev,
                hello.session_id[:8],
                hello.generation,
                old.backup_domid,
            )
            self._carry_out(
                old,
                actions,
                "superseded",
                close=f"session {hello.session_id[:8]} (generation {hello.generation}) "
                "replaces this one",
            )
            if old.backup_domid is None:
                waiting = old  # its backup is being created: see it destroyed first
        if waiting is not None:
            # per domain only: this session's thread waits for the older
            # admission's create to end (it destroys what it made), so the
            # fence check below does not take that backup for a leftover
            waiting.created.wait(CREATE_WAIT_S)

    def _carry_out(
        self, prot: Protection, actions: tuple[str, ...], why: str, close: str = ""
    ) -> None:
        """The actions of a policy move, in order (under ``prot.lock``)."""
        for action in actions:
            if action == policy.DESTROY:
                self._destroy(prot, why)
            elif action == policy.FORGET:
                self._forget(prot)
            elif action.startswith("close:"):
                conn, prot.connection = prot.connection, None
                if conn is not None:
                    conn.close_from_daemon(CLOSE_CODES[action], close)
            elif action != policy.FAILOVER:  # failover: the caller's next step
                raise RemusError(f"policy action {action!r} unknown")

    def _list(self) -> list[DomainInfo]:
        """hv.list(), retried a few times on a DomainError (a transient
        failure of the hypervisor call; the simulator's list itself leaves out
        a domain destroyed while it is being listed). No lock held."""
        for attempt in range(5):
            try:
                return self.hv.list()
            except DomainError:
                if attempt == 4:
                    raise
                time.sleep(0.02)
        return []

    def _prepare_disks(self, prot: Protection) -> None:
        """The backup's disk images for a HELLO with disks: made (sparse) or
        reused, then hashed for the sender's initial sync (docs/disk.md)."""
        cfg = self.cfg
        disks = BackupDisks(
            cfg.disk_dir,
            prot.hello,
            mem_limit=cfg.disk_buffer_bytes,
            max_epoch_bytes=cfg.max_disk_epoch_bytes,
        )
        t0 = time.monotonic()
        try:
            prot.disk_hashes = disks.prepare()
        except OSError as e:
            raise Refusal(
                "internal", f"cannot prepare the backup's disk images in {disks.dir}: {e}"
            ) from None
        prot.disks = disks
        log.info(
            "%s: %d backup disk image(s) in %s (%s), %.0f MiB hashed in %.2f s",
            prot.label(),
            len(disks.paths),
            disks.dir,
            ", ".join("reused" if r else "new" for r in disks.reused),
            disks.hashed_bytes / (1 << 20),
            time.monotonic() - t0,
        )

    def recover_disks(self) -> None:
        """At start-up, before the listener: disk epochs a dead receiver had
        committed are applied, uncommitted ones dropped (docs/disk.md)."""
        for r in recover_all(self.cfg.disk_dir):
            rec = r.recovery
            log.warning(
                "domain %s: start-up recovery of its backup disks: committed epoch(s) %s "
                "finished applying (%d records, %d bytes); uncommitted epoch(s) %s dropped",
                r.uuid,
                ", ".join(map(str, rec.applied)) or "none",
                rec.records,
                rec.nbytes,
                ", ".join(map(str, rec.discarded)) or "none",
            )

    def _check_host(self, d: DomainConfig) -> None:
        """Fence against a domain with this UUID already on the host."""
        infos = self._list()
        for info in infos:
            if info.uuid.lower() != d.uuid:
                continue
            if info.state != "running":
                log.warning(
                    "domain %s (%s): destroying %s leftover domain %d (a backup of "
                    "an earlier receiver run)",
                    d.name,
                    d.uuid,
                    info.state,
                    info.domid,
                )
                self.hv.lookup(info.domid).destroy()
                with self.lock:
                    self.removed.append(
                        {
                            "name": d.name,
                            "uuid": d.uuid,
                            "domid": info.domid,
                            "state": info.state,
                            "why": "a leftover copy (not running) of a domain a new session "
                            "protects to this host",
                            "at": round(time.time(), 3),
                        }
                    )
                continue
            raise Refusal(
                "fenced",
                f"a domain with UUID {d.uuid} already runs on this host "
                f"(domain {info.domid}, {info.state}): it failed over here or was "
                "started by hand; refusing to overwrite it",
            )

    def _exists(self, prot: Protection) -> bool:
        if prot.backup_domid is None:
            return False
        try:
            infos = self._list()
        except RemusError:
            return True  # when in doubt, keep the fence
        return any(i.domid == prot.backup_domid for i in infos)

    def _destroy(self, prot: Protection, why: str) -> None:
        """Destroy ``prot``'s backup (under ``prot.lock``: this domain's only)."""
        if prot.backup is None:
            return
        try:
            prot.backup.destroy()
        except DomainError as e:
            log.warning(
                "%s: destroying backup domain %s (%s) failed: %s",
                prot.label(),
                prot.backup_domid,
                why,
                e,
            )
        prot.backup = None

    def _forget(self, prot: Protection) -> None:
        with self.lock:
            if self.protections.get(prot.uuid) is prot:
                del self.protections[prot.uuid]

    # ------------------------------------------------------------- end of a session

    def session_ended(self, prot: Protection, conn: Connection, kind: str, message: str) -> None:
        """Apply the policy for how ``conn``'s session on ``prot`` ended."""
        with prot.lock:
            if prot.connection is conn:
                prot.connection = None
            if not prot.commit_allowed():
                # failed over, superseded, ... meanwhile: that path did the work
                log.info(
                    "%s: session %s closed (%s): %s",
                    prot.label(),
                    prot.hello.session_id[:8],
                    prot.state,
                    message,
                )
                return
            prot.last_error = None if kind == "clean" else message
            first = prot.state == policy.INITIAL_COPY
            stopping = self.stopping.is_set()
            event = policy.end_event(prot.state, kind, self.cfg, stopping)
            # destroyed first, then said so: a reader of the log (a test, an
            # operator) must find the backup gone once the line is there
            self._carry_out(prot, policy.advance(prot, event), "session ended")
            self._log_end(prot, event, message, first, stopping)

    def _log_end(
        self, prot: Protection, event: str, message: str, first: bool, stopping: bool = False
    ) -> None:
        sid = prot.hello.session_id[:8]
        last = prot.last_committed
        if first and stopping:
            # a clean stop of the receiver: what it did, not an error
            log.warning(
                "%s: session %s closed as the receiver stops, before its initial copy "
                "completed (%s); backup domain %s destroyed (nothing was committed)",
                prot.label(),
                sid,
                message,
                prot.backup_domid,
            )
        elif first and event == "admission-failed":
            log.warning(
                "%s: session %s: %s; backup domain %s destroyed (nothing was committed)",
                prot.label(),
                sid,
                message,
                prot.backup_domid,
            )
        elif first:
            log.error(
                "%s: session %s ended before the initial copy completed: %s; backup "
                "domain %s destroyed (nothing was committed)",
                prot.label(),
                sid,
                message,
                prot.backup_domid,
            )
        elif event.startswith("clean"):
            log.info(
                "%s: protection ended cleanly after checkpoint %s (%s); no failover; "
                "backup domain %s %s",
                prot.label(),
                last,
                message,
                prot.backup_domid,
                "kept paused" if event == "clean[keep]" else "destroyed",
            )
        elif event == "corrupt":
            log.critical(
                "%s: %s; the backup domain %s is inconsistent and will NOT be "
                "resumed automatically",
                prot.label(),
                message,
                prot.backup_domid,
            )
        elif event.startswith("violation"):
            what = (
                "failing over when the failover timeout has passed, unless the primary "
                "reconnects first (on-violation=failover)"
                if prot.armed
                else "the backup stays paused at it until the primary reconnects or an "
                "operator fails over (on-violation=wait)"
            )
            log.error(
                "%s: session %s broke the protocol: %s; committed checkpoint %s is untouched; %s",
                prot.label(),
                sid,
                message,
                last,
                what,
            )
        elif event == "stopping":
            log.warning(
                "%s: session %s closed as the receiver stops; backup domain %s stays "
                "paused at checkpoint %s (%s)",
                prot.label(),
                sid,
                prot.backup_domid,
                last,
                message,
            )
        else:
            remaining = max(0.0, prot.failover_timeout - (time.monotonic() - prot.last_life))
            what = (
                f"failing over in {remaining * 1000:.0f} ms unless the primary reconnects"
                if prot.armed
                else "waiting for the primary to reconnect (on-link-loss=wait)"
            )
            log.warning(
                "%s: session %s lost after checkpoint %s: %s; %s",
                prot.label(),
                sid,
                last,
                message,
                what,
            )

    # ------------------------------------------------------------- failover

    def manual_failover(self, prot: Protection) -> dict:
        """An operator's ``failover``: at once without a witness; with one, only
        after the failover timeout and after winning the owner key."""
        if self.cfg.witness is None:
            return self.failover(prot, "operator request on the control socket", manual=True)
        with prot.lock:
            silence = time.monotonic() - prot.last_life
            if not policy.allows(prot.state, "witness-won"):
                raise RemusError(f"{prot.label()} cannot fail over in state {prot.state}")
            if silence < prot.failover_timeout:
                raise RemusError(
                    f"{prot.label()}: witness: the failover timeout "
                    f"({prot.failover_timeout * 1000:.0f} ms) has not passed since the last "
                    f"sign of life ({silence * 1000:.0f} ms ago); not failing over"
                )
        result = self._challenge(prot, "operator request on the control socket", manual=True)
        if not result:
            raise RemusError(f"{prot.label()}: not failing over: {prot.witness_wait}")
        return result

    # ------------------------------------------------------------- switchover

    def handover(self, prot: Protection, conn: Connection, index: int) -> None:
        """The primary's switchover (SWITCHOVER): its last checkpoint ``index``
        is committed and acknowledged, its guest stays stopped at it. Resume
        the backup (with a witness, once the owner key is won: the primary
        gives it up on the ACK) and end the session ERROR failed-over, as a
        failover does. If that cannot be done, end the protection as a clean
        end would (on-unprotect) and answer ERROR switchover-failed: the
        primary runs its copy again. No lock is held across etcd."""
        reason = f"switchover asked by the primary (its guest stopped at checkpoint {index})"
        log.info(
            "%s: switchover: checkpoint %s committed and acknowledged; resuming the backup",
            prot.label(),
            index,
        )
        why = "the backup could not be resumed"
        try:
            if self.cfg.witness is None:
                done = self.failover(prot, reason, manual=True)
            else:
                done = self._handover_claim(prot, reason)
                why = f"witness: the owner key was not won: {prot.witness_wait}"
        except DomainError as e:  # unpausing failed (failover logged it: corrupt)
            done, why = {}, f"resuming the backup failed: {e}"
        except RemusError as e:
            done, why = {}, str(e)
        if not done:
            self._handover_failed(prot, conn, why)

    def _handover_claim(self, prot: Protection, reason: str) -> dict:
        """Claim the owner key until won, for the lease's TTL and a second (the
        primary releases it once it has the ACK; else its lease runs out)."""
        w = self.cfg.witness
        assert w is not None
        deadline = time.monotonic() + w.timings.ttl + 1.0
        while True:
            done = self._challenge(prot, reason, manual=True)
            if done or time.monotonic() >= deadline or self.stopping.is_set():
                return done
            with prot.lock:
                if prot.state == policy.FAILED_OVER:
                    return {"domain": prot.name}  # the timer's challenge won it meanwhile
            time.sleep(min(0.2, w.timings.retry_period))

    def _handover_failed(self, prot: Protection, conn: Connection, why: str) -> None:
        with prot.lock:
            if prot.state == policy.FAILED_OVER:
                return  # resumed after all (the timer's challenge): that closed the session
            if policy.allows(prot.state, "clean[destroy]"):
                event = policy.end_event(prot.state, "clean", self.cfg, False)
                self._carry_out(prot, policy.advance(prot, event), "switchover failed")
                kept = "kept paused" if event == "clean[keep]" else "destroyed"
            else:
                kept = f"left {prot.state}"
            prot.last_error = f"switchover failed: {why}"
        log.error(
            "%s: SWITCHOVER FAILED: %s; backup domain %s %s (protection ended); the "
            "primary runs its copy again",
            prot.label(),
            why,
            prot.backup_domid,
            kept,
        )
        conn.close_from_daemon(
            ERR_SWITCHOVER_FAILED,
            f"switchover failed: {why}; the backup was not resumed ({kept}): run the guest "
            "on the primary",
        )

    def _challenge(self, prot: Protection, reason: str, *, manual: bool = False) -> dict:
        """Claim the owner key as the backup (no lock held across etcd), then fail
        over if nothing changed meanwhile; else stay armed, retry after retry-period."""
        w = self.cfg.witness
        assert w is not None
        key = OwnerKey(w, prot.uuid, role="backup", session=prot.hello.session_id)
        try:
            rev = key.claim()
        except (ClaimRefused, WitnessUnreachable) as e:
            key.close()
            if isinstance(e, ClaimRefused) and e.holder is not None:
                wait = f"waiting for the witness: held by {e.holder.role} {e.holder.host}"
            elif isinstance(e, ClaimRefused):
                wait = f"waiting for the witness: {e.why}"
            else:
                wait = f"witness unreachable: {e}"
            with prot.lock:
                if policy.allows(prot.state, "witness-refused"):
                    policy.advance(prot, "witness-refused")
                    first = prot.witness_wait is None
                    prot.witness_wait = wait
                    prot.challenge_at = time.monotonic() + w.timings.retry_period
                    (log.warning if first else log.debug)(
                        "%s: not failing over: %s; trying again every %.1f s",
                        prot.label(),
                        wait,
                        w.timings.retry_period,
                    )
                else:
                    prot.witness_wait = wait
            return {}
        with prot.lock:
            silence = time.monotonic() - prot.last_life
            current = self.protections.get(prot.uuid) is prot
            if (
                not current
                or not policy.allows(prot.state, "witness-won")
                or (not manual and (not prot.armed or silence < prot.failover_timeout))
            ):
                won = False  # a new session, a sign of life: give the key back
            else:
                won = True
                policy.advance(prot, "witness-won")
                prot.fencing_revision = rev
                prot.witness_key = key
                prot.witness_wait = None
                result = self.failover(prot, reason, manual=manual)
        if not won:
            try:
                key.release()
            except WitnessError as e:
                log.warning("%s: witness: giving the key back: %s", prot.label(), e)
            key.close()
            return {}
        # the resumed domain is the live copy: hold its key (contract, receiver 3)
        stop = self.stopping
        threading.Thread(
            target=key.run_renewals, args=(stop,), name=f"witness-{prot.name}", daemon=True
        ).start()
        return result

    def failover(self, prot: Protection, reason: str, *, manual: bool = False) -> dict:
        with prot.lock:
            silence = time.monotonic() - prot.last_life
            if not policy.allows(prot.state, "resumed"):
                raise RemusError(f"{prot.label()} cannot fail over in state {prot.state}")
            if not manual and (not prot.armed or silence < prot.failover_timeout):
                return {}  # a sign of life or a new session came in meanwhile
            backup = prot.backup
            assert backup is not None, "a failover-capable Protection has its backup"
            digest = ""
            if prot.hello.options.verify:  # debugging: the memory it resumes with
                try:
                    prot.failover_digest = prot.digest().hex()
                    digest = f"; memory xxh3-128 {prot.failover_digest}"
                except DomainError as e:
                    log.error("%s: cannot digest the backup before failover: %s", prot.label(), e)
            try:
                backup.unpause()
            except DomainError as e:
                policy.advance(prot, "resume-failed")
                log.critical("%s: FAILOVER FAILED: %s", prot.label(), e)
                raise
            prot.failed_over_wall = time.time()
            prot.detection_ms = silence * 1000
            actions = policy.advance(prot, "resumed")
            with self.lock:
                key = (prot.name, prot.uuid)
                self.failovers[key] = self.failovers.get(key, 0) + 1
            log.warning(
                "%s: FAILOVER: backup domain %s resumed from checkpoint %s (committed %.0f ms "
                "before); %s; detection took %.0f ms (failover timeout %.0f ms); the domain "
                "is now fenced on this host%s%s",
                prot.label(),
                prot.backup_domid,
                prot.last_committed,
                (time.monotonic() - (prot.committed_at or 0.0)) * 1000,
                reason,
                prot.detection_ms,
                prot.failover_timeout * 1000,
                digest,
                ""
                if prot.fencing_revision is None
                else f"; witness: owner key won, fencing revision {prot.fencing_revision}",
            )
            self._carry_out(
                prot,
                actions,
                "failed over",
                close=f"the backup of domain {prot.name} took over from checkpoint "
                f"{prot.last_committed}: do not re-protect to this receiver",
            )
        return {
            "domain": prot.name,
            "uuid": prot.uuid,
            "backup_domid": prot.backup_domid,
            "resumed_from": prot.last_committed,
            "detection_ms": round(prot.detection_ms, 1),
            "memory_digest": prot.failover_digest,
            "fencing_revision": prot.fencing_revision,
        }

    def start_monitor(self) -> None:
        monitor = threading.Thread(target=self._monitor_loop, name="failover-timer", daemon=True)
        monitor.start()
        self._monitor = monitor  # set once started: shutdown joins only started threads

    def monitor_alive(self) -> bool:
        return self._monitor is not None and self._monitor.is_alive()

    def _monitor_loop(self) -> None:
        """Never blocks on one domain: each expiry runs in a thread of its own
        (a domain's commit or failover holds its lock, and may take seconds)."""
        while not self.stopping.wait(MONITOR_PERIOD):
            with self.lock:
                prots = list(self.protections.values())
            now = time.monotonic()
            for prot in prots:
                if prot.state not in policy.FAILOVER_STATES or id(prot) in self._expiring:
                    continue
                if not prot.armed and prot.state != policy.RECEIVING:
                    continue  # its timer is off
                silence = now - prot.last_life
                if silence < prot.failover_timeout or now < prot.challenge_at:
                    continue
                self._expiring.add(id(prot))
                threading.Thread(
                    target=self._expire, args=(prot,), name=f"expire-{prot.name}", daemon=True
                ).start()

    @staticmethod
    def _input_waiting(prot: Protection) -> bool:
        """Bytes (or an EOF) wait unread on the session's connection. A peek
        (select, or the TLS buffer's count): the session thread reads them."""
        conn = prot.connection
        if conn is None or prot.state != policy.RECEIVING:
            return False
        try:
            return bool(conn.t.wait_readable(0))
        except (OSError, ValueError):  # closed meanwhile
            return False

    def _expire(self, prot: Protection) -> None:
        try:
            with prot.lock:
                silence = time.monotonic() - prot.last_life
                if prot.state not in policy.FAILOVER_STATES or silence < prot.failover_timeout:
                    return  # a sign of life, a new session or a failover came first
                if not prot.armed and prot.state != policy.RECEIVING:
                    return
                if self._input_waiting(prot):
                    # the primary sent something this receiver has not read yet
                    # (its session thread is busy): not silence, ours is the delay
                    log.debug(
                        "%s: %.0f ms since the last sign of life read, but input waits "
                        "unread on the session: no failover",
                        prot.label(),
                        silence * 1000,
                    )
                    return
                witness = self.cfg.witness is not None
                actions = policy.advance(prot, policy.silence_event(prot.state, self.cfg, witness))
                what = (
                    "link lost"
                    if prot.state == policy.LINK_LOST
                    else ("stream broken" if prot.state == policy.BROKEN else "session silent")
                )
                challenge = policy.CHALLENGE in actions
                reason = f"no checkpoint and no heartbeat for {silence * 1000:.0f} ms ({what})"
                if policy.FAILOVER in actions:
                    self.failover(prot, reason)
                # on-link-loss = wait: end the silent session, keep the backup paused
                self._carry_out(
                    prot,
                    tuple(a for a in actions if a != policy.CHALLENGE),
                    "silent",
                    close=f"nothing received for {silence * 1000:.0f} ms",
                )
            if challenge:  # the owner key first, with no lock held (docs/witness.md)
                self._challenge(prot, f"{reason}; the owner key won")
        except Exception:  # the timer must outlive any one domain's trouble
            log.exception("%s: failover timer", prot.label())
        finally:
            self._expiring.discard(id(prot))

    # ------------------------------------------------------------- control

    def find(self, ref: str) -> Protection:
        with self.lock:
            for p in self.protections.values():
                if ref in (p.name, p.uuid, str(p.backup_domid)):
                    return p
        raise RemusError(f"no protected domain {ref!r} on this receiver")

    def status(self) -> dict:
        with self.lock:
            prots = sorted(self.protections.values(), key=lambda p: p.name)
            handshaking = len(self.connections) - sum(1 for p in prots if p.connection)
        handshaking += self.pending_connections()
        return {
            "role": "receiver",
            "listen": self.listen_address,
            "hypervisor": getattr(self.hv, "kind", "?"),
            "insecure": self.cfg.insecure,
            "tls": None
            if self.tls is None
            else {
                "cert": self.tls.settings.cert,
                "ca": self.tls.settings.ca,
                "allow_peers": list(self.tls.settings.allow_peers),
                "refused": self.tls_refused,
                "loads": self.tls.source.loads,
            },
            "certificate_not_after": self.certificate_not_after(),
            "pending_dropped": self.pending_dropped,
            "removed": list(self.removed),
            "insecure_refused": self.insecure_refused,
            "policies": {
                "on_link_loss": self.cfg.on_link_loss,
                "on_violation": self.cfg.on_violation,
                "on_unprotect": self.cfg.on_unprotect,
            },
            **(
                no_witness_status()
                if self.cfg.witness is None
                else {"witness": self.cfg.witness.describe(), "split_brain_protection": True}
            ),
            "connections_in_handshake": max(0, handshaking),
            "sessions": [p.status() for p in prots],
        }

    def certificate_not_after(self) -> float | None:
        """When this receiver's own TLS certificate expires (epoch seconds), or
        None (plaintext, or unreadable); read again only after a reload."""
        tls = self.tls
        if tls is None:
            return None
        loads, value = self._own_cert
        if loads != tls.source.loads:
            try:
                value = cert_not_after(tls.settings.cert)
            except RemusError as e:
                log.warning("cannot read the expiry of this receiver's certificate: %s", e)
                value = None
            self._own_cert = (tls.source.loads, value)
        return value

    def control(self, req: dict):
        cmd = req["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "failover":
            ref = req.get("domain")
            if not isinstance(ref, str):
                raise RemusError('failover needs "domain": a name, UUID or backup domid')
            prot = self.find(ref)
            return self.manual_failover(prot)
        if cmd == "ping":
            return "pong"
        raise RemusError(f"unknown command {cmd!r} (status, failover, ping)")

    # ------------------------------------------------------------- shutdown

    def shutdown(self) -> None:
        """Stop: every open session gets ERROR shutdown; backups stay as they are
        (paused ones keep their last commit for an operator)."""
        self.stopping.set()
        with self.lock:
            conns = list(self.connections)
        for conn in conns:
            # before ACCEPT the sender expects a reply, not a frame: the
            # connection sends this ERROR only if it accepted already
            conn.close_from_daemon(ERR_SHUTDOWN, "the receiver is stopping")
        deadline = time.monotonic() + SHUTDOWN_JOIN_S
        for conn in conns:
            conn.join(max(0.0, deadline - time.monotonic()))
        monitor = self._monitor
        if monitor is not None and monitor.is_alive():  # it ends at ``stopping``
            monitor.join(max(0.0, deadline - time.monotonic()))
