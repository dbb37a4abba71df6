"""Stream encoder/decoder: header, Format A bodies, tags, tail, and every rule.

Golden vectors here are written out by hand from docs/stream.md with struct,
independently of the encoder, and checked byte for byte both ways.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.xenbind.stream.common import decode, decode_bytewise, normal, random_pages, replay_events
from xenbind.errors import StreamError
from xenbind.stream import (
    CheckpointEnd,
    Decoder,
    DiskData,
    EndOfBody,
    Header,
    Heartbeat,
    LastCheckpoint,
    MalformedStream,
    MemoryDigest,
    StreamWriter,
    Switchover,
    TruncatedStream,
    TscInfo,
    encode_body_a,
    encode_disk,
    encode_end,
    encode_header,
    encode_heartbeat,
    encode_last_checkpoint,
    encode_memory_digest,
    encode_pages,
    encode_switchover,
    encode_tail,
    encode_tsc_info,
    memory_digest,
)
from xenbind.types import Context

PAGE = 4096
CTX = Context((0xFEFF0, 0xFEFF1, 0xFEFF2), b"CTX!", b"DM")
PAGE_A = b"\x11" * PAGE
PAGE_B = bytes(range(256)) * 16


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


# A hand-written stream: p2m_size 4, one checkpoint:
#   +2 [pfn 1 NOTAB, pfn 3 L1TAB] + 2 pages; +1 [XTAB]; TSC_INFO; end; tail.
GOLDEN_TAIL = (
    u64(0xFEFF0)
    + u64(0xFEFF1)
    + u64(0xFEFF2)
    + u32(4)
    + b"CTX!"
    + b"DeviceModelRecord0002"
    + u32(2)
    + b"DM"
)
GOLDEN_A = (
    bytes.fromhex("0400000000000000")  # p2m_size = 4
    + bytes.fromhex("02000000")  # +2
    + bytes.fromhex("0100000000000000")  # pfn 1, NOTAB
    + bytes.fromhex("0300001000000000")  # pfn 3, L1TAB (0x1 << 28)
    + PAGE_A
    + PAGE_B
    + bytes.fromhex("01000000")  # +1
    + bytes.fromhex("000000f000000000")  # XTAB, no data
    + bytes.fromhex("f9ffffff")  # -7 TSC_INFO
    + bytes.fromhex("01000000")  # mode 1
    + bytes.fromhex("0200000000000000")  # nsec 2
    + bytes.fromhex("03000000")  # khz 3
    + bytes.fromhex("04000000")  # incarnation 4
    + bytes.fromhex("00000000")  # end of body
    + GOLDEN_TAIL
)


def golden_a_encoded() -> bytes:
    pages = np.frombuffer(PAGE_A + PAGE_B, dtype=np.uint8).reshape(2, PAGE)
    return b"".join(
        [
            encode_header(4),
            encode_pages(np.array([1, 3], dtype=np.uint64), pages, np.array([0, 1])),
            encode_pages(np.array([0], dtype=np.uint64), np.zeros((0, PAGE), np.uint8), [0xF]),
            encode_tsc_info(1, 2, 3, 4),
            encode_end(),
            encode_tail(CTX),
        ]
    )


def test_golden_a_encoder_matches_hand_written_bytes():
    assert golden_a_encoded() == GOLDEN_A


def test_golden_a_decodes_to_expected_events():
    events, d = decode(GOLDEN_A)
    n = normal(events)
    assert n == [
        Header(4),
        ("PageBatch", [1, 3], [0, 1]),
        ("Pages", [1, 3], PAGE_A + PAGE_B, None),
        ("PageBatch", [0], [0xF]),
        TscInfo(1, 2, 3, 4),
        EndOfBody(0),
        ("Tail", (0xFEFF0, 0xFEFF1, 0xFEFF2), b"CTX!", b"DM"),
        CheckpointEnd(0, "A", 2, len(GOLDEN_A)),
    ]
    assert d.offset == d.received == len(GOLDEN_A)
    assert d.checkpoints == 1


def test_golden_hex_file_matches():
    """tests/golden/format_a.hex: the same vector, hex with comments, so the
    spec's bytes sit in the repository for readers (page data abbreviated as
    repeat directives)."""
    from pathlib import Path

    text = (Path(__file__).parent / "golden" / "format_a.hex").read_text()
    out = bytearray()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("repeat "):
            _, count, hexbytes = line.split()
            out += bytes.fromhex(hexbytes) * int(count)
        else:
            out += bytes.fromhex(line)
    assert bytes(out) == GOLDEN_A


def test_feeding_byte_by_byte_and_split_gives_same_events():
    whole = normal(decode(GOLDEN_A)[0])
    assert normal(decode_bytewise(GOLDEN_A)) == whole
    rng = np.random.default_rng(1)
    for _ in range(50):
        cuts = sorted(rng.integers(0, len(GOLDEN_A), size=rng.integers(1, 12)).tolist())
        assert normal(decode(GOLDEN_A, cuts)[0]) == whole


def test_truncation_at_every_offset():
    small = (
        encode_header(4)
        + encode_pages(np.array([2], np.uint64), np.full((1, PAGE), 7, np.uint8))
        + encode_tsc_info(0, 1, 2, 3)
        + encode_end()
        + encode_tail(CTX)
    )
    for cut in range(len(small) + 1):
        d = Decoder()
        d.feed(small[:cut])
        if cut in (8, len(small)):
            d.eof()  # clean: after the header, after a whole checkpoint
            continue
        with pytest.raises(TruncatedStream) as ei:
            d.eof()
        assert ei.value.offset == cut
        if cut < 8:
            assert ei.value.torn_checkpoint is None
        else:
            assert ei.value.torn_checkpoint == 0
            assert ei.value.checkpoints == 0
            assert "torn" in ei.value.reason


def test_truncation_in_second_checkpoint_keeps_first():
    w = StreamWriter(8)
    rng = np.random.default_rng(2)
    p = random_pages(rng, 3)
    one = b"".join([w.header(), *w.checkpoint(np.array([0, 1, 2], np.uint64), p, CTX)])
    two = b"".join(w.checkpoint(np.array([5], np.uint64), p[:1], CTX))
    d = Decoder()
    events = d.feed(one + two[:-1])
    with pytest.raises(TruncatedStream) as ei:
        d.eof()
    assert ei.value.torn_checkpoint == 1 and ei.value.checkpoints == 1
    mem, applied, _ = replay_events(events, 8)
    assert applied == 1
    assert (mem[:3] == p).all() and not mem[5].any()


# ------------------------------------------------------------------ round trips


@st.composite
def format_a_streams(draw):
    p2m = draw(st.integers(1, 3000))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ncp = draw(st.integers(1, 3))
    plan = []
    for _ in range(ncp):
        rounds = []
        for _ in range(draw(st.integers(0, 3))):
            n = draw(st.integers(0, min(p2m, 2500)))
            pfns = rng.choice(p2m, size=n, replace=False).astype(np.uint64)
            types = (
                rng.choice(np.array([0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 14, 15], np.uint8), size=n)
                if draw(st.booleans())
                else None
            )
            rounds.append((pfns, types))
        plan.append(rounds)
    return p2m, seed, plan


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(format_a_streams())
def test_format_a_round_trip(case):
    """Initial copy and later Format A checkpoints, pre-copy rounds repeating
    pages across batches (later copy wins), all page types."""
    p2m, seed, plan = case
    rng = np.random.default_rng(seed + 1)
    mem = np.zeros((p2m, PAGE), np.uint8)
    w = StreamWriter(p2m)
    bufs = [w.header()]
    ctxs = []
    for i, rounds in enumerate(plan):
        for pfns, types in rounds:
            has = (
                np.ones(len(pfns), bool)
                if types is None
                else np.isin(types, [13, 14, 15], invert=True)
            )
            pages = random_pages(rng, int(has.sum()))
            mem[pfns[has].astype(np.intp)] = pages
            bufs += w.pages(pfns, pages, types)
        ctx = Context((i, i + 1, i + 2), bytes([i]) * 7, b"dm%d" % i)
        ctxs.append(ctx)
        bufs += w.end_checkpoint(ctx, last=i == len(plan) - 1)
    data = b"".join(bufs)
    events, d = decode(data, max_p2m_size=p2m)
    got, applied, got_ctxs = replay_events(events, p2m)
    assert applied == len(plan) == d.checkpoints
    assert got_ctxs == ctxs
    assert np.array_equal(got, mem)
    assert any(isinstance(e, LastCheckpoint) for e in events)
    # a random split gives the same events
    cuts = sorted(rng.integers(0, len(data), size=5).tolist())
    assert normal(decode(data, cuts, max_p2m_size=p2m)[0]) == normal(events)


def test_batches_are_at_most_1024_entries():
    pfns = np.arange(2500, dtype=np.uint64)
    pages = np.zeros((2500, PAGE), np.uint8)
    bufs = encode_body_a(pfns, pages)
    data = b"".join(bufs)
    assert struct.unpack_from("<i", data, 0)[0] == 1024
    assert struct.unpack_from("<i", data, 4 + 1024 * 8 + 1024 * PAGE)[0] == 1024
    off = 2 * (4 + 1024 * 8 + 1024 * PAGE)
    assert struct.unpack_from("<i", data, off)[0] == 452
    assert len(data) == off + 4 + 452 * 8 + 452 * PAGE


def test_heartbeat_anywhere_a_chunk_may_start_changes_nothing():
    rng = np.random.default_rng(3)
    p = random_pages(rng, 2)
    hb = encode_heartbeat()
    plain = b"".join(
        [
            encode_header(4),
            encode_pages(np.array([0, 1], np.uint64), p),
            encode_end(),
            encode_tail(CTX),
        ]
    )
    beat = b"".join(
        [
            encode_header(4),
            hb,
            hb,
            encode_pages(np.array([0], np.uint64), p[:1]),
            hb,
            encode_pages(np.array([1], np.uint64), p[1:]),
            hb,
            encode_end(),
            encode_tail(CTX),
            hb,
            hb,
        ]
    )
    e1, _ = decode(plain)
    e2, d2 = decode(beat)  # ends after heartbeats between checkpoints: clean
    assert sum(isinstance(e, Heartbeat) for e in e2) == 6
    m1, a1, _ = replay_events(e1, 4)
    m2, a2, _ = replay_events(e2, 4)
    assert a1 == a2 == 1 and np.array_equal(m1, m2)
    assert d2.checkpoints == 1


def test_disk_chunks_anywhere_a_chunk_may_start_carry_their_bytes_in_order():
    rng = np.random.default_rng(4)
    p = random_pages(rng, 2)
    pieces = [b"disk-0", bytes(range(256)) * 40, b"x"]
    data = b"".join(
        [
            encode_header(4),
            encode_disk(pieces[0]),
            encode_pages(np.array([0], np.uint64), p[:1]),
            encode_disk(pieces[1]),
            encode_pages(np.array([1], np.uint64), p[1:]),
            encode_end(),
            encode_tail(CTX),
            encode_disk(pieces[2]),
        ]
    )
    # layout: tag -1005, uint32 length, the bytes
    assert data[8:22] == i32(-1005) + u32(6) + b"disk-0"
    for events in (decode(data)[0], decode_bytewise(data)):
        assert [e.data for e in events if isinstance(e, DiskData)] == pieces
        m, applied, _ = replay_events(events, 4)
        assert applied == 1 and np.array_equal(m[:2], p)


def test_disk_chunk_length_is_checked_before_anything_is_buffered():
    for n in (0, 1025):
        data = encode_header(4) + i32(-1005) + u32(n)
        d = Decoder(max_disk_chunk=1024)
        with pytest.raises(MalformedStream, match="DISK chunk of") as e:
            d.feed(data)
        assert e.value.offset == 8
    with pytest.raises(ValueError):
        encode_disk(b"")
    # a stream cut inside a DISK chunk is torn, not clean
    d = Decoder()
    d.feed(encode_header(4) + encode_disk(b"abcdef")[:-2])
    with pytest.raises(TruncatedStream):
        d.eof()


def test_heartbeat_inside_tail_is_rejected():
    data = encode_header(4) + encode_end() + struct.pack("<QQ", 1, 2) + encode_heartbeat()
    d = Decoder()
    d.feed(data)  # 4 bytes of heartbeat read as part of the third magic PFN
    with pytest.raises(TruncatedStream):
        d.eof()


def test_memory_digest_round_trip():
    mem = np.arange(4 * PAGE, dtype=np.uint32).astype(np.uint8).reshape(4, PAGE)
    dg = memory_digest(mem)
    assert len(dg) == 16
    data = encode_header(4) + encode_memory_digest(dg) + encode_end() + encode_tail(CTX)
    # layout: tag, algorithm 1, length 16, digest
    assert data[8:24] == i32(-1002) + u32(1) + u32(16) + dg[:4]
    events, _ = decode(data)
    assert MemoryDigest("xxh3-128", dg) in events


def test_last_checkpoint_ends_stream():
    data = encode_header(4) + encode_last_checkpoint() + encode_end() + encode_tail(CTX)
    events, d = decode(data)
    assert d.last and isinstance(events[1], LastCheckpoint)
    d = Decoder()
    with pytest.raises(MalformedStream) as ei:
        d.feed(data + encode_heartbeat())
    assert ei.value.offset == len(data)
    assert isinstance(ei.value.events[-1], CheckpointEnd)  # the checkpoint still counts


def test_switchover_stands_only_in_the_last_checkpoint_once():
    """Project tag -1004 SWITCHOVER: a planned move; only beside
    LAST_CHECKPOINT, at most once, and the writer refuses it elsewhere."""
    w = StreamWriter(4)
    data = w.header() + b"".join(
        bytes(b) for b in w.end_checkpoint(CTX, last=True, switchover=True)
    )
    assert encode_switchover() == i32(-1004) and encode_switchover() in data
    events, d = decode(data)
    assert d.last and Switchover() in events and LastCheckpoint() in events
    with pytest.raises(ValueError, match="only in the last checkpoint"):
        StreamWriter(4).end_checkpoint(CTX, switchover=True)
    alone = encode_header(4) + encode_switchover() + encode_end() + encode_tail(CTX)
    with pytest.raises(MalformedStream, match="SWITCHOVER in checkpoint 0, which is not the last"):
        Decoder().feed(alone)
    twice = encode_header(4) + encode_switchover() * 2 + encode_last_checkpoint() + encode_end()
    with pytest.raises(MalformedStream, match="a second SWITCHOVER in checkpoint 0"):
        Decoder().feed(twice)


# ------------------------------------------------------------------ malformed input

BODY0 = encode_header(4)


def body(*chunks: bytes) -> bytes:
    return BODY0 + b"".join(chunks)


def entry(pfn: int, t: int = 0) -> bytes:
    return u64(pfn | (t << 28))


MALFORMED = {
    "p2m_size zero": (u64(0), 0, "p2m_size is 0"),
    "p2m_size over limit": (u64(1 << 30), 0, "exceeds the limit"),
    "batch too big": (body(i32(1025)), 8, "exceeds the maximum of 1024"),
    "pfn beyond p2m": (body(i32(2), entry(1), entry(4)), 8 + 4 + 8, "not below p2m_size"),
    "pfn duplicate in batch": (
        body(i32(3), entry(2), entry(1), entry(2)),
        8 + 4 + 16,
        "twice in one batch",
    ),
    "reserved entry bits": (body(i32(1), u64(1 << 40)), 12, "bits 32-63"),
    "invalid type 5": (body(i32(1), entry(0, 5)), 12, "invalid page type"),
    "invalid type 8": (body(i32(2), entry(0), entry(1, 8)), 20, "invalid page type"),
    "unknown tag": (body(i32(-999)), 8, "unknown chunk type -999"),
    "xen tag not supported": (body(i32(-1)), 8, "enable_verify_mode"),
    "xen tag enable_verify_mode": (body(i32(-1)), 8, "enable_verify_mode"),
    "xen tag tmem": (body(i32(-5)), 8, "tmem"),
    "vcpu_info max id negative": (body(i32(-2), i32(-1)), 8, "max_vcpu_id"),
    "vcpu_info max id too big": (body(i32(-2), i32(4096)), 8, "max_vcpu_id"),
    "toolstack over cap": (body(i32(-18), u32((1 << 20) + 1)), 8, "TOOLSTACK"),
    "compressed before enable": (body(i32(-12), u64(4), b"abcd"), 8, "before ENABLE_COMPRESSION"),
    "compressed in format A body": (body(i32(-13), i32(-12), u64(1), b"\x00"), 12, "Format A body"),
    "enable twice": (body(i32(-13), i32(-13)), 12, "twice"),
    "codec after enable": (body(i32(-13), i32(-1001), u32(2), u32(10)), 12, "after ENABLE"),
    "codec twice": (body(i32(-1001), u32(2), u32(10), i32(-1001), u32(2), u32(10)), 20, "twice"),
    "codec unknown id": (body(i32(-1001), u32(9), u32(10)), 8, "unknown codec id 9"),
    "codec cache zero": (body(i32(-1001), u32(2), u32(0)), 8, "cache of 0 pages"),
    "codec cache huge": (body(i32(-1001), u32(2), u32(0xFFFFFFFF)), 8, "cache of"),
    "digest unknown alg": (body(i32(-1002), u32(7), u32(16)), 8, "unknown algorithm"),
    "digest bad length": (body(i32(-1002), u32(1), u32(1 << 31)), 8, "expected 16"),
    "context too long": (
        body(encode_end(), b"\0" * 24, u32(0xFFFFFFFF)),
        8 + 4 + 24,
        "HVM context",
    ),
    "device model too long": (
        body(encode_end(), b"\0" * 24, u32(0), b"DeviceModelRecord0002", u32(0xFFFFFFF0)),
        8 + 4 + 24 + 4 + 21,
        "device-model record of",
    ),
    "wrong signature": (
        body(encode_end(), b"\0" * 24, u32(0), b"QemuDeviceModelRecord", u32(0)),
        8 + 4 + 24 + 4,
        "signature",
    ),
    "after last checkpoint": (
        body(encode_last_checkpoint(), encode_end(), encode_tail(CTX), b"\0"),
        8 + 4 + 4 + len(encode_tail(CTX)),
        "LAST_CHECKPOINT",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_rejected_with_offset(name):
    data, offset, words = MALFORMED[name]
    for feed in ("whole", "bytewise"):
        d = Decoder(max_context=1 << 20, max_device_model=1 << 20)
        with pytest.raises(MalformedStream) as ei:
            if feed == "whole":
                d.feed(data)
            else:
                for i in range(len(data)):
                    d.feed(data[i : i + 1])
        assert ei.value.offset == offset, (name, ei.value)
        assert words in ei.value.reason, (name, ei.value.reason)
        assert f"byte {offset}:" in str(ei.value)
        # the decoder stays dead
        with pytest.raises(StreamError):
            d.feed(b"")
        with pytest.raises(StreamError):
            d.eof()


def test_format_a_duplicates_across_batches_are_allowed_later_wins():
    a = np.full((1, PAGE), 1, np.uint8)
    b = np.full((1, PAGE), 2, np.uint8)
    one = np.array([3], np.uint64)
    data = body(encode_pages(one, a), encode_pages(one, b), encode_end(), encode_tail(CTX))
    events, _ = decode(data)
    mem, applied, _ = replay_events(events, 4)
    assert applied == 1 and (mem[3] == 2).all()


def test_xtab_entries_escape_pfn_rules():
    # XTAB entries name no page: a PFN past p2m_size and repeats are fine.
    data = body(i32(3), entry(0, 15), entry(0, 15), entry(99, 15), encode_end(), encode_tail(CTX))
    events, _ = decode(data)
    assert ("PageBatch", [0, 0, 99], [15, 15, 15]) in normal(events)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_corruption_never_crashes(data):
    """Flip, insert or delete bytes of a valid stream: the decoder either
    decodes or raises StreamError, nothing else."""
    raw = bytearray(GOLDEN_A)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[pos : pos + data.draw(st.integers(1, 8))]
    d = Decoder(max_context=1 << 16, max_device_model=1 << 16)
    try:
        d.feed(bytes(raw))
        d.eof()
    except StreamError:
        pass


def test_encoder_rejects_misuse():
    with pytest.raises(ValueError):
        encode_pages(np.array([1 << 28], np.uint64), np.zeros((1, PAGE), np.uint8))
    with pytest.raises(ValueError):
        encode_pages(np.array([1, 2], np.uint64), np.zeros((1, PAGE), np.uint8))
    with pytest.raises(ValueError):
        encode_pages(np.array([1], np.uint64), np.zeros((1, PAGE), np.uint8), [6])
    with pytest.raises(ValueError):
        encode_header(0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(format_a_streams(), st.integers(1, 5000), st.integers(0, 2**32 - 1))
def test_direct_receive_into_get_buffer_gives_the_same_events(case, least, seed):
    """A receiver that writes page data straight into the decoder's buffer
    (get_buffer / buffer_updated, as recv_into would) and feeds everything
    else in random pieces decodes exactly what feeding it all gives."""
    p2m, s, plan = case
    rng = np.random.default_rng(s)
    w = StreamWriter(p2m)
    bufs = [w.header()]
    for i, rounds in enumerate(plan):
        for pfns, types in rounds:
            has = (
                np.ones(len(pfns), bool)
                if types is None
                else np.isin(types, [13, 14, 15], invert=True)
            )
            bufs += w.pages(pfns, random_pages(rng, int(has.sum())), types)
        bufs += w.end_checkpoint(CTX, last=i == len(plan) - 1)
    data = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)
    whole = normal(decode(data, max_p2m_size=p2m)[0])
    cut = np.random.default_rng(seed)
    d = Decoder(max_p2m_size=p2m)
    got: list = []
    at = 0
    while at < len(data):
        piece = int(cut.integers(1, 9000))
        view = d.get_buffer(least)
        if view is not None:
            assert len(view) >= least
            k = min(piece, len(view), len(data) - at)
            view[:k] = data[at : at + k]
            got += d.buffer_updated(k)
        else:
            got += d.feed(data[at : at + piece])
            k = min(piece, len(data) - at)
        at += k
    d.eof()
    assert normal(got) == whole
    fresh = Decoder()
    view = fresh.get_buffer()
    assert view is not None and len(view) == 8  # the header
    with pytest.raises(ValueError):
        fresh.buffer_updated(len(view) + 1)  # more than the view holds


def test_get_buffer_offers_a_batch_page_data_whole():
    """Once a batch's PFN list is in, get_buffer offers all its page data (the
    receiver's recv_into target), and not while a chunk header is awaited."""
    pfns = np.arange(16, dtype=np.uint64)
    pages = np.full((16, PAGE), 9, np.uint8)
    data = encode_header(64) + encode_pages(pfns, pages)
    d = Decoder()
    head = len(data) - 16 * PAGE
    assert d.feed(data[:8]) == [Header(64)]
    assert d.get_buffer(least=5) is None  # a 4-byte chunk type is awaited
    d.feed(data[8:head])
    view = d.get_buffer(least=64 << 10)
    assert view is not None and len(view) == 16 * PAGE
    view[:] = data[head:]
    (batch_pages,) = d.buffer_updated(len(view))
    assert np.array_equal(batch_pages.data, pages)
