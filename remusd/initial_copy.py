"""The initial live copy: checkpoint 0 of a session, in Format A.

    enable log-dirty (and clear what it already holds)
    round 1   (guest running)  every page, in slices of SLICE_PAGES
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
- Between slices the link is polled and a heartbeat goes out at least every
  ``heartbeat_s`` so a long copy does not look like a dead primary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from xenbind.hypervisor import Domain
from xenbind.stream.encoder import StreamWriter

from .epoch import Capture, CheckpointBuffer, capture, strictly_sorted
from .link import Link

log = logging.getLogger(__name__)

#: Pages gathered and sent at a time while the guest runs (16 MiB).
SLICE_PAGES = 4096


@dataclass
class CopyResult:
    rounds: int
    pages_sent: int
    bytes_sent: int
    final: Capture  # the final paused round: the caller encodes and sends it


def _send_pages(link: Link, writer: StreamWriter, domain: Domain, cb: CheckpointBuffer,
                pfns: np.ndarray, beat: Callable[[], None], stop: Callable[[], bool]) -> int:
    sent = 0
    for s in range(0, len(pfns), SLICE_PAGES):
        if stop():
            break
        part = pfns[s:s + SLICE_PAGES]
        view = cb.buf[: len(part)]
        domain.gather(part, view)
        sent += link.send(writer.pages(part, view))
        link.poll()
        beat()
    return sent


def initial_copy(domain: Domain, link: Link, writer: StreamWriter, cb: CheckpointBuffer, *,
                 rounds: int, threshold: int, heartbeat_s: float,
                 stop: Callable[[], bool]) -> CopyResult:
    """Send checkpoint 0 up to its final paused round (see the module docstring).

    Returns the final capture: the caller encodes and sends it (with
    LAST_CHECKPOINT if the session is already asked to end) and waits for the
    ack of checkpoint 0.
    """
    pages = domain.info().pages
    domain.enable_logdirty()
    domain.read_and_clear_dirty()  # start from a clean bitmap
    last_beat = [time.monotonic()]

    def beat() -> None:
        now = time.monotonic()
        if link.heartbeats and now - last_beat[0] >= heartbeat_s:
            link.send([writer.heartbeat()])
            last_beat[0] = now

    total = link.send([writer.header()])
    pfns = np.arange(pages, dtype=np.uint64)
    n_pages = 0
    done = 0
    while True:
        done += 1
        total += _send_pages(link, writer, domain, cb, pfns, beat, stop)
        n_pages += len(pfns)
        pfns = strictly_sorted(domain.read_and_clear_dirty())
        log.debug("domain %s: pre-copy round %d sent; %d pages dirtied meanwhile",
                  domain.domid, done, len(pfns))
        if stop() or done >= rounds or len(pfns) < threshold:
            break
    # the final round, paused: pick up what the last live round left
    final = capture(domain, cb, extra=pfns)
    n_pages += len(final.pfns)
    return CopyResult(done, n_pages, total, final)
