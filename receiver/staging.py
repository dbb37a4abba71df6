"""The staging area of one checkpoint: pages held until the checkpoint's tail.

Rules kept here:
- Bounded: ``add`` refuses (``StagingFull``) a batch that would take the
  staged total past ``max_bytes`` *before* keeping it; nothing is allocated
  here (the decoder's ``Pages`` events own their arrays, and the staging area
  keeps references to them, never copies).
- A PFN below ``p2m_size`` only (the decoder checks it; checked again here,
  because a wrong write into a guest is the one thing that must never happen).
- ``commit`` writes every staged batch into the domain in stream order (a
  Format B body never repeats a PFN; a Format A body may, and the later copy
  wins, as it does with in-order writes), then sets the context. The caller
  holds the lock that keeps a failover from running in the middle.
- ``commit`` with a ``physmap`` (receiver.physmap) populates the backup's
  missing PFNs of each batch before writing it.
- ``discard`` drops a torn checkpoint: nothing of it reached the domain.
- ``batches`` lets the decoder's base source see the staged pages (the
  page staged for a PFN is its base while the checkpoint is not committed).
"""

from __future__ import annotations

import numpy as np

from xenbind import PAGE_SIZE
from xenbind.errors import RemusError
from xenbind.hypervisor import Domain
from xenbind.types import Context


class StagingFull(RemusError):
    """A checkpoint larger than the configured staging cap."""


class Staging:
    def __init__(self, p2m_size: int, max_bytes: int) -> None:
        self.p2m_size = p2m_size
        self.max_bytes = max_bytes
        self._batches: list[tuple[np.ndarray, np.ndarray]] = []
        self.pages = 0

    @property
    def bytes(self) -> int:
        return self.pages * PAGE_SIZE

    @property
    def batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The staged (pfns, data) batches, in stream order (read them, do
        not change them): a base source lays them over the backup's pages
        (xenbind.stream.overlay)."""
        return self._batches

    def add(self, pfns: np.ndarray, data: np.ndarray) -> None:
        k = len(pfns)
        if data.shape != (k, PAGE_SIZE) or data.dtype != np.uint8:
            raise RemusError(f"staging: page data of shape {data.shape} for {k} PFNs")
        if (self.pages + k) * PAGE_SIZE > self.max_bytes:
            raise StagingFull(
                f"checkpoint larger than the staging cap of {self.max_bytes >> 20} MiB "
                f"({self.pages + k} pages); raise max-staged-mb"
            )
        if k and int(pfns.max()) >= self.p2m_size:
            raise RemusError(
                f"staging: PFN {int(pfns.max())} past the last page {self.p2m_size - 1}"
            )
        self._batches.append((pfns, data))
        self.pages += k

    def commit(self, domain: Domain, context: Context, physmap=None) -> int:
        """Write the staged pages and the context into ``domain``; the page count."""
        for pfns, data in self._batches:
            if physmap is not None:
                physmap.ensure(pfns)
            domain.scatter(pfns, data)
        domain.set_context(context)
        n = self.pages
        self.discard()
        return n

    def discard(self) -> None:
        self._batches = []
        self.pages = 0
