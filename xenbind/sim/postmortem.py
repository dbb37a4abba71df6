"""What an operator can read from a host directory alone, even after the host died.

``digest`` hashes a domain's memory file, ``outputs`` reads its released
output, ``ledger_check`` runs the ledger checker on its memory file. None of
them needs the host process; all raise ``DomainError`` naming the domain.

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
from .ledger import check_ledger, parse_acks
from .workloads import MAGIC_PAGES


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


def ledger_check(
    sim_dir: str, ref: int | str, acked_path: str | None = None
) -> tuple[list[str], dict]:
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
    with _still(sim_dir, meta):
        mm = _map(sim_dir, meta, "ledger-check")
        try:
            mem = np.frombuffer(mm, dtype=np.uint8).copy()  # the consistent view
        finally:
            mm.close()
    return check_ledger(mem, int(meta["pages"]) - MAGIC_PAGES, acked)


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
