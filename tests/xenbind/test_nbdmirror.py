"""The mirroring block server (xenbind/nbdmirror.py) under a real nbdkit, driven
by a real NBD client (Debian's python3-libnbd), its stream read back by
xenbind.mirrorclient and checked with xenbind.diskstream.Decoder.

The oracle: the stream's records applied, in order, to a copy of the disks as
they were when the mirror started reproduce the disks byte for byte at every
seal. Skipped when nbdkit, its python plugin or libnbd is missing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xenbind import diskstream, mirrorclient, nbdmirror
from xenbind.mirrorclient import (
    MirrorClient,
    MirrorError,
    MirrorLost,
    MirrorRefused,
    MirrorStream,
    MirrorTimeout,
    SealPoint,
)

SECTOR = nbdmirror.SECTOR
SIZES = [3 << 20, 384 << 10]  # two disks, the second not a multiple of a MiB


# ------------------------------------------------------------ MirrorStream


def _pair() -> tuple[socket.socket, MirrorStream]:
    a, b = socket.socketpair()
    return a, MirrorStream(b, b"he")


def test_take_returns_exactly_the_bytes_up_to_end_splitting_pieces() -> None:
    peer, s = _pair()
    peer.sendall(b"llo")
    first = s.take(3, timeout=5)
    assert b"".join(first) == b"hel" and s.taken == 3
    peer.sendall(b" world")
    assert b"".join(s.take(8, timeout=5)) == b"lo wo"
    assert s.take(8, timeout=5) == []
    with pytest.raises(ValueError, match="already taken"):
        s.take(7)
    with pytest.raises(MirrorTimeout, match="byte 20 not reached"):
        s.take(20, timeout=0.05)
    peer.sendall(b"!")
    s.take(12, timeout=5)
    assert s.received == 12 and s.buffered == 0
    peer.close()
    assert s.wait_lost(5) == "EOF"
    with pytest.raises(MirrorLost, match="EOF at byte 12, before byte 13"):
        s.take(13, timeout=5)
    s.close()


def test_take_available_and_close() -> None:
    peer, s = _pair()
    peer.sendall(b"xyz")
    s.take(1, timeout=5)
    s.take(5, timeout=5)  # waits for the reader: all five arrived
    peer.sendall(b"12")
    while s.received < 7:
        s.wait_lost(0.01)
    assert s.buffered == 2 and b"".join(s.take_available()) == b"12" and s.buffered == 0
    s.close()
    assert s.lost == "closed"
    peer.close()


# ---------------------------------------------------------------- fixtures


def _needs() -> Any:
    why = mirrorclient.missing()
    if why:
        pytest.skip(why)
    try:
        return mirrorclient.load_libnbd()
    except MirrorError as e:
        pytest.skip(str(e))


@dataclass
class Served:
    """One nbdkit with the plugin on temp disks, and what the test knows."""

    dir: Path
    disks: list[Path]
    nbd_socket: str
    control: str
    proc: Any
    client: MirrorClient
    nbd: Any  # the libnbd module
    handles: list[Any] = field(default_factory=list)

    def connect(self, export: str = "") -> Any:
        h = self.nbd.NBD()
        h.set_export_name(export)
        h.connect_unix(self.nbd_socket)
        self.handles.append(h)
        return h

    def images(self) -> list[bytes]:
        return [p.read_bytes() for p in self.disks]


def _serve(
    nbd: Any, stall: float | None = None, argv_edit: Any = None, queue: int | None = None
) -> Served:
    d = Path(tempfile.mkdtemp(prefix="nbdm", dir="/tmp"))  # short: socket paths <= 107
    rng = random.Random(13)
    disks = []
    for i, size in enumerate(SIZES):
        p = d / f"disk{i}.img"
        p.write_bytes(rng.randbytes(size))
        disks.append(p)
    nbd_socket, control = str(d / "nbd.sock"), str(d / "ctl.sock")
    err = open(d / "nbdkit.log", "wb")  # noqa: SIM115 (closed with the process)
    if argv_edit is None:
        proc = mirrorclient.start_server(
            [str(p) for p in disks], nbd_socket, control, stall=stall, queue=queue, stderr=err
        )
    else:
        argv = argv_edit(nbdmirror.command([str(p) for p in disks], nbd_socket, control))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err)
        while not os.path.exists(control):
            assert proc.poll() is None, (d / "nbdkit.log").read_text()
            time.sleep(0.01)
    err.close()
    return Served(d, disks, nbd_socket, control, proc, MirrorClient(control, timeout=10), nbd)


def _stop(s: Served) -> None:
    for h in s.handles:
        try:
            h.shutdown()
        except Exception:
            pass
    s.client.close()
    s.proc.terminate()
    s.proc.wait(10)
    shutil.rmtree(s.dir, ignore_errors=True)


@pytest.fixture
def served() -> Iterator[Any]:
    nbd = _needs()
    made: list[Served] = []

    def make(**kw: Any) -> Served:
        s = _serve(nbd, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        _stop(s)


# ------------------------------------------------------------------ oracle


class Replica:
    """Decodes a stream and applies it to a copy of the disks."""

    def __init__(self, images: list[bytes]) -> None:
        self.disks = [bytearray(b) for b in images]
        self.dec = diskstream.Decoder()
        self.events: list[diskstream.Event] = []

    def feed(self, pieces: list[bytes]) -> list[diskstream.Event]:
        out: list[diskstream.Event] = []
        for p in pieces:
            out += self.dec.feed(p)
        for ev in out:
            if isinstance(ev, diskstream.Write):
                self.disks[ev.disk][ev.offset : ev.offset + len(ev.data)] = ev.data
            elif isinstance(ev, diskstream.Zero):
                self.disks[ev.disk][ev.offset : ev.offset + ev.length] = bytes(ev.length)
        self.events += out
        return out

    def seal_at(self, stream: MirrorStream, point: SealPoint) -> list[diskstream.Event]:
        """Feed exactly up to the seal: the last event must be that seal."""
        out = self.feed(stream.take(point.end, timeout=10))
        assert self.dec.received == point.end
        assert isinstance(out[-1], diskstream.Seal) and out[-1].epoch == point.epoch
        return out


def _records(events: list[diskstream.Event]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for ev in events:
        if isinstance(ev, diskstream.Write):
            out.append(("W", ev.disk, ev.offset, ev.data, ev.sync))
        elif isinstance(ev, diskstream.Zero):
            out.append(("Z", ev.disk, ev.offset, ev.length))
    return out


def _wait_info(client: MirrorClient, done: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``info`` until ``done(info)`` (a generous bound, not a timing check)."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.info()
        if done(info) or time.monotonic() > deadline:
            assert done(info), info
            return info
        time.sleep(0.01)


# ------------------------------------------------------------------- tests


def test_info_exports_and_default_export(served: Any) -> None:
    s = served()
    info = s.client.info()
    assert info["disks"] == [
        {"path": str(p), "size": n} for p, n in zip(s.disks, SIZES, strict=True)
    ]
    assert info["sector_shift"] == 9 and info["mirroring"] is False and info["epoch"] is None
    h = s.nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(s.nbd_socket)
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name))
    h.opt_abort()
    assert names == ["0", "1"]
    assert s.connect("").get_size() == SIZES[0]
    assert s.connect("0").get_size() == SIZES[0]
    assert s.connect("1").get_size() == SIZES[1]
    bad = s.nbd.NBD()
    bad.set_export_name("2")
    with pytest.raises(s.nbd.Error):
        bad.connect_unix(s.nbd_socket)


def test_writes_are_mirrored_in_order_and_seals_cut_epochs(served: Any) -> None:
    s = served()
    rng = random.Random(1)
    h = [s.connect("0"), s.connect("1")]
    replica = Replica(s.images())
    stream = s.client.start(first_epoch=5)
    assert s.client.info()["epoch"] == 5
    for epoch in range(5, 9):
        expect: list[tuple[Any, ...]] = []
        for _ in range(20):
            d = rng.randrange(2)
            kind = rng.random()
            n = rng.choice([1, 8, 64, 256]) * SECTOR
            off = rng.randrange(0, SIZES[d] - n + 1, SECTOR)
            if kind < 0.7:
                data = rng.randbytes(n)
                fua = s.nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
                h[d].pwrite(data, off, fua)
                expect.append(("W", d, off, data, False))
            elif kind < 0.85:
                h[d].zero(n, off)
                expect.append(("Z", d, off, n))
            else:
                h[d].trim(n, off)
                expect.append(("Z", d, off, n))
        h[0].flush()
        point = s.client.seal()
        assert point.epoch == epoch
        events = replica.seal_at(stream, point)
        if epoch == 5:
            assert isinstance(events[0], diskstream.Header)
            assert events[0].first_epoch == 5 and events[0].disk_sizes == tuple(SIZES)
        assert _records(events) == expect
        assert [bytes(b) for b in replica.disks] == s.images()
    # a write larger than one record: split in order, the image reproduced
    big = rng.randbytes(SIZES[0] - 4096)
    h[0].pwrite(big, 4096)
    point = s.client.seal()
    events = replica.seal_at(stream, point)
    writes = [e for e in events if isinstance(e, diskstream.Write)]
    assert len(writes) > 1 and all(len(w.data) <= nbdmirror.MAX_RECORD for w in writes)
    assert b"".join(w.data for w in writes) == big
    assert [bytes(b) for b in replica.disks] == s.images()
    info = s.client.info()
    assert info["epoch"] == 10 and info["sent"] == point.end and info["seal_time"]["seals"] == 5


def test_unaligned_client_writes_become_whole_sectors(served: Any) -> None:
    s = served()
    h = s.connect("1")
    replica = Replica(s.images())
    stream = s.client.start(0)
    h.pwrite(b"0123456789", 3)
    h.pwrite(os.urandom(1000), 700)
    h.zero(100, 5000)
    h.pwrite(b"tail", SIZES[1] - 4)
    events = replica.seal_at(stream, s.client.seal())
    for e in events:
        if isinstance(e, diskstream.Write | diskstream.Zero):
            n = len(e.data) if isinstance(e, diskstream.Write) else e.length
            assert e.offset % SECTOR == 0 and n % SECTOR == 0
    assert len(_records(events)) >= 4  # the filter may cut a request's head and tail apart
    image = s.images()[1]
    assert image[3:13] == b"0123456789" and image[5000:5100] == bytes(100)
    assert image[-4:] == b"tail"
    assert [bytes(b) for b in replica.disks] == s.images()


def test_the_plugin_itself_refuses_unaligned_io(served: Any) -> None:
    def no_filter(argv: list[str]) -> list[str]:
        return [a for a in argv if not a.startswith(("--filter=", "minblock=", "maxdata="))]

    s = served(argv_edit=no_filter)
    h = s.connect("0")
    with pytest.raises(s.nbd.Error) as e:
        h.pwrite(b"x" * 10, 3)
    assert e.value.errno == "EINVAL"
    h.pwrite(b"y" * SECTOR, SECTOR)  # aligned: fine
    assert s.images()[0][SECTOR : 2 * SECTOR] == b"y" * SECTOR


def test_sync_sends_runs_with_zero_chunks_as_zero_records(served: Any) -> None:
    s = served()
    mib = 1 << 20
    s.connect("0").zero(mib, mib)  # disk 0's second MiB reads as zeros
    s.connect("1").zero(4096, 0)
    replica = Replica([bytes(n) for n in SIZES])  # the backup: a fresh sparse disk
    stream = s.client.start(0)
    runs = [
        (0, 100, 300),  # rounds out to one sector
        (0, 0, 3 * mib),  # three chunks: data, zeros, data
        (1, 0, 4096),  # zeros
        (1, SIZES[1] - 1000, mib),  # rounded out, then clipped to the disk's end
    ]
    assert s.client.sync(runs) == SECTOR + 3 * mib + 4096 + 1024
    events = replica.seal_at(stream, s.client.seal())
    image = s.images()
    assert _records(events) == [
        ("W", 0, 0, image[0][:SECTOR], True),
        ("W", 0, 0, image[0][:mib], True),
        ("Z", 0, mib, mib),
        ("W", 0, 2 * mib, image[0][2 * mib :], True),
        ("Z", 1, 0, 4096),
        ("W", 1, SIZES[1] - 1024, image[1][-1024:], True),
    ]
    assert bytes(replica.disks[0]) == image[0]


def test_sync_raced_by_guest_writes_converges(served: Any) -> None:
    s = served()
    replica = Replica([bytes(n) for n in SIZES])  # nothing in common with the primary
    stream = s.client.start(0)
    stop = threading.Event()
    count = [0]

    def guest() -> None:
        h = s.nbd.NBD()
        h.connect_unix(s.nbd_socket)
        rng = random.Random(7)
        while not stop.is_set():
            n = rng.choice([1, 8, 128]) * SECTOR
            h.pwrite(rng.randbytes(n), rng.randrange(0, SIZES[0] - n + 1, SECTOR))
            count[0] += 1
        h.shutdown()

    t = threading.Thread(target=guest)
    t.start()
    try:
        for _ in range(3):  # syncs of the whole disk 0, raced by the guest
            assert s.client.sync([(0, 0, SIZES[0])]) == SIZES[0]
    finally:
        stop.set()
        t.join(10)
    s.client.sync([(1, 0, SIZES[1])])
    replica.seal_at(stream, s.client.seal())
    assert count[0] > 0
    kinds = [e.sync for e in replica.events if isinstance(e, diskstream.Write)]
    first_sync, last_sync = kinds.index(True), len(kinds) - 1 - kinds[::-1].index(True)
    assert False in kinds[first_sync:last_sync]  # guest writes landed between sync chunks
    assert [bytes(b) for b in replica.disks] == s.images()


def test_bad_sync_runs_are_refused_naming_the_run_and_append_nothing(served: Any) -> None:
    s = served()
    stream = s.client.start(0)
    before = s.client.seal()
    for runs, text in [
        ([(2, 0, 512)], r"run 0 \[2, 0, 512\]: no disk 2"),
        ([(0, 0, 512), (1, SIZES[1], 512)], rf"run 1 \[1, {SIZES[1]}, 512\]: outside disk 1"),
        ([(0, -512, 512)], "outside disk 0"),
        ([(0, 0, 0)], "outside disk 0"),
    ]:
        with pytest.raises(MirrorRefused, match=text):
            s.client.sync(runs)
    with pytest.raises(MirrorRefused, match=r"run 0 \[0, 1\] is not \[disk, offset, length\]"):
        s.client.request({"op": "sync", "runs": [[0, 1]]})
    with pytest.raises(MirrorRefused, match="runs must be a list"):
        s.client.request({"op": "sync", "runs": "all"})
    after = s.client.seal()
    assert after.end == before.end + diskstream.RECORD_HEAD_SIZE  # only the empty epoch's SEAL
    replica = Replica(s.images())
    replica.feed(stream.take(after.end, timeout=10))
    assert _records(replica.events) == []


def test_a_second_mirror_replaces_the_first(served: Any) -> None:
    s = served()
    h = s.connect("0")
    first = s.client.start(0)
    h.pwrite(b"a" * SECTOR, 0)
    replica = Replica(s.images())
    second = s.client.start(3)
    assert first.wait_lost(10) == "EOF"
    h.pwrite(b"b" * SECTOR, SECTOR)
    point = s.client.seal()
    assert point.epoch == 3
    events = replica.seal_at(second, point)
    assert isinstance(events[0], diskstream.Header) and events[0].first_epoch == 3
    assert _records(events) == [("W", 0, SECTOR, b"b" * SECTOR, False)]
    first.close()
    second.close()


def test_stop_ends_the_stream_and_writes_go_on_locally(served: Any) -> None:
    s = served()
    h = s.connect("0")
    stream = s.client.start(0)
    assert s.client.stop() is True
    assert stream.wait_lost(10) == "EOF"
    h.pwrite(b"c" * SECTOR, 0)
    assert s.images()[0][:SECTOR] == b"c" * SECTOR
    info = s.client.info()
    assert info["mirroring"] is False and "stopped" in info["last_drop"]
    assert s.client.stop() is False
    stream.close()


def test_a_consumer_that_stops_reading_is_dropped_and_writes_go_on(served: Any) -> None:
    s = served(stall=0.3)
    h = s.connect("0")
    # a consumer that asks for the mirror and then never reads
    c = socket.socket(socket.AF_UNIX)
    c.connect(s.control)
    c.sendall(b'{"op": "mirror", "first_epoch": 0}\n')
    for _ in range(1000):
        if s.client.info()["mirroring"]:
            break
        time.sleep(0.005)
    data = os.urandom(1 << 20)
    for i in range(48):  # more than the mirror's send buffer: the sender stalls
        h.pwrite(data, 0)
        h.pwrite(data[: 4 * SECTOR], (i + 1) * 4 * SECTOR)
    info = _wait_info(s.client, lambda i: not i["mirroring"])
    assert "read nothing for 0.3 s" in info["last_drop"]
    assert s.images()[0][:SECTOR] == data[:SECTOR]
    with pytest.raises(MirrorRefused, match="seal: not mirroring"):
        s.client.seal()
    c.close()
    assert "mirror dropped" in (s.dir / "nbdkit.log").read_text()


def test_bad_requests_get_clear_errors(served: Any) -> None:
    s = served()
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(s.control)
    f = raw.makefile("rwb")

    def ask(line: bytes) -> dict[str, Any]:
        f.write(line + b"\n")
        f.flush()
        return dict(json.loads(f.readline()))

    assert ask(b"not json")["error"].startswith("request is not JSON")
    assert ask(b"[1, 2]")["error"].startswith("request is not a JSON object")
    assert ask(b'{"op": "fly"}')["error"] == "unknown op 'fly' (info, mirror, seal, sync, stop)"
    assert "first_epoch must be an integer" in ask(b'{"op": "mirror", "first_epoch": -1}')["error"]
    assert "first_epoch must be an integer" in ask(b'{"op": "mirror"}')["error"]
    assert ask(b'{"op": "info"}')["ok"] is True  # the connection lives on
    raw.close()
    with pytest.raises(MirrorRefused, match="seal: not mirroring"):
        s.client.seal()
    with pytest.raises(MirrorRefused, match="sync: not mirroring"):
        s.client.sync([(0, 0, SECTOR)])
    gone = MirrorClient(str(s.dir / "nothing.sock"), timeout=1)
    with pytest.raises(MirrorError, match="nothing.sock: cannot connect"):
        gone.info()


def _tag(data: bytes) -> tuple[int, int]:
    """A tagged write's (writer, sequence number)."""
    return int.from_bytes(data[:4], "little"), int.from_bytes(data[4:8], "little")


def test_a_full_queue_blocks_the_writer_then_drops_the_mirror_losing_nothing_before(
    served: Any,
) -> None:
    queue = 1 << 20
    s = served(stall=0.5, queue=queue)
    h = s.connect("0")
    replica = Replica(s.images())
    c = socket.socket(socket.AF_UNIX)  # a consumer that asks for the mirror, then stops reading
    c.connect(s.control)
    c.sendall(b'{"op": "mirror", "first_epoch": 0}\n')
    _wait_info(s.client, lambda i: i["mirroring"])
    n, count = 64 << 10, 400  # 25 MiB: past the queue and both sockets' buffers
    rng = random.Random(5)
    writes = []
    for i in range(count):
        off = rng.randrange(0, SIZES[0] - n + 1, SECTOR)
        writes.append((off, i.to_bytes(4, "little") * 2 + rng.randbytes(n - 8)))
    done = [0]

    def guest() -> None:
        for off, data in writes:
            h.pwrite(data, off)
            done[0] += 1

    t = threading.Thread(target=guest)
    t.start()
    # the writer blocks at the bound: the queue full, writes left, the mirror still on
    blocked = _wait_info(s.client, lambda i: not i["mirroring"] or i["unsent"] + n + 32 > queue)
    assert blocked["mirroring"] and blocked["unsent"] <= queue and done[0] < count
    assert blocked["queue"] == queue
    t.join(60)  # after ``stall`` the mirror drops and the writes go on, locally
    assert not t.is_alive() and done[0] == count
    info = s.client.info()
    assert info["mirroring"] is False
    assert any(w in info["last_drop"] for w in ("read nothing for 0.5 s", "queue stayed full"))
    expect = bytearray(replica.disks[0])
    for off, data in writes:
        expect[off : off + n] = data
    assert s.images()[0] == bytes(expect)  # every write landed locally
    # what the stream delivered up to the drop decodes, in order: a prefix of the writes
    c.settimeout(10)
    got = []
    while chunk := c.recv(1 << 20):
        got.append(chunk)
    raw = b"".join(got)
    line, _, stream = raw.partition(b"\n")
    assert json.loads(line) == {"ok": True}
    events = replica.feed([stream])
    assert isinstance(events[0], diskstream.Header)
    decoded = _records(events)
    assert 0 < len(decoded) < count
    assert decoded == [("W", 0, off, data, False) for off, data in writes[: len(decoded)]]
    with pytest.raises(diskstream.TruncatedDiskStream):
        replica.dec.eof()  # no SEAL: the epoch is torn, never applied
    c.close()


def test_order_under_concurrency_seals_cut_exactly_what_completed(served: Any) -> None:
    """Writers on several connections race a sealer. Every write that
    completed before a seal was asked is in its epoch; none asked after the
    seal's reply is; each connection's writes keep their order; and at the
    quiet seals (writers parked) the replica equals the disks exactly."""
    s = served()
    replica = Replica(s.images())
    stream = s.client.start(0)
    writers, rounds, per_round = 4, 6, 40
    log: list[tuple[Any, ...]] = []  # happens-before, in the order the events were logged
    log_lock = threading.Lock()

    def note(*ev: Any) -> None:
        with log_lock:
            log.append(ev)

    park = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            rng = random.Random(100 + w)
            h = [s.connect("0"), s.connect("1")]
            seq = 0
            for _ in range(rounds):
                for _ in range(per_round):
                    d = rng.randrange(2)
                    n = rng.choice([1, 8, 64]) * SECTOR
                    off = rng.randrange(0, SIZES[d] - n + 1, SECTOR)
                    data = w.to_bytes(4, "little") + seq.to_bytes(4, "little")
                    data += rng.randbytes(n - 8)
                    note("start", w, seq)
                    h[d].pwrite(data, off)
                    note("done", w, seq)
                    seq += 1
                park.wait(60)  # the quiet seal
                park.wait(60)
        except BaseException as e:
            errors.append(e)
            park.abort()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    points: list[tuple[SealPoint, bool]] = []
    for _ in range(rounds):
        while True:  # seals racing the writers until they all park
            note("ask", len(points))
            points.append((s.client.seal(), False))
            note("reply", len(points) - 1)
            if park.n_waiting == writers:
                break
        park.wait(60)
        point = s.client.seal()  # all writers parked: a quiet seal
        points.append((point, True))
        replica.seal_at(stream, point)  # exact image check below
        assert [bytes(b) for b in replica.disks] == s.images()
        park.wait(60)
    for t in threads:
        t.join(60)
    assert not errors
    # the stream: which seal each write fell before
    epoch_of: dict[tuple[int, int], int] = {}
    order: dict[int, list[int]] = {w: [] for w in range(writers)}
    seal_events = 0
    for ev in replica.events:
        if isinstance(ev, diskstream.Write):
            w, seq = _tag(ev.data)
            epoch_of[(w, seq)] = seal_events
            order[w].append(seq)
        elif isinstance(ev, diskstream.Seal):
            seal_events += 1
    assert len(epoch_of) == writers * rounds * per_round
    assert all(seqs == sorted(seqs) for seqs in order.values())
    done_at: dict[tuple[int, int], int] = {}
    start_at: dict[tuple[int, int], int] = {}
    ask_at: dict[int, int] = {}
    reply_at: dict[int, int] = {}
    for i, entry in enumerate(log):
        if entry[0] == "start":
            start_at[(entry[1], entry[2])] = i
        elif entry[0] == "done":
            done_at[(entry[1], entry[2])] = i
        elif entry[0] == "ask":
            ask_at[entry[1]] = i
        else:
            reply_at[entry[1]] = i
    # points[k] is seal k (epoch k); its epoch holds the writes with epoch_of == k
    for k, (point, quiet) in enumerate(points):
        assert point.epoch == k
        if quiet:
            continue
        for key, e in epoch_of.items():
            if done_at[key] < ask_at[k]:
                assert e <= k, (key, k)  # completed before the seal was asked: before it
            if start_at[key] > reply_at[k]:
                assert e > k, (key, k)  # asked after the seal's reply: after it
