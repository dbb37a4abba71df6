"""The retry policy of one protected domain: a table, and one function that advances it.

Every state change of a ``remusd.protector.Protector`` is ``RetryPolicy.advance``:
it looks ``(state, event)`` up in ``TABLE`` and returns the new state and the
actions the session thread must carry out; a pair that is not in the table
raises ``IllegalMove`` and changes nothing. Sans-IO: no clock, no thread.

States (the ``state`` of ``remusctl status``)::

    initial-copy  connecting, handshake, the live copy of checkpoint 0
    protected     checkpoint 0 acknowledged; the epoch loop runs
    unprotected   the backup is gone: the guest runs with its output released
                  at once; retried (or, after a refusal retrying cannot cure,
                  parked until unprotect)
    reconnecting  adopted at start-up from the record of a remusd that died
                  protecting it (an orphan: remusd.owners); the guest's
                  output stays held while this remusd reconnects with the
                  same generation, so its HELLO supersedes the dead session
                  before the receiver's failover timer fires
    fenced        the receiver's backup of the domain runs (it failed over, or
                  a switchover moved the guest there), or a switchover's
                  outcome is unknown: never retried; left only by a stop or
                  an operator's decision (resume-here, destroy-stale)
    stopped       protection ended (unprotect, daemon stop, the domain is
                  gone, an internal error, resume-here, destroy-stale); final
    paused-no-witness
                  witness configured (docs/witness.md): neither proof holds
                  (the owner key's lease is not surely live, and no ACK's
                  promise keeps the backup from resuming): the guest is
                  paused and its output withheld; left when the lease is
                  renewed or re-claimed since the last claim (witness-back:
                  unprotected, retried at once), or the backup won the key
                  (fenced)

Rules the table keeps:
- Backoff: a retry after losing a session waits ``retry_min``, doubling on
  each loss up to ``retry_max``; reaching ``protected`` starts again at
  ``retry_min``.
- A session whose checkpoint 0 the receiver acknowledged (it holds a backup
  it fails over after its timeout of silence) is retried at once when lost,
  once: the new session's HELLO supersedes the lost one before the receiver's
  failover timer fires.
- A permanent refusal (version, bad-hello, codec, limit, an unopenable file)
  is not retried; ``fenced`` is never retried and is left only by a stop.
- ``stopped`` is final.
- A switchover (``remusctl switchover``) holds the guest stopped at its last
  checkpoint: fenced once the receiver resumed its backup (switched-over);
  running here again, unprotected and retried, only when the receiver says it
  did not (switchover-failed); stopped, fenced, when no verdict came.
- With a witness, a guest whose output may not be released (witness-lost)
  is paused before its lease can expire; it runs again only after the
  lease is renewed or re-claimed (witness-back), never on its own.
- An orphan (``reconnecting``) whose receiver answers ``fenced`` (REFUSE
  fenced, ERROR failed-over) was never released past its last ACK (its
  remusd died holding the output): the fence is clean, the backup took
  over, this copy is paused. Unreachable, it is handled as any lost
  session: unprotected (the guest runs, its output released), retried.

Cases (``case_of``; the ``case`` of ``remusctl status``, one per operator
situation; docs/operations.md):

    initial-copy                 connected; checkpoint 0 under way: no backup
                                 can take over yet
    protected                    a backup holds every acknowledged checkpoint
    reconnecting-orphan          adopted from a dead remusd; output held;
                                 reconnecting to the same receiver
    unprotected-retrying         the backup is gone; the guest runs with its
                                 output released; remusd retries
    refused                      a refusal retrying cannot cure (version,
                                 codec, limit, unopenable file); parked
    fenced-backup-took-over      the backup runs the guest; this copy is
                                 paused, its unacknowledged output withheld:
                                 ``remusctl destroy-stale`` (or resume-here)
    fenced-possible-split-brain  the backup took over while this copy ran
                                 unprotected: both may have served clients
    stopped                      protection ended; the guest runs unprotected
    stopped-fenced               a fenced copy no longer tracked (unprotect or
                                 daemon stop): still paused
    resumed-here                 an operator chose this copy (resume-here):
                                 it runs unprotected, output released
    destroyed-stale              an operator destroyed this stale copy
    stopped-error                the domain failed or remusd hit a bug
    paused-no-witness            witness: neither the lease nor an ACK's promise
                                 holds: the guest is paused, its output withheld,
                                 until etcd answers again
    stopped-paused-no-witness    a guest paused for the witness no longer tracked
                                 (unprotect or daemon stop): still paused
    switchover-unknown           a switchover's last checkpoint went out whole but
                                 no verdict came: the backup may run the guest;
                                 this copy stays stopped until an operator checks
                                 (destroy-stale, or resume-here if it does not run
                                 there)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(Enum):
    INITIAL_COPY = "initial-copy"
    PROTECTED = "protected"
    UNPROTECTED = "unprotected"
    FENCED = "fenced"
    STOPPED = "stopped"
    RECONNECTING = "reconnecting"
    PAUSED_NO_WITNESS = "paused-no-witness"


class Event(Enum):
    OPENED = "session-opened"  # a session's handshake succeeded
    COPY_ACKED = "copy-acknowledged"  # checkpoint 0 acknowledged (not the last)
    LOST = "backup-lost"  # LinkDown, retrying may help
    LOST_FAILOVER_CAPABLE = "failover-capable-backup-lost"  # the same, after COPY_ACKED
    REFUSED = "refused-permanently"  # LinkDown that retrying cannot cure
    FENCED = "fenced"  # the receiver's backup runs (ERROR failed-over, REFUSE fenced)
    RETRY = "retry"  # the wait before a retry is over; a new session starts
    CLEAN_END = "clean-end"  # LAST_CHECKPOINT acknowledged
    STOP = "stop"  # asked to stop while no session runs
    DOMAIN_ERROR = "domain-error"  # the domain failed (gone)
    CRASHED = "internal-error"  # a bug in remusd
    ADOPTED = "adopted"  # start-up: a dead remusd's record of a live protection
    ADOPTED_FENCED = "adopted-fenced"  # start-up: a dead remusd's record of a fenced copy
    RESUME_HERE = "resume-here"  # operator: run this (fenced) copy, unprotected
    DESTROY_STALE = "destroy-stale"  # operator: destroy this (fenced) copy
    WITNESS_LOST = "witness-lost"  # neither the lease nor a promise holds: the guest was paused
    WITNESS_BACK = "witness-back"  # the lease was renewed, or re-claimed since the last claim
    SWITCHED_OVER = "switched-over"  # switchover: ERROR failed-over after its last ACK
    SWITCHOVER_FAILED = "switchover-failed"  # ERROR switchover-failed: the guest ran again here
    SWITCHOVER_UNKNOWN = "switchover-unknown"  # its last checkpoint went whole; no verdict came


class Action(Enum):
    UNPROTECT = "unprotect"  # release all output, log-dirty off (if the session engaged)
    FENCE = "fence"  # engaged: pause the stale guest, log-dirty off, output withheld;
    # else (it ran unprotected meanwhile): report the possible split brain
    RETRY_AFTER_BACKOFF = "retry-after-backoff"  # wait Step.wait (the backoff), then RETRY
    RETRY_NOW = "retry-now"  # RETRY at once (Step.wait == 0)
    PARK = "park"  # wait for a stop request, then STOP
    COUNT_RETRY = "count-retry"
    RECOVER = "recover"  # adopted, and the receiver accepted: undo the dead owner's
    # half-done checkpoint stop, take its log-dirty over (off: the copy turns it on)
    RESUME = "resume"  # undo the fence: run the guest, release its output, log-dirty off
    DESTROY = "destroy"  # destroy the stale copy
    WITHHOLD = "withhold"  # the guest stays paused, its output held; log-dirty off
    WITNESS_RESUME = "witness-resume"  # unpause the guest, release its held output


S, E, A = State, Event, Action
_LIVE = (S.INITIAL_COPY, S.PROTECTED)

#: (state, event) -> (new state, actions in order)
TABLE: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    (S.INITIAL_COPY, E.OPENED): (S.INITIAL_COPY, ()),
    (S.UNPROTECTED, E.OPENED): (S.INITIAL_COPY, ()),
    (S.INITIAL_COPY, E.COPY_ACKED): (S.PROTECTED, ()),
    **{(s, E.LOST): (S.UNPROTECTED, (A.UNPROTECT, A.RETRY_AFTER_BACKOFF)) for s in _LIVE},
    (S.UNPROTECTED, E.LOST): (S.UNPROTECTED, (A.RETRY_AFTER_BACKOFF,)),
    (S.PROTECTED, E.LOST_FAILOVER_CAPABLE): (S.UNPROTECTED, (A.UNPROTECT, A.RETRY_NOW)),
    (S.INITIAL_COPY, E.REFUSED): (S.UNPROTECTED, (A.UNPROTECT, A.PARK)),
    (S.UNPROTECTED, E.REFUSED): (S.UNPROTECTED, (A.PARK,)),
    **{(s, E.FENCED): (S.FENCED, (A.FENCE, A.PARK)) for s in (*_LIVE, S.UNPROTECTED)},
    (S.UNPROTECTED, E.RETRY): (S.UNPROTECTED, (A.COUNT_RETRY,)),
    **{(s, E.CLEAN_END): (S.STOPPED, (A.UNPROTECT,)) for s in _LIVE},
    (S.INITIAL_COPY, E.STOP): (S.STOPPED, ()),  # asked before the first session opened
    (S.UNPROTECTED, E.STOP): (S.STOPPED, ()),
    (S.FENCED, E.STOP): (S.STOPPED, ()),
    **{(s, E.DOMAIN_ERROR): (S.STOPPED, (A.UNPROTECT,)) for s in (*_LIVE, S.UNPROTECTED)},
    **{
        (s, E.CRASHED): (S.STOPPED, (A.UNPROTECT,))
        for s in (S.INITIAL_COPY, S.PROTECTED, S.UNPROTECTED)
    },
    (S.FENCED, E.CRASHED): (S.STOPPED, ()),  # the stale copy stays paused
    # adoption of a dead remusd's protections (remusd.owners), at start-up
    (S.INITIAL_COPY, E.ADOPTED): (S.RECONNECTING, ()),
    (S.INITIAL_COPY, E.ADOPTED_FENCED): (S.FENCED, (A.PARK,)),
    (S.RECONNECTING, E.OPENED): (S.INITIAL_COPY, (A.RECOVER,)),
    (S.RECONNECTING, E.LOST): (S.UNPROTECTED, (A.UNPROTECT, A.RETRY_AFTER_BACKOFF)),
    (S.RECONNECTING, E.REFUSED): (S.UNPROTECTED, (A.UNPROTECT, A.PARK)),
    (S.RECONNECTING, E.FENCED): (S.FENCED, (A.FENCE, A.PARK)),
    **{(S.RECONNECTING, e): (S.STOPPED, (A.UNPROTECT,)) for e in (E.STOP, E.DOMAIN_ERROR)},
    (S.RECONNECTING, E.CRASHED): (S.STOPPED, (A.UNPROTECT,)),
    # the operator's decisions on a fenced copy (remusctl resume-here / destroy-stale)
    (S.FENCED, E.RESUME_HERE): (S.STOPPED, (A.RESUME,)),
    (S.FENCED, E.DESTROY_STALE): (S.STOPPED, (A.DESTROY,)),
    # the witness (docs/witness.md): no proof that the backup will not resume
    **{
        (s, E.WITNESS_LOST): (S.PAUSED_NO_WITNESS, (A.WITHHOLD,))
        for s in (*_LIVE, S.UNPROTECTED, S.RECONNECTING)
    },
    (S.PAUSED_NO_WITNESS, E.WITNESS_BACK): (S.UNPROTECTED, (A.WITNESS_RESUME, A.RETRY_NOW)),
    (S.PAUSED_NO_WITNESS, E.FENCED): (S.FENCED, (A.FENCE, A.PARK)),  # the backup won the key
    **{(S.PAUSED_NO_WITNESS, e): (S.STOPPED, ()) for e in (E.STOP, E.DOMAIN_ERROR, E.CRASHED)},
    # a switchover (remusctl switchover): the guest was stopped at its last checkpoint
    (S.PROTECTED, E.SWITCHED_OVER): (S.FENCED, (A.PARK,)),  # the backup runs it
    (S.PROTECTED, E.SWITCHOVER_FAILED): (S.UNPROTECTED, (A.UNPROTECT, A.RETRY_AFTER_BACKOFF)),
    (S.PROTECTED, E.SWITCHOVER_UNKNOWN): (S.FENCED, (A.PARK,)),  # stays stopped
}


class Case(Enum):
    """What an operator is looking at (module docstring)."""

    INITIAL_COPY = "initial-copy"
    PROTECTED = "protected"
    RECONNECTING_ORPHAN = "reconnecting-orphan"
    UNPROTECTED_RETRYING = "unprotected-retrying"
    REFUSED = "refused"
    FENCED_BACKUP_TOOK_OVER = "fenced-backup-took-over"
    FENCED_POSSIBLE_SPLIT_BRAIN = "fenced-possible-split-brain"
    STOPPED = "stopped"
    STOPPED_FENCED = "stopped-fenced"
    RESUMED_HERE = "resumed-here"
    DESTROYED_STALE = "destroyed-stale"
    STOPPED_ERROR = "stopped-error"
    PAUSED_NO_WITNESS = "paused-no-witness"
    STOPPED_PAUSED_NO_WITNESS = "stopped-paused-no-witness"
    SWITCHOVER_UNKNOWN = "switchover-unknown"


def case_of(
    before: State, event: Event, step: Step, *, engaged: bool, fenced_case: Case | None = None
) -> Case:
    """The case after ``step`` (the move from ``before`` on ``event``).

    ``engaged``: the session had the guest's output held when the event came
    (before the step's actions ran); ``fenced_case``: for ADOPTED_FENCED, the
    case the dead owner's record gave."""
    new = step.state
    if new is State.INITIAL_COPY:
        return Case.INITIAL_COPY
    if new is State.PROTECTED:
        return Case.PROTECTED
    if new is State.RECONNECTING:
        return Case.RECONNECTING_ORPHAN
    if new is State.UNPROTECTED:
        return Case.REFUSED if Action.PARK in step.actions else Case.UNPROTECTED_RETRYING
    if new is State.PAUSED_NO_WITNESS:
        return Case.PAUSED_NO_WITNESS
    if new is State.FENCED:
        if event is Event.SWITCHOVER_UNKNOWN:
            return Case.SWITCHOVER_UNKNOWN
        if event is Event.SWITCHED_OVER:
            return Case.FENCED_BACKUP_TOOK_OVER  # by the plan: stopped, its output all released
        if before is State.PAUSED_NO_WITNESS:
            return Case.FENCED_BACKUP_TOOK_OVER  # paused before the backup could win
        if event is Event.ADOPTED_FENCED and fenced_case is not None:
            return fenced_case
        return Case.FENCED_BACKUP_TOOK_OVER if engaged else Case.FENCED_POSSIBLE_SPLIT_BRAIN
    if event is Event.RESUME_HERE:
        return Case.RESUMED_HERE
    if event is Event.DESTROY_STALE:
        return Case.DESTROYED_STALE
    if before is State.FENCED:
        return Case.STOPPED_FENCED
    if before is State.PAUSED_NO_WITNESS:
        return Case.STOPPED_PAUSED_NO_WITNESS
    if event in (Event.DOMAIN_ERROR, Event.CRASHED):
        return Case.STOPPED_ERROR
    return Case.STOPPED


class IllegalMove(Exception):
    """``advance`` was asked for a (state, event) pair the table does not have."""


@dataclass(frozen=True)
class Step:
    state: State
    actions: tuple[Action, ...]
    #: seconds to wait before the retry (RETRY_AFTER_BACKOFF, RETRY_NOW), else None
    wait: float | None = None


class RetryPolicy:
    """One domain's position in ``TABLE``, its backoff, and whether its backup
    can fail over (see the module docstring)."""

    def __init__(self, retry_min: float, retry_max: float) -> None:
        if not 0 < retry_min <= retry_max:
            raise ValueError(f"retry_min {retry_min} must be > 0 and <= retry_max {retry_max}")
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.state = State.INITIAL_COPY
        #: the wait before the next retry after a backoff
        self.delay = retry_min
        #: the receiver's failover timeout (ms) once it acknowledged checkpoint 0
        #: of the current session, else None
        self.failover_timeout_ms: int | None = None

    def loss(self) -> Event:
        """The event for a session lost in a way retrying may cure."""
        if self.state is State.PROTECTED and self.failover_timeout_ms is not None:
            return Event.LOST_FAILOVER_CAPABLE
        return Event.LOST

    def advance(self, event: Event, *, failover_timeout_ms: int | None = None) -> Step:
        """Move by ``event``; IllegalMove (nothing changed) if the table has no row.

        ``failover_timeout_ms``: with COPY_ACKED, the receiver's failover
        timeout when it now holds a backup it may resume (None for a file).
        """
        row = TABLE.get((self.state, event))
        if row is None:
            raise IllegalMove(f"retry policy: no move from {self.state.value!r} on {event.value!r}")
        if event is Event.LOST and self.failover_timeout_ms is not None:
            raise IllegalMove(
                "retry policy: a failover-capable session was lost: "
                f"{Event.LOST_FAILOVER_CAPABLE.value!r}, not {event.value!r}"
            )
        new, actions = row
        wait: float | None = None
        if Action.RETRY_AFTER_BACKOFF in actions:
            wait = self.delay
            self.delay = min(self.delay * 2, self.retry_max)
        elif Action.RETRY_NOW in actions:
            wait = 0.0
        if event is Event.COPY_ACKED:
            self.delay = self.retry_min
            self.failover_timeout_ms = failover_timeout_ms
        elif new is not State.PROTECTED:
            self.failover_timeout_ms = None
        self.state = new
        return Step(new, actions, wait)
