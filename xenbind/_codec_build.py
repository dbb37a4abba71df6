"""cffi build script (API mode) for xenbind._codec, the codecs' C kernel.

setup.py builds it on every install (`ffibuilder` below). The C source lives
in xenbind/compress/kernel.c, where its layout and rules are written down;
this file only declares the functions Python calls and compiles with -O2.
"""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNEL = os.path.join(_HERE, "compress", "kernel.c")

CDEF = """
typedef struct {
    uint8_t *data;
    uint64_t *pfn;
    uint32_t *prev;
    uint32_t *next;
    uint32_t *table;
    uint32_t cap;
    uint32_t used;
    uint32_t head;
    uint32_t tail;
    uint32_t tmask;
    uint64_t hits;
    uint64_t misses;
    uint64_t evictions;
} xb_cache;

typedef struct {
    int code;
    uint64_t offset;
    uint64_t page;
    int64_t detail;
} xb_error;

size_t xb_max_encoded(int codec);
int64_t xb_cache_slot(const xb_cache *c, uint64_t pfn);
size_t xb_encode(xb_cache *c, int codec, const uint64_t *pfns, const uint8_t *pages,
                 const uint8_t *pt, size_t n, uint8_t *out);
int64_t xb_decode(xb_cache *c, int codec, const uint8_t *in, size_t len, const uint64_t *pfns,
                  size_t npfns, uint8_t *out, size_t max_pages, xb_error *e);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
with open(_KERNEL, encoding="utf-8") as _f:
    ffibuilder.set_source(
        "xenbind._codec",
        _f.read(),
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    )

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
