"""The session protocol around the legacy stream, sans-IO (h11 style).

Bytes in, events out: nothing here touches a socket, a clock or a thread.
The full specification, every byte of it, is ``docs/protocol.md``; this
docstring is its summary.

A session is one TCP (later TLS) connection carrying one protected domain::

    sender -> receiver   HELLO            (once, first)
    receiver -> sender   ACCEPT | REFUSE  (once; REFUSE is followed by close)
    sender -> receiver   the legacy libxc stream of xenbind.stream, raw:
                         header, initial copy (Format A), ENABLE_COMPRESSION
                         (unless codec none), one body + tail per checkpoint,
                         HEARTBEAT tag chunks between any two chunks,
                         LAST_CHECKPOINT in the last checkpoint then close
    receiver -> sender   frames: ACK (after each commit), HEARTBEAT,
                         DISK_HASHES (a domain with disks: the backup's block
                         hashes, right after ACCEPT), ERROR | GOODBYE (then close)

HELLO and ACCEPT/REFUSE share one layout (all integers little-endian)::

    offset  size  field
    0       8     magic: HELLO_MAGIC (sender) or REPLY_MAGIC (receiver)
    8       2     uint16 protocol version of the writer
    10      2     uint16 status: 0 in HELLO; REPLY_ACCEPT or REPLY_REFUSE
    12      4     uint32 N: length of the JSON body, 2 <= N <= MAX_HELLO_BYTES
    16      N     UTF-8 JSON object (fields: docs/protocol.md)

This 16-byte prefix is frozen for every protocol version, so any release can
read any other release's HELLO far enough to refuse it with a clear reason.

Receiver -> sender frames after ACCEPT::

    0   2   uint16 frame type (FRAME_ACK, FRAME_HEARTBEAT, FRAME_ERROR, FRAME_GOODBYE,
            FRAME_DISK_HASHES)
    2   2   uint16 flags (ACK: ACK_VERIFIED / ACK_MISMATCH; ERROR: an ERR_* code)
    4   4   uint32 payload length (fixed per type; text frames <= MAX_REASON_BYTES)
    8   ..  payload: ACK uint64 checkpoint index; HEARTBEAT uint64 last committed
            index (NO_CHECKPOINT if none); ERROR/GOODBYE UTF-8 reason text;
            DISK_HASHES a xenbind.blockhash.HashesMessage (disk, block size
            DISK_HASH_BLOCK, first block, count, count x uint64 xxh3-64)

Rules this module keeps:
- Every malformed input raises ``ProtocolError`` (``HandshakeError`` during
  the handshake, with a ``code`` the receiver puts in its REFUSE), with the
  byte offset in the connection; never struct.error / KeyError / ValueError.
- No length read from the peer allocates before it is checked against a cap.
- The stream bytes after the handshake are passed through untouched
  (``StreamData`` events); the receiver feeds them to ``xenbind.stream``.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar, overload

from .blockhash import DEFAULT_BLOCK, MAX_MESSAGE_BYTES, HashesMessage
from .compress.formats import CODECS as CODECS  # codecs a HELLO may name (re-exported)
from .diskstream import MAX_DISKS, MIN_SECTOR_SHIFT
from .errors import ProtocolError
from .types import DomainConfig
from .wirecomp import CODECS as WIRE_CODECS
from .wirecomp import Decoder as WireDecoder
from .wirecomp import WireCounts, WireError

# --- constants -------------------------------------------------------------

#: First 8 bytes of a sender's HELLO. PNG-style: the high-bit byte catches a
#: 7-bit channel, CR LF catches newline translation, ^Z stops `type` on DOS.
HELLO_MAGIC = b"\x89RMS\r\n\x1a\n"
#: First 8 bytes of the receiver's ACCEPT or REFUSE.
REPLY_MAGIC = b"\x89RMR\r\n\x1a\n"

#: The protocol version this release writes.
PROTOCOL_VERSION = 1
#: The oldest peer version this release accepts.
MIN_PROTOCOL_VERSION = 1

#: Size of the frozen HELLO/REPLY prefix: magic, version, status, body length.
PREFIX = struct.Struct("<8sHHI")
#: Hard cap on the JSON body of HELLO / ACCEPT / REFUSE.
MAX_HELLO_BYTES = 65536

#: status field of a receiver reply
REPLY_ACCEPT = 0
REPLY_REFUSE = 1

#: Receiver -> sender frame header: type, flags, payload length.
FRAME_HEADER = struct.Struct("<HHI")
FRAME_ACK = 1  # payload uint64 index of the checkpoint just committed
FRAME_HEARTBEAT = 2  # payload uint64 last committed index, NO_CHECKPOINT if none
FRAME_ERROR = 3  # payload reason text; flags = ERR_* code; connection closes
FRAME_GOODBYE = 4  # payload reason text; clean end; connection closes
FRAME_DISK_HASHES = 5  # payload a HashesMessage: the backup's hashes of one run of blocks
FRAME_NAMES = {
    FRAME_ACK: "ACK",
    FRAME_HEARTBEAT: "HEARTBEAT",
    FRAME_ERROR: "ERROR",
    FRAME_GOODBYE: "GOODBYE",
    FRAME_DISK_HASHES: "DISK_HASHES",
}
#: The block size of DISK_HASHES in protocol version 1 (xenbind.blockhash).
DISK_HASH_BLOCK = DEFAULT_BLOCK
#: The longest DISK_HASHES payload.
MAX_DISK_HASHES_BYTES = MAX_MESSAGE_BYTES

#: ACK flags (verify mode): the backup's memory digest was checked after the
#: commit and matched (ACK_VERIFIED) or did not (ACK_MISMATCH).
ACK_VERIFIED = 0x1
ACK_MISMATCH = 0x2

#: ERROR codes (flags field of FRAME_ERROR): why the receiver ends the session.
ERR_PROTOCOL = 1  # the stream or session broke a rule
ERR_STALLED = 2  # no data within the receiver's timeout
ERR_FAILED_OVER = 3  # the backup took over: do not re-protect to this receiver
ERR_INTERNAL = 4  # the receiver could not commit (hypervisor error, ...)
ERR_SHUTDOWN = 5  # the receiver daemon is stopping
ERR_SUPERSEDED = 6  # a newer session for the same domain replaced this one
ERR_SWITCHOVER_FAILED = 7  # a switchover's backup was not resumed: the sender runs its copy
ERROR_NAMES = {
    ERR_PROTOCOL: "protocol",
    ERR_STALLED: "stalled",
    ERR_FAILED_OVER: "failed-over",
    ERR_INTERNAL: "internal",
    ERR_SHUTDOWN: "shutdown",
    ERR_SUPERSEDED: "superseded",
    ERR_SWITCHOVER_FAILED: "switchover-failed",
}

#: Cap on the reason text of ERROR / GOODBYE / REFUSE (bytes of UTF-8).
MAX_REASON_BYTES = 1024
#: HEARTBEAT payload before the first commit.
NO_CHECKPOINT = 0xFFFF_FFFF_FFFF_FFFF
_U64 = struct.Struct("<Q")

#: REFUSE codes (JSON "code" field): the sender can decide whether to retry.
REFUSE_CODES = (
    "version",
    "bad-hello",
    "codec",
    "limit",
    "fenced",
    "busy",
    "internal",
    "witness",  # the HELLO's witness claim is not the owner key's holder (docs/witness.md)
)

#: Caps on HELLO fields (the receiver has its own, tighter, limits on top).
MAX_NAME_LEN = 128
MAX_SOFTWARE_LEN = 128
MAX_EXTRA_BYTES = 16384
MAX_PAGES = 1 << 28  # PFNs are 28 bits in the legacy stream
MAX_VCPUS = 4096
MAX_INTERVAL_MS = 3_600_000
MAX_CACHE_PAGES = 1 << 24
#: ``options.ack_ms`` must be below this (one minute)
MAX_ACK_MS = 60_000
#: the longest witness key name a HELLO may carry
MAX_WITNESS_KEY_LEN = 512
#: the largest replicated disk a HELLO may announce (16 TiB)
MAX_DISK_BYTES = 1 << 44
#: ``options.wire``: at most this many codec names, each this long at most
MAX_WIRE_CODECS = 8
MAX_WIRE_NAME = 16

_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


class HandshakeError(ProtocolError):
    """A HELLO (or reply) the peer cannot be served with.

    ``code`` is one of REFUSE_CODES; the receiver sends it back in REFUSE.
    """

    def __init__(self, code: str, reason: str, offset: int = 0) -> None:
        super().__init__(f"byte {offset}: {reason}")
        self.code = code
        self.reason = reason
        self.offset = offset


class StreamBroken(ProtocolError):
    """The stream's wire segments broke a rule (xenbind.wirecomp). ``events``:
    the StreamData the same ``feed`` decoded before the bad segment, to be
    handled before the session ends."""

    def __init__(self, message: str, events: list[StreamData]) -> None:
        super().__init__(message)
        self.events = events


# --- the HELLO contents ----------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What the sender chose for this session (docs/protocol.md, HELLO)."""

    codec: str = "seed"
    cache_pages: int = 8192  # the compression page cache, both sides
    buffer_pages: int = 8192  # the sender's page buffer (COMPRESSED_DATA size)
    interval_ms: int = 200  # checkpoint interval
    heartbeat_ms: int = 100  # the sender sends a HEARTBEAT tag at least this often when idle
    verify: bool = False  # a memory digest rides in every checkpoint
    #: the sender's measured median ACK time of its previous session, ms (0:
    #: unknown); optional on the wire, 0 .. MAX_ACK_MS - 1. The receiver refuses
    #: a session whose failover timeout cannot hold 2 x interval_ms + ack_ms.
    ack_ms: int = 0
    #: the second-stage wire codecs the sender can write (xenbind.wirecomp),
    #: in its order of preference; optional on the wire (absent or empty: the
    #: stream goes uncompressed, as before wire compression existed)
    wire: tuple[str, ...] = ()


@dataclass(frozen=True)
class WitnessClaim:
    """The sender's claim of the domain's owner key in the witness (etcd,
    docs/witness.md): the key's name and the claim's (create) revision."""

    key: str
    revision: int


@dataclass(frozen=True)
class Hello:
    """The sender's HELLO."""

    session_id: str  # 32 lowercase hex digits (random 128 bits)
    options: Options
    domain: DomainConfig
    generation: int = 0  # fencing token: a newer protection of the same domain has a larger one
    software: str = ""  # e.g. "remusd 0.1.0", for logs only
    version: int = PROTOCOL_VERSION  # filled from the prefix when decoded
    #: optional on the wire (absent: the sender has no witness)
    witness: WitnessClaim | None = None


@dataclass(frozen=True)
class Accept:
    """The receiver's ACCEPT: the session goes on."""

    session_id: str
    failover_timeout_ms: int  # the receiver fails over this long after the last sign of life
    heartbeat_ms: int  # the receiver sends HEARTBEAT at least this often
    limits: dict[str, Any] = field(default_factory=dict)  # max_pages, max_staged_bytes, ...
    software: str = ""
    version: int = PROTOCOL_VERSION
    #: the receiver fails over only after winning the owner key (optional on
    #: the wire: absent means false)
    witness: bool = False
    #: the receiver resumes its backup at a SWITCHOVER checkpoint (optional on
    #: the wire: absent means false, an older receiver that would refuse the tag)
    switchover: bool = False
    #: the receiver replicates the disks the HELLO announced (DISK chunks,
    #: DISK_HASHES; optional on the wire: absent means false)
    disks: bool = False
    #: the wire codec the receiver picked from the HELLO's ``options.wire``
    #: (every byte of the stream is then a xenbind.wirecomp segment); optional
    #: on the wire: absent or "" means the raw stream
    wire: str = ""


@dataclass(frozen=True)
class Refuse:
    """The receiver's REFUSE: the session ends; ``code`` in REFUSE_CODES."""

    code: str
    reason: str
    version: int = PROTOCOL_VERSION


# --- events ----------------------------------------------------------------


@dataclass(frozen=True)
class HelloReceived:
    """Receiver side: the sender's HELLO, checked. Answer with accept() or refuse()."""

    hello: Hello


@dataclass(frozen=True)
class StreamData:
    """Receiver side: bytes of the legacy stream, in order, untouched."""

    data: bytes | bytearray | memoryview  # what feed() was given, when it held nothing back


@dataclass(frozen=True)
class Accepted:
    accept: Accept


@dataclass(frozen=True)
class Refused:
    refuse: Refuse


@dataclass(frozen=True)
class Ack:
    index: int
    verified: bool = False
    mismatch: bool = False


@dataclass(frozen=True)
class Heartbeat:
    last_committed: int | None  # None: nothing committed yet


@dataclass(frozen=True)
class Error:
    code: int
    reason: str

    @property
    def code_name(self) -> str:
        return ERROR_NAMES.get(self.code, f"code {self.code}")


@dataclass(frozen=True)
class Goodbye:
    reason: str


@dataclass(frozen=True)
class DiskHashes:
    """The backup's hashes of one run of one disk's blocks (checked against
    the disks the HELLO announced)."""

    message: HashesMessage


#: What ReceiverSession.feed returns a list of.
ReceiverEvent = HelloReceived | StreamData
#: What SenderSession.feed returns a list of.
SenderEvent = Accepted | Refused | Ack | Heartbeat | Error | Goodbye | DiskHashes


# --- JSON field checking ---------------------------------------------------


_T = TypeVar("_T")
#: A decoded JSON object (HELLO / ACCEPT / REFUSE body).
JsonObject = Mapping[str, object]


@overload
def _need(obj: JsonObject, key: str, kind: type[_T], where: str, offset: int) -> _T: ...
@overload
def _need(
    obj: JsonObject, key: str, kind: tuple[type[Any], ...], where: str, offset: int
) -> object: ...
def _need(
    obj: JsonObject, key: str, kind: type[Any] | tuple[type[Any], ...], where: str, offset: int
) -> object:
    if key not in obj:
        raise HandshakeError("bad-hello", f"{where}: field {key!r} missing", offset)
    value = obj[key]
    # bool is an int subclass: an int field must not accept true/false
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise HandshakeError("bad-hello", f"{where}: field {key!r} must be {name}", offset)
    return value


def _int_in(obj: JsonObject, key: str, lo: int, hi: int, where: str, offset: int) -> int:
    value = _need(obj, key, int, where, offset)
    if not lo <= value <= hi:
        raise HandshakeError("bad-hello", f"{where}: {key}={value} outside {lo}..{hi}", offset)
    return value


def _str_max(obj: JsonObject, key: str, cap: int, where: str, offset: int) -> str:
    value = _need(obj, key, str, where, offset)
    if len(value) > cap:
        raise HandshakeError("bad-hello", f"{where}: {key} longer than {cap} characters", offset)
    return value


def _load_json(body: bytes, offset: int, code: str = "bad-hello") -> dict[str, object]:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HandshakeError(code, f"body is not UTF-8 JSON: {exc}", offset) from None
    if not isinstance(obj, dict):
        raise HandshakeError(code, "body is not a JSON object", offset)
    return obj


def _dump_json(obj: JsonObject) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(body) > MAX_HELLO_BYTES:
        raise ProtocolError(f"handshake body of {len(body)} bytes exceeds {MAX_HELLO_BYTES}")
    return body


def _clip(text: str, cap: int = MAX_REASON_BYTES) -> bytes:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= cap:
        return raw
    return raw[:cap].decode("utf-8", "ignore").encode("utf-8")


def _hello_obj(hello: Hello) -> dict[str, object]:
    obj: dict[str, object] = {
        "session": hello.session_id,
        "generation": hello.generation,
        "software": hello.software,
        "options": asdict(hello.options),
        "domain": asdict(hello.domain),
    }
    if hello.witness is not None:  # optional: absent when the sender has no witness
        obj["witness"] = {"key": hello.witness.key, "revision": hello.witness.revision}
    return obj


def encode_hello(hello: Hello) -> bytes:
    """The bytes of a HELLO (prefix + JSON body)."""
    validate_hello(hello)
    body = _dump_json(_hello_obj(hello))
    return PREFIX.pack(HELLO_MAGIC, hello.version, 0, len(body)) + body


def parse_hello_body(obj: JsonObject, version: int, offset: int = 0) -> Hello:
    """A Hello from its decoded JSON object; HandshakeError naming the bad field."""
    session = _need(obj, "session", str, "hello", offset)
    if not _HEX32.match(session):
        raise HandshakeError("bad-hello", "hello: session must be 32 lowercase hex digits", offset)
    generation = _int_in(obj, "generation", 0, (1 << 63) - 1, "hello", offset)
    software = _str_max(obj, "software", MAX_SOFTWARE_LEN, "hello", offset)
    o = _need(obj, "options", dict, "hello", offset)
    codec = _need(o, "codec", str, "options", offset)
    if codec not in CODECS:
        raise HandshakeError(
            "codec", f"options: unknown codec {codec[:32]!r} (known: {', '.join(CODECS)})", offset
        )
    options = Options(
        codec=codec,
        cache_pages=_int_in(o, "cache_pages", 1, MAX_CACHE_PAGES, "options", offset),
        buffer_pages=_int_in(o, "buffer_pages", 1, MAX_CACHE_PAGES, "options", offset),
        interval_ms=_int_in(o, "interval_ms", 1, MAX_INTERVAL_MS, "options", offset),
        heartbeat_ms=_int_in(o, "heartbeat_ms", 1, MAX_INTERVAL_MS, "options", offset),
        verify=_need(o, "verify", bool, "options", offset),
        # optional: a sender that predates it means "unknown"
        ack_ms=_int_in(o, "ack_ms", 0, MAX_ACK_MS - 1, "options", offset) if "ack_ms" in o else 0,
        wire=_wire_in(o, offset),
    )
    d = _need(obj, "domain", dict, "hello", offset)
    name = _str_max(d, "name", MAX_NAME_LEN, "domain", offset)
    if not name or not name.isprintable():
        raise HandshakeError("bad-hello", "domain: name must be non-empty printable text", offset)
    uuid = _need(d, "uuid", str, "domain", offset)
    if not _UUID.match(uuid):
        raise HandshakeError("bad-hello", "domain: uuid is not of the form 8-4-4-4-12 hex", offset)
    extra = _need(d, "extra", dict, "domain", offset)
    if len(json.dumps(extra)) > MAX_EXTRA_BYTES:
        raise HandshakeError("bad-hello", f"domain: extra longer than {MAX_EXTRA_BYTES}", offset)
    domain = DomainConfig(
        name=name,
        uuid=uuid.lower(),
        pages=_int_in(d, "pages", 1, MAX_PAGES, "domain", offset),
        vcpus=_int_in(d, "vcpus", 1, MAX_VCPUS, "domain", offset),
        hvm=_need(d, "hvm", bool, "domain", offset),
        extra=extra,
        disks=_disks_in(d, offset),
    )
    witness = None
    if "witness" in obj:  # optional
        w = _need(obj, "witness", dict, "hello", offset)
        key = _str_max(w, "key", MAX_WITNESS_KEY_LEN, "witness", offset)
        if not key.startswith("/") or not key.isprintable():
            raise HandshakeError("bad-hello", "witness: key must be a printable /path", offset)
        witness = WitnessClaim(key, _int_in(w, "revision", 1, (1 << 63) - 1, "witness", offset))
    return Hello(
        session_id=session,
        options=options,
        domain=domain,
        generation=generation,
        software=software,
        version=version,
        witness=witness,
    )


def _wire_in(o: JsonObject, offset: int) -> tuple[str, ...]:
    """The optional ``wire`` list of a HELLO's options: codec names, kept as
    sent (a receiver picks the first it knows; names it does not know are a
    newer sender's, not an error)."""
    if "wire" not in o:
        return ()
    raw = _need(o, "wire", list, "options", offset)
    if len(raw) > MAX_WIRE_CODECS:
        raise HandshakeError(
            "bad-hello", f"options: wire lists {len(raw)} codecs, at most {MAX_WIRE_CODECS}", offset
        )
    for v in raw:
        if (
            type(v) is not str
            or not v
            or len(v) > MAX_WIRE_NAME
            or not v.isascii()
            or not v.isprintable()
        ):
            raise HandshakeError(
                "bad-hello",
                f"options: wire codec {str(v)[:32]!r} is not a name of 1..{MAX_WIRE_NAME} "
                "printable ASCII characters",
                offset,
            )
    return tuple(raw)


def wire_offered(hello: Hello, wire: str) -> bool:
    """Whether an ACCEPT may pick ``wire``: the HELLO offered it and this
    release can carry it (one rule for both ends)."""
    return wire in hello.options.wire and wire in WIRE_CODECS


def pick_wire(offered: tuple[str, ...]) -> str:
    """The receiver's choice among a HELLO's wire codecs: the first this
    release can decode ("" for none)."""
    return next((name for name in offered if name in WIRE_CODECS), "")


def _disks_in(d: JsonObject, offset: int) -> tuple[int, ...]:
    """The optional ``disks`` list of a HELLO's domain: sizes in bytes."""
    if "disks" not in d:
        return ()
    raw = _need(d, "disks", list, "domain", offset)
    if len(raw) > MAX_DISKS:
        raise HandshakeError("bad-hello", f"domain: {len(raw)} disks, at most {MAX_DISKS}", offset)
    sector = 1 << MIN_SECTOR_SHIFT
    sizes = []
    for i, v in enumerate(raw):
        if type(v) is not int or not sector <= v <= MAX_DISK_BYTES or v % sector:
            raise HandshakeError(
                "bad-hello",
                f"domain: disk {i} size {v!r} is not a multiple of {sector} "
                f"in {sector}..{MAX_DISK_BYTES}",
                offset,
            )
        sizes.append(v)
    return tuple(sizes)


def validate_hello(hello: Hello) -> None:
    """Check a Hello the way the receiver will (the sender calls this on its own)."""
    obj = json.loads(json.dumps(_hello_obj(hello)))
    parse_hello_body(obj, hello.version)


def encode_accept(accept: Accept) -> bytes:
    obj: dict[str, object] = {
        "session": accept.session_id,
        "failover_timeout_ms": accept.failover_timeout_ms,
        "heartbeat_ms": accept.heartbeat_ms,
        "limits": accept.limits,
        "software": accept.software,
    }
    if accept.witness:  # optional: absent means false
        obj["witness"] = True
    if accept.switchover:  # optional: absent means false
        obj["switchover"] = True
    if accept.disks:  # optional: absent means false
        obj["disks"] = True
    if accept.wire:  # optional: absent means the raw stream
        obj["wire"] = accept.wire
    body = _dump_json(obj)
    return PREFIX.pack(REPLY_MAGIC, accept.version, REPLY_ACCEPT, len(body)) + body


def encode_refuse(refuse: Refuse) -> bytes:
    code = refuse.code if refuse.code in REFUSE_CODES else "internal"
    reason = _clip(refuse.reason).decode("utf-8")
    body = _dump_json({"code": code, "reason": reason})
    return PREFIX.pack(REPLY_MAGIC, refuse.version, REPLY_REFUSE, len(body)) + body


def encode_frame(ftype: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(ftype, flags, len(payload)) + payload


# --- the two ends ----------------------------------------------------------


class _Buffer:
    """Bytes received and not yet consumed, with their absolute offset."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.offset = 0  # absolute offset of buf[0] in the connection

    def add(self, data: bytes | bytearray | memoryview) -> None:
        self.buf += data

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.offset += n
        return out


class ReceiverSession:
    """The receiver's end of one session.

    feed() bytes from the sender; it returns [HelloReceived] once, then (after
    accept()) StreamData events. Answer the HELLO with accept() or refuse(),
    then use ack()/heartbeat()/error()/goodbye() for the frames to send. After
    accept(), call feed(b"") to get any stream bytes that arrived with the
    HELLO. Any HELLO that cannot be served raises HandshakeError: send
    refuse_for(exc) and close.
    """

    def __init__(
        self,
        min_version: int = MIN_PROTOCOL_VERSION,
        max_version: int = PROTOCOL_VERSION,
        max_early_bytes: int = 1 << 20,
    ) -> None:
        self.min_version = min_version
        self.max_version = max_version
        #: stream bytes a sender may push before our ACCEPT (it should not)
        self.max_early_bytes = max_early_bytes
        self.state = "hello"  # hello -> deciding -> streaming | closed
        #: this receiver fails over only under the witness: its ACCEPT says
        #: ``"witness": true`` (set by the receiver before it accepts)
        self.accept_witness = False
        self.hello: Hello | None = None
        self._in = _Buffer()
        self.bytes_in = 0
        #: the wire decoder once an ACCEPT picked a wire codec (None: raw stream)
        self._wire: WireDecoder | None = None

    @property
    def wire_counts(self) -> WireCounts | None:
        """Segments and bytes the wire decoder carried (None: raw stream)."""
        return self._wire.counts if self._wire is not None else None

    def feed(self, data: bytes | bytearray | memoryview) -> list[ReceiverEvent]:
        self.bytes_in += len(data)
        if self.state == "streaming":
            if self._in.buf:
                data = self._in.take(len(self._in.buf)) + bytes(data)
            self._in.offset += len(data)
            if self._wire is not None:
                try:
                    return [StreamData(raw) for raw in self._wire.feed(data)]
                except WireError as e:
                    raise StreamBroken(str(e), [StreamData(raw) for raw in e.out]) from None
            return [StreamData(data)] if len(data) else []
        if self.state == "closed":
            if len(data):
                raise ProtocolError("data received after the session was closed")
            return []
        self._in.add(data)
        if self.state == "deciding":
            if len(self._in.buf) > self.max_early_bytes:
                raise ProtocolError(
                    f"byte {self._in.offset}: more than {self.max_early_bytes} "
                    "bytes of stream sent before ACCEPT"
                )
            return []
        return self._parse_hello()

    @property
    def passthrough(self) -> bool:
        """Streaming with nothing held back: the next bytes received are
        stream bytes that may go to the stream decoder without ``feed`` (count
        them with ``streamed``), at most ``direct_limit`` of them."""
        if self.state != "streaming" or self._in.buf:
            return False
        return self._wire is None or self._wire.raw_left > 0

    @property
    def direct_limit(self) -> int | None:
        """How many bytes ``passthrough`` allows (None: no limit; with wire
        compression, what is left of the raw segment being read)."""
        return None if self._wire is None else self._wire.raw_left

    def streamed(self, n: int) -> None:
        """``n`` stream bytes went to the decoder directly (``passthrough``)."""
        limit = self.direct_limit
        if not self.passthrough or (limit is not None and n > limit):
            raise ProtocolError(
                f"streamed({n}) in state {self.state} with {len(self._in.buf)} bytes held "
                f"back, {limit} allowed"
            )
        if self._wire is not None:
            self._wire.skip_raw(n)
        self.bytes_in += n
        self._in.offset += n

    def _parse_hello(self) -> list[ReceiverEvent]:
        buf = self._in.buf
        # check the magic as far as it has arrived: fail fast on garbage
        head = bytes(buf[:8])
        if head != HELLO_MAGIC[: len(head)]:
            raise HandshakeError("bad-hello", f"not a Remus session (bad HELLO magic {head!r})", 0)
        if len(buf) < PREFIX.size:
            return []
        _, version, status, length = PREFIX.unpack_from(buf)
        if not self.min_version <= version <= self.max_version:
            who = "too old" if version < self.min_version else "too new"
            raise HandshakeError(
                "version",
                f"sender speaks protocol version {version}, {who} for this receiver "
                f"(it speaks {self.min_version}..{self.max_version}); upgrade the "
                f"{'sender' if version < self.min_version else 'receiver'}",
                8,
            )
        if status != 0:
            raise HandshakeError("bad-hello", f"HELLO status field is {status}, must be 0", 10)
        if not 2 <= length <= MAX_HELLO_BYTES:
            raise HandshakeError(
                "bad-hello", f"HELLO body length {length} outside 2..{MAX_HELLO_BYTES}", 12
            )
        if len(buf) < PREFIX.size + length:
            return []
        self._in.take(PREFIX.size)
        body = self._in.take(length)
        hello = parse_hello_body(_load_json(body, PREFIX.size), version, PREFIX.size)
        self.hello = hello
        self.state = "deciding"
        return [HelloReceived(hello)]

    def eof(self) -> None:
        """The sender closed: ProtocolError if it did so inside the handshake."""
        if self.state in ("hello", "deciding") and (self._in.buf or self.state == "hello"):
            raise ProtocolError(
                f"byte {self._in.offset + len(self._in.buf)}: connection closed "
                "during the handshake"
            )
        self.state = "closed"

    def accept(self, accept: Accept) -> bytes:
        if self.state != "deciding":
            raise ProtocolError(f"accept() in state {self.state}")
        if accept.wire and (self.hello is None or not wire_offered(self.hello, accept.wire)):
            raise ProtocolError(
                f"accept() picks wire codec {accept.wire!r}, which the HELLO did not offer"
            )
        self.state = "streaming"
        if self.accept_witness and not accept.witness:
            accept = replace(accept, witness=True)
        if accept.wire:
            self._wire = WireDecoder(accept.wire, offset=self._in.offset)
        return encode_accept(accept)

    def refuse(self, code: str, reason: str) -> bytes:
        self.state = "closed"
        return encode_refuse(Refuse(code, reason, self.max_version))

    @staticmethod
    def refuse_for(exc: HandshakeError) -> Refuse:
        return Refuse(exc.code, str(exc))

    def ack(self, index: int, verified: bool = False, mismatch: bool = False) -> bytes:
        flags = (ACK_VERIFIED if verified else 0) | (ACK_MISMATCH if mismatch else 0)
        return encode_frame(FRAME_ACK, flags, _U64.pack(index))

    def heartbeat(self, last_committed: int | None) -> bytes:
        value = NO_CHECKPOINT if last_committed is None else last_committed
        return encode_frame(FRAME_HEARTBEAT, 0, _U64.pack(value))

    def error(self, code: int, reason: str) -> bytes:
        self.state = "closed"
        return encode_frame(FRAME_ERROR, code, _clip(reason))

    def goodbye(self, reason: str) -> bytes:
        self.state = "closed"
        return encode_frame(FRAME_GOODBYE, 0, _clip(reason))

    def disk_hashes(self, message: HashesMessage) -> bytes:
        return encode_frame(FRAME_DISK_HASHES, 0, message.pack())


class SenderSession:
    """The sender's end of one session.

    hello() gives the bytes to send first; feed() the receiver's bytes to get
    Accepted / Refused once, then Ack / Heartbeat / Error / Goodbye events.
    Send the legacy stream only after Accepted.
    """

    def __init__(self, hello: Hello, min_version: int = MIN_PROTOCOL_VERSION) -> None:
        validate_hello(hello)
        self._hello = hello
        self.min_version = min_version
        self.state = "new"  # new -> waiting -> established | refused | closed
        self.accept: Accept | None = None
        self._in = _Buffer()

    def hello(self) -> bytes:
        if self.state != "new":
            raise ProtocolError("hello() called twice")
        self.state = "waiting"
        return encode_hello(self._hello)

    def feed(self, data: bytes | bytearray | memoryview) -> list[SenderEvent]:
        if self.state in ("refused", "closed"):
            if len(data):
                raise ProtocolError("data received after the session ended")
            return []
        if self.state == "new":
            raise ProtocolError("data received before HELLO was sent")
        self._in.add(data)
        events: list[SenderEvent] = []
        if self.state == "waiting":
            ev = self._parse_reply()
            if ev is None:
                return events
            events.append(ev)
        while self.state == "established":
            frame = self._parse_frame()
            if frame is None:
                break
            events.append(frame)
        return events

    def _parse_reply(self) -> Accepted | Refused | None:
        buf = self._in.buf
        head = bytes(buf[:8])
        if head != REPLY_MAGIC[: len(head)]:
            raise HandshakeError(
                "bad-hello", f"the peer is not a Remus receiver (bad reply magic {head!r})", 0
            )
        if len(buf) < PREFIX.size:
            return None
        _, version, status, length = PREFIX.unpack_from(buf)
        if status not in (REPLY_ACCEPT, REPLY_REFUSE):
            raise HandshakeError("bad-hello", f"reply status {status} unknown", 10)
        if not 2 <= length <= MAX_HELLO_BYTES:
            raise HandshakeError(
                "bad-hello", f"reply body length {length} outside 2..{MAX_HELLO_BYTES}", 12
            )
        if len(buf) < PREFIX.size + length:
            return None
        self._in.take(PREFIX.size)
        obj = _load_json(self._in.take(length), PREFIX.size)
        off = PREFIX.size
        if status == REPLY_REFUSE:
            # read leniently: a refusal from any version must reach the operator
            raw_code, raw_reason = obj.get("code"), obj.get("reason")
            code = raw_code if isinstance(raw_code, str) else "internal"
            reason = raw_reason if isinstance(raw_reason, str) else "(no reason)"
            self.state = "refused"
            return Refused(Refuse(code[:32], reason[:MAX_REASON_BYTES], version))
        if not self.min_version <= version <= self._hello.version:
            raise HandshakeError(
                "version",
                f"receiver accepted with protocol version {version}; "
                f"this sender speaks {self.min_version}..{self._hello.version}",
                8,
            )
        session = _need(obj, "session", str, "accept", off)
        if session != self._hello.session_id:
            raise HandshakeError("bad-hello", "accept names another session id", off)
        accept = Accept(
            session_id=session,
            failover_timeout_ms=_int_in(
                obj, "failover_timeout_ms", 1, MAX_INTERVAL_MS, "accept", off
            ),
            heartbeat_ms=_int_in(obj, "heartbeat_ms", 1, MAX_INTERVAL_MS, "accept", off),
            limits=_need(obj, "limits", dict, "accept", off),
            software=_str_max(obj, "software", MAX_SOFTWARE_LEN, "accept", off),
            version=version,
            witness=_need(obj, "witness", bool, "accept", off) if "witness" in obj else False,
            switchover=(
                _need(obj, "switchover", bool, "accept", off) if "switchover" in obj else False
            ),
            disks=_need(obj, "disks", bool, "accept", off) if "disks" in obj else False,
            wire=_need(obj, "wire", str, "accept", off) if "wire" in obj else "",
        )
        if accept.wire and not wire_offered(self._hello, accept.wire):
            raise HandshakeError(
                "bad-hello",
                f"accept picks wire codec {accept.wire[:32]!r}, which the HELLO did not offer",
                off,
            )
        self.accept = accept
        self.state = "established"
        return Accepted(accept)

    def _parse_frame(self) -> Ack | Heartbeat | Error | Goodbye | DiskHashes | None:
        buf = self._in.buf
        if len(buf) < FRAME_HEADER.size:
            return None
        off = self._in.offset
        ftype, flags, length = FRAME_HEADER.unpack_from(buf)
        if ftype in (FRAME_ACK, FRAME_HEARTBEAT):
            if length != 8:
                raise ProtocolError(
                    f"byte {off}: {FRAME_NAMES[ftype]} frame with payload "
                    f"length {length}, must be 8"
                )
        elif ftype in (FRAME_ERROR, FRAME_GOODBYE):
            if length > MAX_REASON_BYTES:
                raise ProtocolError(
                    f"byte {off}: {FRAME_NAMES[ftype]} reason of {length} bytes "
                    f"exceeds {MAX_REASON_BYTES}"
                )
        elif ftype == FRAME_DISK_HASHES:
            if not self._hello.domain.disks:
                raise ProtocolError(f"byte {off}: DISK_HASHES for a domain without disks")
            if length > MAX_DISK_HASHES_BYTES:
                raise ProtocolError(
                    f"byte {off}: DISK_HASHES of {length} bytes exceeds {MAX_DISK_HASHES_BYTES}"
                )
        else:
            raise ProtocolError(f"byte {off}: unknown frame type {ftype}")
        if ftype == FRAME_ACK and flags & ~(ACK_VERIFIED | ACK_MISMATCH):
            raise ProtocolError(f"byte {off}: ACK flags {flags:#x} unknown")
        if ftype in (FRAME_HEARTBEAT, FRAME_GOODBYE, FRAME_DISK_HASHES) and flags:
            raise ProtocolError(f"byte {off}: {FRAME_NAMES[ftype]} flags must be 0")
        if len(buf) < FRAME_HEADER.size + length:
            return None
        self._in.take(FRAME_HEADER.size)
        payload = self._in.take(length)
        if ftype == FRAME_ACK:
            (index,) = _U64.unpack(payload)
            return Ack(index, bool(flags & ACK_VERIFIED), bool(flags & ACK_MISMATCH))
        if ftype == FRAME_HEARTBEAT:
            (value,) = _U64.unpack(payload)
            return Heartbeat(None if value == NO_CHECKPOINT else value)
        if ftype == FRAME_DISK_HASHES:
            try:
                msg = HashesMessage.unpack(
                    bytes(payload), disk_sizes=list(self._hello.domain.disks), block=DISK_HASH_BLOCK
                )
            except ProtocolError as e:
                raise ProtocolError(f"byte {off}: {e}") from None
            return DiskHashes(msg)
        text = payload.decode("utf-8", "replace")
        self.state = "closed"
        if ftype == FRAME_ERROR:
            return Error(flags, text)
        return Goodbye(text)

    def eof(self) -> None:
        """The receiver closed; ProtocolError if it did so inside a reply or frame."""
        if self._in.buf:
            raise ProtocolError(
                f"byte {self._in.offset + len(self._in.buf)}: connection closed inside a frame"
            )
        if self.state == "waiting":
            raise ProtocolError("connection closed before the receiver answered the HELLO")
        self.state = "closed"


def new_session_id() -> str:
    """A random 128-bit session id, as 32 lowercase hex digits."""
    import secrets

    return secrets.token_hex(16)
