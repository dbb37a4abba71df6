"""The C kernel under AddressSanitizer and UndefinedBehaviorSanitizer.

The decoders parse untrusted bytes. This test compiles xenbind/compress/kernel.c
into a small C harness with -fsanitize=address,undefined, every buffer
allocated to its exact size, and runs: random encode/decode round trips (the
harness checks the decoded pages), with pages sent whole "in Format A" between
batches (xb_note_raw on both sides; zeroed pages make zero-base misses; the
two known-zero maps must stay equal), then each blob
mutated (byte flips, truncation, garbage) decoded against a copy of the
receiver's cache. Any out-of-bounds read or write, or undefined behaviour,
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

typedef struct { xb_cache c; } cache_t;

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

static void cache_copy(xb_cache *d, const xb_cache *s)
{
    cache_new(d, s->cap);
    uint32_t tsize = s->tmask + 1;
    memcpy(d->data, s->data, (size_t)s->cap * XB_PAGE);
    memcpy(d->pfn, s->pfn, s->cap * sizeof(uint64_t));
    memcpy(d->prev, s->prev, s->cap * sizeof(uint32_t));
    memcpy(d->next, s->next, s->cap * sizeof(uint32_t));
    memcpy(d->table, s->table, tsize * sizeof(uint32_t));
    d->used = s->used; d->head = s->head; d->tail = s->tail;
}

static void cache_free(xb_cache *c)
{
    free(c->data); free(c->pfn); free(c->prev); free(c->next); free(c->table);
}

/* decode a copy of blob[0..len) into exactly-sized buffers, against a copy
 * of the receiver's 12-bit known-zero map (2 bytes, allocated exactly) */
static int64_t decode_exact(xb_cache *c, int codec, const uint8_t *blob, size_t len,
                            const uint64_t *pfns, size_t n, const uint8_t *rzk, int *code)
{
    uint8_t *zk = malloc(2);
    memcpy(zk, rzk, 2);
    uint8_t *in = malloc(len ? len : 1);
    memcpy(in, blob, len);
    size_t minp = codec == XB_SEED ? 6 : 1;
    size_t rows = n < len / minp ? n : len / minp;
    uint8_t *out = malloc(rows ? rows * XB_PAGE : 1);
    uint64_t *pf = malloc(n ? n * sizeof(uint64_t) : 8);
    memcpy(pf, pfns, n * sizeof(uint64_t));
    xb_error e;
    int64_t k = xb_decode(c, codec, in, len, pf, n, out, rows, &e, zk, 12);
    *code = k < 0 ? e.code : 0;
    free(in); free(out); free(pf); free(zk);
    return k;
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
    long mutated = 0, rejected = 0, zero_base = 0, no_base = 0;
    for (int codec = 1; codec <= 2; codec++) {
        for (int it = 0; it < iters; it++) {
            xb_cache snd, rcv;
            uint32_t cap = 1 + rnd() % 8;
            /* odd iterations: small pfns, covered by a 12-bit known-zero map */
            uint64_t mul = (it & 1) ? 1 : 0x9E3779B1ull;
            uint8_t *zk = calloc(2, 1), *rzk = calloc(2, 1);  /* sender's, receiver's */
            cache_new(&snd, cap);
            cache_new(&rcv, cap);
            for (int p = 0; p < 12; p++) memset(mem[p], p, XB_PAGE);
            for (int batch = 0; batch < 4; batch++) {
                /* some pages sent whole (Format A), a third of them zeroed */
                size_t nr = rnd() % 4;
                uint64_t *rpfns = malloc(nr ? nr * 8 : 8);
                uint8_t *rpages = malloc(nr ? nr * XB_PAGE : 1);
                for (size_t i = 0; i < nr; i++) {
                    uint32_t p = rnd() % 12;
                    if (rnd() % 3) memset(mem[p], 0, XB_PAGE);
                    rpfns[i] = p * mul;
                    memcpy(rpages + i * XB_PAGE, mem[p], XB_PAGE);
                }
                size_t zs = xb_note_raw(zk, 12, rpfns, rpages, nr);
                if (xb_note_raw(rzk, 12, rpfns, rpages, nr) != zs) return 1;
                free(rpfns); free(rpages);
                size_t n = rnd() % 7;
                uint64_t *pfns = malloc(n ? n * 8 : 8);
                uint8_t *pages = malloc(n ? n * XB_PAGE : 1);
                uint8_t *pt = malloc(n ? n : 1);
                for (size_t i = 0; i < n; i++) {
                    uint32_t p = rnd() % 12;
                    pfns[i] = p * mul;
                    mutate_page(mem[p]);
                    memcpy(pages + i * XB_PAGE, mem[p], XB_PAGE);
                    pt[i] = (rnd() % 5) == 0;
                }
                uint8_t *blob = malloc(n ? n * xb_max_encoded(codec) : 1);
                size_t len = xb_encode(&snd, codec, pfns, pages, pt, n, blob, zk, 12);
                /* mutations, each against a copy of the receiver's cache */
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
                    xb_cache tmp;
                    cache_copy(&tmp, &rcv);
                    int code;
                    if (decode_exact(&tmp, codec, bad, blen, pfns, n, rzk, &code) < 0) rejected++;
                    no_base += code == XB_E_NO_BASE;
                    mutated++;
                    cache_free(&tmp);
                    free(bad);
                }
                /* the real blob decodes to the pages */
                uint8_t *out = malloc(n ? n * XB_PAGE : 1);
                xb_error e;
                int64_t k = xb_decode(&rcv, codec, blob, len, pfns, n, out, n, &e, rzk, 12);
                if (k != (int64_t)n || (n && memcmp(out, pages, n * XB_PAGE) != 0)) {
                    fprintf(stderr, "round trip failed: codec %d k %lld n %zu err %d\n",
                            codec, (long long)k, n, e.code);
                    return 1;
                }
                if (memcmp(zk, rzk, 2) != 0) {
                    fprintf(stderr, "known-zero sets differ: %02x%02x vs %02x%02x\n",
                            zk[1], zk[0], rzk[1], rzk[0]);
                    return 1;
                }
                free(out); free(blob); free(pfns); free(pages); free(pt);
            }
            if (snd.zero_base != rcv.zero_base) {
                fprintf(stderr, "zero_base differs: %llu vs %llu\n",
                        (unsigned long long)snd.zero_base, (unsigned long long)rcv.zero_base);
                return 1;
            }
            zero_base += (long)snd.zero_base;
            cache_free(&snd);
            cache_free(&rcv);
            free(zk);
            free(rzk);
        }
    }
    printf("ok mutated=%ld rejected=%ld zero_base=%ld no_base=%ld\n", mutated, rejected,
           zero_base, no_base);
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
    mutated, rejected, zero_base, no_base = (int(x.split("=")[1]) for x in res.stdout.split()[1:5])
    assert mutated > 1000 and mutated // 10 < rejected < mutated
    assert zero_base > 50  # the zero-base paths ran, under the sanitizers too
    assert 0 < no_base < rejected  # and the refusal of a page with no base (error 9)
