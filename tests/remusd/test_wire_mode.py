"""remusd.wire: --wire-compression's modes, and auto's rule on TCP's counters."""

from __future__ import annotations

import argparse
import socket
import threading

import pytest

from remusd.wire import (
    AUTO_OFF,
    AUTO_ON,
    OFF,
    TCP_INFO_LEN,
    AutoWire,
    WireMode,
    network_limited_us,
    parse_mode,
)


@pytest.mark.parametrize(
    "text,mode",
    [
        ("off", OFF),
        ("zstd", WireMode("zstd", 1)),
        ("zstd:3", WireMode("zstd", 3)),
        ("ZSTD:-5", WireMode("zstd", -5)),
        ("lz4", WireMode("lz4")),
        ("auto", WireMode("zstd", 1, auto=True)),
        ("auto:lz4", WireMode("lz4", auto=True)),
        ("auto:zstd:6", WireMode("zstd", 6, auto=True)),
    ],
)
def test_modes_parse_and_print_back(text: str, mode: WireMode) -> None:
    assert parse_mode(text) == mode
    assert parse_mode(str(mode)) == mode


@pytest.mark.parametrize(
    "text,match",
    [
        ("gzip", "not a wire compression mode"),
        ("lz4:3", "only zstd takes a level"),
        ("zstd:x", "not a number"),
        ("zstd:40", "outside"),
        ("zstd:1:2", "only zstd takes a level"),
        ("auto:off", "not a wire compression mode"),
    ],
)
def test_bad_modes_say_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        parse_mode(text)


def test_auto_switches_on_a_busy_network_and_off_when_raw_would_fit() -> None:
    a = AutoWire()
    a.observe(0.0, 0, 0, 0)
    assert not a.observe(0.5, 400_000, 10, 10)  # half a window: no decision yet
    assert a.observe(1.0, int(AUTO_ON * 1e6) + 1, 10, 10) and a.compress  # busy 25%+
    # compressed 4:1, the network busy 5% of the next second: raw would need 20%
    assert not a.observe(2.0, int(AUTO_ON * 1e6) + 50_000, 4010, 1010) and a.compress
    # 2% busy at 4:1: raw would need 8% < AUTO_OFF
    assert a.observe(3.0, int(AUTO_ON * 1e6) + 70_000, 8010, 2010) and not a.compress
    assert a.switches == 2 and a.share == pytest.approx(0.02)
    assert AUTO_OFF < AUTO_ON


def test_auto_stays_raw_without_counters() -> None:
    a = AutoWire()
    for t in range(5):
        assert not a.observe(float(t), None, t, t)
    assert not a.compress and a.share is None


def test_network_limited_time_comes_from_the_kernel() -> None:
    """A real loopback connection whose reader stalls: TCP counts the time the
    receiver's window held the data back, which is not the network's."""
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    with srv, c, s:
        assert (
            network_limited_us(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)) == 0
        )
        c.setblocking(False)
        sent = 0
        try:
            while sent < 64 << 20:
                sent += c.send(b"x" * (1 << 20))  # until the reader's window is full
        except BlockingIOError:
            pass
        threading.Event().wait(0.3)
        info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        assert len(info) >= TCP_INFO_LEN
        limited = network_limited_us(info)
        assert limited is not None and limited < 150_000  # the 0.3 s were the receiver's
        assert network_limited_us(info[:100]) is None
