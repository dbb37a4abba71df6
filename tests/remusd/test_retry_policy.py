"""remusd.policy: every row of the retry table, the refusals, the backoff."""

from __future__ import annotations

import pytest

from remusd.policy import TABLE, Action, Case, Event, IllegalMove, RetryPolicy, State, Step, case_of

S, E, A = State, Event, Action

#: the table as the issue states it, written out row by row: a change to
#: TABLE that is not made here too fails test_every_row
EXPECTED = {
    (S.INITIAL_COPY, E.OPENED): (S.INITIAL_COPY, ()),
    (S.UNPROTECTED, E.OPENED): (S.INITIAL_COPY, ()),
    (S.INITIAL_COPY, E.COPY_ACKED): (S.PROTECTED, ()),
    (S.INITIAL_COPY, E.LOST): (S.UNPROTECTED, (A.UNPROTECT, A.RETRY_AFTER_BACKOFF)),
    (S.PROTECTED, E.LOST): (S.UNPROTECTED, (A.UNPROTECT, A.RETRY_AFTER_BACKOFF)),
    (S.UNPROTECTED, E.LOST): (S.UNPROTECTED, (A.RETRY_AFTER_BACKOFF,)),
    (S.PROTECTED, E.LOST_FAILOVER_CAPABLE): (S.UNPROTECTED, (A.UNPROTECT, A.RETRY_NOW)),
    (S.INITIAL_COPY, E.REFUSED): (S.UNPROTECTED, (A.UNPROTECT, A.PARK)),
    (S.UNPROTECTED, E.REFUSED): (S.UNPROTECTED, (A.PARK,)),
    (S.INITIAL_COPY, E.FENCED): (S.FENCED, (A.FENCE, A.PARK)),
    (S.PROTECTED, E.FENCED): (S.FENCED, (A.FENCE, A.PARK)),
    (S.UNPROTECTED, E.FENCED): (S.FENCED, (A.FENCE, A.PARK)),
    (S.UNPROTECTED, E.RETRY): (S.UNPROTECTED, (A.COUNT_RETRY,)),
    (S.INITIAL_COPY, E.CLEAN_END): (S.STOPPED, (A.UNPROTECT,)),
    (S.PROTECTED, E.CLEAN_END): (S.STOPPED, (A.UNPROTECT,)),
    (S.INITIAL_COPY, E.STOP): (S.STOPPED, ()),
    (S.UNPROTECTED, E.STOP): (S.STOPPED, ()),
    (S.FENCED, E.STOP): (S.STOPPED, ()),
    (S.INITIAL_COPY, E.DOMAIN_ERROR): (S.STOPPED, (A.UNPROTECT,)),
    (S.PROTECTED, E.DOMAIN_ERROR): (S.STOPPED, (A.UNPROTECT,)),
    (S.UNPROTECTED, E.DOMAIN_ERROR): (S.STOPPED, (A.UNPROTECT,)),  # via the session hook
    (S.INITIAL_COPY, E.CRASHED): (S.STOPPED, (A.UNPROTECT,)),
    (S.PROTECTED, E.CRASHED): (S.STOPPED, (A.UNPROTECT,)),
    (S.UNPROTECTED, E.CRASHED): (S.STOPPED, (A.UNPROTECT,)),
    (S.FENCED, E.CRASHED): (S.STOPPED, ()),
    # issue 12, defect 3: a dead remusd's protections, adopted at start-up
    (S.INITIAL_COPY, E.ADOPTED): (S.RECONNECTING, ()),
    (S.INITIAL_COPY, E.ADOPTED_FENCED): (S.FENCED, (A.PARK,)),
    (S.RECONNECTING, E.OPENED): (S.INITIAL_COPY, (A.RECOVER,)),
    (S.RECONNECTING, E.LOST): (S.UNPROTECTED, (A.UNPROTECT, A.RETRY_AFTER_BACKOFF)),
    (S.RECONNECTING, E.REFUSED): (S.UNPROTECTED, (A.UNPROTECT, A.PARK)),
    (S.RECONNECTING, E.FENCED): (S.FENCED, (A.FENCE, A.PARK)),
    (S.RECONNECTING, E.STOP): (S.STOPPED, (A.UNPROTECT,)),
    (S.RECONNECTING, E.DOMAIN_ERROR): (S.STOPPED, (A.UNPROTECT,)),
    (S.RECONNECTING, E.CRASHED): (S.STOPPED, (A.UNPROTECT,)),
    # the operator's decisions on a fenced copy
    (S.FENCED, E.RESUME_HERE): (S.STOPPED, (A.RESUME,)),
    (S.FENCED, E.DESTROY_STALE): (S.STOPPED, (A.DESTROY,)),
    # issue 14: the witness; neither proof holds: paused until etcd answers
    (S.INITIAL_COPY, E.WITNESS_LOST): (S.PAUSED_NO_WITNESS, (A.WITHHOLD,)),
    (S.PROTECTED, E.WITNESS_LOST): (S.PAUSED_NO_WITNESS, (A.WITHHOLD,)),
    (S.UNPROTECTED, E.WITNESS_LOST): (S.PAUSED_NO_WITNESS, (A.WITHHOLD,)),
    (S.RECONNECTING, E.WITNESS_LOST): (S.PAUSED_NO_WITNESS, (A.WITHHOLD,)),
    (S.PAUSED_NO_WITNESS, E.WITNESS_BACK): (S.UNPROTECTED, (A.WITNESS_RESUME, A.RETRY_NOW)),
    (S.PAUSED_NO_WITNESS, E.FENCED): (S.FENCED, (A.FENCE, A.PARK)),
    (S.PAUSED_NO_WITNESS, E.STOP): (S.STOPPED, ()),
    (S.PAUSED_NO_WITNESS, E.DOMAIN_ERROR): (S.STOPPED, ()),
    (S.PAUSED_NO_WITNESS, E.CRASHED): (S.STOPPED, ()),
    # issue 14: a switchover holds the guest stopped at its last checkpoint
    (S.PROTECTED, E.SWITCHED_OVER): (S.FENCED, (A.PARK,)),
    (S.PROTECTED, E.SWITCHOVER_FAILED): (S.UNPROTECTED, (A.UNPROTECT, A.RETRY_AFTER_BACKOFF)),
    (S.PROTECTED, E.SWITCHOVER_UNKNOWN): (S.FENCED, (A.PARK,)),
}

#: the rows of TABLE, and every other (state, event) pair, sorted by their values
#: (computed here, not inside parametrize(), whose `object` context would hide
#: the pairs' type from the key function)
ROWS = sorted(TABLE, key=lambda k: (k[0].value, k[1].value))
NOT_IN_TABLE = sorted(
    ((s, e) for s in State for e in Event if (s, e) not in TABLE),
    key=lambda k: (k[0].value, k[1].value),
)


def _at(state: State, *, capable: bool = False) -> RetryPolicy:
    p = RetryPolicy(0.5, 30.0)
    p.state = state
    if capable:
        p.failover_timeout_ms = 500
    return p


def test_table_is_as_specified():
    assert TABLE == EXPECTED


@pytest.mark.parametrize("row", ROWS)
def test_every_row(row):
    state, event = row
    new, actions = TABLE[row]
    p = _at(state, capable=event is E.LOST_FAILOVER_CAPABLE)
    step = p.advance(event, failover_timeout_ms=900 if event is E.COPY_ACKED else None)
    assert (step.state, step.actions) == (new, actions)
    assert p.state is new
    if A.RETRY_AFTER_BACKOFF in actions:
        assert step.wait == 0.5 and p.delay == 1.0
    elif A.RETRY_NOW in actions:
        assert step.wait == 0.0 and p.delay == 0.5
    else:
        assert step.wait is None
    if event is E.COPY_ACKED:
        assert p.failover_timeout_ms == 900
    else:
        assert p.failover_timeout_ms is None  # only protected keeps it


@pytest.mark.parametrize("pair", NOT_IN_TABLE)
def test_every_other_move_is_refused(pair):
    state, event = pair
    p = _at(state)
    with pytest.raises(IllegalMove, match=f"no move from {state.value!r} on {event.value!r}"):
        p.advance(event)
    assert p.state is state and p.delay == 0.5  # nothing changed


def test_stopped_is_final_and_fenced_is_never_retried():
    for event in Event:
        with pytest.raises(IllegalMove):
            _at(S.STOPPED).advance(event)
    for event in (E.RETRY, E.OPENED, E.LOST, E.LOST_FAILOVER_CAPABLE, E.WITNESS_BACK):
        with pytest.raises(IllegalMove):
            _at(S.FENCED).advance(event)


def test_paused_for_the_witness_runs_again_only_when_etcd_answers():
    p = RetryPolicy(0.5, 30.0)
    p.advance(E.OPENED)
    p.advance(E.COPY_ACKED, failover_timeout_ms=500)
    step = p.advance(E.WITNESS_LOST)
    assert step.actions == (A.WITHHOLD,) and p.failover_timeout_ms is None
    for event in (E.RETRY, E.OPENED, E.LOST, E.COPY_ACKED, E.CLEAN_END, E.RESUME_HERE):
        with pytest.raises(IllegalMove):
            p.advance(event)  # no session, no retry, no operator resume while paused
    step = p.advance(E.WITNESS_BACK)
    assert step.state is S.UNPROTECTED and step.wait == 0.0
    assert step.actions == (A.WITNESS_RESUME, A.RETRY_NOW)


def test_backoff_doubles_to_the_max_and_restarts_once_protected():
    p = RetryPolicy(0.5, 3.0)
    waits = []
    for _ in range(5):
        waits.append(p.advance(p.loss()).wait)  # connect refused, again and again
        p.advance(E.RETRY)
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]
    p.advance(E.OPENED)
    p.advance(E.COPY_ACKED, failover_timeout_ms=None)  # a file: not failover-capable
    assert p.loss() is E.LOST
    assert p.advance(E.LOST).wait == 0.5


def test_a_failover_capable_loss_is_retried_at_once_once():
    p = RetryPolicy(0.5, 30.0)
    p.advance(E.OPENED)
    p.advance(E.COPY_ACKED, failover_timeout_ms=500)
    assert p.loss() is E.LOST_FAILOVER_CAPABLE
    with pytest.raises(IllegalMove, match="failover-capable"):
        p.advance(E.LOST)  # the plain loss would wait out the receiver's failover timer
    assert p.advance(E.LOST_FAILOVER_CAPABLE).wait == 0.0
    p.advance(E.RETRY)
    # the immediate reconnection failed too: back to the backoff
    assert p.loss() is E.LOST
    assert p.advance(E.LOST).wait == 0.5
    with pytest.raises(IllegalMove):
        p.advance(E.LOST_FAILOVER_CAPABLE)  # only a protected session holds a backup


def test_bad_bounds():
    with pytest.raises(ValueError):
        RetryPolicy(2.0, 1.0)
    with pytest.raises(ValueError):
        RetryPolicy(0.0, 1.0)


#: (state before, event, engaged) -> the case after, for every row of TABLE
#: whose case does not depend on engaged (FENCE rows are listed both ways)
def _expected_case(state: State, event: Event, engaged: bool) -> Case:
    new, actions = TABLE[(state, event)]
    if new is S.INITIAL_COPY:
        return Case.INITIAL_COPY
    if new is S.PROTECTED:
        return Case.PROTECTED
    if new is S.RECONNECTING:
        return Case.RECONNECTING_ORPHAN
    if new is S.UNPROTECTED:
        return Case.REFUSED if A.PARK in actions else Case.UNPROTECTED_RETRYING
    if new is S.PAUSED_NO_WITNESS:
        return Case.PAUSED_NO_WITNESS
    if event is E.SWITCHOVER_UNKNOWN:
        return Case.SWITCHOVER_UNKNOWN
    if event is E.SWITCHED_OVER:
        return Case.FENCED_BACKUP_TOOK_OVER  # stopped by the plan, whatever engaged says
    if new is S.FENCED and state is S.PAUSED_NO_WITNESS:
        return Case.FENCED_BACKUP_TOOK_OVER  # paused for the witness before the backup won
    if new is S.FENCED:
        return Case.FENCED_BACKUP_TOOK_OVER if engaged else Case.FENCED_POSSIBLE_SPLIT_BRAIN
    return {
        E.RESUME_HERE: Case.RESUMED_HERE,
        E.DESTROY_STALE: Case.DESTROYED_STALE,
    }.get(
        event,
        Case.STOPPED_FENCED
        if state is S.FENCED
        else Case.STOPPED_PAUSED_NO_WITNESS
        if state is S.PAUSED_NO_WITNESS
        else Case.STOPPED_ERROR
        if event in (E.DOMAIN_ERROR, E.CRASHED)
        else Case.STOPPED,
    )


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("engaged", [False, True])
def test_every_row_has_its_case(row, engaged):
    state, event = row
    new, actions = TABLE[row]
    got = case_of(state, event, Step(new, actions), engaged=engaged)
    assert got is _expected_case(state, event, engaged)


def test_the_orphan_cases():
    # an orphan whose receiver says the backup took over: its output was held
    # since the last ACK (the dead remusd never released it): a clean fence
    p = RetryPolicy(0.5, 30.0)
    step = p.advance(E.ADOPTED)
    assert case_of(S.INITIAL_COPY, E.ADOPTED, step, engaged=True) is Case.RECONNECTING_ORPHAN
    step = p.advance(E.FENCED)
    assert step.actions == (A.FENCE, A.PARK)
    assert case_of(S.RECONNECTING, E.FENCED, step, engaged=True) is Case.FENCED_BACKUP_TOOK_OVER
    # the operator decides
    step = p.advance(E.DESTROY_STALE)
    assert case_of(S.FENCED, E.DESTROY_STALE, step, engaged=False) is Case.DESTROYED_STALE
    # a fenced record adopted keeps the case it had
    p = RetryPolicy(0.5, 30.0)
    step = p.advance(E.ADOPTED_FENCED)
    assert (
        case_of(
            S.INITIAL_COPY,
            E.ADOPTED_FENCED,
            step,
            engaged=False,
            fenced_case=Case.FENCED_BACKUP_TOOK_OVER,
        )
        is Case.FENCED_BACKUP_TOOK_OVER
    )
    assert p.advance(E.RESUME_HERE).actions == (A.RESUME,)
    # an adopted protection that cannot reach its receiver: as any lost session
    p = RetryPolicy(0.5, 30.0)
    p.advance(E.ADOPTED)
    assert p.loss() is E.LOST
    step = p.advance(E.LOST)
    assert step.actions == (A.UNPROTECT, A.RETRY_AFTER_BACKOFF) and step.wait == 0.5
    for bad in (E.RESUME_HERE, E.DESTROY_STALE):
        with pytest.raises(IllegalMove):
            _at(S.PROTECTED).advance(bad)
