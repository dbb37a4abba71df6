"""One replication session on the receiver: the socket driver of one ReceiverCore.

    (before)    receiver.server's one selector thread did the TLS handshake,
                the peer check and read the HELLO into this core: a
                Connection (and its thread) exists only for a peer that sent
                a whole, valid HELLO; it starts with the core's Admit
    loop        tick the core, receive (straight into the decoder's buffer
                when the core offers one), feed the core, carry out its
                actions (receiver.core): Send, Admit (daemon.admit, then
                ACCEPT or REFUSE), HeartbeatSeen, Handover (daemon.handover:
                a switchover; the daemon closes the session with its
                verdict), End (daemon.session_ended)
    end         linger (drain briefly so our last frame is not lost to a
                RST), close, tell the daemon

The protocol (HELLO, stream, commits, ACKs, heartbeats, timeouts, every end)
is the core's; this module holds none of it.

Rules kept here:
- Every wait on the socket has a timeout (at most heartbeat-ms once
  accepted), so a session notices within that time that the daemon closed it.
- The daemon never touches the core: ``close_from_daemon`` only records why
  and sets ``closing``; the session thread hands it to the core, which sends
  ERROR once ACCEPT was sent, nothing before (before it the sender waits for
  ACCEPT/REFUSE, not a frame), and never ACCEPTs once ``closing`` is set.
- ``thread`` is set only once the thread runs, so ``join`` never meets a
  thread that is not started.
- Creating the backup may take seconds: what the peer sent meanwhile (EOF, a
  reset, too much stream) is read before ACCEPT, and such a peer gets none.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from daemonkit.transport import TlsTransport, Transport
from xenbind.errors import DomainError
from xenbind.session import Hello
from xenbind.stream import Decoder

from .backup import ProtectionBackup
from .core import (
    Action,
    Admit,
    BackupClosed,
    End,
    Handover,
    HeartbeatSeen,
    Limits,
    ReceiverCore,
    Refusal,
    Send,
)
from .protection import Protection
from .staging import Staging

if TYPE_CHECKING:
    from .daemon import ReceiverDaemon

log = logging.getLogger("receiver")

RECV_SIZE = 1 << 20  # bytes read per recv
SOFTWARE = "remus-receiver 0.1.0"
#: closing: how long and how much of the peer's input to drain (see _linger)
LINGER_S = 0.2
LINGER_MAX_BYTES = 16 << 20
#: End kinds before admission and how they are logged
_EARLY_ENDS = {"bad-hello": logging.WARNING, "timeout": logging.WARNING, "lost": logging.WARNING}


def limits_of(cfg) -> Limits:  # type: ignore[no-untyped-def]
    return Limits(
        max_pages=cfg.max_pages,
        max_staged_bytes=cfg.max_staged_bytes,
        max_compressed=cfg.max_compressed,
        max_context=cfg.max_context,
        max_device_model=cfg.max_device_model,
        max_cache_pages=cfg.max_cache_pages,
        heartbeat_ms=cfg.heartbeat_ms,
        handshake_timeout=cfg.handshake_timeout,
        stall_timeout=cfg.stall_timeout,
        software=SOFTWARE,
        max_disk_epoch_bytes=cfg.max_disk_epoch_bytes,
        wire_compression=cfg.wire_compression,
    )


class Connection:
    def __init__(
        self,
        daemon: ReceiverDaemon,
        transport: Transport,
        core: ReceiverCore | None = None,
        first: list[Action] | None = None,
        peer: str | None = None,
    ) -> None:
        """``core``: the core the handshake stage fed the HELLO to, ``first``
        the actions it returned (its Admit); ``peer`` HOST:PORT as accepted."""
        self.daemon = daemon
        self.cfg = daemon.cfg
        self.t = transport
        self.peer = peer or transport.peer()
        self.core = core or ReceiverCore(limits_of(self.cfg), time.monotonic())
        self._first: list[Action] = list(first or [])
        self.prot: Protection | None = None  # once admitted
        self.closing = threading.Event()
        self._close_why: tuple[int, str] = (0, "")
        self._send_lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @property
    def decoder(self) -> Decoder | None:
        return self.core.decoder

    @property
    def staging(self) -> Staging | None:
        return self.core.staging

    # ------------------------------------------------------------- plumbing

    def start(self) -> None:
        thread = threading.Thread(target=self.run, name=f"session-{self.peer}", daemon=True)
        thread.start()
        self.thread = thread  # only now: shutdown may look at it any time

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the session thread, if it was started."""
        thread = self.thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)

    def close_from_daemon(self, code: int, reason: str) -> None:
        """End this session from another thread (failover, newer session,
        shutdown): the session thread tells the core within heartbeat-ms."""
        self._close_why = (code, reason)
        self.closing.set()

    def _closed_by(self) -> tuple[int, str] | None:
        return self._close_why if self.closing.is_set() else None

    def identity(self) -> tuple[str, str]:
        """Who sent the HELLO, as admission compares it: the certificate's
        names over TLS, else the peer's address (without the port)."""
        if isinstance(self.t, TlsTransport):
            return ("certificate", ",".join(sorted(n.lower() for n in self.t.peer_names)))
        host = self.peer.rsplit(":", 1)[0]
        return ("address", host)

    def who(self) -> str:
        if self.prot is not None:
            return (
                f"session {self.prot.hello.session_id[:8]} from {self.peer} ({self.prot.label()})"
            )
        return f"connection from {self.peer}"

    def _send(self, data: bytes) -> OSError | None:
        """Write ``data``; the error if it could not be (None: sent)."""
        with self._send_lock:
            try:
                self.t.sendall(data)
            except OSError as e:
                return e
            return None

    def run(self) -> None:
        try:
            first, self._first = self._first, []
            if self.closing.is_set():  # the daemon stops: admit nothing
                first = self.core.close(*self._close_why)
            if not self._execute(first):
                self._loop()
        except Exception:  # a bug must end one session, never the daemon
            log.exception("%s: internal error; session ended", self.who())
            try:
                actions = self.core.internal_error()
            except Exception:  # the core itself is broken: end without it
                actions = [End("violation", "internal error on the receiver (see log)")]
            if self.prot is not None:
                self._execute(actions)
        finally:
            self.core.abandon()  # frees what it holds, however it ended
            self._close_disks()
            self._linger()
            self.t.close()
            self.daemon.connection_closed(self)

    def _close_disks(self) -> None:
        """The session is over: its uncommitted disk epochs never reach a disk."""
        prot = self.prot
        if prot is None or prot.disks is None:
            return
        try:
            dropped = prot.disks.close()
        except OSError as e:
            log.error("%s: cannot drop the session's disk epochs: %s", self.who(), e)
            return
        if dropped:
            log.info(
                "%s: uncommitted disk epoch(s) %s dropped (never applied)",
                self.who(),
                ", ".join(map(str, dropped)),
            )

    def _linger(self) -> None:
        """Close our side first and drain what the peer still sends, briefly:
        closing a socket with unread input makes the kernel send RST, and the
        peer may then lose the REFUSE / ERROR / GOODBYE we just sent."""
        self.t.shutdown_write()
        deadline = time.monotonic() + LINGER_S
        drained = 0
        try:
            while drained < LINGER_MAX_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.t.settimeout(left)
                n = len(self.t.recv(RECV_SIZE))
                if n == 0:
                    return
                drained += n
        except OSError:
            return

    # ------------------------------------------------------------- the loop

    def _loop(self) -> None:
        core = self.core
        buf = bytearray(RECV_SIZE)
        mv = memoryview(buf)
        while True:
            if self.closing.is_set() and self._execute(core.close(*self._close_why)):
                return
            now = time.monotonic()
            if self._execute(core.tick(now)):
                return
            self.t.settimeout(max(core.next_wait(now), 0.001))
            # a batch's page data is received straight into the decoder's buffer for it
            direct = core.get_buffer()
            try:
                n = self.t.recv_into(buf if direct is None else direct)
            except TimeoutError:
                continue
            except OSError as e:
                self._execute(core.connection_lost(e))
                return
            if n == 0:
                self._execute(core.receive_eof())
                return
            prot = self.prot
            if prot is not None:
                prot.bytes_in += n
                # any byte from the primary proves it alive: a checkpoint whose
                # one COMPRESSED_DATA chunk takes longer than the failover
                # timeout to arrive completes no event until its end
                prot.life()
            actions = core.buffer_updated(n) if direct is not None else core.receive_data(mv[:n])
            if self._execute(actions):
                return

    def _execute(self, actions: list[Action]) -> bool:
        """Carry out the core's actions in order; True once the session ended."""
        for i, action in enumerate(actions):
            if isinstance(action, Send):
                error = self._send(action.data)
                if error is not None and action.on_failure is not None:
                    return self._execute(self.core.send_failed(action, error))
            elif isinstance(action, Admit):
                if self._execute(self._admit(action.hello)):
                    return True
            elif isinstance(action, HeartbeatSeen):
                if self.prot is not None:
                    self.prot.life(heartbeat=True)
            elif isinstance(action, Handover):
                if self.prot is not None:  # it closes this session with its verdict
                    self.daemon.handover(self.prot, self, action.index)
            elif isinstance(action, End):
                assert i == len(actions) - 1, "End is the last action"
                self._ended(action)
                return True
        return False

    def _ended(self, end: End) -> None:
        prot = self.prot
        if prot is not None:
            self.daemon.session_ended(prot, self, end.kind, end.message)
        elif end.kind in _EARLY_ENDS:
            log.log(_EARLY_ENDS[end.kind], "%s: %s", self.who(), end.message)
        elif end.kind == "left":
            log.info("%s: %s", self.who(), end.message)

    # ------------------------------------------------------------- admission

    def _admit(self, hello: Hello) -> list[Action]:
        try:
            prot = self.daemon.admit(hello, self)
        except Refusal as r:
            log.warning(
                "connection from %s: refused session %s for domain %s (%s): %s",
                self.peer,
                hello.session_id[:8],
                hello.domain.name,
                hello.domain.uuid,
                r.reason,
            )
            return self.core.refuse(r.code, r.reason)
        self.prot = prot
        # creating the backup may take seconds (xl create): is anyone still there?
        actions = self._read_during_admission()
        if actions:
            return actions
        if self.closing.is_set():
            return self.core.close(*self._close_why)
        backup = ProtectionBackup(prot, self.who, self._closed_by)
        # the ACCEPT says "witness": true when this receiver fails over under the key
        self.core.rs.accept_witness = self.daemon.cfg.witness is not None
        actions = self.core.accept(
            round(prot.failover_timeout * 1000),
            backup,
            time.monotonic(),
            disk_hashes=prot.disk_hashes if prot.disks is not None else None,
            disks=backup if prot.disks is not None else None,
        )
        prot.life()  # the stall and failover clocks start now, not at the HELLO
        prot.wire = self.core.rs.wire_counts
        if prot.wire is not None:
            log.info(
                "session %s for %s: the stream comes %s-compressed on the wire",
                hello.session_id[:8],
                hello.domain.name,
                prot.wire.codec,
            )
        try:
            backup.open()
            rows = backup.rows()
            if rows is not None:
                self.core.read_in_place(rows)
        except (DomainError, BackupClosed) as e:
            if isinstance(e, BackupClosed) and e.error is not None:
                actions += self.core.close(*e.error)  # failed over or superseded meanwhile
            else:
                actions += self.core.fail("corrupt", f"cannot probe the backup's physmap: {e}")
        return actions

    def _read_during_admission(self) -> list[Action]:
        """What the peer sent while its backup was created: EOF, a reset or
        too much stream end the session here (stream bytes sent early are kept
        by the core for after ACCEPT). Reads only what has already arrived."""
        try:
            while self.t.wait_readable(0):
                self.t.settimeout(0.05)  # readable: at most a partial TLS record to wait for
                data = self.t.recv(65536)
                if not data:
                    return self.core.receive_eof()
                actions = self.core.receive_data(data)
                if actions:
                    return actions
        except TimeoutError:
            return []
        except OSError as e:
            return self.core.connection_lost(e)
        return []
