"""The initial live copy: checkpoint 0 of a session, in Format A.

    enable log-dirty (and clear what it already holds)
    holes     the PFNs below p2m_size with no memory behind them
              (p2m_size - populated_pfns()), as XTAB entries: no data, so the
              receiver knows they are absent (as libxc's save did)
    round 1   (guest running)  every populated page, in slices of SLICE_PAGES
    round k   (guest running)  the pages dirtied during round k-1, while
                               rounds < precopy_rounds and the last round
                               had >= precopy_threshold pages
    final     (guest paused)   the pages dirtied during the last round, the
                               context, the output barrier -> unpause
    closing chunks + tail      (CODEC, ENABLE_COMPRESSION unless codec none)

Pre-copy rounds send pages while the guest writes them: the receiver keeps
the last copy of a page it gets (Format A bodies may repeat a PFN across
batches), and the final paused round resends every page written since it was
last sent, so checkpoint 0 is exactly the guest's memory at the final pause.

Rules:
- While the guest runs, each slice is gathered into the session's checkpoint
  buffer and sent before the next slice is gathered (buffers of Format A are
  views of it).
- Only ``domain.populated_pfns()`` are ever gathered (a hole cannot be
  mapped on Xen); the holes go once, before round 1, XTAB_SLICE at a time.
- Between slices the link is polled (the receiver's heartbeats, an ERROR).
  Heartbeats of ours come from the session's pacer (remusd.pacer), not
  from here: slices flowing are a sign of life, and the pacer fills a gap.
- A domain with disks (remusd.diskmirror): after the header, the mirror goes
  on and the initial sync runs (the disks' epoch 0); the guest's writes are
  forwarded before every slice; the final pause seals epoch 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from xenbind import PAGE_SIZE
from xenbind.hypervisor import Domain
from xenbind.stream.encoder import StreamWriter
from xenbind.stream.format import TYPE_XTAB

from .diskmirror import SessionDisks
from .epoch import Capture, CheckpointBuffer, capture, strictly_sorted
from .link import Link

log = logging.getLogger(__name__)

#: Pages gathered and sent at a time while the guest runs (16 MiB).
SLICE_PAGES = 4096
#: XTAB entries sent at a time (8 bytes each on the wire: 512 KiB).
XTAB_SLICE = 65536
_NO_PAGES = np.empty((0, PAGE_SIZE), dtype=np.uint8)


@dataclass
class CopyResult:
    rounds: int
    pages_sent: int
    bytes_sent: int
    final: Capture  # the final paused round: the caller encodes and sends it


def _send_pages(
    link: Link,
    writer: StreamWriter,
    domain: Domain,
    cb: CheckpointBuffer,
    pfns: np.ndarray,
    stop: Callable[[], bool],
    disks: SessionDisks | None,
) -> int:
    sent = 0
    for s in range(0, len(pfns), SLICE_PAGES):
        if stop():
            break
        if disks is not None:  # the guest's writes meanwhile, as DISK chunks
            sent += disks.forward(link)
        part = pfns[s : s + SLICE_PAGES]
        view = cb.view(len(part))
        domain.gather(part, view)
        sent += link.send(writer.pages(part, view))
        link.poll()
    return sent


def holes_of(pages: int, populated: np.ndarray) -> np.ndarray:
    """The PFNs below ``pages`` not in ``populated``, sorted uint64."""
    mask = np.ones(pages, dtype=bool)
    populated = np.asarray(populated, dtype=np.uint64)
    mask[populated[populated < pages].astype(np.intp)] = False
    return np.flatnonzero(mask).astype(np.uint64)


def _send_holes(link: Link, writer: StreamWriter, holes: np.ndarray) -> int:
    sent = 0
    for s in range(0, len(holes), XTAB_SLICE):
        part = holes[s : s + XTAB_SLICE]
        types = np.full(len(part), TYPE_XTAB, dtype=np.uint8)
        sent += link.send(writer.pages(part, _NO_PAGES, types))
        link.poll()
    return sent


def initial_copy(
    domain: Domain,
    link: Link,
    writer: StreamWriter,
    cb: CheckpointBuffer,
    *,
    rounds: int,
    threshold: int,
    stop: Callable[[], bool],
    disks: SessionDisks | None = None,
    sync_deadline: float = 0.0,
) -> CopyResult:
    """Send checkpoint 0 up to its final paused round (see the module docstring).

    Returns the final capture: the caller encodes and sends it (with
    LAST_CHECKPOINT if the session is already asked to end) and waits for the
    ack of checkpoint 0. Heartbeats meanwhile come from the session's pacer
    (remusd.pacer), not from here.
    """
    pages = domain.info().pages
    domain.enable_logdirty()
    domain.read_and_clear_dirty()  # start from a clean bitmap
    total = link.send([writer.header()])
    if disks is not None:  # the disks' epoch 0: the initial sync, then the guest's writes
        disks.start(getattr(getattr(link, "accept", None), "limits", None))
        total += disks.sync(link, sync_deadline)
    pfns = strictly_sorted(np.asarray(domain.populated_pfns(), dtype=np.uint64))
    holes = holes_of(pages, pfns)
    if len(holes):
        log.info(
            "domain %s: %d of %d PFNs populated; %d holes sent as XTAB",
            domain.domid,
            len(pfns),
            pages,
            len(holes),
        )
        total += _send_holes(link, writer, holes)
    n_pages = 0
    done = 0
    while True:
        done += 1
        total += _send_pages(link, writer, domain, cb, pfns, stop, disks)
        n_pages += len(pfns)
        pfns = strictly_sorted(domain.read_and_clear_dirty())
        log.debug(
            "domain %s: pre-copy round %d sent; %d pages dirtied meanwhile",
            domain.domid,
            done,
            len(pfns),
        )
        if stop() or done >= rounds or len(pfns) < threshold:
            break
    # the final round, paused: pick up what the last live round left
    final = capture(domain, cb, extra=pfns, seal=None if disks is None else disks.seal)
    n_pages += len(final.pfns)
    return CopyResult(done, n_pages, total, final)
