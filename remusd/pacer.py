"""The session's heartbeat thread: the one path a sender's HEARTBEAT goes out by.

Rules:
- ``remusd.core.Heartbeats`` decides when one is due (the link idle for half
  the checkpoint interval, the stream started, not closed); the pacer asks it
  every ``period_s`` and sends through ``Link.heartbeat_if``, which re-asks
  under the link's send lock, so the tag lands between chunks and never
  after the schedule was closed.
- It runs whatever the session thread is doing (a long pause, compressing a
  big checkpoint, waiting for an ACK), so the receiver's failover timer never
  fires while this primary lives.
- A link without heartbeats (a file) gets no thread. A broken link ends the
  thread quietly: the session thread finds out on its own.
"""

from __future__ import annotations

import threading

from .core import Heartbeats
from .link import Link, LinkDown


class Pacer:
    def __init__(self, link: Link, beat: bytes, schedule: Heartbeats, name: str) -> None:
        self._link, self._beat, self.schedule = link, beat, schedule
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if link.heartbeats:
            self._thread = threading.Thread(target=self._run, name=f"pacer-{name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.schedule.period_s):
            try:
                self._link.heartbeat_if(self.schedule.due, self._beat)
            except LinkDown:
                return

    def stop(self) -> None:
        """No heartbeat goes out after this returns."""
        self.schedule.close()
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
