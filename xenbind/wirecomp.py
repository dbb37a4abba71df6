"""Second-stage compression of a session's stream on the wire, sans-IO.

The legacy stream a session carries (header, pages, checkpoints, DISK
chunks, HEARTBEATs) is already compressed page by page against the page
cache (xenbind.compress); what is left in it is redundancy across pages and
within the pages sent whole (the initial copy, cache misses). When the HELLO
offers it and the ACCEPT picks it (docs/protocol.md, "Wire compression"),
every byte the sender writes after the ACCEPT is a sequence of segments,
each a piece of the stream, compressed or not::

    offset  size    field
    0       1       uint8 kind: KIND_RAW (the payload is the stream bytes),
                    KIND_ZSTD (one zstd frame that records its content size),
                    KIND_LZ4 (one LZ4 block, no size prefix)
    1       3       reserved, zero
    4       4       uint32 stored: the payload's length, 1 .. max_stored(raw)
    8       4       uint32 raw: the stream bytes it decodes to, 1 .. MAX_SEGMENT_RAW
    12      stored  payload

Segments are independent (no history spans two): a segment decodes alone,
so a decoder's memory is one segment, and a sender may compress one and not
the next (KIND_RAW is always allowed, whatever the codec; ``auto`` in
remusd.link uses it while the link is not the bottleneck). A segment may
end anywhere in the stream: the stream's own decoder does not care where.
The receiver-to-sender frames (ACK, HEARTBEAT...) are never compressed.

Rules kept here:
- A segment decodes to exactly ``raw`` bytes, or the decoder raises
  ``WireError`` (a ``ProtocolError``) naming the byte offset of the
  segment's header in the connection and carrying the stream bytes decoded
  before it in the same call; after an error the decoder is dead (every
  later call raises the same error, with nothing decoded).
- Memory: the decoder buffers at most one segment (12 + max_stored bytes,
  checked before the payload is buffered) and allocates at most ``raw``
  bytes to decode it: a zstd frame must record its content size, equal to
  ``raw``, before anything is decompressed; the window is capped at
  MAX_ZSTD_WINDOW. No ratio of claimed to sent bytes costs more than one
  segment.
- Only the negotiated codec's kind (and KIND_RAW) is accepted; reserved
  bytes must be zero; a zstd payload is exactly one frame, nothing after it.
- The encoder sends a piece raw when compressing it did not make it
  smaller: a segment is never larger than its raw piece plus the header.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import lz4.block
import zstandard

from .errors import ProtocolError

#: Segment header: kind, 3 reserved bytes, stored length, raw length.
SEGMENT = struct.Struct("<B3sII")
KIND_RAW = 0  # payload = the stream bytes themselves
KIND_ZSTD = 1  # payload = one zstd frame with its content size (and checksum)
KIND_LZ4 = 2  # payload = one LZ4 block (lz4.block, store_size=False)
KIND_NAMES = {KIND_RAW: "raw", KIND_ZSTD: "zstd", KIND_LZ4: "lz4"}

#: The codecs a session may negotiate, by the name HELLO and ACCEPT use.
CODECS = {"zstd": KIND_ZSTD, "lz4": KIND_LZ4}

#: The largest piece of stream one segment carries (raw bytes). Big enough
#: that zstd finds the repeats within a checkpoint's blob, small enough that
#: the receiver decodes the first segments of a checkpoint while the rest
#: is still on the wire.
MAX_SEGMENT_RAW = 1 << 20
#: zstd's window is capped for the decoder (a frame of at most
#: MAX_SEGMENT_RAW bytes needs no more than its own size).
MAX_ZSTD_WINDOW = 1 << 21
#: zstd levels the sender may ask for (negative levels are zstd's fast modes).
MIN_ZSTD_LEVEL, MAX_ZSTD_LEVEL = -7, 19
#: Pieces shorter than this go raw: a HEARTBEAT tag or a DISK chunk's header
#: does not shrink, and compressing it costs a call.
MIN_COMPRESS = 512


def kind_of(codec: str) -> int:
    """The segment kind of a negotiated codec name; ValueError for another name."""
    if codec not in CODECS:
        raise ValueError(f"unknown wire codec {codec!r} (known: {', '.join(CODECS)})")
    return CODECS[codec]


def max_stored(kind: int, raw: int) -> int:
    """The longest payload a segment of ``raw`` stream bytes may have."""
    if kind == KIND_RAW:
        return raw
    # each codec's worst-case expansion (ZSTD_COMPRESSBOUND, LZ4_COMPRESSBOUND), rounded up
    return raw + (raw >> 7) + 128


@dataclass
class WireCounts:
    """What an Encoder or Decoder has carried (for status and metrics)."""

    codec: str = ""  # the negotiated codec
    segments: int = 0
    compressed_segments: int = 0  # segments of the codec's kind (not raw)
    raw_bytes: int = 0  # stream bytes in
    wire_bytes: int = 0  # bytes on the wire (headers included)

    @property
    def ratio(self) -> float:
        """Stream bytes per wire byte (1.0 before anything was carried)."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 1.0


class Encoder:
    """The sender's side: stream buffers in, segment buffers out.

    ``encode(buffers, compress)`` returns the buffers to write, in order:
    with ``compress`` False each buffer goes out as raw segments that reference
    it (no copy but the headers); with ``compress`` True the buffers are
    joined and cut into pieces of MAX_SEGMENT_RAW, each compressed (or sent
    raw when that did not make it smaller).
    """

    def __init__(self, codec: str, level: int = 1, threads: int = 0) -> None:
        self.kind = kind_of(codec)
        if codec == "zstd" and not MIN_ZSTD_LEVEL <= level <= MAX_ZSTD_LEVEL:
            raise ValueError(f"zstd level {level} outside {MIN_ZSTD_LEVEL}..{MAX_ZSTD_LEVEL}")
        self.codec = codec
        self.level = level
        self.threads = threads
        self.counts = WireCounts(codec)
        self._zstd = (
            zstandard.ZstdCompressor(
                level=level, threads=threads, write_checksum=True, write_content_size=True
            )
            if codec == "zstd"
            else None
        )

    def _compress(self, piece: bytes | memoryview) -> bytes:
        if self._zstd is not None:
            return self._zstd.compress(piece)
        out: bytes = lz4.block.compress(piece, store_size=False)
        return out

    def _segment(
        self,
        kind: int,
        payload: bytes | memoryview,
        stored: int,
        raw: int,
        out: list[bytes | memoryview],
    ) -> None:
        out.append(SEGMENT.pack(kind, b"\0\0\0", stored, raw))
        out.append(payload)
        c = self.counts
        c.segments += 1
        c.compressed_segments += kind != KIND_RAW
        c.raw_bytes += raw
        c.wire_bytes += SEGMENT.size + stored

    def encode(
        self, buffers: Sequence[bytes | bytearray | memoryview], compress: bool
    ) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        if not compress:
            for b in buffers:
                view = memoryview(b).cast("B")
                for at in range(0, len(view), MAX_SEGMENT_RAW):
                    piece = view[at : at + MAX_SEGMENT_RAW]
                    self._segment(KIND_RAW, piece, len(piece), len(piece), out)
            return out
        whole = memoryview(b"".join(buffers))
        for at in range(0, len(whole), MAX_SEGMENT_RAW):
            piece = whole[at : at + MAX_SEGMENT_RAW]
            packed = self._compress(piece) if len(piece) >= MIN_COMPRESS else None
            if packed is not None and len(packed) < len(piece):
                self._segment(self.kind, packed, len(packed), len(piece), out)
            else:
                self._segment(KIND_RAW, piece, len(piece), len(piece), out)
        return out


class WireError(ProtocolError):
    """A bad segment. ``out``: the stream bytes the same ``feed`` call
    decoded before it (they arrived whole: the stream's decoder gets them
    first, so a checkpoint that came whole before the garbage still counts)."""

    def __init__(self, message: str, out: list[bytes | memoryview] | None = None) -> None:
        super().__init__(message)
        self.out: list[bytes | memoryview] = out or []


class Decoder:
    """The receiver's side: wire bytes in (split anywhere), stream bytes out.

    ``feed(data)`` returns the stream bytes it completed, in order: a raw
    segment's bytes as they arrive (views of ``data``, valid as long as the
    caller's buffer is: use them before the next receive), a compressed
    segment's as one bytes object once it is whole. ``offset`` is the
    connection's byte offset of the first wire byte this decoder reads (for
    error messages). ``raw_left``/``skip_raw`` let stream bytes inside a raw
    segment be received straight into the stream decoder's buffer.
    """

    def __init__(self, codec: str, offset: int = 0) -> None:
        self.codec = codec
        self.kinds = frozenset({KIND_RAW, kind_of(codec)})
        self.counts = WireCounts(codec)
        self._head = bytearray()  # the open segment's header, until it is whole
        self._seg: tuple[int, int, int] | None = None  # kind, stored, raw of the open segment
        self._seg_at = offset  # connection offset of the open (or next) segment's header
        self._left = 0  # payload bytes of the open segment still to come
        self._payload = bytearray()  # a compressed segment's payload so far
        self._error: ProtocolError | None = None
        self._zstd = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)

    @property
    def mid_segment(self) -> bool:
        """Bytes of an incomplete segment were read (an EOF now cuts it)."""
        return bool(self._head) or self._seg is not None

    @property
    def raw_left(self) -> int:
        """Stream bytes of the open raw segment still to come (0: none open)."""
        if self._error is None and self._seg is not None and self._seg[0] == KIND_RAW:
            return self._left
        return 0

    def skip_raw(self, n: int) -> None:
        """``n`` (<= raw_left) bytes of the open raw segment went to the stream
        decoder directly."""
        if not 0 <= n <= self.raw_left:
            raise ValueError(f"skip_raw({n}) with {self.raw_left} raw bytes open")
        self.counts.raw_bytes += n
        self.counts.wire_bytes += n
        self._left -= n
        if self._left == 0 and n:
            self._close_segment()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        if self._error is not None:
            raise WireError(str(self._error))
        view = memoryview(data).cast("B")
        out: list[bytes | memoryview] = []
        at, end = 0, len(view)
        try:
            while at < end:
                if self._seg is None:
                    take = min(SEGMENT.size - len(self._head), end - at)
                    self._head += view[at : at + take]
                    at += take
                    if len(self._head) < SEGMENT.size:
                        break
                    self._seg = self._header()
                    self._left = self._seg[1]
                    self._head.clear()
                    self.counts.wire_bytes += SEGMENT.size
                    continue
                kind, stored, raw = self._seg
                take = min(self._left, end - at)
                if kind == KIND_RAW:
                    out.append(view[at : at + take])
                    self.counts.raw_bytes += take
                    self.counts.wire_bytes += take
                else:
                    self._payload += view[at : at + take]
                at += take
                self._left -= take
                if self._left == 0:
                    if kind != KIND_RAW:
                        out.append(self._decode(kind, memoryview(self._payload), raw))
                        self._payload = bytearray()
                        self.counts.raw_bytes += raw
                        self.counts.wire_bytes += stored
                    self._close_segment()
        except ProtocolError as e:
            self._error = ProtocolError(str(e))  # what later calls raise (nothing decoded)
            self._payload = bytearray()
            raise WireError(str(e), out) from None
        return out

    def _close_segment(self) -> None:
        assert self._seg is not None
        kind, stored, _raw = self._seg
        self.counts.segments += 1
        self.counts.compressed_segments += kind != KIND_RAW
        self._seg_at += SEGMENT.size + stored
        self._seg = None

    def _fail(self, reason: str) -> ProtocolError:
        return ProtocolError(f"byte {self._seg_at}: wire segment: {reason}")

    def _header(self) -> tuple[int, int, int]:
        kind, reserved, stored, raw = SEGMENT.unpack(self._head)
        if kind not in self.kinds:
            name = KIND_NAMES.get(kind, f"unknown kind {kind}")
            raise self._fail(f"{name} in a session that negotiated {self.codec}")
        if reserved != b"\0\0\0":
            raise self._fail(f"reserved bytes {reserved.hex()} are not zero")
        if not 1 <= raw <= MAX_SEGMENT_RAW:
            raise self._fail(f"raw length {raw} outside 1..{MAX_SEGMENT_RAW}")
        cap = max_stored(kind, raw)
        if kind == KIND_RAW and stored != raw:
            raise self._fail(f"raw segment stores {stored} bytes for {raw}")
        if not 1 <= stored <= cap:
            raise self._fail(f"{KIND_NAMES[kind]} payload of {stored} bytes outside 1..{cap}")
        return kind, stored, raw

    def _decode(self, kind: int, payload: memoryview, raw: int) -> bytes:
        try:
            if kind == KIND_ZSTD:
                try:
                    size = zstandard.frame_content_size(payload)
                except zstandard.ZstdError as e:
                    raise self._fail(f"zstd frame header unreadable: {e}") from None
                if size != raw:
                    said = "no content size" if size < 0 else f"content size {size}"
                    raise self._fail(f"zstd frame records {said}, the header says {raw}")
                try:
                    out: bytes = self._zstd.decompress(
                        payload, max_output_size=raw, allow_extra_data=False
                    )
                except zstandard.ZstdError as e:
                    raise self._fail(f"zstd: {e}") from None
            else:
                try:
                    out = lz4.block.decompress(payload, uncompressed_size=raw)
                except lz4.block.LZ4BlockError as e:
                    raise self._fail(f"lz4: {e}") from None
        finally:
            payload.release()
        if len(out) != raw:
            raise self._fail(f"{KIND_NAMES[kind]} payload decoded to {len(out)} bytes, not {raw}")
        return out
