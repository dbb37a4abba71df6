"""A guest memory image rebuilt from the decoder's events: a base source.

    img = Image()                       # or Image(memory): a (p2m_size, 4096) uint8 array
    d = Decoder(base=img.base)
    for ev in d.feed(data):
        img.handle(ev)                  # Header: allocate; Pages: stage; CheckpointEnd: apply
    img.memory                          # as of the last checkpoint that arrived whole

Rules kept here (the receiver's, in miniature; docs/stream.md "Bases"):
- A checkpoint's pages are staged and applied only at its ``CheckpointEnd``,
  in stream order (a later copy of a PFN wins); ``discard`` drops a torn one.
  With ``direct_first`` the pages of checkpoint 0 go straight into memory
  instead (what ``replay`` and the receiver do: the initial copy is the whole
  guest, staging it would double the memory; a torn checkpoint 0 leaves no
  usable image anyway).
- ``base(pfns, out)`` answers with the latest page held for each PFN: the
  staged one if any, else the applied one, else zeros (a PFN never sent, or
  before the header was handled: what a fresh page of a Xen backup holds).
- Nothing here reads a file or a clock; ``memory`` may be a memory map.
"""

from __future__ import annotations

import numpy as np

from ..types import PageArray, PfnArray
from . import events as ev
from .decoder import overlay
from .format import PAGE_SIZE


class Image:
    def __init__(self, memory: PageArray | None = None, *, direct_first: bool = False) -> None:
        self.memory = memory
        self.direct_first = direct_first
        self.staged: list[tuple[PfnArray, PageArray]] = []
        self.applied = 0  # checkpoints applied

    def base(self, pfns: PfnArray, out: PageArray) -> None:
        """The decoder's base source (module rules)."""
        mem = self.memory
        if mem is None:
            out[: len(pfns)] = 0
        else:
            from ..compress import gather  # the codec's C kernel, on first use

            gather(mem, pfns, out)
        overlay(self.staged, pfns, out)

    def handle(self, event: ev.Event) -> None:
        """Take one decoder event (the others are ignored)."""
        if isinstance(event, ev.Header):
            if self.memory is None:
                self.memory = np.zeros((event.p2m_size, PAGE_SIZE), np.uint8)
        elif isinstance(event, ev.Pages):
            if self.direct_first and self.applied == 0:
                assert self.memory is not None  # Pages come only after the Header
                self.memory[event.pfns.astype(np.intp)] = event.data
            else:
                self.staged.append((event.pfns, event.data))
        elif isinstance(event, ev.CheckpointEnd):
            self.commit()

    def commit(self) -> None:
        """Apply the staged pages (the checkpoint arrived whole)."""
        if self.staged:
            assert self.memory is not None
            for pfns, data in self.staged:
                self.memory[pfns.astype(np.intp)] = data
        self.staged = []
        self.applied += 1

    def discard(self) -> None:
        """Drop the staged pages of a torn checkpoint."""
        self.staged = []
