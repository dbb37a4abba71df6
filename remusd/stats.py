"""The status counters of one protected domain, and their JSON (``remusctl status``).

Rules:
- One ``DomainStats`` per protector; its owner guards it with one lock and
  never holds that lock across I/O (the control socket's ``status`` reads it).
- ``as_json`` is the schema of docs/operations.md, key for key; ``history``
  adds the figures of the last ``HISTORY`` acknowledged checkpoints after
  checkpoint 0 (bench/e2e.py reads them), oldest first.
- Counters named "this session" are reset by ``new_session``; the others add
  up over every session of the protection.
- The latency distributions (``pause_hist``, ``ack_hist``, ``dirty_hist``)
  are ``daemonkit.metrics.Histogram``s, observed once per acknowledged
  checkpoint; remusd.metrics exports them at each scrape (no other copy).
- Times come in as arguments (``now``: wall clock, ``mono``: monotonic):
  no clock is read here.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from daemonkit.metrics import Histogram

#: Acknowledged checkpoints (after checkpoint 0) whose figures the status keeps
#: for ``{"cmd": "status", "history": true}``.
HISTORY = 4096
#: ACK waits of a session kept for its median (the HELLO's ``ack_ms`` of the next one)
ACK_WAITS = 1024
#: the checkpoint rate is measured over the acknowledgements of the last this many seconds
RATE_WINDOW_S = 10.0
#: upper bounds of the dirty-pages-per-checkpoint buckets
DIRTY_BUCKETS: tuple[float, ...] = (
    0,
    10,
    30,
    100,
    300,
    1000,
    3000,
    10000,
    30000,
    100000,
    300000,
    1000000,
)


def median_ms(waits: list[float]) -> int:
    """The median of ``waits`` (seconds) in whole ms, rounded up; 0 for none."""
    if not waits:
        return 0
    w = sorted(waits)
    mid = len(w) // 2
    m = w[mid] if len(w) % 2 else (w[mid - 1] + w[mid]) / 2
    return max(1, math.ceil(m * 1000))


@dataclass(frozen=True)
class Identity:
    """What a status says about the protection itself (it never changes)."""

    domid: int
    name: str
    target: str
    codec: str
    interval_ms: int
    verify: bool


@dataclass
class DomainStats:
    state: str
    since: float  # wall clock of the last change of state or reason
    reason: str | None = None
    checkpoints: int = 0  # acknowledged checkpoints, all sessions
    acked: int | None = None  # index of the last acked checkpoint, this session
    last_pause_ms: float | None = None
    dirty_pages: int | None = None
    bytes_sent: int = 0
    raw_b: int = 0  # page bytes of Format B checkpoints
    wire_b: int = 0  # their encoded size
    session_id: str | None = None  # this session's (network targets only)
    sessions: int = 0
    retries: int = 0
    mismatches: int = 0
    acked_digest: str | None = None  # verify mode: digest of the last acked checkpoint
    cache_hits: int = 0  # the compressor's page cache, this session
    cache_misses: int = 0
    cache_zero_base: int = 0  # misses sent as deltas against a zero page (in misses too)
    #: per acknowledged checkpoint >= 1: (index, pause ms, dirty pages, bytes sent)
    history: deque[tuple[int, float, int, int]] = field(
        default_factory=lambda: deque(maxlen=HISTORY)
    )
    case: str = "initial-copy"  # remusd.policy.Case: the operator's situation
    adopted: bool = False  # taken over from a remusd that died protecting it
    fences: int = 0  # times the receiver said its backup took over (failovers seen)
    failover_timeout_ms: int | None = None  # the receiver's, from this session's ACCEPT
    peer_address: str | None = None  # this session's receiver, as connected (IP:PORT)
    peer_names: list[str] = field(default_factory=list)  # its certificate's names (TLS)
    peer_not_after: float | None = None  # its certificate's expiry (unix time; TLS)
    hello_ack_ms: int = 0  # the ack_ms this session's HELLO carried
    last_ack_wall: float | None = None  # wall clock of the last ACK
    #: this session's ACK waits (s: checkpoint sent -> acknowledged), for the median
    ack_waits: deque[float] = field(default_factory=lambda: deque(maxlen=ACK_WAITS))
    prev_ack_ms: int = 0  # the median ACK wait of the previous session (ms; 0: unknown)
    #: monotonic times of recent ACKs (the checkpoint rate)
    ack_times: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    pause_hist: Histogram = field(default_factory=Histogram, repr=False, compare=False)
    ack_hist: Histogram = field(default_factory=Histogram, repr=False, compare=False)
    dirty_hist: Histogram = field(
        default_factory=lambda: Histogram(DIRTY_BUCKETS), repr=False, compare=False
    )

    def set_state(self, state: str, reason: str | None, now: float) -> None:
        if state != self.state or reason != self.reason:
            self.since = now
        self.state, self.reason = state, reason

    def new_session(self, session_id: str | None) -> None:
        self.session_id = session_id
        self.sessions += 1
        self.acked = None
        if self.ack_waits:
            self.prev_ack_ms = median_ms(list(self.ack_waits))
        self.ack_waits.clear()

    def ack_ms(self) -> int:
        """What the next HELLO says: the median ACK wait of the last session
        that had any (this one while it runs), in ms; 0 when unknown."""
        return median_ms(list(self.ack_waits)) if self.ack_waits else self.prev_ack_ms

    def ack_wait(self, seconds: float, now: float, mono: float) -> None:
        """A checkpoint was acknowledged ``seconds`` after it was sent."""
        self.ack_waits.append(seconds)
        self.ack_hist.observe(seconds)
        self.last_ack_wall = now
        self.ack_times.append(mono)

    def rate(self, mono: float) -> float | None:
        """Checkpoints acknowledged per second over the last RATE_WINDOW_S."""
        times = [t for t in self.ack_times if mono - t <= RATE_WINDOW_S]
        if len(times) < 2:
            return None
        span = max(times[-1] - times[0], mono - times[-1])
        return (len(times) - 1) / span if span > 0 else None

    def acknowledged(self, index: int, digest: bytes | None, mismatch: bool) -> None:
        self.checkpoints += 1
        self.acked = index
        self.acked_digest = digest.hex() if digest is not None else None
        if mismatch:
            self.mismatches += 1

    def sent(self, nbytes: int, pause_ms: float, pages: int) -> None:
        """A checkpoint of ``pages`` dirty pages went out in ``nbytes``."""
        self.bytes_sent += nbytes
        self.last_pause_ms = pause_ms
        self.dirty_pages = pages

    def epoch(
        self,
        index: int,
        nbytes: int,
        pause_ms: float,
        pages: int,
        format_b: bool,
        cache: tuple[int, int, int] | None,
    ) -> None:
        """Checkpoint ``index`` >= 1 is acknowledged: its figures.
        ``cache``: the compressor's (hits, misses, zero_base), if it has one."""
        self.sent(nbytes, pause_ms, pages)
        if format_b and pages:
            self.raw_b += pages * 4096
            self.wire_b += nbytes
        self.history.append((index, round(pause_ms, 4), pages, nbytes))
        self.pause_hist.observe(pause_ms / 1000.0)
        self.dirty_hist.observe(float(pages))
        if cache is not None:
            self.cache_hits, self.cache_misses, self.cache_zero_base = cache

    def as_json(
        self,
        ident: Identity,
        history: bool = False,
        now: float | None = None,
        mono: float | None = None,
    ) -> dict[str, Any]:
        """The domain's status (docs/operations.md); ``now``/``mono``: the
        wall and monotonic clocks, for the ages and the rate (None: left out)."""
        ratio = (self.raw_b / self.wire_b) if self.wire_b else None
        extra: dict[str, Any] = {}
        if history:
            cols: list[tuple[Any, ...]] = list(zip(*self.history, strict=True)) or [
                (),
                (),
                (),
                (),
            ]
            extra["history"] = {
                "index": list(cols[0]),
                "pause_ms": list(cols[1]),
                "pages": list(cols[2]),
                "bytes": list(cols[3]),
            }
        return extra | {
            "domid": ident.domid,
            "name": ident.name,
            "state": self.state,
            "reason": self.reason,
            "since": round(self.since, 3),
            "target": ident.target,
            "codec": ident.codec,
            "interval_ms": ident.interval_ms,
            "verify": ident.verify,
            "checkpoints": self.checkpoints,
            "acked": self.acked,
            "last_pause_ms": None if self.last_pause_ms is None else round(self.last_pause_ms, 3),
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
            "case": self.case,
            "adopted": self.adopted,
            "failovers_seen": self.fences,
            "failover_timeout_ms": self.failover_timeout_ms,
            "checkpoint_rate": None
            if mono is None or (r := self.rate(mono)) is None
            else round(r, 2),
            "last_ack_age_s": None
            if now is None or self.last_ack_wall is None
            else round(max(0.0, now - self.last_ack_wall), 3),
            "ack_median_ms": self.ack_ms(),
            "hello_ack_ms": self.hello_ack_ms,
            "peer_address": self.peer_address,
            "peer_names": list(self.peer_names),
            "peer_not_after": None if self.peer_not_after is None else round(self.peer_not_after),
            "peer_expires_in_days": None
            if now is None or self.peer_not_after is None
            else round((self.peer_not_after - now) / 86400, 1),
        }
