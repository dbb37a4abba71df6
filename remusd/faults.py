"""Fault injection for tests and bench/faults.py: ``REMUSD_FAULT=KIND:S:N``.

In its S-th session (1 = the first), the domain's session thread stops at
point KIND of checkpoint N (0 = the initial copy) and hangs there for good,
as a primary that dies at that instant would; the test then kills the
primary host and remusd (SIGKILL). The control socket keeps answering, so
the test can read ``acked`` / ``acked_digest`` first. Points::

    stall-mid-checkpoint  send the first half of checkpoint N's bytes (N = 0:
                          half of the guest's memory in the initial copy)
    stall-paused          N >= 1: inside the capture, the guest paused, the
                          dirty pages copied; nothing of N sent
    stall-mid-chunk       N >= 1: send half of checkpoint N's first chunk
    stall-before-tail     send all of checkpoint N but its tail (the body,
                          closing chunks and end marker arrived; no context)
    stall-after-ack       checkpoint N acknowledged (status says so), its
                          output NOT yet released
    stall-after-release   checkpoint N acknowledged and its output released

Rules: a hang never returns; the heartbeat pacer is stopped first (a dying
primary sends nothing more). Unset in production; remusd logs a warning at
start when it is set, and an unknown spec is refused with an error line and
ignored.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV = "REMUSD_FAULT"

KINDS = (
    "stall-mid-checkpoint",
    "stall-paused",
    "stall-mid-chunk",
    "stall-before-tail",
    "stall-after-ack",
    "stall-after-release",
)
#: kinds that have no meaning for the initial copy (checkpoint 0)
EPOCH_ONLY = ("stall-paused", "stall-mid-chunk")


@dataclass(frozen=True)
class Fault:
    kind: str
    session: int
    index: int

    def at(self, kind: str, session: int, index: int) -> bool:
        return (self.kind, self.session, self.index) == (kind, session, index)


def from_env() -> Fault | None:
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    s, _, n = rest.partition(":")
    if (
        kind not in KINDS
        or not s.isdigit()
        or not n.isdigit()
        or int(s) < 1
        or (kind in EPOCH_ONLY and int(n) == 0)
    ):
        log.error(
            "%s=%r not understood (KIND:SESSION:INDEX, KIND one of %s; %s need "
            "INDEX >= 1); ignored",
            ENV,
            spec,
            ", ".join(KINDS),
            ", ".join(EPOCH_ONLY),
        )
        return None
    log.warning("fault injection armed: %s=%s", ENV, spec)
    return Fault(kind, int(s), int(n))


def hang(stop_pacer: Callable[[], None], what: str) -> None:
    """Stop the heartbeats, say where, and never return."""
    stop_pacer()
    log.warning("%s: %s; stalling", ENV, what)
    while True:
        time.sleep(3600)


def flat(bufs: list) -> list[bytes]:
    """The checkpoint's buffers as bytes objects (for cutting them)."""
    return [bytes(memoryview(b).cast("B")) for b in bufs]
