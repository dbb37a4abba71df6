"""The value types the domain interface, the stream and the session share.

    DomainInfo    what a lookup tells about a domain
    DomainConfig  what the backup needs to create its domain (travels in HELLO)
    DiskInfo      one disk of a domain, served by its mirroring block server
    Context       the state that travels in a checkpoint's tail
    SaveRecords   the other chunks of Xen's save stream a checkpoint carries
    PageArray     page contents: uint8 arrays of shape (n, PAGE_SIZE)
    PfnArray      PFN lists: 1-D uint64 arrays

Rule: this module imports nothing of the project, so that anything (the
sans-IO stream, the session protocol, both hypervisors) can import it
without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    #: sizes in bytes of the domain's replicated disks, in the disk stream's order
    disks: tuple[int, ...] = ()


@dataclass(frozen=True)
class DiskInfo:
    """One disk of a domain, as its mirroring block server serves it (docs/disk.md).

    ``path``: the image or block device the server writes (the primary's
    copy); ``size`` in bytes; ``control``: the server's control socket
    (xenbind.mirrorclient), ``nbd``: the socket the guest's NBD client uses.
    """

    path: str
    size: int
    control: str
    nbd: str = ""


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


@dataclass(frozen=True)
class SaveRecords:
    """The chunks of Xen's legacy save stream that are neither pages nor the
    tail, as one checkpoint left them (the last value of each; xenbind.stream
    decodes them, docs/stream.md "Tags"):

    ``hvm_params``   HVM_PARAM_* index -> value, from the HVM parameter chunks
                     (-3 IDENT_PT 12, -4 VM86_TSS 15, -8 CONSOLE_PFN 17, -10
                     ACPI_IOPORTS_LOCATION 19, -11 VIRIDIAN 9, -14
                     VM_GENERATION_ID_ADDR 34, -15 PAGING_RING_PFN 27, -16
                     ACCESS/MONITOR_RING_PFN 28, -17 SHARING_RING_PFN 29, -19
                     IOREQ_SERVER_PFN 32, -20 NR_IOREQ_SERVER_PAGES 33)
    ``max_vcpu_id``  from VCPU_INFO (None: none in this checkpoint)
    ``vcpumap``      VCPU_INFO's online map, (max_vcpu_id // 64 + 1) uint64 LE
    ``toolstack``    TOOLSTACK's opaque record (libxl's), or None
    """

    hvm_params: Mapping[int, int] = field(default_factory=dict)
    max_vcpu_id: int | None = None
    vcpumap: bytes = b""
    toolstack: bytes | None = None

    def __bool__(self) -> bool:
        return bool(self.hvm_params) or self.max_vcpu_id is not None or self.toolstack is not None
