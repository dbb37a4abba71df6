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

How: the faults live in wrappers, never in the production classes.
``session_wrapper()`` (read once when remusd starts; None when REMUSD_FAULT
is unset) gives the protector a hook that wraps each session's link in a
``FaultyLink`` and its domain in a ``FaultyDomain`` (remusd.link's
interface and xenbind.hypervisor.Domain, everything forwarded). The link
counts checkpoints by ``send_checkpoint(index, ...)``, the domain counts
captures by ``checkpoint_stop`` (the k-th of a session is checkpoint k) and
releases by ``output_release`` (one per acknowledged checkpoint, in order).

Rules: a hang never returns; from its first partial byte on the link sends
no heartbeat (a dying primary sends nothing more). Unset in production;
remusd logs a warning at start when it is set, and an unknown spec is
refused with an error line and ignored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from xenbind.hypervisor import Domain
from xenbind.types import Context, DomainInfo, PageArray, PfnArray

from .link import HeartbeatDue, Link, SessionWrap

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


def hang(what: str) -> NoReturn:
    """Say where, and never return."""
    log.warning("%s: %s; stalling", ENV, what)
    while True:
        time.sleep(3600)


def flat(bufs: Sequence[Any]) -> list[bytes]:
    """The checkpoint's buffers as bytes objects (for cutting them)."""
    return [bytes(memoryview(b).cast("B")) for b in bufs]


def _nbytes(bufs: Sequence[Any]) -> int:
    return sum(memoryview(b).nbytes for b in bufs)


class _Death:
    """The point after which a faulty session sends nothing more."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dead = False

    def die(self) -> None:
        with self.lock:  # waits for a heartbeat under way
            self.dead = True


class FaultyLink(Link):
    """A link that, at the fault's point, sends part of a checkpoint and hangs."""

    def __init__(self, inner: Link, fault: Fault, name: str, pages: int, death: _Death) -> None:
        self.inner, self.fault, self.name, self._death = inner, fault, name, death
        self.kind, self.peer = inner.kind, inner.peer
        #: stall-mid-checkpoint:S:0: half of the guest's memory, counted over the copy
        copy_fault = fault.kind == "stall-mid-checkpoint" and fault.index == 0
        self._limit = pages * 4096 // 2 if copy_fault else None
        self._sent = 0

    @property
    def heartbeats(self) -> bool:  # type: ignore[override]
        return self.inner.heartbeats

    @property
    def failover_timeout_ms(self) -> int | None:  # type: ignore[override]
        return self.inner.failover_timeout_ms

    def open(self) -> None:
        self.inner.open()

    def _copy_bytes(self, buffers: Sequence[Any], forward: Callable[[], int]) -> int:
        """Bytes of the initial copy: hang once half the guest's memory went."""
        if self._limit is None:
            return forward()
        size = _nbytes(buffers)
        if self._sent + size < self._limit:
            self._sent += size
            return forward()
        self._death.die()
        n = forward()
        hang(f"domain {self.name}: sent {self._sent + n} bytes of the initial copy")

    def send(self, buffers: Sequence[Any]) -> int:
        return self._copy_bytes(buffers, lambda: self.inner.send(buffers))

    def send_checkpoint(self, index: int, buffers: Sequence[Any]) -> int:
        if index == 0:
            return self._copy_bytes(buffers, lambda: self._checkpoint(index, buffers))
        return self._checkpoint(index, buffers)

    def _checkpoint(self, index: int, buffers: Sequence[Any]) -> int:
        kind, name = self.fault.kind, self.name
        if index == self.fault.index:
            if kind == "stall-mid-checkpoint" and index > 0:
                self._death.die()
                data = b"".join(flat(buffers))
                self.inner.send([data[: len(data) // 2]])
                hang(
                    f"domain {name}: sent {len(data) // 2} of {len(data)} bytes "
                    f"of checkpoint {index}"
                )
            if kind == "stall-mid-chunk":
                self._death.die()
                first = flat(buffers[:1])[0]
                self.inner.send([first[: len(first) // 2]])
                hang(
                    f"domain {name}: sent {len(first) // 2} of the "
                    f"{len(first)} bytes of checkpoint {index}'s first chunk"
                )
            if kind == "stall-before-tail":
                self._death.die()
                n = self.inner.send(buffers[:-1])
                hang(f"domain {name}: sent checkpoint {index} but its tail ({n} bytes)")
        return self.inner.send_checkpoint(index, buffers)

    def next_acks(self, deadline: float) -> list[Any]:
        return self.inner.next_acks(deadline)

    def take_acks(self) -> list[Any]:
        return self.inner.take_acks()

    def poll(self) -> None:
        self.inner.poll()

    def heartbeat_if(self, due: HeartbeatDue, data: bytes) -> bool:
        with self._death.lock:
            if self._death.dead:
                return False
            return self.inner.heartbeat_if(due, data)

    def close(self) -> None:
        self.inner.close()


class FaultyDomain(Domain):
    """A domain that, at the fault's point, hangs in the capture or around the
    release of a checkpoint's output; everything else is forwarded."""

    def __init__(self, inner: Domain, fault: Fault, name: str, death: _Death) -> None:
        self.inner, self.fault, self.name, self._death = inner, fault, name, death
        self.domid = inner.domid
        self._captures = -1  # the checkpoint whose capture is under way
        self._releases = -1  # the checkpoint whose output is being released

    def __getattr__(self, attr: str) -> Any:  # what the interface leaves optional
        return getattr(self.inner, attr)

    def checkpoint_stop(self) -> None:
        self._captures += 1
        self.inner.checkpoint_stop()

    def output_barrier(self) -> None:
        self.inner.output_barrier()
        if self.fault.kind == "stall-paused" and self._captures == self.fault.index:
            self._death.die()
            hang(f"domain {self.name}: guest paused in the capture of checkpoint {self._captures}")

    def output_release(self) -> None:
        self._releases += 1
        i = self._releases
        if self.fault.kind == "stall-after-ack" and i == self.fault.index:
            self._death.die()
            hang(f"domain {self.name}: checkpoint {i} acknowledged, its output not released")
        self.inner.output_release()
        if self.fault.kind == "stall-after-release" and i == self.fault.index:
            self._death.die()
            hang(f"domain {self.name}: checkpoint {i} acknowledged and its output released")

    # -- forwarded -----------------------------------------------------------------

    def info(self) -> DomainInfo:
        return self.inner.info()

    def pause(self) -> None:
        self.inner.pause()

    def unpause(self) -> None:
        self.inner.unpause()

    def checkpoint_go(self) -> None:
        self.inner.checkpoint_go()

    def enable_logdirty(self) -> None:
        self.inner.enable_logdirty()

    def disable_logdirty(self) -> None:
        self.inner.disable_logdirty()

    def read_and_clear_dirty(self) -> PfnArray:
        return self.inner.read_and_clear_dirty()

    def gather(self, pfns: PfnArray, out: PageArray) -> None:
        self.inner.gather(pfns, out)

    def scatter(self, pfns: PfnArray, pages: PageArray) -> None:
        self.inner.scatter(pfns, pages)

    def populated_pfns(self) -> PfnArray:
        return self.inner.populated_pfns()

    def populate(self, pfns: PfnArray) -> None:
        self.inner.populate(pfns)

    def get_context(self) -> Context:
        return self.inner.get_context()

    def set_context(self, ctx: Context) -> None:
        self.inner.set_context(ctx)

    def output_unplug(self) -> None:
        self.inner.output_unplug()

    def destroy(self) -> None:
        self.inner.destroy()

    def close(self) -> None:
        self.inner.close()


def wrapper(fault: Fault) -> SessionWrap:
    """The hook that puts ``fault`` into the session it names."""

    def wrap(session: int, link: Link, domain: Domain) -> tuple[Link, Domain]:
        if session != fault.session:
            return link, domain
        info = domain.info()
        death = _Death()
        return (
            FaultyLink(link, fault, info.name, info.pages, death),
            FaultyDomain(domain, fault, info.name, death),
        )

    return wrap


def session_wrapper() -> SessionWrap | None:
    """The session hook for REMUSD_FAULT (None when it is unset or not understood)."""
    fault = from_env()
    return None if fault is None else wrapper(fault)
