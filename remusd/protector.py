"""One protected domain: a thread running sessions to its backup, and its status.

States (``Protector.state``)::

    initial-copy  connecting, handshake, the live copy of checkpoint 0
    protected     checkpoint 0 acknowledged; the epoch loop runs
    unprotected   the backup is gone (``reason`` says why): the guest runs with
                  its output released at once; retries with backoff
                  (retry_min doubling up to retry_max), and each retry makes a
                  fresh session with a fresh initial copy. After losing a
                  session whose checkpoint 0 was acknowledged, the first retry
                  is immediate: the receiver fails its backup over after its
                  failover timeout unless a new session supersedes it
    fenced        the receiver's backup of the domain runs (it failed over):
                  the guest here is paused with its output withheld (or, if
                  it already ran unprotected, left running: split brain, see
                  docs/operations.md); never retried
    stopped       protection ended (remusctl unprotect, daemon stop, the
                  domain is gone, or a refusal retrying cannot cure)

The epoch loop (design.md, "One epoch on the primary")::

    capture (paused: dirty bitmap, one gather, context, output barrier)
    encode (running: Format B through the StreamWriter's compressor)
    send; wait for the ACK of that checkpoint (heartbeats meanwhile)
    output_release()
    sleep until the next interval starts

Rules:
- The guest's output is released only after the ACK of the checkpoint that
  holds it (one ``output_release`` per acknowledged checkpoint, in order);
  when the session is lost, ``output_unplug`` releases everything at once:
  the guest runs unprotected rather than stalls.
- The guest is never left paused: every pause is paired with an unpause in
  ``epoch.capture``.
- A clean end (unprotect, daemon stop) sends one last checkpoint carrying
  LAST_CHECKPOINT, waits for its ACK, then unplugs and closes: the backup does
  not fail over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from xenbind import session as sp
from xenbind.errors import DomainError
from xenbind.hypervisor import Domain
from xenbind.stream.encoder import StreamWriter
from xenbind.types import DomainConfig, DomainInfo

from . import faults
from .config import ProtectRequest
from .epoch import CheckpointBuffer, capture, encode
from .initial_copy import initial_copy
from .link import Link, LinkDown, make_link

log = logging.getLogger(__name__)

SOFTWARE = "remusd 0.1.0"

STATES = ("initial-copy", "protected", "unprotected", "fenced", "stopped")

#: Acknowledged checkpoints (after checkpoint 0) whose figures the status keeps
#: for ``{"cmd": "status", "history": true}`` (bench/e2e.py reads them).
HISTORY = 4096


def _nothing() -> None:
    pass


class _StallingLink:
    """Fault injection (REMUSD_FAULT=stall-mid-checkpoint:S:0, remusd.faults):
    forwards to a link until ``limit`` bytes went out, then hangs inside the
    initial copy."""

    def __init__(self, link: Link, limit: int, name: str, pacer: _Pacer) -> None:
        self._link, self._limit, self._name, self._sent = link, limit, name, 0
        self._pacer = pacer
        self.heartbeats = False  # a dying primary sends no heartbeat

    def send(self, buffers) -> int:
        n = self._link.send(buffers)
        self._sent += n
        if self._sent >= self._limit:
            faults.hang(
                self._pacer.stop,
                f"domain {self._name}: sent {self._sent} bytes of the initial copy",
            )
        return n

    def poll(self) -> None:
        self._link.poll()


class _Pacer:
    """The session's heartbeat thread: a HEARTBEAT tag whenever the link has
    been idle for half the heartbeat interval, whatever the session thread is
    doing (a long pause, compressing a big checkpoint, waiting for an ACK), so
    the receiver's failover timer never fires while this primary lives."""

    def __init__(self, link: Link, beat: bytes, heartbeat_s: float, name: str) -> None:
        self._stop = threading.Event()
        self._thread = None
        if not link.heartbeats or not hasattr(link, "heartbeat_if_idle"):
            return
        self._link, self._beat = link, beat
        self._idle = heartbeat_s / 2
        self._thread = threading.Thread(target=self._run, name=f"pacer-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = max(0.005, self._idle / 2)
        while not self._stop.wait(period):
            try:
                self._link.heartbeat_if_idle(self._beat, self._idle)
            except LinkDown:
                return  # the session thread finds out on its own

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Tuning:
    """The daemon-wide knobs a protector reads (from remusd's configuration)."""

    def __init__(self, args) -> None:
        self.ack_timeout = float(args.ack_timeout)
        self.connect_timeout = float(args.connect_timeout)
        self.accept_timeout = float(args.accept_timeout)
        self.prescan = bool(args.prescan)
        self.retry_min = float(args.retry_min)
        self.retry_max = float(args.retry_max)
        self.precopy_rounds = int(args.precopy_rounds)
        self.precopy_threshold = int(args.precopy_threshold)
        self.buffer_pages = int(args.buffer_pages)
        self.cache_pages = int(args.cache_pages)
        #: how a network link connects: TLS or plaintext, chosen by remusd.cli
        self.connect = getattr(args, "connector", None)


class Protector:
    """The session thread of one domain."""

    def __init__(
        self, domain: Domain, info: DomainInfo, req: ProtectRequest, tuning: Tuning
    ) -> None:
        self.domain = domain
        self.info = info
        self.req = req
        self.tuning = tuning
        self._lock = threading.Lock()
        self._stop = threading.Event()  # asked to end (clean)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"protect-{info.name}", daemon=True)
        self.generation = time.time_ns()
        # status (under _lock)
        self.state = "initial-copy"
        self.reason: str | None = None
        self.since = time.time()
        self.checkpoints = 0  # acknowledged checkpoints, all sessions
        self.acked: int | None = None  # index of the last acked checkpoint, this session
        self.last_pause_ms: float | None = None
        self.dirty_pages: int | None = None
        self.bytes_sent = 0
        self.raw_b = 0  # page bytes of Format B checkpoints
        self.wire_b = 0  # their encoded size
        self.session_id: str | None = None
        self.sessions = 0
        self.retries = 0
        self.mismatches = 0
        self.acked_digest: str | None = None  # verify mode: digest of the last acked checkpoint
        # per acknowledged checkpoint >= 1: (index, pause ms, dirty pages, bytes sent)
        self.history: deque[tuple[int, float, int, int]] = deque(maxlen=HISTORY)
        self.cache_hits = 0  # the compressor's page cache, this session
        self.cache_misses = 0
        self.cache_zero_base = 0  # misses sent as deltas against a zero page (in misses too)
        self.started = time.monotonic()
        self._fault = faults.from_env()
        self._engaged = False  # log-dirty on / output plugged by the current session
        #: the receiver's failover timeout (ms) once it acknowledged checkpoint 0
        #: of the current session (it then holds a backup it may resume), else None
        self._failover_capable: int | None = None
        self._pacer: _Pacer | None = None

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

    def _set(self, state: str, reason: str | None = None) -> None:
        with self._lock:
            if state != self.state or reason != self.reason:
                self.since = time.time()
            self.state = state
            self.reason = reason

    def status(self, history: bool = False) -> dict:
        """The domain's status (docs/operations.md); ``history``: add the
        figures of the last HISTORY acknowledged checkpoints, oldest first."""
        with self._lock:
            ratio = (self.raw_b / self.wire_b) if self.wire_b else None
            extra = {}
            if history:
                cols = list(zip(*self.history, strict=True)) or [(), (), (), ()]
                extra["history"] = {
                    "index": list(cols[0]),
                    "pause_ms": list(cols[1]),
                    "pages": list(cols[2]),
                    "bytes": list(cols[3]),
                }
            return extra | {
                "domid": self.info.domid,
                "name": self.info.name,
                "state": self.state,
                "reason": self.reason,
                "since": round(self.since, 3),
                "target": str(self.req.target),
                "codec": self.req.codec,
                "interval_ms": self.req.interval_ms,
                "verify": self.req.verify,
                "checkpoints": self.checkpoints,
                "acked": self.acked,
                "last_pause_ms": None
                if self.last_pause_ms is None
                else round(self.last_pause_ms, 3),
                "dirty_pages": self.dirty_pages,
                "bytes_sent": self.bytes_sent,
                "compression_ratio": None if ratio is None else round(ratio, 3),
                "session": self.session_id,
                "sessions": self.sessions,
                "retries": self.retries,
                "verify_mismatches": self.mismatches,
                "acked_digest": self.acked_digest,
                "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses,
                "cache_zero_base": self.cache_zero_base,
            }

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        delay = self.tuning.retry_min
        while not self._stop.is_set():
            link: Link | None = None
            try:
                link = self._session()
                if self._stop.is_set():
                    break
            except LinkDown as e:
                if e.fenced:
                    self._fenced(e)
                    self._stop.wait()
                    break
                self._unprotect(f"backup lost: {e.reason}")
                if e.permanent:
                    log.error(
                        "domain %s: %s; not retrying (unprotect and protect again to retry)",
                        self.info.name,
                        e.reason,
                    )
                    self._set("unprotected", f"{e.reason} (not retrying)")
                    self._stop.wait()
                    break
                wait = delay
                if self._failover_capable is not None:
                    # the receiver holds a committed backup and fails it over after
                    # its timeout of silence unless a new session supersedes it first
                    # (a reset link, a receiver that closed on a hiccup): reconnect now
                    log.warning(
                        "domain %s unprotected: %s; reconnecting at once (the "
                        "receiver fails over after %d ms without us)",
                        self.info.name,
                        e.reason,
                        self._failover_capable,
                    )
                    self._failover_capable = None
                    wait = 0.0
                else:
                    log.warning(
                        "domain %s unprotected: %s; retrying in %.1f s",
                        self.info.name,
                        e.reason,
                        delay,
                    )
                if self._stop.wait(wait):
                    break
                with self._lock:
                    self.retries += 1
                if wait:
                    delay = min(delay * 2, self.tuning.retry_max)
                continue
            except DomainError as e:
                log.error("domain %s: %s; protection stopped", self.info.name, e)
                self._unprotect(str(e))
                self._set("stopped", str(e))
                return
            except Exception as e:  # a bug: keep the guest running, say so
                log.exception("domain %s: protection failed", self.info.name)
                self._unprotect(f"internal error: {e}")
                self._set("stopped", f"internal error: {e}")
                return
            finally:
                if link is not None:
                    link.close()
            delay = self.tuning.retry_min
        if self.state == "fenced":
            self._set("stopped", f"fenced: {self.reason}")
        elif self.state != "stopped":
            self._set("stopped", "unprotected on request")

    def _unprotect(self, reason: str) -> None:
        """The guest runs on with its output released (no backup to wait for)."""
        self._set("unprotected", reason)
        if not self._engaged:
            return  # this session never touched the domain (e.g. connect refused)
        self._engaged = False
        for op in (self.domain.output_unplug, self.domain.disable_logdirty):
            try:
                op()
            except DomainError as e:
                log.warning("domain %s: %s", self.info.name, e)

    def _fenced(self, e: LinkDown) -> None:
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
                e.reason,
            )
            self._set("fenced", f"{e.reason} (this copy paused; not retrying)")
        else:
            log.critical(
                "domain %s FENCED: %s; this copy ran unprotected meanwhile: possible "
                "SPLIT BRAIN, an operator must decide which copy lives; not retrying",
                self.info.name,
                e.reason,
            )
            self._set("fenced", f"{e.reason} (possible split brain; not retrying)")

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

    def _session(self) -> Link:
        """One session: connect, initial copy, epochs until asked to stop.

        Returns the link (closed by the caller) after a clean end; raises
        LinkDown when the backup is lost.
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
        link.open()
        self._set("initial-copy")
        try:
            return self._stream(link, hello, interval)
        except BaseException:
            link.close()
            raise

    def _stream(self, link: Link, hello: sp.Hello, interval: float) -> Link:
        t = self.tuning
        with self._lock:
            self.session_id = hello.session_id if link.kind == "tcp" else None
            self.sessions += 1
            self.acked = None
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
        cb = CheckpointBuffer(self.info.pages, self.req.verify)

        def heartbeat() -> None:
            if link.heartbeats:
                link.send([writer.heartbeat()])

        self._pacer = _Pacer(link, writer.heartbeat(), interval, self.info.name)
        try:
            return self._protect(link, writer, cb, heartbeat, interval)
        finally:
            self._pacer.stop()

    def _protect(
        self, link: Link, writer: StreamWriter, cb: CheckpointBuffer, heartbeat, interval: float
    ) -> Link:
        t = self.tuning
        t0 = time.monotonic()
        self._engaged = True
        copy_link = link
        if self._fault_at("stall-mid-checkpoint", 0):
            copy_link = _StallingLink(
                link, self.info.pages * 4096 // 2, self.info.name, self._pacer
            )
        res = initial_copy(
            self.domain,
            copy_link,
            writer,
            cb,
            rounds=t.precopy_rounds,
            threshold=t.precopy_threshold,
            heartbeat_s=interval,
            stop=self._stop.is_set,
        )
        last = self._stop.is_set()
        bufs = encode(writer, res.final, last=last)
        self._fault_send(link, bufs, 0)
        if last:  # nothing may follow the LAST_CHECKPOINT checkpoint, heartbeats included
            self._pacer.stop()
        sent = res.bytes_sent + link.send(bufs)
        self._acked(link, 0, _nothing if last else heartbeat, interval, res.final.digest)
        if link.kind != "file":  # a receiver now holds a backup it may resume
            self._failover_capable = link.failover_timeout_ms or 0
        with self._lock:
            self.bytes_sent += sent
            self.last_pause_ms = res.final.pause_ms
            self.dirty_pages = len(res.final.pfns)
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
            return self._clean_end(link)
        self._set("protected")
        index = 0
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
            index += 1
            t_cap = time.monotonic()
            hold = None
            if self._fault_at("stall-paused", index):
                hold = lambda i=index: faults.hang(  # noqa: E731
                    self._pacer.stop,
                    f"domain {self.info.name}: guest paused in the capture of checkpoint {i}",
                )
            cap = capture(self.domain, cb, hold=hold, prescan=t.prescan)
            t_enc = time.monotonic()
            bufs = encode(writer, cap, last=last)
            self._fault_send(link, bufs, index)
            if last:
                self._pacer.stop()
            t_send = time.monotonic()
            n = link.send(bufs)
            t_ack = time.monotonic()
            self._acked(link, index, _nothing if last else heartbeat, interval, cap.digest)
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
            with self._lock:
                self.bytes_sent += n
                self.last_pause_ms = cap.pause_ms
                self.dirty_pages = len(cap.pfns)
                if writer.format == "B" and len(cap.pfns):
                    self.raw_b += len(cap.pfns) * 4096
                    self.wire_b += n
                self.history.append((index, round(cap.pause_ms, 4), len(cap.pfns), n))
                cs = writer.codec_stats
                if cs is not None:
                    self.cache_hits, self.cache_misses = cs.hits, cs.misses
                    self.cache_zero_base = cs.zero_base
            if last:
                return self._clean_end(link)
            next_t += interval
            if next_t < time.monotonic():  # overran: start the next epoch now
                next_t = time.monotonic()

    def _acked(
        self, link: Link, index: int, heartbeat, interval: float, digest: bytes | None
    ) -> None:
        deadline = time.monotonic() + self.tuning.ack_timeout
        ack = link.wait_ack(index, deadline, heartbeat, interval)
        with self._lock:
            self.checkpoints += 1
            self.acked = index
            self.acked_digest = digest.hex() if digest is not None else None
            if ack.mismatch:
                self.mismatches += 1
        if self._fault_at("stall-after-ack", index):
            faults.hang(
                self._pacer.stop,
                f"domain {self.info.name}: checkpoint {index} "
                "acknowledged, its output not released",
            )
        self.domain.output_release()
        if self._fault_at("stall-after-release", index):
            faults.hang(
                self._pacer.stop,
                f"domain {self.info.name}: checkpoint {index} acknowledged and its output released",
            )
        if digest is not None:
            log.debug(
                "domain %s: checkpoint %d acknowledged, xxh3-128 %s",
                self.info.name,
                index,
                digest.hex(),
            )

    def _fault_at(self, kind: str, index: int) -> bool:
        return self._fault is not None and self._fault.at(kind, self.sessions, index)

    def _fault_send(self, link: Link, bufs: list, index: int) -> None:
        """Fault injection (remusd.faults): send part of checkpoint ``index``
        and hang, as a primary dying in mid-transmission would."""
        if self._fault is None or not any(
            self._fault_at(k, index)
            for k in ("stall-mid-checkpoint", "stall-mid-chunk", "stall-before-tail")
        ):
            return
        if self._fault.kind == "stall-mid-checkpoint" and index == 0:
            return  # the initial copy's own bytes: _StallingLink
        self._pacer.stop()  # no heartbeat may slip in after a partial chunk
        name = self.info.name
        if self._fault_at("stall-mid-checkpoint", index):
            data = b"".join(faults.flat(bufs))
            link.send([data[: len(data) // 2]])
            faults.hang(
                self._pacer.stop,
                f"domain {name}: sent {len(data) // 2} of {len(data)} bytes of checkpoint {index}",
            )
        if self._fault_at("stall-mid-chunk", index):
            first = faults.flat(bufs[:1])[0]
            link.send([first[: len(first) // 2]])
            faults.hang(
                self._pacer.stop,
                f"domain {name}: sent {len(first) // 2} of the "
                f"{len(first)} bytes of checkpoint {index}'s first chunk",
            )
        if self._fault_at("stall-before-tail", index):
            n = link.send(bufs[:-1])
            faults.hang(
                self._pacer.stop, f"domain {name}: sent checkpoint {index} but its tail ({n} bytes)"
            )

    def _clean_end(self, link: Link) -> Link:
        log.info(
            "domain %s: session ended cleanly (LAST_CHECKPOINT acknowledged); "
            "the guest runs unprotected",
            self.info.name,
        )
        self._unprotect("unprotected on request")
        self._set("stopped", "unprotected on request")
        return link
