"""The per-domain policy: one table, ``(state, event) -> (new state, armed, actions)``.

Every change of a Protection's ``state`` and ``armed`` (receiver.protection)
is a row of TABLE, made by ``advance()``; nothing else in the receiver
assigns them. An event the table has no row for in the current state is
refused with ``IllegalMove`` (naming both) and changes nothing.

    state         event                  new state    armed  actions
    ------------  ---------------------  -----------  -----  ---------------------------------
    initial-copy  committed              receiving    no
    receiving     committed              receiving    no
    initial-copy  admission-failed       gone         no     destroy, forget
    initial-copy  copy-lost              gone         no     destroy, forget
    receiving     clean[destroy]         ended        no     destroy
    receiving     clean[keep]            ended        no
    receiving     corrupt                corrupt      no
    receiving     violation[wait]        broken       no
    receiving     violation[failover]    broken       yes
    receiving     link-lost[wait]        link-lost    no
    receiving     link-lost[failover]    link-lost    yes
    receiving     stopping               link-lost    no
    receiving     silent[failover]       receiving    yes    failover
    receiving     silent[wait]           receiving    no     close:stalled
    receiving     silent[witness]        receiving    yes    challenge
    link-lost     silent[witness]        link-lost    yes    challenge
    broken        silent[witness]        broken       yes    challenge
    receiving     witness-won            receiving    yes    failover
    link-lost     witness-won            link-lost    yes    failover
    broken        witness-won            broken       yes    failover
    receiving     witness-refused        receiving    yes
    link-lost     witness-refused        link-lost    yes
    broken        witness-refused        broken       yes
    link-lost     silent                 link-lost    yes    failover
    broken        silent                 broken       yes    failover
    receiving     resumed                failed-over  no     close:failed-over
    link-lost     resumed                failed-over  no     close:failed-over
    broken        resumed                failed-over  no     close:failed-over
    receiving     resume-failed          corrupt      no
    link-lost     resume-failed          corrupt      no
    broken        resume-failed          corrupt      no
    initial-copy  superseded             superseded   no     close:superseded, destroy, forget
    receiving     superseded             superseded   no     close:superseded, destroy, forget
    link-lost     superseded             superseded   no     close:superseded, destroy, forget
    broken        superseded             superseded   no     close:superseded, destroy, forget
    corrupt       superseded             superseded   no     close:superseded, destroy, forget
    ended         replaced               ended        no     destroy, forget
    gone          replaced               gone         no     forget
    superseded    replaced               superseded   no     forget
    failed-over   replaced               failed-over  no     forget

The events, and who raises them (receiver.daemon unless said otherwise):
    committed          a checkpoint was committed (receiver.backup, under the lock)
    admission-failed   the session ended before ACCEPT (the peer left, shutdown)
    copy-lost          the session ended, any way, before checkpoint 0 committed
    clean[...]         LAST_CHECKPOINT committed; [on-unprotect]
    corrupt            a commit failed half-way
    violation[...]     the stream broke a rule; [on-violation]
    link-lost[...]     EOF, reset, stall or the daemon closing it; [on-link-loss]
    stopping           the session ended because the receiver stops
    silent[...]        the failover timeout passed without a sign of life on an
                       open session; [on-link-loss]
    silent             the same for an ended session whose timer is armed (the
                       timer only fires for those)
    silent[witness]    either of those with a witness configured (and, for an
                       open session, on-link-loss = failover): challenge the
                       owner key first (docs/witness.md)
    witness-won        the claim of the owner key succeeded: fail over (the
                       timer's expiry, or an operator's failover after the
                       failover timeout)
    witness-refused    the claim was refused (the primary's lease lives) or etcd
                       did not answer: stay armed, try again after retry-period;
                       a superseding HELLO cancels
    resumed            the backup was unpaused (failover by the timer or an operator)
    resume-failed      unpausing it failed
    superseded         a session of a newer (or the same) protection arrived
    replaced           a new protection of the domain replaces one that is over
                       (failed-over: only once its backup is gone, else REFUSE fenced)

The actions are carried out by the caller, in order, still under the
Protection's lock: ``destroy`` the backup, ``forget`` the Protection (drop it
from the registry), ``close:CODE`` the session with an ERROR of that code,
``failover`` (unpause, then the ``resumed`` / ``resume-failed`` event),
``challenge`` (claim the owner key with no lock held, then ``witness-won`` or
``witness-refused``).

Rules kept here:
- ``advance`` is the only writer of ``state`` and ``armed``; it is called with
  the Protection's lock held, so a move never races a commit or a failover.
- The configuration enters through the event's name only (``end_event``,
  ``silence_event``): the table itself holds no condition.
"""

from __future__ import annotations

from typing import Protocol

from xenbind.errors import RemusError

INITIAL_COPY = "initial-copy"
RECEIVING = "receiving"
LINK_LOST = "link-lost"
BROKEN = "broken"
FAILED_OVER = "failed-over"
ENDED = "ended"
SUPERSEDED = "superseded"
CORRUPT = "corrupt"
GONE = "gone"

STATES = (
    INITIAL_COPY,
    RECEIVING,
    LINK_LOST,
    BROKEN,
    FAILED_OVER,
    ENDED,
    SUPERSEDED,
    CORRUPT,
    GONE,
)

DESTROY = "destroy"
FORGET = "forget"
FAILOVER = "failover"
CLOSE_STALLED = "close:stalled"
CLOSE_FAILED_OVER = "close:failed-over"
CLOSE_SUPERSEDED = "close:superseded"
CHALLENGE = "challenge"

Row = tuple[str, bool, tuple[str, ...]]

_SUPERSEDE: tuple[str, ...] = (CLOSE_SUPERSEDED, DESTROY, FORGET)

TABLE: dict[tuple[str, str], Row] = {
    # a checkpoint committed
    (INITIAL_COPY, "committed"): (RECEIVING, False, ()),
    (RECEIVING, "committed"): (RECEIVING, False, ()),
    # the session ended before checkpoint 0 committed: nothing usable
    (INITIAL_COPY, "admission-failed"): (GONE, False, (DESTROY, FORGET)),
    (INITIAL_COPY, "copy-lost"): (GONE, False, (DESTROY, FORGET)),
    # the session ended with committed state
    (RECEIVING, "clean[destroy]"): (ENDED, False, (DESTROY,)),
    (RECEIVING, "clean[keep]"): (ENDED, False, ()),
    (RECEIVING, "corrupt"): (CORRUPT, False, ()),
    (RECEIVING, "violation[wait]"): (BROKEN, False, ()),
    (RECEIVING, "violation[failover]"): (BROKEN, True, ()),
    (RECEIVING, "link-lost[wait]"): (LINK_LOST, False, ()),
    (RECEIVING, "link-lost[failover]"): (LINK_LOST, True, ()),
    (RECEIVING, "stopping"): (LINK_LOST, False, ()),
    # the failover timeout passed without a sign of life
    (RECEIVING, "silent[failover]"): (RECEIVING, True, (FAILOVER,)),
    (RECEIVING, "silent[wait]"): (RECEIVING, False, (CLOSE_STALLED,)),
    (LINK_LOST, "silent"): (LINK_LOST, True, (FAILOVER,)),
    (BROKEN, "silent"): (BROKEN, True, (FAILOVER,)),
    # the same with a witness: the owner key first (docs/witness.md)
    (RECEIVING, "silent[witness]"): (RECEIVING, True, (CHALLENGE,)),
    (LINK_LOST, "silent[witness]"): (LINK_LOST, True, (CHALLENGE,)),
    (BROKEN, "silent[witness]"): (BROKEN, True, (CHALLENGE,)),
    (RECEIVING, "witness-won"): (RECEIVING, True, (FAILOVER,)),
    (LINK_LOST, "witness-won"): (LINK_LOST, True, (FAILOVER,)),
    (BROKEN, "witness-won"): (BROKEN, True, (FAILOVER,)),
    (RECEIVING, "witness-refused"): (RECEIVING, True, ()),
    (LINK_LOST, "witness-refused"): (LINK_LOST, True, ()),
    (BROKEN, "witness-refused"): (BROKEN, True, ()),
    # the backup was unpaused (the timer or an operator), or that failed
    (RECEIVING, "resumed"): (FAILED_OVER, False, (CLOSE_FAILED_OVER,)),
    (LINK_LOST, "resumed"): (FAILED_OVER, False, (CLOSE_FAILED_OVER,)),
    (BROKEN, "resumed"): (FAILED_OVER, False, (CLOSE_FAILED_OVER,)),
    (RECEIVING, "resume-failed"): (CORRUPT, False, ()),
    (LINK_LOST, "resume-failed"): (CORRUPT, False, ()),
    (BROKEN, "resume-failed"): (CORRUPT, False, ()),
    # a session of a newer (or the same) protection of the domain
    (INITIAL_COPY, "superseded"): (SUPERSEDED, False, _SUPERSEDE),
    (RECEIVING, "superseded"): (SUPERSEDED, False, _SUPERSEDE),
    (LINK_LOST, "superseded"): (SUPERSEDED, False, _SUPERSEDE),
    (BROKEN, "superseded"): (SUPERSEDED, False, _SUPERSEDE),
    (CORRUPT, "superseded"): (SUPERSEDED, False, _SUPERSEDE),
    # a new protection replaces one that is over
    (ENDED, "replaced"): (ENDED, False, (DESTROY, FORGET)),
    (GONE, "replaced"): (GONE, False, (FORGET,)),
    (SUPERSEDED, "replaced"): (SUPERSEDED, False, (FORGET,)),
    (FAILED_OVER, "replaced"): (FAILED_OVER, False, (FORGET,)),
}

#: States in which a session's commit may still write into the backup.
COMMIT_STATES = (INITIAL_COPY, RECEIVING)
#: States in which the domain may be failed over (it has committed state).
FAILOVER_STATES = tuple(s for (s, e) in TABLE if e == "resumed")


class IllegalMove(RemusError):
    """An event the policy table has no row for in the current state."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"policy: event {event!r} is not allowed in state {state!r}")
        self.state = state
        self.event = event


class Tracked(Protocol):
    """What the table moves: receiver.protection.Protection."""

    state: str
    armed: bool


class Policies(Protocol):
    """The configuration knobs the events are named by (receiver.config)."""

    @property
    def on_link_loss(self) -> str: ...
    @property
    def on_violation(self) -> str: ...
    @property
    def on_unprotect(self) -> str: ...


def allows(state: str, event: str) -> bool:
    return (state, event) in TABLE


def advance(prot: Tracked, event: str) -> tuple[str, ...]:
    """Make the move of ``event`` (the caller holds the Protection's lock);
    returns the row's actions for the caller to carry out."""
    row = TABLE.get((prot.state, event))
    if row is None:
        raise IllegalMove(prot.state, event)
    prot.state, prot.armed, actions = row
    return actions


def end_event(state: str, kind: str, cfg: Policies, stopping: bool) -> str:
    """The event for a session that ended by ``kind`` (receiver.core's End
    kinds: clean, link-lost, stalled, violation, corrupt, closed, admission)."""
    if state == INITIAL_COPY:
        return "admission-failed" if kind == "admission" else "copy-lost"
    if kind == "clean":
        return "clean[keep]" if cfg.on_unprotect == "keep" else "clean[destroy]"
    if kind == "corrupt":
        return "corrupt"
    if stopping:
        # the receiver stops: whatever ended the session then (our ERROR
        # shutdown, the peer's reaction to it, the teardown) is the stop's
        # doing, not a broken stream; the backup keeps its last commit
        return "stopping"
    if kind == "violation":
        return f"violation[{cfg.on_violation}]"
    return f"link-lost[{cfg.on_link_loss}]"


def silence_event(state: str, cfg: Policies, witness: bool = False) -> str:
    """The event for the failover timeout passing in ``state`` (``witness``:
    one is configured, so a failover challenges the owner key first)."""
    if state == RECEIVING:
        if witness and cfg.on_link_loss == "failover":
            return "silent[witness]"
        return f"silent[{cfg.on_link_loss}]"
    return "silent[witness]" if witness else "silent"
