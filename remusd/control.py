"""remusd's control requests: what remusctl may ask over the control socket.

Requests (JSON lines, framing in ``daemonkit.control``)::

    {"cmd": "status", "history": false?}
        -> {"daemon": "remusd", "version", "pid", "hypervisor", "uptime_s",
            "domains": [<domain status>, ...]}            (docs/operations.md)
        history true: each domain status also carries "history": {"index",
        "pause_ms", "pages", "bytes"}, the last acknowledged checkpoints
    {"cmd": "protect", "domain": "ledger" | 3, "target": "HOST:PORT" | "file:PATH",
     "interval_ms": 100?, "codec": "seed"?, "verify": false?}
        -> <domain status>  (missing options take the daemon's defaults)
    {"cmd": "unprotect", "domain": "ledger" | 3, "wait_s": 10?}
        -> <domain status>  once the clean end is done (or the timeout passed)

Rules:
- One protector per domain (by domid): protecting a protected domain is an
  error naming its target; a stopped protector is replaced.
- Errors are ``RemusError``s with a message for the operator; the control
  server turns them into ``{"ok": false, "error": ...}``.
- ``_lock`` guards the table of protectors only: no request holds it while
  it talks to a hypervisor, a socket or a protector's thread, so ``status``
  answers at once whatever a protector is doing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from xenbind.errors import ConfigError, DomainError, RemusError
from xenbind.hypervisor import Hypervisor

from . import faults
from .config import ProtectRequest
from .protector import SOFTWARE, Connector, Protector, Tuning

log = logging.getLogger(__name__)


def domain_ref(value: Any) -> int | str:
    """A domid (int, or digits) or a name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value)
    return int(text) if text.isdigit() else text


class Daemon:
    """The protectors of one remusd and the requests that drive them."""

    def __init__(self, hv: Hypervisor, args: Any, connect: Connector | None) -> None:
        """``connect``: how network links connect (remusd.cli's choice: TLS or,
        with --insecure, plaintext; None: only file targets can be protected).
        REMUSD_FAULT (remusd.faults) is read here, once."""
        self.hv = hv
        self.args = args
        self.tuning = Tuning.from_args(args, connect, wrap=faults.session_wrapper())
        self.protectors: dict[int, Protector] = {}
        self._lock = threading.Lock()
        self.started = time.monotonic()

    # -- requests ----------------------------------------------------------------

    def handle(self, req: dict[str, Any]) -> Any:
        cmd = req["cmd"]
        if cmd == "status":
            return self.status(history=req.get("history") is True)
        if cmd == "protect":
            return self.protect(ProtectRequest.from_json(req, self.args))
        if cmd == "unprotect":
            if "domain" not in req:
                raise ConfigError("unprotect: 'domain' is required")
            timeout = req.get("wait_s", 30)
            if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
                raise ConfigError("unprotect: 'wait_s' must be a positive number of seconds")
            return self.unprotect(req["domain"], float(timeout))
        raise ConfigError(f"unknown command {cmd!r} (status, protect, unprotect)")

    def status(self, history: bool = False) -> dict[str, Any]:
        with self._lock:
            prots = sorted(self.protectors.values(), key=lambda p: p.info.domid)
        return {
            "daemon": "remusd",
            "version": SOFTWARE.split()[1],
            "pid": os.getpid(),
            "hypervisor": getattr(self.hv, "kind", "?"),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "domains": [p.status(history) for p in prots],
        }

    def protect(self, req: ProtectRequest) -> dict[str, Any]:
        if req.target.kind == "tcp" and self.tuning.connect is None:
            raise ConfigError(
                "a network target needs TLS (remusd --tls-cert, --tls-key, "
                "--tls-ca) or, for a plaintext link, remusd --insecure"
            )
        domain = self.hv.lookup(domain_ref(req.domain))
        info = domain.info()
        with self._lock:
            old = self.protectors.get(info.domid)
            if old is not None and old.alive:
                raise RemusError(
                    f"domain {info.name} ({info.domid}) is already protected "
                    f"to {old.req.target} (state {old.state}); unprotect it first"
                )
            p = Protector(domain, info, req, self.tuning)
            self.protectors[info.domid] = p
        log.info(
            "protecting domain %s (%d) to %s every %d ms, codec %s%s",
            info.name,
            info.domid,
            req.target,
            req.interval_ms,
            req.codec,
            ", verify" if req.verify else "",
        )
        p.start()
        return p.status()

    def _find(self, ref: Any) -> Protector:
        r = domain_ref(ref)
        with self._lock:
            for p in self.protectors.values():
                if r == p.info.domid or r == p.info.name:
                    return p
        raise DomainError(r, "unprotect", "not protected by this remusd")

    def unprotect(self, ref: Any, timeout: float = 30.0) -> dict[str, Any]:
        p = self._find(ref)
        p.stop()
        if not p.join(timeout):
            raise RemusError(
                f"domain {p.info.name}: the clean end did not finish within "
                f"{timeout} s (state {p.state})"
            )
        return p.status()

    # -- life cycle --------------------------------------------------------------

    def stop_all(self, timeout: float) -> None:
        with self._lock:
            prots = list(self.protectors.values())
        for p in prots:
            p.stop()
        deadline = time.monotonic() + timeout
        for p in prots:
            if not p.join(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "domain %s: clean end unfinished at shutdown (state %s)", p.info.name, p.state
                )

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            for p in self.protectors.values():
                out[p.state] = out.get(p.state, 0) + 1
        return out
