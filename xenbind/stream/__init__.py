"""xenbind.stream: the legacy libxc chunk stream (Xen 4.2-4.5, as Remus spoke it), sans-IO.

The full layout and the rules are in ``xenbind.stream.format`` (and
docs/stream.md); in short:

    header   unsigned long p2m_size
    ( body tail )* one per checkpoint
    body     chunk* 0          chunk = int type, then
                                 type > 0: type (<= 1024) unsigned long PFN entries
                                           (PFN bits 0-27, page type bits 28-31),
                                           then, in Format A only, 4096 bytes per
                                           data-carrying entry
                                 type < 0: a tag (-2 VCPU_INFO, the HVM
                                           parameters, -7 TSC_INFO, -9
                                           LAST_CHECKPOINT, -12 COMPRESSED_DATA +
                                           unsigned long length, -13
                                           ENABLE_COMPRESSION, -18 TOOLSTACK;
                                           project tags -1001 CODEC, -1002
                                           MEMORY_DIGEST, -1003 HEARTBEAT, -1004
                                           SWITCHOVER, -1005 DISK)
    tail     uint64 x 3 magic PFNs, uint32 + HVM context,
             "DeviceModelRecord0002", uint32 + device-model record

Modules: ``format`` (constants and the spec), ``events`` (decoder events),
``encoder`` (bytes out), ``decoder`` (bytes in, events out; delta pages
decode on the user's own pages, its base source), ``image`` (a memory image
rebuilt from events, which is such a base source), ``cli``
(``python -m xenbind.stream inspect|replay``). No module here touches a
socket, a clock or a thread; only ``cli`` touches files.
"""

from .decoder import BaseSource, Decoder, MalformedStream, TruncatedStream, overlay
from .encoder import (
    StreamWriter,
    encode_body_a,
    encode_body_b,
    encode_codec,
    encode_compressed,
    encode_disk,
    encode_enable_compression,
    encode_end,
    encode_header,
    encode_heartbeat,
    encode_last_checkpoint,
    encode_memory_digest,
    encode_pages,
    encode_pfn_list,
    encode_switchover,
    encode_tail,
    encode_tsc_info,
    memory_digest,
)
from .events import (
    CheckpointEnd,
    CodecAnnounce,
    DiskData,
    EnableCompression,
    EndOfBody,
    Event,
    Header,
    Heartbeat,
    HvmParam,
    LastCheckpoint,
    MemoryDigest,
    PageBatch,
    Pages,
    Switchover,
    Tail,
    Toolstack,
    TscInfo,
    VcpuInfo,
)
from .format import DEFAULT_BUFFER_PAGES, MAX_BATCH
from .image import Image

__all__ = [
    "DEFAULT_BUFFER_PAGES",
    "MAX_BATCH",
    "BaseSource",
    "CheckpointEnd",
    "CodecAnnounce",
    "Decoder",
    "DiskData",
    "EnableCompression",
    "EndOfBody",
    "Event",
    "Header",
    "Heartbeat",
    "HvmParam",
    "Image",
    "LastCheckpoint",
    "Switchover",
    "MalformedStream",
    "MemoryDigest",
    "PageBatch",
    "Pages",
    "StreamWriter",
    "Tail",
    "Toolstack",
    "TruncatedStream",
    "TscInfo",
    "VcpuInfo",
    "encode_body_a",
    "encode_body_b",
    "encode_codec",
    "encode_compressed",
    "encode_disk",
    "encode_enable_compression",
    "encode_end",
    "encode_header",
    "encode_heartbeat",
    "encode_last_checkpoint",
    "encode_switchover",
    "encode_memory_digest",
    "encode_pages",
    "encode_pfn_list",
    "encode_tail",
    "encode_tsc_info",
    "memory_digest",
    "overlay",
]
