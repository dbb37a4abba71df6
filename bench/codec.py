"""Codec benchmark: throughput and size of the checkpoint codecs per change pattern.

    python -m bench.codec [--quick] [--pages N] [--reps R] [--json PATH]

For each page-change pattern (unchanged, 1 word, 16 scattered words, one
256-byte run, half the words scattered, all words, cache miss) and each codec
(seed, xen; none = the Format A copy), over a batch of N pages (default 8192,
a full sender buffer): encode and decode throughput in MB/s of page data
(median of R repetitions), compressed size and ratio. Beside them, in the same
run: a numpy copy of the same bytes (memcpy bandwidth), and zlib level 1,
zstd level 1 and lz4 over the raw new pages and over old XOR new.

Old pages are random bytes (incompressible for general-purpose compressors:
their raw figures are the worst case, their XOR figures the best case).
Prints a table and writes JSON (default bench/results/codec.json). Not a test:
the targets (encode/decode of sparse patterns >= 0.5x memcpy, ratio >= 10 for
them, never more than Format A + 1%) are checked and reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import zlib
from collections.abc import Callable

import lz4.frame
import numpy as np
import zstandard

from xenbind import PAGE_SIZE
from xenbind.compress import Compressor, Decompressor

PATTERNS = ("unchanged", "1word", "16words", "run256", "half", "all", "miss")
SPARSE = ("1word", "16words", "run256")
WORDS = PAGE_SIZE // 4
MB = 1e6


def make_pattern(name: str, old: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New contents of the pages for one change pattern (every listed word differs)."""
    n = len(old)
    new = old.copy()
    w = new.view(np.uint32)  # (n, 1024)
    if name in ("unchanged", "miss"):
        return new
    if name == "1word":
        cols = rng.integers(0, WORDS, (n, 1))
    elif name == "16words":
        cols = np.argsort(rng.random((n, WORDS)), axis=1)[:, :16]
    elif name == "run256":
        start = rng.integers(0, WORDS - 64, (n, 1))
        cols = start + np.arange(64)
    elif name == "half":
        cols = np.argsort(rng.random((n, WORDS)), axis=1)[:, : WORDS // 2]
    elif name == "all":
        cols = np.broadcast_to(np.arange(WORDS), (n, WORDS))
    else:
        raise ValueError(name)
    rows = np.arange(n)[:, None]
    flip = rng.integers(1, 2**32, cols.shape, dtype=np.uint32)
    w[rows, cols] ^= flip
    return new


def median_time(fn: Callable[[int], object], reps: int) -> float:
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_codec(codec: str, pattern: str, old: np.ndarray, new: np.ndarray, reps: int) -> dict:
    """Encode/decode throughput and size of one codec on one pattern.

    The timed calls alternate direction (old->new, then new->old), so the
    cache always holds the other version and every repetition sees the pattern.
    For 'miss', two disjoint pfn sets alternate through a cache of n pages.
    """
    n = len(old)
    nbytes = n * PAGE_SIZE
    pfns = np.arange(n, dtype=np.uint64)
    if pattern == "miss":
        sets = [(pfns, old), (pfns + n, new)]
    else:
        sets = [(pfns, new), (pfns, old)]
    comp, dec = Compressor(codec, n), Decompressor(codec, n)
    first = (pfns + n, new) if pattern == "miss" else (pfns, old)
    dec.decompress(comp.compress(*first), first[0])  # prime both caches
    blobs: list[bytes] = []

    def enc(r: int) -> None:
        blobs.append(comp.compress(*sets[r % 2]))

    t_enc = median_time(enc, 2 * reps)
    # decode the same blobs in the same order: the mirror follows the sender
    dec2 = Decompressor(codec, n)
    dec2.decompress(comp_prime(codec, n, first), first[0])
    out: list[np.ndarray] = []

    def dec_one(r: int) -> None:
        got = dec2.decompress(blobs[r], sets[r % 2][0])
        if r < 2:
            out.append(got)

    t_dec = median_time(dec_one, 2 * reps)
    for r, got in enumerate(out):  # the benchmark checks what it times
        if not np.array_equal(got, sets[r % 2][1]):
            raise AssertionError(f"{codec}/{pattern}: decoded pages differ")
    size = len(blobs[0])
    return {
        "encode_MBps": nbytes / t_enc / MB,
        "decode_MBps": nbytes / t_dec / MB,
        "bytes": size,
        "ratio": nbytes / size,
        "vs_format_a": size / nbytes,
    }


def comp_prime(codec: str, n: int, first: tuple[np.ndarray, np.ndarray]) -> bytes:
    """The blob a fresh sender emits for the priming batch (all misses)."""
    return Compressor(codec, n).compress(*first)


def bench_none(new: np.ndarray, reps: int) -> dict:
    """Format A: the page bytes themselves, copied out and back in."""
    nbytes = new.nbytes
    blob = new.tobytes()
    t_enc = median_time(lambda r: new.tobytes(), reps)
    t_dec = median_time(lambda r: np.frombuffer(blob, np.uint8).reshape(-1, PAGE_SIZE).copy(), reps)
    return {
        "encode_MBps": nbytes / t_enc / MB,
        "decode_MBps": nbytes / t_dec / MB,
        "bytes": len(blob),
        "ratio": 1.0,
        "vs_format_a": 1.0,
    }


def bench_memcpy(src: np.ndarray, reps: int) -> float:
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the destination in first
    return src.nbytes / median_time(lambda r: np.copyto(dst, src), reps) / MB


GENERIC: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "zlib1": (lambda b: zlib.compress(b, 1), zlib.decompress),
    "zstd1": (
        lambda b: zstandard.ZstdCompressor(level=1).compress(b),
        lambda b: zstandard.ZstdDecompressor().decompress(b),
    ),
    "lz4": (lambda b: lz4.frame.compress(b), lz4.frame.decompress),
}


def bench_generic(data: bytes, reps: int) -> dict:
    res = {}
    for name, (c, d) in GENERIC.items():
        blob = c(data)
        t_c = median_time(lambda r, c=c: c(data), reps)
        t_d = median_time(lambda r, d=d, blob=blob: d(blob), reps)
        res[name] = {
            "encode_MBps": len(data) / t_c / MB,
            "decode_MBps": len(data) / t_d / MB,
            "bytes": len(blob),
            "ratio": len(data) / len(blob),
        }
    return res


def run(pages: int, reps: int, generic_pages: int) -> dict:
    rng = np.random.default_rng(20110624)
    old = rng.integers(0, 256, (pages, PAGE_SIZE), dtype=np.uint8)
    memcpy = bench_memcpy(old, max(reps, 5))
    results: dict = {
        "machine": {
            "node": platform.node(),
            "cpu": _cpu_name(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "pages": pages,
        "reps": reps,
        "generic_pages": generic_pages,
        "memcpy_MBps": memcpy,
        "patterns": {},
    }
    for pattern in PATTERNS:
        new = make_pattern(pattern, old, rng)
        row: dict = {}
        for codec in ("seed", "xen"):
            row[codec] = bench_codec(codec, pattern, old, new, reps)
        row["none"] = bench_none(new, reps)
        g = min(generic_pages, pages)
        row["raw"] = bench_generic(new[:g].tobytes(), max(1, reps // 2))
        xor = np.bitwise_xor(old[:g], new[:g]) if pattern != "miss" else new[:g]
        row["xor"] = bench_generic(xor.tobytes(), max(1, reps // 2))
        results["patterns"][pattern] = row
    results["targets"] = check_targets(results)
    return results


def check_targets(results: dict) -> dict:
    memcpy = results["memcpy_MBps"]
    out = {}
    for codec in ("seed", "xen"):
        speed, ratio, size = [], [], []
        for pattern, row in results["patterns"].items():
            r = row[codec]
            if pattern in SPARSE:
                speed.append(min(r["encode_MBps"], r["decode_MBps"]) / memcpy)
                ratio.append(r["ratio"])
            size.append(r["vs_format_a"])
        out[codec] = {
            "sparse_speed_vs_memcpy_min": min(speed),
            "sparse_speed_ok": min(speed) >= 0.5,
            "sparse_ratio_min": min(ratio),
            "sparse_ratio_ok": min(ratio) >= 10,
            "size_vs_format_a_max": max(size),
            "size_ok": max(size) <= 1.01,
        }
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(res: dict) -> None:
    memcpy = res["memcpy_MBps"]
    print(
        f"codec benchmark: {res['pages']} pages per batch, median of {res['reps']}x2 runs, "
        f"{res['machine']['cpu']} ({res['machine']['cpus']} cpus)"
    )
    print(f"memcpy (numpy copy of the same bytes): {memcpy:8.0f} MB/s\n")
    hdr = f"{'pattern':<10} {'codec':<6} {'enc MB/s':>9} {'dec MB/s':>9} {'enc/cpy':>7} {'dec/cpy':>7} {'bytes':>10} {'ratio':>8} {'vs A':>6}"
    print(hdr)
    print("-" * len(hdr))
    for pattern, row in res["patterns"].items():
        for codec in ("seed", "xen", "none"):
            r = row[codec]
            print(
                f"{pattern:<10} {codec:<6} {r['encode_MBps']:9.0f} {r['decode_MBps']:9.0f} "
                f"{r['encode_MBps'] / memcpy:7.2f} {r['decode_MBps'] / memcpy:7.2f} "
                f"{r['bytes']:10d} {r['ratio']:8.1f} {r['vs_format_a']:6.3f}"
            )
        for src in ("raw", "xor"):
            for name, r in row[src].items():
                print(
                    f"{'':<10} {name + '/' + src:<10} {r['encode_MBps']:5.0f} {r['decode_MBps']:9.0f} "
                    f"{'':>7} {'':>7} {r['bytes'] * res['pages'] // res['generic_pages'] if res['generic_pages'] < res['pages'] else r['bytes']:10d} {r['ratio']:8.1f}"
                )
    print(f"\n(zlib/zstd/lz4 measured on the first {min(res['generic_pages'], res['pages'])} pages; bytes scaled to the batch)")
    print("\ntargets (sparse = 1word, 16words, run256):")
    for codec, t in res["targets"].items():
        print(
            f"  {codec:<5} sparse speed min {t['sparse_speed_vs_memcpy_min']:.2f}x memcpy "
            f"[{'ok' if t['sparse_speed_ok'] else 'MISSED'} >= 0.5]  "
            f"sparse ratio min {t['sparse_ratio_min']:.1f} [{'ok' if t['sparse_ratio_ok'] else 'MISSED'} >= 10]  "
            f"size max {t['size_vs_format_a_max']:.4f} x Format A [{'ok' if t['size_ok'] else 'MISSED'} <= 1.01]"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer pages and repetitions")
    ap.add_argument("--pages", type=int, help="pages per batch (default 8192, quick 2048)")
    ap.add_argument("--reps", type=int, help="repetitions (default 5, quick 2)")
    ap.add_argument("--json", default="bench/results/codec.json", help="where to write the JSON")
    args = ap.parse_args(argv)
    pages = args.pages or (2048 if args.quick else 8192)
    reps = args.reps or (2 if args.quick else 5)
    res = run(pages, reps, generic_pages=min(pages, 1024 if args.quick else 2048))
    print_table(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
