"""One checkpoint on the primary: the paused copy, then the encoding.

The epoch of design.md, split at the line the guest's pause draws::

    capture()   (guest running) read and clear the log-dirty bitmap once
                                (the pre-scan: most of the epoch's pages)
                (guest paused)  pause (Domain.checkpoint_stop: on Xen a PV/PVH
                                guest suspends itself instead); [disks: SEAL the
                                disk epoch, remusd.diskmirror]; read and clear the log-dirty bitmap
                                again (the pages written since the pre-scan)
                                and merge the two sorted lists;
                                ONE vectorised gather of the dirty pages into
                                the preallocated checkpoint buffer; [verify:
                                digest of all memory]; context; output
                                barrier; unpause
    encode()    (guest running) Format B (or A) page chunks through the
                                StreamWriter's compressor, closing chunks, tail

The caller then sends the buffers, waits for the ack and calls
``output_release()`` (remusd.protector).

Rules:
- Nothing but the copy (and, in verify mode, the digest) happens while the
  guest is paused; the pause is undone even when a step inside fails.
- The pre-scan loses nothing: a page written after it is marked again and
  read by the paused read-and-clear, and every page of either list is
  copied while paused, so the copy is the memory at the pause. It takes the
  per-page part of reading and clearing the log (on Xen re-protecting each
  dirty page) out of the pause; the paused read-and-clear then finds only
  the pages written since. Its price is dom0 CPU: a second read of the log
  each epoch, and on a guest that writes without pause (a CPU-bound writer)
  the re-protection of its pages while it runs (remusd --no-prescan turns it
  off; docs/performance.md has both). The simulator reads its log from the
  vCPU's write marks (xenbind.sim.dirty): both reads cost what was marked,
  not the guest's size, and the pre-scan adds one round trip to the guest.
- The checkpoint buffer is bounded by what an epoch copies, not by the
  domain's p2m_size (an HVM/PVH guest's p2m_size reaches its special pages
  near 4 GiB: a 128 MiB PVH guest has ~1M PFNs). It starts at
  ``min(pages, INITIAL_BUFFER_PAGES)`` rows and, when an epoch has more dirty
  pages than rows, grows once to ``max(needed, 2 x rows)`` (capped at
  ``pages``) before the gather; the copy stays one vectorised gather.
- ``Capture.pages`` is a view of that buffer: encode and send a capture before
  the next ``capture()`` (a growth leaves earlier views valid: they keep the
  old array alive).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from xenbind import PAGE_SIZE
from xenbind.hypervisor import Domain
from xenbind.mirrorclient import SealPoint
from xenbind.stream.encoder import StreamWriter, memory_digest
from xenbind.types import Context

log = logging.getLogger(__name__)


@dataclass
class Capture:
    """What one paused window took from the guest."""

    pfns: np.ndarray  # uint64, sorted
    pages: np.ndarray  # (len(pfns), 4096) uint8, a view of the checkpoint buffer
    context: Context
    digest: bytes | None  # xxh3-128 of all memory (verify mode)
    pause_ms: float  # paused -> unpaused, wall clock
    seal: SealPoint | None = None  # the disk epoch's SEAL placed in this pause (disks)


#: Rows the checkpoint buffer starts with (32 MiB): an ordinary epoch and a
#: slice of the initial copy (remusd.initial_copy.SLICE_PAGES) fit without growth.
INITIAL_BUFFER_PAGES = 8192


class CheckpointBuffer:
    """The page buffer of one session, grown on demand (and, for verify, a full image).

    ``pages``: the domain's p2m_size (the most rows it can ever need);
    ``initial``: rows to start with (default ``INITIAL_BUFFER_PAGES``).
    Verify mode keeps an image of every PFN (p2m_size rows): it is a test
    mode, for domains without holes.
    """

    def __init__(self, pages: int, verify: bool, initial: int | None = None) -> None:
        self.pages = pages
        start = INITIAL_BUFFER_PAGES if initial is None else initial
        self.buf = np.empty((max(1, min(pages, start)), PAGE_SIZE), dtype=np.uint8)
        self.grown = 0  # times the buffer grew (the debug log says when; tests read it)
        self.image = np.empty((pages, PAGE_SIZE), dtype=np.uint8) if verify else None
        self.all_pfns = np.arange(pages, dtype=np.uint64) if verify else None

    @property
    def rows(self) -> int:
        return self.buf.shape[0]

    def view(self, n: int) -> np.ndarray:
        """The first ``n`` rows, growing the buffer first when it has fewer."""
        if n > self.buf.shape[0]:
            if n > self.pages:
                raise ValueError(f"{n} pages asked of a buffer for a {self.pages}-page domain")
            rows = min(self.pages, max(n, 2 * self.buf.shape[0]))
            log.debug("checkpoint buffer grows from %d to %d pages", self.buf.shape[0], rows)
            # np.empty: the kernel backs only the rows ever written
            self.buf = np.empty((rows, PAGE_SIZE), dtype=np.uint8)
            self.grown += 1
        return self.buf[:n]


def strictly_sorted(pfns: np.ndarray) -> np.ndarray:
    """``pfns`` as the interface promises them: sorted, each PFN once.

    A hypervisor layer that breaks the promise (a PFN twice in one scan) would
    make the stream invalid (a PFN repeated in a batch); one O(n) check, and
    a sort only when needed.
    """
    if len(pfns) > 1 and not bool(np.all(pfns[1:] > pfns[:-1])):
        global _warned
        if not _warned:
            _warned = True
            log.warning(
                "the hypervisor's dirty log returned unsorted or repeated PFNs; "
                "deduplicating (reported once)"
            )
        return np.unique(pfns)
    return pfns


_warned = False
_NONE = np.empty(0, dtype=np.uint64)


def merge_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The union of two sorted uint64 PFN arrays, sorted, each PFN once.

    A stable sort of the concatenation is a merge of its two runs (timsort),
    O(n): ~4 us for 1,000 PFNs where np.union1d takes ~60 us."""
    if not len(a):
        return b
    if not len(b):
        return a
    c = np.concatenate((a.astype(np.uint64, copy=False), b.astype(np.uint64, copy=False)))
    c.sort(kind="stable")
    keep = np.empty(len(c), dtype=bool)
    keep[0] = True
    np.not_equal(c[1:], c[:-1], out=keep[1:])
    return c[keep]


def capture(
    domain: Domain,
    cb: CheckpointBuffer,
    extra: np.ndarray | None = None,
    prescan: bool = True,
    hold: bool = False,
    seal: Callable[[], SealPoint] | None = None,
) -> Capture:
    """The paused part of an epoch (see the module docstring).

    ``hold``: the guest stays stopped after the capture (a switchover's last
    checkpoint): no checkpoint_go, unless the capture failed.

    ``extra``: PFNs to copy besides the dirty ones (the initial copy's final
    round passes the pages its last live round left behind).
    ``prescan``: read and clear the dirty log once before the pause (module
    docstring); off, the paused read finds the whole epoch's pages.
    ``seal``: a domain with disks: SEAL its disk epoch while paused.
    """
    early = strictly_sorted(domain.read_and_clear_dirty()) if prescan else _NONE
    if extra is not None and len(extra):
        early = merge_sorted(np.unique(extra.astype(np.uint64)), early)
    t0 = time.perf_counter()
    domain.checkpoint_stop()
    ok = False
    point = None
    try:
        if seal is not None:
            point = seal()
        pfns = merge_sorted(early, strictly_sorted(domain.read_and_clear_dirty()))
        view = cb.view(len(pfns))
        if len(pfns):
            domain.gather(pfns, view)
        digest = None
        if cb.image is not None and cb.all_pfns is not None:
            domain.gather(cb.all_pfns, cb.image)
            digest = memory_digest(cb.image)
        ctx = domain.get_context()
        domain.output_barrier()
        ok = True
    finally:
        if not (hold and ok):
            domain.checkpoint_go()
    pause_ms = (time.perf_counter() - t0) * 1e3
    return Capture(pfns, view, ctx, digest, pause_ms, point)


def encode(
    writer: StreamWriter, cap: Capture, *, last: bool = False, switchover: bool = False
) -> list[Any]:
    """The buffers of one checkpoint (page chunks, closing chunks, end, tail)."""
    return writer.checkpoint(
        cap.pfns, cap.pages, cap.context, digest=cap.digest, last=last, switchover=switchover
    )
