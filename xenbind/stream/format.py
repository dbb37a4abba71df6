"""The legacy libxc chunk stream: layout, constants and the rules both sides keep.

Everything is little-endian with x86-64 sizes (``unsigned long`` = 8 bytes,
``int`` = 4 bytes); pages are 4096 bytes. This is the stream Xen 4.2-4.5's
``xc_domain_save`` wrote for Remus, plus three tags of this project's own.

STREAM
------
    header                       unsigned long p2m_size (number of guest pages)
    ( body tail )*               one body + tail per checkpoint; checkpoint 0 is
                                 the initial copy

BODY = chunk* then the end chunk. Every chunk starts with ``int type``:

    type > 0   a batch of ``type`` (1..1024) PFN entries, ``unsigned long`` each:
                 bits 0-27   PFN  (must be < p2m_size)
                 bits 28-31  page type, XEN_DOMCTL_PFINFO_* (see PAGE TYPES)
                 bits 32-63  zero
               Format A: the 4096-byte contents of every entry that carries data
               follow the array, in array order.
               Format B: nothing follows; the contents arrive in later
               COMPRESSED_DATA chunks, in listing order.
    type == 0  end of body
    type < 0   a tag (payload sizes in bytes):
      -7    TSC_INFO           uint32 mode, uint64 nsec, uint32 khz,
                               uint32 incarnation                       (20)
      -9    LAST_CHECKPOINT    nothing: the stream ends after this checkpoint
      -12   COMPRESSED_DATA    unsigned long N (8 bytes, as in Xen's C code),
                               then N bytes of compressed pages          (8+N)
      -13   ENABLE_COMPRESSION nothing: bodies after this one are Format B
      -1001 CODEC (project)    uint32 codec id, uint32 cache pages        (8)
      -1002 MEMORY_DIGEST (p.) uint32 algorithm id, uint32 length L,
                               L digest bytes                          (8+L)
      -1003 HEARTBEAT (proj.)  nothing
      -1004 SWITCHOVER (proj.) nothing: after committing this checkpoint (its
                               last) the receiver resumes its backup
      -1005 DISK (project)     uint32 length L (1..the configured cap), then
                               L bytes of the disk mirror stream    (4+L)
      -2    VCPU_INFO          int max_vcpu_id (0..4095), then the online map:
                               (max_vcpu_id / 64 + 1) uint64 words  (4+8..4+512)
      -3 -4 -8 -10 -11 -14 -15 -16 -17 -19 -20   HVM parameters, each
                               uint32 padding, uint64 value             (12)
      -18   TOOLSTACK          uint32 length L, L bytes (libxl's data) (4+L)
      Xen's other tags (-1 ENABLE_VERIFY_MODE, -5 TMEM, -6 TMEM_EXTRA) are
      known by name and rejected; any other negative type is unknown.

TAIL (HVM), after the end chunk of every body:
    uint64 ioreq PFN, uint64 buffered-ioreq PFN, uint64 xenstore PFN
    uint32 length L, L bytes of HVM context
    char[21] "DeviceModelRecord0002", uint32 length M, M bytes of device model

PAGE TYPES (bits 28-31 of an entry)
    0x0 NOTAB, 0x1-0x4 L1TAB-L4TAB (page tables), 0x9-0xC the same pinned
    (LPINTAB = 0x8 | table type); these carry data.
    0xD BROKEN, 0xE XALLOC (allocate only), 0xF XTAB (no page here): no data.
    0x5-0x8 are invalid (as in Xen's verify-stream-v2).

PROJECT TAGS
    CODEC announces the Format B codec and its LRU cache size. Codec ids:
    1 = "xen" (Xen 4.2-4.5's xc_compression.c format), 2 = "seed" (the seed
    thread's BEGIN_PAGE/FULL_PAGE deltas). A stream without CODEC that enables
    compression uses "xen" with an 8192-page cache, exactly as Xen did; so the
    encoder emits CODEC for "seed" always and for "xen" only with a
    non-default cache. A "none" stream never enables compression. CODEC may
    appear at most once, before ENABLE_COMPRESSION.
    MEMORY_DIGEST: algorithm 1 = xxh3-128 (16 bytes, xxhash's canonical
    big-endian digest) of the whole guest memory (p2m_size x 4096 bytes) as
    it stands once the checkpoint carrying the tag is applied (verify mode).
    HEARTBEAT: may stand wherever a chunk may start (inside a body, or between
    a tail and the next body); it changes nothing else.
    SWITCHOVER: a planned move (remusctl switchover): the sender's guest
    stays paused at this checkpoint, the receiver resumes its backup once
    the checkpoint is committed. Only in a body that also carries
    LAST_CHECKPOINT, at most once; never in a file capture.
    DISK: the next L bytes of the domain's disk mirror stream
    (xenbind.diskstream: header, WRITE/ZERO records, SEAL(N) placed while
    checkpoint N's guest was paused), cut anywhere: the pieces, in order,
    are that stream. May stand wherever a chunk may start (like HEARTBEAT);
    the receiver, not this decoder, reads the disk stream and holds the
    rule that checkpoint N commits only once SEAL(N) has arrived.

RULES (the decoder enforces every one, raising StreamError at the offset of
the offending item)
    * batch size 1..1024; PFN < p2m_size; entry bits 32-63 zero; page type valid
      (XTAB entries are exempt from the PFN rules: they name no page).
    * a PFN at most once per batch; at most once per Format B body. In a
      Format A body a PFN may repeat across batches (pre-copy rounds); the
      later copy wins.
    * COMPRESSED_DATA only in a Format B body, 0 <= N <= the configured cap
      (checked before anything is buffered); N == 0 (an empty chunk, which
      Xen's restore accepts) carries no page; at every point of a Format B
      body pages decoded <= data-carrying PFNs listed, and equal at its end.
    * VCPU_INFO: 0 <= max_vcpu_id < MAX_VCPUS; TOOLSTACK length capped. These
      and the HVM parameters may stand anywhere a chunk may in a body, any
      number of times (the receiver keeps the last of each per checkpoint).
    * DISK: 1 <= L <= the configured cap, checked before anything is buffered.
    * ENABLE_COMPRESSION at most once; CODEC at most once and before it.
    * tail lengths capped; the device-model signature exact.
    * nothing after the checkpoint that carried LAST_CHECKPOINT.
"""

from __future__ import annotations

import numpy as np

from .. import PAGE_SIZE as PAGE_SIZE  # re-exported for the encoder and decoder

#: Largest batch a +ve chunk may announce (Xen's MAX_BATCH_SIZE: 4 MiB of pages).
MAX_BATCH = 1024

#: Bits of a PFN entry.
PFN_BITS = 28
PFN_MASK = (1 << PFN_BITS) - 1  # bits 0-27: the PFN
TYPE_SHIFT = 28  # bits 28-31: XEN_DOMCTL_PFINFO_* >> 28
ENTRY_RESERVED_SHIFT = 32  # bits 32-63 must be zero

#: Page types (XEN_DOMCTL_PFINFO_* >> 28).
TYPE_NOTAB = 0x0
TYPE_L1TAB = 0x1
TYPE_L2TAB = 0x2
TYPE_L3TAB = 0x3
TYPE_L4TAB = 0x4
TYPE_LTABTYPE_MASK = 0x7  # the table level within a type
TYPE_LPINTAB = 0x8  # pinned flag, ORed with L1TAB..L4TAB
TYPE_BROKEN = 0xD  # broken page: no data
TYPE_XALLOC = 0xE  # allocate only: no data
TYPE_XTAB = 0xF  # invalid / not present: no data, names no page

#: type -> allowed in a stream.
TYPE_VALID = np.array([t not in (5, 6, 7, 8) for t in range(16)], dtype=bool)
#: type -> its entry carries 4096 bytes of contents.
TYPE_HAS_DATA = np.array([t <= 0xC and TYPE_VALID[t] for t in range(16)], dtype=bool)
#: type -> the page is a page table (never delta-encoded by Xen's compressor).
TYPE_IS_PAGETABLE = np.array(
    [bool(TYPE_VALID[t]) and t <= 0xC and (t & TYPE_LTABTYPE_MASK) != 0 for t in range(16)],
    dtype=bool,
)

#: Chunk types.
CHUNK_END = 0
TAG_ENABLE_VERIFY_MODE = -1
TAG_VCPU_INFO = -2
TAG_HVM_IDENT_PT = -3
TAG_HVM_VM86_TSS = -4
TAG_TMEM = -5
TAG_TMEM_EXTRA = -6
TAG_TSC_INFO = -7
TAG_HVM_CONSOLE_PFN = -8
TAG_LAST_CHECKPOINT = -9
TAG_HVM_ACPI_IOPORTS_LOCATION = -10
TAG_HVM_VIRIDIAN = -11
TAG_COMPRESSED_DATA = -12
TAG_ENABLE_COMPRESSION = -13
TAG_HVM_GENERATION_ID_ADDR = -14
TAG_HVM_PAGING_RING_PFN = -15
TAG_HVM_MONITOR_RING_PFN = -16
TAG_HVM_SHARING_RING_PFN = -17
TAG_TOOLSTACK = -18
TAG_HVM_IOREQ_SERVER_PFN = -19
TAG_HVM_NR_IOREQ_SERVER_PAGES = -20
# The project's own tags, far from Xen's -1..-20.
TAG_CODEC = -1001
TAG_MEMORY_DIGEST = -1002
TAG_HEARTBEAT = -1003
TAG_SWITCHOVER = -1004
TAG_DISK = -1005

#: Names for messages (Xen's names from xen/migration/legacy.py).
TAG_NAMES = {
    TAG_ENABLE_VERIFY_MODE: "enable_verify_mode",
    TAG_VCPU_INFO: "vcpu_info",
    TAG_HVM_IDENT_PT: "hvm_ident_pt",
    TAG_HVM_VM86_TSS: "hvm_vm86_tss",
    TAG_TMEM: "tmem",
    TAG_TMEM_EXTRA: "tmem_extra",
    TAG_TSC_INFO: "tsc_info",
    TAG_HVM_CONSOLE_PFN: "hvm_console_pfn",
    TAG_LAST_CHECKPOINT: "last_checkpoint",
    TAG_HVM_ACPI_IOPORTS_LOCATION: "hvm_acpi_ioports_location",
    TAG_HVM_VIRIDIAN: "hvm_viridian",
    TAG_COMPRESSED_DATA: "compressed_data",
    TAG_ENABLE_COMPRESSION: "enable_compression",
    TAG_HVM_GENERATION_ID_ADDR: "hvm_generation_id_addr",
    TAG_HVM_PAGING_RING_PFN: "hvm_paging_ring_pfn",
    TAG_HVM_MONITOR_RING_PFN: "hvm_monitor_ring_pfn",
    TAG_HVM_SHARING_RING_PFN: "hvm_sharing_ring_pfn",
    TAG_TOOLSTACK: "toolstack",
    TAG_HVM_IOREQ_SERVER_PFN: "hvm_ioreq_server_pfn",
    TAG_HVM_NR_IOREQ_SERVER_PAGES: "hvm_nr_ioreq_server_pages",
    TAG_CODEC: "codec (project)",
    TAG_MEMORY_DIGEST: "memory_digest (project)",
    TAG_HEARTBEAT: "heartbeat (project)",
    TAG_SWITCHOVER: "switchover (project)",
    TAG_DISK: "disk (project)",
}

#: Payload sizes of the fixed-size tags (bytes after the 4-byte type).
TSC_INFO_SIZE = 20  # '<IQII'
HVM_PARAM_SIZE = 12  # '<IQ': padding (ignored, as Xen's restore does), value
VCPU_INFO_HEADER_SIZE = 4  # int max_vcpu_id; the online map follows
TOOLSTACK_LENGTH_SIZE = 4  # uint32 length; that many bytes follow
DISK_LENGTH_SIZE = 4  # uint32 length; that many bytes of the disk stream follow
CODEC_SIZE = 8  # '<II'
DIGEST_HEADER_SIZE = 8  # '<II'
COMPRESSED_LENGTH_SIZE = 8  # unsigned long

#: Codec ids carried by TAG_CODEC. "none" has no id: it never enables compression.
CODEC_IDS = {"xen": 1, "seed": 2}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
#: The codec ENABLE_COMPRESSION means when no CODEC tag came first, and the
#: cache size Xen hard-coded.
LEGACY_CODEC = "xen"
LEGACY_CACHE_PAGES = 8192

#: Digest algorithms carried by TAG_MEMORY_DIGEST: id -> (name, digest length).
DIGEST_XXH3_128 = 1
DIGEST_ALGORITHMS = {DIGEST_XXH3_128: ("xxh3-128", 16)}
DIGEST_IDS = {name: alg for alg, (name, _) in DIGEST_ALGORITHMS.items()}

#: VCPU_INFO: Xen's XC_SR_MAX_VCPUS (xg_save_restore.h); the online map of
#: max_vcpu_id holds max_vcpu_id // 64 + 1 uint64 words (vcpumap_sz).
MAX_VCPUS = 4096


def vcpumap_size(max_vcpu_id: int) -> int:
    """Bytes of the VCPU online map after a VCPU_INFO's max_vcpu_id."""
    return (max_vcpu_id // 64 + 1) * 8


#: The HVM parameter tags: tag -> the HVM_PARAM_* index (xen/include/public/
#: hvm/params.h) whose value the chunk carries, as xc_domain_save.c reads it
#: with xc_hvm_param_get and xc_domain_restore.c sets it.
HVM_PARAM_OF_TAG = {
    TAG_HVM_IDENT_PT: 12,  # HVM_PARAM_IDENT_PT
    TAG_HVM_VM86_TSS: 15,  # HVM_PARAM_VM86_TSS
    TAG_HVM_CONSOLE_PFN: 17,  # HVM_PARAM_CONSOLE_PFN
    TAG_HVM_ACPI_IOPORTS_LOCATION: 19,  # HVM_PARAM_ACPI_IOPORTS_LOCATION
    TAG_HVM_VIRIDIAN: 9,  # HVM_PARAM_VIRIDIAN
    TAG_HVM_GENERATION_ID_ADDR: 34,  # HVM_PARAM_VM_GENERATION_ID_ADDR
    TAG_HVM_PAGING_RING_PFN: 27,  # HVM_PARAM_PAGING_RING_PFN
    TAG_HVM_MONITOR_RING_PFN: 28,  # HVM_PARAM_ACCESS_RING_PFN (4.5's name)
    TAG_HVM_SHARING_RING_PFN: 29,  # HVM_PARAM_SHARING_RING_PFN
    TAG_HVM_IOREQ_SERVER_PFN: 32,  # HVM_PARAM_IOREQ_SERVER_PFN
    TAG_HVM_NR_IOREQ_SERVER_PAGES: 33,  # HVM_PARAM_NR_IOREQ_SERVER_PAGES
}

#: The HVM tail.
MAGIC_PFNS_SIZE = 24  # 3 x uint64
DEVICE_MODEL_SIGNATURE = b"DeviceModelRecord0002"  # 21 bytes, no NUL

#: Xen's sender page buffer in Format B: pages gathered before a
#: COMPRESSED_DATA chunk must go out.
DEFAULT_BUFFER_PAGES = 8192

#: Decoder limits (all configurable per Decoder).
DEFAULT_MAX_P2M_SIZE = 1 << 24  # 64 GiB guest
DEFAULT_MAX_COMPRESSED = 64 << 20  # one COMPRESSED_DATA chunk
DEFAULT_MAX_CONTEXT = 16 << 20  # HVM context blob
DEFAULT_MAX_DEVICE_MODEL = 64 << 20  # device-model record
DEFAULT_MAX_CACHE_PAGES = 1 << 18  # an announced cache of at most 1 GiB
DEFAULT_MAX_TOOLSTACK = 1 << 20  # one TOOLSTACK record (libxl's is a few KiB)
DEFAULT_MAX_DISK_CHUNK = 4 << 20  # one DISK chunk (senders cut at DISK_CHUNK_BYTES)
#: The piece of the disk stream a sender puts in one DISK chunk.
DISK_CHUNK_BYTES = 1 << 20

__all__ = [name for name in dir() if name.isupper()]
