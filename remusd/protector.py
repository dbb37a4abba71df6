"""One protected domain: the thread that drives its sessions to the backup.

The thread carries out what three state machines decide, and does the I/O
they must not:

    remusd.policy  RetryPolicy: the domain's state (initial-copy, protected,
                   unprotected, fenced, stopped), the backoff, when to retry;
                   every state change here is ``RetryPolicy.advance``
    remusd.core    EpochCore: per session, the checkpoint in flight, the
                   acknowledged index, the output release owed;
                   Heartbeats: when a heartbeat is due (remusd.pacer sends it)
    remusd.stats   DomainStats: the counters ``remusctl status`` shows

One session (``_session``)::

    make the link (``Tuning.wrap`` may wrap it and the domain), open it
    initial copy (remusd.initial_copy) -> checkpoint 0 -> its ACK -> release
    epochs, each: sleep until the interval starts (polling the link)
                  capture (paused: remusd.epoch) -> encode (running)
                  send -> wait for its ACK -> output_release()

Rules:
- The guest's output is released only after the ACK of the checkpoint that
  holds it (one ``output_release`` per acknowledged checkpoint, in order:
  EpochCore refuses anything else); when the session is lost,
  ``output_unplug`` releases everything at once: the guest runs unprotected
  rather than stalls.
- The guest is never left paused: every pause is paired with an unpause in
  ``epoch.capture``; only a fence (the backup runs the guest) pauses it for
  good.
- A clean end (unprotect, daemon stop) sends one last checkpoint carrying
  LAST_CHECKPOINT, waits for its ACK, then unplugs and closes: the backup does
  not fail over.
- ``_lock`` guards the status (``stats``) only, and is never held across I/O:
  ``status()`` answers at once whatever the session thread is doing.
- The protector owns its domain (remusd.owners): it holds the domain's lock
  for its whole life and keeps the domain's record current (written before
  the session engages the guest, and after every state change), so a remusd
  restarted after a crash knows what its predecessor left (an *orphan*). The
  record goes when the protection ends, except that of a fenced copy left
  paused by a daemon stop (the next remusd reports it fenced again).
- Adopted (an orphan, ``adopt``): the guest may be stopped mid-checkpoint
  and its output held behind the dead session's barriers. Nothing is undone
  before the receiver answers: accepted, the stop is undone and log-dirty
  taken over (RECOVER), and the first ACK releases the dead session's
  barriers with its own (checkpoint 0 holds everything before its pause);
  fenced, the stopped copy is the fence; unreachable, it is unprotected as
  any lost session (the guest runs, its output released).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemonkit.transport import Transport
from daemonkit.witness import (
    ClaimRefused,
    LeaseLost,
    OwnerKey,
    WitnessConfig,
    WitnessError,
    WitnessUnreachable,
    no_witness_status,
    promise_until,
    release_allowed,
)
from xenbind import session as sp
from xenbind.errors import DomainError
from xenbind.hypervisor import Domain
from xenbind.stream.encoder import StreamWriter
from xenbind.types import DomainConfig, DomainInfo

from .config import ProtectRequest
from .core import AckViolation, EpochCore, Heartbeats, next_epoch
from .diskmirror import DiskSetupError, SessionDisks
from .epoch import Capture, CheckpointBuffer, capture, encode
from .initial_copy import initial_copy
from .link import Link, LinkDown, Refused, SessionWrap, make_link
from .owners import Ownership
from .pacer import Pacer
from .policy import Action, Case, Event, RetryPolicy, State, Step, case_of
from .stats import HISTORY, DomainStats, Identity
from .wire import OFF as WIRE_OFF
from .wire import WireMode

log = logging.getLogger(__name__)

SOFTWARE = "remusd 0.1.0"

STATES = tuple(s.value for s in State)

#: whether xenbind.session's HELLO carries the sender's ACK time (issue 12,
#: defect 4: ``Options.ack_ms``); remusd fills it when it is there
HELLO_HAS_ACK_MS = "ack_ms" in {f.name for f in dataclasses.fields(sp.Options)}

__all__ = ["HISTORY", "SOFTWARE", "STATES", "Protector", "Tuning"]

#: how a network link connects: ``connect(host, port, timeout)``
Connector = Callable[[str, int, float], Transport]

#: seconds between the witness watchdog's checks (the margin covers it)
WITNESS_WATCH_S = 0.02
#: the longest a wait of the session thread goes without looking at the witness
WITNESS_POLL_S = 0.05
#: how long a switchover waits, after its last checkpoint's ACK, for the
#: receiver's verdict (with a witness it claims the key for up to TTL + 1 s)
SWITCHOVER_VERDICT_S = 60.0


@dataclass(frozen=True)
class Tuning:
    """The daemon-wide knobs a protector reads (from remusd's configuration)."""

    ack_timeout: float
    connect_timeout: float
    accept_timeout: float
    prescan: bool
    retry_min: float
    retry_max: float
    precopy_rounds: int
    precopy_threshold: int
    buffer_pages: int
    cache_pages: int
    #: how a network link connects: TLS or plaintext (None: file targets only)
    connect: Connector | None = None
    #: a hook that may wrap each session's link and domain (None: none)
    wrap: SessionWrap | None = None
    #: the witness (docs/witness.md), None: no split-brain protection
    witness: WitnessConfig | None = None
    #: the wire compression network sessions offer (remusd.wire)
    wire: WireMode = WIRE_OFF

    @classmethod
    def from_args(
        cls, args: Any, connect: Connector | None, wrap: SessionWrap | None = None
    ) -> Tuning:
        return cls(
            ack_timeout=float(args.ack_timeout),
            connect_timeout=float(args.connect_timeout),
            accept_timeout=float(args.accept_timeout),
            prescan=bool(args.prescan),
            retry_min=float(args.retry_min),
            retry_max=float(args.retry_max),
            precopy_rounds=int(args.precopy_rounds),
            precopy_threshold=int(args.precopy_threshold),
            buffer_pages=int(args.buffer_pages),
            cache_pages=int(args.cache_pages),
            connect=connect,
            wrap=wrap,
            witness=getattr(args, "witness_config", None),
            wire=getattr(args, "wire_compression", WIRE_OFF),
        )


def _held_now(domain: Domain) -> str | None:
    """How the guest is stopped right now ("paused", "suspended", None), where
    the hypervisor layer can tell (xenbind.sim, xenbind.xenctrl)."""
    probe = getattr(domain, "checkpoint_held", None)
    if probe is None:
        return None
    held = probe()
    return held if held in ("paused", "suspended") else None


def _run_held(domain: Domain, how: str | None) -> None:
    """Run a guest held ``how``: "paused" (unpause) or "suspended" (resume it,
    cancelled, where the hypervisor layer can); None: it runs already."""
    if how == "suspended":
        resume = getattr(domain, "resume_cancelled", None)
        if resume is not None:
            resume()
    elif how == "paused":
        domain.unpause()


class Protector:
    """The session thread of one domain.

    ``owner``: the domain's lock, held (remusd.owners; None in tests);
    ``adopt``: the record of a remusd that died protecting the domain;
    ``ack_ms``: the median ACK wait of the domain's last session, if known.
    """

    def __init__(
        self,
        domain: Domain,
        info: DomainInfo,
        req: ProtectRequest,
        tuning: Tuning,
        *,
        owner: Ownership | None = None,
        adopt: dict[str, Any] | None = None,
        ack_ms: int = 0,
    ) -> None:
        self.domain = domain
        self.info = info
        self.req = req
        self.tuning = tuning
        self.owner = owner
        self._lock = threading.Lock()  # guards stats; never held across I/O
        self._stop = threading.Event()  # asked to end (clean)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"protect-{info.name}", daemon=True)
        gen = adopt.get("generation") if adopt else None
        # the same protection keeps its generation: its HELLO supersedes the dead session
        self.generation = gen if isinstance(gen, int) and gen > 0 else time.time_ns()
        self.policy = RetryPolicy(tuning.retry_min, tuning.retry_max)
        self.stats = DomainStats(state=self.policy.state.value, since=time.time())
        self.stats.prev_ack_ms = max(0, int(ack_ms))
        self._ident = Identity(
            info.domid, info.name, str(req.target), req.codec, req.interval_ms, req.verify
        )
        self._engaged = False  # log-dirty on / output plugged by the current session
        self.started = time.time()
        #: how this protector holds the guest stopped: None; "paused"/"suspended"
        #: (a fence); "stale-paused"/"stale-suspended" (a dead owner's checkpoint stop)
        self._held: str | None = None
        self._stale_barriers = 0  # output barriers a dead owner left unreleased
        self._adopt = adopt
        self._decision: Event | None = None  # RESUME_HERE / DESTROY_STALE, asked of a fence
        self._switching = False  # a switchover is asked: the next checkpoint is the last
        self._stop_for_switch = False  # _stop was set by switchover(), not by stop()
        self.peer_switchover = False  # the current session's receiver can switch over
        self._switch_step: Step | None = None  # its outcome, for the thread's loop
        self.switch_done = threading.Event()  # set once a switchover asked has an outcome
        self._shutdown = False  # the daemon stops (a fenced copy keeps its record)
        self.ended_at: float | None = None  # monotonic: when the thread ended
        self._action_error: str | None = None  # an operator's decision that failed
        self._fenced_record: dict[str, Any] | None = None  # kept by a daemon stop
        # the witness (docs/witness.md, "The contract"); all None/False without one
        self.wcfg = tuning.witness
        self.wkey: OwnerKey | None = None  # our claim of the owner key (the last one)
        self._wrev: int | None = None  # its fencing revision
        #: the witness gate: output releases and the witness pause, never across etcd I/O
        self._wlock = threading.Lock()
        self._promise: float | None = None  # the backup will not resume before this (its ACK)
        self._sent_at = 0.0  # monotonic, read before the first byte of the checkpoint in flight
        self._lease_proof = True  # the receiver fails over only under the key (its ACCEPT)
        self._wpaused = False  # the guest is paused for the witness (one pause count of ours)
        self._guarding = False  # a claim was made: the watchdog watches this guest
        self._wstop = threading.Event()  # ends the renewal and watchdog threads
        self._wthreads: list[threading.Thread] = []
        #: the current session's disks (remusd.diskmirror), for status; None: none
        self._disks: SessionDisks | None = None
        #: the current (or last) session's link, for its wire compression status
        self._link: Link | None = None

    # -- control -----------------------------------------------------------------

    def start(self) -> Protector:
        if self._adopt is not None:
            self._take_over(self._adopt)
        self._write_record()
        self._thread.start()
        return self

    def _take_over(self, rec: dict[str, Any]) -> None:
        """Adopt a dead owner's protection (see the module docstring)."""
        with self._lock:
            self.stats.adopted = True
            ack = rec.get("ack_ms")
            if isinstance(ack, int) and ack > 0:
                self.stats.prev_ack_ms = ack
        if rec.get("state") == State.FENCED.value:
            held = rec.get("held")
            self._held = held if held in ("paused", "suspended") else _held_now(self.domain)
            try:
                fenced_case: Case | None = Case(rec.get("case"))
            except ValueError:
                fenced_case = None
            self._advance(
                Event.ADOPTED_FENCED,
                f"adopted from remusd pid {rec.get('pid', '?')}: {rec.get('reason') or 'fenced'}",
                fenced_case=fenced_case,
            )
            return
        logdirty = getattr(self.domain, "logdirty_enabled", None)
        self._engaged = bool(rec.get("engaged")) or bool(logdirty and logdirty())
        held = _held_now(self.domain) if self._engaged else None
        if held is not None:
            self._held = f"stale-{held}"
        barriers = getattr(self.domain, "output_barriers", None)
        self._stale_barriers = int(barriers()) if barriers is not None and self._engaged else 0
        log.warning(
            "domain %s: ORPHAN found: remusd pid %s died protecting it (state %s%s%s); "
            "reconnecting to %s with its generation, output held",
            self.info.name,
            rec.get("pid", "?"),
            rec.get("state", "?"),
            f", guest left {held} mid-checkpoint" if held else "",
            f", {self._stale_barriers} checkpoint(s) of output unreleased"
            if self._stale_barriers
            else "",
            self.req.target,
        )
        self._advance(Event.ADOPTED, f"orphan of remusd pid {rec.get('pid', '?')}: reconnecting")

    def record(self) -> dict[str, Any]:
        """What remusd.owners keeps of this protection."""
        with self._lock:
            st = self.stats
            rec = {
                "uuid": self.info.uuid,
                "domid": self.info.domid,
                "name": self.info.name,
                "target": str(self.req.target),
                "interval_ms": self.req.interval_ms,
                "codec": self.req.codec,
                "verify": self.req.verify,
                "generation": self.generation,
                "pid": os.getpid(),
                "session": st.session_id,
                "state": st.state,
                "case": st.case,
                "reason": st.reason,
                "ack_ms": st.ack_ms(),
                "started": round(self.started, 3),
                "updated": round(time.time(), 3),
            }
        rec["engaged"] = self._engaged
        rec["held"] = self._held
        return rec

    def _write_record(self) -> None:
        if self.owner is not None:
            self.owner.write(self.record())

    def stop(self, *, shutdown: bool = False) -> None:
        """Ask for a clean end (LAST_CHECKPOINT); returns at once.
        ``shutdown``: the daemon stops (a fenced copy keeps its record)."""
        self._shutdown = self._shutdown or shutdown
        self._stop_for_switch = False  # this stop is the thread's end, not a switchover's
        self._stop.set()
        self._wake.set()

    def switchover(self) -> None:
        """Ask for a switchover (docs/protocol.md): the next checkpoint is the
        last, the guest stays stopped at it and the backup resumes from it;
        returns at once (``switch_done`` is set once it has an outcome). The
        caller checked the state (protected, over TCP)."""
        self.switch_done.clear()
        self._switching = True
        self.stop()
        self._stop_for_switch = True  # the stop wakes the epoch loop for the last checkpoint

    def decide(self, event: Event) -> None:
        """An operator's decision on a fenced copy (RESUME_HERE, DESTROY_STALE);
        the caller checked the state; carried out by the parked thread."""
        self._decision = event
        self.stop()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def state(self) -> str:
        with self._lock:
            return self.stats.state

    @property
    def reason(self) -> str | None:
        with self._lock:
            return self.stats.reason

    @property
    def case(self) -> str:
        with self._lock:
            return self.stats.case

    def status(self, history: bool = False) -> dict[str, Any]:
        """The domain's status (docs/operations.md); ``history``: add the
        figures of the last HISTORY acknowledged checkpoints, oldest first."""
        now, mono = time.time(), time.monotonic()
        with self._lock:
            d = self.stats.as_json(self._ident, history, now=now, mono=mono)
        d["uuid"] = self.info.uuid
        d["generation"] = self.generation
        disks = self._disks
        if disks is not None:
            d["disks"] = disks.status()
        link = self._link
        d["wire_compression"] = str(self.tuning.wire)
        d["wire"] = None if link is None else link.wire_status()
        d.update(self.witness_status(mono))
        return d

    def witness_status(self, mono: float) -> dict[str, Any]:
        """``split_brain_protection`` and the ``witness`` block (docs/witness.md)."""
        if self.wcfg is None:
            return no_witness_status()
        key = self.wkey
        w: dict[str, Any] = {"key": self.wcfg.owner_key(self.info.uuid), "lease": "none"}
        if key is not None:
            w.update(key.status())
            w.pop("witness", None)
            w.pop("split_brain_protection", None)
        promise = self._promise
        w["promise_for_s"] = None if promise is None else round(max(0.0, promise - mono), 3)
        w["paused"] = self._wpaused
        w["backup_has_witness"] = self._lease_proof
        if not self._lease_proof:
            w["note"] = "backup has no witness: only its ACKs' promise proves it will not resume"
        return {"split_brain_protection": True, "witness": w}

    def metrics_view(self) -> tuple[dict[str, Any], DomainStats]:
        """The status and the stats object (its histograms) for a scrape."""
        return self.status(), self.stats

    # -- the state machine's actions ---------------------------------------------

    def _advance(
        self,
        event: Event,
        reason: str | None = None,
        *,
        cause: str = "",
        failover_timeout_ms: int | None = None,
        fenced_case: Case | None = None,
    ) -> Step:
        """The one way the state changes: the policy's move, its actions on the
        domain, then the new state in the status."""
        before, engaged = self.policy.state, self._engaged
        step = self.policy.advance(event, failover_timeout_ms=failover_timeout_ms)
        for action in step.actions:
            if action is Action.UNPROTECT:
                self._unprotect()
            elif action is Action.FENCE:
                self._fence(cause)
            elif action is Action.COUNT_RETRY:
                with self._lock:
                    self.stats.retries += 1
            elif action is Action.RECOVER:
                self._recover()
            elif action is Action.RESUME:
                self._resume_here()
            elif action is Action.DESTROY:
                self._destroy()
            elif action is Action.WITHHOLD:
                self._withhold()
            elif action is Action.WITNESS_RESUME:
                self._witness_resume()
        case = case_of(before, event, step, engaged=engaged, fenced_case=fenced_case)
        with self._lock:
            self.stats.set_state(step.state.value, reason, time.time())
            self.stats.case = case.value
        self._write_record()
        return step

    def _undo_stale_stop(self) -> None:
        """Run the guest a dead owner left stopped mid-checkpoint."""
        held, self._held = self._held, None
        try:
            if held in ("stale-paused", "stale-suspended"):
                _run_held(self.domain, held[len("stale-") :])
        except DomainError as e:
            log.warning("domain %s: %s", self.info.name, e)
        else:
            if held is not None:
                log.warning(
                    "domain %s: the guest left %s mid-checkpoint by the dead remusd runs again",
                    self.info.name,
                    held[len("stale-") :],
                )

    def _recover(self) -> None:
        """Adopted and accepted: undo the dead owner's stop, take its log-dirty over."""
        self._undo_stale_stop()
        logdirty = getattr(self.domain, "logdirty_enabled", None)
        try:
            if logdirty is not None and logdirty():
                # ours (the record and the lock say so): off, so the initial copy
                # turns it on afresh, not by an OFF/ON behind another tracker's back
                self.domain.disable_logdirty()
        except DomainError as e:
            log.warning("domain %s: %s", self.info.name, e)

    def _unprotect(self) -> None:
        """The guest runs on with its output released (no backup to wait for)."""
        self._undo_stale_stop()
        self._stale_barriers = 0
        if not self._engaged:
            return  # this session never touched the domain (e.g. connect refused)
        self._engaged = False
        for op in (self.domain.output_unplug, self.domain.disable_logdirty):
            try:
                op()
            except DomainError as e:
                log.warning("domain %s: %s", self.info.name, e)

    def _fence(self, cause: str) -> None:
        """The receiver says its backup of this domain runs (it failed over).

        On an engaged session (ERROR failed-over: the backup resumed from a
        checkpoint of this very session), the guest here is the stale copy:
        it is paused and its buffered output is kept back (never released),
        so the outside world sees one guest only. When the refusal comes on a
        reconnection (the guest already ran unprotected here), both copies
        may have run: a split brain an operator must resolve. Not retried.
        """
        with self._lock:
            self.stats.fences += 1
        self._guarding = False  # the key is the backup's now: nothing of ours to renew
        self._wstop.set()
        with self._wlock:
            witness_paused, self._wpaused = self._wpaused, False
        if witness_paused:
            self._held = "paused"  # the witness pause is the fence's now
            log.critical(
                "domain %s FENCED: %s; the backup won the owner key and runs the guest: "
                "this copy was paused for the witness before that, its output withheld "
                "(destroy it here, then protect the guest from the backup host)",
                self.info.name,
                cause,
            )
        elif self._engaged:
            self._engaged = False
            ops = [self.domain.disable_logdirty]
            if self._held in ("stale-paused", "stale-suspended"):
                self._held = self._held[len("stale-") :]  # the dead owner's stop is the fence
            else:
                ops.insert(0, self.domain.pause)
                self._held = "paused"
            for op in ops:
                try:
                    op()
                except DomainError as err:
                    log.warning("domain %s: %s", self.info.name, err)
            log.critical(
                "domain %s FENCED: %s; the backup runs the guest now: this copy is "
                "paused and its unacknowledged output withheld (destroy it here, "
                "then protect the guest from the backup host)",
                self.info.name,
                cause,
            )
        else:
            log.critical(
                "domain %s FENCED: %s; this copy ran unprotected meanwhile: possible "
                "SPLIT BRAIN, an operator must decide which copy lives; not retrying",
                self.info.name,
                cause,
            )

    def _resume_here(self) -> None:
        """The operator chose this (fenced) copy: it runs unprotected."""
        held, self._held = self._held, None
        ops: list[tuple[str, Callable[[], None]]] = []
        if held is not None:
            how = held.removeprefix("stale-")
            ops.append(("run the guest", lambda: _run_held(self.domain, how)))
        ops.append(("release output", self.domain.output_unplug))
        logdirty = getattr(self.domain, "logdirty_enabled", None)
        if logdirty is None or logdirty():
            ops.append(("log-dirty off", self.domain.disable_logdirty))
        for what, op in ops:
            try:
                op()
            except DomainError as e:
                log.warning("domain %s: resume-here: %s: %s", self.info.name, what, e)
        log.critical(
            "domain %s RESUMED HERE by the operator: this copy runs unprotected and its held "
            "output is released; if the backup's copy runs too, two copies serve clients: "
            "destroy one (on the backup host: xl destroy, or the receiver's failed-over domain)",
            self.info.name,
        )

    def _destroy(self) -> None:
        """The operator destroyed this stale (fenced) copy."""
        try:
            self.domain.destroy()
        except DomainError as e:
            log.error(
                "domain %s: destroy-stale: %s (the stale copy is still here)", self.info.name, e
            )
            self._action_error = f"destroy failed: {e}; the stale copy is still here, paused"
            return
        self._held = None
        log.warning(
            "domain %s: the stale copy on this host was destroyed (destroy-stale); the "
            "backup's copy is the guest now",
            self.info.name,
        )

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.policy.state is State.FENCED:  # adopted fenced: wait for a decision
                self._park()
                return
            while True:
                step = self._attempt()
                if step is not None and step.state is State.PAUSED_NO_WITNESS:
                    step = self._paused_for_witness()
                if step is None:
                    return
                if Action.PARK in step.actions:
                    self._park()
                    return
                assert step.wait is not None
                if self._wait(step.wait):
                    self._stopped()
                    return
                if self._wpaused:  # the lease ran out meanwhile: the guest is paused
                    continue  # _attempt makes it witness-lost
                self._advance(Event.RETRY, self.reason)
        finally:
            self.ended_at = time.monotonic()
            self._witness_end()
            if self.owner is not None:
                # a fenced copy left paused by a daemon stop keeps its record
                keep = self._fenced_record is not None and self.case == Case.STOPPED_FENCED.value
                if keep and self._fenced_record is not None:
                    self.owner.write(self._fenced_record)
                self.owner.release(remove_record=not keep)

    def _park(self) -> None:
        """Wait for a stop or, fenced, an operator's decision."""
        self._stop.wait()
        decision = self._decision
        if decision is not None and self.policy.state is State.FENCED:
            what = "resumed here" if decision is Event.RESUME_HERE else "stale copy destroyed"
            self._advance(decision, f"{what} by the operator (was: {self.reason})")
            if self._action_error:
                with self._lock:
                    self.stats.set_state(self.stats.state, self._action_error, time.time())
            return
        self._stopped()

    def _wait(self, seconds: float) -> bool:
        """Wait ``seconds`` or until asked to stop (True) or paused for the witness."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._wpaused:
                return self._stop.is_set()
            if self._stop.wait(min(left, WITNESS_POLL_S) if self.wcfg else left):
                return True

    def _stopped(self) -> None:
        if self.policy.state is State.PAUSED_NO_WITNESS:
            self._advance(
                Event.STOP,
                f"stopped while paused for the witness (the guest stays paused): {self.reason}",
            )
            return
        if self.policy.state is State.FENCED:
            if self._shutdown:  # what the next remusd must find: still fenced
                self._fenced_record = self.record()
            self._advance(Event.STOP, f"fenced: {self.reason}")
        else:
            self._advance(Event.STOP, "unprotected on request")

    def _attempt(self) -> Step | None:
        """One session and what the policy makes of its end; None: the thread ends."""
        if self._stop.is_set():
            self._stopped()
            return None
        if self._witness_blocks():
            return self._witness_lost("")
        try:
            try:
                self._session()
            finally:
                self._switch_abandoned()
            step, self._switch_step = self._switch_step, None
            return step  # a switchover's outcome (fenced: park; failed: retry), else None
        except LinkDown as e:
            if not e.fenced and self._witness_blocks():
                return self._witness_lost(e.reason)
            if e.fenced:
                why = "this copy paused" if self._engaged else "possible split brain"
                return self._advance(
                    Event.FENCED, f"{e.reason} ({why}; not retrying)", cause=e.reason
                )
            if e.permanent:
                if isinstance(e, Refused) and e.code == "limit":
                    log.error(
                        "domain %s NOT PROTECTED: the receiver at %s refuses this session's "
                        "limits: %s; not retrying (change the interval or the sizes on this "
                        "side, or the receiver's failover-timeout or caps, then remusctl "
                        "unprotect %s and protect it again)",
                        self.info.name,
                        self.req.target,
                        e.reason,
                        self.info.name,
                    )
                else:
                    log.error(
                        "domain %s: %s; not retrying (unprotect and protect again to retry)",
                        self.info.name,
                        e.reason,
                    )
                return self._advance(Event.REFUSED, f"{e.reason} (not retrying)")
            event = self.policy.loss()
            if e.shutdown:
                log.warning(
                    "domain %s unprotected: the receiver at %s is stopping (%s); its backup "
                    "stays paused there, it does not take over; reconnecting%s",
                    self.info.name,
                    self.req.target,
                    e.reason,
                    " at once" if event is Event.LOST_FAILOVER_CAPABLE else "",
                )
                step = self._advance(event, f"backup lost: the receiver is stopping: {e.reason}")
                if event is Event.LOST:
                    log.info("domain %s: next attempt in %.1f s", self.info.name, step.wait)
                return step
            if event is Event.LOST_FAILOVER_CAPABLE:
                # the receiver holds a committed backup and fails it over after
                # its timeout of silence unless a new session supersedes it first
                # (a reset link, a receiver that closed on a hiccup): reconnect now
                log.warning(
                    "domain %s unprotected: %s; reconnecting at once (the "
                    "receiver fails over after %d ms without us)",
                    self.info.name,
                    e.reason,
                    self.policy.failover_timeout_ms,
                )
            step = self._advance(event, f"backup lost: {e.reason}")
            if event is Event.LOST:
                log.warning(
                    "domain %s unprotected: %s; retrying in %.1f s",
                    self.info.name,
                    e.reason,
                    step.wait,
                )
            return step
        except DomainError as e:
            log.error("domain %s: %s; protection stopped", self.info.name, e)
            self._advance(Event.DOMAIN_ERROR, str(e))
            return None
        except Exception as e:  # a bug: keep the guest running, say so
            log.exception("domain %s: protection failed", self.info.name)
            self._advance(Event.CRASHED, f"internal error: {e}")
            return None

    def _hello(self, disks: SessionDisks | None = None) -> sp.Hello:
        i = self.info
        with self._lock:
            ack_ms = self.stats.ack_ms()
            self.stats.hello_ack_ms = ack_ms
        opts: dict[str, Any] = {
            "codec": self.req.codec,
            "cache_pages": self.tuning.cache_pages,
            "buffer_pages": self.tuning.buffer_pages,
            "interval_ms": self.req.interval_ms,
            "heartbeat_ms": self.req.interval_ms,
            "verify": self.req.verify,
        }
        if self.tuning.wire.codec and self.req.target.kind != "file":
            opts["wire"] = (self.tuning.wire.codec,)
        if HELLO_HAS_ACK_MS:
            # the median ACK wait of the last session (0: unknown); the receiver
            # refuses (limit) a failover timeout below 2 x interval + ack_ms
            opts["ack_ms"] = min(ack_ms, getattr(sp, "MAX_ACK_MS", 60_000) - 1)
        return sp.Hello(
            session_id=sp.new_session_id(),
            options=sp.Options(**opts),
            domain=DomainConfig(
                name=i.name,
                uuid=i.uuid,
                pages=i.pages,
                vcpus=i.vcpus,
                hvm=i.hvm,
                extra=dict(i.extra),
                disks=() if disks is None else disks.sizes,
            ),
            generation=self.generation,
            software=SOFTWARE,
            witness=None
            if self.wkey is None or self._wrev is None
            else sp.WitnessClaim(self.wkey.key, self._wrev),
        )

    def _session(self) -> None:
        """One session: connect, initial copy, epochs until asked to stop.

        Returns after a clean end; raises LinkDown when the backup is lost.
        """
        t = self.tuning
        self._witness_claim()  # before the first byte of HELLO
        try:
            disks = SessionDisks.of(self.domain, self.info.name)
        except DiskSetupError as e:
            raise LinkDown(str(e), permanent=True) from None
        hello = self._hello(disks)
        interval = self.req.interval_ms / 1000.0
        link = make_link(
            self.req.target,
            hello,
            connect_timeout=t.connect_timeout,
            io_timeout=max(t.ack_timeout, interval),
            accept_timeout=t.accept_timeout,
            connect=t.connect,
            wire=t.wire,
        )
        domain = self.domain
        if t.wrap is not None:
            link, domain = t.wrap(self.stats.sessions + 1, link, domain)
        self._disks = disks
        self._link = link
        try:
            link.open()
            peer_disks = getattr(getattr(link, "accept", None), "disks", False)
            if disks is not None and link.kind == "tcp" and not peer_disks:
                raise LinkDown(
                    f"{link.peer} does not replicate disks (an older receiver): domain "
                    f"{self.info.name} has {len(disks.sizes)} disk(s), and a failover there "
                    "would resume its memory over a disk it never had",
                    permanent=True,
                )
            with self._lock:
                self.stats.new_session(hello.session_id if link.kind == "tcp" else None)
                self.stats.failover_timeout_ms = link.failover_timeout_ms
                self.stats.peer_address = link.peer_address
                self.stats.peer_names = list(link.peer_names)
                self.stats.peer_not_after = link.peer_not_after
            accept = getattr(link, "accept", None)
            self._lease_proof = accept is None or bool(getattr(accept, "witness", False))
            #: the receiver resumes at a SWITCHOVER checkpoint (its ACCEPT says so)
            self.peer_switchover = bool(getattr(accept, "switchover", False))
            if self.wcfg is not None and not self._lease_proof:
                log.warning(
                    "domain %s: the receiver at %s has no witness: output is released only "
                    "while its last ACK's promise holds",
                    self.info.name,
                    self.req.target,
                )
            self._advance(Event.OPENED)
            log.info(
                "domain %s: session %s to %s (codec %s, interval %d ms%s): initial copy",
                self.info.name,
                hello.session_id[:8],
                self.req.target,
                self.req.codec,
                self.req.interval_ms,
                ", verify" if self.req.verify else "",
            )
            writer = StreamWriter(
                self.info.pages,
                codec=self.req.codec,
                cache_pages=t.cache_pages,
                buffer_pages=t.buffer_pages,
            )
            pacer = Pacer(
                link, writer.heartbeat(), Heartbeats.for_interval(interval), self.info.name
            )
            try:
                self._protect(link, domain, writer, EpochCore(), pacer, interval, disks)
            finally:
                pacer.stop()
        finally:
            self._promise = None  # no session, no promise (docs/witness.md, step 4)
            link.close()
            if disks is not None:
                disks.close()

    def _protect(
        self,
        link: Link,
        domain: Domain,
        writer: StreamWriter,
        core: EpochCore,
        pacer: Pacer,
        interval: float,
        disks: SessionDisks | None = None,
    ) -> None:
        t = self.tuning
        cb = CheckpointBuffer(self.info.pages, self.req.verify)
        seal = None if disks is None else disks.seal
        t0 = time.monotonic()
        self._engaged = True
        self._write_record()  # before log-dirty goes on: a successor must know
        res = initial_copy(
            domain,
            link,
            writer,
            cb,
            rounds=t.precopy_rounds,
            threshold=t.precopy_threshold,
            stop=self._stop.is_set,
            disks=disks,
            sync_deadline=time.monotonic() + t.accept_timeout,
        )
        last = self._stop.is_set()
        bufs = self._disk_chunks(disks, res.final) + encode(writer, res.final, last=last)
        sent = res.bytes_sent + self._send(link, core, pacer, bufs, last)
        self._acknowledge(link, domain, core, res.final.digest)
        # a receiver now holds a backup it may resume
        capable = None if link.kind == "file" else (link.failover_timeout_ms or 0)
        with self._lock:
            self.stats.sent(sent, res.final.pause_ms, len(res.final.pfns))
        log.info(
            "domain %s protected: initial copy of %d pages in %d round(s), %.1f MB, "
            "%.2f s, final pause %.1f ms",
            self.info.name,
            res.pages_sent,
            res.rounds,
            sent / 1e6,
            time.monotonic() - t0,
            res.final.pause_ms,
        )
        if last:
            return self._clean_end()
        self._advance(Event.COPY_ACKED, failover_timeout_ms=capable)
        next_t = time.monotonic() + interval
        while True:
            # sleep until the next interval starts (listening to the backup meanwhile)
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_t:
                    break
                self._wake.wait(min(next_t - now, 0.05))
                link.poll()
                if self._wpaused:
                    raise LinkDown("witness: the guest was paused (no proof it may run)")
                if disks is not None:
                    disks.forward(link)  # the open epoch's writes, ahead of its checkpoint
                    if disks.over_budget():
                        break  # a large disk epoch: checkpoint now, before the receiver's bound
            last = self._stop.is_set()
            index = core.next_index
            t_cap = time.monotonic()
            if last and self._switching:
                # (a capture that fails leaves the guest running, not held)
                cap = capture(domain, cb, prescan=t.prescan, hold=True, seal=seal)
                return self._switchover(link, domain, writer, core, pacer, cap, disks)
            cap = capture(domain, cb, prescan=t.prescan, seal=seal)
            t_enc = time.monotonic()
            bufs = self._disk_chunks(disks, cap) + encode(writer, cap, last=last)
            t_send = time.monotonic()
            n = self._send(link, core, pacer, bufs, last)
            t_ack = time.monotonic()
            self._acknowledge(link, domain, core, cap.digest)
            if log.isEnabledFor(logging.DEBUG):
                t_end = time.monotonic()
                log.debug(
                    "domain %s: checkpoint %d: %d pages, %d bytes; capture %.1f ms "
                    "(paused %.2f), encode %.1f ms, send %.1f ms, ack %.1f ms",
                    self.info.name,
                    index,
                    len(cap.pfns),
                    n,
                    (t_enc - t_cap) * 1e3,
                    cap.pause_ms,
                    (t_send - t_enc) * 1e3,
                    (t_ack - t_send) * 1e3,
                    (t_end - t_ack) * 1e3,
                )
            cs = writer.codec_stats
            with self._lock:
                self.stats.epoch(
                    index,
                    n,
                    cap.pause_ms,
                    len(cap.pfns),
                    writer.format == "B",
                    None if cs is None else (cs.hits, cs.misses, cs.zero_base),
                )
            if last:
                return self._clean_end()
            next_t = next_epoch(next_t, interval, time.monotonic())

    @staticmethod
    def _disk_chunks(disks: SessionDisks | None, cap: Capture) -> list[Any]:
        """The disk stream through the capture's SEAL, to go before its body."""
        return [] if disks is None else list(disks.through(cap.seal))

    def _take_acks(self, link: Link, core: EpochCore, acks: list[sp.Ack]) -> bool:
        """Give the ACKs to the core; whether one flagged a digest mismatch."""
        mismatch = False
        for ack in acks:
            try:
                core.on_ack(ack.index)
            except AckViolation as e:
                raise LinkDown(f"{link.peer} {e}") from None
            mismatch = ack.mismatch
        return mismatch

    def _send(self, link: Link, core: EpochCore, pacer: Pacer, bufs: list[Any], last: bool) -> int:
        """Send the next checkpoint whole (``last``: it carries LAST_CHECKPOINT)."""
        self._take_acks(link, core, link.take_acks())  # no ACK may precede it
        index = core.next_index
        core.sent(index, last=last)
        if last:  # nothing may follow the LAST_CHECKPOINT checkpoint, heartbeats included
            pacer.stop()
        self._sent_at = time.monotonic()  # before its first byte: the promise counts from here
        return link.send_checkpoint(index, bufs)

    def _acknowledge(
        self, link: Link, domain: Domain, core: EpochCore, digest: bytes | None
    ) -> None:
        """Wait for the ACK of the checkpoint in flight, then release its output."""
        assert core.index is not None
        index = core.index
        t_sent = time.monotonic()
        deadline = t_sent + self.tuning.ack_timeout
        mismatch = False
        step = WITNESS_POLL_S if self.wcfg is not None else self.tuning.ack_timeout
        while not core.acked_through(index):
            acks = link.next_acks(min(deadline, time.monotonic() + step))
            if not acks and time.monotonic() >= deadline:
                raise LinkDown(f"{link.peer} did not acknowledge checkpoint {index} in time")
            if not acks and self._wpaused:
                raise LinkDown("witness: the guest was paused waiting for an ACK")
            mismatch = self._take_acks(link, core, acks) or mismatch
        mono = time.monotonic()
        with self._lock:
            self.stats.acknowledged(index, digest, mismatch)
            self.stats.ack_wait(mono - t_sent, time.time(), mono)
        if self.wcfg is not None:
            self._witness_ack(link, domain, core, index)
            return
        # an adopted session's first ACK covers the dead session's held output too:
        # it was produced before this checkpoint's pause (module docstring)
        stale, self._stale_barriers = self._stale_barriers, 0
        for _ in range(stale):
            domain.output_release()
        domain.output_release()
        core.released()
        if digest is not None:
            log.debug(
                "domain %s: checkpoint %d acknowledged, xxh3-128 %s",
                self.info.name,
                index,
                digest.hex(),
            )

    def _clean_end(self) -> None:
        log.info(
            "domain %s: session ended cleanly (LAST_CHECKPOINT acknowledged); "
            "the guest runs unprotected",
            self.info.name,
        )
        self._advance(Event.CLEAN_END, "unprotected on request")
        self._witness_release()  # the receiver ended the session cleanly: it will not resume

    # -- a switchover (docs/protocol.md, docs/operations.md "Failback") -------------

    def _switchover(
        self,
        link: Link,
        domain: Domain,
        writer: StreamWriter,
        core: EpochCore,
        pacer: Pacer,
        cap: Any,
        disks: SessionDisks | None = None,
    ) -> None:
        """The last checkpoint of a switchover; the guest is stopped at ``cap``
        and stays so until the receiver's verdict: fenced here once the backup
        runs, run here again if the receiver says it did not resume it, left
        stopped when the outcome is unknown. Its output is released on the ACK
        (it is all the guest made), so none is lost and none goes twice."""
        index = core.next_index
        self._switching = False
        if self._stop_for_switch:
            self._stop.clear()  # the stop asked was the switchover's, not the thread's end
            self._stop_for_switch = False
        released = False  # the checkpoint's ACK came and its output went
        try:
            bufs = self._disk_chunks(disks, cap) + encode(writer, cap, last=True, switchover=True)
            self._send(link, core, pacer, bufs, True)
        except LinkDown as e:
            if not e.fenced:  # not sent whole: the receiver cannot commit it
                self._run_again(domain)
                self.switch_done.set()
                raise
            verdict: LinkDown = e  # an operator's failover there came first
        except BaseException:
            self._run_again(domain)
            self.switch_done.set()
            raise
        else:
            try:
                self._acknowledge(link, domain, core, cap.digest)
            except LinkDown as e:
                verdict = e
            else:
                released = True
                with self._lock:
                    self.stats.sent(0, cap.pause_ms, len(cap.pfns))
                self._witness_hand_over()  # the receiver resumes only once it holds the key
                verdict = self._verdict(link)
        self._switch_step = self._switch_outcome(domain, link.peer, index, verdict, released)
        self.switch_done.set()

    def _switch_abandoned(self) -> None:
        """The session ended with a switchover asked but not begun (the link was
        lost, the domain failed, before its last checkpoint): the request is
        over, and the protection goes on as the policy says, not stopped."""
        if not self._switching:
            return
        self._switching = False
        if self._stop_for_switch:
            self._stop.clear()
            self._stop_for_switch = False
        log.warning(
            "domain %s: the switchover did not begin: the session ended first (the next "
            "lines say why); the guest was not stopped for it",
            self.info.name,
        )
        self.switch_done.set()

    def _verdict(self, link: Link) -> LinkDown:
        """The receiver's answer to the switchover: the LinkDown its ERROR (or
        the link's end, or the timeout) makes."""
        deadline = time.monotonic() + SWITCHOVER_VERDICT_S
        try:
            while time.monotonic() < deadline:
                link.next_acks(deadline)
        except LinkDown as e:
            return e
        return LinkDown(f"{link.peer} gave no verdict within {SWITCHOVER_VERDICT_S:.0f} s")

    def _switch_outcome(
        self, domain: Domain, peer: str, index: int, e: LinkDown, released: bool
    ) -> Step:
        name = self.info.name
        if e.error_code == sp.ERR_SWITCHOVER_FAILED:
            self._run_again(domain)
            log.error(
                "domain %s: SWITCHOVER to %s failed: %s; the guest runs here again "
                "(nothing was lost) and is protected afresh",
                name,
                peer,
                e.reason,
            )
            return self._advance(Event.SWITCHOVER_FAILED, f"switchover failed: {e.reason}")
        self._held = _held_now(domain) or "paused"
        self._engaged = False
        try:
            domain.disable_logdirty()
        except DomainError as err:
            log.warning("domain %s: %s", name, err)
        with self._lock:
            self.stats.fences += 1 if e.fenced else 0
        if e.fenced:
            self._wstop.set()  # the key is the backup's now: nothing of ours to renew
            what = (
                "stopped at that checkpoint with all its output released"
                if released
                else "stopped, the output of its unacknowledged checkpoint withheld (the "
                "backup resumed from an earlier one: a failover there came first)"
            )
            log.warning(
                "domain %s SWITCHED OVER to %s at checkpoint %d: the backup runs the guest; "
                "this copy is %s (destroy it: remusctl destroy-stale %s)",
                name,
                peer,
                index,
                what,
                name,
            )
            return self._advance(
                Event.SWITCHED_OVER,
                f"switched over to {peer} at checkpoint {index}; this copy is stopped "
                "(destroy-stale)",
            )
        log.critical(
            "domain %s: SWITCHOVER OUTCOME UNKNOWN: checkpoint %d went to %s whole, then %s; "
            "the backup may run the guest: this copy stays stopped. Check the backup host: "
            "if the guest runs there, remusctl destroy-stale %s here; if not, remusctl "
            "resume-here %s",
            name,
            index,
            peer,
            e.reason,
            name,
            name,
        )
        return self._advance(
            Event.SWITCHOVER_UNKNOWN,
            f"switchover outcome unknown after checkpoint {index}: {e.reason}; this copy "
            "stays stopped",
        )

    def _run_again(self, domain: Domain) -> None:
        """Undo a switchover's hold: the guest stopped at its last checkpoint runs."""
        probe = getattr(domain, "checkpoint_held", None)
        try:
            _run_held(domain, _held_now(domain) if probe is not None else "paused")
        except DomainError as err:
            log.error("domain %s: running the guest again: %s", self.info.name, err)

    # -- the witness (docs/witness.md, "The contract") ------------------------------

    def _witness_ack(self, link: Link, domain: Domain, core: EpochCore, index: int) -> None:
        """The ACK of ``index`` came: its promise, then its output, if a proof holds."""
        assert self.wcfg is not None
        ft = link.failover_timeout_ms
        if ft:
            self._promise = promise_until(self._sent_at, ft / 1000, self.wcfg.timings.margin)
        with self._wlock:
            ok = not self._wpaused and release_allowed(
                time.monotonic(), self._lease_valid_until(), self._promise
            )
            if ok:
                stale, self._stale_barriers = self._stale_barriers, 0
                for _ in range(stale):
                    domain.output_release()
                domain.output_release()
            elif not self._wpaused:
                self._witness_pause("the ACK came after both proofs ran out")
        if not ok:
            raise LinkDown(f"witness: checkpoint {index}'s output withheld (no proof it may go)")
        core.released()

    def _lease_valid_until(self) -> float | None:
        key = self.wkey
        return key.valid_until if key is not None and self._lease_proof else None

    def _witness_claim(self) -> None:
        """Hold the owner key before HELLO (contract 1); LinkDown if not (fenced if
        the backup holds it, else retried)."""
        if self.wcfg is None or (self.wkey is not None and self.wkey.valid_until is not None):
            return
        key = self._new_key()
        try:
            rev = key.claim(expect_epoch=self._wrev)
        except ClaimRefused as e:
            key.close()
            if e.holder is None or e.holder.role == "backup":
                raise LinkDown(
                    f"witness: {e.why}: the backup runs the guest", fenced=True
                ) from None
            raise LinkDown(f"witness: {e.why} (it frees itself within its TTL)") from None
        except WitnessUnreachable as e:
            key.close()
            raise LinkDown(f"{e} (the guest runs unprotected)") from None
        self._claimed(key, rev)

    def _new_key(self) -> OwnerKey:
        assert self.wcfg is not None
        return OwnerKey(self.wcfg, self.info.uuid, role="primary", session=sp.new_session_id())

    def _claimed(self, key: OwnerKey, rev: int) -> None:
        old, self.wkey = self.wkey, key
        if old is not None:
            old.close()
        self._wrev = rev
        log.info(
            "domain %s: witness: owner key %s claimed (fencing revision %d, lease valid %.1f s)",
            self.info.name,
            key.key,
            rev,
            (key.valid_until or 0.0) - time.monotonic(),
        )
        self._guarding = True
        if not self._wthreads:
            for target, what in ((self._renewals, "renew"), (self._watch, "watch")):
                th = threading.Thread(
                    target=target, name=f"witness-{what}-{self.info.name}", daemon=True
                )
                th.start()
                self._wthreads.append(th)

    def _renewals(self) -> None:
        while not self._wstop.is_set():
            key = self.wkey
            if key is not None and key.valid_until is not None:
                key.run_renewals(self._wstop)  # returns on stop, or when the lease is lost
            self._wstop.wait(0.1)

    def _watch(self) -> None:
        """The pause timer (contract 5), as a check every WITNESS_WATCH_S."""
        while not self._wstop.wait(WITNESS_WATCH_S):
            with self._wlock:
                if not self._guarding or self._wpaused:
                    continue
                now = time.monotonic()
                if release_allowed(now, self._lease_valid_until(), self._promise):
                    continue
                key = self.wkey
                why = (key.lease.last_error if key is not None else None) or "lease not valid"
                self._witness_pause(why)

    def _witness_pause(self, why: str) -> None:
        """Pause the guest (one count of ours) and withhold its output; ``_wlock`` held."""
        try:
            self.domain.pause()
        except DomainError as e:
            log.error("domain %s: witness pause: %s", self.info.name, e)
        self._wpaused = True
        log.critical(
            "domain %s: WITNESS: lease not renewed (%s): guest PAUSED to avoid split brain",
            self.info.name,
            why,
        )

    def _witness_blocks(self) -> bool:
        """With no session open: may the guest not run with its output released?
        (Then it is paused, if not yet.)"""
        if self.wcfg is None or not self._guarding:
            return False
        with self._wlock:
            if not self._wpaused and not release_allowed(
                time.monotonic(), self._lease_valid_until(), None
            ):
                self._witness_pause("no session and no valid lease")
            return self._wpaused

    def _witness_lost(self, cause: str) -> Step:
        key = self.wkey
        err = key.lease.last_error if key is not None else None
        why = "witness: lease not renewed" + (f" ({err})" if err else "")
        if cause:
            why += f"; {cause}"
        return self._advance(Event.WITNESS_LOST, f"{why}: guest paused to avoid split brain")

    def _withhold(self) -> None:
        """The guest stays paused (the witness pause) and its output held."""
        if self._engaged:
            self._engaged = False
            try:
                self.domain.disable_logdirty()
            except DomainError as e:
                log.warning("domain %s: %s", self.info.name, e)

    def _witness_resume(self) -> None:
        """The lease is ours again: release the held output, run the guest."""
        with self._wlock:
            for op in (self.domain.output_unplug, self.domain.unpause):
                try:
                    op()
                except DomainError as e:
                    log.warning("domain %s: witness resume: %s", self.info.name, e)
            self._wpaused = False
        log.warning(
            "domain %s: WITNESS: lease held again (fencing revision %s): the guest runs "
            "again, unprotected; reconnecting",
            self.info.name,
            self._wrev,
        )

    def _paused_for_witness(self) -> Step | None:
        """Paused for the witness: renew or re-claim (expect_epoch) until etcd
        answers (contract 6); None when stopped meanwhile."""
        assert self.wcfg is not None
        period = max(0.05, self.wcfg.timings.renew_period / 4)
        while True:
            if self._stop.is_set():
                self._stopped()
                return None
            key = self.wkey
            try:
                if key is not None and key.valid_until is not None:
                    key.renew()
                else:
                    raise LeaseLost("no lease held")
            except WitnessUnreachable:
                self._stop.wait(period)
                continue
            except LeaseLost:
                new = self._new_key()
                try:
                    rev = new.claim(expect_epoch=self._wrev)
                except ClaimRefused as e:
                    new.close()
                    if e.holder is not None and e.holder.role == "primary":
                        self._stop.wait(period)  # another primary's: it frees itself
                        continue
                    return self._advance(
                        Event.FENCED,
                        f"witness: {e.why}: the backup took over (not retrying)",
                        cause=f"witness: {e.why}",
                    )
                except WitnessUnreachable:
                    new.close()
                    self._stop.wait(period)
                    continue
                self._claimed(new, rev)
            return self._advance(
                Event.WITNESS_BACK, "witness: lease held again; the guest runs, reconnecting"
            )

    def _witness_release(self) -> None:
        """A clean end: give the key up (contract 7)."""
        key = self.wkey
        self._guarding = False
        self._wstop.set()
        if key is None:
            return
        try:
            key.release()
        except WitnessError as e:
            log.warning("domain %s: witness: release: %s (it expires by itself)", self.info.name, e)

    def _witness_hand_over(self) -> None:
        """A switchover's last checkpoint is acknowledged: give the owner key up,
        so that the receiver can win it and resume the backup. The witness
        threads stay: a switchover that fails claims the key again (before
        its next HELLO) and guards the guest as before."""
        key = self.wkey
        self._guarding = False  # nothing to guard: the guest is stopped, its output out
        if key is None:
            return
        try:
            key.release()
        except WitnessError as e:
            log.warning(
                "domain %s: witness: giving the key up for the switchover: %s (the receiver "
                "wins it once the lease expires)",
                self.info.name,
                e,
            )

    def _witness_end(self) -> None:
        """The protection ended: stop the witness threads; a gone domain releases."""
        if self.wcfg is None:
            return
        if self.case == Case.STOPPED_ERROR.value and self.policy.state is State.STOPPED:
            self._witness_release()
        self._guarding = False
        self._wstop.set()
        for th in self._wthreads:
            th.join(2.0)
        if self.wkey is not None:
            self.wkey.close()
