"""The witness: one owner key per protected domain in etcd, held under a lease.

This is Patroni's model (its leader key), for Remus: the primary holds the
domain's owner key under a lease it renews while it runs; the receiver fails
over only after it has *won* that key in a transaction, which etcd lets
happen only once the holder's lease has expired (or the key is absent). The
whole design, the key layout, the timings and the contract the daemons keep
are in docs/witness.md.

Two parts:

The decisions, pure and clock-free
    ``Timings`` (TTL, renew period, margin, request timeout), ``LeaseClock``
    (what the holder knows of its lease: valid until when, renew when),
    ``promise_until`` / ``release_allowed`` / ``pause_deadline`` (may the
    primary release output now; when must it have paused), and the
    configuration (``parse_witness_table``, ``witness_config``). Times are
    numbers the caller passes in, read from ``time.monotonic()``.
The etcd I/O
    ``OwnerKey`` (claim, renew, release, read the holder) over etcd3gw, which
    speaks etcd's JSON gateway at ``/v3/`` (etcd 3.4 and later; 3.4 also
    still serves ``/v3beta/``, 3.5 no longer does). Each request goes to one
    member at a time, the next member on any failure.

How the daemons call it: docs/witness.md, "The contract".

Rules kept here:
- Never a silent win, never a silent "valid". Every failure to get an answer
  from a quorum is ``WitnessUnreachable``; a claim etcd refuses is
  ``ClaimRefused`` naming the holder; a lease etcd no longer has, or an owner
  key no longer on our lease, is ``LeaseLost``. None of them extends validity.
- "Valid until" is conservative: the local monotonic time read *before* the
  request that etcd answered was sent, plus the TTL (the smaller of the one
  asked and the one granted), minus the margin. etcd starts the lease's TTL
  when it handles the request, which is after that moment, so the server's
  expiry is never earlier than ours plus the margin (clock *rates* assumed
  to agree within the margin; no clock is compared across hosts).
- Only a keepalive etcd answered with a live TTL, followed by a check that
  the owner key is still on our lease, extends validity; a lease once lost
  stays lost (``LeaseClock`` refuses to revive it: claim again instead).
- A claim is one transaction: owner key absent (create_revision 0), and,
  when the caller names one, the epoch key unchanged since its last claim.
  It writes both keys; its revision is the fencing revision.
- The release check (``may_release``, ``valid_until``, ``status``) never waits
  on etcd: a renewal stuck on a dead member holds only the I/O lock.
- Imports only ``xenbind.errors`` of the project, plus etcd3gw.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import threading
import time
import tomllib
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception
from etcd3gw.lease import Lease

from xenbind.errors import ConfigError, RemusError

T = TypeVar("T")

API_PATH = "/v3/"  # etcd's JSON gateway, 3.4 and later
DEFAULT_PREFIX = "/remus/default"
DEFAULT_TTL_S = 5
MIN_TTL_S = 2  # etcd's floor with its default 1 s election timeout (it grants 2 if asked less)


# -- errors ---------------------------------------------------------------


class WitnessError(RemusError):
    """Base of the witness's errors."""


class WitnessUnreachable(WitnessError):
    """No etcd member answered (down, partitioned away, or no quorum behind it)."""

    def __init__(self, op: str, errors: list[str]) -> None:
        super().__init__(f"witness unreachable: {op}: " + "; ".join(errors))
        self.op = op
        self.errors = errors


class ClaimRefused(WitnessError):
    """etcd refused the claim: the owner key is held, or the epoch moved on."""

    def __init__(self, key: str, holder: Holder | None, epoch: int, why: str) -> None:
        super().__init__(f"witness: claim of {key} refused: {why}")
        self.key = key
        self.holder = holder
        self.epoch = epoch
        self.why = why


class LeaseLost(WitnessError):
    """etcd says our lease is gone, or the owner key is no longer on it."""


# -- configuration --------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    """The witness's timings, in seconds. Build with ``Timings.for_ttl``.

    ttl              the lease's TTL asked of etcd (an integer: etcd's unit)
    renew_period     the holder renews this often (a failed renewal is
                     retried after a quarter of it)
    margin           subtracted from every "valid until": covers the clocks'
                     rate difference, the time to pause the guest, scheduling
    request_timeout  one HTTP request to one member
    retry_period     the challenger tries the key again this often
    """

    ttl: int
    renew_period: float
    margin: float
    request_timeout: float
    retry_period: float

    @classmethod
    def for_ttl(
        cls,
        ttl: int = DEFAULT_TTL_S,
        *,
        renew_period: float | None = None,
        margin: float | None = None,
        request_timeout: float | None = None,
        retry_period: float | None = None,
    ) -> Timings:
        """Defaults from the TTL (renew every TTL/5, margin max(0.5, TTL/10)), validated."""
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < MIN_TTL_S:
            raise ConfigError(
                f"witness: ttl must be a whole number of seconds >= {MIN_TTL_S}, got {ttl!r}"
            )
        renew = ttl / 5 if renew_period is None else renew_period
        m = max(0.5, ttl / 10) if margin is None else margin
        req = min(1.0, renew) if request_timeout is None else request_timeout
        retry = min(1.0, renew) if retry_period is None else retry_period
        t = cls(ttl=ttl, renew_period=renew, margin=m, request_timeout=req, retry_period=retry)
        t.validate()
        return t

    def validate(self) -> None:
        for name in ("renew_period", "margin", "request_timeout", "retry_period"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(
                    f"witness: {name.replace('_', '-')} must be > 0 seconds, got {v!r}"
                )
        if self.margin >= self.ttl / 2:
            raise ConfigError(
                f"witness: margin {self.margin} s must be below half the ttl ({self.ttl} s)"
            )
        # three renewals (each up to one request timeout late) fit before the
        # holder's conservative expiry: one lost renewal never pauses a guest
        usable = self.ttl - self.margin
        if 3 * self.renew_period + self.request_timeout > usable:
            raise ConfigError(
                f"witness: renew-period {self.renew_period} s is too long for ttl {self.ttl} s "
                f"and margin {self.margin} s (need 3 x renew-period + request-timeout <= "
                f"ttl - margin = {usable:g} s)"
            )


@dataclass(frozen=True)
class WitnessConfig:
    """A validated ``[witness]`` table: where etcd is, how to talk to it, the timings."""

    endpoints: tuple[str, ...]
    timings: Timings
    prefix: str = DEFAULT_PREFIX
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def owner_key(self, domain_uuid: str) -> str:
        return f"{self.prefix}/domains/{canonical_uuid(domain_uuid)}/owner"

    def epoch_key(self, domain_uuid: str) -> str:
        return f"{self.prefix}/domains/{canonical_uuid(domain_uuid)}/epoch"

    def describe(self) -> dict[str, Any]:
        """For the daemons' status: where the witness is, and its timings."""
        return {
            "endpoints": list(self.endpoints),
            "prefix": self.prefix,
            "tls": self.endpoints[0].startswith("https:"),
            "ttl_s": self.timings.ttl,
            "renew_period_s": self.timings.renew_period,
            "margin_s": self.timings.margin,
        }


def canonical_uuid(domain_uuid: str) -> str:
    """The domain's UUID in canonical form; ConfigError if it is not one."""
    try:
        return str(uuidlib.UUID(domain_uuid))
    except (ValueError, TypeError, AttributeError):
        raise ConfigError(f"witness: {domain_uuid!r} is not a domain UUID") from None


_KEYS = (
    "endpoints",
    "ttl",
    "renew-period",
    "margin",
    "request-timeout",
    "retry-period",
    "prefix",
    "ca",
    "cert",
    "key",
)


def _endpoint(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: an endpoint must be a string like http://host:2379, got {value!r}"
        )
    try:
        u = urlsplit(value)
        port = u.port
    except ValueError as e:
        raise ConfigError(f"{where}: endpoint {value!r}: {e}") from None
    if u.scheme not in ("http", "https") or not u.hostname or port is None:
        raise ConfigError(f"{where}: endpoint {value!r} must be http(s)://host:port")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise ConfigError(f"{where}: endpoint {value!r} must be http(s)://host:port, nothing more")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}:{port}"


def _number(where: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {name} must be a number of seconds, got {value!r}")
    return float(value)


def _path(where: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {name} must be a file name, got {value!r}")
    if not os.path.isfile(value):
        raise ConfigError(f"{where}: {name} file {value} does not exist")
    return value


def parse_witness_table(table: Mapping[str, object], *, where: str = "[witness]") -> WitnessConfig:
    """Validate a ``[witness]`` table (keys with ``-`` or ``_``); ConfigError on one line."""
    norm: dict[str, object] = {}
    for k, v in table.items():
        name = str(k).replace("_", "-")
        if name not in _KEYS:
            raise ConfigError(f"{where}: unknown key {k!r} (known keys: {', '.join(_KEYS)})")
        norm[name] = v
    raw = norm.get("endpoints")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: endpoints must be a non-empty list of http(s)://host:port")
    endpoints = tuple(_endpoint(where, e) for e in raw)
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"{where}: endpoints lists the same member twice")
    schemes = {e.split(":", 1)[0] for e in endpoints}
    if len(schemes) != 1:
        raise ConfigError(f"{where}: endpoints mix http and https")
    ttl = norm.get("ttl", DEFAULT_TTL_S)
    if isinstance(ttl, float) and ttl.is_integer():
        ttl = int(ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise ConfigError(f"{where}: ttl must be a whole number of seconds, got {ttl!r}")
    opt: dict[str, float] = {}
    for name in ("renew-period", "margin", "request-timeout", "retry-period"):
        if name in norm:
            opt[name.replace("-", "_")] = _number(where, name, norm[name])
    try:
        timings = Timings.for_ttl(ttl, **opt)
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).removeprefix('witness: ')}") from None
    prefix = norm.get("prefix", DEFAULT_PREFIX)
    if (
        not isinstance(prefix, str)
        or not prefix.startswith("/")
        or prefix.endswith("/")
        or any(c.isspace() for c in prefix)
        or "//" in prefix
    ):
        raise ConfigError(
            f"{where}: prefix must look like /remus/<cluster> (leading /, no trailing /), got {prefix!r}"
        )
    ca = _path(where, "ca", norm["ca"]) if norm.get("ca") is not None else None
    cert = _path(where, "cert", norm["cert"]) if norm.get("cert") is not None else None
    key = _path(where, "key", norm["key"]) if norm.get("key") is not None else None
    if (cert is None) != (key is None):
        raise ConfigError(f"{where}: cert and key go together (a client certificate and its key)")
    if schemes == {"http"} and (ca or cert):
        raise ConfigError(f"{where}: ca/cert/key given but the endpoints are http://: use https://")
    return WitnessConfig(
        endpoints=endpoints, timings=timings, prefix=prefix, ca=ca, cert=cert, key=key
    )


def read_witness_table(path: str | None) -> dict[str, object] | None:
    """The ``[witness]`` table of the TOML file at ``path`` (None: no file, or no table)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    table = data.get("witness")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: witness must be a table ([witness]), got {table!r}")
    return table


_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--witness-ttl", "ttl", int, "lease TTL in whole seconds (default 5)"),
    ("--witness-renew-period", "renew-period", float, "seconds between renewals (default TTL/5)"),
    ("--witness-margin", "margin", float, "safety margin in seconds (default max(0.5, TTL/10))"),
    ("--witness-request-timeout", "request-timeout", float, "one request to one member, s"),
    ("--witness-retry-period", "retry-period", float, "the receiver's retry period, s"),
    ("--witness-prefix", "prefix", str, f"key prefix (default {DEFAULT_PREFIX})"),
    ("--witness-ca", "ca", str, "CA file to verify etcd's certificate"),
    ("--witness-cert", "cert", str, "client certificate for etcd"),
    ("--witness-key", "key", str, "the client certificate's key"),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_witness_flags(parser: argparse.ArgumentParser) -> None:
    """The ``--witness-*`` flags; each overrides its key of the ``[witness]`` table."""
    g = parser.add_argument_group("witness (etcd; see docs/witness.md)")
    g.add_argument(
        "--witness-endpoint",
        dest="witness_endpoints",
        action="append",
        default=None,
        metavar="URL",
        help="an etcd member, http(s)://host:port (repeat for each; replaces [witness] endpoints)",
    )
    for flag, _key, conv, text in _FLAGS:
        g.add_argument(flag, dest=_dest(flag), type=conv, default=None, help=text)


def witness_config(
    table: Mapping[str, object] | None,
    args: argparse.Namespace | None = None,
    *,
    where: str = "[witness]",
) -> WitnessConfig | None:
    """The table with the ``--witness-*`` flags over it; None when no endpoint is set."""
    merged: dict[str, object] = dict(table or {})
    if args is not None:
        endpoints = getattr(args, "witness_endpoints", None)
        if endpoints is not None:
            merged["endpoints"] = list(endpoints)
        for flag, key, _conv, _text in _FLAGS:
            value = getattr(args, _dest(flag), None)
            if value is not None:
                merged = {k: v for k, v in merged.items() if str(k).replace("_", "-") != key}
                merged[key] = value
    if not merged:
        return None
    if "endpoints" not in merged:
        raise ConfigError(f"{where}: witness options given but no endpoints")
    return parse_witness_table(merged, where=where)


def load_witness_config(
    config_path: str | None, args: argparse.Namespace | None = None
) -> WitnessConfig | None:
    """What a daemon calls after parsing its flags: None means no witness."""
    where = f"config file {config_path}: [witness]" if config_path else "witness flags"
    return witness_config(read_witness_table(config_path), args, where=where)


def no_witness_status() -> dict[str, Any]:
    """The status block of a daemon with no witness configured."""
    return {
        "witness": None,
        "split_brain_protection": False,
        "split_brain_note": "no [witness] configured: a partition of the replication link "
        "gives two running copies (docs/operations.md, Split brain)",
    }


# -- the decisions (pure, clock-free) -------------------------------------


def promise_until(sent_at: float, failover_timeout: float, margin: float) -> float:
    """Until when an acknowledged checkpoint keeps the backup from taking over.

    ``sent_at``: the primary's monotonic time read before it sent the first
    byte of the checkpoint the backup acknowledged; ``failover_timeout``: the
    receiver's, in seconds (its ACCEPT gives it). The receiver saw that
    checkpoint no earlier than ``sent_at`` and resumes no earlier than its
    failover timeout after the last sign of life it saw.
    """
    return sent_at + failover_timeout - margin


def release_allowed(now: float, lease_valid_until: float | None, promise: float | None) -> bool:
    """May the primary release guest output now: a valid lease, or a live promise."""
    return any(t is not None and now < t for t in (lease_valid_until, promise))


def pause_deadline(lease_valid_until: float | None, promise: float | None) -> float | None:
    """By when the guest must be paused unless renewed meanwhile (None: it must be now)."""
    known = [t for t in (lease_valid_until, promise) if t is not None]
    return max(known) if known else None


@dataclass
class LeaseClock:
    """What the holder of an owner key knows of its lease, with no clock of its own.

    States: ``none`` (never claimed), ``held`` (claimed; valid while now <
    ``valid_until``), ``lost`` (etcd said the lease or key is gone: never
    valid again; claim afresh), ``released`` (we gave it up).
    """

    timings: Timings
    state: str = "none"
    valid_until: float | None = None
    revision: int | None = None  # the fencing revision of our claim
    lease_id: int | None = None
    last_ok: float | None = None  # send time of the last answered renewal
    last_error: str | None = None
    failures: int = 0  # renewals failed in a row
    _retry_at: float | None = field(default=None, repr=False)

    def _validity(self, sent_at: float, server_ttl: int) -> float:
        return sent_at + min(self.timings.ttl, server_ttl) - self.timings.margin

    def granted(self, sent_at: float, server_ttl: int, revision: int, lease_id: int) -> None:
        """A claim succeeded; ``sent_at`` was read before the lease grant was sent."""
        if server_ttl <= 0:
            raise WitnessError(f"witness: a claim with no live lease (TTL {server_ttl})")
        self.state = "held"
        self.valid_until = self._validity(sent_at, server_ttl)
        self.revision = revision
        self.lease_id = lease_id
        self.last_ok = sent_at
        self.last_error = None
        self.failures = 0
        self._retry_at = None

    def renewed(self, sent_at: float, server_ttl: int) -> None:
        """A keepalive sent at ``sent_at`` was answered live, and the key is still ours."""
        if self.state != "held":
            raise WitnessError(f"witness: renewal of a lease in state {self.state}")
        if server_ttl <= 0:
            raise WitnessError(f"witness: a renewal with no live lease (TTL {server_ttl})")
        v = self._validity(sent_at, server_ttl)
        self.valid_until = v if self.valid_until is None else max(self.valid_until, v)
        self.last_ok = sent_at if self.last_ok is None else max(self.last_ok, sent_at)
        self.last_error = None
        self.failures = 0
        self._retry_at = None

    def renew_failed(self, now: float, reason: str) -> None:
        """No answer: validity stays what it was (it runs out on its own)."""
        self.last_error = reason
        self.failures += 1
        self._retry_at = now + self.timings.renew_period / 4

    def lost(self, reason: str) -> None:
        """etcd said no: the lease is gone or the key is not on it. Final for this claim."""
        self.state = "lost"
        self.valid_until = None
        self.last_error = reason
        self._retry_at = None

    def released(self) -> None:
        self.state = "released"
        self.valid_until = None
        self._retry_at = None

    def valid(self, now: float) -> bool:
        return self.state == "held" and self.valid_until is not None and now < self.valid_until

    def next_renew_at(self, now: float) -> float | None:
        """When to renew next (None: nothing to renew)."""
        if self.state != "held":
            return None
        if self._retry_at is not None:
            return self._retry_at
        assert self.last_ok is not None
        return self.last_ok + self.timings.renew_period

    def phase(self, now: float) -> str:
        """held / unconfirmed (renewals failing, still valid) / expired / lost / released / none."""
        if self.state != "held":
            return self.state
        if not self.valid(now):
            return "expired"
        return "unconfirmed" if self.failures else "held"

    def status(self, now: float) -> dict[str, Any]:
        valid_for = None
        if self.valid_until is not None and self.state == "held":
            valid_for = round(max(0.0, self.valid_until - now), 3)
        return {
            "lease": self.phase(now),
            "valid_for_s": valid_for,
            "fencing_revision": self.revision,
            "renew_failures": self.failures,
            "last_error": self.last_error,
        }


# -- the etcd I/O ---------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """Who holds (or last claimed) an owner key: the value written, decoded."""

    host: str
    role: str  # "primary" (remusd) or "backup" (the receiver, after winning)
    session: str
    pid: int
    lease: int = 0  # the etcd lease the owner key is on (0: not known / epoch key)
    revision: int = 0  # the key's create revision

    def encode(self) -> str:
        return json.dumps(
            {"host": self.host, "role": self.role, "session": self.session, "pid": self.pid},
            sort_keys=True,
        )

    @classmethod
    def decode(cls, value: bytes, *, lease: int = 0, revision: int = 0) -> Holder:
        try:
            d = json.loads(value)
            return cls(
                str(d["host"]), str(d["role"]), str(d["session"]), int(d["pid"]), lease, revision
            )
        except (ValueError, KeyError, TypeError):
            text = value.decode("utf-8", "replace")[:80]
            return cls(
                host=f"<not remus: {text!r}>",
                role="?",
                session="?",
                pid=0,
                lease=lease,
                revision=revision,
            )


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _brief(e: BaseException) -> str:
    detail = getattr(e, "detail_text", None)
    text = str(detail or e or type(e).__name__).strip().replace("\n", " ")
    return text[:200]


class _Members:
    """One etcd3gw client per member; a request goes to one, the next on failure."""

    def __init__(self, config: WitnessConfig, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._urls = list(config.endpoints)
        self._clients: list[Etcd3Client] = []
        for url in config.endpoints:
            u = urlsplit(url)
            assert u.hostname is not None and u.port is not None
            client = Etcd3Client(
                host=u.hostname,
                port=u.port,
                protocol=u.scheme,
                ca_cert=config.ca,
                cert_key=config.key,
                cert_cert=config.cert,
                timeout=config.timings.request_timeout,
                api_path=API_PATH,
            )
            # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment
            # override the session's CA (its verify=), and routes through
            # HTTP(S)_PROXY: the witness's CA is the configured one, the
            # connection goes straight to the member
            client.session.trust_env = False
            self._clients.append(client)
        self._next = 0
        self._lock = threading.Lock()

    def call(self, op: str, fn: Callable[[Etcd3Client], T]) -> tuple[T, float]:
        """``fn`` on the first member that answers: (its result, the time read before sending)."""
        errors: list[str] = []
        with self._lock:
            n = len(self._clients)
            for k in range(n):
                i = (self._next + k) % n
                sent_at = self._clock()
                try:
                    result = fn(self._clients[i])
                except (Etcd3Exception, OSError, ValueError, KeyError, TypeError) as e:
                    # OSError covers requests' exceptions; ValueError a body that is no JSON
                    errors.append(f"{self._urls[i]}: {_brief(e)}")
                    continue
                self._next = i
                return result, sent_at
            self._next = (self._next + 1) % n
        raise WitnessUnreachable(op, errors)

    def close(self) -> None:
        for c in self._clients:
            c.session.close()


def _kv(response: Mapping[str, Any]) -> dict[str, Any] | None:
    """The first key-value of a txn's response_range, or None."""
    kvs = response.get("response_range", {}).get("kvs", [])
    return dict(kvs[0]) if kvs else None


class OwnerKey:
    """One domain's owner key, as one daemon holds or challenges it.

    The primary (remusd): ``claim()`` when it starts protecting, then
    ``run_renewals()`` in a thread (or ``renew()`` at ``next_renew_at``),
    ``may_release()`` / ``valid_until`` at every output release, ``release()``
    when protection ends cleanly. The receiver: ``claim()`` only once its
    failover timeout has passed (``ClaimRefused`` while the primary's lease
    lives); after a win it holds the key like a primary, and ``revision`` is
    the fencing revision it records with the backup. docs/witness.md.
    """

    def __init__(
        self,
        config: WitnessConfig,
        domain_uuid: str,
        *,
        role: str,
        session: str,
        host: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if role not in ("primary", "backup"):
            raise ValueError(f"role must be primary or backup, not {role!r}")
        self.config = config
        self.key = config.owner_key(domain_uuid)
        self.epoch_key = config.epoch_key(domain_uuid)
        self.me = Holder(
            host=host or os.uname().nodename, role=role, session=session, pid=os.getpid()
        )
        self.clock = clock
        self.lease = LeaseClock(config.timings)
        self._members = _Members(config, clock)
        self._io = threading.Lock()  # one claim/renew/release at a time (held over I/O)
        self._state = threading.Lock()  # self.lease; never held over I/O
        self._pending: tuple[int, float, int] | None = None  # a granted lease not yet on the key

    # -- reading ----------------------------------------------------------

    @property
    def revision(self) -> int | None:
        """The fencing revision of our claim (None before one)."""
        return self.lease.revision

    @property
    def valid_until(self) -> float | None:
        """Monotonic time until which our lease is surely live (None: not held)."""
        with self._state:
            return self.lease.valid_until if self.lease.state == "held" else None

    def may_release(self, now: float | None = None) -> bool:
        """Is the lease surely live now (on the clock this object was given)."""
        t = self.clock() if now is None else now
        with self._state:
            return self.lease.valid(t)

    def holder(self) -> tuple[Holder | None, int]:
        """(who holds the owner key now or None, the epoch revision), read from a quorum."""

        def read(c: Etcd3Client) -> tuple[Holder | None, int]:
            r = c.transaction(
                {
                    "compare": [],
                    "success": [
                        {"request_range": {"key": _b64(self.key)}},
                        {"request_range": {"key": _b64(self.epoch_key)}},
                    ],
                    "failure": [],
                }
            )
            return self._parse_holder(r.get("responses", []))

        result, _ = self._members.call(f"read {self.key}", read)
        return result

    @staticmethod
    def _parse_holder(responses: list[Any]) -> tuple[Holder | None, int]:
        owner = _kv(responses[0]) if len(responses) > 0 else None
        epoch = _kv(responses[1]) if len(responses) > 1 else None
        holder = None
        if owner is not None:
            holder = Holder.decode(
                _unb64(owner.get("value", "")),
                lease=int(owner.get("lease", 0)),
                revision=int(owner.get("create_revision", 0)),
            )
        return holder, int(epoch["mod_revision"]) if epoch is not None else 0

    def status(self) -> dict[str, Any]:
        """For the daemon's status: the witness, the key, our lease."""
        now = self.clock()
        with self._state:
            out: dict[str, Any] = {
                "witness": self.config.describe(),
                "split_brain_protection": True,
                "key": self.key,
            }
            out.update(self.lease.status(now))
        return out

    # -- claiming ---------------------------------------------------------

    def _grant(self) -> tuple[int, float, int]:
        """A lease to claim with: the pending one if still live, else a new one."""
        if self._pending is not None:
            lease_id = self._pending[0]
            ttl, sent_at = self._members.call(
                "keepalive (pending lease)", lambda c: Lease(lease_id, c).refresh()
            )
            if ttl > 0:
                self._pending = (lease_id, sent_at, ttl)
                return self._pending
            self._pending = None

        def grant(c: Etcd3Client) -> tuple[int, int]:
            r = c.post(c.get_url("/lease/grant"), json={"TTL": self.config.timings.ttl, "ID": 0})
            return int(r["ID"]), int(r["TTL"])

        (lease_id, ttl), sent_at = self._members.call("grant a lease", grant)
        self._pending = (lease_id, sent_at, ttl)
        return self._pending

    def claim(self, *, expect_epoch: int | None = None) -> int:
        """Win the owner key under a fresh lease; returns the fencing revision.

        One transaction: the owner key is absent (create_revision 0) and, when
        ``expect_epoch`` is given, the epoch key's mod_revision equals it (no
        one claimed since that revision: how a primary whose lease was lost
        takes its key back only if the backup never won it). On success both
        keys are written (the owner key on our lease, the epoch key on none)
        and the transaction's revision is the fencing revision. A key already
        on our lease (an earlier attempt whose answer was lost) counts as won.

        ``ClaimRefused`` (held, or the epoch moved), ``WitnessUnreachable``.
        """
        with self._io:
            if self.lease.state == "held":
                raise WitnessError(f"witness: {self.key}: already claimed (renew it instead)")
            lease_id, sent_at, ttl = self._grant()
            compare: list[dict[str, Any]] = [
                {"key": _b64(self.key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}
            ]
            if expect_epoch is not None:
                compare.append(
                    {
                        "key": _b64(self.epoch_key),
                        "target": "MOD",
                        "result": "EQUAL",
                        "mod_revision": expect_epoch,
                    }
                )
            value = _b64(self.me.encode())
            txn = {
                "compare": compare,
                "success": [
                    {"request_put": {"key": _b64(self.key), "value": value, "lease": lease_id}},
                    {"request_put": {"key": _b64(self.epoch_key), "value": value}},
                ],
                "failure": [
                    {"request_range": {"key": _b64(self.key)}},
                    {"request_range": {"key": _b64(self.epoch_key)}},
                ],
            }
            r, _ = self._members.call(f"claim {self.key}", lambda c: c.transaction(txn))
            if r.get("succeeded"):
                revision = int(r["header"]["revision"])
            else:
                holder, epoch = self._parse_holder(r.get("responses", []))
                if holder is not None and holder.lease == lease_id:
                    revision = holder.revision  # our own earlier attempt went through
                else:
                    self._revoke_quietly(lease_id)
                    self._pending = None
                    if holder is not None:
                        why = (
                            f"held by {holder.role} {holder.host} session {holder.session} "
                            f"(lease {holder.lease:x}, revision {holder.revision})"
                        )
                    else:
                        why = f"the epoch moved to revision {epoch} (expected {expect_epoch}): another claim won since"
                    raise ClaimRefused(self.key, holder, epoch, why)
            self._pending = None
            with self._state:
                self.lease.granted(sent_at, ttl, revision, lease_id)
            return revision

    def _revoke_quietly(self, lease_id: int) -> None:
        try:
            self._members.call("revoke", lambda c: Lease(lease_id, c).revoke())
        except WitnessUnreachable:
            pass  # it expires on its own within the TTL, holding nothing

    # -- holding ----------------------------------------------------------

    def renew(self) -> float:
        """Keep the lease alive and check the key is still on it; the new valid-until.

        ``WitnessUnreachable`` (validity unchanged: it runs out on its own),
        ``LeaseLost`` (etcd said no: never valid again; ``claim(expect_epoch=
        revision)`` to try taking it back).
        """
        with self._io:
            if self.lease.state != "held" or self.lease.lease_id is None:
                raise LeaseLost(f"witness: {self.key}: no lease held (state {self.lease.state})")
            lease_id = self.lease.lease_id
            try:
                ttl, sent_at = self._members.call(
                    f"keepalive {self.key}", lambda c: Lease(lease_id, c).refresh()
                )
                if ttl <= 0:
                    reason = f"witness: {self.key}: lease {lease_id:x} expired on the server"
                    with self._state:
                        self.lease.lost(reason)
                    raise LeaseLost(reason)
                txn = {
                    "compare": [
                        {
                            "key": _b64(self.key),
                            "target": "LEASE",
                            "result": "EQUAL",
                            "lease": lease_id,
                        }
                    ],
                    "success": [],
                    "failure": [
                        {"request_range": {"key": _b64(self.key)}},
                        {"request_range": {"key": _b64(self.epoch_key)}},
                    ],
                }
                r, _ = self._members.call(f"check {self.key}", lambda c: c.transaction(txn))
            except WitnessUnreachable as e:
                with self._state:
                    self.lease.renew_failed(self.clock(), str(e))
                raise
            if not r.get("succeeded"):
                holder, _epoch = self._parse_holder(r.get("responses", []))
                who = f"held by {holder.role} {holder.host}" if holder else "absent"
                reason = f"witness: {self.key}: the key is no longer on our lease ({who})"
                with self._state:
                    self.lease.lost(reason)
                raise LeaseLost(reason)
            with self._state:
                self.lease.renewed(sent_at, ttl)
                valid_until = self.lease.valid_until
            assert valid_until is not None
            return valid_until

    def next_renew_at(self) -> float | None:
        with self._state:
            return self.lease.next_renew_at(self.clock())

    def run_renewals(self, stop: threading.Event) -> None:
        """Renew on schedule until ``stop`` is set or the lease is lost (a thread's body)."""
        while not stop.is_set():
            at = self.next_renew_at()
            if at is None:
                return
            if stop.wait(max(0.0, at - self.clock())):
                return
            try:
                self.renew()
            except WitnessUnreachable:
                continue  # recorded in self.lease; retried sooner
            except LeaseLost:
                return

    def release(self) -> None:
        """Give the key up (revoke the lease: etcd deletes the owner key with it)."""
        with self._io:
            lease_id = self.lease.lease_id
            if self.lease.state == "held" and lease_id is not None:
                self._members.call(f"release {self.key}", lambda c: Lease(lease_id, c).revoke())
            with self._state:
                self.lease.released()

    def close(self) -> None:
        self._members.close()
