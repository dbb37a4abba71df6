"""TlsTransport.recv_into over a real TLS 1.3 pair on loopback.

A TLS read returns one record (<= 16 KiB) a call; ``recv_into`` then takes
the records already received without waiting, up to the buffer, as a TCP
socket's recv does. Checked here: one call returns several records when they
are there, never waits for more than the first, keeps the bytes exact and in
order, restores the socket's timeout, and reports the end of the stream after
the last bytes. And one thread writing while another reads, at both ends (a
heartbeat during a read): OpenSSL allows one thread in a connection at a
time; unserialized, a read came back with a false end of stream within
milliseconds.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from daemonkit.tls import TlsSettings, build_context
from daemonkit.transport import TlsTransport
from tests.tls_certs import Pki

RECORD = 16384  # the largest TLS plaintext record


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    ca = Pki(tmp_path_factory.mktemp("pki"), "transport-ca")
    srv, cli = ca.leaf("backup.test"), ca.leaf("primary.test")
    server = build_context(TlsSettings(srv.cert, srv.key, ca.ca, ("primary.test",)), server=True)
    client = build_context(TlsSettings(cli.cert, cli.key, ca.ca, ("backup.test",)), server=False)
    return server, client


def _connect(contexts) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(server side, client side) of a TLS connection on loopback, handshake done."""
    server_ctx, client_ctx = contexts
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    out: dict = {}

    def accept() -> None:
        raw, _ = lsock.accept()
        out["server"] = server_ctx.wrap_socket(raw, server_side=True)

    th = threading.Thread(target=accept)
    th.start()
    raw = socket.create_connection(("127.0.0.1", port))
    sender = client_ctx.wrap_socket(raw, server_hostname="backup.test")
    th.join(10)
    lsock.close()
    return out["server"], sender


@pytest.fixture
def pair(contexts) -> Iterator[tuple[TlsTransport, socket.socket]]:
    """(the receiving TlsTransport, the sending SSLSocket), handshake done."""
    server, sender = _connect(contexts)
    rx = TlsTransport(server, ["primary.test"])
    try:
        yield rx, sender
    finally:
        rx.close()
        sender.close()


def pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


def send_soon(sender: socket.socket, data: bytes) -> threading.Thread:
    th = threading.Thread(target=sender.sendall, args=(data,), daemon=True)
    th.start()
    return th


def test_one_call_takes_the_records_already_here(pair):
    rx, sender = pair
    data = pattern(RECORD * 40 + 5)
    th = send_soon(sender, data)
    time.sleep(0.3)  # the kernel holds as much as its buffers take
    rx.settimeout(5.0)
    buf = bytearray(len(data) + 100)
    view = memoryview(buf)
    first = rx.recv_into(view)
    assert first > 4 * RECORD, first  # several records in one call, not one
    got = first
    while got < len(data):
        n = rx.recv_into(view[got:])
        assert n > 0
        got += n
    th.join(5)
    assert got == len(data) and bytes(buf[:got]) == data
    assert rx.sock.gettimeout() == 5.0  # restored after the reads without waiting


def test_never_waits_past_the_records_that_came(pair):
    rx, sender = pair
    data = pattern(RECORD + 3616)  # a full record and a short one, then nothing
    sender.sendall(data)
    time.sleep(0.2)
    rx.settimeout(5.0)
    buf = bytearray(1 << 20)
    t0 = time.monotonic()
    n = rx.recv_into(buf)
    assert time.monotonic() - t0 < 1.0  # not the 5 s timeout
    assert n == len(data) and bytes(buf[:n]) == data
    rx.settimeout(0.2)
    with pytest.raises(TimeoutError):  # nothing more: the first read waits as before
        rx.recv_into(buf)


def test_end_of_stream_comes_after_the_last_bytes(pair):
    rx, sender = pair
    data = pattern(3 * RECORD)
    sender.sendall(data)
    sender.close()
    time.sleep(0.2)
    rx.settimeout(5.0)
    buf = bytearray(1 << 20)
    got = 0
    while True:
        n = rx.recv_into(memoryview(buf)[got:])
        if not n:
            break
        got += n
    assert bytes(buf[:got]) == data


def test_a_write_during_a_read_at_both_ends(contexts):
    server, client = _connect(contexts)
    ends = {"A": TlsTransport(client, ["backup.test"]), "B": TlsTransport(server, ["primary.test"])}
    stop = threading.Event()
    errors: list[str] = []
    got = {"A": 0, "B": 0}

    def write(me: str) -> None:
        frame = me.encode() * (60 if me == "A" else 40)
        try:
            while not stop.is_set():
                ends[me].send_buffers([frame])
        except OSError as e:
            errors.append(f"{me} write: {e!r}")

    def read(me: str, other: str) -> None:
        t = ends[me]
        try:
            while not stop.is_set():
                try:
                    data = t.recv(65536)  # blocks in the read while the other thread writes
                except TimeoutError:
                    continue
                if not data:
                    errors.append(f"{me} read: end of stream, the peer never closed")
                    return
                if data.strip(other.encode()):
                    errors.append(f"{me} read: bytes that {other} never sent")
                    return
                got[me] += len(data)
        except OSError as e:
            if not stop.is_set():
                errors.append(f"{me} read: {e!r}")

    for t in ends.values():
        t.settimeout(0.5)
    threads = [
        threading.Thread(target=write, args=("A",)),
        threading.Thread(target=write, args=("B",)),
        threading.Thread(target=read, args=("A", "B")),
        threading.Thread(target=read, args=("B", "A")),
    ]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    stop.set()
    for th in threads:
        th.join(10)
    for t in ends.values():
        t.close()
    assert not errors, errors
    assert got["A"] > 100_000 and got["B"] > 100_000, got
