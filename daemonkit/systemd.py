"""systemd integration: sd_notify and the watchdog.

systemd (``sd_notify``, ``Watchdog``)
    ``sd_notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET`` (a path,
    or ``@name`` for the abstract namespace); without the variable it does
    nothing and returns False. ``Watchdog`` pings ``WATCHDOG=1`` every half
    ``$WATCHDOG_USEC`` (when ``$WATCHDOG_PID`` is unset or ours) as long as its
    ``healthy()`` callback says so: a wedged daemon stops pinging and systemd
    restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1\\nSTATUS=...") to systemd; False if not under it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half WATCHDOG_USEC), or None if not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2e6


class Watchdog:
    """Pings systemd's watchdog from a thread while ``healthy()`` is true."""

    def __init__(self, healthy: Callable[[], bool] | None = None) -> None:
        self.interval = watchdog_interval()
        self._healthy = healthy or (lambda: True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.interval is None:
            return self
        log.info("systemd watchdog: pinging every %.1f s", self.interval)
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            try:
                ok = self._healthy()
            except Exception:  # a failing health check is "not healthy"
                log.exception("watchdog health check failed")
                ok = False
            if ok:
                sd_notify("WATCHDOG=1")
            else:
                log.warning("watchdog: daemon unhealthy, not pinging")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
