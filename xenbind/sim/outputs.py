"""A guest's output buffer: the Linux ``plug`` qdisc Remus drove, in miniature.

Output (the ledger's acknowledgements) is a sequence of byte records. While
the buffer is *unplugged* (an unprotected domain) a record is released at
once: appended to the domain's ``.out`` file, which stands for the outside
world. ``barrier()`` plugs the buffer and marks the end of the output that
belongs to the checkpoint being taken (TCQ_PLUG_BUFFER); ``release()``
releases everything up to the oldest barrier and drops that barrier
(TCQ_PLUG_RELEASE_ONE); ``unplug()`` releases everything and stops buffering
(TCQ_PLUG_RELEASE_INDEFINITE). ``release()`` with no barrier releases nothing.

Buffered records live only in the worker process: they die with the host, as
a dom0's network buffers would.

A released record the ``.out`` file cannot take (ENOSPC: the outside world's
link is full) stays in a backlog, in order, and goes out before anything
else at the next write: the guest keeps running, as a guest whose packets
queue up would; its output is late, never lost or reordered.

Timestamps (CLOCK_MONOTONIC ns, the clock every process of the machine
shares): ``emit`` takes the times just before and just after the guest
produced the records (one *burst*, a workload batch: record k of n committed
at about ``first + (k + 1) * (last - first) / n``); ``barrier`` and the
release stamp themselves. The buffer keeps one small tuple per burst and one
int per barrier, never one per record. With ``log_timing(path)`` every
released burst is appended to that file as one ``TIMING_DTYPE`` row::

    n            records in the burst
    first_ns     just before the first record was produced
    last_ns      just after the last one was
    barrier_ns   the barrier that closed the burst's checkpoint (0: the
                 buffer was unplugged, the burst went out as it came)
    released_ns  when it was released (written, or queued in the backlog)

Rows are written in batches (at each release, or every ``TIMING_FLUSH``
unplugged bursts), so the log costs one write a checkpoint. Without a log
nothing is written and the stamps only travel with the bursts.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections import deque

import numpy as np

#: one released burst in the timing log (little-endian int64s)
TIMING_DTYPE = np.dtype(
    [
        ("n", "<i8"),
        ("first_ns", "<i8"),
        ("last_ns", "<i8"),
        ("barrier_ns", "<i8"),
        ("released_ns", "<i8"),
    ]
)
_ROW = struct.Struct("<5q")
#: unplugged bursts gathered before a write of the timing log
TIMING_FLUSH = 512


class OutputBuffer:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.plugged = False
        self.pending: deque[bytes] = deque()
        #: record counts between consecutive barriers, oldest first; the
        #: records after the last barrier are pending - sum(barriers)
        self.barriers: deque[int] = deque()
        self.released = 0
        self.backlog = b""  # released bytes the file could not take yet (ENOSPC)
        #: (records, first_ns, last_ns) per buffered burst, parallel to pending
        self.bursts: deque[tuple[int, int, int]] = deque()
        #: when each barrier in ``barriers`` was taken
        self.barrier_ns: deque[int] = deque()
        self.timing_fd = -1
        self.timing_rows: list[bytes] = []

    @property
    def buffered(self) -> int:
        return len(self.pending)

    def emit(self, records: list[bytes], first_ns: int = 0, last_ns: int = 0) -> None:
        """Records the guest produced between ``first_ns`` and ``last_ns``
        (CLOCK_MONOTONIC; 0: now)."""
        if not records:
            return
        if not last_ns:
            last_ns = time.monotonic_ns()
        first_ns = first_ns or last_ns
        if self.plugged:
            self.pending.extend(records)
            self.bursts.append((len(records), first_ns, last_ns))
        else:
            self._write(records)
            if self.timing_fd >= 0:
                self._row(len(records), first_ns, last_ns, 0, time.monotonic_ns())

    def barrier(self) -> None:
        self.barriers.append(len(self.pending) - sum(self.barriers))
        self.barrier_ns.append(time.monotonic_ns())
        self.plugged = True

    def release(self) -> int:
        if not self.barriers:
            return 0
        n = self.barriers.popleft()
        at = self.barrier_ns.popleft()
        self._write([self.pending.popleft() for _ in range(n)])
        self._released_bursts(n, at)
        self._flush_timing()
        return n

    def unplug(self) -> int:
        n = len(self.pending)
        self._write(list(self.pending))
        self.pending.clear()
        while self.barriers:  # under a barrier: stamped with it; after the last: 0
            self._released_bursts(self.barriers.popleft(), self.barrier_ns.popleft())
        self._released_bursts(sum(b[0] for b in self.bursts), 0)
        self.plugged = False
        self._flush_timing()
        return n

    # --- timing ----------------------------------------------------------------------

    def log_timing(self, path: str | None) -> None:
        """Append every released burst's timing to ``path`` from now on
        (None: stop)."""
        self._flush_timing()
        if self.timing_fd >= 0:
            os.close(self.timing_fd)
            self.timing_fd = -1
        if path:
            self.timing_fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
            )

    def _released_bursts(self, n: int, barrier_ns: int) -> None:
        """The oldest bursts, ``n`` records, were released just now."""
        now = time.monotonic_ns() if self.timing_fd >= 0 else 0
        while n > 0 and self.bursts:
            k, first, last = self.bursts.popleft()
            if k > n:  # a burst split by a barrier (the worker never does this)
                self.bursts.appendleft((k - n, first, last))
                k = n
            if now:
                self._row(k, first, last, barrier_ns, now)
            n -= k

    def _row(self, n: int, first: int, last: int, barrier: int, released: int) -> None:
        self.timing_rows.append(_ROW.pack(n, first, last, barrier, released))
        if len(self.timing_rows) >= TIMING_FLUSH:
            self._flush_timing()

    def _flush_timing(self) -> None:
        if self.timing_fd >= 0 and self.timing_rows:
            data = b"".join(self.timing_rows)
            self.timing_rows.clear()
            try:
                os.write(self.timing_fd, data)  # O_APPEND: one write, whole rows
            except OSError:  # a timing log is best effort: the output itself went out
                pass

    def _write(self, records: list[bytes]) -> None:
        if not records and not self.backlog:
            return
        view = memoryview(self.backlog + b"".join(records))
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # full: the rest waits in the backlog
        self.backlog = bytes(view)
        self.released += len(records)

    def close(self) -> None:
        self.log_timing(None)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
