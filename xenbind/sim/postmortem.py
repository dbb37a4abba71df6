"""What an operator can read from a host directory alone, even after the host died.

``digest`` hashes a domain's memory file, ``outputs`` reads its released
output, ``ledger_check`` runs the ledger checker on its memory file and, for
a domain with a disk, on its disk's journal too; ``disk_check`` compares a
page workload's disk with what its step says it must hold (for a ledger: the
journal check). None of them needs the host process; all raise
``DomainError`` naming the domain. The disk image is disk 0 of the domain's
meta unless a path is given (another copy of it: a backup's, a saved one).

``ledger_check`` reads one consistent view: a private copy of the memory
taken while the guest does not run. When the host answers and the domain's
guest is running, it is paused for the copy (counted, as every pause) and
unpaused after; a domain already paused, or a host that died, does not move.
The check then runs on the copy, so nothing it holds points into the mapping
(a view into a mapping that is closed under it is the ``BufferError: cannot
close exported pointers exist`` an earlier version died of).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from collections.abc import Iterator

import numpy as np

from .. import PAGE_SIZE
from ..errors import DomainError
from . import layout as L
from .ledger import JOURNAL_RECORD, check_ledger, journal_slots, parse_acks
from .workloads import DISK_KINDS, MAGIC_PAGES, check_disk


def find(sim_dir: str, ref: int | str, op: str) -> dict:
    domid = L.resolve(sim_dir, ref)
    if domid is None:
        raise DomainError(ref, op, f"no such domain in {sim_dir}")
    try:
        return L.read_meta(sim_dir, domid)
    except (OSError, ValueError) as e:
        raise DomainError(ref, op, f"unreadable metadata: {e}") from None


def _map(sim_dir: str, meta: dict, op: str) -> mmap.mmap:
    p = L.path(sim_dir, meta["domid"], "mem")
    size = int(meta["pages"]) * PAGE_SIZE
    try:
        with open(p, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                raise DomainError(meta["domid"], op, f"{p} is not {size} bytes")
            return mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError as e:
        raise DomainError(meta["domid"], op, f"cannot read guest memory: {e}") from None


def digest(sim_dir: str, ref: int | str) -> str:
    meta = find(sim_dir, ref, "digest")
    mm = _map(sim_dir, meta, "digest")
    try:
        return hashlib.sha256(mm).hexdigest()
    finally:
        mm.close()


def outputs(sim_dir: str, ref: int | str) -> bytes:
    meta = find(sim_dir, ref, "outputs")
    try:
        with open(L.path(sim_dir, meta["domid"], "out"), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _disk_image(meta: dict, disk_path: str | None, op: str) -> tuple[str, int] | None:
    """(path, size) of the disk to check: ``disk_path``, else the meta's disk
    0; None for a domain without a disk and no path given."""
    disks = meta.get("disks") or []
    if disk_path is None:
        if not disks:
            return None
        return disks[0]["path"], int(disks[0]["size"])
    try:
        size = os.stat(disk_path).st_size
    except OSError as e:
        raise DomainError(meta["domid"], op, f"cannot read disk image {disk_path}: {e}") from None
    if disks and size != int(disks[0]["size"]):
        raise DomainError(
            meta["domid"], op, f"{disk_path} is {size} bytes, the domain's disk {disks[0]['size']}"
        )
    return disk_path, size


def _read_disk(path: str, length: int, domid: int, op: str) -> np.ndarray:
    """The first ``length`` bytes of a disk image (a private copy)."""
    try:
        with open(path, "rb") as f:
            data = np.fromfile(f, dtype=np.uint8, count=length)
    except OSError as e:
        raise DomainError(domid, op, f"cannot read disk image {path}: {e}") from None
    if len(data) != length:
        raise DomainError(domid, op, f"disk image {path} is shorter than {length} bytes")
    return data


def ledger_check(
    sim_dir: str, ref: int | str, acked_path: str | None = None, disk_path: str | None = None
) -> tuple[list[str], dict]:
    """The ledger checker on the domain's memory, its disk's journal (if it
    has a disk, or ``disk_path`` is given) and the acknowledgements in
    ``acked_path`` (if given)."""
    meta = find(sim_dir, ref, "ledger-check")
    acked = None
    if acked_path is not None:
        try:
            with open(acked_path) as f:
                acked = parse_acks(f, acked_path)
        except OSError as e:
            raise DomainError(
                meta["domid"], "ledger-check", f"cannot read {acked_path}: {e}"
            ) from None
        except ValueError as e:
            raise DomainError(meta["domid"], "ledger-check", str(e)) from None
    image = _disk_image(meta, disk_path, "ledger-check")
    journal = None
    with _still(sim_dir, meta):
        mm = _map(sim_dir, meta, "ledger-check")
        try:
            mem = np.frombuffer(mm, dtype=np.uint8).copy()  # the consistent view
        finally:
            mm.close()
        if image is not None:
            length = journal_slots(image[1]) * JOURNAL_RECORD
            journal = _read_disk(image[0], length, meta["domid"], "ledger-check")
    problems, summary = check_ledger(mem, int(meta["pages"]) - MAGIC_PAGES, acked, journal)
    if image is not None:
        summary["disk"] = image[0]
    return problems, summary


def disk_check(
    sim_dir: str, ref: int | str, disk_path: str | None = None
) -> tuple[list[str], dict]:
    """Compare the domain's disk with what its workload must have written by
    its current step: random/hotset blocks (workloads.check_disk), a
    ledger's journal (ledger_check). Returns (problems, summary)."""
    meta = find(sim_dir, ref, "disk-check")
    image = _disk_image(meta, disk_path, "disk-check")
    if image is None:
        raise DomainError(meta["domid"], "disk-check", "the domain has no disk")
    workload = meta["workload"]
    if workload == "ledger":
        return ledger_check(sim_dir, ref, None, image[0])
    if workload not in DISK_KINDS:
        raise DomainError(
            meta["domid"], "disk-check", f"workload {workload} writes no disk: nothing to check"
        )
    try:
        with open(image[0], "rb") as f:
            mm = mmap.mmap(f.fileno(), image[1], mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError) as e:
        raise DomainError(meta["domid"], "disk-check", f"cannot read {image[0]}: {e}") from None
    try:
        # checked in place (a disk can be far larger than memory), while still
        with _still(sim_dir, meta):
            step = _step(sim_dir, meta)
            problems, summary = check_disk(
                np.frombuffer(mm, dtype=np.uint8),
                int(meta["seed"]),
                int(meta.get("disk_every", 0)),
                step,
            )
    finally:
        try:
            mm.close()
        except BufferError:  # a view outlived the check; the GC unmaps it
            pass
    summary["disk"] = image[0]
    return problems, summary


def _step(sim_dir: str, meta: dict) -> int:
    """The registers' step, from the domain's status page."""
    try:
        with open(L.path(sim_dir, meta["domid"], "ctl"), "rb") as f:
            ctl = L.ctl_view(f.read(L.CTL_WORDS * 8))
    except (OSError, ValueError) as e:
        raise DomainError(meta["domid"], "disk-check", f"no status page: {e}") from None
    if int(ctl[L.W_MAGIC]) != L.CTL_MAGIC:
        raise DomainError(meta["domid"], "disk-check", "the domain's worker never started")
    return int(ctl[L.W_STEP])


@contextlib.contextmanager
def _still(sim_dir: str, meta: dict) -> Iterator[None]:
    """The domain's guest does not write while the block runs: paused here
    if the host answers and it runs, else left as it is (paused already,
    or its host is gone and nothing moves)."""
    from .client import SimHypervisor

    try:
        dom = SimHypervisor(sim_dir).lookup(meta["domid"])
        running = dom.info().state == "running"
    except DomainError:
        running = False  # the host died (or the domain with it): the file is still
    if not running:
        yield
        return
    dom.pause()
    try:
        yield
    finally:
        dom.unpause()
