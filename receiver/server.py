"""The listening socket: accept connections, one session thread each.

Rules kept here:
- Accepting does no I/O on the new connection: it is handed over as a
  ``PlainTransport``; with TLS configured the connection's own thread runs the
  TLS handshake (``Connection._secure``), so a slow or hostile client never
  blocks the accept loop. Sessions see a ``daemonkit.transport.Transport``.
- A flood of connections cannot exhaust the daemon: past the connection cap
  (2 x max-sessions + 8) a new connection is closed at once, with a log line
  at most once a second.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from daemonkit.transport import PlainTransport
from xenbind.errors import ConfigError

from .connection import Connection

log = logging.getLogger("receiver")


class Listener:
    def __init__(self, daemon, host: str, port: int) -> None:
        self.daemon = daemon
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        sock.listen(64)
        sock.settimeout(0.2)  # accept() wakes to notice a stop
        self.sock = sock
        bound = sock.getsockname()
        self.address = (
            f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
        )
        self._thread: threading.Thread | None = None
        self._last_flood_log = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="listener", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self.daemon.stopping.is_set():
            try:
                sock, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.daemon.stopping.is_set():
                    return
                log.warning("accept failed: %s", e)
                time.sleep(0.05)
                continue
            sock.settimeout(1.0)
            conn = Connection(self.daemon, PlainTransport(sock))
            if not self.daemon.connection_opened(conn):
                now = time.monotonic()
                if now - self._last_flood_log > 1:
                    log.warning(
                        "connection from %s closed at once: too many connections open", conn.peer
                    )
                    self._last_flood_log = now
                conn.t.close()
                continue
            log.debug("connection from %s", conn.peer)
            conn.start()

    def close(self) -> None:
        self.sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
