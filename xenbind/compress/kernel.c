/*
 * xenbind/compress/kernel.c: the page cache and both codecs' hot loops.
 *
 * Built by xenbind/_codec_build.py (cffi API mode) into xenbind._codec.
 * Python owns every buffer (numpy arrays, bytes); this file owns no memory.
 *
 * The cache (the sender's, one per Compressor)
 *   data[cap][4096]  the last contents sent for the pfn held by each slot
 *   pfn[cap]         the pfn a slot holds (valid for slots < used)
 *   prev/next[cap]   doubly linked LRU list of slots, head = most recently
 *                    used, tail = least recently used; NIL ends it
 *   table[tsize]     open-addressing hash pfn -> slot+1 (0 = empty),
 *                    linear probing, backward-shift deletion, tsize a power
 *                    of two >= 2 * cap
 * Rules: lookup of a present pfn moves it to the head ("touch"). A missing
 * pfn takes slot `used` while the cache is not full, else the tail slot
 * (evicting its pfn), and goes to the head. The cache tells the encoder
 * what the receiver holds: the receiver holds every page the sender sent
 * (it commits each checkpoint whole), so a cached page's copy equals the
 * receiver's copy, the base it decodes a delta page against.
 *
 * Zero base (encoder): a pfn the cache does not hold (a miss) may still be
 * sent as a delta page (seed BEGIN_PAGE + deltas, xen 0x00 or markers)
 * against an all-zero page, when the sender knows the receiver holds it as
 * zeros: a known-zero bitmap `zknown` of the pfns last sent whole in Format
 * A and all zero (xb_note_raw), and not sent in Format B since (xb_encode
 * clears the bit of every pfn it encodes). Used only when the delta is
 * smaller than the page whole. zero_base counts such pages. zknown is
 * bit-packed (bit pfn & 7 of byte pfn >> 3), zbits bits long; pfns >= zbits
 * are unknown (never known zero).
 *
 * The receiver (xb_scan, xb_apply below; xb_decode_from, the fused decode
 * that reads each base in place) keeps no cache and no bitmap: it decodes
 * every delta page in place on its own copy of the page.
 * Codec ids: XB_SEED = 1, XB_XEN = 2 (layouts in xenbind/compress/formats.py,
 * repeated beside the functions below).
 *
 * The decoders parse untrusted bytes: every read is checked against len,
 * every write against the page (4096) and the output rows. A page is
 * valid only if it covers exactly 4096 bytes; xb_scan validates the whole
 * blob before xb_apply writes a byte.
 * tests/xenbind/compress/test_kernel_sanitizers.py runs this file under
 * ASan and UBSan.
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
/* xb_scan walks a xen blob from marker to marker: over a page of long RUNs
 * that is one load per ~500 bytes, each waiting on the one before (the
 * hardware prefetcher does not follow it), ~3 ms per 32 MiB. After a RUN of
 * at least XEN_SCAN_LONG_RUN bytes it prefetches XEN_SCAN_AHEAD bytes past
 * the next marker, where the marker a page later usually is (0.4 ms). */
#define XEN_SCAN_LONG_RUN 256u
#define XEN_SCAN_AHEAD XB_PAGE

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
    XB_E_NO_BASE = 9,           /* retired: the old mirror's "no base" (the receiver now
                                 * decodes on its own pages: every pfn has one) */
    XB_E_TOO_MANY_PAGES = 10,   /* more pages in the blob than pfns given */
    XB_E_ZERO_LENGTH = 11,      /* xen: zero-length marker inside a page */
    XB_E_RUN_PAST_END = 12,     /* xen: RUN beyond byte 4096 of the page */
    XB_E_SKIP_PAST_END = 13,    /* xen: SKIP beyond byte 4096 of the page */
    XB_E_TRUNC_RUN = 14,        /* xen: RUN's words cut off by the blob's end */
    XB_E_TRUNC_PAGE = 15,       /* xen: blob ended before the page covered 4096 bytes */
    XB_E_OUT_OF_STEP = 16,      /* xb_apply: starts/delta are not what xb_scan found */
    XB_E_BAD_BASE = 17,         /* xb_decode_from: a base row past its source's rows */
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

/* what xb_scan says of each page (its delta[] entries) */
#define XB_D_WHOLE 0     /* sent whole (seed FULL_PAGE, xen 0x80): needs no base */
#define XB_D_BASE 1      /* a delta applied on its base: needs the receiver's page */
#define XB_D_COVERED 2   /* xen: RUNs over the whole page, no SKIP: needs no base */

/*
 * The receiver decodes in place on its own copy of each page, as Xen's
 * restore does (apply_batch -> xc_compression_uncompress_page on the mapped
 * guest page): the base of a delta page is what the receiver holds for its
 * pfn, whatever the sender's cache held or evicted. It keeps no cache.
 *
 * Two calls per blob, so the caller can fetch the bases in between:
 *   xb_scan   parses and validates the whole blob without writing a page:
 *             the number of pages k, where each page starts, and what each
 *             page needs (XB_D_*): a base (seed BEGIN_PAGE, xen 0x00 or
 *             markers with a SKIP), or none (seed FULL_PAGE, xen 0x80, and
 *             xen markers that are all RUNs: a page every word of which
 *             changed, which costs a gather it would overwrite).
 *   xb_apply  given out[0..m) = the bases of the m pages that need one, in
 *             blob order, writes page i into out[i] for every i < k, in
 *             place: it walks the pages backwards, so the base of the j-th
 *             such page (row j <= i) is still intact when page i is
 *             written. A covered page is assembled in a 4 KiB buffer on the
 *             stack and streamed to its row, as a whole page is.
 *             It checks every read against the blob and every write against
 *             out's rows again (it trusts nothing scan produced), so any
 *             arguments are memory-safe; inconsistent ones only fail.
 * A page is valid only if it covers exactly 4096 bytes.
 */

static inline int16_t get16(const uint8_t *p) { return (int16_t)(uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* a whole page into an output row: with SSE2 and an aligned row,
 * non-temporal stores (the rows are staged for later, not read now, and
 * streaming them skips the read-for-ownership of every line); xb_apply
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

/*
 * One page of the blob at in[pos..len), page index i, of which `room` are
 * allowed (i >= room: XB_E_TOO_MANY_PAGES, once the page's first marker is
 * read): check it and, when `page` is not NULL, apply it there (a delta onto the base `page` holds, a whole page
 * over it). Returns the offset just past the page, or -1 with *e set (page
 * index i). *delta tells which kind it was. With page == NULL nothing is
 * written, so a failing page leaves no trace.
 */
static int64_t seed_page(const uint8_t *in, size_t len, size_t pos, size_t i, size_t room,
                         uint8_t *page, int *delta, xb_error *e)
{
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
    if (i >= room)
        return fail(e, XB_E_TOO_MANY_PAGES, pos, i, (int64_t)room);
    if (off == SEED_FULL_PAGE) {
        if (len - pos < SEED_FULL_SIZE)
            return fail(e, XB_E_TRUNC_FULL, pos, i, (int64_t)(len - pos - SEED_REC));
        if (page)
            page_out(page, in + pos + SEED_REC);
        *delta = XB_D_WHOLE;
        return (int64_t)(pos + SEED_FULL_SIZE);
    }
    /* BEGIN_PAGE: deltas up to the next marker or the end, validated first */
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
        if (page)   /* applying: a failure later in the page leaves out undefined */
            memcpy(page + d, in + q + 2, 4);
        q += SEED_REC;
    }
    *delta = XB_D_BASE;
    return (int64_t)q;
}

static int64_t xen_page(const uint8_t *in, size_t len, size_t pos, size_t i, size_t room,
                        uint8_t *page, int *delta, xb_error *e)
{
    uint8_t m = in[pos];
    if (i >= room)
        return fail(e, XB_E_TOO_MANY_PAGES, pos, i, (int64_t)room);
    if (m == XEN_FULL_PAGE) {
        if (len - pos < XEN_FULL_SIZE)
            return fail(e, XB_E_TRUNC_FULL, pos, i, (int64_t)(len - pos - 1));
        if (page)
            page_out(page, in + pos + 1);
        *delta = XB_D_WHOLE;
        return (int64_t)(pos + XEN_FULL_SIZE);
    }
    *delta = XB_D_BASE;
    if (m == XEN_EMPTY_PAGE)   /* unchanged: the base as it is */
        return (int64_t)(pos + 1);
    size_t q = pos;
    uint32_t pp = 0;
    uint8_t markers = 0;   /* the OR of the page's markers: SKIPFLAG if any SKIP */
    while (pp < XB_PAGE) {
        if (q >= len)
            return fail(e, XB_E_TRUNC_PAGE, q, i, pp);
        uint8_t k = in[q];
        uint32_t n = 4u * (k & XEN_LENMASK);
        if (n == 0)
            return fail(e, XB_E_ZERO_LENGTH, q, i, k);
        if (pp + n > XB_PAGE)
            return fail(e, (k & XEN_SKIPFLAG) ? XB_E_SKIP_PAST_END : XB_E_RUN_PAST_END, q, i,
                        pp + n);
        if (!(k & XEN_SKIPFLAG)) {
            if (n > len - q - 1)
                return fail(e, XB_E_TRUNC_RUN, q, i, n);
            if (page)
                copy_words(page + pp, in + q + 1, n / 4);
            else if (n >= XEN_SCAN_LONG_RUN && len - q > n + XEN_SCAN_AHEAD)
                __builtin_prefetch(in + q + n + XEN_SCAN_AHEAD);   /* see XEN_SCAN_AHEAD */
            q += n;
        }
        markers |= k;
        q += 1;
        pp += n;
    }
    if (!(markers & XEN_SKIPFLAG))   /* RUNs over all 4096 bytes: the base is never read */
        *delta = XB_D_COVERED;
    return (int64_t)q;
}

/* (in, len, pos, page index, pages allowed, page or NULL, *delta, e) */
typedef int64_t (*page_fn)(const uint8_t *, size_t, size_t, size_t, size_t, uint8_t *, int *,
                           xb_error *);

/*
 * Scan the blob in[0..len): its pages belong to the first pfns listed
 * (npfns of them), at most max_pages are expected. Fills starts[i] (the
 * offset of page i) and delta[i] (XB_D_BASE: needs a base; XB_D_WHOLE,
 * XB_D_COVERED: needs none) for every page. Returns the number of pages k, or -1 with *e set (nothing
 * written but starts/delta). starts and delta hold max_pages entries.
 */
int64_t xb_scan(int codec, const uint8_t *in, size_t len, size_t npfns, size_t max_pages,
                uint64_t *starts, uint8_t *delta, xb_error *e)
{
    page_fn step = codec == XB_SEED ? seed_page : xen_page;
    size_t pos = 0, i = 0;
    e->code = XB_E_OK;
    while (pos < len) {
        int d = 0;
        /* past npfns (or the rows the caller holds): "more pages than pfns" */
        int64_t next = step(in, len, pos, i, npfns < max_pages ? npfns : max_pages, NULL, &d, e);
        if (next < 0) {
            if (e->code == XB_E_TOO_MANY_PAGES)
                e->detail = (int64_t)npfns;
            return -1;
        }
        starts[i] = pos;
        delta[i] = (uint8_t)d;
        pos = (size_t)next;
        i++;
    }
    return (int64_t)i;
}

/*
 * Apply the k pages scanned by xb_scan (starts, delta) into out (rows
 * rows of 4096 bytes): rows 0..m) hold, on entry, the bases of the m
 * XB_D_BASE pages in blob order; on return row i holds page i. Returns 0, or -1 with
 * *e set (out is then undefined). Every read of in and every write of out is
 * bounds-checked here again.
 */
int64_t xb_apply(int codec, const uint8_t *in, size_t len, const uint64_t *starts,
                 const uint8_t *delta, size_t k, uint8_t *out, size_t rows, xb_error *e)
{
    page_fn step = codec == XB_SEED ? seed_page : xen_page;
    size_t m = 0;
    e->code = XB_E_OK;
    if (k > rows)
        return fail(e, XB_E_TOO_MANY_PAGES, 0, rows, (int64_t)rows);
    for (size_t i = 0; i < k; i++)
        m += delta[i] == XB_D_BASE ? 1 : 0;
    int64_t rc = 0;
    _Alignas(64) uint8_t covered[XB_PAGE];
    /* With bases: backwards, so that a base moved to a later row is still
     * intact, and the rows gathered last (still in the cache) come first.
     * Without: forwards, the order the blob and the rows are laid out in
     * (the hardware prefetches it; backwards costs ~2x on whole pages). */
    int back = m != 0;
    for (size_t n = 0; n < k; n++) {
        size_t i = back ? k - 1 - n : n;
        size_t pos = (size_t)starts[i];
        if (pos >= len) {
            rc = fail(e, XB_E_OUT_OF_STEP, pos, i, 0);
            break;
        }
        uint8_t *row = out + i * (size_t)XB_PAGE;
        int want = delta[i], got = 0;
        if (want == XB_D_BASE && back) {
            size_t j = --m;          /* this page's base row: j <= i */
            if (j != i)
                memcpy(row, out + j * (size_t)XB_PAGE, XB_PAGE);
        }
        if (step(in, len, pos, i, k, want == XB_D_COVERED ? covered : row, &got, e) < 0) {
            rc = -1;
            break;
        }
        if (got != want) {          /* not the kind scan saw: arguments out of step */
            rc = fail(e, XB_E_OUT_OF_STEP, pos, i, 0);
            break;
        }
        if (want == XB_D_COVERED)
            page_out(row, covered);
    }
#if defined(__SSE2__)
    _mm_sfence();   /* order the streamed rows before Python reads them */
#endif
    return rc;
}

/*
 * The fused decode: one pass over the blob that validates each page and
 * writes it to its row, reading its base where it is, not gathered into out
 * first and not scanned beforehand (what xb_scan + xb_apply do for a base
 * source that is a function). The base of page i is row r of source s,
 * where s = seg[i] and r = row[i], or (seg == NULL) s = 0 and r = pfns[i]:
 * source 0 is the receiver's committed memory, indexed by pfn; the others
 * are pages staged after it (the caller says, per page, which holds the
 * latest copy); s == XB_SEG_ZERO is a zero page. srcs[s] holds src_rows[s]
 * rows of 4096 bytes; pfns (and seg, row) hold npfns entries.
 *
 * A base is read only where the page keeps words of it: seed BEGIN_PAGE
 * (copied into a 4 KiB buffer, the deltas applied there), xen 0x00 (the
 * base streamed to the row) and xen SKIPs (at the first SKIP the rest of
 * the base is copied into the buffer; the RUNs' words come from the blob).
 * A whole page and a xen page of RUNs only read none. Every page is streamed from the buffer
 * (or the blob) to its row with non-temporal stores. A base row past its
 * source fails with XB_E_BAD_BASE (detail the row) when the page needs it.
 *
 * Returns the number of pages k and fills delta[i] (XB_D_*) for each, or -1
 * with *e set. On failure out is undefined (rows before the failing page
 * are written): the caller discards it, as after any decode error. out must
 * not overlap a source (the caller checks). Nothing here writes anything
 * but out, delta and *e.
 */
#define XB_SEG_ZERO 0xFFFFFFFFu

static const uint8_t xb_zero_page[XB_PAGE];

/* page i's base, or NULL (with *r its row) when it lies past its source */
static inline const uint8_t *base_of(const uint8_t *const *srcs, const uint64_t *src_rows,
                                     size_t nsrc, const uint64_t *pfns, const uint32_t *seg,
                                     const uint64_t *row, size_t i, uint64_t *r)
{
    uint32_t s = seg ? seg[i] : 0;
    *r = seg ? row[i] : pfns[i];
    if (s == XB_SEG_ZERO)
        return xb_zero_page;
    if (s >= nsrc || *r >= src_rows[s])
        return NULL;
    return srcs[s] + (size_t)*r * XB_PAGE;
}

/* xen page i at in[pos..len) into dst, SKIPs from base (NULL: fails if read) */
static int64_t xen_page_from(const uint8_t *in, size_t len, size_t pos, size_t i, size_t room,
                             uint8_t *dst, uint8_t *buf, const uint8_t *base, uint64_t r,
                             int *delta, xb_error *e)
{
    uint8_t m = in[pos];
    if (i >= room)
        return fail(e, XB_E_TOO_MANY_PAGES, pos, i, (int64_t)room);
    if (m == XEN_FULL_PAGE) {
        if (len - pos < XEN_FULL_SIZE)
            return fail(e, XB_E_TRUNC_FULL, pos, i, (int64_t)(len - pos - 1));
        page_out(dst, in + pos + 1);
        *delta = XB_D_WHOLE;
        return (int64_t)(pos + XEN_FULL_SIZE);
    }
    *delta = XB_D_BASE;
    if (m == XEN_EMPTY_PAGE) {   /* unchanged: the base as it is */
        if (!base)
            return fail(e, XB_E_BAD_BASE, pos, i, (int64_t)r);
        page_out(dst, base);
        return (int64_t)(pos + 1);
    }
    size_t q = pos;
    uint32_t pp = 0;
    uint8_t markers = 0;
    int based = 0;   /* buf[pp..) holds the base since the first SKIP */
    while (pp < XB_PAGE) {
        if (q >= len)
            return fail(e, XB_E_TRUNC_PAGE, q, i, pp);
        uint8_t k = in[q];
        uint32_t n = 4u * (k & XEN_LENMASK);
        if (n == 0)
            return fail(e, XB_E_ZERO_LENGTH, q, i, k);
        if (pp + n > XB_PAGE)
            return fail(e, (k & XEN_SKIPFLAG) ? XB_E_SKIP_PAST_END : XB_E_RUN_PAST_END, q, i,
                        pp + n);
        if (!(k & XEN_SKIPFLAG)) {
            if (n > len - q - 1)
                return fail(e, XB_E_TRUNC_RUN, q, i, n);
            copy_words(buf + pp, in + q + 1, n / 4);
            q += n;
        } else if (!based) {
            /* the rest of the base at the first SKIP, in one copy: the later
             * SKIPs cost nothing (one copy per SKIP made a page of 1-word
             * runs and skips cost half again) and the RUNs overwrite it */
            if (!base)
                return fail(e, XB_E_BAD_BASE, q, i, (int64_t)r);
            memcpy(buf + pp, base + pp, XB_PAGE - pp);
            based = 1;
        }
        markers |= k;
        q += 1;
        pp += n;
    }
    if (!(markers & XEN_SKIPFLAG))
        *delta = XB_D_COVERED;
    page_out(dst, buf);
    return (int64_t)q;
}

int64_t xb_decode_from(int codec, const uint8_t *in, size_t len, size_t npfns, size_t max_pages,
                       const uint8_t *const *srcs, const uint64_t *src_rows, size_t nsrc,
                       const uint64_t *pfns, const uint32_t *seg, const uint64_t *row,
                       uint8_t *out, size_t rows, uint8_t *delta, xb_error *e)
{
    size_t room = npfns < max_pages ? npfns : max_pages;
    size_t pos = 0, i = 0;
    int64_t rc = 0;
    _Alignas(64) uint8_t buf[XB_PAGE];
    e->code = XB_E_OK;
    while (pos < len) {
        int d = 0;
        int64_t next;
        /* room <= rows too: a page past either is "more pages than pfns" */
        size_t lim = room < rows ? room : rows;
        uint8_t *dst = out + (i < lim ? i : 0) * (size_t)XB_PAGE;
        uint64_t r = 0;
        const uint8_t *base =
            i < lim ? base_of(srcs, src_rows, nsrc, pfns, seg, row, i, &r) : NULL;
        if (codec == XB_XEN) {
            next = xen_page_from(in, len, pos, i, lim, dst, buf, base, r, &d, e);
        } else if (i < lim && len - pos >= SEED_REC && get16(in + pos) == SEED_BEGIN_PAGE &&
                   get32(in + pos + 2) == 0) {
            if (!base) {
                rc = fail(e, XB_E_BAD_BASE, pos, i, (int64_t)r);
                break;
            }
            memcpy(buf, base, XB_PAGE);
            next = seed_page(in, len, pos, i, lim, buf, &d, e);
            if (next >= 0)
                page_out(dst, buf);
        } else {   /* FULL_PAGE (streamed to dst) or an error before any write */
            next = seed_page(in, len, pos, i, lim, dst, &d, e);
        }
        if (next < 0) {
            if (e->code == XB_E_TOO_MANY_PAGES)
                e->detail = (int64_t)npfns;
            rc = -1;
            break;
        }
        delta[i] = (uint8_t)d;
        pos = (size_t)next;
        i++;
    }
#if defined(__SSE2__)
    _mm_sfence();
#endif
    return rc < 0 ? rc : (int64_t)i;
}

/* ------------------------------------------------------------ gather */

/*
 * out[i] = src[idx[i]] for i < n, 4096 bytes each: the gather of a chunk's
 * bases from a memory image (numpy's take copies rows item by item, at a
 * third of memcpy's speed). Every index is checked against rows before
 * anything is copied: returns -1 (nothing written) if one is out of range,
 * else 0.
 */
int64_t xb_gather(const uint8_t *src, size_t rows, const uint64_t *idx, size_t n, uint8_t *out)
{
    for (size_t i = 0; i < n; i++)
        if (idx[i] >= rows)
            return -1;
    for (size_t i = 0; i < n; i++)
        memcpy(out + i * (size_t)XB_PAGE, src + (size_t)idx[i] * XB_PAGE, XB_PAGE);
    return 0;
}
