"""xenbind.compress: checkpoint compression, the page cache and the codecs.

Public API (used by xenbind.stream and the daemons):

    from xenbind.compress import Compressor, Decompressor, CODECS, DEFAULT_CACHE_PAGES
    CODECS == ("seed", "xen", "none"); DEFAULT_CACHE_PAGES == 8192
    Compressor(codec, cache_pages=8192).compress(pfns, pages, pagetable=None) -> bytes
    Compressor.note_sent_raw(pfns, pages)  pages sent whole in Format A (zero base)
    Decompressor(codec).decompress(data, pfns, base) -> (k, 4096) uint8
                                           delta pages decode in place on the
                                           receiver's own pages: base(pfns, out)
    KnownZero(size, limit)                 the sender's known-zero set
    gather(memory, pfns, out)              out[i] = memory[pfns[i]], in C: a base
                                           source over a memory image
    Rows(memory, staged)                   a base source the kernel reads in place
                                           (the fused decode: no gather first)
    .stats (CodecStats: hits, misses, evictions, pages, bytes_in, bytes_out, zero_base)

Modules:
    formats   the byte layouts of codecs "seed" and "xen", their constants
    cache     the sender's LRU page cache (numpy storage, kept by the C kernel)
    codec     Compressor / Decompressor and their rules
    zero      KnownZero: the PFNs the sender knows the receiver holds as zeros
    kernel.c  the C kernel (built as xenbind._codec): cache operations, both
              codecs' encoders, and bounds-checked scan + in-place apply
Codec "none" is Format A: pages travel raw in the PFN chunks; it has no
Compressor. docs/codecs.md states every choice the seed left open.
"""

from xenbind.compress.cache import DEFAULT_CACHE_PAGES, MAX_CACHE_PAGES, PageCache
from xenbind.compress.codec import (
    CODECS,
    BaseSource,
    CodecStats,
    Compressor,
    Decompressor,
    Rows,
    gather,
)
from xenbind.compress.zero import KnownZero

__all__ = [
    "CODECS",
    "DEFAULT_CACHE_PAGES",
    "MAX_CACHE_PAGES",
    "BaseSource",
    "CodecStats",
    "Compressor",
    "Decompressor",
    "KnownZero",
    "PageCache",
    "Rows",
    "gather",
]
