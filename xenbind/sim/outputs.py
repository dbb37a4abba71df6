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
"""

from __future__ import annotations

import errno
import os
from collections import deque


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

    @property
    def buffered(self) -> int:
        return len(self.pending)

    def emit(self, records: list[bytes]) -> None:
        if not records:
            return
        if self.plugged:
            self.pending.extend(records)
        else:
            self._write(records)

    def barrier(self) -> None:
        self.barriers.append(len(self.pending) - sum(self.barriers))
        self.plugged = True

    def release(self) -> int:
        if not self.barriers:
            return 0
        n = self.barriers.popleft()
        self._write([self.pending.popleft() for _ in range(n)])
        return n

    def unplug(self) -> int:
        n = len(self.pending)
        self._write(list(self.pending))
        self.pending.clear()
        self.barriers.clear()
        self.plugged = False
        return n

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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
