"""The receiver's disk epochs (receiver/diskbuffer.py).

* An epoch reaches the backup disk only at its commit, in stream order
  (overlapping writes: the later wins); sealed but not committed, or open,
  it never does (discard, and recovery after a kill).
* Past mem_limit an epoch spills to its staging file, memory stays at the
  bound, and the result is the same; past max_epoch_bytes it is refused
  (EpochTooLarge), never dropped.
* Out-of-order seals and commits, and a SEAL whose CRC disagrees, are refused.
* A real subprocess SIGKILLed in the middle of applying a committed epoch
  (after some of its records reached the disk): the next DiskBuffer on the
  directory finishes it, and the disk equals the expected image byte for
  byte. Killed at random times while committing epoch after epoch, the disk
  is always exactly the image of a committed epoch, never a mix.
* A corrupt journal is never applied.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from receiver.diskbuffer import (
    DiskBuffer,
    DiskBufferError,
    EpochTooLarge,
    JournalCorrupt,
    recover,
)
from xenbind import diskstream as ds

SIZE = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def make_disk(path: Path, size: int = SIZE) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def epoch_events(seed: int, epoch: int, n: int) -> list[ds.Event]:
    """Epoch ``epoch`` of a sender's stream (one stream from epoch 0, as on the
    wire: only the first SEAL's CRC covers the header): n writes/zeroes, then
    its SEAL."""
    enc = ds.Encoder([SIZE])
    dec = ds.Decoder()
    dec.feed(enc.header())
    for e in range(epoch + 1):
        rng = random.Random(seed * 1000 + e)
        out: list[ds.Event] = []
        for _ in range(n):
            off = rng.randrange(0, SIZE // 512 - 16) * 512
            length = rng.randrange(1, 16) * 512
            if rng.random() < 0.1:
                out += dec.feed(enc.zero(0, off, length))
            else:
                data = bytes([rng.randrange(256)]) * length
                out += dec.feed(b"".join(bytes(x) for x in enc.write(0, off, data)))
        out += dec.feed(enc.seal())
    return out


def image_after(seed: int, epochs: int, n: int) -> bytes:
    disk = bytearray(SIZE)
    for e in range(epochs):
        for ev in epoch_events(seed, e, n):
            if isinstance(ev, ds.Write):
                disk[ev.offset : ev.offset + len(ev.data)] = ev.data
            elif isinstance(ev, ds.Zero):
                disk[ev.offset : ev.offset + ev.length] = bytes(ev.length)
    return bytes(disk)


def feed(buf: DiskBuffer, events: list[ds.Event]) -> None:
    for ev in events:
        if isinstance(ev, ds.Seal):
            buf.seal(ev)
        elif isinstance(ev, ds.Write | ds.Zero):
            buf.add(ev)


def header() -> ds.Header:
    return ds.Header(9, (SIZE,), 0)


@pytest.mark.parametrize("mem_limit", [0, 20_000, 64 << 20])
def test_only_committed_epochs_reach_the_disk(tmp_path: Path, mem_limit: int) -> None:
    disk = make_disk(tmp_path / "disk")
    buf = DiskBuffer(
        str(tmp_path / "j"), [disk], header(), mem_limit=mem_limit, max_epoch_bytes=16 << 20
    )
    feed(buf, epoch_events(1, 0, 50))
    assert buf.stats.mem_used <= mem_limit
    assert Path(disk).read_bytes() == bytes(SIZE)  # sealed, not committed
    feed(buf, epoch_events(1, 1, 50)[:-1])  # epoch 1 open
    assert buf.stats.mem_used <= mem_limit
    if mem_limit == 0:
        assert buf.stats.spilled > 0 and (tmp_path / "j" / "epoch-0.staging").exists()
    buf.commit(0)
    assert Path(disk).read_bytes() == image_after(1, 1, 50)
    assert buf.stats.last_applied == 0 and not list((tmp_path / "j").glob("*.journal"))
    buf.seal(epoch_events(1, 1, 50)[-1])  # type: ignore[arg-type]
    assert buf.discard() == [1]  # the session tore before checkpoint 1's tail
    assert Path(disk).read_bytes() == image_after(1, 1, 50)
    assert not list((tmp_path / "j").glob("epoch-*"))
    assert buf.stats.mem_used == 0 and buf.stats.spilled == 0
    buf.close()


def test_bounds_and_order(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk")
    buf = DiskBuffer(str(tmp_path / "j"), [disk], header(), mem_limit=0, max_epoch_bytes=10_000)
    big = ds.Write(0, 0, bytes(8192))
    buf.add(big)
    with pytest.raises(EpochTooLarge):
        buf.add(big)
    buf.close()
    buf = DiskBuffer(
        str(tmp_path / "k"), [disk], header(), mem_limit=1 << 20, max_epoch_bytes=1 << 20
    )
    ev = epoch_events(2, 0, 3)
    with pytest.raises(DiskBufferError, match="open epoch is 0"):
        buf.seal(ds.Seal(1, 0, 0, 0))
    with pytest.raises(DiskBufferError, match="no sealed disk epoch 0"):
        buf.commit(0)
    feed(buf, ev[:-1])
    seal = ev[-1]
    assert isinstance(seal, ds.Seal)
    with pytest.raises(DiskBufferError, match="CRC"):
        buf.seal(ds.Seal(0, seal.records, seal.nbytes, seal.crc ^ 1))
    buf.seal(seal)
    with pytest.raises(DiskBufferError, match="waits for its commit"):
        buf.seal(ds.Seal(1, 0, 0, 0))
    with pytest.raises(DiskBufferError, match="outside|past its end"):
        buf.add(ds.Write(0, SIZE, bytes(512)))
    buf.close()
    with pytest.raises(DiskBufferError, match="has 4096 bytes"):
        DiskBuffer(
            str(tmp_path / "l"),
            [make_disk(tmp_path / "small", 4096)],
            header(),
            mem_limit=0,
            max_epoch_bytes=1 << 20,
        )


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.receiver.test_diskbuffer import DiskBuffer, epoch_events, feed, header
    jdir, disk, mode, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    def on_apply(i):
        if mode == "apply" and i == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    buf = DiskBuffer(jdir, [disk], header(), mem_limit=30_000, max_epoch_bytes=64 << 20,
                     on_apply=on_apply)
    e = 0
    while True:
        feed(buf, epoch_events(7, e, 200))
        buf.commit(e)
        print(e, flush=True)
        e += 1
        if mode == "apply" and e == 2:
            feed(buf, epoch_events(7, e, 200))  # sealed, about to be committed
            buf.commit(e)
    """
)


def run_child(tmp_path: Path, mode: str, kill_at: int) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    return subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(tmp_path / "j"),
            str(tmp_path / "disk"),
            mode,
            str(kill_at),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_kill_in_the_middle_of_applying(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk")
    # The child commits epochs 0 and 1, then is SIGKILLed at record 120 of
    # epoch 2's apply (every apply calls on_apply; only epoch 2's kills, the
    # first two pass index 120 too, so the hook is armed only then).
    script = tmp_path / "child.py"
    script.write_text(
        CHILD.format(root=str(ROOT)).replace(
            'if mode == "apply" and i == kill_at:',
            'if mode == "apply" and i == kill_at and e == 2:',
        )
    )
    p = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "j"), disk, "apply", "120"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert p.stdout.split() == ["0", "1"]
    assert (tmp_path / "j" / "epoch-2.journal").exists()
    on_disk = Path(disk).read_bytes()
    assert on_disk != image_after(7, 2, 200) and on_disk != image_after(7, 3, 200)  # half applied
    rec = recover(str(tmp_path / "j"))
    assert rec.applied == [2] and rec.records == 200
    assert Path(disk).read_bytes() == image_after(7, 3, 200)
    assert not list((tmp_path / "j").glob("epoch-*"))


def test_killed_at_random_times_the_disk_is_a_committed_image(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk")
    rng = random.Random(3)
    for _ in range(4):
        make_disk(tmp_path / "disk")
        for f in (tmp_path / "j").glob("*"):
            f.unlink()
        p = run_child(tmp_path, "random", -1)
        time.sleep(rng.uniform(0.3, 1.5))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        printed = [int(x) for x in out.split()]
        last = printed[-1] if printed else -1
        staging = {
            int(f.name.split("-")[1].split(".")[0]) for f in (tmp_path / "j").glob("*.staging")
        }
        rec = recover(str(tmp_path / "j"))
        assert set(rec.discarded) == staging
        got = Path(disk).read_bytes()
        # committed epochs: everything printed, plus one more if its commit
        # had begun (journal renamed) when the kill came
        done = last + 1 + (1 if rec.applied else 0)
        assert rec.applied in ([], [last + 1])
        if got != image_after(7, done, 200):
            # the kill came after the disks were synced, before the journal went
            assert not rec.applied and got == image_after(7, last + 2, 200), "no committed image"
        assert not list((tmp_path / "j").glob("epoch-*"))


def test_a_corrupt_journal_is_never_applied(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk")
    buf = DiskBuffer(
        str(tmp_path / "j"), [disk], header(), mem_limit=1 << 20, max_epoch_bytes=1 << 24
    )
    events = epoch_events(4, 0, 20)
    feed(buf, events)
    buf.close()
    # Write epoch 0's journal as commit would, then damage one byte of it.
    enc = ds.Encoder([SIZE])
    parts = [enc.header()]
    for ev in events:
        if isinstance(ev, ds.Write):
            parts += [bytes(x) for x in enc.write(ev.disk, ev.offset, ev.data)]
        elif isinstance(ev, ds.Zero):
            parts.append(enc.zero(ev.disk, ev.offset, ev.length))
    parts.append(enc.seal())
    journal = bytearray(b"".join(parts))
    journal[len(journal) // 2] ^= 0x40
    (tmp_path / "j" / "epoch-0.journal").write_bytes(bytes(journal))
    with pytest.raises(JournalCorrupt):
        recover(str(tmp_path / "j"))
    assert Path(disk).read_bytes() == bytes(SIZE)
    assert (tmp_path / "j" / "epoch-0.journal").exists()  # kept for an operator


def test_a_direct_epoch_0_then_buffered_epochs_check_the_wire_crc(tmp_path: Path) -> None:
    """As a session runs: epoch 0 (the initial sync) written at once and sealed
    direct; epochs 1 and 2 buffered, their SEALs' CRCs (which on the wire
    cover only their records) checked, and applied at their commits."""
    disk = make_disk(tmp_path / "disk")
    buf = DiskBuffer(
        str(tmp_path / "j"), [disk], header(), mem_limit=1 << 20, max_epoch_bytes=1 << 24
    )
    for ev in epoch_events(2, 0, 20):
        if isinstance(ev, ds.Seal):
            buf.seal_direct(ev)
        elif isinstance(ev, ds.Write | ds.Zero):
            buf.write_direct(ev)
    assert Path(disk).read_bytes() == image_after(2, 1, 20)
    for e in (1, 2):
        feed(buf, epoch_events(2, e, 20))
        assert Path(disk).read_bytes() == image_after(2, e, 20)  # sealed, not committed
        buf.commit(e)
        assert Path(disk).read_bytes() == image_after(2, e + 1, 20)
    bad = epoch_events(2, 3, 5)
    feed(buf, bad[:-1])
    seal = bad[-1]
    assert isinstance(seal, ds.Seal)
    with pytest.raises(DiskBufferError, match="CRC"):
        buf.seal(ds.Seal(seal.epoch, seal.records, seal.nbytes, seal.crc ^ 1))
    with pytest.raises(DiskBufferError, match="direct epoch"):
        buf.seal_direct(seal)  # epoch 3 holds buffered records: it is not a direct epoch
    buf.close()
