"""Format B (compressed) bodies through the real xenbind.compress codecs.

Golden vectors are written by hand from stream-format.md / docs/stream.md and
the codec layouts of docs (xen: 0x00 unchanged, 0x80 + page, SKIP/RUN markers;
seed: int16 offset + uint32 value records, -100 BEGIN_PAGE, -101 FULL_PAGE).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.xenbind.stream.common import (
    decode,
    decode_bytewise,
    decoder,
    normal,
    random_pages,
    replay_events,
    take,
)
from xenbind.compress import Compressor
from xenbind.stream import (
    CheckpointEnd,
    CodecAnnounce,
    Decoder,
    EnableCompression,
    MalformedStream,
    MemoryDigest,
    Pages,
    StreamWriter,
    TruncatedStream,
    encode_body_b,
    encode_compressed,
    encode_enable_compression,
    encode_end,
    encode_header,
    encode_pfn_list,
    encode_tail,
    memory_digest,
)
from xenbind.stream.encoder import Buffer
from xenbind.types import Context

PAGE = 4096
CTX = Context((7, 8, 9), b"hvm", b"qemu")
TAIL = (
    struct.pack("<QQQ", 7, 8, 9)
    + struct.pack("<I", 3)
    + b"hvm"
    + b"DeviceModelRecord0002"
    + struct.pack("<I", 4)
    + b"qemu"
)


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


P0 = np.full(PAGE, 0xAA, np.uint8)
P0b = np.full(PAGE, 0xBB, np.uint8)
P2 = np.arange(PAGE, dtype=np.uint16).astype(np.uint8)
P2b = P2.copy()
P2b[20:24] = [1, 2, 3, 4]  # word 5 changed


def golden_writer(codec: str) -> bytes:
    w = StreamWriter(4, codec=codec)
    bufs: list[Buffer] = [w.header()]
    bufs += w.checkpoint(np.array([0], np.uint64), P0[None], CTX)
    bufs += w.checkpoint(np.array([0, 2], np.uint64), np.stack([P0b, P2]), CTX)
    bufs += w.checkpoint(np.array([0, 2], np.uint64), np.stack([P0b, P2b]), CTX)
    return b"".join(bufs)


def golden_bytes(codec: str) -> bytes:
    if codec == "xen":
        announce = b""
        full1 = b"\x80" + P0b.tobytes() + b"\x80" + P2.tobytes()
        # pfn 0 unchanged: 0x00; pfn 2: SKIP 5, RUN 1 + word, SKIP 1018 = 8 x 127 + 2
        delta2 = b"\x00" + b"\x85" + b"\x01" + bytes([1, 2, 3, 4]) + b"\xff" * 8 + b"\x82"
    else:
        announce = i32(-1001) + struct.pack("<II", 2, 8192)
        full = struct.pack("<hI", -101, 0)
        begin = struct.pack("<hI", -100, 0)
        full1 = full + P0b.tobytes() + full + P2.tobytes()
        delta2 = begin + begin + struct.pack("<hI", 20, 0x04030201)
    return (
        u64(4)
        # checkpoint 0: Format A
        + i32(1) + u64(0) + P0.tobytes()
        + announce + i32(-13) + i32(0) + TAIL
        # checkpoint 1: Format B, both pages missing from the cache
        + i32(2) + u64(0) + u64(2)
        + i32(-12) + u64(len(full1)) + full1
        + i32(0) + TAIL
        # checkpoint 2: pfn 0 unchanged, pfn 2 one word changed
        + i32(2) + u64(0) + u64(2)
        + i32(-12) + u64(len(delta2)) + delta2
        + i32(0) + TAIL
    )  # fmt: skip


@pytest.mark.parametrize("codec", ["xen", "seed"])
def test_golden_b_encoder_matches_hand_written_bytes(codec):
    assert golden_writer(codec) == golden_bytes(codec)


@pytest.mark.parametrize("codec", ["xen", "seed"])
def test_golden_b_decodes(codec):
    data = golden_bytes(codec)
    events, d = decode(data)
    assert d.checkpoints == 3 and d.codec == codec and d.cache_pages == 8192
    assert EnableCompression(codec, 8192) in events
    assert (CodecAnnounce(codec, 8192) in events) == (codec == "seed")
    ends = [e for e in events if isinstance(e, CheckpointEnd)]
    assert [(e.index, e.format, e.pages) for e in ends] == [(0, "A", 1), (1, "B", 2), (2, "B", 2)]
    mem, applied, _ = replay_events(events, 4)
    assert applied == 3
    assert np.array_equal(mem[0], P0b) and np.array_equal(mem[2], P2b)
    assert not mem[1].any() and not mem[3].any()
    compressed = [e.compressed_bytes for e in events if isinstance(e, Pages)]
    assert compressed[0] is None and all(c > 0 for c in compressed[1:])
    assert normal(decode_bytewise(data)) == normal(events)


@pytest.mark.parametrize("codec", ["xen", "seed"])
def test_golden_b_truncation_at_every_offset(codec):
    """One decoder fed byte by byte; eof() (which does not disturb it) after
    every byte: clean exactly at checkpoint boundaries, torn elsewhere."""
    data = golden_bytes(codec)
    events, _ = decode(data)
    bounds = {8} | {e.offset for e in events if isinstance(e, CheckpointEnd)}
    d, img = decoder()
    done = 0
    for i in range(len(data)):
        done += sum(isinstance(e, CheckpointEnd) for e in take(img, d.feed(data[i : i + 1])))
        if i + 1 in bounds:
            d.eof()
        else:
            with pytest.raises(TruncatedStream) as ei:
                d.eof()
            assert ei.value.offset == i + 1
            assert ei.value.torn_checkpoint == (None if i + 1 < 8 else done)


# ------------------------------------------------------------------ round trips

PATTERNS = ["unchanged", "one_word", "scattered", "run", "all_words", "fresh", "pagetable"]


def mutate(rng: np.random.Generator, page: np.ndarray, pattern: str) -> np.ndarray:
    p = page.copy()
    w = p.view("<u4")
    if pattern == "one_word":
        w[rng.integers(1024)] ^= np.uint32(rng.integers(1, 2**32))
    elif pattern == "scattered":
        idx = rng.choice(1024, size=rng.integers(2, 64), replace=False)
        w[idx] ^= rng.integers(1, 2**32, size=len(idx), dtype=np.uint32)
    elif pattern == "run":
        a = int(rng.integers(1024))
        b = int(rng.integers(a + 1, 1025))
        w[a:b] ^= rng.integers(1, 2**32, size=b - a, dtype=np.uint32)
    elif pattern == "all_words":
        w ^= rng.integers(1, 2**32, size=1024, dtype=np.uint32)
    elif pattern in ("fresh", "pagetable"):
        p = rng.integers(0, 256, size=PAGE, dtype=np.uint8)
    return p


@st.composite
def b_cases(draw):
    codec = draw(st.sampled_from(["xen", "seed"]))
    p2m = draw(st.integers(1, 400))
    cache = draw(st.sampled_from([1, 3, 16, 64, 8192]))
    buffer_pages = draw(st.sampled_from([1, 2, 7, 100, 8192]))
    seed = draw(st.integers(0, 2**32 - 1))
    rounds = draw(
        st.lists(
            st.tuples(st.integers(0, 400), st.sampled_from(PATTERNS), st.booleans()),
            min_size=1,
            max_size=5,
        )
    )
    return codec, p2m, cache, buffer_pages, seed, rounds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b_cases())
def test_format_b_round_trip(case):
    """Unchanged pages, one word, scattered words, runs, all words, cache
    misses, evictions (tiny caches), page tables, bodies larger than the
    sender's buffer; the memory digest after every checkpoint must match."""
    codec, p2m, cache, buffer_pages, seed, rounds = case
    rng = np.random.default_rng(seed)
    mem = random_pages(rng, p2m)
    w = StreamWriter(p2m, codec=codec, cache_pages=cache, buffer_pages=buffer_pages)
    bufs = [w.header()]
    # Format A buffers are views of the pages passed: hand over a copy, since
    # mem changes before the buffers are joined
    bufs += w.checkpoint(
        np.arange(p2m, dtype=np.uint64), mem.copy(), CTX, digest=memory_digest(mem)
    )
    for n, pattern, shuffle in rounds:
        n = min(n, p2m)
        pfns = rng.choice(p2m, size=n, replace=False) if shuffle else np.arange(n)
        pfns = pfns.astype(np.uint64)
        types = np.full(n, 1 if pattern == "pagetable" else 0, np.uint8)
        pages = (
            np.stack([mutate(rng, mem[int(p)], pattern) for p in pfns])
            if n
            else np.zeros((0, PAGE), np.uint8)
        )
        mem[pfns.astype(np.intp)] = pages
        bufs += w.checkpoint(pfns, pages, CTX, types, digest=memory_digest(mem))
    data = b"".join(bufs)
    events, d = decode(data, max_p2m_size=p2m)
    assert d.checkpoints == len(rounds) + 1
    # per-checkpoint digests: apply as a receiver would and compare
    image = np.zeros((p2m, PAGE), np.uint8)
    staged: list = []
    digest = None
    for e in events:
        if isinstance(e, Pages):
            staged.append(e)
        elif isinstance(e, MemoryDigest):
            digest = e.digest
        elif isinstance(e, CheckpointEnd):
            for p in staged:
                image[p.pfns.astype(np.intp)] = p.data
            staged = []
            assert memory_digest(image) == digest, f"checkpoint {e.index}"
    assert np.array_equal(image, mem)
    cuts = sorted(rng.integers(0, len(data), size=6).tolist())
    assert normal(decode(data, cuts, max_p2m_size=p2m)[0]) == normal(events)


def chunk_types(data: bytes, start: int) -> list:
    """Walk a Format B body's chunks (listing and COMPRESSED_DATA only)."""
    out = []
    pos = start
    while pos < len(data):
        (t,) = struct.unpack_from("<i", data, pos)
        if t > 0:
            out.append(t)
            pos += 4 + 8 * t
        elif t == -12:
            (n,) = struct.unpack_from("<Q", data, pos + 4)
            out.append("CD")
            pos += 12 + n
        else:
            break
    return out


def test_seed_corner_case_buffer_fills_mid_body():
    """20000 dirty pages, the 8192-page sender buffer: PFN chunks of 1024,
    a COMPRESSED_DATA chunk each time the buffer fills, listing carries on."""
    n = 20000
    rng = np.random.default_rng(5)
    pages = random_pages(rng, n)
    pfns = np.arange(n, dtype=np.uint64)
    body = b"".join(encode_body_b(pfns, pages, Compressor("xen")))
    kinds = chunk_types(body, 0)
    assert kinds == [1024] * 8 + ["CD"] + [1024] * 8 + ["CD"] + [1024] * 3 + [544, "CD"]
    data = (
        encode_header(n) + encode_enable_compression() + encode_end() + encode_tail(CTX)
        + body + encode_end() + encode_tail(CTX)
    )  # fmt: skip
    events, _ = decode(data)
    got = [e for e in events if isinstance(e, Pages)]
    assert [len(e.pfns) for e in got] == [8192, 8192, 3616]
    mem, applied, _ = replay_events(events, n)
    assert applied == 2 and np.array_equal(mem, pages)


def test_buffer_not_multiple_of_batch():
    """A 1000-page buffer fills in the middle of a listed batch: the rest of
    that batch's pages go in the next COMPRESSED_DATA chunk."""
    rng = np.random.default_rng(6)
    pages = random_pages(rng, 2500)
    body = b"".join(
        encode_body_b(
            np.arange(2500, dtype=np.uint64), pages, Compressor("seed"), buffer_pages=1000
        )
    )
    assert chunk_types(body, 0) == [1024, "CD", 1024, "CD", 452, "CD"]


# ------------------------------------------------------------------ malformed


def b_prefix(codec: str = "xen", p2m: int = 8) -> bytes:
    """Header and a Format A checkpoint 0 that enables compression."""
    w = StreamWriter(p2m, codec=codec)
    return b"".join([w.header(), *w.end_checkpoint(CTX)])


def full_page_xen(n: int) -> bytes:
    return (b"\x80" + b"\x42" * PAGE) * n


def test_b_pfn_listed_twice_in_body():
    pre = b_prefix()
    data = (
        pre
        + encode_pfn_list(np.array([1, 2], np.uint64))
        + encode_pfn_list(np.array([3, 2], np.uint64))
    )
    with pytest.raises(MalformedStream) as ei:
        Decoder().feed(data)
    assert ei.value.offset == len(pre) + 4 + 16 + 4 + 8
    assert "twice in one Format B body" in ei.value.reason


def test_b_same_pfn_in_next_body_is_fine():
    pre = b_prefix()
    one = encode_pfn_list(np.array([2], np.uint64)) + encode_compressed(full_page_xen(1))
    data = pre + one + encode_end() + encode_tail(CTX) + one + encode_end() + encode_tail(CTX)
    events, d = decode(data)
    assert d.checkpoints == 3


def test_b_compressed_length_over_cap_rejected_before_payload():
    pre = b_prefix() + encode_pfn_list(np.array([1], np.uint64))
    d = Decoder(max_compressed=5000)
    with pytest.raises(MalformedStream) as ei:
        d.feed(pre + i32(-12) + u64(5001))  # no payload sent at all
    assert ei.value.offset == len(pre) and "exceeds the cap of 5000" in ei.value.reason
    with pytest.raises(MalformedStream) as ei:
        Decoder().feed(pre + i32(-12) + u64(1 << 62))
    assert ei.value.offset == len(pre)


@pytest.mark.parametrize(
    "name,extra,reason",
    [
        ("nothing listed", i32(-12) + u64(4097) + full_page_xen(1), "no listed page"),
        ("garbage", None, "does not decode"),
        ("more pages than listed", None, "does not decode"),
        ("short body", None, "never arrived"),
    ],
)
def test_b_malformed(name, extra, reason):
    pre = b_prefix()
    if name == "garbage":
        pre += encode_pfn_list(np.array([1], np.uint64))
        extra = encode_compressed(b"\x05\x01\x02")  # RUN of 5 words, 2 bytes present
    elif name == "more pages than listed":
        pre += encode_pfn_list(np.array([1], np.uint64))
        extra = encode_compressed(full_page_xen(2))
    elif name == "short body":
        pre += encode_pfn_list(np.array([1, 2], np.uint64)) + encode_compressed(full_page_xen(1))
        extra = encode_end()
    with pytest.raises(MalformedStream) as ei:
        Decoder().feed(pre + extra)
    assert ei.value.offset == len(pre), ei.value
    assert reason in ei.value.reason


def test_any_announced_cache_size_decodes():
    """The receiver keeps no cache: the size a stream announces is reported,
    never required to match anything (Xen's sender with another cache, or
    ours with a HELLO that said another size, decode alike)."""
    pre = b_prefix("seed")
    d = Decoder()
    d.feed(pre)
    assert d.cache_pages == 8192


def test_empty_compressed_data_chunk_is_accepted_anywhere_in_a_b_body():
    """Xen's restore accepts COMPRESSED_DATA of length 0 (it reads the next
    chunk); it carries no page, even when none is awaited."""
    pre = b_prefix()
    empty = i32(-12) + u64(0)
    data = pre + empty + encode_pfn_list(np.array([1], np.uint64)) + empty
    data += encode_compressed(full_page_xen(1)) + empty + encode_end() + encode_tail(CTX)
    events, _ = decode(data)
    pages = [e for e in events if isinstance(e, Pages)]
    assert len(pages) == 1 and pages[0].pfns.tolist() == [1]
    assert isinstance(events[-1], CheckpointEnd) and events[-1].pages == 1


def test_torn_b_checkpoint_is_not_committed():
    data = golden_bytes("xen")
    events_all, _ = decode(data)
    last_end = [e for e in events_all if isinstance(e, CheckpointEnd)][-2].offset
    d = Decoder()
    events = d.feed(data[: last_end + 40])  # checkpoint 2 torn after its listing
    with pytest.raises(TruncatedStream) as ei:
        d.eof()
    assert ei.value.torn_checkpoint == 2
    mem, applied, _ = replay_events(events, 4)
    assert applied == 2
    assert np.array_equal(mem[2], P2)  # still checkpoint 1's content


def test_none_codec_is_pure_legacy():
    """Codec none: no project tag, no ENABLE_COMPRESSION; xen with the default
    cache: ENABLE_COMPRESSION only; xen with another cache size is announced."""
    for codec, cache, tags in [
        ("none", 8192, []),
        ("xen", 8192, [-13]),
        ("xen", 100, [-1001, -13]),
        ("seed", 8192, [-1001, -13]),
    ]:
        w = StreamWriter(4, codec=codec, cache_pages=cache)
        closing = w.end_checkpoint(CTX)
        got = [struct.unpack_from("<i", bytes(b))[0] for b in closing[:-2]]
        assert got == tags, codec


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_corruption_of_b_stream_never_crashes(data):
    """Flip, insert or delete bytes of a compressed stream: decoded or
    StreamError, never another exception."""
    from xenbind.errors import StreamError

    codec = data.draw(st.sampled_from(["xen", "seed"]))
    raw = bytearray(golden_bytes(codec))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        # favour the compressed parts: they sit after checkpoint 0
        pos = data.draw(st.integers(4096, len(raw) - 1))
        if op == "flip":
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[pos : pos + data.draw(st.integers(1, 8))]
    d, _ = decoder(max_context=1 << 16, max_device_model=1 << 16, max_compressed=1 << 20)
    try:
        d.feed(bytes(raw))
        d.eof()
    except StreamError:
        pass
