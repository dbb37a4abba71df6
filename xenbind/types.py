"""The value types the domain interface, the stream and the session share.

    DomainInfo    what a lookup tells about a domain
    DomainConfig  what the backup needs to create its domain (travels in HELLO)
    Context       the state that travels in a checkpoint's tail
    PageArray     page contents: uint8 arrays of shape (n, PAGE_SIZE)
    PfnArray      PFN lists: 1-D uint64 arrays

Rule: this module imports nothing of the project, so that anything (the
sans-IO stream, the session protocol, both hypervisors) can import it
without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

#: Page contents are passed as uint8 arrays of shape (n, PAGE_SIZE).
PageArray: TypeAlias = npt.NDArray[np.uint8]
#: PFN lists are 1-D uint64 arrays.
PfnArray: TypeAlias = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class DomainInfo:
    """What a lookup tells about a domain."""

    domid: int
    name: str
    uuid: str
    pages: int  # p2m_size: number of guest pages, PFNs are 0 .. pages-1
    vcpus: int
    state: str  # "running", "paused", "shutdown", "dying"
    hvm: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # hypervisor-specific (sim: workload, seed)


@dataclass(frozen=True)
class DomainConfig:
    """What the backup needs to create its domain (travels in the handshake)."""

    name: str
    uuid: str
    pages: int
    vcpus: int
    hvm: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """The state that travels in a checkpoint's tail.

    ``magic_pfns``: the three HVM "magic" PFNs (ioreq, buffered ioreq,
    xenstore) in that order. ``hvm_context``: the HVM context blob (for the
    simulator: the workload's registers). ``device_model``: the device model
    record's payload.
    """

    magic_pfns: tuple[int, int, int]
    hvm_context: bytes
    device_model: bytes
