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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemonkit.transport import Transport
from xenbind import session as sp
from xenbind.errors import DomainError
from xenbind.hypervisor import Domain
from xenbind.stream.encoder import StreamWriter
from xenbind.types import DomainConfig, DomainInfo

from .config import ProtectRequest
from .core import AckViolation, EpochCore, Heartbeats, next_epoch
from .epoch import CheckpointBuffer, capture, encode
from .initial_copy import initial_copy
from .link import Link, LinkDown, SessionWrap, make_link
from .pacer import Pacer
from .policy import Action, Event, RetryPolicy, State, Step
from .stats import HISTORY, DomainStats, Identity

log = logging.getLogger(__name__)

SOFTWARE = "remusd 0.1.0"

STATES = tuple(s.value for s in State)

__all__ = ["HISTORY", "SOFTWARE", "STATES", "Protector", "Tuning"]

#: how a network link connects: ``connect(host, port, timeout)``
Connector = Callable[[str, int, float], Transport]


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
        )


class Protector:
    """The session thread of one domain."""

    def __init__(
        self, domain: Domain, info: DomainInfo, req: ProtectRequest, tuning: Tuning
    ) -> None:
        self.domain = domain
        self.info = info
        self.req = req
        self.tuning = tuning
        self._lock = threading.Lock()  # guards stats; never held across I/O
        self._stop = threading.Event()  # asked to end (clean)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"protect-{info.name}", daemon=True)
        self.generation = time.time_ns()
        self.policy = RetryPolicy(tuning.retry_min, tuning.retry_max)
        self.stats = DomainStats(state=self.policy.state.value, since=time.time())
        self._ident = Identity(
            info.domid, info.name, str(req.target), req.codec, req.interval_ms, req.verify
        )
        self._engaged = False  # log-dirty on / output plugged by the current session

    # -- control -----------------------------------------------------------------

    def start(self) -> Protector:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask for a clean end (LAST_CHECKPOINT); returns at once."""
        self._stop.set()
        self._wake.set()

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

    def status(self, history: bool = False) -> dict[str, Any]:
        """The domain's status (docs/operations.md); ``history``: add the
        figures of the last HISTORY acknowledged checkpoints, oldest first."""
        with self._lock:
            return self.stats.as_json(self._ident, history)

    # -- the state machine's actions ---------------------------------------------

    def _advance(
        self,
        event: Event,
        reason: str | None = None,
        *,
        cause: str = "",
        failover_timeout_ms: int | None = None,
    ) -> Step:
        """The one way the state changes: the policy's move, its actions on the
        domain, then the new state in the status."""
        step = self.policy.advance(event, failover_timeout_ms=failover_timeout_ms)
        for action in step.actions:
            if action is Action.UNPROTECT:
                self._unprotect()
            elif action is Action.FENCE:
                self._fence(cause)
            elif action is Action.COUNT_RETRY:
                with self._lock:
                    self.stats.retries += 1
        with self._lock:
            self.stats.set_state(step.state.value, reason, time.time())
        return step

    def _unprotect(self) -> None:
        """The guest runs on with its output released (no backup to wait for)."""
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
        if self._engaged:
            self._engaged = False
            for op in (self.domain.pause, self.domain.disable_logdirty):
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

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            step = self._attempt()
            if step is None:
                return
            if Action.PARK in step.actions:
                self._stop.wait()
                self._stopped()
                return
            assert step.wait is not None
            if self._stop.wait(step.wait):
                self._stopped()
                return
            self._advance(Event.RETRY, self.reason)

    def _stopped(self) -> None:
        if self.policy.state is State.FENCED:
            self._advance(Event.STOP, f"fenced: {self.reason}")
        else:
            self._advance(Event.STOP, "unprotected on request")

    def _attempt(self) -> Step | None:
        """One session and what the policy makes of its end; None: the thread ends."""
        if self._stop.is_set():
            self._stopped()
            return None
        try:
            self._session()
            return None
        except LinkDown as e:
            if e.fenced:
                why = "this copy paused" if self._engaged else "possible split brain"
                return self._advance(
                    Event.FENCED, f"{e.reason} ({why}; not retrying)", cause=e.reason
                )
            if e.permanent:
                log.error(
                    "domain %s: %s; not retrying (unprotect and protect again to retry)",
                    self.info.name,
                    e.reason,
                )
                return self._advance(Event.REFUSED, f"{e.reason} (not retrying)")
            event = self.policy.loss()
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

    def _hello(self) -> sp.Hello:
        i = self.info
        return sp.Hello(
            session_id=sp.new_session_id(),
            options=sp.Options(
                codec=self.req.codec,
                cache_pages=self.tuning.cache_pages,
                buffer_pages=self.tuning.buffer_pages,
                interval_ms=self.req.interval_ms,
                heartbeat_ms=self.req.interval_ms,
                verify=self.req.verify,
            ),
            domain=DomainConfig(
                name=i.name,
                uuid=i.uuid,
                pages=i.pages,
                vcpus=i.vcpus,
                hvm=i.hvm,
                extra=dict(i.extra),
            ),
            generation=self.generation,
            software=SOFTWARE,
        )

    def _session(self) -> None:
        """One session: connect, initial copy, epochs until asked to stop.

        Returns after a clean end; raises LinkDown when the backup is lost.
        """
        t = self.tuning
        hello = self._hello()
        interval = self.req.interval_ms / 1000.0
        link = make_link(
            self.req.target,
            hello,
            connect_timeout=t.connect_timeout,
            io_timeout=max(t.ack_timeout, interval),
            accept_timeout=t.accept_timeout,
            connect=t.connect,
        )
        domain = self.domain
        if t.wrap is not None:
            link, domain = t.wrap(self.stats.sessions + 1, link, domain)
        try:
            link.open()
            self._advance(Event.OPENED)
            with self._lock:
                self.stats.new_session(hello.session_id if link.kind == "tcp" else None)
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
                self._protect(link, domain, writer, EpochCore(), pacer, interval)
            finally:
                pacer.stop()
        finally:
            link.close()

    def _protect(
        self,
        link: Link,
        domain: Domain,
        writer: StreamWriter,
        core: EpochCore,
        pacer: Pacer,
        interval: float,
    ) -> None:
        t = self.tuning
        cb = CheckpointBuffer(self.info.pages, self.req.verify)
        t0 = time.monotonic()
        self._engaged = True
        res = initial_copy(
            domain,
            link,
            writer,
            cb,
            rounds=t.precopy_rounds,
            threshold=t.precopy_threshold,
            stop=self._stop.is_set,
        )
        last = self._stop.is_set()
        bufs = encode(writer, res.final, last=last)
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
            last = self._stop.is_set()
            index = core.next_index
            t_cap = time.monotonic()
            cap = capture(domain, cb, prescan=t.prescan)
            t_enc = time.monotonic()
            bufs = encode(writer, cap, last=last)
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
        return link.send_checkpoint(index, bufs)

    def _acknowledge(
        self, link: Link, domain: Domain, core: EpochCore, digest: bytes | None
    ) -> None:
        """Wait for the ACK of the checkpoint in flight, then release its output."""
        assert core.index is not None
        index = core.index
        deadline = time.monotonic() + self.tuning.ack_timeout
        mismatch = False
        while not core.acked_through(index):
            acks = link.next_acks(deadline)
            if not acks and time.monotonic() >= deadline:
                raise LinkDown(f"{link.peer} did not acknowledge checkpoint {index} in time")
            mismatch = self._take_acks(link, core, acks) or mismatch
        with self._lock:
            self.stats.acknowledged(index, digest, mismatch)
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
