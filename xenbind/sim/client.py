"""The daemons' side of the simulated host: ``SimHypervisor`` and ``SimDomain``.

How each Domain operation reaches the simulated hardware:

    lookup/list/create/destroy   host control socket DIR/host.sock (JSON line)
    pause/unpause/enable/disable one SOCK_SEQPACKET round trip to the domain's
    get/set_context, outputs     worker (DIR/dom-N.sock), see worker.py
    checkpoint_stop/go           one round trip each: the stop brings the
                                 context back (get_context then answers from
                                 it while the stop lasts), the go carries the
                                 output barrier asked meanwhile: 2 round trips
                                 a paused window instead of 4
    read_and_clear_dirty         uffd-wp mode: the vCPU's write marks
                                 (DIR/dom-N.marks, xenbind.sim.dirty): guest
                                 paused: take both mark sets; running: one
                                 round trip to swap them, take the one left.
                                 No walk: the cost follows the marked 256 KiB
                                 regions, not the guest's size. Every
                                 MARKS_CHECK_EVERY-th running read also
                                 walks the worker's /proc/<pid>/pagemap
                                 (PAGEMAP_SCAN) and checks the marks against
                                 it; a domain without marks (or after a
                                 miss): every read walks; bitmap mode:
                                 worker snapshots, we read the shared snapshot
    gather/scatter               this process's MAP_SHARED mapping of
                                 DIR/dom-N.mem: one numpy take / one put, as a
                                 foreign mapping would allow; memory never
                                 travels through a socket. A scatter made of
                                 long runs of consecutive PFNs (an initial
                                 copy's) is written with pwritev(2) on the file
                                 instead: the kernel copies into the pages,
                                 where writing through a mapping this process
                                 has not touched yet costs a fault per page
    info                         metadata + the worker's status page DIR/dom-N.ctl
    disks                        the metadata: each disk's image, size, and its
                                 block server's NBD and control sockets
                                 (xenbind.sim.disk; the daemons use the control
                                 socket, the guest the NBD one)

Rules: every failure is a ``DomainError`` naming the domain and operation
(host not running: the message names DIR). A SimDomain may be used from one
thread at a time (a lock makes concurrent use safe, not fast); other
processes (the CLI) may use the same domain at the same time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np

from .. import PAGE_SIZE
from ..errors import DomainError
from ..hypervisor import Domain, Hypervisor
from ..types import Context, DiskInfo, DomainConfig, DomainInfo
from . import layout as L
from .dirty import (
    MARK_SETS,
    MODE_UFFD,
    DirtyTrackingError,
    PagemapScanner,
    WriteMarks,
    marks_file_size,
)
from .workloads import MAGIC_PAGES, REGS_SIZE

log = logging.getLogger(__name__)

HOST_TIMEOUT_S = 60.0
DOMAIN_TIMEOUT_S = 10.0
NO_STOP = (1 << 64) - 1
#: scatter writes with pwritev(2) when its PFNs form runs of at least this
#: many pages on average (64 KiB): an initial copy's batches, not a checkpoint's
IO_MIN_RUN = 16
#: every how many running reads of the write marks the marks are checked
#: against a walk of the whole log, the first one included; env
#: XENBIND_SIM_MARKS_CHECK overrides (1: every one, 0: never)
MARKS_CHECK_EVERY = 256
_NO_PFNS = np.empty(0, dtype=np.uint64)


def _union(*parts: np.ndarray) -> np.ndarray:
    """Sorted unique uint64 PFNs of sorted arrays (most of them empty)."""
    full = [p for p in parts if len(p)]
    if not full:
        return _NO_PFNS
    if len(full) == 1:
        return full[0]
    return np.unique(np.concatenate(full)).astype(np.uint64)


_STATE_NAMES = {
    L.ST_RUNNING: "running",
    L.ST_PAUSED: "paused",
    L.ST_CRASHED: "shutdown",
    L.ST_IDLE: "running",
}


def _params_out(meta: dict) -> dict:
    """Workload parameters as DomainInfo.extra / DomainConfig.extra carry them."""
    extra = {"workload": meta["workload"], "seed": meta["seed"], "rate": meta["rate"]}
    if meta["workload"] == "hotset":
        extra.update(wss=meta["a"], zipf=meta["b"])
    elif meta["workload"] == "ledger":
        extra["accounts"] = meta["a"]
    if meta.get("disk_every"):
        extra["disk_every"] = meta["disk_every"]
    return extra


def _params_in(extra: dict) -> dict:
    """DomainConfig.extra -> the host's create fields."""
    workload = extra.get("workload", "idle")
    req = {"workload": workload, "seed": int(extra.get("seed", 0))}
    if extra.get("rate") is not None:
        req["rate"] = float(extra["rate"])
    if workload == "hotset":
        req["a"], req["b"] = int(extra.get("wss", 0)), float(extra.get("zipf", 0.0))
    elif workload == "ledger":
        req["a"] = int(extra.get("accounts", 0))
    req["disk_every"] = int(extra.get("disk_every", 0))
    return req


class SimHypervisor(Hypervisor):
    """The simulated host whose directory is ``sim_dir``."""

    kind = "sim"

    def __init__(self, sim_dir: str | os.PathLike) -> None:
        self.dir = os.path.abspath(os.fspath(sim_dir))

    def request(self, req: dict, op: str, ref=None) -> dict:
        """One request to the host process; DomainError on any failure."""
        path = L.host_path(self.dir, "sock")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(HOST_TIMEOUT_S)
                s.connect(path)
                s.sendall(json.dumps(req).encode() + b"\n")
                buf = b""
                while b"\n" not in buf:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("host closed the connection")
                    buf += chunk
        except (OSError, ConnectionError) as e:
            raise DomainError(
                ref, op, f"simulated host in {self.dir} is not running or not answering ({e})"
            ) from None
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise DomainError(ref, op, reply.get("error", "refused"))
        return reply

    def ping(self) -> dict:
        return self.request({"op": "ping"}, "ping")

    def lookup(self, ref: int | str) -> SimDomain:
        meta = self.request({"op": "lookup", "ref": ref}, "lookup", ref)["meta"]
        return SimDomain(self, meta)

    def list(self) -> list[DomainInfo]:
        """Every domain of the host; one destroyed between the host's answer
        and the read of its status page is left out (it is gone)."""
        infos = []
        for m in self.request({"op": "list"}, "list")["domains"]:
            dom = SimDomain(self, m)
            try:
                infos.append(dom.info())
            except DomainError:
                if os.path.exists(L.path(self.dir, dom.domid, "json")):
                    raise  # still there: a real failure
            finally:
                dom.close()
        return infos

    def create(
        self,
        memory: int,
        workload: str = "idle",
        seed: int = 0,
        rate: float | None = None,
        name: str | None = None,
        *,
        paused: bool = False,
        wss: int = 0,
        zipf: float = 0.0,
        accounts: int = 0,
        dirty_mode: str = "auto",
        uuid: str | None = None,
        vcpus: int = 1,
        backup: bool = False,
        disks: Sequence[int] = (),
        disk_files: Sequence[str | os.PathLike] = (),
        disk_every: int | None = None,
        write_marks: bool = True,
    ) -> SimDomain:
        """Create a running (or paused) domain of ``memory`` bytes (sim only).

        ``disks``: sizes in bytes of new (sparse, zero) disks, whole 512-byte
        sectors, 1 MiB to 64 GiB; or ``disk_files``: existing images used as
        they are and never deleted by the host (``disks`` then, if given,
        must match their sizes). ``disk_every`` (random, hotset with a
        disk): every how many steps the guest writes a 4 KiB disk block
        (default 16; 0: never). ``write_marks`` False: no write marks
        (xenbind.sim.dirty), every read of the log walks the guest's mapping."""
        if memory % PAGE_SIZE:
            raise DomainError(name, "create", f"memory {memory} is not a whole number of pages")
        req = {
            "op": "create",
            "pages": memory // PAGE_SIZE,
            "workload": workload,
            "seed": seed,
            "rate": rate,
            "name": name,
            "paused": paused,
            "a": wss if workload == "hotset" else accounts,
            "b": zipf,
            "dirty_mode": dirty_mode,
            "uuid": uuid,
            "vcpus": vcpus,
            "backup": backup,
            "disks": [int(d) for d in disks],
            "disk_files": [os.path.abspath(os.fspath(f)) for f in disk_files],
            "disk_every": disk_every,
            "write_marks": write_marks,
        }
        meta = self.request(req, "create", name)["meta"]
        return SimDomain(self, meta)

    def create_backup(self, config: DomainConfig, disks: Sequence[str] = ()) -> SimDomain:
        """A paused backup domain for ``config``; ``disks``: its images, one
        per ``config.disks`` and of those sizes (kept by the receiver; the
        host serves them and never deletes them)."""
        if len(disks) != len(config.disks):
            raise DomainError(
                config.name,
                "create_backup",
                f"the domain has {len(config.disks)} disks, {len(disks)} backup images given",
            )
        req = {
            "op": "create",
            "pages": config.pages,
            "name": config.name,
            "uuid": config.uuid,
            "vcpus": config.vcpus,
            "backup": True,
            "paused": True,
            "disks": [int(d) for d in config.disks],
            "disk_files": [os.path.abspath(os.fspath(p)) for p in disks],
        }
        req.update(_params_in(config.extra))
        meta = self.request(req, "create_backup", config.name)["meta"]
        return SimDomain(self, meta)

    def destroy(self, ref: int | str) -> None:
        self.request({"op": "destroy", "ref": ref}, "destroy", ref)


class SimDomain(Domain):
    def __init__(self, hv: SimHypervisor, meta: dict) -> None:
        self.hv = hv
        self.dir = hv.dir
        self.meta = meta
        self.domid = int(meta["domid"])
        self.name = meta["name"]
        self.pages = int(meta["pages"])
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._mm: mmap.mmap | None = None
        self._mem: np.ndarray | None = None
        self._mem_fd = -1  # the memory file, kept open for pwritev (scatter of runs)
        self._ctl_mm: mmap.mmap | None = None
        self._ctl: np.ndarray | None = None
        self._scanner: PagemapScanner | None = None
        self._bitmap_mm: mmap.mmap | None = None
        self._marks_mm: mmap.mmap | None = None
        self._marks: list[WriteMarks] | None = None
        # pages reads returned since the last walk (1 byte per page: their
        # PTEs are still unprotected, a check's walk finds them again); None
        # until this object enabled log-dirty or walked (its baseline)
        self._since_walk: np.ndarray | None = None
        self._running_reads = 0
        self.marks_check_every = int(
            os.environ.get("XENBIND_SIM_MARKS_CHECK", str(MARKS_CHECK_EVERY))
        )
        #: the write marks are used for paused reads (off for good after a miss)
        self.marks_trusted = True
        self.marks_checks = 0  # running reads checked against a walk
        self.marks_misses = 0  # pages a check's walk found that the marks had not
        # between checkpoint_stop and checkpoint_go: the context the stop
        # brought back, and whether output_barrier was asked (sent with the go)
        self._stop_ctx: Context | None = None
        self._barrier_due = False

    def __repr__(self) -> str:
        return f"SimDomain({self.domid}, {self.name!r}, {self.dir})"

    # --- plumbing --------------------------------------------------------------------

    def _err(self, op: str, reason: str) -> DomainError:
        return DomainError(self.domid, op, reason)

    def _request(self, op: str, code: bytes, payload: bytes = b"") -> bytes:
        with self._lock:
            try:
                if self._sock is None:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    s.settimeout(DOMAIN_TIMEOUT_S)
                    try:
                        s.connect(L.path(self.dir, self.domid, "sock"))
                    except OSError:
                        s.close()
                        raise
                    self._sock = s
                self._sock.send(code + payload)
                reply = self._sock.recv(65536)
            except OSError as e:
                self._drop_socket()
                raise self._err(
                    op,
                    f"domain is not running (destroyed, crashed, or host in {self.dir} down): {e}",
                ) from None
            if not reply:
                self._drop_socket()
                raise self._err(op, f"domain went away (destroyed, or host in {self.dir} down)")
            if reply[:1] != b"\0":
                raise self._err(op, reply[1:].decode(errors="replace"))
            return reply[1:]

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _status(self) -> np.ndarray:
        if self._ctl is None:
            try:
                with open(L.path(self.dir, self.domid, "ctl"), "rb") as f:
                    self._ctl_mm = mmap.mmap(f.fileno(), PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
            except (OSError, ValueError) as e:
                raise self._err("status", f"no status page: {e}") from None
            self._ctl = L.ctl_view(self._ctl_mm)
        return self._ctl

    def _memory(self, op: str) -> np.ndarray:
        if self._mem is None:
            try:
                fd = os.open(L.path(self.dir, self.domid, "mem"), os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise self._err(op, f"cannot open guest memory: {e}") from None
            try:
                self._mm = mmap.mmap(fd, self.pages * PAGE_SIZE, mmap.MAP_SHARED)
            except (OSError, ValueError) as e:
                os.close(fd)
                raise self._err(op, f"cannot map guest memory: {e}") from None
            self._mem_fd = fd
            self._mem = np.frombuffer(self._mm, dtype=np.uint8).reshape(self.pages, PAGE_SIZE)
        return self._mem

    def _check_pfns(self, pfns, op: str) -> np.ndarray:
        pfns = np.asarray(pfns)
        if pfns.ndim != 1 or (pfns.size and pfns.dtype.kind not in "ui"):
            raise self._err(op, f"PFNs must be a 1-D integer array, got {pfns.dtype} {pfns.shape}")
        if pfns.size:
            hi = int(pfns.max())
            if hi >= self.pages:
                raise self._err(op, f"PFN {hi} is past the last page {self.pages - 1}")
            if pfns.dtype.kind == "i" and int(pfns.min()) < 0:
                raise self._err(op, f"negative PFN {int(pfns.min())}")
        return pfns.astype(np.intp, copy=False)

    def _check_pages(self, arr, n: int, op: str) -> np.ndarray:
        if (
            not isinstance(arr, np.ndarray)
            or arr.dtype != np.uint8
            or arr.ndim != 2
            or arr.shape[1] != PAGE_SIZE
            or arr.shape[0] < n
        ):
            shape = getattr(arr, "shape", None)
            raise self._err(op, f"page buffer must be uint8 (>= {n}, {PAGE_SIZE}), got {shape}")
        return arr

    # --- the Domain interface ----------------------------------------------------------

    def info(self) -> DomainInfo:
        extra = _params_out(self.meta)
        ctl = self._status()
        alive = self._alive(ctl)
        code = int(ctl[L.W_STATE])
        state = _STATE_NAMES.get(code, "running") if alive else "shutdown"
        extra.update(
            dirty_mode=L.MODE_CODES.get(
                int(ctl[L.W_MODE]), self.meta.get("dirty_mode_in_use", "?")
            ),
            step=int(ctl[L.W_STEP]),
            pause_count=int(ctl[L.W_PAUSE]),
            logdirty=bool(ctl[L.W_LOGDIRTY]),
            backup=bool(self.meta.get("backup")),
        )
        if code == L.ST_CRASHED and alive:
            extra["crashed"] = True
        if not alive:
            extra["exit"] = self.meta.get("exit", "worker is not running")
        return DomainInfo(
            domid=self.domid,
            name=self.name,
            uuid=self.meta["uuid"],
            pages=self.pages,
            vcpus=int(self.meta.get("vcpus", 1)),
            state=state,
            hvm=True,
            extra=extra,
        )

    def _alive(self, ctl: np.ndarray) -> bool:
        pid = int(ctl[L.W_PID])
        if int(ctl[L.W_MAGIC]) != L.CTL_MAGIC or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return os.path.exists(L.path(self.dir, self.domid, "sock"))

    def pause(self) -> None:
        self._request("pause", b"P")

    def unpause(self) -> None:
        self._end_stop()
        self._request("unpause", b"U")

    def checkpoint_stop(self) -> None:
        blob = self._request("checkpoint_stop", b"K")
        self._stop_ctx = self._context(blob[4:])
        self._barrier_due = False

    def checkpoint_go(self) -> None:
        barrier = self._leave_stop()
        self._request("checkpoint_go", b"W", b"\1" if barrier else b"\0")

    def _leave_stop(self) -> bool:
        """Forget the stop's context; whether a barrier was asked during it."""
        barrier = self._barrier_due
        self._stop_ctx, self._barrier_due = None, False
        return barrier

    def _end_stop(self) -> None:
        """Leave a checkpoint stop by another way than checkpoint_go: the
        barrier asked during it is sent now, the context is read afresh."""
        if self._leave_stop():
            self._request("output_barrier", b"B")

    def enable_logdirty(self) -> None:
        self._request("enable_logdirty", b"E")
        self._new_baseline()  # all protected, no marks: nothing unreported

    def _new_baseline(self) -> None:
        """Every written page so far was reported: none is owed to a check."""
        if self.marks_check_every > 0:
            if self._since_walk is None:
                self._since_walk = np.zeros(self.pages, dtype=np.uint8)
            else:
                self._since_walk.fill(0)

    def disable_logdirty(self) -> None:
        self._request("disable_logdirty", b"D")

    def logdirty_enabled(self) -> bool:
        """Whether log-dirty mode is on (by anyone: this process or another).
        ``enable_logdirty`` refuses while it is, as Xen does."""
        return bool(self._status()[L.W_LOGDIRTY])

    def checkpoint_held(self) -> str | None:
        """How the guest is stopped, for a sender adopting it after its
        predecessor died mid-checkpoint: "paused" (a pause count above 0:
        ``unpause`` undoes one) or None (it runs)."""
        return "paused" if int(self._status()[L.W_PAUSE]) > 0 else None

    def output_barriers(self) -> int:
        """Barriers in the output buffer not yet released (checkpoints whose
        output a dead sender never released)."""
        return int(self._status()[L.W_BARRIERS])

    def read_and_clear_dirty(self) -> np.ndarray:
        with self._lock:
            ctl = self._status()
            if int(ctl[L.W_MODE]) == 1:  # uffd-wp: scan from here, no round trip
                if not ctl[L.W_LOGDIRTY]:
                    raise self._err("read_and_clear_dirty", "log-dirty mode is not enabled")
                if self._scanner is None:
                    pid, addr, length = (int(ctl[w]) for w in (L.W_PID, L.W_ADDR, L.W_LEN))
                    try:
                        self._scanner = PagemapScanner(pid, addr, length)
                    except DirtyTrackingError as e:
                        raise self._err("read_and_clear_dirty", str(e)) from None
                marks = self._write_marks(ctl)
                try:
                    if marks is None:
                        return self._scanner.scan()
                    if int(ctl[L.W_PAUSE]) > 0:  # nothing writes: both sets
                        pfns = _union(*(m.take() for m in marks))
                        self._note(pfns)
                        return pfns
                    return self._take_running(marks)
                except DirtyTrackingError as e:
                    self._scanner.close()
                    self._scanner = None
                    raise self._err("read_and_clear_dirty", f"{e} (domain gone?)") from None
            self._request("read_and_clear_dirty", b"R")
            if self._bitmap_mm is None:
                with open(L.path(self.dir, self.domid, "dirty"), "rb") as f:
                    self._bitmap_mm = mmap.mmap(
                        f.fileno(), 2 * self.pages, mmap.MAP_SHARED, mmap.PROT_READ
                    )
            snap = np.frombuffer(
                self._bitmap_mm, dtype=np.uint8, count=self.pages, offset=self.pages
            )
            return np.flatnonzero(snap).astype(np.uint64)

    def _write_marks(self, ctl: np.ndarray) -> list[WriteMarks] | None:
        """The vCPU's mark sets, mapped on first use (None: the worker keeps
        none, or they missed a page once: walk)."""
        if not self.marks_trusted or not int(ctl[L.W_MARKS]):
            return None
        if self._marks is None:
            try:
                fd = os.open(L.path(self.dir, self.domid, "marks"), os.O_RDWR | os.O_CLOEXEC)
                try:
                    self._marks_mm = mmap.mmap(fd, marks_file_size(self.pages))
                finally:
                    os.close(fd)
            except (OSError, ValueError) as e:
                raise self._err(
                    "read_and_clear_dirty", f"cannot map the write marks: {e}"
                ) from None
            self._marks = [WriteMarks(self._marks_mm, self.pages, i) for i in range(MARK_SETS)]
        return self._marks

    def _swap_marks(self) -> int:
        """Make the vCPU mark into its other set; the one it left (quiescent now)."""
        (left,) = struct.unpack("<B", self._request("read_and_clear_dirty", b"M"))
        return int(left)

    def _note(self, pfns: np.ndarray) -> None:
        if self._since_walk is not None:
            self._since_walk[pfns] = 1

    def _take_running(self, marks: list[WriteMarks]) -> np.ndarray:
        """A read of a running guest: swap the sets, take the one left; every
        MARKS_CHECK_EVERY-th time also walk and check (xenbind.sim.dirty)."""
        assert self._scanner is not None  # made by the caller
        pfns = marks[self._swap_marks()].take()
        check = False
        if self.marks_check_every > 0:
            check = self._running_reads % self.marks_check_every == 0
            self._running_reads += 1
        if not check:
            self._note(pfns)
            return pfns
        walked = self._scanner.scan()
        # the batch that ran during the walk has marked its pages by now
        pfns = _union(pfns, marks[self._swap_marks()].take())
        seen = self._since_walk
        missed = _NO_PFNS
        if seen is not None:  # a baseline: every walked page was returned since
            seen[pfns] = 1
            missed = walked[seen[walked] == 0] if len(walked) else _NO_PFNS
        self.marks_checks += 1
        # the new baseline: this walk re-protected what it found; of this
        # read's pages, those written after the walk passed them stay owed
        self._new_baseline()
        self._note(pfns)
        if not len(missed):
            return pfns
        self.marks_misses += len(missed)
        self.marks_trusted = False
        log.warning(
            "domain %d: the write marks missed %d page(s) the log-dirty walk found (first "
            "PFN %d); this read returns them, and every later read walks the log",
            self.domid,
            len(missed),
            int(missed[0]),
        )
        return _union(pfns, walked)

    def memory_rows(self) -> np.ndarray:
        """The guest's memory mapping itself (pages, 4096): a paused backup's
        committed pages, read in place by the receiver's decoder."""
        return self._memory("memory_rows")

    def gather(self, pfns, out: np.ndarray) -> None:
        idx = self._check_pfns(pfns, "gather")
        self._check_pages(out, len(idx), "gather")
        mem = self._memory("gather")
        # always through the mapping (no preadv for runs): the initial copy's
        # reads fault this process's mapping in (16 pages a fault, the
        # kernel's fault-around), so each epoch's gather finds it mapped
        np.take(mem, idx, axis=0, out=out[: len(idx)], mode="clip")

    def scatter(self, pfns, pages: np.ndarray) -> None:
        idx = self._check_pfns(pfns, "scatter")
        self._check_pages(pages, len(idx), "scatter")
        mem = self._memory("scatter")
        bounds = self._runs(idx, pages)
        if bounds is not None:
            self._pwrite_runs(idx, pages, bounds)
            return
        mem[idx] = pages[: len(idx)]

    @staticmethod
    def _runs(idx: np.ndarray, pages: np.ndarray) -> np.ndarray | None:
        """Where the runs of consecutive PFNs in ``idx`` start and end (k+1
        bounds for k runs), if they are long enough for pwritev (and
        ``pages`` is one contiguous buffer); else None."""
        if len(idx) < IO_MIN_RUN or not pages.flags.c_contiguous:
            return None
        starts = np.flatnonzero(np.diff(idx) != 1) + 1
        if len(idx) < IO_MIN_RUN * (len(starts) + 1):
            return None
        return np.concatenate(([0], starts, [len(idx)]))

    def _pwrite_runs(self, idx: np.ndarray, pages: np.ndarray, bounds: np.ndarray) -> None:
        """pwritev ``pages[bounds[k]:bounds[k+1]]`` at the run's first PFN, run by run."""
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            view = memoryview(pages[a:b]).cast("B")  # type: ignore[arg-type]  # numpy: Buffer on 3.12+ only
            at = int(idx[a]) * PAGE_SIZE
            while len(view):
                try:
                    n = os.pwritev(self._mem_fd, [view], at)
                except OSError as e:
                    raise self._err("scatter", f"cannot write guest memory: {e}") from None
                if n <= 0:
                    raise self._err("scatter", "cannot write guest memory: short write")
                view, at = view[n:], at + n

    def populated_pfns(self) -> np.ndarray:
        """Every PFN: a simulated domain's memory file has no holes."""
        return np.arange(self.pages, dtype=np.uint64)

    def magic_pfns(self) -> tuple[int, int, int]:
        top = self.pages - MAGIC_PAGES
        return (top, top + 1, top + 2)

    def get_context(self) -> Context:
        if self._stop_ctx is not None:  # paused by checkpoint_stop, which read it
            return self._stop_ctx
        return self._context(self._request("get_context", b"G"))

    def _context(self, blob: bytes) -> Context:
        return Context(
            magic_pfns=self.magic_pfns(),
            hvm_context=blob[:REGS_SIZE],
            device_model=blob[REGS_SIZE:],
        )

    def set_context(self, ctx: Context) -> None:
        if tuple(ctx.magic_pfns) != self.magic_pfns():
            raise self._err(
                "set_context",
                f"magic PFNs {tuple(ctx.magic_pfns)} differ from this domain's {self.magic_pfns()}",
            )
        self._end_stop()
        self._request("set_context", b"S", bytes(ctx.hvm_context) + bytes(ctx.device_model))

    def output_barrier(self) -> None:
        if self._stop_ctx is not None:  # the guest is stopped: no output until the go
            self._barrier_due = True
            return
        self._request("output_barrier", b"B")

    def output_release(self) -> None:
        self._end_stop()
        self._request("output_release", b"O")

    def output_unplug(self) -> None:
        self._end_stop()
        self._request("output_unplug", b"X")

    def destroy(self) -> None:
        self.close()
        self.hv.destroy(self.domid)

    def disks(self) -> list[DiskInfo]:
        """The domain's disks, from its metadata (xenbind.sim.disk)."""
        return [
            DiskInfo(path=d["path"], size=int(d["size"]), control=d["control"], nbd=d["nbd"])
            for d in self.meta.get("disks", ())
        ]

    def close(self) -> None:
        with self._lock:
            self._drop_socket()
            if self._scanner is not None:
                self._scanner.close()
                self._scanner = None
            self._mem = None
            self._ctl = None
            if self._mem_fd >= 0:
                os.close(self._mem_fd)
                self._mem_fd = -1
            self._marks = None
            for name in ("_mm", "_ctl_mm", "_bitmap_mm", "_marks_mm"):
                m = getattr(self, name)
                if m is not None:
                    try:
                        m.close()
                    except BufferError:  # a caller still holds a view; GC will unmap
                        pass
                    setattr(self, name, None)

    # --- simulator-only helpers (tests, bench, CLI) -------------------------------------

    def status(self) -> dict:
        ctl = self._status()
        return {
            "pid": int(ctl[L.W_PID]),
            "step": int(ctl[L.W_STEP]),
            "pause_count": int(ctl[L.W_PAUSE]),
            "logdirty": bool(ctl[L.W_LOGDIRTY]),
            "dirty_mode": L.MODE_CODES.get(int(ctl[L.W_MODE]), "?"),
            "state": int(ctl[L.W_STATE]),
            "stop_at": int(ctl[L.W_STOP]),
            "outputs_released": int(ctl[L.W_RELEASED]),
            "outputs_buffered": int(ctl[L.W_BUFFERED]),
            "barriers": int(ctl[L.W_BARRIERS]),
            "alive": self._alive(ctl),
        }

    @property
    def step(self) -> int:
        return int(self._status()[L.W_STEP])

    @property
    def dirty_mode(self) -> str:
        return L.MODE_CODES.get(int(self._status()[L.W_MODE]), "?")

    def stop_at(self, step: int | None) -> None:
        """Let the guest run up to ``step`` steps, then sit idle (test hook)."""
        self._request("stop_at", b"T", struct.pack("<Q", NO_STOP if step is None else step))

    def wait_step(self, step: int, timeout: float = 10.0) -> None:
        """Wait until the guest completed ``step`` steps."""
        deadline = time.monotonic() + timeout
        while self.step < step:
            if time.monotonic() > deadline:
                raise self._err(
                    "wait_step", f"guest at step {self.step}, {step} not reached in {timeout}s"
                )
            time.sleep(0.001)

    def set_rate(self, rate: float) -> None:
        self._request("set_rate", b"A", struct.pack("<d", float(rate)))

    def digest(self) -> str:
        """SHA-256 of the whole memory (pause first for a stable answer)."""
        return hashlib.sha256(self._memory("digest")).hexdigest()  # type: ignore[arg-type]  # numpy: Buffer on 3.12+ only

    @property
    def uffd(self) -> bool:
        return self.dirty_mode == MODE_UFFD
