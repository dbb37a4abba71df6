"""The sender's choice of wire compression: the configured mode, and ``auto``'s rule.

``--wire-compression MODE`` (remusd.config) is one of::

    off            the raw legacy stream, as before wire compression existed
    lz4            every piece of the stream lz4-compressed (xenbind.wirecomp)
    zstd[:LEVEL]   every piece zstd-compressed at LEVEL (default 1)
    auto[:CODEC]   the codec (default zstd:1) negotiated, each send compressed
                   only while the link is the bottleneck (below)

A file target never compresses (it must stay a pure legacy stream), and a
receiver that does not offer the codec in its ACCEPT gets the raw stream.

``auto`` keys on what TCP itself measures (``TCP_INFO``, Linux's "chrono"
counters, in jiffies but unbiased over many sends): the time the connection
had data outstanding, less the time the receiver's window held it back
(``busy - rwnd_limited``), is the time the *network* was the limit. Over a
window of AUTO_WINDOW_S of wall time, its share ``f`` of the window:

    sending raw:         f >= AUTO_ON                 -> compress
    sending compressed:  f x ratio < AUTO_OFF          -> raw again

where ``ratio`` is the window's stream bytes per wire byte, so that ``f x
ratio`` is what the share would be with the same stream sent raw (the
hysteresis keeps a link that compression just un-saturated from flapping).
A receiver that cannot keep up (its window closes) is no reason to compress:
it would only give it more work per byte. On loopback ``f`` stays near 0
(every byte is acknowledged at once), on a link at a few percent of its
capacity too: compression costs CPU that buys nothing there.

This module decides; it never touches a socket or a clock (remusd.link
passes the counters and the time in).
"""

from __future__ import annotations

import argparse
import struct
from dataclasses import dataclass

from xenbind.wirecomp import CODECS, MAX_ZSTD_LEVEL, MIN_ZSTD_LEVEL

#: share of the window the network must be the limit before auto compresses
AUTO_ON = 0.25
#: auto goes back to raw once the raw stream would use less than this share
AUTO_OFF = 0.10
#: the window over which auto measures the share (seconds)
AUTO_WINDOW_S = 1.0
#: the default zstd level (bench/thinlink.py, docs/performance.md "A thin link")
DEFAULT_ZSTD_LEVEL = 1

MODES_HELP = "off, lz4, zstd[:LEVEL], auto[:CODEC[:LEVEL]]"


@dataclass(frozen=True)
class WireMode:
    """A parsed ``--wire-compression``: ``codec`` "" for off."""

    codec: str = ""
    level: int = DEFAULT_ZSTD_LEVEL
    auto: bool = False

    def __str__(self) -> str:
        if not self.codec:
            return "off"
        name = self.codec + (f":{self.level}" if self.codec == "zstd" else "")
        return f"auto:{name}" if self.auto else name


OFF = WireMode()


def parse_mode(text: str) -> WireMode:
    """``--wire-compression``'s converter (argparse and the TOML key)."""
    parts = text.strip().lower().split(":")
    auto = parts[0] == "auto"
    if auto:
        parts = parts[1:] or ["zstd"]
    if parts == ["off"] and not auto:
        return OFF
    codec, rest = parts[0], parts[1:]
    if codec not in CODECS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a wire compression mode ({MODES_HELP})")
    level = DEFAULT_ZSTD_LEVEL
    if rest:
        if codec != "zstd" or len(rest) != 1:
            raise argparse.ArgumentTypeError(f"{text!r}: only zstd takes a level ({MODES_HELP})")
        try:
            level = int(rest[0])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: level {rest[0]!r} is not a number"
            ) from None
        if not MIN_ZSTD_LEVEL <= level <= MAX_ZSTD_LEVEL:
            raise argparse.ArgumentTypeError(
                f"{text!r}: zstd level {level} outside {MIN_ZSTD_LEVEL}..{MAX_ZSTD_LEVEL}"
            )
    return WireMode(codec, level, auto)


# --- TCP_INFO ---------------------------------------------------------------------

#: struct tcp_info (linux/tcp.h): tcpi_busy_time, tcpi_rwnd_limited,
#: tcpi_sndbuf_limited, uint64 microseconds each, at this offset (Linux >= 4.10)
TCP_INFO_CHRONO = struct.Struct("<QQQ")
TCP_INFO_CHRONO_OFFSET = 168
#: bytes of tcp_info to ask for (the kernel fills what it has)
TCP_INFO_LEN = TCP_INFO_CHRONO_OFFSET + TCP_INFO_CHRONO.size


def network_limited_us(info: bytes) -> int | None:
    """From a TCP_INFO reply: microseconds the connection had data outstanding
    and the receiver's window was not what held it (None: the kernel is too
    old to say)."""
    if len(info) < TCP_INFO_LEN:
        return None
    busy, rwnd, _sndbuf = TCP_INFO_CHRONO.unpack_from(info, TCP_INFO_CHRONO_OFFSET)
    return max(0, int(busy) - int(rwnd))


class AutoWire:
    """``auto``'s state: whether the next send is compressed.

    ``observe(now, limited_us, raw_bytes, wire_bytes)`` after a send, with
    the connection's network-limited time so far (``network_limited_us``)
    and the Encoder's running byte counts; it closes a window every
    AUTO_WINDOW_S and may flip ``compress``. ``switches`` counts the flips.
    """

    def __init__(self) -> None:
        self.compress = False
        self.switches = 0
        #: the last closed window's network-limited share (None: none closed yet)
        self.share: float | None = None
        self._start: tuple[float, int, int, int] | None = None

    def observe(self, now: float, limited_us: int | None, raw_bytes: int, wire_bytes: int) -> bool:
        """Whether the decision changed."""
        if limited_us is None:
            return False  # no counters: stay as we are (raw)
        if self._start is None:
            self._start = (now, limited_us, raw_bytes, wire_bytes)
            return False
        t0, lim0, raw0, wire0 = self._start
        span = now - t0
        if span < AUTO_WINDOW_S:
            return False
        self._start = (now, limited_us, raw_bytes, wire_bytes)
        share = (limited_us - lim0) / 1e6 / span
        self.share = share
        if not self.compress:
            flip = share >= AUTO_ON
        else:
            wire = wire_bytes - wire0
            ratio = (raw_bytes - raw0) / wire if wire > 0 else 1.0
            flip = share * ratio < AUTO_OFF
        if flip:
            self.compress = not self.compress
            self.switches += 1
        return flip
