"""remusd.core: the epoch/ack bookkeeping and the heartbeat decision, no socket or thread."""

from __future__ import annotations

import pytest

from remusd.core import TABLE, AckViolation, Epoch, EpochCore, Heartbeats, Move, next_epoch


def _checkpoint(core: EpochCore, index: int, *, last: bool = False) -> None:
    core.sent(index, last=last)
    assert core.state is Epoch.IN_FLIGHT and not core.acked_through(index)
    core.on_ack(index)
    assert core.release_owed and core.acked_through(index) and core.acked == index
    core.released()


def test_a_session_of_checkpoints_in_order():
    core = EpochCore()
    assert core.next_index == 0 and core.acked is None and not core.release_owed
    for i in range(5):
        _checkpoint(core, i)
        assert core.state is Epoch.IDLE and core.next_index == i + 1
    _checkpoint(core, 5, last=True)
    assert core.ended
    with pytest.raises(AckViolation):
        core.sent(6)  # nothing follows LAST_CHECKPOINT


def test_ack_for_a_checkpoint_not_sent_is_refused():
    core = EpochCore()
    with pytest.raises(AckViolation, match="not sent"):
        core.on_ack(0)
    _checkpoint(core, 0)
    core.sent(1)
    with pytest.raises(AckViolation, match="1 is the one in flight"):
        core.on_ack(2)  # would release checkpoint 2's output before it exists
    assert core.acked == 0 and not core.release_owed


def test_acked_index_is_monotonic():
    core = EpochCore()
    _checkpoint(core, 0)
    _checkpoint(core, 1)
    core.sent(2)
    with pytest.raises(AckViolation, match="acknowledged checkpoint 1 after 1"):
        core.on_ack(1)
    core.on_ack(2)
    with pytest.raises(AckViolation, match="acknowledged checkpoint 2 after 2"):
        core.on_ack(2)  # one ACK per checkpoint
    assert core.acked == 2


def test_release_only_once_and_only_after_the_ack():
    core = EpochCore()
    with pytest.raises(AckViolation):
        core.released()  # nothing acknowledged: nothing owed
    core.sent(0)
    with pytest.raises(AckViolation):
        core.released()  # in flight, not acknowledged
    core.on_ack(0)
    core.released()
    with pytest.raises(AckViolation):
        core.released()  # owed once
    with pytest.raises(AckViolation):
        core.sent(0)  # indices go up by one
    with pytest.raises(AckViolation):
        core.sent(2)
    core.sent(1)
    with pytest.raises(AckViolation):
        core.sent(2)  # one checkpoint in flight at a time


def test_the_table_is_the_only_way():
    # every (state, move) pair not in the table is refused, by the table itself
    for state in Epoch:
        for move in Move:
            core = EpochCore()
            core.state = state
            if (state, move) in TABLE:
                core._advance(move)
                assert core.state is TABLE[(state, move)]
            else:
                with pytest.raises(AckViolation):
                    core._advance(move)
                assert core.state is state


def test_heartbeat_due_when_idle_for_half_the_interval():
    hb = Heartbeats.for_interval(0.1)
    assert hb.idle_s == pytest.approx(0.05) and hb.period_s == pytest.approx(0.025)
    assert not hb.due(100.0, None)  # the stream has not started: the header goes first
    assert not hb.due(100.0, 99.96)
    assert hb.due(100.0, 99.9)
    assert hb.due(100.0, 90.0)
    hb.close()  # LAST_CHECKPOINT sent (or a dying primary): never again
    assert not hb.due(100.0, 90.0)


def test_heartbeat_period_has_a_floor():
    assert Heartbeats.for_interval(0.01).period_s == 0.005
    assert Heartbeats.for_interval(2.0).period_s == pytest.approx(0.5)


def test_next_epoch_keeps_the_schedule_but_never_catches_up_more_than_an_interval():
    assert next_epoch(10.0, 0.1, 10.05) == pytest.approx(10.1)  # on time: the next slot
    # overran its slot by 0.05 s (< an interval): start at once, the one after on time
    assert next_epoch(10.0, 0.1, 10.15) == pytest.approx(10.1)
    assert next_epoch(10.1, 0.1, 10.16) == pytest.approx(10.2)
    assert next_epoch(10.0, 0.1, 10.3) == 10.3  # overran by an interval or more: restart
    # an overloaded pair (every checkpoint takes 0.13 s at 0.1 s): the lag stays under
    # one interval and the checkpoints run at their own pace, never faster
    t, now, starts = 0.0, 0.0, []
    for _ in range(20):
        start = max(t, now)
        starts.append(start)
        now = start + 0.13
        t = next_epoch(t, 0.1, now)
        assert now - t < 0.1 + 1e-9
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) == pytest.approx(0.13)  # at its own pace, no burst
