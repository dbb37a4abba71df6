"""Byte layouts of the two compressed page formats, and their constants.

Both formats encode a batch of pages, in the order of their PFNs, into the
payload of one COMPRESSED_DATA chunk. Neither names the PFNs: the i-th page in
the blob belongs to the i-th PFN listed (stream-format.md). Little-endian.
The encoders and decoders themselves are in kernel.c (one implementation
each); the constants here must equal its #defines (tests check it).

Codec "seed" (the seed thread's format):

    blob       = ( BEGIN_PAGE delta* | FULL_PAGE page )*
    record     = int16 offset, uint32 value                   (6 bytes)
    BEGIN_PAGE = record(-100, 0)    a cached page follows as deltas
    FULL_PAGE  = record(-101, 0)    4096 raw bytes follow
    delta      = record(offset, new value of the 32-bit word at byte offset)

    - offset of a delta: 0 <= offset < 4096, a multiple of 4, strictly
      increasing within a page; the value is the NEW word (not an XOR).
    - a page's deltas end at the next marker or at the end of the blob.
    - an unchanged cached page is BEGIN_PAGE with no deltas (6 bytes).
    - a cached page with more than SEED_MAX_DELTAS changed words is sent as
      FULL_PAGE instead (its deltas would be >= the 4102 bytes of FULL_PAGE).
    - a marker's value is 0; any other negative offset is corrupt.

Codec "xen" (Xen 4.2-4.5 tools/libxc/xc_compression.c, byte for byte):

    blob   = page*
    page   = 0x00                       unchanged cached page
           | 0x80 <4096 bytes>          page sent whole (zero-length SKIP)
           | marker+                    covering exactly 1024 words
    marker = RUN:  0b0LLLLLLL <L words>  copy L new words at the offset
           | SKIP: 0b1LLLLLLL            advance L words, 1 <= L <= 127

    - the encoder emits maximal alternating SKIP/RUN segments, each split
      into markers of 127 words and a remainder, leading and trailing SKIPs
      included; a page with no change is 0x00; a cached page that changed
      entirely is still 8 x RUN(127) + RUN(8) (4105 bytes), as Xen did.
    - a zero-length marker inside a page is corrupt.
"""

from __future__ import annotations

from typing import Final

from xenbind import PAGE_SIZE

#: Every codec a session may use, in order of preference: the two formats
#: below, and "none" (Format A: pages travel raw, no compressed form). The
#: one definition: xenbind.compress.CODECS, the HELLO check
#: (xenbind.session) and the daemons' options all read this tuple.
CODECS: Final = ("seed", "xen", "none")

WORD_SIZE = 4
WORDS_PER_PAGE = PAGE_SIZE // WORD_SIZE

# ids the C kernel uses for the codecs
CODEC_IDS = {"seed": 1, "xen": 2}

# -- seed --
SEED_RECORD_SIZE = 6  # int16 offset + uint32 value
SEED_BEGIN_PAGE = -100  # marker: a cached page, deltas follow
SEED_FULL_PAGE = -101  # marker: 4096 raw bytes follow
SEED_FULL_SIZE = SEED_RECORD_SIZE + PAGE_SIZE  # 4102
# most deltas a page may carry before FULL_PAGE is smaller (6 + 6*683 > 4102)
SEED_MAX_DELTAS = PAGE_SIZE // SEED_RECORD_SIZE  # 682

# -- xen --
XEN_SKIP_FLAG = 0x80  # bit 7 set = SKIP, clear = RUN
XEN_LEN_MASK = 0x7F  # bits 0-6: length in 32-bit words
XEN_EMPTY_PAGE = 0x00  # unchanged page
XEN_FULL_PAGE = 0x80  # page sent whole: 4096 raw bytes follow
XEN_FULL_SIZE = 1 + PAGE_SIZE  # 4097
XEN_WORST_SIZE = PAGE_SIZE + 9  # every word changed: 8 x (1 + 508) + 1 + 32

# bytes one page takes at most / at least in each format
MAX_ENCODED_PAGE = {"seed": SEED_FULL_SIZE, "xen": XEN_WORST_SIZE}
MIN_ENCODED_PAGE = {"seed": SEED_RECORD_SIZE, "xen": 1}

#: retired error code: the old receiver's "delta page with no base" (a PFN
#: neither in its mirror of the sender's cache nor known zero). The receiver
#: now decodes on its own copy of every page, so no page lacks a base; the
#: number stays reserved so that the other codes keep their meaning.
NO_BASE = 9

# the kernel's error codes (XB_E_* in kernel.c) and what they mean
ERROR_REASONS = {
    1: "truncated: {detail} byte(s) left where a 6-byte record starts",
    2: "truncated full page: {detail} of 4096 bytes present",
    3: "marker with value {detail:#x}, must be 0",
    4: "invalid offset {detail} (negative and not a BEGIN_PAGE/FULL_PAGE marker)",
    5: "delta offset {detail} outside the page",
    6: "delta offset {detail} not a multiple of 4",
    7: "delta offset {detail} not above the previous delta's in this page",
    8: "delta (offset {detail}) not preceded by BEGIN_PAGE",
    9: "retired (no base): never raised",
    10: "more pages in the data than the {detail} pfns listed",
    11: "zero-length marker {detail:#04x} inside a page",
    12: "RUN ends at byte {detail}, past the end of the page",
    13: "SKIP ends at byte {detail}, past the end of the page",
    14: "truncated RUN: {detail} bytes of words announced",
    15: "data ends inside a page ({detail} of 4096 bytes covered)",
    16: "page kinds or offsets differ from the scan of the same blob",
    17: "base row {detail:#x} past the memory it is read from",
}
