"""The Decoder's memory: freed by reference counting, and claims cost what arrives.

Rules checked (xenbind/stream/decoder.py, "Memory" and "Freeing"):

* A dropped Decoder, with its Decompressor, is
  freed at once by reference counting: no reference cycle keeps it for
  Python's cyclic collector. Checked with the collector disabled, after a
  whole Format B stream, mid-payload, and after the decoder raised (also
  after it raised again on later calls). A control shows a weakref does stay
  alive when a cycle is planted, so the check can fail.
* A decoder that raised drops its Decompressor at once, even while its
  caller keeps it; it keeps raising the same error (later raises carry no
  events). The LAST_CHECKPOINT checkpoint drops the Decompressor too (no page
  may follow); ``close()`` drops everything; ``eof()`` stays a probe.
* A COMPRESSED_DATA buffer grows with the bytes that arrive: a 64 MiB claim
  followed by 100 bytes costs well under 1 MiB (tracemalloc, which sees numpy
  buffers: a control shows the whole payload when it does arrive); fed in
  small pieces the buffer stays within a small multiple of what arrived and
  grows geometrically (a few reallocations, not one per piece); payloads
  split at every kind of boundary decode exactly as when fed whole.
"""

from __future__ import annotations

import gc
import struct
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from tests.xenbind.stream.common import decoder as image_decoder
from tests.xenbind.stream.common import merge_pages, random_pages, replay_events, take
from xenbind.errors import StreamError
from xenbind.stream import (
    CheckpointEnd,
    Decoder,
    MalformedStream,
    StreamWriter,
    TruncatedStream,
)
from xenbind.stream.decoder import GROW_FACTOR, GROW_MIN
from xenbind.stream.encoder import Buffer
from xenbind.stream.format import (
    DEFAULT_MAX_COMPRESSED,
    DEVICE_MODEL_SIGNATURE,
    TAG_CODEC,
    TAG_COMPRESSED_DATA,
    TAG_ENABLE_COMPRESSION,
)
from xenbind.types import Context

PAGE = 4096
CTX = Context((1, 2, 3), b"hvm", b"qemu")
P2M = 256
MiB = 1 << 20


def zero_base(pfns: np.ndarray, out: np.ndarray) -> None:
    """A base source for the tests that only count (module level: no cycle)."""
    out[: len(pfns)] = 0


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Only reference counting frees objects inside."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def join(bufs: list) -> tuple[bytes, list[tuple[int, int]]]:
    """The stream, and (offset, payload length) of each COMPRESSED_DATA chunk
    in it (the encoder writes each such chunk as one buffer)."""
    out, payloads, at = [], [], 0
    for b in bufs:
        raw = bytes(memoryview(b))
        if raw[:4] == struct.pack("<i", TAG_COMPRESSED_DATA):
            (n,) = struct.unpack_from("<Q", raw, 4)
            assert n == len(raw) - 12
            payloads.append((at, n))
        out.append(raw)
        at += len(raw)
    return b"".join(out), payloads


def seed_stream_and_payloads(
    *, last: bool = False, pages: int = 64, checkpoints: int = 3
) -> tuple[bytes, list[tuple[int, int]]]:
    """A Format B stream with the seed codec: checkpoint 0 in Format A, then
    Format B bodies whose pages change a little each time (cache hits and
    deltas as well as misses); several COMPRESSED_DATA chunks per body."""
    rng = np.random.default_rng(7)
    w = StreamWriter(P2M, codec="seed", cache_pages=128, buffer_pages=16)
    pfns = np.arange(pages, dtype=np.uint64) * 3
    mem = random_pages(rng, pages)
    bufs: list[Buffer] = [w.header()]
    for i in range(checkpoints):
        mem[:, (i * 64) % PAGE] ^= 0x5A
        bufs += w.checkpoint(pfns, mem, CTX, last=last and i == checkpoints - 1)
    return join(bufs)


def seed_stream(**kw) -> bytes:
    return seed_stream_and_payloads(**kw)[0]


def tail() -> bytes:
    return (
        struct.pack("<QQQ", 1, 2, 3)
        + struct.pack("<I", 0)
        + DEVICE_MODEL_SIGNATURE
        + struct.pack("<I", 0)
    )


def format_b_prefix(codec_id: int = 2, cache: int = 4) -> bytes:
    """Header, an empty Format A checkpoint enabling the codec (seed by
    default), the start of a Format B body listing PFN 5."""
    return (
        struct.pack("<Q", 64)
        + struct.pack("<iII", TAG_CODEC, codec_id, cache)
        + struct.pack("<i", TAG_ENABLE_COMPRESSION)
        + struct.pack("<i", 0)
        + tail()
        + struct.pack("<iQ", 1, 5)
    )


def claim(n: int) -> bytes:
    return struct.pack("<iQ", TAG_COMPRESSED_DATA, n)


# ------------------------------------------------------------------ freeing


def test_control_a_planted_cycle_keeps_the_decoder_alive() -> None:
    """The instrument: with a cycle (a bound method kept on the decoder, the
    old bug) the weakref outlives ``del`` while the collector is off."""
    with no_cyclic_gc():
        d = Decoder(base=zero_base)
        d.feed(seed_stream())
        d.planted = d.feed  # type: ignore[attr-defined]
        ref = weakref.ref(d)
        del d
        assert ref() is not None
        gc.collect()
        assert ref() is None


@pytest.mark.parametrize("end", ["eof", "no-eof"])
def test_dropped_decoder_is_freed_by_refcount(end: str) -> None:
    data = seed_stream()
    with no_cyclic_gc():
        d = Decoder(base=zero_base)
        events = d.feed(data)
        assert sum(isinstance(e, CheckpointEnd) for e in events) == 3
        assert d.format == "B" and d.codec == "seed"
        if end == "eof":
            d.eof()
        ref, cache_ref = weakref.ref(d), weakref.ref(d._decompressor)
        del d
        assert ref() is None, "the Decoder lives on after del (a reference cycle)"
        assert cache_ref() is None, "its Decompressor lives on after del"


def test_decoder_dropped_inside_a_payload_is_freed() -> None:
    """Dropped with a COMPRESSED_DATA payload half-buffered (the receiver's
    session ends mid-chunk)."""
    data, payloads = seed_stream_and_payloads()
    at, n = payloads[len(payloads) // 2]
    assert n > 7
    cut = at + 12 + 7  # inside the payload
    with no_cyclic_gc():
        d = Decoder(base=zero_base)
        d.feed(data[:cut])
        with pytest.raises(TruncatedStream):
            d.eof()
        ref, cache_ref = weakref.ref(d), weakref.ref(d._decompressor)
        del d
        assert ref() is None and cache_ref() is None


def corrupt_payload_stream() -> tuple[bytes, int]:
    """A seed stream whose first Format B COMPRESSED_DATA payload does not
    decode; and that chunk's offset."""
    raw, payloads = seed_stream_and_payloads()
    data = bytearray(raw)
    at = payloads[0][0]
    # a seed payload starts with a marker record (int16 -100 or -101): make
    # it a negative offset that is no marker
    assert struct.unpack_from("<h", data, at + 12)[0] in (-100, -101)
    data[at + 12 : at + 14] = struct.pack("<h", -7)
    return bytes(data), at


def test_decoder_that_raised_is_freed_and_drops_its_decompressor() -> None:
    data, at = corrupt_payload_stream()
    with no_cyclic_gc():
        d = Decoder(base=zero_base)
        cache_ref = None
        try:
            d.feed(data[:at])  # everything before the bad chunk
            cache_ref = weakref.ref(d._decompressor)
            d.feed(data[at:])
        except MalformedStream as e:
            first = e
        else:
            raise AssertionError("the corrupt payload decoded")
        assert first.offset == at and "does not decode" in first.reason
        # dead at once: the Decompressor is gone while the decoder is still held
        assert cache_ref is not None and cache_ref() is None
        # and it keeps raising the same error, with no events of its own
        for call in ("feed", "eof", "feed empty"):
            with pytest.raises(MalformedStream) as ei:
                if call == "eof":
                    d.eof()
                else:
                    d.feed(b"" if call == "feed empty" else b"\0")
            assert type(ei.value) is type(first)
            assert (ei.value.offset, ei.value.reason, str(ei.value)) == (
                first.offset,
                first.reason,
                str(first),
            )
            assert ei.value.events == [] and ei.value is not first
        del first, ei
        ref = weakref.ref(d)
        del d
        assert ref() is None, "a decoder that raised lives on after del"


def test_dead_decoder_error_keeps_no_traceback() -> None:
    """What a dead decoder keeps to raise again holds no frames (which would
    hold the decoder and the caller's buffers)."""
    d = Decoder(base=zero_base)
    with pytest.raises(MalformedStream):
        d.feed(struct.pack("<Q", 0))  # p2m_size 0
    assert d._error is not None and d._error.__traceback__ is None


def test_last_checkpoint_drops_the_decompressor() -> None:
    data = seed_stream(last=True)
    d = Decoder(base=zero_base)
    head = data[: len(data) - 1]
    d.feed(head)
    cache_ref = weakref.ref(d._decompressor)
    events = d.feed(data[-1:])
    assert d.last and any(isinstance(e, CheckpointEnd) for e in events)
    assert cache_ref() is None, "the Decompressor outlives the LAST_CHECKPOINT checkpoint"
    d.eof()  # a clean end
    with pytest.raises(MalformedStream, match="after the checkpoint that carried LAST"):
        d.feed(b"\0")


def test_eof_is_a_probe_and_close_drops_everything() -> None:
    data = seed_stream()
    whole, _ = decode_in(data, [len(data)])
    d, img = image_decoder()
    mid = len(data) // 2
    got = take(img, d.feed(data[:mid]))
    with pytest.raises(TruncatedStream):
        d.eof()
    got += take(img, d.feed(data[mid:]))  # eof() changed nothing
    d.eof()
    assert merge_pages(got) == merge_pages(whole)
    cache_ref = weakref.ref(d._decompressor)
    d.close()
    assert cache_ref() is None
    d.close()  # idempotent
    d.eof()  # still answers: ended between checkpoints
    with pytest.raises(ValueError, match="closed"):
        d.feed(b"\0")


# ------------------------------------------------------------------ growing buffer


def peak_of(fn: Callable[[], object]) -> int:
    """Peak traced memory (bytes above the start) while ``fn`` runs."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            fn()
        except StreamError:
            pass
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_claim_of_64_mib_then_100_bytes_costs_what_arrived() -> None:
    assert DEFAULT_MAX_COMPRESSED >= 64 * MiB
    d = Decoder(base=zero_base)  # default caps: the claim is allowed
    d.feed(format_b_prefix())
    piece = claim(64 * MiB) + bytes(range(100))
    peak = peak_of(lambda: d.feed(piece))
    assert peak < MiB, f"a 64 MiB claim with 100 bytes sent cost {peak >> 10} KiB"
    with pytest.raises(TruncatedStream) as ei:
        d.eof()
    assert f"100 of {64 * MiB} bytes" in ei.value.reason


def test_control_a_payload_that_arrives_is_seen() -> None:
    """The instrument sees the buffer once the bytes are there: 8 MiB fed in
    1 MiB pieces shows at least 8 MiB, and less than growing could cost."""
    n = 8 * MiB
    d = Decoder(base=zero_base)
    d.feed(format_b_prefix() + claim(n))
    body = np.zeros(MiB, np.uint8)

    def run() -> None:
        for _ in range(n // MiB):
            d.feed(body.data)  # the last piece completes it; zeros do not decode

    peak = peak_of(run)
    assert n <= peak < (1 + GROW_FACTOR) * n, f"peak {peak >> 10} KiB for {n >> 20} MiB"


class _CountingDecoder(Decoder):
    grows = 0

    def _grow(self, arriving: int) -> None:
        self.grows += 1
        super()._grow(arriving)


def test_buffer_grows_geometrically_within_a_multiple_of_what_arrived() -> None:
    d = _CountingDecoder(base=zero_base)
    d.feed(format_b_prefix() + claim(64 * MiB))
    sent = 0
    piece = bytes(4096)

    def run() -> None:
        nonlocal sent
        while sent < 6 * MiB:
            d.feed(piece)
            sent += len(piece)

    worst = peak_of(run)
    # 4 KiB pieces: 1536 feeds, but the buffer grew GROW_FACTOR-fold from GROW_MIN
    steps = 1
    while GROW_MIN * GROW_FACTOR ** (steps - 1) < sent:
        steps += 1
    assert d.grows == steps, d.grows
    # while growing, the old and the new buffer coexist: (1 + GROW_FACTOR) x what arrived
    limit = (1 + GROW_FACTOR) * sent + GROW_MIN
    assert worst < limit, f"peak {worst >> 10} KiB for {sent >> 10} KiB sent"


def test_payload_that_arrives_in_one_feed_is_allocated_once() -> None:
    data, payloads = seed_stream_and_payloads()
    d = _CountingDecoder(base=zero_base)
    d.feed(data)
    assert len(payloads) > 3 and d.grows == len(payloads)


def big_payload_stream() -> tuple[bytes, np.ndarray, list[int]]:
    """A seed stream whose Format B bodies carry COMPRESSED_DATA payloads of
    about 2 MiB (random pages do not compress), several times GROW_MIN."""
    rng = np.random.default_rng(11)
    n = 512
    w = StreamWriter(1024, codec="seed", cache_pages=1024, buffer_pages=n)
    pfns = np.arange(n, dtype=np.uint64) * 2
    mem = random_pages(rng, n)
    bufs = [w.header()] + w.checkpoint(pfns[:1], mem[:1], CTX)
    bufs += w.checkpoint(pfns, mem, CTX)  # misses: whole pages
    mem2 = mem.copy()
    mem2[::3, ::97] ^= 1
    bufs += w.checkpoint(pfns, mem2, CTX)  # deltas: a small payload
    expect = np.zeros((1024, PAGE), np.uint8)
    expect[pfns.astype(np.intp)] = mem2
    data, payloads = join(bufs)
    return data, expect, [n for _, n in payloads]


def decode_in(data: bytes, sizes: list[int]) -> tuple[list, Decoder]:
    """Feed ``data`` in pieces of the given sizes, cycling; then eof()."""
    d, img = image_decoder()
    out: list = []
    i = k = 0
    while i < len(data):
        step = sizes[k % len(sizes)]
        out += take(img, d.feed(memoryview(data)[i : i + step]))
        i += step
        k += 1
    d.eof()
    return out, d


@pytest.mark.parametrize(
    "sizes",
    [
        [1 << 30],
        [MiB],
        [4096],
        [1000, 65536 + 3, 1],
        [GROW_MIN - 1, 2 * GROW_MIN + 1, 13],
        [300_000, 5],
    ],
    ids=["whole", "1MiB", "4KiB", "mixed", "around-GROW_MIN", "300k+5"],
)
def test_big_payloads_decode_the_same_however_split(sizes: list[int]) -> None:
    data, expect, lengths = big_payload_stream()
    assert max(lengths) > 16 * GROW_MIN  # the buffer has to grow several times
    whole, _ = decode_in(data, [len(data)])
    events, _ = decode_in(data, sizes)
    assert merge_pages(events) == merge_pages(whole)
    mem, applied, _ = replay_events(events, 1024)
    assert applied == 3
    assert np.array_equal(mem, expect)
