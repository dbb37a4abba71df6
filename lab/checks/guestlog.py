"""What the lab guest (lab/guest/labguest.c) reported on its console, and the
page contents it promised.

Console lines read here (the latest of each kind wins):
    LABGUEST PATTERN <pfn> ...   PFNs of pattern pages 0, 1, ...
    LABGUEST COUNTER <pfn>       the counter page
    LABGUEST DIRTY <pfn> ...     pages rewritten every time the counter moves
    LABGUEST TICK <n>            counter progress

Page layouts (must match labguest.c):
    pattern page i: b"LABPATRN", uint64 i, then byte k = (i*131 + k*7 + 0x5a) & 0xff
    counter page:   b"LABCOUNT", uint64 counter
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

PAGE_SIZE = 4096
PATTERN_MAGIC = b"LABPATRN"
COUNTER_MAGIC = b"LABCOUNT"
DIRTY_MAGIC = b"LABDIRTY"


@dataclass(frozen=True)
class GuestLayout:
    pattern_pfns: list[int]
    counter_pfn: int
    dirty_pfns: list[int]
    last_tick: int


def parse_console(text: str) -> GuestLayout:
    """The latest PFN report in a guest console log; ValueError if none."""
    pattern: list[int] | None = None
    counter: int | None = None
    dirty: list[int] | None = None
    tick = 0
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "LABGUEST":
            continue
        try:
            nums = [int(w) for w in words[2:]]
        except ValueError:
            continue
        if words[1] == "PATTERN" and nums:
            pattern = nums
        elif words[1] == "COUNTER" and len(nums) == 1:
            counter = nums[0]
        elif words[1] == "DIRTY" and nums:
            dirty = nums
        elif words[1] == "TICK" and len(nums) == 1:
            tick = nums[0]
    if pattern is None or counter is None or dirty is None:
        raise ValueError("the guest console has no complete LABGUEST PFN report")
    return GuestLayout(pattern, counter, dirty, tick)


def read_layout(path: str | None = None) -> GuestLayout:
    path = path or os.environ.get("LAB_CONSOLE_LOG", "/var/log/xen/console/guest-labguest.log")
    with open(path, errors="replace") as f:
        return parse_console(f.read())


def expected_pattern_page(i: int) -> np.ndarray:
    """The 4096 bytes labguest wrote into pattern page ``i``."""
    k = np.arange(PAGE_SIZE, dtype=np.uint64)
    page = ((i * 131 + k * 7 + 0x5A) & 0xFF).astype(np.uint8)
    page[:16] = np.frombuffer(PATTERN_MAGIC + struct.pack("<Q", i), dtype=np.uint8)
    return page


def counter_value(page: np.ndarray) -> int:
    """The counter in a counter page; ValueError if the magic is not there."""
    raw = page.tobytes()
    if raw[:8] != COUNTER_MAGIC:
        raise ValueError(f"counter page magic is {raw[:8]!r}, not {COUNTER_MAGIC!r}")
    return struct.unpack_from("<Q", raw, 8)[0]
