"""The C kernel under AddressSanitizer and UndefinedBehaviorSanitizer.

The decoders parse untrusted bytes. This test compiles xenbind/compress/kernel.c
into a small C harness with -fsanitize=address,undefined, every buffer
allocated to its exact size, and runs: random encode/decode round trips (the
harness checks the decoded pages), with pages sent whole "in Format A" before
the first batch (xb_note_raw on the sender; zeroed pages make zero-base
misses), the receiver decoding each blob in place on its own copy of the
pages (xb_scan, the bases gathered, xb_apply), then each blob mutated (byte
flips, truncation, garbage) scanned and applied into exactly-sized buffers,
and xb_apply also given scan results that were tampered with (it must check
everything itself). Every decode is also run fused (xb_decode_from: one pass, the
bases read in place from exact-size sources, committed rows, a staged page
and zero pages): it must refuse what xb_scan refuses and otherwise equal
gather + xb_apply, page kinds included; a base row past its source must be
refused (XB_E_BAD_BASE at that page). Any out-of-bounds read or write, or undefined behaviour,
aborts the harness.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

KERNEL = Path(__file__).resolve().parents[3] / "xenbind" / "compress" / "kernel.c"

HARNESS = r"""
#include "kernel.c"
#include <stdio.h>
#include <stdlib.h>

static uint64_t rs = 88172645463325252ull;
static uint64_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }

static void cache_new(xb_cache *c, uint32_t cap)
{
    uint32_t tsize = 2;
    while (tsize < 2 * cap) tsize <<= 1;
    memset(c, 0, sizeof *c);
    c->data = calloc((size_t)cap, XB_PAGE);
    c->pfn = calloc(cap, sizeof(uint64_t));
    c->prev = malloc(cap * sizeof(uint32_t));
    c->next = malloc(cap * sizeof(uint32_t));
    c->table = calloc(tsize, sizeof(uint32_t));
    memset(c->prev, 0xFF, cap * sizeof(uint32_t));
    memset(c->next, 0xFF, cap * sizeof(uint32_t));
    c->cap = cap; c->head = c->tail = XB_NIL; c->tmask = tsize - 1;
}

static void cache_free(xb_cache *c)
{
    free(c->data); free(c->pfn); free(c->prev); free(c->next); free(c->table);
}

/* the receiver: its page for small index p (pfn = p * mul) */
static uint8_t rmem[12][XB_PAGE];

static long fused_checked = 0, bad_base = 0;
static uint8_t *fused_exact(int codec, const uint8_t *in, size_t len, const uint8_t *scan_delta,
                            int64_t k, const uint32_t *idx, size_t n, int *kinds_ok);

/* decode a copy of blob[0..len) into exactly-sized buffers, on the
 * receiver's pages; *out_pages (malloc'ed, k rows) gets the result. With
 * tamper, the scan results are garbled before xb_apply (which must cope). */
static int64_t decode_exact(int codec, const uint8_t *blob, size_t len, const uint64_t *pfns,
                            const uint32_t *idx, size_t n, int tamper, uint8_t **out_pages,
                            int *code)
{
    uint8_t *in = malloc(len ? len : 1);
    memcpy(in, blob, len);
    size_t minp = codec == XB_SEED ? 6 : 1;
    size_t rows = n < len / minp ? n : len / minp;
    uint64_t *starts = malloc(rows ? rows * 8 : 8);
    uint8_t *delta = malloc(rows ? rows : 1);
    xb_error e;
    *out_pages = NULL;
    int64_t k = xb_scan(codec, in, len, n, rows, starts, delta, &e);
    *code = k < 0 ? e.code : 0;
    if (k < 0) {   /* a blob the scan refuses: the fused decode must refuse it too */
        int kinds_ok = 1;
        uint8_t *fused = fused_exact(codec, in, len, delta, k, idx, n, &kinds_ok);
        if (fused || !kinds_ok) {
            fprintf(stderr, "fused decode accepted a blob xb_scan refuses\n");
            exit(1);
        }
    }
    if (k >= 0) {
        int kinds_ok = 1;
        uint8_t *fused = fused_exact(codec, in, len, delta, k, idx, n, &kinds_ok);
        uint8_t *out = malloc(k ? (size_t)k * XB_PAGE : 1);
        size_t m = 0;
        for (int64_t i = 0; i < k; i++)
            if (delta[i] == 1)   /* XB_D_BASE: the pages that read their base */
                memcpy(out + (m++) * XB_PAGE, rmem[idx[i]], XB_PAGE);
        if (tamper && k) {
            if (rnd() & 1) starts[rnd() % k] = rnd() % (len + 8);
            else delta[rnd() % k] ^= 1 + rnd() % 3;
        }
        if (xb_apply(codec, in, len, starts, delta, (size_t)k, out, (size_t)k, &e) < 0) {
            *code = e.code;
            k = -1;
            free(out);
        } else {
            *out_pages = out;
        }
        if (!kinds_ok) {
            fprintf(stderr, "fused decode: page kinds differ from the scan's\n");
            exit(1);
        }
        if (!tamper && (k < 0) != (fused == NULL)) {
            fprintf(stderr, "fused decode %s where xb_apply %s\n", fused ? "succeeded" : "failed",
                    k < 0 ? "failed" : "succeeded");
            exit(1);
        }
        if (!tamper && fused && k > 0 && memcmp(fused, out, (size_t)k * XB_PAGE) != 0) {
            fprintf(stderr, "fused decode differs from gather + xb_apply\n");
            exit(1);
        }
        free(fused);
    }
    free(in); free(starts); free(delta);
    (void)pfns;
    return k;
}

/* The fused decode (xb_decode_from) of the same blob, every buffer exact:
 * the receiver's committed pages as source 0 (row idx[i]), one page staged
 * over them as source 1 (a copy of the page it replaces), and a pfn whose
 * page is zero read as the zero page. When it decodes, the same call with
 * the base row of a page that reads its base (scan's delta[j] == 1) past its
 * source must fail with XB_E_BAD_BASE. Returns the k decoded rows (malloc'ed)
 * or NULL if the decode failed; *kinds_ok whether it failed exactly when the
 * scan (k < 0) did, with the scan's page kinds. */
static uint8_t *fused_exact(int codec, const uint8_t *in, size_t len, const uint8_t *scan_delta,
                            int64_t k, const uint32_t *idx, size_t n, int *kinds_ok)
{
    uint8_t *mem = malloc(12 * XB_PAGE), *stg = malloc(XB_PAGE);
    memcpy(mem, rmem, 12 * XB_PAGE);
    const uint8_t *srcs[2] = {mem, stg};
    uint64_t src_rows[2] = {12, 1};
    uint64_t *pfns = malloc(n ? n * 8 : 8), *row = malloc(n ? n * 8 : 8);
    uint32_t *seg = malloc(n ? n * 4 : 4);
    int staged = 0;
    for (size_t i = 0; i < n; i++) {
        pfns[i] = idx[i];
        seg[i] = 0;
        row[i] = idx[i];
        uint32_t z = 1;
        for (uint32_t b = 0; b < XB_PAGE && z; b++) z = rmem[idx[i]][b] == 0;
        if (z && (rnd() & 1)) {
            seg[i] = XB_SEG_ZERO;
        } else if (!staged && (rnd() & 1)) {
            memcpy(stg, rmem[idx[i]], XB_PAGE);
            seg[i] = 1;
            row[i] = 0;
            staged = 1;
        }
    }
    size_t minp = codec == XB_SEED ? 6 : 1;
    size_t rows = n < len / minp ? n : len / minp;
    uint8_t *out = malloc(rows ? rows * XB_PAGE : 1), *delta = malloc(rows ? rows : 1);
    xb_error e;
    /* seg == NULL half the time when nothing is staged or zero: row = pfn */
    int plain = !staged && (rnd() & 1);
    for (size_t i = 0; i < n && plain; i++) plain = seg[i] == 0;
    int64_t got = xb_decode_from(codec, in, len, n, rows, srcs, src_rows, 2, pfns,
                                 plain ? NULL : seg, plain ? NULL : row, out, rows, delta, &e);
    fused_checked++;
    /* it decodes exactly what the scan accepts, into the same page kinds */
    *kinds_ok = k < 0 ? got < 0
                      : got == k && (k == 0 || memcmp(delta, scan_delta, (size_t)k) == 0);
    size_t j = (size_t)(got < 0 ? 0 : got);
    for (size_t i = 0; got > 0 && i < (size_t)got; i++)
        if (delta[i] == 1) { j = i; break; }
    if (got > 0 && j < (size_t)got) {
        switch (rnd() % 3) {
        case 0: seg[j] = 0; row[j] = 12 + rnd() % 1000; break;
        case 1: seg[j] = 1; row[j] = 1 + rnd() % 5; break;
        default: seg[j] = 2 + (uint32_t)(rnd() % 5); row[j] = 0; break;
        }
        uint8_t *out2 = malloc(rows * XB_PAGE), *delta2 = malloc(rows);
        xb_error e2;
        int64_t r2 = xb_decode_from(codec, in, len, n, rows, srcs, src_rows, 2, pfns, seg, row,
                                    out2, rows, delta2, &e2);
        if (r2 >= 0 || e2.code != XB_E_BAD_BASE || e2.page != j) {
            fprintf(stderr, "a base past its source was not refused (%d)\n", e2.code);
            exit(1);
        }
        bad_base++;
        free(out2); free(delta2);
    }
    free(mem); free(stg); free(pfns); free(row); free(seg); free(delta);
    if (got < 0) {
        free(out);
        return NULL;
    }
    return out;
}

static void mutate_page(uint8_t *p)
{
    uint32_t kind = rnd() % 6, w;
    switch (kind) {
    case 0: break;
    case 1: w = rnd() % 1024; p[4 * w] ^= 1 + rnd() % 255; break;
    case 2: for (int i = 0; i < 16; i++) { w = rnd() % 1024; p[4 * w + rnd() % 4] ^= 1 + rnd() % 255; } break;
    case 3: { uint32_t s = rnd() % 1024, l = 1 + rnd() % (1024 - s);
              for (uint32_t i = s; i < s + l; i++) p[4 * i] ^= 0x5A; } break;
    case 4: for (int i = 0; i < 4096; i++) p[i] = (uint8_t)rnd(); break;
    default: for (uint32_t i = 0; i < 1024; i++) if (rnd() & 1) p[4 * i + 1] ^= 0x33; break;
    }
}

int main(int argc, char **argv)
{
    int iters = argc > 1 ? atoi(argv[1]) : 200;
    uint8_t mem[12][XB_PAGE];
    long mutated = 0, rejected = 0, zero_base = 0, tampered = 0;
    for (int codec = 1; codec <= 2; codec++) {
        for (int it = 0; it < iters; it++) {
            xb_cache snd;
            uint32_t cap = 1 + rnd() % 8;
            /* odd iterations: small pfns, covered by a 12-bit known-zero map */
            uint64_t mul = (it & 1) ? 1 : 0x9E3779B1ull;
            uint8_t *zk = calloc(2, 1);  /* the sender's */
            cache_new(&snd, cap);
            for (int p = 0; p < 12; p++) { memset(mem[p], p, XB_PAGE); memset(rmem[p], 0, XB_PAGE); }
            /* the initial copy (Format A): every page whole, some zeroed */
            {
                uint64_t rpfns[12];
                uint8_t *rpages = malloc(12 * XB_PAGE);
                for (uint32_t p = 0; p < 12; p++) {
                    if (rnd() % 3) memset(mem[p], 0, XB_PAGE);
                    rpfns[p] = p * mul;
                    memcpy(rpages + p * XB_PAGE, mem[p], XB_PAGE);
                    memcpy(rmem[p], mem[p], XB_PAGE);
                }
                xb_note_raw(zk, 12, rpfns, rpages, 12);
                free(rpages);
            }
            for (int batch = 0; batch < 4; batch++) {
                size_t n = rnd() % 7;
                uint64_t *pfns = malloc(n ? n * 8 : 8);
                uint32_t idx[8];
                uint8_t *pages = malloc(n ? n * XB_PAGE : 1);
                uint8_t *pt = malloc(n ? n : 1);
                uint32_t used = 0;  /* a PFN at most once per batch */
                for (size_t i = 0; i < n; i++) {
                    uint32_t p = rnd() % 12;
                    while (used & (1u << p)) p = (p + 1) % 12;
                    used |= 1u << p;
                    idx[i] = p;
                    pfns[i] = p * mul;
                    mutate_page(mem[p]);
                    memcpy(pages + i * XB_PAGE, mem[p], XB_PAGE);
                    pt[i] = (rnd() % 5) == 0;
                }
                uint8_t *blob = malloc(n ? n * xb_max_encoded(codec) : 1);
                size_t len = xb_encode(&snd, codec, pfns, pages, pt, n, blob, zk, 12);
                /* mutations (and tampered scan results), on the receiver's pages */
                for (int m = 0; m < 8 && len; m++) {
                    uint8_t *bad = malloc(len);
                    memcpy(bad, blob, len);
                    size_t blen = len;
                    switch (m % 4) {
                    case 0: bad[rnd() % len] ^= 1 + rnd() % 255; break;
                    case 1: blen = rnd() % len; break;
                    case 2: for (size_t i = 0; i < len && i < 64; i++) bad[rnd() % len] = (uint8_t)rnd(); break;
                    default: bad[rnd() % len] = (rnd() & 1) ? 0x80 : 0x9b; break;
                    }
                    int code;
                    uint8_t *got = NULL;
                    int tamper = (m & 1) && (rnd() & 1);
                    if (decode_exact(codec, bad, blen, pfns, idx, n, tamper, &got, &code) < 0)
                        rejected++;
                    tampered += tamper && code == XB_E_OUT_OF_STEP;
                    mutated++;
                    free(got);
                    free(bad);
                }
                /* the real blob decodes to the pages, and becomes the receiver's */
                int code;
                uint8_t *got = NULL;
                int64_t k = decode_exact(codec, blob, len, pfns, idx, n, 0, &got, &code);
                if (k != (int64_t)n || (n && memcmp(got, pages, n * XB_PAGE) != 0)) {
                    fprintf(stderr, "round trip failed: codec %d k %lld n %zu err %d\n",
                            codec, (long long)k, n, code);
                    return 1;
                }
                for (size_t i = 0; i < n; i++)
                    memcpy(rmem[idx[i]], got + i * XB_PAGE, XB_PAGE);
                free(got); free(blob); free(pfns); free(pages); free(pt);
            }
            zero_base += (long)snd.zero_base;
            cache_free(&snd);
            free(zk);
        }
    }
    printf("ok mutated=%ld rejected=%ld zero_base=%ld tampered=%ld fused=%ld bad_base=%ld\n",
           mutated, rejected, zero_base, tampered, fused_checked, bad_base);
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_kernel_under_asan_and_ubsan(tmp_path: Path) -> None:
    src = tmp_path / "harness.c"
    src.write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run(
        [
            "gcc",
            "-O1",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
            f"-I{KERNEL.parent}",
            "-o",
            str(exe),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1")
    res = subprocess.run([str(exe), "150"], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.startswith("ok ")
    mutated, rejected, zero_base, tampered, fused, bad_base = (
        int(x.split("=")[1]) for x in res.stdout.split()[1:7]
    )
    assert mutated > 1000 and mutated // 10 < rejected < mutated
    assert zero_base > 50  # the zero-base paths ran, under the sanitizers too
    assert tampered > 0  # xb_apply refused scan results it was not given by xb_scan
    # the fused decode (xb_decode_from) ran beside every decode and agreed with
    # gather + xb_apply (the harness exits otherwise), and refused bad bases
    assert fused > 1000 and bad_base > 100
