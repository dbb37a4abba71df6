"""Plumbing both daemons share: configuration, logging, systemd, control socket.

Nothing here knows about Remus; remusd and remus-receiver use it the same way.

Configuration (``parse_args_with_config``)
    Every option is a command-line flag; a TOML file may set any of them too.
    Precedence, lowest first: the parser's defaults < the TOML file < flags
    given explicitly on the command line. TOML keys are the flags' long names
    with ``-`` or ``_`` (``control``, ``failover-timeout``/``failover_timeout``),
    at top level. An unknown key or a value of the wrong type is a
    ``ConfigError`` naming the file and key. The default config file may be
    absent; a file named explicitly must exist.

Logging (``setup_logging``)
    To stderr. Under systemd (``JOURNAL_STREAM`` set and naming our stderr)
    each line is ``<N>logger: message`` with N the syslog priority, which
    journald turns into the entry's priority, and no timestamp (journald adds
    one). Otherwise ``2026-01-01 12:00:00.123 LEVEL logger: message``.

systemd (``sd_notify``, ``Watchdog``)
    ``sd_notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET`` (a path,
    or ``@name`` for the abstract namespace); without the variable it does
    nothing and returns False. ``Watchdog`` pings ``WATCHDOG=1`` every half
    ``$WATCHDOG_USEC`` (when ``$WATCHDOG_PID`` is unset or ours) as long as its
    ``healthy()`` callback says so: a wedged daemon stops pinging and systemd
    restarts it.

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

import argparse
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError, RemusError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- config


def load_toml(path: str, *, must_exist: bool) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict ({} if absent and not ``must_exist``)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action for every optional flag (help/version excluded)."""
    out = {}
    for a in parser._actions:  # argparse offers no public iterator
        if not a.option_strings or a.dest in ("help", "version") or a.dest is argparse.SUPPRESS:
            continue
        out[a.dest] = a
    return out


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests the command line set explicitly (parse again with no defaults)."""
    actions = _option_actions(parser)
    saved = {d: a.default for d, a in actions.items()}
    saved_parser_defaults = dict(parser._defaults)
    try:
        for a in actions.values():
            a.default = argparse.SUPPRESS
        parser._defaults.clear()
        ns, _ = parser.parse_known_args(argv)
    finally:
        for d, a in actions.items():
            a.default = saved[d]
        parser._defaults.update(saved_parser_defaults)
    return set(vars(ns))


def _convert(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    where = f"config file {path}: key {key!r}"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert_one(where, action, v) for v in value]
    return _convert_one(where, action, value)


def _convert_one(where: str, action: argparse.Action, value: Any) -> Any:
    if isinstance(value, dict | list):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    if isinstance(value, bool) and action.type not in (None, bool):
        raise ConfigError(f"{where}: expected a value, got {value!r}")
    conv = action.type
    try:
        if conv is None:
            result = value if isinstance(value, str) else str(value)
        elif conv in (int, float) and isinstance(value, int | float):
            if conv is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            result = conv(value)
        else:
            result = conv(str(value)) if not isinstance(value, str) else conv(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError, ConfigError) as e:
        raise ConfigError(f"{where}: invalid value {value!r} ({e})") from None
    if action.choices is not None and result not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {result!r} is not one of {choices}")
    return result


def parse_args_with_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    config_dest: str = "config",
    default_config: str | None = None,
) -> argparse.Namespace:
    """Parse ``argv`` with defaults < TOML file < explicit flags.

    The file is the value of the ``config_dest`` option (``--config``) if
    given, else ``default_config`` (which may be absent). The returned
    namespace has ``config`` set to the file actually read, or None.
    """
    args = parser.parse_args(argv)
    explicit = _explicit_dests(parser, argv)
    path = getattr(args, config_dest, None)
    named = config_dest in explicit and path is not None
    if not named:
        path = default_config
    setattr(args, config_dest, None)
    if path is None:
        return args
    data = load_toml(path, must_exist=named)
    if not data:
        return args
    actions = _option_actions(parser)
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest == config_dest or dest not in actions:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions if d != config_dest))
            raise ConfigError(f"config file {path}: unknown key {key!r} (known keys: {known})")
        if dest in explicit:
            continue  # the command line wins
        setattr(args, dest, _convert(path, key, actions[dest], value))
    setattr(args, config_dest, path)
    return args


# --------------------------------------------------------------------------- logging

#: Python level -> syslog priority (sd-daemon(3) "<N>" prefixes).
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = 7
        for level, p in sorted(_SYSLOG_PRIORITY.items()):
            if record.levelno >= level:
                prio = p
        text = super().format(record)
        # every line of a multi-line message (tracebacks) keeps the priority
        return "\n".join(f"<{prio}>{line}" for line in text.split("\n"))


def under_journal(stream: Any = None) -> bool:
    """True when ``stream`` (default stderr) is connected to journald."""
    js = os.environ.get("JOURNAL_STREAM")
    if not js:
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup_logging(level: str | int = "info", *, stream: Any = None) -> None:
    """Configure the root logger for a daemon (see the module docstring)."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    if under_journal(stream):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        fmt = logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
        )
        handler.setFormatter(fmt)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    if isinstance(level, str):
        lv = logging.getLevelName(level.upper())
        if not isinstance(lv, int):
            raise ConfigError(f"unknown log level {level!r} (debug, info, warning, error)")
        level = lv
    root.setLevel(level)


# --------------------------------------------------------------------------- systemd


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


# --------------------------------------------------------------------------- control socket

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


def add_daemon_arguments(
    parser: argparse.ArgumentParser, *, config: str, control: str, insecure_help: str
) -> None:
    """The options both daemons have: --config (``config`` used if it exists),
    --control (default ``control``), --sim-dir, --insecure (what plaintext means
    for this daemon: ``insecure_help``) and --control-group."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=config,
        help=f"TOML configuration file (default {config}, used if it exists)",
    )
    parser.add_argument(
        "--control",
        metavar="PATH",
        default=control,
        help=f"control socket remusctl talks to (default {control}; mode 0600, "
        "0660 with --control-group)",
    )
    parser.add_argument(
        "--sim-dir",
        metavar="DIR",
        help="use the simulated host whose directory is DIR instead of Xen",
    )
    parser.add_argument("--insecure", action="store_true", help=insecure_help)
    add_control_group_argument(parser)


def add_control_group_argument(parser: argparse.ArgumentParser) -> None:
    """``--control-group GROUP`` (TOML ``control-group``): who else may use the control socket."""
    parser.add_argument(
        "--control-group",
        metavar="GROUP",
        help="also let members of GROUP use the control socket (mode 0660, "
        "owned by GROUP); default: only root and the daemon's user "
        "(mode 0600). Every client is checked with SO_PEERCRED",
    )


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
