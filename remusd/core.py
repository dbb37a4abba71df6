"""The epoch and ack bookkeeping of one session, and the heartbeat decision: sans-IO.

No socket, clock or thread in here: the session thread (remusd.protector)
tells ``EpochCore`` what it did and asks it what is allowed next; times are
passed in. The core's states, for the checkpoints of one session::

    (state,       event)       -> state        what it means
    idle          sent(n)         in-flight     checkpoint n (0 = the initial copy)
                                                is on its way; nothing else may be
                                                sent but heartbeats
    in-flight     acked(n)        release-owed  the backup holds n: its output may
                                                now be released, exactly once
    release-owed  released        idle          n's output went out
                                  ended         ... and n carried LAST_CHECKPOINT

Rules it keeps (every refusal is an ``AckViolation``, the reason says which):
- Checkpoints are numbered 0, 1, 2... in the order they are sent; one is in
  flight at a time (the next is captured only after the last one's output
  was released).
- An ACK is accepted only for the checkpoint in flight: the acknowledged
  index grows by one per ACK (monotonic), and an ACK for a checkpoint not yet
  sent, or one acknowledged before, is refused (the protocol sends one ACK
  per checkpoint, in order). So output is never released for a checkpoint the
  backup has not acknowledged.
- One release per acknowledged checkpoint, in order; none is owed otherwise.
- After the LAST_CHECKPOINT checkpoint is sent nothing follows it, not even a
  heartbeat (``Heartbeats.close``).

``Heartbeats`` is the one place that decides when the sender's HEARTBEAT tag
is due: when nothing went out for ``idle_s`` (half the checkpoint interval)
once the stream has started, until it is closed. One path sends it
(remusd.pacer, through ``Link.heartbeat_if``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class AckViolation(Exception):
    """The receiver (or the caller) broke the order of checkpoints and ACKs."""


class Epoch(Enum):
    IDLE = "idle"
    IN_FLIGHT = "in-flight"
    RELEASE_OWED = "release-owed"
    ENDED = "ended"


class Move(Enum):
    SENT = "sent"
    ACKED = "acked"
    RELEASED = "released"
    RELEASED_LAST = "released-last"


#: (state, move) -> new state; anything else is refused.
TABLE: dict[tuple[Epoch, Move], Epoch] = {
    (Epoch.IDLE, Move.SENT): Epoch.IN_FLIGHT,
    (Epoch.IN_FLIGHT, Move.ACKED): Epoch.RELEASE_OWED,
    (Epoch.RELEASE_OWED, Move.RELEASED): Epoch.IDLE,
    (Epoch.RELEASE_OWED, Move.RELEASED_LAST): Epoch.ENDED,
}


class EpochCore:
    """Which checkpoint of this session is in flight, which is acknowledged,
    what output release is owed (see the module docstring)."""

    def __init__(self) -> None:
        self.state = Epoch.IDLE
        #: the checkpoint sent last (in flight until acknowledged), None before 0
        self.index: int | None = None
        #: the last acknowledged checkpoint of this session, None before ACK(0)
        self.acked: int | None = None
        #: the checkpoint in flight carries LAST_CHECKPOINT
        self.last = False

    def _advance(self, move: Move) -> None:
        new = TABLE.get((self.state, move))
        if new is None:
            raise AckViolation(f"{move.value} while {self.state.value} (checkpoint {self.index})")
        self.state = new

    @property
    def next_index(self) -> int:
        """The index the next checkpoint sent will carry."""
        return 0 if self.index is None else self.index + 1

    def sent(self, index: int, *, last: bool = False) -> None:
        """Checkpoint ``index`` is about to go out (call before its first byte)."""
        if index != self.next_index:
            raise AckViolation(f"checkpoint {index} sent, {self.next_index} expected")
        self._advance(Move.SENT)
        self.index, self.last = index, last

    def acked_through(self, index: int) -> bool:
        """Whether checkpoint ``index`` is acknowledged."""
        return self.acked is not None and self.acked >= index

    def on_ack(self, index: int) -> None:
        """The receiver acknowledged checkpoint ``index``; AckViolation unless
        it is the one in flight."""
        if self.state is not Epoch.IN_FLIGHT or index != self.index:
            if self.acked is not None and index <= self.acked:
                raise AckViolation(f"acknowledged checkpoint {index} after {self.acked}")
            raise AckViolation(
                f"acknowledged checkpoint {index}, "
                + (
                    f"but checkpoint {self.index} is the one in flight"
                    if self.state is Epoch.IN_FLIGHT
                    else "which was not sent"
                )
            )
        self._advance(Move.ACKED)
        self.acked = index

    @property
    def release_owed(self) -> bool:
        return self.state is Epoch.RELEASE_OWED

    def released(self) -> None:
        """The output of the acknowledged checkpoint was released."""
        self._advance(Move.RELEASED_LAST if self.last else Move.RELEASED)

    @property
    def ended(self) -> bool:
        return self.state is Epoch.ENDED


@dataclass
class Heartbeats:
    """When the sender's HEARTBEAT is due (see the module docstring).

    ``idle_s``: a heartbeat is due once nothing went out for this long;
    ``period_s``: how often the pacer asks.
    """

    idle_s: float
    closed: bool = False

    @classmethod
    def for_interval(cls, interval_s: float) -> Heartbeats:
        """Half the checkpoint interval (the receiver's HELLO says it hears
        from us at least every interval)."""
        return cls(idle_s=interval_s / 2)

    @property
    def period_s(self) -> float:
        return max(0.005, self.idle_s / 2)

    def due(self, now: float, last_sent: float | None) -> bool:
        """``last_sent``: when the link last sent anything (None: the stream
        has not started; its header goes first)."""
        return not self.closed and last_sent is not None and now - last_sent >= self.idle_s

    def close(self) -> None:
        """Nothing more may be sent (LAST_CHECKPOINT, or a dead primary)."""
        self.closed = True


def next_epoch(next_t: float, interval_s: float, now: float) -> float:
    """When the epoch after the one planned at ``next_t`` starts: one interval
    later, on the schedule.

    An epoch that overran its slot by less than an interval (a late wake-up,
    a slow ACK on a busy host) keeps the schedule: the next checkpoint starts
    at once (the time returned is already past) and the one after it on time,
    so jitter does not cost checkpoints (with 4 guests on 2 cores, 38 a
    second instead of 40 at 25 ms, bench.scale). One that overran by a whole
    interval or more restarts the schedule from ``now``: the lag never
    exceeds one interval, so there is never a run of back-to-back
    checkpoints to catch up; a pair that cannot keep the interval runs at
    its own pace."""
    t = next_t + interval_s
    return now if now - t >= interval_s else t
