"""TLS for the replication link: settings, certificate loading, handshakes, peer names.

The replication link lets the sender write any byte into a guest's memory on
the backup, so by default it runs over TLS with mutual authentication (stdlib
``ssl``); plaintext needs ``--insecure`` on both daemons. This module decides
who may talk; ``daemonkit.transport.TlsTransport`` then carries the bytes, and
the session protocol above never knows which transport it runs on.

Configuration (both daemons, flags and TOML keys of the same name)::

    tls-cert = "/etc/remus/tls/host.crt"   this host's certificate (PEM; may hold
                                           the chain up to, not including, the CA)
    tls-key  = "/etc/remus/tls/host.key"   its private key (PEM, unencrypted; must
                                           not be readable by "other")
    tls-ca   = "/etc/remus/tls/ca.crt"     the CA(s) a peer's certificate must chain
                                           to (a bundle of several during a rotation)
    allow-peer = ["primary.example"]       names a peer's certificate must carry
                                           (subjectAltName DNS/IP or the subject CN);
                                           "*" = any certificate of the CA,
                                           "*.example" = one label under example

Rules:
- TLS 1.3 only (both ends are this project; its cipher suites are all AEAD).
- Every peer presents a certificate that chains to ``tls-ca`` and is valid
  now. The receiver also requires one of its ``allow-peer`` names (at least
  one entry is required there). The sender requires the receiver's
  certificate to carry one of its ``allow-peer`` names if any are set, else
  the host name or IP address it connects to (standard host-name checking).
- A refused peer is refused during the TLS handshake, before one session byte
  is read: ``TlsRefused.reason`` says why in a few words (``unknown CA``,
  ``expired certificate``, ``no certificate``, ``name not allowed``,
  ``plaintext client``, ...), the receiver logs it.
- The handshake has a hard deadline (not a per-read timeout), so a client
  that trickles bytes cannot hold a session thread past it; it runs in the
  per-connection thread, never in the accept loop.
- Certificates are re-read when their files change: every new connection
  stats the three files (inode, size, mtime) and rebuilds the context if any
  changed. A rebuild that fails (a half-copied key, a cert that does not match
  its key) is logged and the previous context stays in use. Sessions already
  open keep the certificates they were established with. No SIGHUP needed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from xenbind.errors import ConfigError

from .transport import PlainTransport, TlsTransport

log = logging.getLogger(__name__)

#: The first byte of every TLS record that starts a handshake (content type 22).
TLS_HANDSHAKE_RECORD = 0x16

#: OpenSSL X509_V_ERR_* codes (x509_vfy.h) -> the few words a log line gives.
VERIFY_REASONS = {
    2: "unknown CA",  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
    9: "certificate not yet valid",  # X509_V_ERR_CERT_NOT_YET_VALID
    10: "expired certificate",  # X509_V_ERR_CERT_HAS_EXPIRED
    18: "unknown CA (self-signed certificate)",  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown CA (self-signed CA in the chain)",  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown CA",  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "unknown CA",  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: "revoked certificate",  # X509_V_ERR_CERT_REVOKED
    62: "name mismatch",  # X509_V_ERR_HOSTNAME_MISMATCH
    64: "name mismatch (IP address)",  # X509_V_ERR_IP_ADDRESS_MISMATCH
}

#: OpenSSL error reasons (``SSLError.reason``) seen on a handshake -> few words.
SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this host's certificate (unknown CA)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer refuses this host's certificate (expired certificate)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refuses this host's certificate (bad certificate)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refuses this host's certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "TLS version not supported by the peer (TLS 1.3 needed)",
    "UNSUPPORTED_PROTOCOL": "TLS version too old (TLS 1.3 needed)",
    "WRONG_VERSION_NUMBER": "not TLS (plaintext peer?)",
    "HTTP_REQUEST": "plaintext client (an HTTP request)",
    "NO_SHARED_CIPHER": "no cipher suite in common",
}


class TlsRefused(ConnectionError):
    """A TLS handshake failed or the peer is not allowed; ``reason`` in few words."""

    def __init__(self, reason: str, detail: str = "", *, plaintext_hello: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        #: the client sent a plaintext session HELLO (a sender with --insecure):
        #: the caller may answer it a plaintext REFUSE saying TLS is required
        self.plaintext_hello = plaintext_hello


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TlsSettings:
    """The TLS files and the allowed peer names of one daemon."""

    cert: str
    key: str
    ca: str
    allow_peers: tuple[str, ...] = ()


def add_arguments(parser: argparse.ArgumentParser, *, role: str) -> None:
    """The TLS flags (``--tls-cert``, ``--tls-key``, ``--tls-ca``, ``--allow-peer``)."""
    if role == "receiver":
        peer_help = (
            "a name a sender's certificate must carry (subjectAltName DNS/IP or CN; "
            "repeatable; '*.example' = one label under example, '*' = any "
            "certificate of the CA); at least one is required with TLS"
        )
    else:
        peer_help = (
            "a name the receiver's certificate must carry (repeatable; same syntax as "
            "the receiver's); default: the HOST of each HOST:PORT target"
        )
    g = parser.add_argument_group(
        "replication link security (TLS is the default; see docs/operations.md, Certificates)"
    )
    g.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="this host's certificate, PEM (the chain to the CA may follow)",
    )
    g.add_argument(
        "--tls-key",
        metavar="FILE",
        help="the certificate's private key, PEM, not readable by others",
    )
    g.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="CA certificate(s) a peer's certificate must chain to, PEM (a bundle of "
        "the old and new CA during a rotation)",
    )
    g.add_argument("--allow-peer", metavar="NAME", action="append", default=[], help=peer_help)


def settings_from_args(args: argparse.Namespace, *, role: str) -> TlsSettings | None:
    """The TLS settings, or None for plaintext (``--insecure``) or none configured.

    ConfigError when the TLS files are half given, or given with --insecure,
    or (on the receiver) TLS comes without any allow-peer. Neither TLS nor
    --insecure gives None too: see ``require_link_security``.
    """
    files = {"tls-cert": args.tls_cert, "tls-key": args.tls_key, "tls-ca": args.tls_ca}
    given = {k for k, v in files.items() if v}
    if args.insecure:
        if given:
            raise ConfigError(
                f"--insecure and {', '.join(sorted(given))} both given: choose "
                "TLS (the default) or plaintext"
            )
        return None
    if not given:
        return None  # the daemon decides (require_link_security)
    missing = sorted(set(files) - given)
    if missing:
        raise ConfigError(
            f"TLS needs tls-cert, tls-key and tls-ca together; missing {', '.join(missing)}"
        )
    peers = tuple(p.strip() for p in args.allow_peer)
    for p in peers:
        if not p or (p != "*" and "*" in p and not (p.startswith("*.") and "*" not in p[2:])):
            raise ConfigError(f"allow-peer {p!r}: a name, '*.domain' or '*'")
    if role == "receiver" and not peers:
        raise ConfigError(
            "TLS on the receiver needs at least one --allow-peer NAME (the "
            "senders' certificate names; '*' accepts any certificate of the CA)"
        )
    return TlsSettings(
        cert=os.path.abspath(args.tls_cert),
        key=os.path.abspath(args.tls_key),
        ca=os.path.abspath(args.tls_ca),
        allow_peers=peers,
    )


def require_link_security(
    settings: TlsSettings | None, insecure: bool, *, what: str = "refusing to start"
) -> None:
    """ConfigError when neither TLS nor --insecure is configured."""
    if settings is None and not insecure:
        raise ConfigError(
            "the replication link needs TLS (--tls-cert, --tls-key, --tls-ca, and on the "
            "receiver --allow-peer; or the keys tls-cert... in the config file; see "
            f"docs/operations.md, Certificates) or, for plaintext on a trusted network, "
            f"--insecure: {what}"
        )


# --------------------------------------------------------------------------- names


def peer_names(cert: dict | None) -> list[str]:
    """The names a peer certificate carries: subjectAltName DNS and IP entries, then CN."""
    if not cert:
        return []
    names: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "IP Address"):
            names.append(str(value).strip())
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value).strip())
    out: list[str] = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out


def name_allowed(names: Sequence[str], allowed: Sequence[str]) -> str | None:
    """The first of ``names`` an ``allowed`` pattern matches, or None.

    Patterns: an exact name (case-insensitive), ``*`` (anything), or
    ``*.example.org`` (exactly one label in front of ``example.org``). A
    wildcard in the certificate's own name is not expanded: a certificate for
    ``*.example.org`` matches only the pattern ``*.example.org`` itself or ``*``.
    """
    for name in names:
        n = name.lower().rstrip(".")
        for pat in allowed:
            p = pat.lower().rstrip(".")
            if p == "*" or p == n:
                return name
            if p.startswith("*.") and "*" not in n:
                head, dot, tail = n.partition(".")
                if dot and head and tail == p[2:]:
                    return name
    return None


# --------------------------------------------------------------------------- contexts


def cert_not_after(path: str) -> float:
    """When the PEM certificate at ``path`` expires (seconds since the epoch),
    read with ``openssl x509 -enddate`` as daemonkit.pki makes them; ConfigError
    if it cannot be read."""
    try:
        r = subprocess.run(
            ["openssl", "x509", "-noout", "-enddate", "-in", path],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"cannot read the expiry of {path}: {e}") from None
    key, _, value = r.stdout.strip().partition("=")
    if r.returncode != 0 or key != "notAfter":
        raise ConfigError(f"cannot read the expiry of {path}: {r.stderr.strip() or r.stdout}")
    return float(ssl.cert_time_to_seconds(value))


def _file_stamp(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_key_file(path: str) -> None:
    """ConfigError if the private key file is readable or writable by "other"."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"tls-key {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"tls-key {path} is not a regular file")
    if st.st_mode & 0o007:
        raise ConfigError(
            f"tls-key {path} is accessible by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): chmod 0600 (or 0640 with the "
            "daemon's group) it"
        )


def build_context(settings: TlsSettings, *, server: bool) -> ssl.SSLContext:
    """A fresh SSLContext for one side; ConfigError naming the file that fails."""
    check_key_file(settings.key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:
        # no session tickets: nothing resumes, and a ticket arriving after the
        # handshake would make the sender's select() wake with no data for it
        ctx.num_tickets = 0
    else:
        # names are checked by us when allow-peer is set, else by ssl against the host
        ctx.check_hostname = not settings.allow_peers
    try:
        ctx.load_cert_chain(settings.cert, settings.key)
    except FileNotFoundError as e:
        raise ConfigError(
            f"tls-cert/tls-key: {e.filename or settings.cert}: no such file"
        ) from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"cannot load tls-cert {settings.cert} with tls-key {settings.key}: "
            f"{getattr(e, 'reason', None) or e} (not PEM, or the key does not "
            "match the certificate)"
        ) from None
    try:
        ctx.load_verify_locations(cafile=settings.ca)
    except FileNotFoundError:
        raise ConfigError(f"tls-ca {settings.ca}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"cannot load tls-ca {settings.ca}: {getattr(e, 'reason', None) or e}"
        ) from None
    if not ctx.get_ca_certs():
        raise ConfigError(f"tls-ca {settings.ca} holds no CA certificate")
    return ctx


class ContextSource:
    """The current SSLContext for one side, rebuilt when a file changes."""

    def __init__(self, settings: TlsSettings, *, server: bool) -> None:
        self.settings = settings
        self.server = server
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._ctx = build_context(settings, server=server)  # ConfigError at start-up
        self.loads = 1

    def _stamps(self) -> tuple:
        s = self.settings
        return tuple(_file_stamp(p) for p in (s.cert, s.key, s.ca))

    def context(self) -> ssl.SSLContext:
        with self._lock:
            try:
                stamp = self._stamps()
                if stamp == self._stamp:
                    return self._ctx
                ctx = build_context(self.settings, server=self.server)
            except ConfigError as e:
                log.error(
                    "TLS files changed but cannot be loaded (%s); still using the "
                    "certificates loaded before",
                    e,
                )
                return self._ctx
            self._ctx, self._stamp = ctx, stamp
            self.loads += 1
            log.info(
                "TLS certificates re-read (%s, %s, %s): new connections use them",
                self.settings.cert,
                self.settings.key,
                self.settings.ca,
            )
            return ctx


# --------------------------------------------------------------------------- handshakes


def refusal_of(e: BaseException) -> TlsRefused:
    """What a failed TLS handshake means, as the TlsRefused to log and raise
    (the receiver's non-blocking handshake stage uses it too)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        reason = VERIFY_REASONS.get(e.verify_code, "certificate not accepted")
        return TlsRefused(reason, str(e.verify_message or e))
    if isinstance(e, ssl.SSLError):
        reason = SSL_REASONS.get(e.reason or "", "TLS handshake failed")
        return TlsRefused(reason, str(e.reason or e).lower().replace("_", " "))
    if isinstance(e, TimeoutError):
        return TlsRefused("handshake timeout", str(e))
    return TlsRefused("connection lost during the TLS handshake", str(e))


def _handshake(ssock: ssl.SSLSocket, deadline: float) -> None:
    """Run the handshake on a non-blocking SSLSocket until ``deadline``."""
    want: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]]
    while True:
        try:
            ssock.do_handshake()
            return
        except ssl.SSLWantReadError:
            want = ([ssock], [])
        except ssl.SSLWantWriteError:
            want = ([], [ssock])
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete TLS handshake in time")
        r, w, _ = select.select(*want, [], left)
        if not r and not w and time.monotonic() >= deadline:
            raise TimeoutError("no complete TLS handshake in time")


def _first_byte(sock: socket.socket, deadline: float) -> int | None:
    """Peek at the connection's first byte (None: closed before sending one)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TlsRefused("handshake timeout", "the client sent nothing")
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            continue
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError as e:
            raise TlsRefused("connection lost during the TLS handshake", str(e)) from None
        return data[0] if data else None


class TlsServer:
    """The receiver's side: turn an accepted TCP connection into a TlsTransport."""

    def __init__(self, settings: TlsSettings, *, plaintext_magic: bytes = b"") -> None:
        #: the first bytes a plaintext client of ours sends (remusd's HELLO
        #: magic): a refused connection that starts with them is told why
        self.plaintext_magic = plaintext_magic
        self.settings = settings
        self.source = ContextSource(settings, server=True)

    def accept(self, transport: PlainTransport, timeout: float) -> TlsTransport:
        """Handshake over ``transport``'s socket within ``timeout`` seconds, then
        check the client's names; TlsRefused (the socket is left to the caller
        to close) if anything is wrong. Reads no byte of the session."""
        deadline = time.monotonic() + timeout
        sock = transport.sock
        sock.setblocking(False)
        first = _first_byte(sock, deadline)
        if first is None:
            raise TlsRefused("closed before the TLS handshake")
        if first != TLS_HANDSHAKE_RECORD:
            hello = False
            magic = self.plaintext_magic
            with contextlib.suppress(OSError):
                head = sock.recv(len(magic), socket.MSG_PEEK) if magic else b""
                hello = bool(head) and magic.startswith(head)
            plain = " (a remusd HELLO: the sender runs with --insecure)" if hello else ""
            raise TlsRefused(
                "plaintext client",
                f"first byte 0x{first:02x} is not a TLS handshake{plain}",
                plaintext_hello=hello,
            )
        ctx = self.source.context()
        try:
            ssock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as e:
            raise refusal_of(e) from None
        transport.sock = ssock  # the caller's close() now closes the TLS socket
        try:
            _handshake(ssock, deadline)
        except (ssl.SSLError, OSError) as e:
            raise refusal_of(e) from None
        names = peer_names(ssock.getpeercert())
        if not names:
            raise TlsRefused("name not allowed", "the certificate carries no name")
        if name_allowed(names, self.settings.allow_peers) is None:
            raise TlsRefused(
                "name not allowed",
                f"certificate names {', '.join(names)}; "
                f"allowed: {', '.join(self.settings.allow_peers)}",
            )
        ssock.setblocking(True)
        return TlsTransport(ssock, names)


class TlsClient:
    """The sender's side: connect to HOST:PORT over TLS and check the receiver."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.source = ContextSource(settings, server=False)

    def connect(self, host: str, port: int, timeout: float) -> TlsTransport:
        """A TlsTransport to the receiver; TlsRefused (a ConnectionError) with
        the reason when the receiver's certificate is not acceptable, OSError
        when it cannot be reached."""
        deadline = time.monotonic() + timeout
        sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        try:
            ctx = self.source.context()
            ssock = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
            sock = ssock  # wrap_socket detached the plain socket: close this one on error
            ssock.setblocking(False)
            try:
                _handshake(ssock, deadline)
            except (ssl.SSLError, OSError) as e:
                r = refusal_of(e)
                raise TlsRefused(f"TLS with {host}:{port}: {r.reason}", r.detail) from None
            names = peer_names(ssock.getpeercert())
            allowed = self.settings.allow_peers
            if allowed and name_allowed(names, allowed) is None:
                raise TlsRefused(
                    f"TLS with {host}:{port}: name not allowed",
                    f"the receiver's certificate names {', '.join(names) or '-'}; "
                    f"allowed: {', '.join(allowed)}",
                )
            ssock.setblocking(True)
            ssock.settimeout(timeout)
            return TlsTransport(ssock, names)
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise


def plaintext_connect(host: str, port: int, timeout: float) -> PlainTransport:
    """The sender's plaintext connection (``--insecure``), with its warning."""
    log.warning(
        "connecting to %s:%d over plaintext TCP (--insecure): anyone on the path can "
        "read or forge this guest's memory",
        host,
        port,
    )
    return PlainTransport.connect(host, port, timeout=timeout)
