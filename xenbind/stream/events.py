"""The events the stream decoder yields, in stream order.

A checkpoint's events run from the first chunk of its body to its
``CheckpointEnd``. A receiver stages what ``Pages`` carry and commits only on
``CheckpointEnd``: nothing before it is final (the checkpoint may still be torn).

Arrays in events are owned by the event (never views of the decoder's
buffers): ``pfns`` are uint64 PFNs (type bits stripped), ``types`` uint8 page
types, ``data`` uint8 of shape (k, 4096).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..types import Context


@dataclass(frozen=True, slots=True)
class Header:
    """The stream header: the guest's number of pages."""

    p2m_size: int


@dataclass(frozen=True, slots=True, eq=False)
class PageBatch:
    """The listing of one +ve chunk (every entry, XTAB ones included)."""

    pfns: np.ndarray  # uint64, type bits stripped
    types: np.ndarray  # uint8, XEN_DOMCTL_PFINFO_* >> 28


@dataclass(frozen=True, slots=True, eq=False)
class Pages:
    """Page contents: Format A page data, or one decoded COMPRESSED_DATA chunk.

    ``data[i]`` is the content of page ``pfns[i]``. Entries without data
    (XTAB, XALLOC, BROKEN) never appear here. ``compressed_bytes`` is the
    COMPRESSED_DATA payload length (Format B) or None (Format A).
    """

    pfns: np.ndarray
    data: np.ndarray
    compressed_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class TscInfo:
    mode: int
    nsec: int
    khz: int
    incarnation: int


@dataclass(frozen=True, slots=True)
class VcpuInfo:
    """Xen's VCPU_INFO (-2): the highest VCPU id and the online map (uint64
    words, little-endian, bit i of word i // 64 = VCPU i online), as
    xc_domain_save.c writes it in every checkpoint."""

    max_vcpu_id: int
    vcpumap: bytes

    def online(self) -> list[int]:
        """The ids of the VCPUs the map marks online (up to max_vcpu_id)."""
        bits = int.from_bytes(self.vcpumap, "little")
        return [i for i in range(self.max_vcpu_id + 1) if bits >> i & 1]


@dataclass(frozen=True, slots=True)
class HvmParam:
    """One of Xen's HVM parameter chunks: ``tag`` (XC_SAVE_ID_HVM_*), the
    HVM_PARAM_* ``index`` it carries and its 64-bit ``value``."""

    tag: int
    index: int
    value: int


@dataclass(frozen=True, slots=True)
class Toolstack:
    """Xen's TOOLSTACK (-18): the toolstack's own record (libxl's), opaque."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CodecAnnounce:
    """Project tag CODEC: the Format B codec and its LRU cache size."""

    codec: str
    cache_pages: int


@dataclass(frozen=True, slots=True)
class EnableCompression:
    """Bodies after the current one are Format B, decoded with ``codec``."""

    codec: str
    cache_pages: int


@dataclass(frozen=True, slots=True)
class LastCheckpoint:
    """The stream ends after the current checkpoint."""


@dataclass(frozen=True, slots=True)
class Switchover:
    """Project tag SWITCHOVER: the current checkpoint (the last) is a planned
    move; the receiver resumes its backup once it is committed."""


@dataclass(frozen=True, slots=True)
class MemoryDigest:
    """Project tag MEMORY_DIGEST: the digest of all guest memory once the
    current checkpoint is applied."""

    algorithm: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Project tag HEARTBEAT: the sender is alive. Changes nothing else."""


@dataclass(frozen=True, slots=True)
class DiskData:
    """Project tag DISK: the next piece of the domain's disk mirror stream
    (xenbind.diskstream), to be fed to a disk stream decoder in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfBody:
    """The 0 chunk closing checkpoint ``index``'s body; the tail follows."""

    index: int


@dataclass(frozen=True, slots=True)
class Tail:
    """The checkpoint's HVM tail, whole and checked."""

    context: Context


@dataclass(frozen=True, slots=True)
class CheckpointEnd:
    """Checkpoint ``index`` arrived whole: commit it.

    ``format`` is "A" or "B"; ``pages`` the number of page contents it carried
    (repeats in a Format A body counted each time); ``offset`` the stream
    offset just past its tail.
    """

    index: int
    format: str
    pages: int
    offset: int


Event = (
    Header
    | PageBatch
    | Pages
    | TscInfo
    | VcpuInfo
    | HvmParam
    | Toolstack
    | CodecAnnounce
    | EnableCompression
    | LastCheckpoint
    | Switchover
    | MemoryDigest
    | Heartbeat
    | DiskData
    | EndOfBody
    | Tail
    | CheckpointEnd
)
