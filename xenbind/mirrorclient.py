"""The daemon's side of the mirroring block server (``xenbind/nbdmirror.py``).

    proc = start_server([disk0, disk1], nbd_socket, control)   # nbdkit, ready
    client = MirrorClient(control)
    stream = client.start(first_epoch=0)    # the reader thread drains at once
    client.sync([(disk, offset, length), ...])       # the initial sync's runs
    point = client.seal()                   # inside checkpoint N's pause
    pieces = stream.take(point.end, timeout=5)      # epoch N's bytes, exactly
    client.stop(); stream.close(); client.close()

The control protocol is described at the top of ``xenbind/nbdmirror.py``.
Rules kept here:

* A ``MirrorStream`` never stops reading: its thread drains the mirror
  connection into memory as fast as it arrives, because the block server's
  queue is bounded (``queue=``): once it is full the guest's writes wait for
  the consumer, until the server's ``stall`` drops the mirror. Memory is
  bounded by the caller, who reads ``buffered`` and takes the bytes out. A
  seal's ``end`` may be ahead of what has arrived: ``take(end)`` waits.
* The buffer's lock is held only to hand pieces over, never across a
  ``recv``; the control connection's lock only across one request and its
  reply (a sync runs on a connection of its own, so a seal never waits
  behind it).
* A request the server refuses raises ``MirrorError`` with the server's text;
  a server that cannot be reached, or answers something that is not a reply,
  raises ``MirrorError`` naming the socket.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from .errors import RemusError
from .nbdmirror import command

__all__ = [
    "MirrorClient",
    "MirrorError",
    "MirrorLost",
    "MirrorRefused",
    "MirrorTimeout",
    "MirrorStream",
    "SealPoint",
    "command",
    "start_server",
]

#: Bytes asked of each recv on the mirror connection.
RECV_SIZE = 256 << 10
#: Seconds a control request waits for its reply (sync: no limit by default).
DEFAULT_TIMEOUT = 10.0
#: Longest reply line read from the server, bytes.
MAX_REPLY_LINE = 1 << 20


class MirrorError(RemusError):
    """The block server refused a request, or could not be reached."""


class MirrorRefused(MirrorError):
    """The block server answered the request with an error (its text)."""


class MirrorLost(MirrorError):
    """The mirror stream ended (``reason``) before the bytes asked for."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"mirror stream lost: {reason}")
        self.reason = reason


class MirrorTimeout(MirrorError, TimeoutError):
    """``MirrorStream.take`` waited ``timeout`` seconds for bytes that did not come."""


@dataclass(frozen=True)
class SealPoint:
    """SEAL(``epoch``) ends at stream offset ``end`` (header included)."""

    epoch: int
    end: int


# ------------------------------------------------------------------ stream


class MirrorStream:
    """The mirror connection, drained by a thread into memory.

    ``received``: stream bytes read so far (the header included); ``taken``:
    bytes handed out by ``take``/``take_available``; ``buffered``: the
    difference; ``lost``: None while the stream lives, else why it ended
    (``"EOF"`` when the server closed it, or the error)."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self._sock = sock
        self._cond = threading.Condition()
        self._pieces: collections.deque[bytes] = collections.deque()
        self._received = 0
        self._taken = 0
        self._lost: str | None = None
        self._closing = False
        if initial:
            self._pieces.append(initial)
            self._received = len(initial)
        self._thread = threading.Thread(target=self._read, name="mirror-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        sock = self._sock
        reason = "EOF"
        try:
            while True:
                data = sock.recv(RECV_SIZE)  # no lock held while this blocks
                if not data:
                    break
                with self._cond:
                    self._pieces.append(data)
                    self._received += len(data)
                    self._cond.notify_all()
        except OSError as e:
            reason = "closed" if self._closing else f"read failed: {e}"
        with self._cond:
            self._lost = "closed" if self._closing else reason
            self._cond.notify_all()

    @property
    def received(self) -> int:
        return self._received

    @property
    def taken(self) -> int:
        return self._taken

    @property
    def buffered(self) -> int:
        with self._cond:
            return self._received - self._taken

    @property
    def lost(self) -> str | None:
        return self._lost

    def take(self, end: int, timeout: float | None = None) -> list[bytes]:
        """The stream's bytes from the previous take up to offset ``end``,
        exactly, once the reader has reached it. Raises ValueError for an
        ``end`` before what was already taken, MirrorLost if the stream ends
        before ``end``, MirrorTimeout (a TimeoutError too) after ``timeout``
        seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if end < self._taken:
                raise ValueError(f"take up to {end}: {self._taken} bytes were already taken")
            while self._received < end:
                if self._lost is not None:
                    raise MirrorLost(
                        f"{self._lost} at byte {self._received}, before byte {end} was reached"
                    )
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise MirrorTimeout(
                        f"mirror stream: byte {end} not reached in {timeout:g} s "
                        f"({self._received} received)"
                    )
                self._cond.wait(left)
            out: list[bytes] = []
            want = end - self._taken
            while want:
                piece = self._pieces[0]
                if len(piece) <= want:
                    out.append(self._pieces.popleft())
                    want -= len(piece)
                else:
                    out.append(piece[:want])
                    self._pieces[0] = piece[want:]
                    want = 0
            self._taken = end
            return out

    def take_available(self) -> list[bytes]:
        """Every byte received and not yet taken."""
        with self._cond:
            out = list(self._pieces)
            self._pieces.clear()
            self._taken = self._received
            return out

    def wait_lost(self, timeout: float | None = None) -> str | None:
        """Wait until the stream has ended (or ``timeout``); returns ``lost``."""
        with self._cond:
            self._cond.wait_for(lambda: self._lost is not None, timeout)
            return self._lost

    def close(self) -> None:
        """Close the connection (the server drops the mirror on its next
        append) and stop the reader; buffered bytes may still be taken."""
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5.0)
        self._sock.close()


# ------------------------------------------------------------------ client


class MirrorClient:
    """Requests to one block server's control socket (``control_path``);
    ``timeout``: seconds to connect and for each reply (a sync's own)."""

    def __init__(self, control_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.control_path = control_path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._rbuf = b""

    # --------------------------------------------------- the wire

    def _connect(self, timeout: float | None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.control_path)
        except OSError as e:
            s.close()
            raise MirrorError(
                f"block server control socket {self.control_path}: cannot connect: {e}"
            ) from e
        return s

    def _roundtrip(self, sock: socket.socket, req: dict[str, Any], buf: bytes) -> tuple[Any, bytes]:
        """Send ``req``, read one reply line; returns (reply, bytes after it)."""
        op = req.get("op")
        try:
            sock.sendall((json.dumps(req) + "\n").encode())
            while b"\n" not in buf:
                if len(buf) > MAX_REPLY_LINE:
                    raise MirrorError(
                        f"{self.control_path}: {op}: reply longer than {MAX_REPLY_LINE} bytes"
                    )
                data = sock.recv(65536)
                if not data:
                    raise MirrorError(
                        f"{self.control_path}: {op}: the server closed the connection"
                    )
                buf += data
        except TimeoutError as e:
            raise MirrorError(
                f"{self.control_path}: {op}: no reply in {sock.gettimeout()} s"
            ) from e
        except OSError as e:
            raise MirrorError(f"{self.control_path}: {op}: {e}") from e
        line, _, rest = buf.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise MirrorError(f"{self.control_path}: {op}: reply is not JSON: {line[:80]!r}") from e
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise MirrorError(f"{self.control_path}: {op}: not a reply: {line[:80]!r}")
        if not reply["ok"]:
            raise MirrorRefused(f"block server: {reply.get('error', 'error without text')}")
        return reply, rest

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request on the shared control connection (opened on first
        use, reopened after a failure)."""
        with self._lock:
            if self._sock is None:
                self._sock = self._connect(self.timeout)
                self._rbuf = b""
            try:
                reply, self._rbuf = self._roundtrip(self._sock, req, self._rbuf)
            except MirrorRefused:
                raise
            except MirrorError:  # the wire broke: a fresh connection next time
                self._sock.close()
                self._sock = None
                raise
            return dict(reply)

    # ------------------------------------------------------ requests

    def info(self) -> dict[str, Any]:
        return self.request({"op": "info"})

    def start(self, first_epoch: int) -> MirrorStream:
        """Start (or restart) mirroring: a new connection becomes the stream,
        whose first SEAL will close ``first_epoch``. A previous stream ends."""
        sock = self._connect(self.timeout)
        try:
            _, rest = self._roundtrip(sock, {"op": "mirror", "first_epoch": first_epoch}, b"")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return MirrorStream(sock, rest)

    def seal(self) -> SealPoint:
        reply = self.request({"op": "seal"})
        return SealPoint(int(reply["epoch"]), int(reply["end"]))

    def sync(self, runs: Iterable[Sequence[int]], timeout: float | None = None) -> int:
        """Ask the server to append the current content of ``runs`` (disk,
        offset, length) as FLAG_SYNC records; returns the bytes covered. On a
        connection of its own (``timeout``: None waits as long as it takes)."""
        req = {"op": "sync", "runs": [[int(d), int(o), int(n)] for d, o, n in runs]}
        sock = self._connect(self.timeout)
        sock.settimeout(timeout)
        try:
            reply, _ = self._roundtrip(sock, req, b"")
        finally:
            sock.close()
        return int(reply["bytes"])

    def stop(self) -> bool:
        """Stop mirroring; returns whether it was."""
        return bool(self.request({"op": "stop"}).get("was_mirroring"))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> MirrorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------- server


def start_server(
    disks: list[str],
    nbd_socket: str,
    control: str,
    *,
    stall: float | None = None,
    queue: int | None = None,
    timeout: float = 10.0,
    stderr: int | IO[Any] | None = None,
) -> subprocess.Popen[bytes]:
    """Start nbdkit with the mirroring plugin (``nbdmirror.command``) and
    return once both sockets accept connections (``stall``, ``queue``: the
    plugin's parameters, None for its defaults). The caller owns the process
    (``terminate()`` + ``wait()``); it also exits with the thread that called
    this. Raises MirrorError if nbdkit exits or is not ready in ``timeout``."""
    argv = command(disks, nbd_socket, control, stall=stall, queue=queue)
    for path in (control, nbd_socket):  # a stale one would read as ready
        if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout
    while not (os.path.exists(control) and os.path.exists(nbd_socket)):
        rc = proc.poll()
        if rc is not None:
            raise MirrorError(f"nbdkit exited with status {rc} before it was ready: {argv}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise MirrorError(f"nbdkit was not ready in {timeout:g} s: {argv}")
        time.sleep(0.01)
    return proc


#: Where Debian's python3-libnbd lives (built for Debian's 3.11; the venv's
#: 3.11 imports it: same minor version, same ABI).
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def load_libnbd() -> Any:
    """Debian's ``nbd`` module (python3-libnbd), imported with its directory
    on sys.path only for the import (nothing else of Debian's leaks into the
    venv). Raises MirrorError saying what is missing."""
    if "nbd" in sys.modules:
        return sys.modules["nbd"]
    added = DEBIAN_DIST_PACKAGES not in sys.path
    if added:
        sys.path.append(DEBIAN_DIST_PACKAGES)
    try:
        return importlib.import_module("nbd")
    except ImportError as e:
        raise MirrorError(
            f"python3-libnbd is not importable ({e}): apt-get install python3-libnbd"
        ) from e
    finally:
        if added:
            sys.path.remove(DEBIAN_DIST_PACKAGES)


def missing() -> str | None:
    """None when this host can run the block server (nbdkit, its python plugin
    and blocksize filter), else what is missing."""
    if shutil.which("nbdkit") is None:
        return "nbdkit is not installed (apt-get install nbdkit)"
    for what, argv in (
        ("nbdkit-plugin-python", ["nbdkit", "python", "--version"]),
        ("nbdkit's blocksize filter", ["nbdkit", "--filter=blocksize", "null", "--version"]),
    ):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"{what} is missing: {(r.stderr or r.stdout).strip()}"
    return None
