"""The disk mirror stream (xenbind/diskstream.py): round trips and every rule.

* Streams written by the Encoder decode to the same records, epoch by epoch,
  whatever the split of the bytes (byte by byte included).
* Each rule of the layout is refused at the offending item's offset, with a
  reason naming what was wrong: a write outside the disk, unaligned, larger
  than max_write, on a missing disk, unknown type or flags, a SEAL out of
  sequence, with a wrong count or CRC, a bad header.
* A dead decoder keeps raising the same error; eof() names the torn epoch.
* Memory: a WRITE claiming max_write and sending a few bytes holds only what
  arrived.
"""

from __future__ import annotations

import struct

import pytest

from xenbind import diskstream as ds

SIZES = [1 << 20, 64 << 10]


def build() -> tuple[bytes, list[ds.Event]]:
    enc = ds.Encoder(SIZES)
    out: list[bytes | bytearray | memoryview] = [enc.header()]
    out += enc.write(0, 4096, b"a" * 4096)
    out += enc.write(1, 0, b"b" * 512, sync=True)
    out.append(enc.zero(0, 0, 8192))
    out.append(enc.seal())
    out.append(enc.seal())  # an empty epoch
    out += enc.write(0, (1 << 20) - 512, b"c" * 512)
    out.append(enc.seal())
    data = b"".join(bytes(x) for x in out)
    return data, ds.Decoder().feed(data)


def test_round_trip_and_splits() -> None:
    data, events = build()
    assert events[0] == ds.Header(9, tuple(SIZES), 0)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Header", "Write", "Write", "Zero", "Seal", "Seal", "Write", "Seal"]
    assert events[2] == ds.Write(1, 0, b"b" * 512, True)
    assert events[4] == ds.Seal(0, 3, 4096 + 512 + 8192, events[4].crc)  # type: ignore[union-attr]
    assert [e.epoch for e in events if isinstance(e, ds.Seal)] == [0, 1, 2]
    for step in (1, 7, 33, 4097):
        d = ds.Decoder()
        got: list[ds.Event] = []
        for i in range(0, len(data), step):
            got += d.feed(data[i : i + step])
        assert got == events
        d.eof()


def _stream_with(head: bytes, data: bytes = b"") -> bytes:
    return ds.Encoder(SIZES).header() + head + data


def _head(kind: int, disk: int = 0, flags: int = 0, a: int = 0, b: int = 0, c: int = 0) -> bytes:
    return ds.RECORD_HEAD.pack(kind, disk, flags, a, b, c)


HDR = len(ds.Encoder(SIZES).header())


@pytest.mark.parametrize(
    ("head", "at", "words"),
    [
        (_head(ds.WRITE, 0, 0, 1 << 20, 512), HDR + 8, "outside the disk"),
        (_head(ds.WRITE, 0, 0, (1 << 20) - 512, 1024), HDR + 8, "outside the disk"),
        (_head(ds.ZERO, 1, 0, 0, 128 << 10), HDR + 8, "outside the disk"),
        (_head(ds.WRITE, 0, 0, (1 << 64) - 512, 1024), HDR + 8, "outside the disk"),
        (_head(ds.WRITE, 0, 0, 100, 512), HDR + 8, "not 512-byte aligned"),
        (_head(ds.WRITE, 0, 0, 0, 100), HDR + 8, "not 512-byte aligned"),
        (_head(ds.ZERO, 0, 0, 0, 0), HDR + 8, "not 512-byte aligned"),
        (_head(ds.WRITE, 2, 0, 0, 512), HDR + 4, "on disk 2"),
        (_head(ds.WRITE, 0, 2, 0, 512), HDR + 6, "unknown flags"),
        (_head(ds.ZERO, 0, 1, 0, 512), HDR + 6, "unknown flags"),
        (_head(ds.WRITE, 0, 0, 0, 512, 5), HDR + 24, "reserved"),
        (_head(9), HDR, "unknown record type 9"),
        (_head(ds.SEAL, 0, 0, 1, 0, 0), HDR, "SEAL of epoch 1: the open epoch is 0"),
        (_head(ds.SEAL, 0, 0, 0, 1, 0), HDR, "counts 1 records, 0 arrived"),
        (_head(ds.SEAL, 0, 0, 0, 0, 7), HDR, "CRC"),
        (_head(ds.SEAL, 1, 0, 0, 0, 0), HDR, "must be 0"),
    ],
)
def test_rules(head: bytes, at: int, words: str) -> None:
    d = ds.Decoder()
    with pytest.raises(ds.DiskStreamError) as e:
        d.feed(_stream_with(head))
    assert e.value.offset == at
    assert words in e.value.reason
    with pytest.raises(ds.DiskStreamError) as again:  # dead: the same error again
        d.feed(b"")
    assert (again.value.offset, again.value.reason) == (at, e.value.reason)


def test_write_larger_than_max_write() -> None:
    d = ds.Decoder(max_write=64 << 10)
    with pytest.raises(ds.DiskStreamError, match="larger than max_write 65536"):
        d.feed(_stream_with(_head(ds.WRITE, 0, 0, 0, 128 << 10)))
    # the same write is fine at the default cap
    enc = ds.Encoder(SIZES)
    data = enc.header() + b"".join(bytes(x) for x in enc.write(0, 0, bytes(128 << 10)))
    assert isinstance(ds.Decoder().feed(data)[-1], ds.Write)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (b"\x89RMS\r\n\x1a\n" + bytes(16), "bad magic"),
        (struct.pack("<8sHHIQ", ds.MAGIC, 2, 9, 1, 0), "version 2"),
        (struct.pack("<8sHHIQ", ds.MAGIC, 1, 8, 1, 0), "sector_shift 8"),
        (struct.pack("<8sHHIQ", ds.MAGIC, 1, 9, 0, 0), "0 disks"),
        (struct.pack("<8sHHIQ", ds.MAGIC, 1, 9, 65, 0), "65 disks"),
        (struct.pack("<8sHHIQQ", ds.MAGIC, 1, 9, 1, 0, 1000), "size 1000"),
        (struct.pack("<8sHHIQQ", ds.MAGIC, 1, 9, 1, 0, 0), "size 0"),
        (struct.pack("<8sHHIQQ", ds.MAGIC, 1, 9, 1, 0, 1 << 50), "size 1125899906842624"),
    ],
)
def test_bad_headers(header: bytes, words: str) -> None:
    with pytest.raises(ds.DiskStreamError, match=words):
        ds.Decoder().feed(header)


def test_eof_names_the_torn_epoch() -> None:
    enc = ds.Encoder(SIZES)
    d = ds.Decoder()
    with pytest.raises(ds.TruncatedDiskStream) as e:
        d.eof()
    assert e.value.torn_epoch is None
    d.feed(enc.header())
    d.eof()  # nothing written: a clean end
    d.feed(b"".join(bytes(x) for x in enc.write(0, 0, bytes(512))))
    with pytest.raises(ds.TruncatedDiskStream, match="epoch 0 is torn") as e:
        d.eof()
    assert e.value.torn_epoch == 0
    d.feed(enc.seal())
    d.eof()
    d.feed(enc.zero(0, 0, 512)[:10])
    with pytest.raises(ds.TruncatedDiskStream, match="inside a record: epoch 1"):
        d.eof()


def test_a_claim_costs_what_arrives() -> None:
    d = ds.Decoder(max_write=4 << 20)
    d.feed(_stream_with(_head(ds.WRITE, 0, 0, 0, 1 << 20), b"x" * 100))
    assert d.buffered == 100
    d.feed(b"y" * 1000)
    assert d.buffered == 1100


def test_encoder_refuses_what_the_decoder_would() -> None:
    enc = ds.Encoder(SIZES)
    for args in [(0, 1 << 20, b"x" * 512), (0, 1, b"x" * 512), (0, 0, b"x" * 100), (5, 0, b"")]:
        with pytest.raises(ValueError):
            enc.write(*args)
    with pytest.raises(ValueError):
        ds.Encoder([1000])


# -- the checksum --------------------------------------------------------------


def test_crc32_is_zlibs_for_every_kind_of_buffer():
    import os
    import zlib

    import numpy as np

    data = os.urandom(3 * 4096 + 17)
    arr = np.frombuffer(bytearray(data), dtype=np.uint8)
    cases = [
        data,
        bytearray(data),
        memoryview(data),  # read-only: zlib's own
        memoryview(bytearray(data))[5:],
        arr.reshape(-1, 1)[:4096],
        b"",
        bytearray(),
    ]
    for value in (0, 1, 0xFFFFFFFF, 0x12345678):
        for c in cases:
            assert ds.crc32(c, value) == zlib.crc32(c, value), (type(c), value)
    strided = memoryview(bytearray(data))[::2]  # zlib refuses it; so does crc32
    with pytest.raises(BufferError):
        zlib.crc32(strided)
    with pytest.raises(BufferError):
        ds.crc32(strided)
    # continued over parts: the SEAL's CRC of a stream sent in pieces
    crc = 0
    for k in range(0, len(data), 1000):
        crc = ds.crc32(data[k : k + 1000], crc)
    assert crc == zlib.crc32(data)


def test_crc32_takes_isal_where_debian_installs_it():
    import ctypes.util

    if ctypes.util.find_library("isal") is None:
        pytest.skip("libisal2 is not installed (scripts/install-system-deps installs it)")
    assert ds._ISAL is not None
