"""One simulated domain: the process that *is* the guest (its vCPU, its memory).

Forked by the host; dies with it (PR_SET_PDEATHSIG=SIGKILL, then a check
that the host did not die before that was set). It maps the domain's memory
file, owns the userfaultfd that tracks its writes, runs the workload, and
serves its control socket ``dom-N.sock`` (SOCK_SEQPACKET, one request per
packet, one reply per request) in the same single thread: when it answers a
pause, the workload is by construction not writing. A workload batch is
kept well under a millisecond so requests wait little, and the ledger asks
every 16 transactions whether one waits (one poll(2) of the selector's fd)
and ends its batch there: at its max rate a request waited ~0.15 ms more on
average for the 64-transaction batch to end, in a pause and in every
output release, where Xen pauses at once and dom0 releases without the guest.

Requests (first byte = opcode, rest = payload); replies: ``b"\\0" + payload``
on success, ``b"\\1" + utf-8 message`` on error::

    P  pause                 -> u32 pause count
    U  unpause               -> u32 pause count   (error if not paused)
    K  checkpoint stop: pause, then get context   -> u32 pause count + as G
    W  checkpoint go: <- u8 1: output barrier first, 0: none; then unpause -> as U
    M  swap the write marks  -> u8 the set the workload marked into until now
                             (quiescent from this reply on: xenbind.sim.dirty)
    E  enable log-dirty      (write-protect all / clear the bitmap); refused when
                             it is on already, as Xen refuses (EINVAL): a second
                             tracker would steal part of the first one's log
    D  disable log-dirty
    R  bitmap mode: snapshot-and-clear the bitmap  -> u64 pages in the snapshot
    G  get context           -> registers (64 bytes) + device model (32 bytes)
    S  set context           <- registers + device model (domain must be paused)
    B  output barrier        O  output release      X  output unplug
    T  stop at step          <- u64 (2**64-1: no stop): run up to that step, then idle
    A  set rate              <- float64 steps per second; inf: max rate (a batch
                             after another, the control socket polled between
                             them, as fast as this process gets the CPU)
    L  output timing log     <- path (utf-8; empty: stop): append the timing
                             of every released output burst to that file
                             (xenbind.sim.outputs.TIMING_DTYPE)

Output timestamps: each batch's output is handed to the output buffer with
CLOCK_MONOTONIC (ns) read just before and just after the batch ran, so the
commit of its k-th of n records lies between the two (the buffer keeps the
pair per burst, not per record); the buffer stamps barriers and releases.

Disks (meta ``disks``, xenbind.sim.disk): at start the worker connects to
each disk's export on the domain's block server with libnbd; the workload's
disk writes are synchronous ``pwrite``s on that connection, done in this
thread like everything else, so a pause answered here finds no disk write in
flight either. A disk write that fails (the server died, the connection
broke) crashes the guest, logged with the disk and the error: the workload
stops at the step whose write failed, nothing after it is done or
acknowledged.

Write marks (uffd-wp mode, ``dom-N.marks``, xenbind.sim.dirty.WriteMarks):
while log-dirty is on, the workload marks each page it wrote, after the
write (the ``mark`` hook the bitmap mode uses), so that a reader of the log
whose guest is paused takes the marks instead of walking the whole mapping.
There are two mark sets: ``M`` makes the workload mark into the other one
and answers which it left (a reader of a running guest then takes that
one, no longer written). ``E`` write-protects all and resets both sets, in
this thread (nothing writes between the two); ``D`` stops marking.

Rules: pauses are counted; the guest runs only at count 0. All guest-memory
writes of the workload go through this process's mapping, so uffd-wp sees
them, and (log-dirty on) are marked after they are made; the registers only
change in this thread.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import selectors
import signal
import socket
import struct
import sys
import time
from typing import cast

import numpy as np

from .. import PAGE_SIZE
from . import layout as L
from .dirty import (
    MARK_REGION_PAGES,
    MARK_SETS,
    MODE_BITMAP,
    MODE_UFFD,
    DirtyTrackingError,
    SharedBitmap,
    UffdWriteProtect,
    WriteMarks,
    marks_file_size,
)
from .disk import GuestDisk
from .guest import make_workload
from .outputs import OutputBuffer
from .workloads import MAGIC_PAGES, Marker, Registers, RegistersError, new_registers

PR_SET_PDEATHSIG = 1
NO_STOP = (1 << 64) - 1
MAX_PACKET = 4096
#: if the guest falls this far behind its rate, it forgets the backlog
MAX_BACKLOG_S = 0.25
#: a rate-capped guest runs its steps in batches of at least this much time's
#: worth (144 steps at 144,000/s): one step a batch, as soon as each was due,
#: cost a hotset guest at 144,000 pages/s 95% of a core (36,000/s: 77%) in
#: per-batch overhead, the vCPU's time taken from dom0 on a 2-core host
MIN_BATCH_S = 0.001


def log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
    sys.stderr.flush()


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the host dies; exit if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:  # the host died before prctl took effect
        os._exit(1)


class Worker:
    def __init__(self, sim_dir: str, domid: int, ready_fd: int) -> None:
        self.dir = sim_dir
        self.domid = domid
        self.ready_fd = ready_fd
        meta = L.read_meta(sim_dir, domid)
        self.meta = meta
        self.pages = int(meta["pages"])
        self.usable = self.pages - MAGIC_PAGES
        fd = os.open(L.path(sim_dir, domid, "mem"), os.O_RDWR | os.O_CLOEXEC)
        try:
            self.mm = mmap.mmap(fd, self.pages * PAGE_SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.mem64 = np.frombuffer(self.mm, dtype=np.uint64)
        self.addr = self.mem64.ctypes.data
        cfd = os.open(L.path(sim_dir, domid, "ctl"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.posix_fallocate(cfd, 0, PAGE_SIZE)  # ENOSPC now, not SIGBUS on a write
            self.ctl_mm = mmap.mmap(cfd, PAGE_SIZE, mmap.MAP_SHARED)
        finally:
            os.close(cfd)
        self.ctl = L.ctl_view(self.ctl_mm)
        self.ctl[:] = 0

        self.regs = new_registers(
            meta["workload"],
            int(meta["seed"]),
            float(meta["rate"]),
            int(meta.get("a", 0)),
            float(meta.get("b", 0.0)),
            int(meta.get("disk_every", 0)),
        )
        self.disks = [
            GuestDisk(i, d["nbd"], int(d["size"]), d["path"])
            for i, d in enumerate(meta.get("disks", ()))
        ]
        self.workload = make_workload(self.regs, self.usable, self.disks[0] if self.disks else None)
        self.crash_reason: str | None = None
        # a backup's memory arrives by scatter and its registers by set_context,
        # in either order: the guest checks its memory when it is next unpaused
        self.verify_pending = bool(meta.get("backup"))
        if not meta.get("backup"):
            self.workload.init_memory(self.mem64)

        self.uffd: UffdWriteProtect | None = None
        self.bitmap: SharedBitmap | None = None
        self.marks: list[WriteMarks] = []  # the mark sets (uffd-wp mode)
        self.markset = 0  # the set the workload marks into
        self.mark: Marker | None = None
        want = meta.get("dirty_mode", "auto")
        if want in ("auto", MODE_UFFD):
            try:
                self.uffd = UffdWriteProtect(self.addr, self.pages * PAGE_SIZE)
                self.mode = MODE_UFFD
            except DirtyTrackingError as e:
                if want == MODE_UFFD:
                    raise
                log(f"uffd-wp unavailable ({e}); falling back to the bitmap")
        if self.uffd is not None and meta.get("write_marks", True):
            # the vCPU's write marks (xenbind.sim.dirty): set while log-dirty is on
            mfd = os.open(
                L.path(sim_dir, domid, "marks"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
            try:
                size = marks_file_size(self.pages)
                os.ftruncate(mfd, 0)  # a stale file of a former domain N: zeros
                os.posix_fallocate(mfd, 0, size)
                self.marks_mm = mmap.mmap(mfd, size, mmap.MAP_SHARED)
            finally:
                os.close(mfd)
            self.marks = [WriteMarks(self.marks_mm, self.pages, i) for i in range(MARK_SETS)]
        if self.uffd is None:
            self.mode = MODE_BITMAP
            bfd = os.open(
                L.path(sim_dir, domid, "dirty"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
            try:
                os.posix_fallocate(bfd, 0, 2 * self.pages)
                self.bm_mm = mmap.mmap(bfd, 2 * self.pages, mmap.MAP_SHARED)
            finally:
                os.close(bfd)
            self.bitmap = SharedBitmap(self.bm_mm, self.pages)
            self.mark = self.bitmap.mark
        self.logdirty = False
        self.outputs = OutputBuffer(L.path(sim_dir, domid, "out"))
        self.pause_count = 1 if meta.get("paused") or meta.get("backup") else 0
        self.stop_at = NO_STOP
        self.t0 = 0.0
        self.base_step = 0
        self.was_runnable = False

        sock_path = L.path(sim_dir, domid, "sock")
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(sock_path)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        # the selector's own fd is readable when a socket it watches is: one
        # poll(2) (~0.5 us) tells a running batch that a request waits
        self._waiting = select.poll()
        self._waiting.register(self.sel.fileno(), select.POLLIN)
        self.workload.interrupted = self._request_waiting

    # --- status page ---------------------------------------------------------------

    def publish(self) -> None:
        c = self.ctl
        c[L.W_PID] = os.getpid()
        c[L.W_ADDR] = self.addr
        c[L.W_LEN] = self.pages * PAGE_SIZE
        c[L.W_PAUSE] = self.pause_count
        c[L.W_STEP] = self.regs.step
        c[L.W_LOGDIRTY] = int(self.logdirty)
        c[L.W_MODE] = 1 if self.mode == MODE_UFFD else 2
        c[L.W_STATE] = self.state_code()
        c[L.W_STOP] = -1 if self.stop_at == NO_STOP else self.stop_at
        c[L.W_RELEASED] = self.outputs.released
        c[L.W_BUFFERED] = self.outputs.buffered
        c[L.W_BARRIERS] = len(self.outputs.barriers)
        c[L.W_MARKS] = MARK_REGION_PAGES if self.marks else 0

    def state_code(self) -> int:
        if self.pause_count:
            return L.ST_PAUSED
        if self.crash_reason:
            return L.ST_CRASHED
        if self.regs.step >= self.stop_at or getattr(self.workload, "full", False):
            return L.ST_IDLE
        return L.ST_RUNNING

    def runnable(self) -> bool:
        return (
            self.pause_count == 0
            and not self.crash_reason
            and (self.regs.rate > 0 or self.regs.max_rate)
            and self.regs.kind_name != "idle"
            and self.regs.step < self.stop_at
            and not getattr(self.workload, "full", False)
        )

    # --- main loop -----------------------------------------------------------------

    def serve(self) -> None:
        self.publish()
        self.ctl[L.W_MAGIC] = L.CTL_MAGIC
        os.write(self.ready_fd, f"ok {self.mode}\n".encode())
        os.close(self.ready_fd)
        log(
            f"domain {self.domid} ({self.meta['name']}): {self.pages} pages, workload "
            f"{self.regs.kind_name} seed {self.regs.seed} rate "
            f"{'max' if self.regs.max_rate else self.regs.rate}/s, "
            f"dirty tracking {self.mode}, {'paused' if self.pause_count else 'running'}"
            + "".join(f", disk {d.index} {d.size} bytes on {d.sock}" for d in self.disks)
        )
        while True:
            timeout: float | None = None
            due = 0
            run = self.runnable()
            if run and self.regs.max_rate:
                due, timeout = self.workload.max_batch, 0.0
            elif run:
                now = time.monotonic()
                if not self.was_runnable:
                    self.t0, self.base_step = now, self.regs.step
                target = self.base_step + int((now - self.t0) * self.regs.rate)
                due = target - self.regs.step
                if due > self.regs.rate * MAX_BACKLOG_S + self.workload.max_batch:
                    self.t0, self.base_step, due = now, self.regs.step, 1
                # a batch holds at least the steps of MIN_BATCH_S (fewer only
                # to reach the stop step): requests wake the select at once
                least = max(
                    1,
                    min(
                        self.workload.max_batch,
                        int(self.regs.rate * MIN_BATCH_S),
                        self.stop_at - self.regs.step,
                    ),
                )
                if due < least:
                    timeout = max(
                        0.0,
                        self.t0 + (self.regs.step + least - self.base_step) / self.regs.rate - now,
                    )
                    due = 0
                else:
                    timeout = 0.0
            self.was_runnable = run
            for key, _ in self.sel.select(timeout):
                if key.data is None:
                    self._accept()
                else:
                    self._handle(cast(socket.socket, key.fileobj))  # _accept registered it
            if due > 0 and self.runnable():
                n = min(due, self.workload.max_batch, self.stop_at - self.regs.step)
                self._run(n)

    def _request_waiting(self) -> bool:
        return bool(self._waiting.poll(0))

    def _run(self, n: int) -> None:
        t0 = time.monotonic_ns()
        out = self.workload.run(self.mem64, n, self.mark)
        if out:
            self.outputs.emit(out, t0, time.monotonic_ns())
        if self.workload.disk_failure and not self.crash_reason:
            self.crash_reason = f"the guest's disk failed: {self.workload.disk_failure}"
            log(f"guest crashed at step {self.regs.step}: {self.crash_reason}")
        self.publish()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        self.sel.register(conn, selectors.EVENT_READ, "conn")

    def _handle(self, conn: socket.socket) -> None:
        try:
            req = conn.recv(MAX_PACKET)
        except OSError:
            req = b""
        if not req:
            self.sel.unregister(conn)
            conn.close()
            return
        try:
            reply = b"\0" + self._dispatch(req[:1], req[1:])
        except (RegistersError, DirtyTrackingError, ValueError, struct.error) as e:
            reply = b"\1" + str(e).encode()
        self.publish()
        try:
            conn.send(reply)
        except OSError:
            self.sel.unregister(conn)
            conn.close()

    def _dispatch(self, op: bytes, arg: bytes) -> bytes:
        if op == b"P":
            self.pause_count += 1
            return struct.pack("<I", self.pause_count)
        if op == b"K":  # an epoch's stop in one round trip: pause + context
            self.pause_count += 1
            return struct.pack("<I", self.pause_count) + self.regs.pack() + self.regs.device_model()
        if op == b"W":  # an epoch's restart in one round trip: [barrier] + unpause
            if self.pause_count == 0:
                raise ValueError("domain is not paused")
            if arg[:1] == b"\1":
                self.outputs.barrier()
            return self._dispatch(b"U", b"")
        if op == b"U":
            if self.pause_count == 0:
                raise ValueError("domain is not paused")
            self.pause_count -= 1
            if self.pause_count == 0 and self.verify_pending:
                self.verify_pending = False
                self.crash_reason = self.workload.check_memory(self.mem64)
                if self.crash_reason:
                    log(f"guest cannot run: {self.crash_reason}")
            return struct.pack("<I", self.pause_count)
        if op == b"E":
            if self.logdirty:
                raise ValueError(
                    "log-dirty mode is already on (another process tracks this "
                    "domain's memory); refusing to enable it again"
                )
            if self.uffd is not None:
                self.uffd.protect_all()
                for m in self.marks:  # nothing writes between the two
                    m.reset()
                if self.marks:
                    self.markset = 0
                    self.mark = self.marks[0].mark
            else:
                assert self.bitmap is not None  # made at start when uffd is not
                self.bitmap.live.fill(0)
            self.logdirty = True
            return b""
        if op == b"D":
            self.logdirty = False
            if self.marks:
                self.mark = None  # marks only while log-dirty is on
            return b""
        if op == b"M":  # swap the write marks: the set left is quiescent from now on
            if not self.marks:
                raise ValueError("this domain keeps no write marks: walk the pagemap")
            if not self.logdirty:
                raise ValueError("log-dirty mode is not enabled")
            left = self.markset
            self.markset = (left + 1) % MARK_SETS
            self.mark = self.marks[self.markset].mark
            return struct.pack("<B", left)
        if op == b"R":
            if self.bitmap is None:
                raise ValueError("dirty mode is uffd-wp: scan the pagemap instead")
            if not self.logdirty:
                raise ValueError("log-dirty mode is not enabled")
            return struct.pack("<Q", self.bitmap.snapshot_and_clear())
        if op == b"G":
            return self.regs.pack() + self.regs.device_model()
        if op == b"S":
            return self._set_context(arg)
        if op == b"B":
            self.outputs.barrier()
            return b""
        if op == b"O":
            return struct.pack("<Q", self.outputs.release())
        if op == b"X":
            return struct.pack("<Q", self.outputs.unplug())
        if op == b"T":
            (self.stop_at,) = struct.unpack("<Q", arg)
            return b""
        if op == b"A":
            (rate,) = struct.unpack("<d", arg)
            self.regs.set_rate(rate)  # inf: max rate
            self.was_runnable = False  # restart the rate clock
            return b""
        if op == b"L":
            self.outputs.log_timing(arg.decode() or None)
            return b""
        raise ValueError(f"unknown request {op!r}")

    def _set_context(self, arg: bytes) -> bytes:
        if self.pause_count == 0:
            raise ValueError("set_context needs a paused domain")
        regs = Registers.unpack(arg[:64])
        regs.check_device_model(arg[64:])
        if regs.kind != self.regs.kind:
            raise RegistersError(
                f"context is for workload {regs.kind_name}, this domain runs {self.regs.kind_name}"
            )
        if regs.disk_every != self.regs.disk_every:
            raise RegistersError(
                f"context writes a disk block every {regs.disk_every} steps, this domain "
                f"every {self.regs.disk_every} (0: never)"
            )
        self.workload.reset(regs)  # validates parameters against the memory size
        self.regs = regs
        self.crash_reason = None
        self.verify_pending = True
        self.was_runnable = False
        return b""


def run_worker(sim_dir: str, domid: int, ready_fd: int, host_pid: int) -> None:
    """Entry point in the forked child; never returns normally."""
    die_with_parent(host_pid)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        w = Worker(sim_dir, domid, ready_fd)
    except Exception as e:  # report why the domain could not start, to the host
        os.write(ready_fd, f"err {e}\n".encode())
        raise
    w.serve()
