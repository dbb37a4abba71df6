"""xenstore helpers on pyxs 0.4.1: names, watches, the PV suspend handshake.

Paths this module reads and writes (as libxl lays them out):

    /local/domain/<domid>/name              the domain's name
    /local/domain/<domid>/vm                "/vm/<uuid>" (libxl)
    /local/domain/<domid>/control/shutdown  the control node: the toolstack
                                            writes "suspend"; a PV guest's
                                            kernel acknowledges by writing ""
                                            (or removing it), then suspends
    @releaseDomain                          special watch path: fires when a
                                            domain dies or shuts down

The suspend handshake (``suspend``), as libxl's pvcontrol suspend does:
  1. watch control/shutdown and @releaseDomain, write "suspend";
  2. the guest acknowledges by clearing the node, within ``ack_timeout``;
     if it does not, the request is withdrawn (the node is cleared if it still
     says "suspend") and DomainError says the guest did not answer;
  3. wait, within ``suspend_timeout``, until the caller's ``is_suspended()``
     (Xen: domain shut down with reason SHUTDOWN_suspend) is true; it is
     checked on every @releaseDomain event and at least every POLL_INTERVAL.

Rules:
- Every wait has a timeout (pyxs itself waits forever: this module sends its
  requests through pyxs's Router and waits on the reply with a deadline).
- Failures are DomainError naming the domain and the operation; no
  xenstored to connect to is HypervisorUnavailable naming what was tried.
- Paths and values are text; they are encoded as ASCII (xenstore's wire).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable

from .errors import DomainError, HypervisorUnavailable

try:
    from pyxs._internal import NUL, Op, Packet, next_rq_id
    from pyxs.client import Client, Router
    from pyxs.connection import UnixSocketConnection, XenBusConnection
    from pyxs.exceptions import ConnectionError as XsConnectionError
    from pyxs.exceptions import PyXSError
except ImportError:  # pragma: no cover - pyxs is a declared dependency
    Client = None

#: Where xenstored listens on Debian's dom0 (XENSTORED_PATH overrides).
DEFAULT_SOCKETS = ("/run/xenstored/socket", "/var/run/xenstored/socket")
#: The kernel's xenbus device (dom0 without a socket, or a domU).
XENBUS_DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")
#: Seconds a single xenstore request may take.
DEFAULT_TIMEOUT = 5.0
#: Seconds between two checks of a condition while waiting for watch events.
POLL_INTERVAL = 0.1
RELEASE_DOMAIN = "@releaseDomain"


def domain_path(domid: int) -> str:
    return f"/local/domain/{int(domid)}"


def shutdown_path(domid: int) -> str:
    return f"{domain_path(domid)}/control/shutdown"


def uuid_from_vm_path(vm: str) -> str | None:
    """The UUID in libxl's "/vm/<uuid>" value, or None."""
    parts = vm.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "vm" and len(parts[1]) == 36:
        return parts[1].lower()
    return None


def _enc(text: str) -> bytes:
    try:
        return text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise DomainError(None, "xenstore", f"non-ASCII path or value {text!r}") from exc


if Client is not None:

    class _Router(Router):
        """pyxs's Router, but a lost connection ends the thread quietly and is
        remembered in ``error`` (waiters notice the thread is gone)."""

        error: Exception | None = None

        def __call__(self) -> None:
            try:
                super().__call__()
            except Exception as exc:  # noqa: BLE001 - reported to every waiter
                self.error = exc


class _Events:
    """What pyxs's Router needs from a subscriber: an ``events`` queue."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()


class Watch:
    """A registered xenstore watch; ``wait`` returns the next fired path."""

    def __init__(self, xs: XenStore, path: str, token: str) -> None:
        self._xs = xs
        self.path = path
        self.token = token
        self._sub = _Events()

    def wait(self, timeout: float) -> str | None:
        """The path of the next event, or None after ``timeout`` seconds."""
        try:
            ev = self._sub.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        return ev.path.decode("ascii", "replace")

    def close(self) -> None:
        self._xs._unwatch(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class XenStore:
    """One xenstored connection, with a deadline on every request."""

    _tokens = 0
    _token_lock = threading.Lock()

    def __init__(self, client, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._client = client
        self.timeout = timeout

    @classmethod
    def connect(cls, path: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> XenStore:
        """Connect to xenstored: ``path`` (a unix socket), else $XENSTORED_PATH,
        else the default sockets, else the xenbus device."""
        if Client is None:
            raise HypervisorUnavailable("pyxs is not installed (pip install pyxs==0.4.1)")
        tried = []
        candidates = [path] if path else [os.environ.get("XENSTORED_PATH"), *DEFAULT_SOCKETS]
        for sock in filter(None, candidates):
            tried.append(sock)
            if os.path.exists(sock):
                client = Client(router=_Router(UnixSocketConnection(sock)))
                return cls._started(client, sock, timeout)
        if not path:
            for dev in XENBUS_DEVICES:
                tried.append(dev)
                if os.path.exists(dev):
                    return cls._started(Client(router=_Router(XenBusConnection(dev))), dev, timeout)
        raise HypervisorUnavailable(f"no xenstored to talk to (tried {', '.join(tried)})")

    @classmethod
    def _started(cls, client, where: str, timeout: float) -> XenStore:
        try:
            client.connect()
        except (XsConnectionError, OSError) as exc:
            raise HypervisorUnavailable(f"cannot connect to xenstored at {where}: {exc}") from exc
        return cls(client, timeout)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    def __enter__(self) -> XenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests with deadlines ----------------------------------------------
    def _request(self, op: int, payload: bytes, what: str, who=None) -> bytes:
        if self._client is None:
            raise DomainError(who, what, "xenstore connection is closed")
        router = self._client.router
        if not router.thread.is_alive():
            raise DomainError(who, what, "xenstore connection was lost")
        rq_id = next_rq_id() & 0xFFFFFFFF
        try:
            rvar = router.send(Packet(op, payload, rq_id=rq_id))
        except (PyXSError, OSError) as exc:
            raise DomainError(who, what, f"xenstore send failed: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        with rvar.condition:
            while rvar.target is None:
                left = deadline - time.monotonic()
                if left <= 0 or not router.thread.is_alive():
                    break
                rvar.condition.wait(min(left, POLL_INTERVAL))
        if rvar.target is None:
            router.rvars.pop(rq_id, None)
            if not router.thread.is_alive():
                why = getattr(router, "error", None)
                raise DomainError(who, what, f"xenstore connection was lost ({why})")
            raise DomainError(who, what, f"xenstored did not answer within {self.timeout}s")
        reply = rvar.target
        if reply.op == Op.ERROR:
            name = reply.payload.rstrip(NUL).decode("ascii", "replace")
            code = getattr(errno, name, 0)
            raise _XsError(who, what, name, code)
        return reply.payload

    def read(self, path: str) -> str | None:
        """The value at ``path``, or None if it does not exist."""
        try:
            raw = self._request(Op.READ, _enc(path) + NUL, f"xenstore read {path}")
        except _XsError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        return raw.rstrip(NUL).decode("ascii", "replace")

    def write(self, path: str, value: str) -> None:
        self._request(Op.WRITE, _enc(path) + NUL + _enc(value), f"xenstore write {path}")

    def remove(self, path: str) -> None:
        try:
            self._request(Op.RM, _enc(path) + NUL, f"xenstore rm {path}")
        except _XsError as exc:
            if exc.code != errno.ENOENT:
                raise

    def list(self, path: str) -> list[str]:
        """Children of ``path`` ([] if it does not exist)."""
        try:
            raw = self._request(Op.DIRECTORY, _enc(path) + NUL, f"xenstore directory {path}")
        except _XsError as exc:
            if exc.code == errno.ENOENT:
                return []
            raise
        return [p.decode("ascii", "replace") for p in raw.split(NUL) if p]

    def exists(self, path: str) -> bool:
        try:
            self._request(Op.DIRECTORY, _enc(path) + NUL, f"xenstore directory {path}")
        except _XsError as exc:
            if exc.code == errno.ENOENT:
                return False
            raise
        return True

    # -- watches ---------------------------------------------------------------
    def watch(self, path: str) -> Watch:
        """Register a watch on ``path`` (xenstored fires it once at once)."""
        with XenStore._token_lock:
            XenStore._tokens += 1
            token = f"remus-{os.getpid()}-{XenStore._tokens}"
        w = Watch(self, path, token)
        self._client.router.subscribe(_enc(token), w._sub)
        try:
            self._request(Op.WATCH, _enc(path) + NUL + _enc(token) + NUL, f"xenstore watch {path}")
        except DomainError:
            self._client.router.unsubscribe(_enc(token), w._sub)
            raise
        return w

    def _unwatch(self, w: Watch) -> None:
        if self._client is None:
            return
        try:
            self._request(
                Op.UNWATCH, _enc(w.path) + NUL + _enc(w.token) + NUL, f"xenstore unwatch {w.path}"
            )
        except DomainError:
            pass  # connection gone: the watch went with it
        finally:
            try:
                self._client.router.unsubscribe(_enc(w.token), w._sub)
            except ValueError:
                pass

    # -- names -----------------------------------------------------------------
    def name_of(self, domid: int) -> str | None:
        return self.read(f"{domain_path(domid)}/name")

    def uuid_of(self, domid: int) -> str | None:
        vm = self.read(f"{domain_path(domid)}/vm")
        return uuid_from_vm_path(vm) if vm else None

    def domid_of(self, name: str) -> int:
        """The domid whose /local/domain/<id>/name is ``name``."""
        found = []
        for child in self.list("/local/domain"):
            if child.isdigit() and self.read(f"/local/domain/{child}/name") == name:
                found.append(int(child))
        if not found:
            raise DomainError(name, "lookup", "no domain of that name in xenstore")
        if len(found) > 1:
            raise DomainError(name, "lookup", f"several domains have that name: {found}")
        return found[0]

    # -- waits -------------------------------------------------------------------
    def wait_until(
        self, cond: Callable[[], bool], watch_path: str, timeout: float, who, what: str
    ) -> None:
        """Return once ``cond()`` holds, checked on each event of a watch on
        ``watch_path`` and every POLL_INTERVAL; DomainError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.watch(watch_path) as w:
            while True:
                if cond():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DomainError(who, what, f"not done within {timeout}s")
                w.wait(min(left, POLL_INTERVAL))

    def wait_released(
        self, domid: int, timeout: float, alive: Callable[[int], bool] | None = None
    ) -> None:
        """Return once domain ``domid`` is gone (@releaseDomain fired and
        ``alive(domid)`` is false; by default: its /local/domain node is gone)."""
        check = alive or (lambda d: self.exists(domain_path(d)))
        self.wait_until(
            lambda: not check(domid), RELEASE_DOMAIN, timeout, domid, "wait for destruction"
        )

    def suspend(
        self,
        domid: int,
        is_suspended: Callable[[], bool],
        ack_timeout: float = 5.0,
        suspend_timeout: float = 10.0,
    ) -> None:
        """The PV suspend handshake through control/shutdown (module docstring)."""
        node = shutdown_path(domid)
        with self.watch(node) as w:
            self.write(node, "suspend")
            deadline = time.monotonic() + ack_timeout
            while self.read(node) not in ("", None):
                left = deadline - time.monotonic()
                if left <= 0:
                    if self.read(node) == "suspend":
                        self.write(node, "")  # withdraw, as libxl does
                    raise DomainError(
                        domid,
                        "suspend",
                        f"guest did not acknowledge control/shutdown=suspend within {ack_timeout}s",
                    )
                w.wait(min(left, POLL_INTERVAL))
        self.wait_until(
            is_suspended,
            RELEASE_DOMAIN,
            suspend_timeout,
            domid,
            "suspend (wait for SHUTDOWN_suspend)",
        )


class _XsError(DomainError):
    """xenstored answered with an error (``code`` is the errno number)."""

    def __init__(self, who, what: str, name: str, code: int) -> None:
        super().__init__(who, what, f"xenstored says {name}")
        self.code = code
