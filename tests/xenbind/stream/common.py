"""Helpers shared by the stream tests (no tests of its own).

A reference receiver (`replay_events`) stages Pages and commits on
CheckpointEnd, as the real receiver must; `normal` turns events into plain
comparable tuples.
"""

from __future__ import annotations

import numpy as np

from xenbind.stream import (
    CheckpointEnd,
    Decoder,
    Image,
    PageBatch,
    Pages,
    Tail,
)

PAGE = 4096


def decoder(**kw) -> tuple[Decoder, Image]:
    """A Decoder whose base source is an Image the caller feeds every event
    to (``take``), as a receiver applies each call's events before the next."""
    img = Image()
    kw.setdefault("base", img.base)
    return Decoder(**kw), img


def take(img: Image, events: list) -> list:
    for e in events:
        img.handle(e)
    return events


def decode(data: bytes, splits: list[int] | None = None, **kw) -> tuple[list, Decoder]:
    """Feed ``data`` (in pieces cut at ``splits``), then eof(); all events.
    Delta pages decode against the memory the events rebuild (an Image)."""
    d, img = decoder(**kw)
    out: list = []
    cuts = [0, *(splits or []), len(data)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        out += take(img, d.feed(data[a:b]))
    d.eof()
    return out, d


def decode_bytewise(data: bytes, **kw) -> list:
    d, img = decoder(**kw)
    out: list = []
    for i in range(len(data)):
        out += take(img, d.feed(data[i : i + 1]))
    d.eof()
    return out


def normal(events: list) -> list:
    """Events as plain tuples (arrays -> lists, page data -> bytes)."""
    res: list[object] = []
    for e in events:
        if isinstance(e, PageBatch):
            res.append(("PageBatch", e.pfns.tolist(), e.types.tolist()))
        elif isinstance(e, Pages):
            res.append(("Pages", e.pfns.tolist(), e.data.tobytes(), e.compressed_bytes))
        elif isinstance(e, Tail):
            c = e.context
            res.append(("Tail", tuple(c.magic_pfns), bytes(c.hvm_context), bytes(c.device_model)))
        else:
            res.append(e)
    return res


def merge_pages(events: list) -> list:
    """``normal`` but with consecutive Pages of one checkpoint merged, so event
    lists from different chunkings of the same content compare equal."""
    res: list = []
    for e in normal(events):
        if isinstance(e, tuple) and e[0] == "Pages":
            if res and isinstance(res[-1], list):
                res[-1][0] += e[1]
                res[-1][1] += e[2]
                continue
            res.append([list(e[1]), e[2]])
        else:
            res.append(e)
    return [tuple(x) if isinstance(x, list) else x for x in res]


def replay_events(events: list, p2m_size: int) -> tuple[np.ndarray, int, list]:
    """Apply checkpoints at CheckpointEnd only. Returns (memory, checkpoints
    applied, contexts committed)."""
    mem = np.zeros((p2m_size, PAGE), dtype=np.uint8)
    staged: list[Pages] = []
    applied = 0
    ctxs = []
    tail = None
    for e in events:
        if isinstance(e, Pages):
            staged.append(e)
        elif isinstance(e, Tail):
            tail = e.context
        elif isinstance(e, CheckpointEnd):
            for p in staged:
                mem[p.pfns.astype(np.intp)] = p.data
            staged = []
            applied += 1
            ctxs.append(tail)
    return mem, applied, ctxs


def random_pages(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, PAGE), dtype=np.uint8)
