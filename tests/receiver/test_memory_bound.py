"""Memory stays bounded whatever a stream's length fields say (issue 6).

A peer may claim anything: a COMPRESSED_DATA chunk of 2^63 bytes, an HVM
context or a device-model record of 4 GiB, a guest of 2^40 pages, a batch
of 1024 pages and then nothing. The Decoder takes a cap for each allocation
from configuration and checks it BEFORE allocating; these tests feed such
claims and measure with tracemalloc (which sees Python and numpy buffers)
that the peak stays small, and that the refusal names the offending item's
byte offset.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from xenbind.errors import StreamError
from xenbind.stream import Decoder, StreamWriter, TruncatedStream
from xenbind.stream.format import (
    DEVICE_MODEL_SIGNATURE,
    TAG_CODEC,
    TAG_COMPRESSED_DATA,
    TAG_ENABLE_COMPRESSION,
)

#: The caps a receiver would take from its configuration in these tests.
CAPS = dict(
    max_p2m_size=1 << 20,  # a 4 GiB guest
    max_compressed=4 << 20,
    max_context=1 << 20,
    max_device_model=1 << 20,
    max_cache_pages=1024,
)
#: The peak any of these streams may cost the decoder.
PEAK_LIMIT = 16 << 20

P2M = 64


def header(p2m: int = P2M) -> bytes:
    return struct.pack("<Q", p2m)


def tail(ctx: bytes = b"", dm: bytes = b"") -> bytes:
    return (
        struct.pack("<QQQ", 1, 2, 3)
        + struct.pack("<I", len(ctx))
        + ctx
        + DEVICE_MODEL_SIGNATURE
        + struct.pack("<I", len(dm))
        + dm
    )


def format_b_prefix() -> bytes:
    """Header, an empty Format A checkpoint that enables the xen codec with a
    4-page cache, then the start of a Format B body listing PFN 5."""
    return (
        header()
        + struct.pack("<iII", TAG_CODEC, 1, 4)
        + struct.pack("<i", TAG_ENABLE_COMPRESSION)
        + struct.pack("<i", 0)
        + tail()
        + struct.pack("<iQ", 1, 5)
    )


def peak_of(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak traced memory (bytes) while ``fn`` runs, and what it returned or raised."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            out = fn()
        except StreamError as exc:
            out = exc
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, out


def feed_all(data: bytes, caps: dict | None = None, then_eof: bool = True):
    d = Decoder(**(CAPS if caps is None else caps))
    events = d.feed(data)
    if then_eof:
        d.eof()
    return events


def test_tracemalloc_sees_numpy_buffers() -> None:
    """Control: the instrument would see a big allocation if one were made."""
    peak, _ = peak_of(lambda: np.ones(32 << 20, np.uint8).sum())
    assert peak >= 32 << 20


CLAIMS = {
    # name: (stream bytes, offset the refusal must name, words its reason must hold)
    "p2m_size 2^40": (header(1 << 40), 0, "p2m_size"),
    "p2m_size 2^64-1": (header((1 << 64) - 1), 0, "p2m_size"),
    "COMPRESSED_DATA 2^63": (
        format_b_prefix() + struct.pack("<iQ", TAG_COMPRESSED_DATA, 1 << 63),
        len(format_b_prefix()),
        "cap",
    ),
    "COMPRESSED_DATA 2^64-1": (
        format_b_prefix() + struct.pack("<iQ", TAG_COMPRESSED_DATA, (1 << 64) - 1),
        len(format_b_prefix()),
        "cap",
    ),
    "COMPRESSED_DATA cap+1": (
        format_b_prefix() + struct.pack("<iQ", TAG_COMPRESSED_DATA, CAPS["max_compressed"] + 1),
        len(format_b_prefix()),
        "cap",
    ),
    "HVM context 4 GiB": (
        header() + struct.pack("<i", 0) + struct.pack("<QQQI", 1, 2, 3, 0xFFFF_FFFF),
        len(header()) + 4 + 24,
        "cap",
    ),
    "device model 4 GiB": (
        header()
        + struct.pack("<i", 0)
        + struct.pack("<QQQI", 1, 2, 3, 0)
        + DEVICE_MODEL_SIGNATURE
        + struct.pack("<I", 0xFFFF_FFFF),
        len(header()) + 4 + 28 + 21,
        "cap",
    ),
    "CODEC cache 2^32-1 pages": (
        header() + struct.pack("<iII", TAG_CODEC, 1, 0xFFFF_FFFF),
        len(header()),
        "cache",
    ),
    "batch of 2^31-1 pages": (header() + struct.pack("<i", 0x7FFF_FFFF), len(header()), "batch"),
}


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_huge_claim_is_refused_before_allocating(name: str) -> None:
    data, offset, word = CLAIMS[name]
    peak, out = peak_of(lambda: feed_all(data))
    assert isinstance(out, StreamError) and not isinstance(out, TruncatedStream), out
    assert out.offset == offset, out
    assert word in out.reason, out
    assert peak < PEAK_LIMIT, f"{name}: peak {peak >> 20} MiB"


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_huge_claim_is_refused_with_default_caps(name: str) -> None:
    """The defaults (no configuration at all) refuse the same claims."""
    data, offset, _ = CLAIMS[name]
    if name == "COMPRESSED_DATA cap+1":
        data = data[:-8] + struct.pack("<Q", 1 << 40)  # past the default cap too
    peak, out = peak_of(lambda: feed_all(data, caps={}))
    assert isinstance(out, StreamError) and out.offset == offset, out
    assert peak < PEAK_LIMIT, f"{name}: peak {peak >> 20} MiB"


def test_batch_of_1024_pages_then_eof_costs_one_batch() -> None:
    """A full batch listed, its 4 MiB of page data never sent: the decoder
    holds at most that one batch, and eof() says the checkpoint is torn."""
    data = header(4096) + struct.pack("<i", 1024) + np.arange(1024, dtype="<u8").tobytes()
    peak, out = peak_of(lambda: feed_all(data))
    assert isinstance(out, TruncatedStream) and out.torn_checkpoint == 0
    assert peak < PEAK_LIMIT
    assert peak < (4 << 20) + (1 << 20)  # one batch of page data and change


def test_many_claims_in_a_row_do_not_accumulate() -> None:
    """Checkpoints each carrying a context and a device-model record at the
    cap: memory is released checkpoint by checkpoint, not kept."""
    cap = 256 << 10
    caps: dict[str, Any] = dict(CAPS, max_context=cap, max_device_model=cap)
    one = struct.pack("<i", 0) + tail(b"c" * cap, b"d" * cap)
    data = header() + one * 20  # 10 MiB of tails in all
    d = Decoder(**caps)

    def run() -> int:
        n = 0
        for i in range(0, len(data), 65536):
            n += sum(1 for e in d.feed(data[i : i + 65536]) if type(e).__name__ == "CheckpointEnd")
        d.eof()
        return n

    peak, out = peak_of(run)
    assert out == 20
    assert peak < 8 * cap + (2 << 20), f"peak {peak >> 10} KiB"


def test_compressed_claim_at_the_cap_then_silence() -> None:
    """A COMPRESSED_DATA chunk announcing exactly the cap, then EOF: refused as
    torn, having cost at most the cap (the configuration's choice)."""
    data = format_b_prefix() + struct.pack("<iQ", TAG_COMPRESSED_DATA, CAPS["max_compressed"])
    peak, out = peak_of(lambda: feed_all(data))
    assert isinstance(out, TruncatedStream) and out.torn_checkpoint == 1
    assert peak <= CAPS["max_compressed"] + (2 << 20)


# --- against a running receiver process -------------------------------------------


def _vm(pid: int, field: str) -> int:
    """A /proc/PID/status memory figure (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    raise KeyError(field)


def _reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: clear_refs 5), so the
    peak measured is this claim's, not an earlier one's."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not permitted: VmHWM then only ever rises, the test stays sound


#: How much the receiver's peak RSS (VmHWM) may grow while a peer sends one
#: hostile claim. The claims would cost 4 GiB, 2^63 bytes, ... if believed;
#: what is honestly allowed is one cap-sized item (--max-compressed-mb 4) and
#: the per-session state of a small domain.
RSS_GROWTH_LIMIT = 24 << 20


@pytest.fixture(scope="module")
def rx(tmp_path_factory):
    from tests.receiver.test_daemon_process import Receiver
    from tests.simhost import SimHost, sim_dir

    primary = SimHost(sim_dir("mem-primary-")).start()
    backup = SimHost(sim_dir("mem-backup-")).start()
    r = Receiver(
        backup.dir, str(tmp_path_factory.mktemp("mem-receiver")), "--max-compressed-mb", "4"
    )
    yield r, primary
    code = r.stop()
    primary.cleanup()
    backup.cleanup()
    assert code == 0, r.log()[-3000:]
    assert "Traceback" not in r.log(), r.log()[-3000:]


def _sender(port: int, primary, *, codec: str = "seed"):
    """A test sender (tests/receiver/test_daemon_process.py) with a small codec cache and
    sender buffer (the receiver refuses a buffer whose chunks could exceed its
    --max-compressed-mb 4 at the handshake), accepted."""
    import dataclasses

    from tests.receiver.test_daemon_process import Guest, Sender
    from xenbind.session import Accepted, SenderSession

    g = Guest(primary)
    s = Sender(port, g, codec=codec, verify=False)
    s.hello = dataclasses.replace(
        s.hello, options=dataclasses.replace(s.hello.options, cache_pages=64, buffer_pages=64)
    )
    s.ss = SenderSession(s.hello)
    s.writer = StreamWriter(g.pages, codec=codec, cache_pages=64, buffer_pages=64)
    assert isinstance(s.handshake(), Accepted)
    return g, s


def _claims(pages: int) -> dict[str, tuple[bool, bytes]]:
    """name -> (needs the initial copy first, bytes to send)."""
    hdr = struct.pack("<Q", pages)
    return {
        "p2m_size 2^40": (False, struct.pack("<Q", 1 << 40)),
        "HVM context 4 GiB": (
            False,
            hdr + struct.pack("<i", 0) + struct.pack("<QQQI", 1, 2, 3, 0xFFFF_FFFF),
        ),
        "device model 4 GiB": (
            False,
            hdr
            + struct.pack("<i", 0)
            + struct.pack("<QQQI", 1, 2, 3, 0)
            + DEVICE_MODEL_SIGNATURE
            + struct.pack("<I", 0xFFFF_FFFF),
        ),
        "batch of 1024 pages then EOF": (
            False,
            hdr + struct.pack("<i", 1024) + np.arange(1024, dtype="<u8").tobytes(),
        ),
        "COMPRESSED_DATA 2^63": (
            True,
            struct.pack("<iQ", 1, 5) + struct.pack("<iQ", TAG_COMPRESSED_DATA, 1 << 63),
        ),
        "COMPRESSED_DATA at the cap then EOF": (
            True,
            struct.pack("<iQ", 1, 5) + struct.pack("<iQ", TAG_COMPRESSED_DATA, 4 << 20),
        ),
    }


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(_claims(1)))
def test_receiver_rss_stays_small_under_huge_claims(rx, name: str) -> None:
    import socket

    r, primary = rx
    g, s = _sender(r.port, primary)
    initial, payload = _claims(g.pages)[name]
    if initial:
        s.initial_copy()
        s.wait_ack(0)
    _reset_peak(r.proc.pid)
    before = _vm(r.proc.pid, "VmHWM")
    s.send(payload)
    s.sock.shutdown(socket.SHUT_WR)
    # the receiver ends the session (violation, or a torn checkpoint at EOF)
    ev = s.next_event(timeout=20)
    while ev is not None and type(ev).__name__ != "Error":
        ev = s.next_event(timeout=20)
    s.close()
    grown = _vm(r.proc.pid, "VmHWM") - before
    print(f"{name}: receiver peak RSS {before >> 20} -> {(before + grown) >> 20} MiB")
    assert r.proc.poll() is None, "the receiver died"
    assert grown < RSS_GROWTH_LIMIT, f"{name}: peak RSS grew by {grown >> 20} MiB"
