"""xenbind.session: the handshake and the receiver's frames, sans-IO."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenbind.blockhash import HashesMessage
from xenbind.errors import ProtocolError
from xenbind.session import (
    ACK_MISMATCH,
    DISK_HASH_BLOCK,
    ERR_FAILED_OVER,
    FRAME_ACK,
    FRAME_DISK_HASHES,
    FRAME_HEADER,
    HELLO_MAGIC,
    MAX_HELLO_BYTES,
    MAX_REASON_BYTES,
    PREFIX,
    PROTOCOL_VERSION,
    REPLY_MAGIC,
    Accept,
    Accepted,
    Ack,
    DiskHashes,
    Error,
    Goodbye,
    HandshakeError,
    Heartbeat,
    Hello,
    HelloReceived,
    Options,
    ReceiverSession,
    Refused,
    SenderSession,
    StreamData,
    encode_accept,
    encode_frame,
    encode_hello,
    new_session_id,
)
from xenbind.types import DomainConfig

UUID = "12345678-9abc-def0-1234-56789abcdef0"


def make_hello(**kw) -> Hello:
    domain = DomainConfig(
        name="guest1",
        uuid=UUID,
        pages=256,
        vcpus=2,
        hvm=True,
        extra={"workload": "ledger", "seed": 1},
    )
    args: dict[str, Any] = dict(
        session_id=new_session_id(),
        options=Options(codec="xen", verify=True),
        domain=domain,
        generation=7,
        software="test 1",
    )
    args.update(kw)
    return Hello(**args)


def accept_for(hello: Hello) -> Accept:
    return Accept(
        session_id=hello.session_id,
        failover_timeout_ms=900,
        heartbeat_ms=100,
        limits={"max_pages": 1 << 20},
        software="receiver-test",
    )


def handshake(hello: Hello | None = None):
    hello = hello or make_hello()
    s = SenderSession(hello)
    r = ReceiverSession()
    events = r.feed(s.hello())
    assert events == [HelloReceived(hello)]
    reply = r.accept(accept_for(hello))
    answer = s.feed(reply)
    assert answer == [Accepted(accept_for(hello))]
    return s, r


def test_handshake_round_trip_byte_at_a_time():
    hello = make_hello()
    s = SenderSession(hello)
    r = ReceiverSession()
    raw = s.hello()
    assert raw[:8] == HELLO_MAGIC
    assert struct.unpack_from("<H", raw, 8)[0] == PROTOCOL_VERSION
    got = []
    for i in range(len(raw)):
        got += r.feed(raw[i : i + 1])
    assert got == [HelloReceived(hello)]
    assert got[0].hello.domain.extra == {"workload": "ledger", "seed": 1}
    reply = r.accept(accept_for(hello))
    assert reply[:8] == REPLY_MAGIC
    out = []
    for i in range(len(reply)):
        out += s.feed(reply[i : i + 1])
    assert out == [Accepted(accept_for(hello))]
    assert s.state == "established"


def test_stream_bytes_pass_through_including_early_ones():
    hello = make_hello()
    s = SenderSession(hello)
    r = ReceiverSession()
    # the HELLO and the first stream bytes arrive in one segment
    events = r.feed(s.hello() + b"STREAM-1")
    assert len(events) == 1 and isinstance(events[0], HelloReceived)
    r.accept(accept_for(hello))
    assert r.feed(b"") == [StreamData(b"STREAM-1")]
    assert r.feed(b"more") == [StreamData(b"more")]
    assert r.feed(b"") == []


def test_frames_round_trip():
    s, r = handshake()
    data = (
        r.ack(0)
        + r.heartbeat(None)
        + r.ack(5, verified=True)
        + r.heartbeat(5)
        + r.ack(6, mismatch=True)
    )
    events = []
    for i in range(0, len(data), 3):
        events += s.feed(data[i : i + 3])
    assert events == [
        Ack(0),
        Heartbeat(None),
        Ack(5, verified=True),
        Heartbeat(5),
        Ack(6, mismatch=True),
    ]
    events = s.feed(r.error(ERR_FAILED_OVER, "domain guest1 failed over here"))
    assert events == [Error(ERR_FAILED_OVER, "domain guest1 failed over here")]
    assert events[0].code_name == "failed-over"
    assert s.state == "closed"
    s.eof()


def test_goodbye_and_reason_cap():
    s, r = handshake()
    frame = r.goodbye("x" * 5000)
    assert len(frame) == FRAME_HEADER.size + MAX_REASON_BYTES
    (ev,) = s.feed(frame)
    assert isinstance(ev, Goodbye) and ev.reason == "x" * MAX_REASON_BYTES


def test_version_too_new_is_refused_with_clear_reason():
    hello = make_hello(version=PROTOCOL_VERSION + 1)
    raw = encode_hello(hello)
    r = ReceiverSession()
    with pytest.raises(HandshakeError) as err:
        r.feed(raw)
    assert err.value.code == "version"
    assert "too new" in str(err.value)
    # the refusal reaches an (old or new) sender intact
    s = SenderSession(make_hello())
    s.hello()
    (ev,) = s.feed(r.refuse(err.value.code, str(err.value)))
    assert isinstance(ev, Refused)
    assert ev.refuse.code == "version" and "protocol version" in ev.refuse.reason
    assert s.state == "refused"


def test_version_too_old_is_refused():
    r = ReceiverSession(min_version=2, max_version=3)
    with pytest.raises(HandshakeError, match="too old.*upgrade the sender") as err:
        r.feed(encode_hello(make_hello()))
    assert err.value.code == "version"


def test_sender_refuses_an_accept_in_an_unknown_version():
    hello = make_hello()
    s = SenderSession(hello)
    s.hello()
    body = json.dumps(
        {
            "session": hello.session_id,
            "failover_timeout_ms": 1,
            "heartbeat_ms": 1,
            "limits": {},
            "software": "",
        }
    ).encode()
    with pytest.raises(HandshakeError, match="version 9"):
        s.feed(PREFIX.pack(REPLY_MAGIC, 9, 0, len(body)) + body)


def test_garbage_fails_at_first_wrong_byte():
    r = ReceiverSession()
    with pytest.raises(HandshakeError, match="bad HELLO magic"):
        r.feed(b"GET / HTTP/1.1\r\n")
    r = ReceiverSession()
    assert r.feed(HELLO_MAGIC[:3]) == []
    with pytest.raises(HandshakeError):
        r.feed(b"X")


@pytest.mark.parametrize("length", [0, 1, MAX_HELLO_BYTES + 1, 0xFFFFFFFF])
def test_hello_length_cap_before_allocation(length):
    r = ReceiverSession()
    with pytest.raises(HandshakeError, match="length"):
        r.feed(PREFIX.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, length))


def _hello_with(mutate) -> bytes:
    hello = make_hello()
    obj = json.loads(encode_hello(hello)[PREFIX.size :])
    mutate(obj)
    body = json.dumps(obj).encode()
    return PREFIX.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, len(body)) + body


@pytest.mark.parametrize(
    "mutate,code,match",
    [
        (lambda o: o.pop("session"), "bad-hello", "session"),
        (lambda o: o.update(session="XYZ"), "bad-hello", "session"),
        (lambda o: o["options"].update(codec="gzip"), "codec", "unknown codec"),
        (lambda o: o["options"].update(verify=1), "bad-hello", "verify"),
        (lambda o: o["options"].update(interval_ms=0), "bad-hello", "interval_ms"),
        (lambda o: o["options"].update(cache_pages=True), "bad-hello", "cache_pages"),
        (lambda o: o["domain"].update(pages=1 << 40), "bad-hello", "pages"),
        (lambda o: o["domain"].update(pages=-1), "bad-hello", "pages"),
        (lambda o: o["domain"].update(uuid="not-a-uuid"), "bad-hello", "uuid"),
        (lambda o: o["domain"].update(name=""), "bad-hello", "name"),
        (lambda o: o["domain"].update(name="a\nb"), "bad-hello", "name"),
        (lambda o: o["domain"].update(extra=[]), "bad-hello", "extra"),
        (lambda o: o["domain"].update(extra={"x": "y" * 20000}), "bad-hello", "extra"),
        (lambda o: o.update(generation=-1), "bad-hello", "generation"),
        (lambda o: o.update(domain="guest"), "bad-hello", "domain"),
        (lambda o: o["options"].update(ack_ms=-1), "bad-hello", "ack_ms"),
        (lambda o: o["options"].update(ack_ms=60000), "bad-hello", "ack_ms"),
        (lambda o: o["options"].update(ack_ms=1.5), "bad-hello", "ack_ms"),
        (lambda o: o["options"].update(ack_ms=True), "bad-hello", "ack_ms"),
        (lambda o: o["options"].update(ack_ms="3"), "bad-hello", "ack_ms"),
        (lambda o: o["domain"].update(disks=[1000]), "bad-hello", "disk 0 size"),
        (lambda o: o["domain"].update(disks=[0]), "bad-hello", "disk 0 size"),
        (lambda o: o["domain"].update(disks=[512, 1 << 45]), "bad-hello", "disk 1 size"),
        (lambda o: o["domain"].update(disks=[True]), "bad-hello", "disk 0 size"),
        (lambda o: o["domain"].update(disks=[512] * 65), "bad-hello", "65 disks"),
        (lambda o: o["domain"].update(disks="512"), "bad-hello", "disks"),
        (lambda o: o["options"].update(wire="zstd"), "bad-hello", "wire"),
        (lambda o: o["options"].update(wire=[""]), "bad-hello", "wire codec"),
        (lambda o: o["options"].update(wire=[3]), "bad-hello", "wire codec"),
        (lambda o: o["options"].update(wire=["z" * 17]), "bad-hello", "wire codec"),
        (lambda o: o["options"].update(wire=["zst\u00e9"]), "bad-hello", "wire codec"),
        (lambda o: o["options"].update(wire=["lz4"] * 9), "bad-hello", "9 codecs"),
    ],
)
def test_bad_hello_fields(mutate, code, match):
    r = ReceiverSession()
    with pytest.raises(HandshakeError, match=match) as err:
        r.feed(_hello_with(mutate))
    assert err.value.code == code


def _received(raw: bytes) -> Hello:
    [ev] = ReceiverSession().feed(raw)
    assert isinstance(ev, HelloReceived)
    return ev.hello


def test_ack_ms_round_trips_and_is_optional():
    """options.ack_ms (issue 12, defect 4): the sender's measured ack time
    reaches the receiver; an older sender that omits it means 0 (unknown)."""
    hello = make_hello(options=Options(codec="xen", ack_ms=37))
    assert _received(encode_hello(hello)).options.ack_ms == 37
    assert _received(_hello_with(lambda o: o["options"].pop("ack_ms"))).options.ack_ms == 0
    assert (
        _received(_hello_with(lambda o: o["options"].update(ack_ms=59999))).options.ack_ms == 59999
    )
    with pytest.raises(HandshakeError, match="ack_ms"):
        SenderSession(make_hello(options=Options(ack_ms=60000)))


def test_accept_announces_switchover_optionally():
    """ACCEPT's "switchover": true (issue 14): a receiver of this release says
    it resumes at a SWITCHOVER checkpoint; an older one omits it (false), and
    a non-boolean is refused."""
    hello = make_hello()
    for flag in (True, False):
        s = SenderSession(hello)
        ReceiverSession().feed(s.hello())
        reply = encode_accept(replace(accept_for(hello), switchover=flag))
        assert (b'"switchover"' in reply) is flag
        (ev,) = s.feed(reply)
        assert isinstance(ev, Accepted) and ev.accept.switchover is flag
    body = json.loads(encode_accept(accept_for(hello))[16:])
    body["switchover"] = "yes"
    raw = json.dumps(body).encode()
    s = SenderSession(hello)
    s.hello()
    with pytest.raises(ProtocolError, match="switchover"):
        s.feed(REPLY_MAGIC + struct.pack("<HHI", PROTOCOL_VERSION, 0, len(raw)) + raw)


def test_disks_travel_in_hello_and_their_hashes_come_back_checked():
    """Issue 13: a HELLO names the domain's disks (optional: absent is none),
    ACCEPT says the receiver replicates them, and DISK_HASHES frames reach the
    sender checked against those disks."""
    plain = make_hello()
    assert _received(_hello_with(lambda o: o["domain"].pop("disks"))).domain.disks == ()
    hello = make_hello(domain=replace(plain.domain, disks=(1 << 20, 4 << 20)))
    assert _received(encode_hello(hello)).domain.disks == (1 << 20, 4 << 20)
    s = SenderSession(hello)
    r = ReceiverSession()
    r.feed(s.hello())
    (ev,) = s.feed(r.accept(replace(accept_for(hello), disks=True)))
    assert isinstance(ev, Accepted) and ev.accept.disks
    msg = HashesMessage(1, DISK_HASH_BLOCK, 60, np.arange(4, dtype=np.uint64))
    (got,) = s.feed(r.disk_hashes(msg) + b"")
    assert isinstance(got, DiskHashes) and got.message.first == 60
    assert list(got.message.hashes) == [0, 1, 2, 3]
    # past the end of disk 1 (64 blocks of 64 KiB), a disk that is not there
    for bad, match in (
        (HashesMessage(1, DISK_HASH_BLOCK, 61, np.arange(4, dtype=np.uint64)), "disk 1 has 64"),
        (HashesMessage(2, DISK_HASH_BLOCK, 0, np.arange(1, dtype=np.uint64)), "the domain has 2"),
        (HashesMessage(0, 4096, 0, np.arange(1, dtype=np.uint64)), "block size"),
    ):
        s2 = SenderSession(hello)
        r2 = ReceiverSession()
        r2.feed(s2.hello())
        s2.feed(r2.accept(accept_for(hello)))
        with pytest.raises(ProtocolError, match=match):
            s2.feed(r2.disk_hashes(bad))
    # a domain without disks gets none
    s3, r3 = handshake()
    with pytest.raises(ProtocolError, match="without disks"):
        s3.feed(encode_frame(FRAME_DISK_HASHES, 0, msg.pack()))


def test_hello_body_not_json_or_not_object():
    for body in (b"\xff\xfe", b"[1, 2]", b'{"a": ', b"[" * 3000 + b"]" * 3000):
        r = ReceiverSession()
        with pytest.raises(HandshakeError):
            r.feed(PREFIX.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, len(body)) + body)


def test_sender_validates_its_own_hello():
    with pytest.raises(HandshakeError, match="codec"):
        SenderSession(make_hello(options=Options(codec="lzma")))


def test_early_stream_bytes_are_capped():
    r = ReceiverSession(max_early_bytes=100)
    r.feed(encode_hello(make_hello()))
    r.feed(b"x" * 100)
    with pytest.raises(ProtocolError, match="before ACCEPT"):
        r.feed(b"y")


def test_receiver_eof_in_handshake():
    r = ReceiverSession()
    r.feed(HELLO_MAGIC)
    with pytest.raises(ProtocolError, match="during the handshake"):
        r.eof()


@pytest.mark.parametrize(
    "frame,match",
    [
        (encode_frame(FRAME_ACK, 0, b"\0" * 4), "payload length"),
        (encode_frame(FRAME_ACK, 0x80, b"\0" * 8), "flags"),
        (encode_frame(99, 0, b""), "unknown frame type"),
        (FRAME_HEADER.pack(3, 1, 1 << 31), "exceeds"),
        (encode_frame(2, 1, b"\0" * 8), "flags must be 0"),
    ],
)
def test_bad_frames(frame, match):
    s, _ = handshake()
    with pytest.raises(ProtocolError, match=match):
        s.feed(frame)


def test_sender_eof_inside_frame():
    s, r = handshake()
    s.feed(r.ack(1)[:5])
    with pytest.raises(ProtocolError, match="inside a frame"):
        s.eof()


def test_mismatch_flag_value():
    s, r = handshake()
    assert r.ack(3, mismatch=True)[2] == ACK_MISMATCH


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_receiver_garbage_never_crashes(data):
    r = ReceiverSession()
    try:
        r.feed(data)
        r.eof()
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 200))
def test_hello_with_corruption_never_crashes(noise, where):
    raw = bytearray(encode_hello(make_hello()))
    where = min(where, len(raw))
    raw[where : where + len(noise)] = noise
    r = ReceiverSession()
    try:
        r.feed(bytes(raw))
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_sender_garbage_never_crashes(data):
    for prefix in (b"", None):
        hello = make_hello()
        s = SenderSession(hello)
        s.hello()
        if prefix is None:  # garbage after a good ACCEPT, in the frame phase
            s.feed(encode_accept(accept_for(hello)))
        try:
            s.feed(data)
            s.eof()
        except ProtocolError:
            pass


def test_wire_codec_is_offered_picked_and_then_every_byte_is_a_segment():
    """Wire compression (issue 16): the HELLO offers codecs in order (names this
    release does not know are kept, and skipped), the ACCEPT picks one, and from
    then on the receiver's StreamData is what the segments decode to; a raw
    segment's bytes may be received directly, within the segment."""
    from xenbind.session import pick_wire
    from xenbind.wirecomp import Encoder

    hello = make_hello(options=Options(codec="xen", wire=("brotli", "lz4", "zstd")))
    s = SenderSession(hello)
    r = ReceiverSession()
    (ev,) = r.feed(s.hello())
    assert ev.hello.options.wire == ("brotli", "lz4", "zstd")
    assert pick_wire(ev.hello.options.wire) == "lz4" and pick_wire(("brotli",)) == ""
    reply = r.accept(replace(accept_for(hello), wire="lz4"))
    (acc,) = s.feed(reply)
    assert acc.accept.wire == "lz4"
    assert not r.passthrough and r.direct_limit == 0
    enc = Encoder("lz4")
    stream = b"page" * 5000
    wire = b"".join(bytes(x) for x in enc.encode([stream], True) + enc.encode([b"raw-part"], False))
    split = len(wire) - 8 + 3  # inside the raw segment
    got = b"".join(bytes(e.data) for e in r.feed(wire[:split]))
    assert got == stream + b"raw"
    assert r.passthrough and r.direct_limit == 5
    with pytest.raises(ProtocolError, match="streamed"):
        r.streamed(6)  # past the segment
    r.streamed(5)  # the rest went straight to the stream decoder
    assert not r.passthrough and r.wire_counts is not None
    assert r.wire_counts.raw_bytes == len(stream) + 8


def test_wire_codec_absent_or_refused_is_the_raw_stream():
    """An older receiver's ACCEPT has no "wire": the stream goes raw; an ACCEPT
    that picks a codec the HELLO did not offer is refused by the sender, and
    the receiver's own session will not write one."""
    hello = make_hello(options=Options(codec="xen", wire=("zstd",)))
    s, r = handshake(hello)
    assert s.accept is not None and s.accept.wire == ""
    assert r.feed(b"raw") == [StreamData(b"raw")] and r.passthrough
    s2 = SenderSession(hello)
    s2.hello()
    with pytest.raises(HandshakeError, match="did not offer"):
        s2.feed(encode_accept(replace(accept_for(hello), wire="lz4")))
    plain = make_hello()
    r2 = ReceiverSession()
    r2.feed(SenderSession(plain).hello())
    with pytest.raises(ProtocolError, match="did not offer"):
        r2.accept(replace(accept_for(plain), wire="zstd"))


def test_a_bad_segment_ends_the_stream_after_what_came_whole():
    from xenbind.session import StreamBroken
    from xenbind.wirecomp import SEGMENT

    hello = make_hello(options=Options(codec="xen", wire=("zstd",)))
    s = SenderSession(hello)
    r = ReceiverSession()
    r.feed(s.hello())
    r.accept(replace(accept_for(hello), wire="zstd"))
    good = SEGMENT.pack(0, bytes(3), 4, 4) + b"good"
    with pytest.raises(StreamBroken, match="unknown kind 9") as e:
        r.feed(good + SEGMENT.pack(9, bytes(3), 1, 1) + b"x")
    assert [bytes(ev.data) for ev in e.value.events] == [b"good"]
