"""xenbind.wirecomp: the wire segments round-trip, and every rule of the
decoder refuses what it must with the segment's offset, keeping nothing big."""

from __future__ import annotations

import os

import lz4.block
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from xenbind.errors import ProtocolError
from xenbind.wirecomp import (
    KIND_LZ4,
    KIND_RAW,
    KIND_ZSTD,
    MAX_SEGMENT_RAW,
    SEGMENT,
    Decoder,
    Encoder,
    WireError,
    max_stored,
)


def wire_of(segments: list) -> bytes:
    return b"".join(bytes(s) for s in segments)


def decode(codec: str, wire: bytes, cut: int = 0, offset: int = 0) -> bytes:
    d = Decoder(codec, offset=offset)
    out = bytearray()
    step = cut or len(wire) or 1
    for at in range(0, len(wire), step):
        for piece in d.feed(wire[at : at + step]):
            out += piece
    assert not d.mid_segment
    return bytes(out)


def segment(kind: int, payload: bytes, raw: int, reserved: bytes = b"\0\0\0") -> bytes:
    return SEGMENT.pack(kind, reserved, len(payload), raw) + payload


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["zstd", "lz4"]),
    st.lists(st.binary(max_size=3000), min_size=1, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.integers(1, 5000),
)
def test_any_buffers_any_choice_any_split_round_trip(codec, buffers, compress, cut) -> None:
    enc = Encoder(codec)
    wire = b""
    for i, b in enumerate(buffers):
        wire += wire_of(enc.encode([b, b * 3], compress[i]))
    expect = b"".join(b + b * 3 for b in buffers)
    assert decode(codec, wire, cut) == expect
    assert enc.counts.raw_bytes == len(expect)
    assert enc.counts.wire_bytes == len(wire)


def test_big_input_is_cut_into_segments_and_shrinks() -> None:
    data = os.urandom(4096) * 700  # 2.8 MiB, very repetitive: three segments
    for codec, kind in (("zstd", KIND_ZSTD), ("lz4", KIND_LZ4)):
        enc = Encoder(codec)
        segs = enc.encode([data], True)
        kinds = [SEGMENT.unpack_from(segs[i])[0] for i in range(0, len(segs), 2)]
        raws = [SEGMENT.unpack_from(segs[i])[3] for i in range(0, len(segs), 2)]
        assert kinds == [kind] * 3 and raws == [
            MAX_SEGMENT_RAW,
            MAX_SEGMENT_RAW,
            len(data) - 2 * MAX_SEGMENT_RAW,
        ]
        assert enc.counts.wire_bytes < len(data) / 50
        assert decode(codec, wire_of(segs), 65536) == data


def test_incompressible_and_tiny_pieces_go_raw() -> None:
    enc = Encoder("zstd")
    noise = os.urandom(100_000)
    segs = enc.encode([noise], True) + enc.encode([b"HB"], True)
    assert [SEGMENT.unpack_from(segs[i])[0] for i in range(0, len(segs), 2)] == [KIND_RAW, KIND_RAW]
    assert enc.counts.compressed_segments == 0
    assert (
        enc.counts.wire_bytes == len(noise) + 2 + 2 * SEGMENT.size
    )  # never larger than raw + headers
    assert decode("zstd", wire_of(segs)) == noise + b"HB"


def test_raw_segments_reference_the_callers_buffers() -> None:
    buf = bytearray(b"x" * 5000)
    segs = Encoder("lz4").encode([buf], False)
    assert isinstance(segs[1], memoryview) and segs[1].obj is buf  # no copy of the stream


def test_raw_bytes_come_out_as_they_arrive_and_may_go_direct() -> None:
    data = bytes(range(256)) * 40
    wire = segment(KIND_RAW, data, len(data))
    d = Decoder("zstd")
    assert d.feed(wire[:20]) == [wire[12:20]]  # header + 8 bytes: the 8 bytes, at once
    assert d.raw_left == len(data) - 8
    d.skip_raw(100)  # received straight into the stream decoder's buffer
    out = d.feed(wire[20 + 100 :])
    assert b"".join(out) == data[108:]
    assert d.raw_left == 0 and not d.mid_segment and d.counts.segments == 1
    assert d.counts.raw_bytes == len(data) and d.counts.wire_bytes == len(wire)
    with pytest.raises(ValueError):
        d.skip_raw(1)


def bad(codec: str, wire: bytes, match: str, offset: int = 1000) -> WireError:
    good = segment(KIND_RAW, b"ok", 2)
    d = Decoder(codec, offset=offset)
    with pytest.raises(WireError, match=match) as e:
        d.feed(good + wire)
    assert str(e.value).startswith(f"byte {offset + len(good)}: wire segment: ")
    assert b"".join(e.value.out) == b"ok"  # what came whole before it
    with pytest.raises(ProtocolError) as again:
        d.feed(good)  # dead: the same error, nothing decoded
    assert str(again.value) == str(e.value)
    return e.value


def test_header_rules() -> None:
    z = zstandard.ZstdCompressor().compress(b"a" * 1000)
    bad("lz4", segment(KIND_ZSTD, z, 1000), "zstd in a session that negotiated lz4")
    bad("zstd", segment(7, b"x", 1), "unknown kind 7")
    bad("zstd", segment(KIND_RAW, b"x", 1, reserved=b"\0\1\0"), "reserved bytes 000100")
    bad("zstd", SEGMENT.pack(KIND_RAW, bytes(3), 0, 0), "raw length 0 outside")
    bad("zstd", SEGMENT.pack(KIND_ZSTD, bytes(3), 10, MAX_SEGMENT_RAW + 1), "raw length")
    bad("zstd", SEGMENT.pack(KIND_RAW, bytes(3), 5, 6), "raw segment stores 5 bytes for 6")
    cap = max_stored(KIND_ZSTD, 1000)
    bad("zstd", SEGMENT.pack(KIND_ZSTD, bytes(3), cap + 1, 1000), f"outside 1..{cap}")


def test_a_huge_claim_costs_only_what_arrived() -> None:
    d = Decoder("zstd")
    d.feed(
        SEGMENT.pack(KIND_ZSTD, bytes(3), max_stored(KIND_ZSTD, MAX_SEGMENT_RAW), MAX_SEGMENT_RAW)
    )
    d.feed(b"\0" * 100)
    assert len(d._payload) == 100 and d.mid_segment


def test_zstd_payload_rules() -> None:
    data = b"abc" * 2000
    c = zstandard.ZstdCompressor(write_checksum=True)
    z = c.compress(data)
    bad("zstd", segment(KIND_ZSTD, z, len(data) + 1), "content size 6000, the header says 6001")
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    bad("zstd", segment(KIND_ZSTD, nosize, len(data)), "records no content size")
    bad("zstd", segment(KIND_ZSTD, z + b"!", len(data)), "unused data")
    bad("zstd", segment(KIND_ZSTD, z + z, len(data)), "unused data")
    broken = bytearray(z)
    broken[-6] ^= 0xFF  # in the last block or the checksum
    bad("zstd", segment(KIND_ZSTD, bytes(broken), len(data)), "zstd: ")
    bad("zstd", segment(KIND_ZSTD, b"not a frame", 11), "zstd")


def test_lz4_payload_rules() -> None:
    data = b"xyz" * 3000
    b = lz4.block.compress(data, store_size=False)
    bad("lz4", segment(KIND_LZ4, b, len(data) + 10), "decoded to 9000 bytes, not 9010")
    bad("lz4", segment(KIND_LZ4, b, len(data) - 10), "lz4: ")
    bad("lz4", segment(KIND_LZ4, b"\xff" * 50, 1000), "lz4")


def test_encoder_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="unknown wire codec"):
        Encoder("brotli")
    with pytest.raises(ValueError, match="level 99"):
        Encoder("zstd", level=99)
    with pytest.raises(ValueError, match="unknown wire codec"):
        Decoder("none")
