"""Hostile input for the disk mirror stream decoder (hypothesis).

* Arbitrary bytes (with and without a valid header in front) never raise
  anything but DiskStreamError, never yield a Write or Zero outside its disk,
  unaligned, or larger than max_write, and the decoder never holds more than
  one record (max_write + a head).
* Valid streams with one byte flipped, or cut, either decode to events that
  keep the rules or raise DiskStreamError; a flip in a sealed epoch's records
  is always caught by that epoch's SEAL (count or CRC) before the SEAL event.
* Valid streams cut at arbitrary points decode to exactly what was encoded.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenbind import diskstream as ds

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZES = [256 << 10, 8 << 10]
MAX_WRITE = 16 << 10


def check(data: bytes, cuts: list[int]) -> list[ds.Event]:
    d = ds.Decoder(max_write=MAX_WRITE, max_disk_bytes=1 << 30)
    events: list[ds.Event] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for a, b in zip(points, points[1:], strict=False):
            events += d.feed(data[a:b])
            assert d.buffered <= MAX_WRITE + ds.RECORD_HEAD_SIZE
    except ds.DiskStreamError:
        pass
    sizes = None
    for ev in events:
        if isinstance(ev, ds.Header):
            sizes = ev.disk_sizes
            sector = ev.sector
        elif isinstance(ev, ds.Write | ds.Zero):
            assert sizes is not None
            n = len(ev.data) if isinstance(ev, ds.Write) else ev.length
            assert 0 <= ev.disk < len(sizes)
            assert 0 < n and ev.offset % sector == 0 and n % sector == 0
            assert ev.offset + n <= sizes[ev.disk]
            if isinstance(ev, ds.Write):
                assert n <= MAX_WRITE
    return events


def valid_stream(ops: list[tuple[int, int, int, int]]) -> tuple[bytes, list[ds.Event]]:
    enc = ds.Encoder(SIZES)
    out: list[bytes] = [enc.header()]
    for kind, disk, sector, count in ops:
        size = SIZES[disk]
        off = (sector * 512) % size
        n = min(count * 512, size - off, MAX_WRITE)
        if kind == 0:
            out += [bytes(x) for x in enc.write(disk, off, bytes([sector % 256]) * n)]
        elif kind == 1:
            out.append(enc.zero(disk, off, n))
        else:
            out.append(enc.seal())
    out.append(enc.seal())
    data = b"".join(out)
    return data, ds.Decoder(max_write=MAX_WRITE).feed(data)


OPS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 1), st.integers(0, 1000), st.integers(1, 40)),
    max_size=20,
)


@SETTINGS
@given(st.binary(max_size=4096), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    check(data, cuts)


@SETTINGS
@given(st.binary(max_size=4096), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_arbitrary_records_after_a_valid_header(data: bytes, cuts: list[int]) -> None:
    check(ds.Encoder(SIZES).header() + data, cuts)


@SETTINGS
@given(OPS, st.integers(0, 1 << 30), st.integers(1, 255), st.lists(st.integers(0, 1 << 20)))
def test_flipped_byte(
    ops: list[tuple[int, int, int, int]], where: int, xor: int, cuts: list[int]
) -> None:
    data, good = valid_stream(ops)
    pos = where % len(data)
    bad = bytearray(data)
    bad[pos] ^= xor
    events = check(bytes(bad), cuts)
    # Every SEAL that came out sealed exactly the records the encoder wrote:
    # a flipped byte inside a sealed epoch never passes its SEAL.
    seals_good = [e for e in good if isinstance(e, ds.Seal)]
    for ev in events:
        if isinstance(ev, ds.Seal):
            assert ev in seals_good
    i = 0
    for ev in events:  # the records before the last SEAL that came out are the encoded ones
        if isinstance(ev, ds.Seal):
            i = events.index(ev) + 1
    assert events[:i] == good[:i]


@SETTINGS
@given(OPS, st.lists(st.integers(0, 1 << 20), max_size=12))
def test_valid_streams_any_split(ops: list[tuple[int, int, int, int]], cuts: list[int]) -> None:
    data, good = valid_stream(ops)
    assert check(data, cuts) == good
