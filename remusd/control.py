"""remusd's control requests: what remusctl may ask over the control socket.

Requests (JSON lines, framing in ``daemonkit.control``)::

    {"cmd": "status", "history": false?}
        -> {"daemon": "remusd", "version", "pid", "hypervisor", "uptime_s",
            "domains": [<domain status>, ...]}            (docs/operations.md)
        history true: each domain status also carries "history": {"index",
        "pause_ms", "pages", "bytes"}, the last acknowledged checkpoints
    {"cmd": "protect", "domain": "ledger" | 3, "target": "HOST:PORT" | "file:PATH",
     "interval_ms": 100?, "codec": "seed"?, "verify": false?}
        -> <domain status>  (missing options take the daemon's defaults)
    {"cmd": "unprotect", "domain": "ledger" | 3, "wait_s": 10?}
        -> <domain status>  once the clean end is done (or the timeout passed)
    {"cmd": "switchover", "domain": ..., "wait_s": 90?}
        -> <domain status>  once the switchover has its outcome (case
           fenced-backup-took-over: the backup runs the guest; unprotected:
           it failed, the guest runs here; switchover-unknown). Refused
           unless the domain is protected over TCP.
    {"cmd": "resume-here", "domain": ..., "wait_s": 10?}
        -> <domain status>  a fenced copy (or an orphan no remusd protects: log-dirty
           on, output held) runs here, unprotected: unpaused, output released,
           log-dirty off. Refused for any other domain.
    {"cmd": "destroy-stale", "domain": ..., "wait_s": 10?}
        -> <domain status>  a fenced copy is destroyed. Refused unless fenced.

Rules:
- A domain has one owner (remusd.owners): one protector per domain in this
  remusd, and across processes the domain's lock under the state directory
  plus its log-dirty state: a second ``protect`` (from any remusd) is
  refused with a message naming the owner (pid, session, target).
- At start-up (``adopt_orphans``) every record whose lock nobody holds is a
  protection a dead remusd left: its domain is adopted (remusd.protector).
- A stopped protection stays in the status for ``--keep-stopped`` seconds
  (default 600), then is dropped; a new ``protect`` of the domain replaces it
  at once.
- Errors are ``RemusError``s with a message for the operator; the control
  server turns them into ``{"ok": false, "error": ...}``.
- ``_lock`` guards the table of protectors only: no request holds it while
  it talks to a hypervisor, a socket or a protector's thread, so ``status``
  answers at once whatever a protector is doing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from daemonkit import witness
from xenbind.errors import ConfigError, DomainError, RemusError
from xenbind.hypervisor import Domain, Hypervisor
from xenbind.types import DomainInfo

from . import faults
from .config import DEFAULT_KEEP_STOPPED, ProtectRequest, Target
from .owners import OwnedElsewhere, Ownership, Store, describe_owner
from .policy import Case, Event, State
from .protector import SOFTWARE, Connector, Protector, Tuning

log = logging.getLogger(__name__)


def domain_ref(value: Any) -> int | str:
    """A domid (int, or digits) or a name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value)
    return int(text) if text.isdigit() else text


def logdirty_on(domain: Domain, info: DomainInfo) -> bool:
    """Whether the domain's log-dirty mode is on, by anyone (xenbind.sim and
    xenbind.xenctrl can tell: ``logdirty_enabled``; else the info's extra)."""
    probe = getattr(domain, "logdirty_enabled", None)
    if probe is not None:
        return bool(probe())
    return bool(info.extra.get("logdirty"))


#: what resume-here means, said with its answer
RESUME_HERE_MEANS = (
    "this copy now runs unprotected with its held output released; if the backup's "
    "copy of it runs as well, two copies serve clients: destroy one"
)


class Daemon:
    """The protectors of one remusd and the requests that drive them."""

    def __init__(self, hv: Hypervisor, args: Any, connect: Connector | None) -> None:
        """``connect``: how network links connect (remusd.cli's choice: TLS or,
        with --insecure, plaintext; None: only file targets can be protected).
        REMUSD_FAULT (remusd.faults) is read here, once."""
        self.hv = hv
        self.args = args
        self.tuning = Tuning.from_args(args, connect, wrap=faults.session_wrapper())
        self.protectors: dict[int, Protector] = {}
        self._lock = threading.Lock()
        self._pending: set[int] = set()  # domids a protect is setting up (outside _lock)
        self.started = time.monotonic()
        state_dir = getattr(args, "state_dir", None)
        #: the domains' locks and records (None: no ownership, in-process tests)
        self.store = Store(state_dir) if state_dir else None
        keep = getattr(args, "keep_stopped", None)
        self.keep_stopped = float(DEFAULT_KEEP_STOPPED if keep is None else keep)
        self.orphans_found = 0  # protections adopted from a dead remusd
        self.owner_refusals = 0  # protects refused: the domain has another owner
        #: this remusd's own certificate's expiry (unix time; read at start), None: no TLS
        self.cert_not_after: float | None = None

    # -- requests ----------------------------------------------------------------

    def handle(self, req: dict[str, Any]) -> Any:
        cmd = req["cmd"]
        if cmd == "status":
            return self.status(history=req.get("history") is True)
        if cmd == "protect":
            return self.protect(ProtectRequest.from_json(req, self.args))
        if cmd == "unprotect":
            if "domain" not in req:
                raise ConfigError("unprotect: 'domain' is required")
            timeout = req.get("wait_s", 30)
            if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
                raise ConfigError("unprotect: 'wait_s' must be a positive number of seconds")
            return self.unprotect(req["domain"], float(timeout))
        if cmd == "switchover":
            if "domain" not in req:
                raise ConfigError("switchover: 'domain' is required")
            timeout = req.get("wait_s", 90)
            if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
                raise ConfigError("switchover: 'wait_s' must be a positive number of seconds")
            return self.switchover(req["domain"], float(timeout))
        if cmd in ("resume-here", "destroy-stale"):
            if "domain" not in req:
                raise ConfigError(f"{cmd}: 'domain' is required")
            timeout = req.get("wait_s", 30)
            if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
                raise ConfigError(f"{cmd}: 'wait_s' must be a positive number of seconds")
            if cmd == "resume-here":
                return self.resume_here(req["domain"], float(timeout))
            return self.destroy_stale(req["domain"], float(timeout))
        raise ConfigError(
            f"unknown command {cmd!r} (status, protect, unprotect, switchover, resume-here, "
            "destroy-stale)"
        )

    def _prune(self) -> None:
        """Drop protections stopped more than keep_stopped seconds ago (under _lock)."""
        now = time.monotonic()
        for domid, p in list(self.protectors.items()):
            if not p.alive and p.ended_at is not None and now - p.ended_at > self.keep_stopped:
                del self.protectors[domid]

    def status(self, history: bool = False) -> dict[str, Any]:
        with self._lock:
            self._prune()
            prots = sorted(self.protectors.values(), key=lambda p: p.info.domid)
        return {
            "daemon": "remusd",
            "version": SOFTWARE.split()[1],
            "pid": os.getpid(),
            "hypervisor": getattr(self.hv, "kind", "?"),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "state_dir": None if self.store is None else self.store.dir,
            "orphans_found": self.orphans_found,
            "owner_refusals": self.owner_refusals,
            "cert_not_after": None if self.cert_not_after is None else round(self.cert_not_after),
            **self._witness_status(),
            "domains": [p.status(history) for p in prots],
        }

    def _witness_status(self) -> dict[str, Any]:
        """The daemon-wide witness (docs/witness.md), or that there is none."""
        wcfg = self.tuning.witness
        if wcfg is None:
            return witness.no_witness_status()
        return {"witness": wcfg.describe(), "split_brain_protection": True}

    def protectors_now(self) -> list[Protector]:
        with self._lock:
            self._prune()
            return sorted(self.protectors.values(), key=lambda p: p.info.domid)

    def _own(self, domain: Domain, info: DomainInfo) -> Ownership | None:
        """Take the domain's lock and check nobody else tracks it (no _lock held)."""
        owner: Ownership | None = None
        if self.store is not None:
            try:
                owner = self.store.acquire(info.uuid)
            except OwnedElsewhere as e:
                with self._lock:
                    self.owner_refusals += 1
                who = describe_owner(e.record)
                log.error(
                    "protect of domain %s refused: TWO OWNERS: it is already protected by %s",
                    info.name,
                    who,
                )
                raise RemusError(
                    f"domain {info.name} ({info.domid}) is already protected by {who}: a "
                    "domain has one owner; unprotect it there first"
                ) from None
            except OSError as e:
                raise RemusError(
                    f"cannot take the lock of domain {info.name} in {self.store.dir}: {e}"
                ) from None
        try:
            if logdirty_on(domain, info):
                with self._lock:
                    self.owner_refusals += 1
                log.error(
                    "protect of domain %s refused: TWO OWNERS: its log-dirty mode is already "
                    "on (another process tracks its memory)",
                    info.name,
                )
                raise RemusError(
                    f"domain {info.name} ({info.domid}) already has log-dirty mode on: another "
                    "process tracks its memory (a remusd with another state directory or on "
                    "another host's view, a live migration, xl remus), and two trackers each "
                    "steal part of the other's dirty log; stop that one first. If none runs "
                    "(a dead tracker's leftover), `remusctl resume-here "
                    f"{info.name}` takes the domain back"
                )
        except BaseException:
            if owner is not None:
                owner.release(remove_record=False)
            raise
        return owner

    def protect(self, req: ProtectRequest) -> dict[str, Any]:
        if req.target.kind == "tcp" and self.tuning.connect is None:
            raise ConfigError(
                "a network target needs TLS (remusd --tls-cert, --tls-key, "
                "--tls-ca) or, for a plaintext link, remusd --insecure"
            )
        domain = self.hv.lookup(domain_ref(req.domain))
        info = domain.info()
        with self._lock:
            old = self.protectors.get(info.domid)
            if old is not None and old.alive:
                raise RemusError(self._busy(old))
            if info.domid in self._pending:
                raise RemusError(f"domain {info.name} ({info.domid}): a protect is under way")
            self._pending.add(info.domid)
        try:
            owner = self._own(domain, info)  # file locks and a hypervisor probe: no _lock
            ack_ms = 0 if old is None else old.stats.ack_ms()
            p = Protector(domain, info, req, self.tuning, owner=owner, ack_ms=ack_ms)
            with self._lock:
                self.protectors[info.domid] = p
        finally:
            with self._lock:
                self._pending.discard(info.domid)
        log.info(
            "protecting domain %s (%d) to %s every %d ms, codec %s%s",
            info.name,
            info.domid,
            req.target,
            req.interval_ms,
            req.codec,
            ", verify" if req.verify else "",
        )
        p.start()
        return p.status()

    def is_protected(self, ref: Any) -> bool:
        """Whether a live protector of this remusd has the domain."""
        try:
            return self._find(ref).alive
        except DomainError:
            return False

    @staticmethod
    def _busy(old: Protector) -> str:
        what = (
            f"domain {old.info.name} ({old.info.domid}) is already protected by this remusd "
            f"(pid {os.getpid()}) to {old.req.target} (state {old.state}, case {old.case})"
        )
        if old.policy.state is State.FENCED:
            return (
                f"{what}: its backup took over; `remusctl destroy-stale {old.info.name}` "
                f"destroys this stale copy, `remusctl resume-here {old.info.name}` runs it "
                "here instead"
            )
        return f"{what}; unprotect it first"

    def _find(self, ref: Any, op: str = "unprotect") -> Protector:
        r = domain_ref(ref)
        with self._lock:
            for p in self.protectors.values():
                if r == p.info.domid or r == p.info.name or r == p.info.uuid:
                    return p
        raise DomainError(r, op, "not protected by this remusd")

    def _decide(self, p: Protector, event: Event, timeout: float) -> dict[str, Any]:
        p.decide(event)
        if not p.join(timeout):
            raise RemusError(
                f"domain {p.info.name}: {event.value} did not finish within {timeout} s "
                f"(state {p.state})"
            )
        return p.status()

    def resume_here(self, ref: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Run a fenced or orphaned copy here, unprotected (see the module docstring)."""
        try:
            p: Protector | None = self._find(ref, "resume-here")
        except DomainError:
            p = None
        if p is not None and p.alive:
            if p.policy.state is not State.FENCED:
                raise RemusError(
                    f"domain {p.info.name} is {p.state} (case {p.case}): resume-here is for a "
                    "fenced copy or an orphan no remusd protects; to end its protection, "
                    "use unprotect"
                )
            d = self._decide(p, Event.RESUME_HERE, timeout)
            return d | {"meaning": RESUME_HERE_MEANS}
        domain = self.hv.lookup(domain_ref(ref))
        info = domain.info()
        if self.store is None:
            raise RemusError("resume-here of an unprotected domain needs a state directory")
        try:
            owner = self.store.acquire(info.uuid)
        except OwnedElsewhere as e:
            raise RemusError(
                f"domain {info.name} is protected by {describe_owner(e.record)}: "
                "resume-here is for a copy nobody protects"
            ) from None
        held = getattr(domain, "checkpoint_held", lambda: None)()
        if not logdirty_on(domain, info) and held is None:
            owner.release(remove_record=False)
            raise RemusError(
                f"domain {info.name} is neither fenced nor orphaned (it runs, log-dirty off, "
                "no remusd protects it): nothing to resume"
            )
        rec = self.store.read_record(info.uuid) or {}
        req = ProtectRequest(
            info.name,
            Target.parse(str(rec.get("target") or "file:/nonexistent")),
            int(rec.get("interval_ms") or self.args.interval),
            str(rec.get("codec") or self.args.codec),
        )
        adopt = {
            **rec,
            "state": State.FENCED.value,
            "held": held,
            "case": Case.FENCED_POSSIBLE_SPLIT_BRAIN.value,
            "reason": "orphan: log-dirty on or stopped, no remusd protects it",
        }
        p = Protector(domain, info, req, self.tuning, owner=owner, adopt=adopt)
        with self._lock:
            self.protectors[info.domid] = p
        p.start()
        d = self._decide(p, Event.RESUME_HERE, timeout)
        return d | {"meaning": RESUME_HERE_MEANS}

    def destroy_stale(self, ref: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Destroy a fenced copy (its backup took over)."""
        p = self._find(ref, "destroy-stale")
        if not p.alive or p.policy.state is not State.FENCED:
            raise RemusError(
                f"domain {p.info.name} is {p.state} (case {p.case}): destroy-stale destroys "
                "only a fenced copy (its backup took over)"
            )
        return self._decide(p, Event.DESTROY_STALE, timeout)

    # -- start-up ----------------------------------------------------------------

    def adopt_orphans(self) -> int:
        """Adopt every protection a dead remusd left (remusd.owners); how many."""
        if self.store is None:
            return 0
        n = 0
        for uuid, rec in self.store.records():
            if rec is None:
                log.warning("state directory %s: unreadable record for %s", self.store.dir, uuid)
                continue
            try:
                owner = self.store.acquire(uuid)
            except OwnedElsewhere as e:
                log.info(
                    "domain %s is protected by %s", rec.get("name", uuid), describe_owner(e.record)
                )
                continue
            except OSError as e:
                log.error("cannot take the lock of domain %s: %s", uuid, e)
                continue
            try:
                n += self._adopt(uuid, rec, owner)
            except (RemusError, ValueError, TypeError, KeyError) as e:
                log.error("cannot adopt domain %s (%s): %s", rec.get("name", "?"), uuid, e)
                owner.release(remove_record=False)
        with self._lock:
            self.orphans_found += n
        return n

    def _adopt(self, uuid: str, rec: dict[str, Any], owner: Ownership) -> int:
        name = str(rec.get("name") or uuid)
        try:
            domain = self.hv.lookup(uuid)
        except DomainError:
            log.warning(
                "domain %s (%s), protected by remusd pid %s, is gone; its record is removed",
                name,
                uuid,
                rec.get("pid", "?"),
            )
            owner.release(remove_record=True)
            return 0
        info = domain.info()
        if rec.get("state") == State.STOPPED.value:
            owner.release(remove_record=True)
            return 0
        req = ProtectRequest(
            info.name,
            Target.parse(str(rec["target"])),
            int(rec["interval_ms"]),
            str(rec["codec"]),
            bool(rec.get("verify", False)),
        )
        if (
            req.target.kind == "tcp"
            and self.tuning.connect is None
            and rec.get("state") != "fenced"
        ):
            raise RemusError(
                f"its target {req.target} needs TLS or --insecure, which this remusd lacks"
            )
        p = Protector(domain, info, req, self.tuning, owner=owner, adopt=rec)
        with self._lock:
            self.protectors[info.domid] = p
        p.start()
        return 1

    def switchover(self, ref: Any, timeout: float = 90.0) -> dict[str, Any]:
        """Move a protected domain to its backup (remusd.protector, "a switchover")."""
        p = self._find(ref, "switchover")
        if not p.alive or p.policy.state is not State.PROTECTED:
            raise RemusError(
                f"domain {p.info.name} is {p.state} (case {p.case}): only a protected domain "
                "can switch over"
            )
        if p.req.target.kind != "tcp":
            raise RemusError(
                f"domain {p.info.name} is protected to {p.req.target}: a switchover needs a "
                "receiver, not a file"
            )
        if not p.peer_switchover:
            raise RemusError(
                f"domain {p.info.name}: the receiver at {p.req.target} does not announce "
                "switchover in its ACCEPT (an older release): upgrade it first; nothing changed"
            )
        log.info("domain %s: switchover to %s asked", p.info.name, p.req.target)
        p.switchover()
        if not p.switch_done.wait(timeout):  # set once it has an outcome, or never began
            raise RemusError(
                f"domain {p.info.name}: the switchover has no outcome after {timeout:g} s "
                f"(state {p.state}); see remusctl status"
            )
        deadline = time.monotonic() + 5.0  # a lost link's move follows the outcome closely
        while p.policy.state is State.PROTECTED and time.monotonic() < deadline:
            time.sleep(0.01)
        return p.status()

    def unprotect(self, ref: Any, timeout: float = 30.0) -> dict[str, Any]:
        p = self._find(ref)
        p.stop()
        if not p.join(timeout):
            raise RemusError(
                f"domain {p.info.name}: the clean end did not finish within "
                f"{timeout} s (state {p.state})"
            )
        return p.status()

    # -- life cycle --------------------------------------------------------------

    def stop_all(self, timeout: float) -> None:
        with self._lock:
            prots = list(self.protectors.values())
        for p in prots:
            p.stop(shutdown=True)
        deadline = time.monotonic() + timeout
        for p in prots:
            if not p.join(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "domain %s: clean end unfinished at shutdown (state %s)", p.info.name, p.state
                )

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            for p in self.protectors.values():
                out[p.state] = out.get(p.state, 0) + 1
        return out
