"""Simulated domains with disks (issue 13): the host's images and block server,
the guest's NBD writes, the ledger's journal and the page workloads' blocks,
and the checks that compare a disk with what the guest must have written.

Real nbdkit (the project's mirroring plugin, or the stock file plugin while
that is absent) and real libnbd; skipped, saying why, when they are missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from xenbind.errors import DomainError
from xenbind.sim import layout as L
from xenbind.sim import postmortem
from xenbind.sim.client import SimDomain
from xenbind.sim.disk import DiskError, nbd_module
from xenbind.sim.ledger import (
    JOURNAL_RECORD,
    check_ledger,
    journal_record,
    journal_slots,
)
from xenbind.sim.workloads import (
    DISK_BLOCK,
    KIND_ID,
    Registers,
    check_disk,
    disk_data,
    disk_write,
    expected_disk,
)
from xenbind.types import DomainConfig

MiB = 1 << 20


def _missing() -> str | None:
    if shutil.which("nbdkit") is None:
        return "nbdkit is not installed (scripts/install-system-deps)"
    try:
        nbd_module()
    except DiskError as e:
        return str(e)
    try:
        import xenbind.nbdmirror  # noqa: F401
    except ImportError:
        return None  # the stock file plugin serves the disks
    r = subprocess.run(["nbdkit", "python", "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"nbdkit's python plugin is missing (apt install nbdkit-plugin-python): {r.stderr}"
    return None


MISSING = _missing()
needs_nbd = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait(cond, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def _run_to(dom: SimDomain, steps: int) -> None:
    """Let a domain created paused run exactly ``steps`` steps, then idle."""
    dom.stop_at(steps)
    dom.unpause()
    dom.wait_step(steps, timeout=30)
    _wait(lambda: dom.status()["state"] == L.ST_IDLE, "guest idle at its stop step")


def _image(dom: SimDomain) -> np.ndarray:
    return np.fromfile(dom.disks()[0].path, dtype=np.uint8)


# --- without nbdkit ---------------------------------------------------------------------


def test_registers_format_is_stable_and_carries_disk_every():
    r = Registers(KIND_ID["random"], seed=7, step=12, rate=100.0)
    blob = r.pack()
    assert len(blob) == 64 and blob[:8] == b"SIMREGS1" and blob[12:16] == bytes(4)
    r.disk_every = 16
    back = Registers.unpack(r.pack())
    assert back.disk_every == 16 and back.flags & 1 == 0 and back.step == 12
    back.flags |= 1  # the crashed bit and disk_every live side by side
    assert Registers.unpack(back.pack()).disk_every == 16


def test_expected_disk_is_the_last_writer_of_each_block():
    seed, every, nblocks, steps = 3, 4, 64, 2000
    blocks, writers = expected_disk(seed, every, steps, nblocks)
    image = np.zeros(nblocks * DISK_BLOCK, dtype=np.uint8)
    words = image.view("<u8").reshape(nblocks, -1)
    for s in range(every - 1, steps, every):  # one write at a time, as the guest does
        blk, data = disk_write(seed, s, nblocks)
        words[blk] = np.frombuffer(data, dtype="<u8")
    assert np.array_equal(words[blocks], disk_data(seed, writers, blocks))
    assert check_disk(image, seed, every, steps)[0] == []
    problems, _ = check_disk(image, seed, every, steps - every)  # the disk is ahead
    assert problems and "ahead" in problems[0]
    words[int(blocks[3]), 100] ^= 1
    problems, _ = check_disk(image, seed, every, steps)
    assert any(f"block {int(blocks[3])}" in p and "corrupted" in p for p in problems)


# --- the host: create, sizes, files, the block server -----------------------------------


@needs_nbd
def test_create_with_disks_serves_them_and_destroy_removes_them(sim_host):
    dom = sim_host.create("16M", "random", seed=2, rate=2000, disks=[MiB, 3 * MiB // 2])
    meta = dom.meta
    assert [d["size"] for d in meta["disks"]] == [MiB, 3 * MiB // 2]
    infos = dom.disks()
    assert [(i.path, i.size) for i in infos] == [(d["path"], d["size"]) for d in meta["disks"]]
    assert infos[0].path == os.path.join(sim_host.dir, "dom-1-disk0.img")
    assert os.path.exists(infos[0].nbd) and infos[0].control
    assert os.stat(infos[1].path).st_size == 3 * MiB // 2
    assert meta["disk_every"] == 16
    server = meta["disk_server_pid"]
    assert not _gone(server)
    out = sim_host.cli("list").stdout
    assert "1M,1536K" in out and infos[0].path in out
    rows = json.loads(sim_host.cli("list", "--json").stdout)
    assert rows[0]["disks"][1]["size"] == 3 * MiB // 2 and rows[0]["disk_every"] == 16
    dom.wait_step(200)
    assert dom.info().state == "running"
    dom.destroy()
    _wait(lambda: _gone(server), "block server gone with its domain")
    assert not any(os.path.exists(i.path) for i in infos)
    assert not os.path.exists(infos[0].nbd)


@needs_nbd
def test_bad_disk_requests_are_refused_clearly(sim_host, tmp_path):
    hv = sim_host.hv
    for disks, msg in (
        ([1000 * 1024 + 100], "512-byte sectors"),
        ([512], "out of bounds"),
        ([65 << 30], "out of bounds"),
    ):
        with pytest.raises(DomainError, match=msg):
            hv.create(16 * MiB, "random", disks=disks)
    with pytest.raises(DomainError, match="number of bytes"):
        hv.request({"op": "create", "pages": 4096, "disks": ["64M"]}, "create")
    f = tmp_path / "small.img"
    f.write_bytes(bytes(4096))
    with pytest.raises(DomainError, match="out of bounds"):
        hv.create(16 * MiB, "idle", disk_files=[f])
    with pytest.raises(DomainError, match="No such file"):
        hv.create(16 * MiB, "idle", disk_files=[tmp_path / "none.img"])
    with pytest.raises(DomainError, match="needs a disk"):
        hv.create(16 * MiB, "random", disk_every=4)
    with pytest.raises(DomainError, match="writes no disk"):
        hv.create(16 * MiB, "scan", disks=[MiB], disk_every=4)
    r = sim_host.cli("create", "--disk", "1000", check=False)
    assert r.returncode == 2 and "512-byte sectors" in r.stderr
    assert hv.list() == [] and sorted(os.listdir(sim_host.dir)) == sorted(
        n for n in os.listdir(sim_host.dir) if n.startswith("host.")
    )


@needs_nbd
def test_disk_files_are_used_as_they_are_and_kept(sim_host, tmp_path):
    img = tmp_path / "backup.img"
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
    primary = sim_host.create("16M", "hotset", seed=1, rate=1000, disks=[2 * MiB], paused=True)
    info = primary.info()
    cfg = DomainConfig(
        name="copy", uuid=info.uuid, pages=info.pages, vcpus=info.vcpus, extra=dict(info.extra)
    )
    with pytest.raises(DomainError, match="1 disks, 0 backup images|0 disks, 1 backup"):
        sim_host.hv.create_backup(cfg, disks=[str(img)])
    cfg = DomainConfig(
        name="copy",
        uuid="11111111-2222-3333-4444-555555555555",
        pages=info.pages,
        vcpus=info.vcpus,
        extra=dict(info.extra),
        disks=(MiB,),
    )
    with pytest.raises(DomainError, match="is 2097152 bytes, disk 0 is 1048576"):
        sim_host.hv.create_backup(cfg, disks=[str(img)])
    cfg = DomainConfig(**{**cfg.__dict__, "disks": (2 * MiB,)})
    backup = sim_host.hv.create_backup(cfg, disks=[str(img)])
    assert backup.disks()[0].path == str(img) and backup.meta["disk_every"] == 16
    assert backup.info().state == "paused"
    backup.destroy()
    assert img.exists(), "the host deleted an image it was given"
    primary.destroy()


@needs_nbd
def test_a_sigkilled_host_leaves_no_block_server(sim_host):
    dom = sim_host.create("16M", "ledger", seed=1, rate=2000, disks=[MiB])
    server = dom.meta["disk_server_pid"]
    dom.wait_step(50)
    sim_host.kill()
    _wait(lambda: _gone(server), "block server gone with its SIGKILLed host")
    r = subprocess.run(["pgrep", "-f", dom.disks()[0].nbd], capture_output=True, text=True)
    assert r.stdout.strip() == ""


@needs_nbd
def test_a_guest_whose_block_server_dies_crashes_and_says_why(sim_host):
    dom = sim_host.create("16M", "ledger", seed=4, rate=2000, disks=[MiB])
    dom.wait_step(50)
    os.kill(dom.meta["disk_server_pid"], signal.SIGKILL)
    _wait(lambda: dom.info().extra.get("crashed"), "guest crashed")
    log = open(os.path.join(sim_host.dir, "dom-1.log")).read()
    assert "disk failed" in log and "disk 0" in log
    step = dom.step
    assert dom.step == step, "a crashed guest went on"
    # nothing unjournaled was done or acknowledged: memory, journal and outputs agree
    acked = os.path.join(sim_host.dir, "acked.txt")
    with open(acked, "wb") as f:
        f.write(postmortem.outputs(sim_host.dir, dom.domid))
    problems, summary = postmortem.ledger_check(sim_host.dir, dom.domid, acked)
    # the write in flight when the server died may have reached the image
    # (written, never answered): the one transaction after the last done
    in_flight = f"found txid {step} (past the memory's last txid {step - 1}) (ahead)"
    assert all(in_flight in p for p in problems) and len(problems) <= 1, problems
    assert summary["acknowledged"] == summary["transactions"] == step
    assert "block server of domain 1 died" in sim_host.log()


# --- what the guests write --------------------------------------------------------------


@needs_nbd
def test_ledger_journal_and_ledger_check_catch_a_disk_behind_ahead_or_corrupted(sim_host):
    dom = sim_host.create("16M", "ledger", seed=9, rate=50000, disks=[MiB], paused=True)
    slots = journal_slots(MiB)
    count = slots + 700  # the journal wrapped: slots below 700 hold their second txid
    _run_to(dom, count)
    acked = os.path.join(sim_host.dir, "acked.txt")
    with open(acked, "wb") as f:
        f.write(postmortem.outputs(sim_host.dir, dom.domid))
    problems, summary = postmortem.ledger_check(sim_host.dir, dom.domid, acked)
    assert problems == [], problems
    assert summary["journal_slots"] == slots == summary["journal_records"]
    assert summary["acknowledged"] == count
    journal = _image(dom)[: slots * JOURNAL_RECORD]
    rec = journal.reshape(slots, JOURNAL_RECORD)
    assert int(rec[5, 8:16].view("<u8")[0]) == slots + 5  # slot 5: its second txid
    assert int(rec[900, 8:16].view("<u8")[0]) == 900

    mem = np.fromfile(os.path.join(sim_host.dir, "dom-1.mem"), dtype=np.uint8)
    usable = dom.pages - 3

    def check(j: np.ndarray) -> list[str]:
        return check_ledger(mem, usable, None, j)[0]

    assert check(journal) == []
    behind = journal.copy()  # the disk lost the last 3 transactions' journal writes
    for t in range(count - 3, count):
        s = t % slots
        behind.reshape(slots, -1)[s] = 0
    assert any("slot 698: expected txid" in p and "empty slot (behind)" in p for p in check(behind))
    older = journal.copy()  # slot 10 still holds txid 10, not slots + 10
    older.reshape(slots, -1)[10] = np.frombuffer(journal_record(9, 10, 1, 2, 3), np.uint8)
    (p,) = check(older)
    assert f"slot 10: expected txid {slots + 10}, found txid 10" in p and "behind" in p
    ahead = journal.copy()  # a transaction the memory never made reached the disk
    ahead.reshape(slots, -1)[count % slots] = np.frombuffer(
        journal_record(9, count, 1, 2, 3), np.uint8
    )
    (p,) = check(ahead)
    assert f"found txid {count} (past the memory's last txid {count - 1}) (ahead)" in p
    bad = journal.copy()
    bad[JOURNAL_RECORD * 77 + 20] ^= 0x40
    (p,) = check(bad)
    assert "slot 77" in p and "corrupted" in p
    # the same through the CLI, on a copy of the disk given with --disk
    copy = os.path.join(sim_host.dir, "copy.img")
    img = _image(dom)
    img[: slots * JOURNAL_RECORD] = ahead
    img.tofile(copy)
    r = sim_host.cli("ledger-check", "1", "--disk", copy, check=False)
    assert r.returncode == 1 and f"found txid {count}" in r.stderr and "FAILED" in r.stderr
    r = sim_host.cli("disk-check", "1")
    assert "OK" in r.stdout and "journal_records" in r.stdout


@needs_nbd
@pytest.mark.parametrize("workload", ["random", "hotset"])
def test_page_workloads_write_the_expected_blocks(sim_host, workload):
    dom = sim_host.create(
        "16M", workload, seed=5, rate=40000, disks=[2 * MiB], disk_every=3, paused=True
    )
    _run_to(dom, 3000)
    problems, summary = postmortem.disk_check(sim_host.dir, dom.domid)
    assert problems == [] and summary["step"] == 3000 and summary["written"] > 100
    blocks, writers = expected_disk(5, 3, 3000, 2 * MiB // DISK_BLOCK)
    words = _image(dom).view("<u8").reshape(-1, DISK_BLOCK // 8)
    assert np.array_equal(words[blocks], disk_data(5, writers, blocks))
    assert words[np.setdiff1d(np.arange(len(words)), blocks)].any() == False  # noqa: E712
    # a disk behind (one write lost) is caught, through the CLI on a copy
    img = _image(dom)
    img[int(blocks[0]) * DISK_BLOCK : (int(blocks[0]) + 1) * DISK_BLOCK] = 0
    copy = os.path.join(sim_host.dir, "copy.img")
    img.tofile(copy)
    r = sim_host.cli("disk-check", str(dom.domid), "--disk", copy, check=False)
    assert r.returncode == 1
    assert f"disk block {int(blocks[0])}: expected the write of step {int(writers[0])}" in r.stderr


@needs_nbd
def test_a_paused_domain_does_not_write_its_disk(sim_host):
    dom = sim_host.create("16M", "random", seed=6, rate=20000, disks=[MiB], disk_every=1)
    dom.wait_step(500)
    dom.pause()
    step = dom.step
    before = hashlib.sha256(_image(dom)).hexdigest()
    time.sleep(0.2)
    assert dom.step == step and hashlib.sha256(_image(dom)).hexdigest() == before
    assert check_disk(_image(dom), 6, 1, step)[0] == []  # and it is exactly step's disk
    dom.unpause()
    dom.wait_step(step + 500)
    assert hashlib.sha256(_image(dom)).hexdigest() != before
    problems, _ = postmortem.disk_check(sim_host.dir, dom.domid)  # pauses it for the view
    assert problems == []


@needs_nbd
def test_a_backup_continues_the_primarys_disk(sim_host_factory):
    """What a failover does to a disk, by hand: the backup gets the primary's
    disk image (as the receiver keeps it), memory and registers; it runs on,
    and its disk is what the registers' step says."""
    a, b = sim_host_factory(), sim_host_factory()
    prim = a.create("16M", "random", seed=8, rate=40000, disks=[MiB], disk_every=2, paused=True)
    _run_to(prim, 1000)
    prim.pause()
    img = os.path.join(b.dir, "backup-disk0.img")
    shutil.copyfile(prim.disks()[0].path, img)
    i = prim.info()
    cfg = DomainConfig(
        name=i.name,
        uuid=i.uuid,
        pages=i.pages,
        vcpus=i.vcpus,
        extra=dict(i.extra),
        disks=tuple(d.size for d in prim.disks()),
    )
    back = b.hv.create_backup(cfg, disks=[img])
    pfns = np.arange(i.pages, dtype=np.uint64)
    pages = np.empty((i.pages, 4096), dtype=np.uint8)
    prim.gather(pfns, pages)
    back.scatter(pfns, pages)
    back.set_context(prim.get_context())
    assert postmortem.disk_check(b.dir, back.domid)[0] == []
    back.stop_at(2500)
    back.unpause()
    back.wait_step(2500)
    problems, summary = postmortem.disk_check(b.dir, back.domid)
    assert problems == [] and summary["step"] == 2500
    back.destroy()
    assert os.path.exists(img)
