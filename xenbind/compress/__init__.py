"""xenbind.compress: checkpoint compression, the page cache and the codecs.

Public API (used by xenbind.stream and the daemons):

    from xenbind.compress import Compressor, Decompressor, CODECS, DEFAULT_CACHE_PAGES
    CODECS == ("seed", "xen", "none"); DEFAULT_CACHE_PAGES == 8192
    Compressor(codec, cache_pages=8192).compress(pfns, pages, pagetable=None) -> bytes
    Compressor.note_sent_raw(pfns, pages)  pages sent whole in Format A (zero base)
    Decompressor(codec, cache_pages=8192, known_zero=None).decompress(data, pfns)
                                           -> (k, 4096) uint8
    Decompressor.note_received_raw(pfns, pages)  the receiver's twin (a delta page
                                           for a PFN neither cached nor known zero
                                           is refused: error 9)
    KnownZero(size, limit)                 the known-zero set both sides keep
    .stats (CodecStats: hits, misses, evictions, pages, bytes_in, bytes_out, zero_base)

Modules:
    formats   the byte layouts of codecs "seed" and "xen", their constants
    cache     the LRU page cache (numpy storage, kept by the C kernel)
    codec     Compressor / Decompressor and their rules
    zero      KnownZero: the PFNs the receiver holds as zeros (the zero base)
    kernel.c  the C kernel (built as xenbind._codec): cache operations and
              both codecs' encoders and bounds-checked decoders
Codec "none" is Format A: pages travel raw in the PFN chunks; it has no
Compressor. docs/codecs.md states every choice the seed left open.
"""

from xenbind.compress.cache import DEFAULT_CACHE_PAGES, MAX_CACHE_PAGES, PageCache
from xenbind.compress.codec import CODECS, CodecStats, Compressor, Decompressor
from xenbind.compress.zero import KnownZero

__all__ = [
    "CODECS",
    "DEFAULT_CACHE_PAGES",
    "MAX_CACHE_PAGES",
    "CodecStats",
    "Compressor",
    "Decompressor",
    "KnownZero",
    "PageCache",
]
