"""receiver.core.ReceiverCore without sockets, threads or a hypervisor: bytes
and ticks in, actions out, pages into an in-memory backup."""

from __future__ import annotations

import errno
import re
from dataclasses import replace

import numpy as np
import pytest

from receiver.core import (
    Action,
    Admit,
    BackupClosed,
    CommitRequest,
    Committed,
    End,
    Handover,
    Limits,
    ReceiverCore,
    Send,
)
from xenbind import PAGE_SIZE
from xenbind import diskstream as ds
from xenbind.blockhash import HashesMessage
from xenbind.session import (
    DISK_HASH_BLOCK,
    ERR_FAILED_OVER,
    REPLY_MAGIC,
    Accept,
    Accepted,
    Ack,
    DiskHashes,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Options,
    SenderSession,
    encode_accept,
    encode_hello,
)
from xenbind.stream import StreamWriter, encode_disk
from xenbind.types import Context, DomainConfig

PAGES = 64
CTX = Context((PAGES - 3, PAGES - 2, PAGES - 1), b"hvm" * 4, b"dm")
LIMITS = Limits(
    max_pages=1 << 20,
    max_staged_bytes=16 * PAGE_SIZE,
    max_compressed=1 << 20,
    max_context=1 << 16,
    max_device_model=1 << 16,
    max_cache_pages=1024,
    heartbeat_ms=100,
    handshake_timeout=5.0,
    stall_timeout=30.0,
    software="test",
)


class MemoryBackup:
    """The Backup as a numpy array of guest memory."""

    def __init__(self) -> None:
        self.memory = np.zeros((PAGES, PAGE_SIZE), np.uint8)
        self.context: Context | None = None
        self.committed: list[int] = []
        self.records: list = []  # (index, SaveRecords) of every commit
        self.closed = False
        self.closed_by: tuple[int, str] | None = None  # the daemon's ERROR, if it said

    def write(self, pfns, data) -> None:
        if self.closed:
            raise BackupClosed("backup is failed-over", self.closed_by)
        self.memory[pfns.astype(np.intp)] = data

    def read(self, pfns, out) -> None:
        if self.closed:
            raise BackupClosed("backup is failed-over", self.closed_by)
        out[: len(pfns)] = self.memory[pfns.astype(np.intp)]

    def commit(self, req: CommitRequest) -> Committed:
        if self.closed:
            raise BackupClosed("backup is failed-over", self.closed_by)
        self.records.append((req.index, req.records))
        n = req.pages if req.first else req.staging.commit(self, req.context)  # type: ignore[arg-type]
        self.context = req.context
        self.committed.append(req.index)
        return Committed(n)

    def scatter(self, pfns, data) -> None:  # (Staging.commit's domain)
        self.write(pfns, data)

    def set_context(self, ctx: Context) -> None:
        self.context = ctx


def _hello(**kw) -> Hello:
    return Hello(
        session_id="ab" * 16,
        options=Options(codec="none", **kw),
        domain=DomainConfig("g", "12345678-9abc-def0-1234-56789abcdef0", PAGES, 1),
        generation=1,
    )


def _join(x) -> bytes:
    return bytes(x) if isinstance(x, bytes | bytearray) else b"".join(bytes(b) for b in x)


def _page(v: int, k: int = 1) -> np.ndarray:
    return np.full((k, PAGE_SIZE), v, np.uint8)


def _frames(actions) -> list:
    """What a sender makes of the core's Sends (after its own HELLO)."""
    ss = SenderSession(_hello())
    ss.hello()
    sends = [a.data for a in actions if isinstance(a, Send)]
    if not sends or not sends[0].startswith(REPLY_MAGIC):
        ss.feed(encode_accept(Accept("ab" * 16, 900, 100, {})))
    return [e for d in sends for e in ss.feed(d)]


def _accepted(backup: MemoryBackup | None = None) -> tuple[ReceiverCore, MemoryBackup, list]:
    core = ReceiverCore(LIMITS, now=0.0)
    acts = core.receive_data(encode_hello(_hello()))
    assert acts == [Admit(_hello())] and core.state == "admitting"
    backup = backup or MemoryBackup()
    acts = core.accept(900, backup, now=1.0)
    assert core.state == "initial-copy" and len(acts) == 1
    return core, backup, acts


def _initial(w: StreamWriter, first: bytes = b"") -> bytes:
    """The stream's header and checkpoint 0; ``first``: chunks after the header."""
    pfns = np.arange(PAGES, dtype=np.uint64)
    return w.header() + first + _join(w.pages(pfns, _page(1, PAGES))) + _join(w.end_checkpoint(CTX))


def _end(acts: list[Action]) -> End:
    """The End that closes ``acts`` (a session's last action)."""
    end = acts[-1]
    assert isinstance(end, End), f"the last action is {end!r}, not an End"
    return end


def test_handshake_admission_accept() -> None:
    core, _, acts = _accepted()
    [ev] = _frames(acts)
    assert isinstance(ev, Accepted) and ev.accept.failover_timeout_ms == 900
    assert ev.accept.limits["max_staged_bytes"] == 16 * PAGE_SIZE


def test_refusal_ends_the_session() -> None:
    core = ReceiverCore(LIMITS, now=0.0)
    core.receive_data(encode_hello(_hello()))
    acts = core.refuse("limit", "too big")
    assert isinstance(acts[0], Send) and acts[-1] == End("refused", "too big")
    assert core.ended


def test_garbage_hello_is_refused() -> None:
    core = ReceiverCore(LIMITS, now=0.0)
    acts = core.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert _end(acts).kind == "bad-hello" and "not a Remus session" in _end(acts).message


def test_initial_copy_then_a_checkpoint_committed() -> None:
    core, backup, _ = _accepted()
    w = StreamWriter(PAGES, codec="none")
    acts = core.receive_data(_initial(w))
    assert backup.committed == [0] and (backup.memory == 1).all() and core.state == "checkpoints"
    assert [type(e) for e in _frames(acts)] == [Ack]
    stream = _join(w.pages(np.array([3, 5], np.uint64), _page(7, 2))) + _join(
        w.end_checkpoint(CTX, last=True)
    )
    acts = core.receive_data(stream)
    assert backup.committed == [0, 1] and (backup.memory[[3, 5]] == 7).all()
    assert [type(e) for e in _frames(acts)] == [Ack, Goodbye]
    assert _end(acts).kind == "clean" and core.decoder is None and core.staging is None


def test_a_switchover_checkpoint_is_handed_over_after_its_ack() -> None:
    """SWITCHOVER + LAST_CHECKPOINT: committed, ACKed, then Handover (no
    GOODBYE, no End: the daemon resumes the backup and closes the session
    with its verdict, which the core sends as an ERROR)."""
    core, backup, _ = _accepted()
    w = StreamWriter(PAGES, codec="none")
    core.receive_data(_initial(w))
    stream = _join(w.pages(np.array([6], np.uint64), _page(6))) + _join(
        w.end_checkpoint(CTX, last=True, switchover=True)
    )
    acts = core.receive_data(stream)
    assert backup.committed == [0, 1] and (backup.memory[6] == 6).all()
    assert [type(e) for e in _frames(acts)] == [Ack]
    assert acts[-1] == Handover(1) and not core.ended
    acts = core.close(ERR_FAILED_OVER, "the backup took over")
    assert [type(e) for e in _frames(acts)] == [Error] and _end(acts).kind == "closed"


def test_torn_checkpoint_dropped_at_eof() -> None:
    core, backup, _ = _accepted()
    w = StreamWriter(PAGES, codec="none")
    core.receive_data(_initial(w))
    core.receive_data(_join(w.pages(np.array([9], np.uint64), _page(9))))  # no tail
    acts = core.receive_eof()
    assert _end(acts).kind == "link-lost" and "1 staged pages of the torn checkpoint dropped" in (
        _end(acts).message
    )
    assert backup.committed == [0] and (backup.memory[9] == 1).all()
    assert core.staging is None and core.decoder is None


def test_garbage_after_a_whole_checkpoint_still_commits_it() -> None:
    core, backup, _ = _accepted()
    w = StreamWriter(PAGES, codec="none")
    core.receive_data(_initial(w))
    good = _join(w.pages(np.array([4], np.uint64), _page(4))) + _join(w.end_checkpoint(CTX))
    acts = core.receive_data(good + b"\x77\x77\x77\x77" * 4)
    assert backup.committed == [0, 1] and (backup.memory[4] == 4).all()
    assert [type(e) for e in _frames(acts)] == [Ack, Error]
    assert _end(acts).kind == "violation"


def test_heartbeat_due_on_tick() -> None:
    core, _, _ = _accepted()  # ACCEPT sent at t=1.0
    assert core.tick(1.05) == []
    assert core.next_wait(1.05) == pytest.approx(0.05)
    acts = core.tick(1.1)
    [hb] = _frames(acts)
    assert isinstance(hb, Heartbeat) and hb.last_committed is None
    assert core.tick(1.15) == []  # nothing due until heartbeat-ms after that one


def test_stall_timeout_in_the_initial_copy() -> None:
    core, backup, _ = _accepted()
    w = StreamWriter(PAGES, codec="none")
    core.tick(10.0)
    core.receive_data(w.header())  # progress at t=10
    assert not any(isinstance(a, End) for a in core.tick(39.0))
    acts = core.tick(40.5)
    assert _end(acts).kind == "stalled" and backup.committed == []
    assert isinstance(_frames(acts)[-1], Error)


def test_handshake_timeout() -> None:
    core = ReceiverCore(LIMITS, now=0.0)
    assert core.tick(4.9) == []
    assert core.tick(5.0)[-1] == End("timeout", "no complete HELLO within 5.0 s; closed")


def test_staging_limit_is_a_violation_and_commits_nothing() -> None:
    core, backup, _ = _accepted()
    w = StreamWriter(PAGES, codec="none")
    core.receive_data(_initial(w))
    big = np.arange(20, dtype=np.uint64)
    acts = core.receive_data(_join(w.pages(big, _page(5, 20))) + _join(w.end_checkpoint(CTX)))
    assert _end(acts).kind == "violation" and "staging cap" in _end(acts).message
    assert backup.committed == [0] and (backup.memory[:20] == 1).all()


def test_header_for_another_size_is_a_violation() -> None:
    core, backup, _ = _accepted()
    acts = core.receive_data(StreamWriter(PAGES // 2, codec="none").header())
    assert (
        _end(acts).kind == "violation" and "says 32 pages, the HELLO said 64" in _end(acts).message
    )


def test_a_closed_backup_ends_the_session_closed() -> None:
    backup = MemoryBackup()
    core, _, _ = _accepted(backup)
    backup.closed = True
    acts = core.receive_data(_initial(StreamWriter(PAGES, codec="none")))
    assert acts[-1] == End("closed", "backup is failed-over")


def test_a_backup_closed_by_the_daemon_mid_decode_sends_its_error() -> None:
    """The daemon fails the domain over while the session thread decodes: the
    commit finds the backup closed before the thread sees the close. The
    sender must still get ERROR failed-over, not a bare EOF (it would take
    that for a broken link, reconnect, and be told "possible split brain")."""
    backup = MemoryBackup()
    core, _, _ = _accepted(backup)
    backup.closed, backup.closed_by = True, (ERR_FAILED_OVER, "the backup took over")
    acts = core.receive_data(_initial(StreamWriter(PAGES, codec="none")))
    [err] = [f for f in _frames(acts) if isinstance(f, Error)]
    assert (err.code, err.reason) == (ERR_FAILED_OVER, "the backup took over")
    assert acts[-1] == End("closed", "backup is failed-over")
    assert core.close(ERR_FAILED_OVER, "again") == []  # one ERROR, the session is over


def test_the_daemon_closing_sends_error_once_accepted() -> None:
    core = ReceiverCore(LIMITS, now=0.0)
    core.receive_data(encode_hello(_hello()))
    acts = core.close(6, "superseded")
    assert acts == [End("admission", "closed by the receiver during admission (before ACCEPT)")]
    core, _, _ = _accepted()
    acts = core.close(6, "superseded")
    assert isinstance(_frames(acts)[-1], Error) and _end(acts).kind == "closed"


def test_zero_copy_path_gives_the_same_commits() -> None:
    core, backup, _ = _accepted()
    data = memoryview(_initial(StreamWriter(PAGES, codec="none")))
    while len(data) and not core.ended:
        buf = core.get_buffer()
        if buf is None:
            core.receive_data(data[:100])
            data = data[100:]
        else:
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            core.buffer_updated(n)
    assert backup.committed == [0] and (backup.memory == 1).all()


def test_a_failed_ack_ends_link_lost() -> None:
    core, _, _ = _accepted()
    acts = core.receive_data(_initial(StreamWriter(PAGES, codec="none")))
    [ack] = [a for a in acts if isinstance(a, Send)]
    reset = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert core.send_failed(ack, reset) == [
        End("link-lost", "connection lost sending ACK(0): Connection reset by peer")
    ]


# --- disks (issue 13) -------------------------------------------------------------

DISK = 1 << 20


class DiskMemoryBackup(MemoryBackup):
    """MemoryBackup with one disk: epoch 0 written at once, later epochs kept
    until their checkpoint commits with them."""

    def __init__(self) -> None:
        super().__init__()
        self.disk = bytearray(DISK)
        self.header = None
        self.pending: dict[int, list] = {}
        self.open_epoch = 0
        self.disk_epochs: list[int | None] = []  # CommitRequest.disk_epoch of each commit

    def _apply(self, rec) -> None:
        if isinstance(rec, ds.Write):
            self.disk[rec.offset : rec.offset + len(rec.data)] = rec.data
        else:
            self.disk[rec.offset : rec.offset + rec.length] = bytes(rec.length)

    def disk_open(self, header) -> None:
        self.header = header

    def disk_write(self, rec, direct: bool) -> None:
        assert direct == (self.open_epoch == 0)
        if direct:
            self._apply(rec)
        else:
            self.pending.setdefault(self.open_epoch, []).append(rec)

    def disk_seal(self, seal) -> None:
        assert seal.epoch == self.open_epoch
        self.open_epoch += 1

    def commit(self, req: CommitRequest) -> Committed:
        self.disk_epochs.append(req.disk_epoch)
        if req.disk_epoch is not None:
            for rec in self.pending.pop(req.disk_epoch, []):
                self._apply(rec)
        return super().commit(req)


def _disk_hello() -> Hello:
    h = _hello()
    return Hello(h.session_id, h.options, replace(h.domain, disks=(DISK,)), h.generation)


def _disk_session() -> tuple[ReceiverCore, DiskMemoryBackup, list]:
    core = ReceiverCore(LIMITS, now=0.0)
    assert core.receive_data(encode_hello(_disk_hello())) == [Admit(_disk_hello())]
    backup = DiskMemoryBackup()
    hashes = [HashesMessage(0, DISK_HASH_BLOCK, 0, np.zeros(16, np.uint64))]
    acts = core.accept(900, backup, now=1.0, disk_hashes=hashes, disks=backup)
    return core, backup, acts


def test_disk_epochs_commit_with_their_checkpoints_and_never_before():
    core, backup, acts = _disk_session()
    ss = SenderSession(_disk_hello())
    ss.hello()
    got = [e for a in acts if isinstance(a, Send) for e in ss.feed(a.data)]
    assert isinstance(got[0], Accepted) and got[0].accept.disks
    assert isinstance(got[1], DiskHashes) and len(got[1].message.hashes) == 16
    enc = ds.Encoder([DISK])
    w = StreamWriter(PAGES, codec="none")
    sync = enc.header() + b"".join(enc.write(0, 0, b"S" * 512, sync=True)) + enc.seal()
    stream = _initial(w, encode_disk(sync))
    core.receive_data(stream)
    assert backup.committed == [0] and bytes(backup.disk[:512]) == b"S" * 512
    # epoch 1: written during checkpoint 1's epoch, sealed at its pause
    e1 = b"".join(enc.write(0, 4096, b"1" * 1024)) + enc.zero(0, 0, 512)
    core.receive_data(encode_disk(e1))
    assert bytes(backup.disk[4096:5120]) == bytes(1024)  # not before its commit
    body = _join(w.pages(np.array([3], np.uint64), _page(7))) + _join(w.end_checkpoint(CTX))
    acts = core.receive_data(encode_disk(enc.seal()) + body[:-1])
    assert backup.committed == [0]
    acts = core.receive_data(body[-1:])
    assert backup.committed == [0, 1] and backup.disk_epochs == [0, 1]
    assert bytes(backup.disk[4096:5120]) == b"1" * 1024 and bytes(backup.disk[:512]) == bytes(512)
    assert any(isinstance(e, Ack) and e.index == 1 for e in _frames(acts))
    # epoch 2's writes arrive, its checkpoint never does: nothing of it is applied
    core.receive_data(encode_disk(b"".join(enc.write(0, 8192, b"2" * 512))))
    _end(core.receive_eof())
    assert bytes(backup.disk[8192:8704]) == bytes(512)


@pytest.mark.parametrize(
    "case,match",
    [
        ("tail-before-seal", "ended before its disk epoch's SEAL"),
        ("early-seal", r"disk SEAL\(2\) while checkpoint 1"),
        ("header", "disk stream header names disks"),
        ("garbage", "disk stream error"),
    ],
)
def test_disk_stream_rules_end_the_session_as_violations(case, match):
    core, backup, _ = _disk_session()
    sizes = [DISK * 2] if case == "header" else [DISK]
    enc = ds.Encoder(sizes)
    w = StreamWriter(PAGES, codec="none")
    acts = core.receive_data(_initial(w, encode_disk(enc.header() + enc.seal())))
    body = _join(w.pages(np.array([3], np.uint64), _page(7))) + _join(w.end_checkpoint(CTX))
    if case == "tail-before-seal":
        acts += core.receive_data(body)
    elif case == "early-seal":
        acts += core.receive_data(encode_disk(enc.seal() + enc.seal()))
    elif case == "garbage":
        acts += core.receive_data(encode_disk(b"\xff" * 64))
    end = _end(acts)
    assert end.kind == "violation" and re.search(match, end.message), end
    assert backup.committed == ([] if case == "header" else [0])


def test_a_disk_chunk_in_a_session_without_disks_is_a_violation():
    core, backup, _ = _accepted()
    w = StreamWriter(PAGES, codec="none")
    end = _end(core.receive_data(_initial(w, encode_disk(b"x"))))
    assert end.kind == "violation" and "named no disks" in end.message


@pytest.mark.parametrize("codec", ["seed", "xen"])
def test_read_in_place_decodes_as_the_gather_path(codec):
    """ReceiverCore.read_in_place (the fused decode, bases read from the
    backup's memory rows) commits the same memory as Backup.read's gather,
    over checkpoints whose delta pages depend on earlier ones (also within
    one feed: several checkpoints in one call)."""
    rng = np.random.default_rng(11)
    hello = Hello("ab" * 16, Options(codec=codec, cache_pages=1024), _hello().domain, 1)
    mem = rng.integers(0, 256, (PAGES, PAGE_SIZE), dtype=np.uint8)
    w = StreamWriter(PAGES, codec=codec, cache_pages=1024)
    pfns = np.arange(PAGES, dtype=np.uint64)
    stream = [w.header() + _join(w.pages(pfns, mem)) + _join(w.end_checkpoint(CTX))]
    for _ in range(6):
        dirty = np.unique(rng.integers(0, PAGES - 3, 12)).astype(np.uint64)
        for p in dirty:
            mem[int(p), rng.integers(0, PAGE_SIZE, 3)] = rng.integers(0, 256, 3, dtype=np.uint8)
        stream.append(
            _join(w.pages(dirty, mem[dirty.astype(np.intp)])) + _join(w.end_checkpoint(CTX))
        )
    results = []
    for in_place in (False, True):
        core = ReceiverCore(LIMITS, now=0.0)
        core.receive_data(encode_hello(hello))
        backup = MemoryBackup()
        core.accept(900, backup, now=1.0)
        if in_place:
            core.read_in_place(backup.memory)
        core.receive_data(stream[0])
        core.receive_data(b"".join(stream[1:4]))  # three checkpoints in one feed
        for part in stream[4:]:
            core.receive_data(part)
        assert backup.committed == list(range(7)), (in_place, backup.committed)
        results.append(backup.memory.copy())
    assert np.array_equal(results[0], results[1])
    assert np.array_equal(results[1][: PAGES - 3], mem[: PAGES - 3])
