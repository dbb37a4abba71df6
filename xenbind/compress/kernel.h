/* xenbind/compress/kernel.h: what kernel.c offers Python, in one place.
 *
 * kernel.c includes this file after <stdint.h> and <string.h>; the cffi
 * build (xenbind/_codec_build.py) reads it as its cdef. So it holds only what
 * cffi's cdef parser accepts: typedefs and prototypes, no preprocessor lines.
 */

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
    uint64_t zero_base;   /* misses sent as deltas against a zero page */
} xb_cache;

typedef struct {
    int code;          /* XB_E_* below, 0 = no error */
    uint64_t offset;   /* byte offset in the blob of the offending item */
    uint64_t page;     /* index of the page being decoded */
    int64_t detail;    /* offending value (offset, marker, length...) */
} xb_error;

size_t xb_max_encoded(int codec);
int64_t xb_cache_slot(const xb_cache *c, uint64_t pfn);
size_t xb_encode(xb_cache *c, int codec, const uint64_t *pfns, const uint8_t *pages,
                 const uint8_t *pt, size_t n, uint8_t *out, uint8_t *zknown, uint64_t zbits);
size_t xb_note_raw(uint8_t *zknown, uint64_t zbits, const uint64_t *pfns, const uint8_t *pages,
                   size_t n);
int64_t xb_scan(int codec, const uint8_t *in, size_t len, size_t npfns, size_t max_pages,
                uint64_t *starts, uint8_t *delta, xb_error *e);
int64_t xb_apply(int codec, const uint8_t *in, size_t len, const uint64_t *starts,
                 const uint8_t *delta, size_t k, uint8_t *out, size_t rows, xb_error *e);
int64_t xb_decode_from(int codec, const uint8_t *in, size_t len, size_t npfns, size_t max_pages,
                       const uint8_t *const *srcs, const uint64_t *src_rows, size_t nsrc,
                       const uint64_t *pfns, const uint32_t *seg, const uint64_t *row,
                       uint8_t *out, size_t rows, uint8_t *delta, xb_error *e);
int64_t xb_gather(const uint8_t *src, size_t rows, const uint64_t *idx, size_t n, uint8_t *out);
