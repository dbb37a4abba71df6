"""remus-receiver's caps come from its configuration, and an ended session
frees what its decoder held (issues 4 and 6).

* A HELLO asking for more than the receiver's caps (a codec cache above
  --max-cache-pages, a sender buffer whose COMPRESSED_DATA chunks could
  exceed --max-compressed-mb) is refused `limit` at the handshake, before a
  backup domain exists; codec none asks for neither and is not held to them.
* The tail caps (--max-context-mb, --max-device-model-mb) reach the Decoder:
  a length one byte over the configured cap (far below the Decoder's built-in
  default) is a protocol violation at its length field.
* A session that ended (here: the link closed between checkpoints, the case
  where the Decoder frees nothing itself) leaves its Connection without a
  decoder or staging area, and the Decompressor's page cache is freed at once,
  even though the test still holds the Connection.

The receiver runs as a process (the caps) and in-process (the Connection
object), each on a real simulated host.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import weakref

import pytest

from receiver.config import load_config
from receiver.daemon import ReceiverDaemon
from receiver.server import Listener
from tests.receiver.test_daemon_process import Guest, Receiver, Sender, backup_state, wait_for
from tests.simhost import host_pair
from xenbind.compress.formats import MAX_ENCODED_PAGE
from xenbind.session import Accepted, Error, Refused, SenderSession
from xenbind.stream import StreamWriter
from xenbind.stream.format import DEVICE_MODEL_SIGNATURE

pytestmark = pytest.mark.timeout(120)

CACHE_CAP = 1024  # --max-cache-pages
COMPRESSED_MB = 1  # --max-compressed-mb
TAIL_MB = 1  # --max-context-mb and --max-device-model-mb


@pytest.fixture(scope="module")
def hosts():
    with host_pair("rxlim") as pair:
        yield pair


@pytest.fixture(scope="module")
def rx(hosts, tmp_path_factory):
    _, backup = hosts
    r = Receiver(
        backup.dir,
        str(tmp_path_factory.mktemp("rxlim")),
        "--max-cache-pages",
        str(CACHE_CAP),
        "--max-compressed-mb",
        str(COMPRESSED_MB),
        "--max-context-mb",
        str(TAIL_MB),
        "--max-device-model-mb",
        str(TAIL_MB),
    )
    yield r
    assert r.stop() == 0, r.log()[-3000:]
    assert "Traceback" not in r.log(), r.log()[-3000:]


def _sender(
    port: int, guest: Guest, *, codec: str, cache_pages: int = 64, buffer_pages: int = 64
) -> Sender:
    s = Sender(port, guest, codec=codec, verify=False)
    s.hello = dataclasses.replace(
        s.hello,
        options=dataclasses.replace(
            s.hello.options, cache_pages=cache_pages, buffer_pages=buffer_pages
        ),
    )
    s.ss = SenderSession(s.hello)
    s.writer = StreamWriter(
        guest.pages, codec=codec, cache_pages=cache_pages, buffer_pages=buffer_pages
    )
    return s


def _refused(s: Sender) -> str:
    reply = s.handshake()
    s.close()
    assert isinstance(reply, Refused), reply
    assert reply.refuse.code == "limit", reply
    return reply.refuse.reason


def test_hello_above_the_codec_caps_is_refused_at_the_handshake(rx, hosts):
    primary, backup = hosts
    g = Guest(primary)
    # a cache one page above the cap
    reason = _refused(_sender(rx.port, g, codec="seed", cache_pages=CACHE_CAP + 1))
    assert f"cache of {CACHE_CAP + 1} pages" in reason
    assert f"max-cache-pages {CACHE_CAP}" in reason
    # a sender buffer one page above what max-compressed-mb allows, per codec
    for codec in ("seed", "xen"):
        most = (COMPRESSED_MB << 20) // MAX_ENCODED_PAGE[codec]
        reason = _refused(_sender(rx.port, g, codec=codec, buffer_pages=most + 1))
        assert f"sender buffer of {most + 1} pages" in reason
        assert f"max-compressed-mb {COMPRESSED_MB} (buffer-pages {most} at most)" in reason
    rx.wait_log(rf"refused session \w+ for domain {g.name} .*max-cache-pages")
    # no backup domain was ever created for them
    assert backup_state(backup, g.name) is None
    assert all(s["domain"] != g.name for s in rx.status()["sessions"])


@pytest.mark.parametrize("codec", ["xen", "none"])
def test_hello_at_the_caps_is_served(rx, hosts, codec):
    """The largest cache and buffer the caps allow work end to end; codec none
    sends no COMPRESSED_DATA and no cache, so its (ignored) options are not
    held to the caps."""
    primary, backup = hosts
    g = Guest(primary)
    most = (COMPRESSED_MB << 20) // MAX_ENCODED_PAGE["xen"]
    if codec == "none":
        s = _sender(rx.port, g, codec="none", cache_pages=CACHE_CAP * 4, buffer_pages=most * 4)
    else:
        s = _sender(rx.port, g, codec="xen", cache_pages=CACHE_CAP, buffer_pages=most)
    reply = s.handshake()
    assert isinstance(reply, Accepted), reply
    limits = reply.accept.limits
    assert limits["max_cache_pages"] == CACHE_CAP
    assert limits["max_compressed"] == COMPRESSED_MB << 20
    assert limits["max_context"] == limits["max_device_model"] == TAIL_MB << 20
    s.initial_copy()
    s.wait_ack(0)
    s.checkpoint(200)  # Format B: a COMPRESSED_DATA chunk of up to 200 pages
    s.wait_ack(1)
    s.checkpoint(1, last=True)
    s.wait_ack(2)
    s.close()
    rx.wait_log(rf"{g.name} .*protection ended cleanly after checkpoint 2")
    assert backup_state(backup, g.name) is None


def _tail_claim(pages: int, ctx_len: int, dm_len: int | None) -> bytes:
    """A header, an empty Format A body, and a tail claiming an HVM context
    of ``ctx_len`` bytes (or, with ``dm_len``, an empty context and a
    device-model record of ``dm_len`` bytes)."""
    out = struct.pack("<Q", pages) + struct.pack("<i", 0) + struct.pack("<QQQ", 1, 2, 3)
    if dm_len is None:
        return out + struct.pack("<I", ctx_len)
    return out + struct.pack("<I", 0) + DEVICE_MODEL_SIGNATURE + struct.pack("<I", dm_len)


@pytest.mark.parametrize("record", ["HVM context", "device-model record"])
def test_tail_caps_come_from_the_configuration(rx, hosts, record):
    primary, backup = hosts
    g = Guest(primary)
    s = _sender(rx.port, g, codec="seed")
    assert isinstance(s.handshake(), Accepted)
    over = (TAIL_MB << 20) + 1  # the Decoder's defaults are 16 and 64 MiB
    claim = (
        _tail_claim(g.pages, over, None)
        if record == "HVM context"
        else _tail_claim(g.pages, 0, over)
    )
    s.send(claim)
    # with the built-in default the receiver would wait for the record's bytes
    # and see EOF (link-lost); the configured cap refuses the length itself
    s.sock.shutdown(socket.SHUT_WR)
    ev = s.next_event(timeout=10)
    s.close()
    assert isinstance(ev, Error) and ev.code_name == "protocol", ev
    assert f"{record} of {over} bytes exceeds the cap of {TAIL_MB << 20}" in ev.reason
    wait_for(lambda: backup_state(backup, g.name) is None, 5, "backup destroyed")


def test_config_file_keys_for_the_caps(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        'listen = "127.0.0.1:7000"\nmax-context-mb = 2\nmax_device_model_mb = 3\n'
        "max-cache-pages = 4096\n"
    )
    cfg = load_config(["--config", str(path)])
    assert (cfg.max_context, cfg.max_device_model, cfg.max_cache_pages) == (2 << 20, 3 << 20, 4096)
    default = load_config(["--config", os.devnull, "--listen", "127.0.0.1:7000"])
    assert (default.max_context, default.max_device_model, default.max_cache_pages) == (
        16 << 20,
        64 << 20,
        1 << 18,
    )
    path.write_text('listen = "127.0.0.1:7000"\nmax-cache-pages = 262145\n')
    from xenbind.errors import ConfigError

    with pytest.raises(ConfigError, match="max-cache-pages.*outside 1..262144"):
        load_config(["--config", str(path)])


# --------------------------------------------------------------------------- in-process


class _Recording(ReceiverDaemon):
    """The real daemon, remembering every connection it was handed."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.seen: list = []

    def connection_opened(self, conn) -> bool:
        self.seen.append(conn)
        return super().connection_opened(conn)


@pytest.fixture
def inproc(hosts, tmp_path):
    _, backup = hosts
    cfg = load_config(
        [
            "--listen",
            "127.0.0.1:0",
            "--insecure",
            "--config",
            os.devnull,
            "--sim-dir",
            backup.dir,
            "--control",
            str(tmp_path / "c.sock"),
            "--on-link-loss",
            "wait",
            "--handshake-timeout",
            "2",
        ]
    )
    from xenbind.sim.client import SimHypervisor

    hv = SimHypervisor(backup.dir)
    daemon = _Recording(cfg, hv)
    listener = Listener(daemon, "127.0.0.1", 0)
    daemon.listen_address = listener.address
    daemon.start_monitor()
    listener.start()
    yield daemon, int(listener.address.rsplit(":", 1)[1])
    daemon.shutdown()
    listener.close()
    hv.close()


def test_an_ended_session_releases_its_decoder(inproc, hosts):
    daemon, port = inproc
    primary, backup = hosts
    g = Guest(primary)
    s = Sender(port, g, codec="seed", verify=False)  # the default 8192-page cache
    assert isinstance(s.handshake(), Accepted)
    s.initial_copy()
    s.wait_ack(0)
    s.checkpoint(50)
    s.wait_ack(1)
    [conn] = [c for c in daemon.seen if c.prot and c.prot.hello.session_id == s.hello.session_id]
    assert conn.decoder is not None and conn.staging is not None
    # (the receiver keeps no page cache since issue 15: the Decompressor and
    # the decoder's buffers are what an ended session must not keep)
    cache = weakref.ref(conn.decoder._decompressor)
    assert cache() is not None
    # the link closes between checkpoints: the decoder's eof() is quiet and
    # frees nothing by itself; the session ends link-lost (on-link-loss wait)
    s.close()
    conn.thread.join(10)
    assert not conn.thread.is_alive()
    assert daemon.find(g.name).state == "link-lost"
    assert conn.decoder is None and conn.staging is None
    assert cache() is None, "the ended session's codec is still alive"
    assert conn in daemon.seen  # freed although the Connection itself is still held
    assert backup_state(backup, g.name) == "paused"
