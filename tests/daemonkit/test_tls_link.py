"""TLS on the replication link, against a real remus-receiver process.

A hand-written sender (daemonkit.tls.TlsClient + xenbind.session + the stream
encoder, not remusd) connects with throwaway certificates (tests/tls_certs.py):
the good pair commits checkpoints; an unknown CA, an expired certificate, a
name the receiver does not allow, no certificate at all and a plaintext client
are each refused before one session byte is read: no backup domain is created,
the log names the reason, and the receiver serves a good session afterwards.
Also: a TLS client against an --insecure receiver, a client that never
handshakes (the accept loop is not blocked), certificate rotation without a
restart, and the start-up refusals of the configuration.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from daemonkit.tls import (
    ContextSource,
    TlsClient,
    TlsRefused,
    TlsSettings,
    cert_not_after,
    name_allowed,
    peer_names,
    settings_from_args,
)
from daemonkit.transport import PlainTransport, Transport
from tests.receiver.test_daemon_process import Guest, Receiver
from tests.simhost import SimHost, host_pair
from tests.tls_certs import Pki
from xenbind import PAGE_SIZE
from xenbind.errors import ConfigError
from xenbind.session import Accepted, Ack, Hello, Options, Refused, SenderSession, new_session_id
from xenbind.stream import StreamWriter

pytestmark = pytest.mark.timeout(120)

REPO = str(Path(__file__).resolve().parents[2])
RECEIVER = os.path.join(os.path.dirname(sys.executable), "remus-receiver")
PAGES = 256  # 1 MiB guests
#: the receiver's timeouts these tests were written for (tests.receiver.test_daemon_process's are shorter)
TLS_TIMEOUTS = ("--handshake-timeout", "2", "--stall-timeout", "30")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = Pki(d / "ca", "remus-ca")
    evil = Pki(d / "evil", "evil-ca")
    return {
        "ca": ca,
        "backup": ca.leaf("backup.test"),
        "primary": ca.leaf("primary.test"),
        "expired": ca.leaf("primary.test", expired=True, filename="expired"),
        "evil": evil.leaf("primary.test", filename="evil-primary"),
        "intruder": ca.leaf("intruder.test"),
    }


@pytest.fixture(scope="module")
def hosts():
    with host_pair("tls") as pair:
        yield pair


@pytest.fixture(scope="module")
def receiver(pki, hosts, tmp_path_factory):
    _, backup = hosts
    b = pki["backup"]
    r = Receiver(
        backup.dir,
        str(tmp_path_factory.mktemp("rx")),
        *TLS_TIMEOUTS,
        "--tls-cert",
        b.cert,
        "--tls-key",
        b.key,
        "--tls-ca",
        pki["ca"].ca,
        "--allow-peer",
        "primary.test",
        insecure=False,
    )
    yield r
    assert r.stop() == 0, r.log()[-3000:]
    assert "Traceback" not in r.log(), r.log()


def backup_names(backup: SimHost) -> set[str]:
    for _ in range(10):
        try:
            return {i.name for i in backup.hv.list()}
        except Exception:  # a domain vanished while listed: list again
            time.sleep(0.02)
    return {i.name for i in backup.hv.list()}


# --------------------------------------------------------------------------- a TLS sender


def client(pki, leaf: str = "primary", allow: tuple[str, ...] = ()) -> TlsClient:
    cert = pki[leaf]
    return TlsClient(TlsSettings(cert.cert, cert.key, pki["ca"].ca, allow))


class Session:
    """One session of the hand-written sender over any Transport."""

    def __init__(self, t: Transport, guest: Guest) -> None:
        self.t = t
        self.guest = guest
        self.hello = Hello(
            session_id=new_session_id(),
            options=Options(codec="seed", interval_ms=50, heartbeat_ms=50),
            domain=guest.config,
            generation=time.time_ns(),
            software="test-tls-sender",
        )
        self.ss = SenderSession(self.hello)
        self.writer = StreamWriter(guest.pages, codec="seed")
        self.events: list = []

    def next_event(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            while self.events:
                ev = self.events.pop(0)
                if type(ev).__name__ != "Heartbeat":
                    return ev
            left = deadline - time.monotonic()
            assert left > 0, "no event from the receiver in time"
            self.t.settimeout(left)
            data = self.t.recv(65536)
            if not data:
                return None
            self.events += self.ss.feed(data)

    def handshake(self):
        self.t.sendall(self.ss.hello())
        return self.next_event()

    def run(self, checkpoints: int) -> None:
        g = self.guest
        self.t.send_buffers(
            [
                self.writer.header(),
                *self.writer.pages(np.arange(g.pages, dtype=np.uint64), g.memory),
                *self.writer.end_checkpoint(g.context),
            ]
        )
        ev = self.next_event()
        assert isinstance(ev, Ack) and ev.index == 0, ev
        for i in range(1, checkpoints + 1):
            pfns, data = g.dirty(30)
            self.t.send_buffers(
                [
                    *self.writer.pages(pfns, data),
                    *self.writer.end_checkpoint(g.context, last=i == checkpoints),
                ]
            )
            ev = self.next_event()
            assert isinstance(ev, Ack) and ev.index == i, ev


def good_session(receiver: Receiver, pki, hosts, checkpoints: int = 2) -> Guest:
    """A good pair end to end: handshake, initial copy, checkpoints, clean end."""
    primary, backup = hosts
    g = Guest(primary, PAGES)
    t = client(pki).connect("127.0.0.1", receiver.port, 10)
    assert t.kind == "tls" and t.version == "TLSv1.3"
    assert "backup.test" in t.peer_names
    try:
        s = Session(t, g)
        assert isinstance(s.handshake(), Accepted)
        s.run(checkpoints)
    finally:
        t.close()
    receiver.wait_log(rf"{g.name} .*protection ended cleanly after checkpoint {checkpoints}")
    return g


# --------------------------------------------------------------------------- tests


def test_good_pair_commits_checkpoints(receiver, pki, hosts):
    _, backup = hosts
    primary, _ = hosts
    g = Guest(primary, PAGES)
    t = client(pki).connect("127.0.0.1", receiver.port, 10)
    s = Session(t, g)
    assert isinstance(s.handshake(), Accepted)
    s.t.send_buffers(
        [
            s.writer.header(),
            *s.writer.pages(np.arange(g.pages, dtype=np.uint64), g.memory),
            *s.writer.end_checkpoint(g.context),
        ]
    )
    assert s.next_event().index == 0
    for i in (1, 2, 3):
        pfns, data = g.dirty(40)
        s.t.send_buffers([*s.writer.pages(pfns, data), *s.writer.end_checkpoint(g.context)])
        assert s.next_event().index == i
    # committed, byte for byte, into the paused backup
    dom = backup.lookup(g.name)
    img = np.empty((PAGES, PAGE_SIZE), dtype=np.uint8)
    dom.gather(np.arange(PAGES, dtype=np.uint64), img)
    dom.close()
    assert np.array_equal(img, g.memory)
    st = [x for x in receiver.status()["sessions"] if x["domain"] == g.name][0]
    assert st["last_committed"] == 3
    t.close()
    receiver.wait_log(rf"{g.name} .*session \w+ over TLSv1\.3 .*peer primary\.test")
    assert "plaintext" not in receiver.log()


def _refused_case(receiver, pki, hosts, connect, reason: str) -> None:
    """``connect(guest)`` must fail; the receiver logs ``reason``, creates no
    backup, counts the refusal, and serves a good session afterwards."""
    primary, backup = hosts
    before = receiver.status()["tls"]["refused"]
    g = Guest(primary, PAGES)
    connect(g)
    receiver.wait_log(r"refused before the session handshake: " + re.escape(reason))
    assert receiver.status()["tls"]["refused"] == before + 1
    assert g.name not in backup_names(backup)
    assert g.name not in receiver.log()  # no byte of its session was read
    good = good_session(receiver, pki, hosts, checkpoints=1)
    assert good.name in receiver.log()


def _tls_attempt(pki, receiver, leaf: str):
    def attempt(g: Guest) -> None:
        # TLS 1.3: the client's handshake may finish before the server checked
        # its certificate; then the refusal shows on the first read
        try:
            t = client(pki, leaf).connect("127.0.0.1", receiver.port, 10)
        except TlsRefused:
            return
        try:
            s = Session(t, g)
            with pytest.raises(OSError):
                ev = s.handshake()
                assert ev is None  # closed: raise below
                raise ConnectionError("closed")
        finally:
            t.close()

    return attempt


@pytest.mark.parametrize(
    "leaf,reason",
    [("evil", "unknown CA"), ("expired", "expired certificate"), ("intruder", "name not allowed")],
)
def test_bad_certificates_are_refused(receiver, pki, hosts, leaf, reason):
    _refused_case(receiver, pki, hosts, _tls_attempt(pki, receiver, leaf), reason)


def test_client_without_certificate_is_refused(receiver, pki, hosts):
    def attempt(g: Guest) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki["ca"].ca)
        ctx.check_hostname = False
        raw = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
        with ctx.wrap_socket(raw) as s:
            s.sendall(SenderSession(Session(PlainTransport(raw), g).hello).hello())
            with pytest.raises((ssl.SSLError, ConnectionError)):
                if not s.recv(100):
                    raise ConnectionError("closed")

    _refused_case(receiver, pki, hosts, attempt, "no certificate")


def test_plaintext_client_is_refused_with_a_reason(receiver, pki, hosts):
    got = {}

    def attempt(g: Guest) -> None:
        t = PlainTransport.connect("127.0.0.1", receiver.port, timeout=10)
        try:
            got["reply"] = Session(t, g).handshake()
        finally:
            t.close()

    _refused_case(receiver, pki, hosts, attempt, "plaintext client")
    # the plaintext remusd is told why, in its own protocol
    reply = got["reply"]
    assert isinstance(reply, Refused) and "requires TLS" in reply.refuse.reason
    assert "sender runs with --insecure" in receiver.log()


def test_sender_checks_the_receivers_name(receiver, pki):
    # the receiver's certificate names backup.test and 127.0.0.1
    with pytest.raises(TlsRefused, match="name not allowed"):
        client(pki, allow=("other.test",)).connect("127.0.0.1", receiver.port, 10)
    with pytest.raises(TlsRefused, match="name mismatch"):
        client(pki).connect("localhost", receiver.port, 10)  # host name not in the cert
    client(pki, allow=("backup.test",)).connect("127.0.0.1", receiver.port, 10).close()


@pytest.mark.parametrize("case", ["other CA", "expired"])
def test_sender_refuses_a_bad_receiver_certificate(pki, hosts, tmp_path, case):
    _, backup = hosts
    if case == "other CA":
        rogue = Pki(tmp_path / "evil2", "evil2").leaf("backup.test")
        want, seen = "unknown CA", "the peer does not trust this host's certificate"
    else:
        rogue = pki["ca"].leaf("backup.test", expired=True, filename="backup-expired")
        want, seen = (
            "expired certificate",
            r"the peer refuses this host's certificate "
            r"\(expired certificate\)",
        )
    r = Receiver(
        backup.dir,
        str(tmp_path / "rogue"),
        *TLS_TIMEOUTS,
        "--tls-cert",
        rogue.cert,
        "--tls-key",
        rogue.key,
        "--tls-ca",
        pki["ca"].ca,
        "--allow-peer",
        "*",
        insecure=False,
    )
    try:
        with pytest.raises(TlsRefused, match=want):
            client(pki).connect("127.0.0.1", r.port, 10)
        # the receiver sees the primary refuse its certificate
        r.wait_log(r"refused before the session handshake: " + seen)
    finally:
        assert r.stop() == 0


def test_slow_client_does_not_block_accept(receiver, pki, hosts):
    idle = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
    trickle = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
    try:
        trickle.sendall(b"\x16\x03")  # the start of a TLS record, then nothing
        t0 = time.monotonic()
        good_session(receiver, pki, hosts, checkpoints=1)
        assert time.monotonic() - t0 < 2.0  # not behind the 2 s handshake timeout
        receiver.wait_log(r"refused before the session handshake: handshake timeout", 6)
    finally:
        idle.close()
        trickle.close()


def test_tls_client_against_insecure_receiver_fails_cleanly(pki, hosts, tmp_path):
    _, backup = hosts
    r = Receiver(backup.dir, str(tmp_path / "plain"), *TLS_TIMEOUTS)
    try:
        with pytest.raises(TlsRefused, match="not TLS"):
            client(pki).connect("127.0.0.1", r.port, 10)
        r.wait_log(r"refused: .*not a Remus session")
        assert r.status()["tls"] is None and r.status()["insecure"] is True
    finally:
        assert r.stop() == 0
    assert "Traceback" not in r.log()


def test_rotation_without_restart(pki, hosts, tmp_path):
    """New CA overlap: the receiver's CA file becomes old+new bundle (re-read
    at the next connection); a sender with a new-CA certificate gets in."""
    _, backup = hosts
    old = pki["ca"]
    new = Pki(tmp_path / "new", "remus-ca-2")
    b = pki["backup"]
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(Path(old.ca).read_bytes())
    r = Receiver(
        backup.dir,
        str(tmp_path / "rot"),
        *TLS_TIMEOUTS,
        "--tls-cert",
        b.cert,
        "--tls-key",
        b.key,
        "--tls-ca",
        str(bundle),
        "--allow-peer",
        "primary.test",
        insecure=False,
    )
    try:
        fresh = new.leaf("primary.test", filename="primary-new")
        fresh_client = TlsClient(TlsSettings(fresh.cert, fresh.key, old.ca))
        with pytest.raises(OSError):
            t = fresh_client.connect("127.0.0.1", r.port, 10)
            t.settimeout(5)
            t.sendall(b"x")
            if not t.recv(10):
                raise ConnectionError("closed")
        r.wait_log(r"refused before the session handshake: unknown CA")
        # step 1: trust both CAs (write a new file and rename it over: atomic)
        tmp = tmp_path / "bundle.tmp"
        tmp.write_bytes(Path(old.ca).read_bytes() + Path(new.ca).read_bytes())
        os.replace(tmp, bundle)
        t = fresh_client.connect("127.0.0.1", r.port, 10)
        t.close()
        r.wait_log(r"TLS certificates re-read")
        assert r.status()["tls"]["loads"] == 2
        # the old certificate still works during the overlap
        client(pki).connect("127.0.0.1", r.port, 10).close()
    finally:
        assert r.stop() == 0


def test_context_keeps_the_old_certificates_when_new_ones_do_not_load(pki, tmp_path):
    leaf = pki["primary"]
    cert = tmp_path / "c.crt"
    key = tmp_path / "c.key"
    cert.write_bytes(Path(leaf.cert).read_bytes())
    key.write_bytes(Path(leaf.key).read_bytes())
    key.chmod(0o600)
    src = ContextSource(TlsSettings(str(cert), str(key), pki["ca"].ca), server=False)
    ctx = src.context()
    assert src.context() is ctx and src.loads == 1  # unchanged files: same context
    other = pki["intruder"]
    cert.write_bytes(Path(other.cert).read_bytes())  # cert changed, key not yet: mismatch
    assert src.context() is ctx and src.loads == 1
    key.write_bytes(Path(other.key).read_bytes())
    ctx2 = src.context()
    assert ctx2 is not ctx and src.loads == 2


# --------------------------------------------------------------------------- units


def test_name_patterns():
    assert name_allowed(["primary.test"], ["PRIMARY.test"]) == "primary.test"
    assert name_allowed(["a.example.org"], ["*.example.org"]) == "a.example.org"
    assert name_allowed(["a.b.example.org"], ["*.example.org"]) is None
    assert name_allowed(["example.org"], ["*.example.org"]) is None
    assert name_allowed(["x", "y"], ["*"]) == "x"
    assert name_allowed(["*.example.org"], ["a.example.org"]) is None
    assert name_allowed([], ["*"]) is None
    cert = {
        "subject": ((("commonName", "cn.test"),),),
        "subjectAltName": (("DNS", "san.test"), ("IP Address", "10.0.0.1"), ("email", "x@y")),
    }
    assert peer_names(cert) == ["san.test", "10.0.0.1", "cn.test"]


def _args(**kw):
    import argparse

    base = {"tls_cert": None, "tls_key": None, "tls_ca": None, "allow_peer": [], "insecure": False}
    base.update(kw)
    return argparse.Namespace(**base)


def test_settings_rules(pki):
    p = pki["primary"]
    full = {"tls_cert": p.cert, "tls_key": p.key, "tls_ca": pki["ca"].ca}
    assert settings_from_args(_args(), role="receiver") is None
    assert settings_from_args(_args(insecure=True), role="receiver") is None
    with pytest.raises(ConfigError, match="missing tls-ca"):
        settings_from_args(_args(tls_cert=p.cert, tls_key=p.key), role="sender")
    with pytest.raises(ConfigError, match="choose"):
        settings_from_args(_args(insecure=True, **full), role="sender")
    with pytest.raises(ConfigError, match="allow-peer"):
        settings_from_args(_args(**full), role="receiver")
    with pytest.raises(ConfigError, match="allow-peer"):
        settings_from_args(_args(allow_peer=["a*b"], **full), role="receiver")
    s = settings_from_args(_args(allow_peer=["primary.test"], **full), role="receiver")
    assert s.allow_peers == ("primary.test",)
    assert settings_from_args(_args(**full), role="sender").allow_peers == ()


def _run_receiver(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            RECEIVER,
            "--listen",
            "127.0.0.1:0",
            "--config",
            "/dev/null",
            "--control",
            str(tmp_path / "c.sock"),
            "--sim-dir",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=dict(os.environ, JOURNAL_STREAM=""),
    )


def test_receiver_start_up_refusals(pki, tmp_path):
    p = pki["backup"]
    ca = pki["ca"].ca
    r = _run_receiver(tmp_path)
    assert r.returncode == 2 and "TLS" in r.stderr and "--insecure" in r.stderr
    r = _run_receiver(tmp_path, "--tls-cert", p.cert, "--tls-key", p.key)
    assert r.returncode == 2 and "missing tls-ca" in r.stderr
    r = _run_receiver(tmp_path, "--tls-cert", p.cert, "--tls-key", p.key, "--tls-ca", ca)
    assert r.returncode == 2 and "allow-peer" in r.stderr
    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(p.key).read_bytes())
    loose.chmod(0o644)
    r = _run_receiver(
        tmp_path, "--tls-cert", p.cert, "--tls-key", str(loose), "--tls-ca", ca, "--allow-peer", "x"
    )
    assert r.returncode == 2 and "accessible by other users" in r.stderr
    r = _run_receiver(
        tmp_path,
        "--tls-cert",
        p.cert,
        "--tls-key",
        pki["primary"].key,
        "--tls-ca",
        ca,
        "--allow-peer",
        "x",
    )
    assert r.returncode == 2 and "does not match" in r.stderr
    r = _run_receiver(
        tmp_path, "--tls-cert", p.cert, "--tls-key", p.key, "--tls-ca", p.key, "--allow-peer", "x"
    )
    assert r.returncode == 2 and "tls-ca" in r.stderr
    assert "Traceback" not in r.stderr


def test_remusd_start_up_refusals(pki, tmp_path):
    remusd = os.path.join(os.path.dirname(sys.executable), "remusd")
    base = [
        remusd,
        "--config",
        "/dev/null",
        "--control",
        str(tmp_path / "d.sock"),
        "--sim-dir",
        str(tmp_path),
    ]
    r = subprocess.run(
        [*base, "--protect", "x=127.0.0.1:9"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "TLS" in r.stderr and "--insecure" in r.stderr
    p = pki["primary"]
    r = subprocess.run(
        [*base, "--tls-cert", p.cert, "--tls-key", p.key, "--tls-ca", str(tmp_path / "absent.crt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "absent.crt" in r.stderr


def test_openssl_pki_makes_certificates_that_work(tmp_path):
    """daemonkit.pki (the demo's CA, the docs' openssl commands): a CA and two
    host certificates that complete a mutually authenticated handshake."""
    import threading

    from daemonkit import pki as openssl_pki
    from daemonkit.tls import TlsServer

    ca = openssl_pki.make_ca(tmp_path, "ca")
    a = openssl_pki.make_host_cert(tmp_path, ca, "a.test", ["127.0.0.1"])
    b = openssl_pki.make_host_cert(tmp_path, ca, "b.test")
    for f in (ca.key, a.key, b.key):
        assert os.stat(f).st_mode & 0o777 == 0o600
    assert os.stat(a.cert).st_mode & 0o777 == 0o644
    with pytest.raises(ConfigError, match="not a host name"):
        openssl_pki.make_host_cert(tmp_path, ca, "bad name; rm -rf /")
    server = TlsServer(TlsSettings(a.cert, a.key, ca.cert, ("b.test",)))
    ls = socket.create_server(("127.0.0.1", 0))
    got: dict = {}

    def serve() -> None:
        s, _ = ls.accept()
        t = server.accept(PlainTransport(s), 10)
        got["names"] = t.peer_names
        got["not_after"] = t.peer_not_after
        t.settimeout(10)
        data = b""
        while len(data) < 100_000:
            chunk = t.recv(65536)
            if not chunk:
                break
            data += chunk
        t.sendall(data[-10:])
        t.close()

    th = threading.Thread(target=serve)
    th.start()
    try:
        t = TlsClient(TlsSettings(b.cert, b.key, ca.cert)).connect(
            "127.0.0.1", ls.getsockname()[1], 10
        )
        # many small buffers and a big one, coalesced into few records, in order
        bufs = [bytes([i]) * 10 for i in range(100)] + [np.arange(99_000 // 8, dtype=np.uint64)]
        n = t.send_buffers(bufs)
        assert n == 1000 + 99_000
        # each side knows when the other's certificate expires (status shows it)
        assert t.peer_not_after == pytest.approx(cert_not_after(a.cert), abs=1)
        assert t.wait_readable(10)
        assert t.recv(100) == np.arange(99_000 // 8, dtype=np.uint64).tobytes()[-10:]
        t.close()
    finally:
        th.join(10)
        ls.close()
    assert got["names"][:1] == ["b.test"]
    assert got["not_after"] == pytest.approx(cert_not_after(b.cert), abs=1)
    assert cert_not_after(b.cert) > time.time() + 300 * 86400  # make_host_cert: years ahead
    with pytest.raises(ConfigError, match="cannot read the expiry"):
        cert_not_after(b.key)
