"""A receiver for the codec tests (no tests of its own): what it holds, and
the Decompressor that decodes on it.

The receiver holds one page per PFN (a PFN never sent holds zeros, as a fresh
page of a Xen backup does); a delta page decodes in place on that page, and
every page decoded becomes what it holds, as when a checkpoint commits.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from xenbind.compress import Decompressor

PAGE = 4096


class Receiver:
    def __init__(self, codec: str, *_: object) -> None:
        self.dec = Decompressor(codec)
        self.held: dict[int, np.ndarray] = {}
        self.based: list[int] = []  # the PFNs of every base asked for, in order

    @property
    def stats(self):  # the Decompressor's
        return self.dec.stats

    def page(self, pfn: int) -> np.ndarray:
        return self.held.get(pfn, np.zeros(PAGE, np.uint8))

    def base(self, pfns: np.ndarray, out: np.ndarray) -> None:
        for i, p in enumerate(pfns.tolist()):
            out[i] = self.page(p)
            self.based.append(p)

    def note_received_raw(self, pfns: npt.ArrayLike, pages: np.ndarray) -> None:
        """Pages received whole in Format A."""
        for p, page in zip(np.asarray(pfns).tolist(), pages, strict=True):
            self.held[p] = page.copy()

    def decompress(self, blob, pfns: npt.ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.uint64)
        got = self.dec.decompress(blob, pfns, self.base, out=out)
        for p, page in zip(pfns[: len(got)].tolist(), got, strict=True):
            self.held[p] = page.copy()
        return got
