/*
 * xenbind/compress/kernel.c: the page cache and both codecs' hot loops.
 *
 * Built by xenbind/_codec_build.py (cffi API mode) into xenbind._codec.
 * Python owns every buffer (numpy arrays, bytes); this file owns no memory.
 *
 * The cache (one per Compressor, one mirror per Decompressor)
 *   data[cap][4096]  the last contents sent for the pfn held by each slot
 *   pfn[cap]         the pfn a slot holds (valid for slots < used)
 *   prev/next[cap]   doubly linked LRU list of slots, head = most recently
 *                    used, tail = least recently used; NIL ends it
 *   table[tsize]     open-addressing hash pfn -> slot+1 (0 = empty),
 *                    linear probing, backward-shift deletion, tsize a power
 *                    of two >= 2 * cap
 * Rules: lookup of a present pfn moves it to the head ("touch"). A missing
 * pfn takes slot `used` while the cache is not full, else the tail slot
 * (evicting its pfn), and goes to the head. Encoder and decoder run exactly
 * these operations in exactly the same order, page by page, so the mirror
 * equals the sender's cache, slot for slot.
 *
 * Zero base (both codecs): a pfn the cache does not hold (a miss) may still
 * be sent as a delta page (seed BEGIN_PAGE + deltas, xen 0x00 or markers);
 * its base is then an all-zero page. Both sides keep a known-zero bitmap
 * `zknown` of the pfns the receiver holds as zeros: last sent whole in
 * Format A, all zero (xb_note_raw, on the pages sent and on the pages
 * received), and not sent in Format B since (xb_encode and xb_decode clear
 * the bit of every pfn they encode or decode, whole or delta, hit or miss).
 * The sender uses the zero base only for a pfn its bitmap marks, and only
 * when the delta is smaller than the page whole. The decoder accepts a
 * delta page for a missing pfn only when its own bitmap marks it (else
 * XB_E_NO_BASE: the caches are out of step, or the stream lies), decodes it
 * against zeros, then inserts the pfn as any miss (free slot or evicted
 * tail), exactly as the sender did. zero_base counts such pages on both
 * sides. zknown is bit-packed (bit pfn & 7 of byte pfn >> 3), zbits bits
 * long; pfns >= zbits are unknown (never known zero).
 * Codec ids: XB_SEED = 1, XB_XEN = 2 (layouts in xenbind/compress/formats.py,
 * repeated beside the functions below).
 *
 * The decoders parse untrusted bytes: every read is checked against len,
 * every write against the page (4096) and the output rows (max_pages).
 * A page reaches the cache only if it decodes to exactly 4096 bytes: seed
 * pages are validated before they are applied; xen pages are applied as
 * they are parsed, with the overwritten words kept and put back on error.
 * tests/test_compress_sanitize.py runs this file under ASan and UBSan.
 */
#include <stdint.h>
#include <string.h>

#define XB_PAGE 4096u
#define XB_WORDS 1024u
#define XB_NIL 0xFFFFFFFFu

#define XB_SEED 1
#define XB_XEN 2

/* seed format */
#define SEED_REC 6                 /* int16 offset + uint32 value */
#define SEED_BEGIN_PAGE (-100)
#define SEED_FULL_PAGE (-101)
#define SEED_FULL_SIZE (SEED_REC + XB_PAGE)
/* a delta page costs 6 + 6k bytes; full costs 4102: deltas only while smaller */
#define SEED_MAX_DELTAS ((XB_PAGE) / SEED_REC)   /* 682: 6+6*682 = 4098 < 4102 */

/* xen format */
#define XEN_SKIPFLAG 0x80u
#define XEN_LENMASK 0x7Fu
#define XEN_EMPTY_PAGE 0x00u           /* unchanged page */
#define XEN_FULL_PAGE 0x80u            /* zero-length SKIP: 4096 raw bytes follow */
#define XEN_FULL_SIZE (1 + XB_PAGE)

#include "kernel.h"  /* xb_cache, xb_error and the functions Python calls */

enum {
    XB_E_OK = 0,
    XB_E_TRUNC_RECORD = 1,      /* seed: fewer than 6 bytes left for a record */
    XB_E_TRUNC_FULL = 2,        /* full page: fewer than 4096 bytes follow */
    XB_E_MARKER_VALUE = 3,      /* seed: marker whose value is not 0 */
    XB_E_BAD_OFFSET = 4,        /* seed: negative offset that is no marker */
    XB_E_OUT_OF_PAGE = 5,       /* seed: offset >= 4096 */
    XB_E_MISALIGNED = 6,        /* seed: offset not a multiple of 4 */
    XB_E_NOT_ASCENDING = 7,     /* seed: offsets in a page not strictly increasing */
    XB_E_DELTA_OUTSIDE = 8,     /* seed: delta not preceded by BEGIN_PAGE */
    XB_E_NO_BASE = 9,           /* delta page for a pfn neither cached nor known zero */
    XB_E_TOO_MANY_PAGES = 10,   /* more pages in the blob than pfns given */
    XB_E_ZERO_LENGTH = 11,      /* xen: zero-length marker inside a page */
    XB_E_RUN_PAST_END = 12,     /* xen: RUN beyond byte 4096 of the page */
    XB_E_SKIP_PAST_END = 13,    /* xen: SKIP beyond byte 4096 of the page */
    XB_E_TRUNC_RUN = 14,        /* xen: RUN's words cut off by the blob's end */
    XB_E_TRUNC_PAGE = 15,       /* xen: blob ended before the page covered 4096 bytes */
};

/* ---------------------------------------------------------------- cache */

static inline uint32_t hash_pfn(uint64_t pfn, uint32_t tmask)
{
    return (uint32_t)((pfn * 0x9E3779B97F4A7C15ull) >> 32) & tmask;
}

/* slot holding pfn, or XB_NIL */
static uint32_t cache_find(const xb_cache *c, uint64_t pfn)
{
    uint32_t h = hash_pfn(pfn, c->tmask);
    for (;;) {
        uint32_t e = c->table[h];
        if (e == 0)
            return XB_NIL;
        if (c->pfn[e - 1] == pfn)
            return e - 1;
        h = (h + 1) & c->tmask;
    }
}

static void table_insert(xb_cache *c, uint64_t pfn, uint32_t slot)
{
    uint32_t h = hash_pfn(pfn, c->tmask);
    while (c->table[h] != 0)
        h = (h + 1) & c->tmask;
    c->table[h] = slot + 1;
}

/* remove pfn's entry; backward-shift keeps every probe chain unbroken */
static void table_remove(xb_cache *c, uint64_t pfn)
{
    uint32_t i = hash_pfn(pfn, c->tmask);
    while (c->table[i] != 0 && c->pfn[c->table[i] - 1] != pfn)
        i = (i + 1) & c->tmask;
    if (c->table[i] == 0)
        return;
    uint32_t j = i;
    for (;;) {
        c->table[i] = 0;
        for (;;) {
            j = (j + 1) & c->tmask;
            if (c->table[j] == 0)
                return;
            uint32_t home = hash_pfn(c->pfn[c->table[j] - 1], c->tmask);
            /* move j back to i unless its home lies cyclically in (i, j] */
            if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
                continue;
            break;
        }
        c->table[i] = c->table[j];
        i = j;
    }
}

static void list_unlink(xb_cache *c, uint32_t s)
{
    uint32_t p = c->prev[s], n = c->next[s];
    if (p != XB_NIL) c->next[p] = n; else c->head = n;
    if (n != XB_NIL) c->prev[n] = p; else c->tail = p;
}

static void list_push_head(xb_cache *c, uint32_t s)
{
    c->prev[s] = XB_NIL;
    c->next[s] = c->head;
    if (c->head != XB_NIL) c->prev[c->head] = s; else c->tail = s;
    c->head = s;
}

static inline void cache_touch(xb_cache *c, uint32_t s)
{
    if (c->head != s) {
        list_unlink(c, s);
        list_push_head(c, s);
    }
}

/* slot for a pfn that is not cached: a fresh one, else the evicted tail */
static uint32_t cache_insert(xb_cache *c, uint64_t pfn)
{
    uint32_t s;
    if (c->used < c->cap) {
        s = c->used++;
    } else {
        s = c->tail;
        table_remove(c, c->pfn[s]);
        list_unlink(c, s);
        c->evictions++;
    }
    c->pfn[s] = pfn;
    table_insert(c, pfn, s);
    list_push_head(c, s);
    return s;
}

/* the slot a delta page decoded for pfn lands in: its own (s, a hit) or, for
 * a miss against the zero base, a new one holding `init` (NULL: zeros) */
static uint32_t delta_slot(xb_cache *c, uint32_t s, uint64_t pfn, const uint8_t *init)
{
    if (s != XB_NIL) {
        cache_touch(c, s);
        c->hits++;
        return s;
    }
    c->misses++;
    c->zero_base++;
    s = cache_insert(c, pfn);
    if (init)
        memcpy(c->data + (size_t)s * XB_PAGE, init, XB_PAGE);
    else
        memset(c->data + (size_t)s * XB_PAGE, 0, XB_PAGE);
    return s;
}

/* slot of pfn or -1, without any LRU effect (for inspection) */
int64_t xb_cache_slot(const xb_cache *c, uint64_t pfn)
{
    uint32_t s = cache_find(c, pfn);
    return s == XB_NIL ? -1 : (int64_t)s;
}

/* lookup with LRU effect; *hit tells which. Counts hits/misses. */
static uint32_t cache_get(xb_cache *c, uint64_t pfn, int *hit)
{
    uint32_t s = cache_find(c, pfn);
    if (s != XB_NIL) {
        cache_touch(c, s);
        c->hits++;
        *hit = 1;
        return s;
    }
    c->misses++;
    *hit = 0;
    return cache_insert(c, pfn);
}

/* ------------------------------------------------------- word scanning */

/*
 * change_mask() compares a page with its cached copy in one branch-free
 * pass and returns a 1024-bit map of the changed words (bit k of mask[i] =
 * word 64 * i + k). With SSE2 (every x86-64) 16 words cost four compares and
 * two packs into one 16-bit movemask; elsewhere a scalar loop does the same.
 * The encoders then walk only the set bits (seed: one step per changed
 * word) or the runs of set bits (xen: one step per run): no branch per
 * unchanged word, no call per changed word.
 */
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define XB_MASKS (XB_WORDS / 64)   /* 16 x uint64 per page */

static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void cp4(uint8_t *d, const uint8_t *s) { memcpy(d, s, 4); }
static inline uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* bit j set = word j of the 16 words at a and b differs */
static inline uint32_t mask16(const uint8_t *a, const uint8_t *b)
{
#if defined(__SSE2__)
    __m128i e0 = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)a),
                                 _mm_loadu_si128((const __m128i *)b));
    __m128i e1 = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(a + 16)),
                                 _mm_loadu_si128((const __m128i *)(b + 16)));
    __m128i e2 = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(a + 32)),
                                 _mm_loadu_si128((const __m128i *)(b + 32)));
    __m128i e3 = _mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(a + 48)),
                                 _mm_loadu_si128((const __m128i *)(b + 48)));
    __m128i e = _mm_packs_epi16(_mm_packs_epi32(e0, e1), _mm_packs_epi32(e2, e3));
    return ~(uint32_t)_mm_movemask_epi8(e) & 0xFFFFu;
#else
    uint32_t m = 0;
    for (uint32_t j = 0; j < 16; j++)
        m |= (uint32_t)(ld32(a + 4 * j) != ld32(b + 4 * j)) << j;
    return m;
#endif
}

/* population count without the POPCNT instruction (not in baseline x86-64;
 * __builtin_popcountll would become a libgcc call) */
static inline uint32_t popcount64(uint64_t x)
{
    x = x - ((x >> 1) & 0x5555555555555555ull);
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
    return (uint32_t)((x * 0x0101010101010101ull) >> 56);
}

/* the page's changed-word map; returns the OR of its 16 words (0 = unchanged) */
static inline uint64_t change_mask(const uint8_t *a, const uint8_t *b, uint64_t mask[XB_MASKS])
{
    uint64_t any = 0;
    for (uint32_t i = 0; i < XB_MASKS; i++) {
        const uint8_t *x = a + 256 * i, *y = b + 256 * i;
        uint64_t m = (uint64_t)mask16(x, y) | (uint64_t)mask16(x + 64, y + 64) << 16 |
                     (uint64_t)mask16(x + 128, y + 128) << 32 |
                     (uint64_t)mask16(x + 192, y + 192) << 48;
        mask[i] = m;
        any |= m;
    }
    return any;
}

/* copy n words (small n inline, large n through memcpy) */
static inline void copy_words(uint8_t *d, const uint8_t *s, uint32_t n)
{
    if (n <= 8) {
        for (uint32_t k = 0; k < n; k++)
            cp4(d + 4 * k, s + 4 * k);
    } else {
        memcpy(d, s, 4 * (size_t)n);
    }
}

/* ------------------------------------------------------------ encoders */

static inline void put16(uint8_t *p, int16_t v) { uint16_t u = (uint16_t)v; p[0] = u & 0xFF; p[1] = u >> 8; }
static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = v & 0xFF; p[1] = (v >> 8) & 0xFF; p[2] = (v >> 16) & 0xFF; p[3] = v >> 24;
}

static inline void put64le(uint8_t *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(p, &v, 8);
#else
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
#endif
}

/* seed: FULL_PAGE record + 4096 bytes */
static size_t seed_full(const uint8_t *page, uint8_t *dst)
{
    put16(dst, SEED_FULL_PAGE);
    put32(dst + 2, 0);
    memcpy(dst + SEED_REC, page, XB_PAGE);
    return SEED_FULL_SIZE;
}

/* seed, cached page: BEGIN_PAGE + one delta per changed word in ascending
 * order, or FULL_PAGE when more than SEED_MAX_DELTAS words changed.
 * Leaves the new contents in the cached copy `old`. */
static size_t seed_delta(const uint8_t *page, uint8_t *old, uint8_t *dst)
{
    uint64_t mask[XB_MASKS];
    uint32_t k = 0;
    if (change_mask(page, old, mask))
        for (uint32_t i = 0; i < XB_MASKS; i++)
            k += popcount64(mask[i]);
    if (k > SEED_MAX_DELTAS) {
        memcpy(old, page, XB_PAGE);
        return seed_full(page, dst);
    }
    put16(dst, SEED_BEGIN_PAGE);
    put32(dst + 2, 0);
    size_t o = SEED_REC;
    for (uint32_t i = 0; i < XB_MASKS && k; i++) {
        uint64_t m = mask[i];
        if (!m)
            continue;
        /* the cached copy: unchanged words are equal, so a dense group is
         * copied whole; a sparse one word by word */
        if (popcount64(m) >= 16)
            memcpy(old + 256 * i, page + 256 * i, 256);
        else
            for (uint64_t r = m; r; r &= r - 1) {
                uint32_t w = 64 * i + (uint32_t)__builtin_ctzll(r);
                cp4(old + 4 * w, page + 4 * w);
            }
        for (; m; m &= m - 1) {
            uint32_t w = 64 * i + (uint32_t)__builtin_ctzll(m);
            /* one 8-byte little-endian store per 6-byte record; its last two
             * bytes are overwritten by the next record or lie within the
             * page's 4102-byte allowance (deltas end by byte 4098) */
            uint64_t rec = (uint64_t)(uint16_t)(4 * w) | (uint64_t)le32(page + 4 * w) << 16;
            put64le(dst + o, rec);
            o += SEED_REC;
        }
    }
    return o;
}

/* xen: 0x80 + 4096 bytes */
static size_t xen_full(const uint8_t *page, uint8_t *dst)
{
    dst[0] = XEN_FULL_PAGE;
    memcpy(dst + 1, page, XB_PAGE);
    return XEN_FULL_SIZE;
}

/* xen: a SKIP of n words as markers of at most 127 words each */
static inline size_t xen_skip(uint8_t *dst, uint32_t n)
{
    size_t o = 0;
    while (n > XEN_LENMASK) { dst[o++] = XEN_SKIPFLAG | XEN_LENMASK; n -= XEN_LENMASK; }
    if (n)
        dst[o++] = (uint8_t)(XEN_SKIPFLAG | n);
    return o;
}

/* xen: a RUN of n words as markers of at most 127 words, each with its words */
static inline size_t xen_run(uint8_t *dst, const uint8_t *words, uint32_t n)
{
    size_t o = 0;
    while (n) {
        uint32_t m = n > XEN_LENMASK ? XEN_LENMASK : n;
        dst[o++] = (uint8_t)m;
        copy_words(dst + o, words, m);
        o += 4 * m;
        words += 4 * m;
        n -= m;
    }
    return o;
}

/* xen: the RUN of words [rs, re) into dst, and into the cached copy */
static inline size_t xen_segment(uint8_t *dst, uint8_t *old, const uint8_t *page,
                                 uint32_t rs, uint32_t re)
{
    uint32_t n = re - rs;
    copy_words(old + 4 * rs, page + 4 * rs, n);
    if (n <= XEN_LENMASK) {                 /* one marker: the common case */
        dst[0] = (uint8_t)n;
        copy_words(dst + 1, page + 4 * rs, n);
        return 1 + 4 * (size_t)n;
    }
    return xen_run(dst, page + 4 * rs, n);
}

/* xen, cached page: alternating SKIP/RUN segments of maximal length, each
 * split into markers of <= 127 words, leading and trailing SKIPs included,
 * exactly as xc_compression.c's compress_page; an unchanged page is 0x00.
 * Worst case (every word changed) 8 x (1 + 508) + 1 + 32 = 4105 bytes.
 * Leaves the new contents in the cached copy `old`. */
static size_t xen_delta(const uint8_t *page, uint8_t *old, uint8_t *dst)
{
    uint64_t mask[XB_MASKS];
    if (!change_mask(page, old, mask)) {
        dst[0] = XEN_EMPTY_PAGE;
        return 1;
    }
    /* walk the changed words in order, growing the pending run [rs, re)
     * while they are consecutive; at each gap emit the SKIP before the run,
     * then the run */
    size_t o = 0;
    uint32_t done = 0, rs = 0, re = 0;
    for (uint32_t i = 0; i < XB_MASKS; i++) {
        uint64_t m = mask[i];
        if (m == ~0ull && re == 64 * i) {       /* 64 changed words extend the run */
            re += 64;
            continue;
        }
        while (m) {                             /* one step per run of set bits */
            uint32_t j = (uint32_t)__builtin_ctzll(m);
            uint64_t sh = ~(m >> j);            /* its lowest set bit ends the run */
            uint32_t len = sh ? (uint32_t)__builtin_ctzll(sh) : 64 - j;
            uint32_t w = 64 * i + j;
            if (w != re) {
                if (re > rs) {
                    o += xen_skip(dst + o, rs - done);
                    o += xen_segment(dst + o, old, page, rs, re);
                    done = re;
                }
                rs = w;
            }
            re = w + len;
            m = j + len >= 64 ? 0 : m & (~0ull << (j + len));
        }
    }
    o += xen_skip(dst + o, rs - done);
    o += xen_segment(dst + o, old, page, rs, re);
    o += xen_skip(dst + o, XB_WORDS - re);
    return o;
}

/* ------------------------------------------------------------ zero base */

/* 1 if the 4096 bytes at p are all zero. Exits at the first non-zero word
 * of the first line, else at the first non-zero 128-byte block: a page of
 * data costs one load, only a zero page is read whole. */
static inline int page_is_zero(const uint8_t *p)
{
    if (ld32(p) != 0)
        return 0;
#if defined(__SSE2__)
    const __m128i z = _mm_setzero_si128();
    for (uint32_t k = 0; k < XB_PAGE; k += 128) {
        const __m128i *q = (const __m128i *)(p + k);
        __m128i a = _mm_or_si128(_mm_or_si128(_mm_loadu_si128(q), _mm_loadu_si128(q + 1)),
                                 _mm_or_si128(_mm_loadu_si128(q + 2), _mm_loadu_si128(q + 3)));
        __m128i b = _mm_or_si128(_mm_or_si128(_mm_loadu_si128(q + 4), _mm_loadu_si128(q + 5)),
                                 _mm_or_si128(_mm_loadu_si128(q + 6), _mm_loadu_si128(q + 7)));
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_or_si128(a, b), z)) != 0xFFFF)
            return 0;
    }
    return 1;
#else
    for (uint32_t k = 0; k < XB_PAGE; k += 64) {
        uint64_t w[8];
        memcpy(w, p + k, 64);
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7])
            return 0;
    }
    return 1;
#endif
}

static inline int zk_test(const uint8_t *zk, uint64_t zbits, uint64_t pfn)
{
    return zk && pfn < zbits && ((zk[pfn >> 3] >> (pfn & 7)) & 1);
}

static inline void zk_set(uint8_t *zk, uint64_t zbits, uint64_t pfn, int on)
{
    if (zk && pfn < zbits) {
        uint8_t bit = (uint8_t)(1u << (pfn & 7));
        zk[pfn >> 3] = on ? (uint8_t)(zk[pfn >> 3] | bit) : (uint8_t)(zk[pfn >> 3] & ~bit);
    }
}

/*
 * n pages were sent whole in Format A (row i for pfns[i], in order): mark
 * each pfn < zbits known zero if its page is all zero, clear it otherwise.
 * Returns how many of the pages were all zero.
 */
size_t xb_note_raw(uint8_t *zknown, uint64_t zbits, const uint64_t *pfns, const uint8_t *pages,
                   size_t n)
{
    size_t zeros = 0;
    for (size_t i = 0; i < n; i++) {
        int z = page_is_zero(pages + i * (size_t)XB_PAGE);
        zeros += (size_t)z;
        zk_set(zknown, zbits, pfns[i], z);
    }
    return zeros;
}

/* worst-case bytes per page of each codec's encoding */
size_t xb_max_encoded(int codec)
{
    return codec == XB_SEED ? SEED_FULL_SIZE : XB_PAGE + 9;
}

/*
 * Encode n pages (rows of `pages`, pfn pfns[i], page-table flag pt[i] or
 * pt == NULL) into out, which holds at least n * xb_max_encoded(codec)
 * bytes. Returns the number of bytes written. Every page leaves the cache
 * holding its new contents at the head. zknown/zbits: the known-zero bitmap
 * (NULL/0: none); a miss whose bit is set and that is no page table is
 * encoded against a zero page when that is smaller than the page whole; the
 * bit of every pfn encoded is cleared (it is in the cache now).
 */
size_t xb_encode(xb_cache *c, int codec, const uint64_t *pfns, const uint8_t *pages,
                 const uint8_t *pt, size_t n, uint8_t *out, uint8_t *zknown, uint64_t zbits)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *page = pages + i * (size_t)XB_PAGE;
        int hit;
        uint32_t s = cache_get(c, pfns[i], &hit);
        uint8_t *old = c->data + (size_t)s * XB_PAGE;
        int zero = !hit && zk_test(zknown, zbits, pfns[i]);
        zk_set(zknown, zbits, pfns[i], 0);
        if (zero && !(pt && pt[i])) {
            /* a miss the receiver holds as zeros: a delta against a zero
             * page, or the page whole when the delta is not smaller (seed:
             * more than 682 words; xen: 4097 bytes or more) */
            memset(old, 0, XB_PAGE);
            size_t k = codec == XB_SEED ? seed_delta(page, old, out + o)
                                        : xen_delta(page, old, out + o);
            if (codec == XB_XEN && k >= XEN_FULL_SIZE)
                k = xen_full(page, out + o);   /* old already holds the page */
            if (codec == XB_SEED ? k < SEED_FULL_SIZE : k < XEN_FULL_SIZE)
                c->zero_base++;
            o += k;
        } else if (!hit || (pt && pt[i])) {
            memcpy(old, page, XB_PAGE);
            o += codec == XB_SEED ? seed_full(page, out + o) : xen_full(page, out + o);
        } else {
            o += codec == XB_SEED ? seed_delta(page, old, out + o) : xen_delta(page, old, out + o);
        }
    }
    return o;
}

/* ------------------------------------------------------------ decoders */

static inline int16_t get16(const uint8_t *p) { return (int16_t)(uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* a decoded page into the output rows: with SSE2 and an aligned row,
 * non-temporal stores (the rows are staged for later, not read now, and
 * streaming them skips the read-for-ownership of every line); xb_decode
 * ends with a store fence */
static inline void page_out(uint8_t *dst, const uint8_t *src)
{
#if defined(__SSE2__)
    if (((uintptr_t)dst & 15) == 0) {
        for (uint32_t k = 0; k < XB_PAGE; k += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + k));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + k + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + k + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + k + 48));
            _mm_stream_si128((__m128i *)(dst + k), a);
            _mm_stream_si128((__m128i *)(dst + k + 16), b);
            _mm_stream_si128((__m128i *)(dst + k + 32), c);
            _mm_stream_si128((__m128i *)(dst + k + 48), d);
        }
        return;
    }
#endif
    memcpy(dst, src, XB_PAGE);
}

static int64_t fail(xb_error *e, int code, size_t offset, size_t page, int64_t detail)
{
    e->code = code;
    e->offset = offset;
    e->page = page;
    e->detail = detail;
    return -1;
}

/* a full page at in[pos..pos+4096): into the cache (touch or insert) and out */
static void apply_full(xb_cache *c, uint64_t pfn, const uint8_t *src, uint8_t *dst)
{
    int hit;
    uint32_t s = cache_get(c, pfn, &hit);
    memcpy(c->data + (size_t)s * XB_PAGE, src, XB_PAGE);
    page_out(dst, src);
}

/* seed: records from pos; returns pages decoded or -1 with *e set */
static int64_t seed_decode(xb_cache *c, const uint8_t *in, size_t len, const uint64_t *pfns,
                           size_t npfns, uint8_t *out, size_t max_pages, xb_error *e,
                           uint8_t *zknown, uint64_t zbits)
{
    size_t pos = 0, i = 0;
    while (pos < len) {
        if (len - pos < SEED_REC)
            return fail(e, XB_E_TRUNC_RECORD, pos, i, (int64_t)(len - pos));
        int16_t off = get16(in + pos);
        uint32_t val = get32(in + pos + 2);
        if (off >= 0)
            return fail(e, XB_E_DELTA_OUTSIDE, pos, i, off);
        if (off != SEED_BEGIN_PAGE && off != SEED_FULL_PAGE)
            return fail(e, XB_E_BAD_OFFSET, pos, i, off);
        if (val != 0)
            return fail(e, XB_E_MARKER_VALUE, pos, i, val);
        if (i >= npfns || i >= max_pages)
            return fail(e, XB_E_TOO_MANY_PAGES, pos, i, (int64_t)npfns);
        uint8_t *dst = out + i * (size_t)XB_PAGE;
        if (off == SEED_FULL_PAGE) {
            if (len - pos < SEED_FULL_SIZE)
                return fail(e, XB_E_TRUNC_FULL, pos, i, (int64_t)(len - pos - SEED_REC));
            apply_full(c, pfns[i], in + pos + SEED_REC, dst);
            zk_set(zknown, zbits, pfns[i], 0);
            pos += SEED_FULL_SIZE;
            i++;
            continue;
        }
        /* BEGIN_PAGE: a base (cached, or known zero), then validate the
         * deltas up to the next marker or the end */
        uint32_t s = cache_find(c, pfns[i]);
        if (s == XB_NIL && !zk_test(zknown, zbits, pfns[i]))
            return fail(e, XB_E_NO_BASE, pos, i, (int64_t)pfns[i]);
        size_t q = pos + SEED_REC;
        int32_t prev = -1;
        while (q < len) {
            if (len - q < SEED_REC)
                return fail(e, XB_E_TRUNC_RECORD, q, i, (int64_t)(len - q));
            int16_t d = get16(in + q);
            if (d < 0) {
                if (d == SEED_BEGIN_PAGE || d == SEED_FULL_PAGE)
                    break;
                return fail(e, XB_E_BAD_OFFSET, q, i, d);
            }
            if (d >= (int32_t)XB_PAGE)
                return fail(e, XB_E_OUT_OF_PAGE, q, i, d);
            if (d & 3)
                return fail(e, XB_E_MISALIGNED, q, i, d);
            if (d <= prev)
                return fail(e, XB_E_NOT_ASCENDING, q, i, d);
            prev = d;
            q += SEED_REC;
        }
        /* apply: to the cached copy (a hit) or to a zero page in the slot a
         * miss takes (the zero base) */
        s = delta_slot(c, s, pfns[i], NULL);
        uint8_t *base = c->data + (size_t)s * XB_PAGE;
        for (size_t r = pos + SEED_REC; r < q; r += SEED_REC)
            memcpy(base + get16(in + r), in + r + 2, 4);
        zk_set(zknown, zbits, pfns[i], 0);
        page_out(dst, base);
        pos = q;
        i++;
    }
    return (int64_t)i;
}

/* xen: pages of one-byte markers; returns pages decoded or -1 with *e set */
static int64_t xen_decode(xb_cache *c, const uint8_t *in, size_t len, const uint64_t *pfns,
                          size_t npfns, uint8_t *out, size_t max_pages, xb_error *e,
                          uint8_t *zknown, uint64_t zbits)
{
    size_t pos = 0, i = 0;
    while (pos < len) {
        uint8_t m = in[pos];
        if (i >= npfns || i >= max_pages)
            return fail(e, XB_E_TOO_MANY_PAGES, pos, i, (int64_t)npfns);
        uint8_t *dst = out + i * (size_t)XB_PAGE;
        if (m == XEN_FULL_PAGE) {
            if (len - pos < XEN_FULL_SIZE)
                return fail(e, XB_E_TRUNC_FULL, pos, i, (int64_t)(len - pos - 1));
            apply_full(c, pfns[i], in + pos + 1, dst);
            zk_set(zknown, zbits, pfns[i], 0);
            pos += XEN_FULL_SIZE;
            i++;
            continue;
        }
        /* a hit decodes in its slot; a known-zero miss against a zero page
         * on the stack, which enters the cache only once the page is valid;
         * any other miss has no base */
        uint32_t s = cache_find(c, pfns[i]);
        if (s == XB_NIL && !zk_test(zknown, zbits, pfns[i]))
            return fail(e, XB_E_NO_BASE, pos, i, (int64_t)pfns[i]);
        uint8_t zpage[XB_PAGE];
        uint8_t *base;
        if (s != XB_NIL) {
            base = c->data + (size_t)s * XB_PAGE;
        } else {
            memset(zpage, 0, XB_PAGE);
            base = zpage;
        }
        size_t q = pos;
        if (m == XEN_EMPTY_PAGE) {
            q++;
        } else {
            /* one pass: check each marker, apply each RUN to the cached
             * copy at once, keeping the words it overwrote in `undo`; if the
             * page turns out malformed, put them back before failing, so a
             * page reaches the cache only when it covers exactly 4096 bytes */
            uint8_t undo[XB_PAGE];
            uint32_t pp = 0;
            int code = XB_E_OK;
            int64_t detail = 0;
            while (pp < XB_PAGE) {
                if (q >= len) {
                    code = XB_E_TRUNC_PAGE, detail = pp;
                    break;
                }
                uint8_t k = in[q];
                uint32_t n = 4u * (k & XEN_LENMASK);
                if (n == 0) {
                    code = XB_E_ZERO_LENGTH, detail = k;
                    break;
                }
                if (pp + n > XB_PAGE) {
                    code = (k & XEN_SKIPFLAG) ? XB_E_SKIP_PAST_END : XB_E_RUN_PAST_END;
                    detail = pp + n;
                    break;
                }
                if (!(k & XEN_SKIPFLAG)) {
                    if (n > len - q - 1) {
                        code = XB_E_TRUNC_RUN, detail = n;
                        break;
                    }
                    copy_words(undo + pp, base + pp, n / 4);
                    copy_words(base + pp, in + q + 1, n / 4);
                    q += n;
                }
                q += 1;
                pp += n;
            }
            if (code != XB_E_OK) {
                /* replay the page's RUNs' ranges from undo (markers before q are valid) */
                uint32_t up = 0;
                for (size_t r = pos; r < q;) {
                    uint8_t k = in[r];
                    uint32_t n = 4u * (k & XEN_LENMASK);
                    if (!(k & XEN_SKIPFLAG)) {
                        copy_words(base + up, undo + up, n / 4);
                        r += n;
                    }
                    r += 1;
                    up += n;
                }
                return fail(e, code, q, i, detail);
            }
        }
        if (s == XB_NIL)  /* decoded against zeros in zpage: now it takes a slot */
            base = c->data + (size_t)delta_slot(c, s, pfns[i], zpage) * XB_PAGE;
        else
            delta_slot(c, s, pfns[i], NULL);
        zk_set(zknown, zbits, pfns[i], 0);
        page_out(dst, base);
        pos = q;
        i++;
    }
    return (int64_t)i;
}

/*
 * Decode the blob in[0..len) into rows of out (max_pages rows). Page i
 * belongs to pfns[i]. zknown/zbits: the receiver's known-zero bitmap (NULL/0:
 * none, so every delta page for a missing pfn is XB_E_NO_BASE); the bit of
 * every pfn decoded is cleared. Returns the number of pages, or -1 with *e
 * set; pages decoded before the error have been applied to the cache and
 * the bitmap, the failing page to neither.
 */
int64_t xb_decode(xb_cache *c, int codec, const uint8_t *in, size_t len, const uint64_t *pfns,
                  size_t npfns, uint8_t *out, size_t max_pages, xb_error *e,
                  uint8_t *zknown, uint64_t zbits)
{
    e->code = XB_E_OK;
    int64_t k = codec == XB_SEED
                    ? seed_decode(c, in, len, pfns, npfns, out, max_pages, e, zknown, zbits)
                    : xen_decode(c, in, len, pfns, npfns, out, max_pages, e, zknown, zbits);
#if defined(__SSE2__)
    _mm_sfence();   /* order the streamed rows before Python reads them */
#endif
    return k;
}
