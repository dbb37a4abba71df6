"""The control socket: a Unix socket speaking JSON lines, checked with SO_PEERCRED.

Control socket (``ControlServer``, ``control_request``)
    A Unix stream socket, mode 0600 (created under a umask of 0177, so there is
    no window where it is wider), one thread per client. With a control group
    (``control_group`` key / ``--control-group``) it is mode 0660 and chowned
    to that group. Every connection is checked with ``SO_PEERCRED`` before a
    byte of it is read: only root (uid 0), the daemon's own uid, or a member
    of the control group (the peer's gid; or the user database puts the peer's
    user in it; or the peer process has it among its supplementary groups, as
    systemd's ``SupplementaryGroups=`` gives) is served; anyone else gets one line
    ``{"ok": false, "error": "permission denied: ..."}``, a WARNING in the log,
    and the connection closes. The file mode is the first gate, the peer
    check the second (it still holds if the mode or directory is too wide).
    The wire is JSON lines, one request per line and one response per line::

        request   {"cmd": "status", ...arguments...}\\n
        response  {"ok": true, "result": <any JSON>}\\n
               or {"ok": false, "error": "clear message"}\\n

    A request longer than ``max_request`` bytes (default 64 KiB) or that is not
    a JSON object with a string ``cmd`` gets an error response and the
    connection is closed. The handler is called as ``handler(request_dict)``
    and returns the result; a ``RemusError`` it raises becomes the error
    message, any other exception is logged with its traceback and answered
    "internal error". A stale socket file (nobody listening) is replaced; a
    live one is refused (another daemon runs there).
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from xenbind.errors import ConfigError, RemusError

log = logging.getLogger(__name__)


DEFAULT_MAX_REQUEST = 64 * 1024
#: A response may be larger than a request (status of many domains), but bounded.
MAX_RESPONSE = 16 * 1024 * 1024

Handler = Callable[[dict[str, Any]], Any]


class ControlError(RemusError):
    """The control socket could not be reached, or the daemon answered an error."""


#: struct ucred of SO_PEERCRED: pid, uid, gid (Linux, all int32/uint32).
_UCRED = struct.Struct("=iII")
#: A refused control client: how long and how much of its request to drain
#: before closing, so it reads the error line instead of a reset.
_REFUSE_DRAIN_S = 0.5


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def resolve_group(name: str | None) -> int | None:
    """A group name or number -> gid (ConfigError if unknown); None stays None."""
    if name is None or name == "":
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ConfigError(f"control group {name!r} does not exist") from None


def _groups_of(uid: int, gid: int) -> set[int]:
    """The groups the user database gives ``uid`` (primary ``gid`` included)."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return {gid}
    try:
        return set(os.getgrouplist(user, gid))
    except OSError:
        return {gid}


def _process_groups(pid: int) -> set[int]:
    """The supplementary groups of a live process (/proc/PID/status ``Groups:``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


class ControlServer:
    """A Unix-socket JSON-lines server; ``handler(request) -> result``."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        client_timeout: float = 30.0,
        group: str | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.max_request = max_request
        self.client_timeout = client_timeout
        self.group = group or None
        self.gid = resolve_group(self.group)  # ConfigError if unknown
        self.uid = os.geteuid()
        self.refused = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def start(self) -> ControlServer:
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"control socket directory {parent}: {e.strerror}") from None
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise ConfigError(f"control socket {self.path}: {e.strerror}") from None
        finally:
            os.umask(old)
        try:
            if self.gid is not None:
                os.chown(self.path, -1, self.gid)
                os.chmod(self.path, 0o660)
            else:
                os.chmod(self.path, 0o600)
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise ConfigError(
                f"control socket {self.path}: cannot give it to group {self.group}: {e.strerror}"
            ) from None
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        who = "root" if self.uid == 0 else f"root and uid {self.uid}"
        log.info(
            "control socket listening on %s (%s)",
            self.path,
            f"{who} and group {self.group}" if self.gid is not None else f"{who} only",
        )
        return self

    def allowed(self, uid: int, gid: int, pid: int | None = None) -> bool:
        """Whether a peer with these credentials may use the control socket."""
        if uid == 0 or uid == self.uid:
            return True
        if self.gid is None:
            return False
        if gid == self.gid or self.gid in _groups_of(uid, gid):
            return True
        return pid is not None and self.gid in _process_groups(pid)

    def _refuse(self, conn: socket.socket, pid: int, uid: int, gid: int) -> None:
        self.refused += 1
        who = f"uid {uid}" + (f" ({pwd.getpwuid(uid).pw_name})" if _known_uid(uid) else "")
        rule = "root, the daemon's user" + (f" or group {self.group}" if self.group else "")
        log.warning(
            "control socket: refused pid %d %s gid %d: only %s may use it", pid, who, gid, rule
        )
        with contextlib.suppress(OSError):
            conn.settimeout(_REFUSE_DRAIN_S)
            self._reply(conn, {"ok": False, "error": f"permission denied: {who} is not {rule}"})
            conn.shutdown(socket.SHUT_WR)
            # drain the request briefly: closing with unread input sends RST
            deadline = time.monotonic() + _REFUSE_DRAIN_S
            drained = 0
            while time.monotonic() < deadline and drained <= self.max_request:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"control socket path {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # nobody listens: a leftover of a dead daemon
            return
        finally:
            probe.close()
        raise ConfigError(f"control socket {self.path} is in use: another daemon is running")

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.05)
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="control-client", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            pid, uid, gid = peer_credentials(conn)
        except OSError as e:
            log.warning("control socket: cannot read the client's credentials (%s): closed", e)
            conn.close()
            return
        if not self.allowed(uid, gid, pid):
            try:
                self._refuse(conn, pid, uid, gid)
            finally:
                conn.close()
            return
        conn.settimeout(self.client_timeout)
        buf = b""
        try:
            while not self._closing.is_set():
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > self.max_request:
                        self._reply(
                            conn,
                            {"ok": False, "error": f"request longer than {self.max_request} bytes"},
                        )
                        return
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    continue
                line, buf = buf[:nl], buf[nl + 1 :]
                if len(line) > self.max_request:
                    self._reply(
                        conn,
                        {"ok": False, "error": f"request longer than {self.max_request} bytes"},
                    )
                    return
                response, keep = self._answer(line)
                self._reply(conn, response)
                if not keep:
                    return
        except (OSError, TimeoutError):
            return
        finally:
            conn.close()

    def _answer(self, line: bytes) -> tuple[dict[str, Any], bool]:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not valid JSON"}, False
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {
                "ok": False,
                "error": 'request must be a JSON object with a string "cmd"',
            }, False
        try:
            return {"ok": True, "result": self.handler(req)}, True
        except RemusError as e:
            return {"ok": False, "error": str(e)}, True
        except Exception:
            log.exception("control request %r failed", req.get("cmd"))
            return {"ok": False, "error": "internal error (see the daemon's log)"}, True

    @staticmethod
    def _reply(conn: socket.socket, response: dict[str, Any]) -> None:
        conn.sendall(json.dumps(response, separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        self._closing.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        if self._thread is not None:
            self._thread.join(timeout=2)


def _known_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def control_request(path: str, cmd: str, *, timeout: float = 10.0, **args: Any) -> Any:
    """Send one request to the daemon at ``path``; its result, or ControlError."""
    req = dict(args, cmd=cmd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no daemon at {path} (the control socket does not exist)") from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path} (run as the daemon's user, usually root)"
            ) from None
        except OSError as e:
            raise ControlError(f"cannot reach the daemon at {path}: {e.strerror}") from None
        try:
            try:
                sock.sendall(json.dumps(req, separators=(",", ":")).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # a daemon refusing us answered and closed first: read its answer
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError(f"the daemon at {path} closed the connection")
                buf += chunk
                if len(buf) > MAX_RESPONSE:
                    raise ControlError(f"response from {path} larger than {MAX_RESPONSE} bytes")
        except TimeoutError:
            raise ControlError(f"the daemon at {path} did not answer within {timeout} s") from None
        except OSError as e:
            raise ControlError(f"talking to the daemon at {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        resp = json.loads(buf[: buf.index(b"\n")])
    except ValueError:
        raise ControlError(f"the daemon at {path} sent an invalid response") from None
    if not isinstance(resp, dict) or "ok" not in resp:
        raise ControlError(f"the daemon at {path} sent an invalid response")
    if not resp["ok"]:
        raise ControlError(str(resp.get("error", "unknown error")))
    return resp.get("result")
