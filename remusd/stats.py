"""The status counters of one protected domain, and their JSON (``remusctl status``).

Rules:
- One ``DomainStats`` per protector; its owner guards it with one lock and
  never holds that lock across I/O (the control socket's ``status`` reads it).
- ``as_json`` is the schema of docs/operations.md, key for key; ``history``
  adds the figures of the last ``HISTORY`` acknowledged checkpoints after
  checkpoint 0 (bench/e2e.py reads them), oldest first.
- Counters named "this session" are reset by ``new_session``; the others add
  up over every session of the protection.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: Acknowledged checkpoints (after checkpoint 0) whose figures the status keeps
#: for ``{"cmd": "status", "history": true}``.
HISTORY = 4096


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

    def set_state(self, state: str, reason: str | None, now: float) -> None:
        if state != self.state or reason != self.reason:
            self.since = now
        self.state, self.reason = state, reason

    def new_session(self, session_id: str | None) -> None:
        self.session_id = session_id
        self.sessions += 1
        self.acked = None

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
        if cache is not None:
            self.cache_hits, self.cache_misses, self.cache_zero_base = cache

    def as_json(self, ident: Identity, history: bool = False) -> dict[str, Any]:
        """The domain's status (docs/operations.md)."""
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
        }
