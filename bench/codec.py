"""Codec benchmark: throughput and size of the checkpoint codecs per change pattern.

    python -m bench.codec [--quick] [--pages N] [--reps R] [--json PATH] [--zero-only]
                          [--base rows|gather|both]

For each page-change pattern (unchanged, 1 word, 16 scattered words, one
256-byte run, half the words scattered, all words, cache miss) and each codec
(seed, xen; none = the Format A copy), over a batch of N pages (default 8192,
a full sender buffer): encode and decode throughput in MB/s of page data
(median of R repetitions), compressed size and ratio. Beside them, in the same
run: a numpy copy of the same bytes (memcpy bandwidth), and zlib level 1,
zstd level 1 and lz4 over the raw new pages and over old XOR new.

The receiver's bases: by default the decoder reads each delta page's base
where it is, in the receiver's memory (``Rows``, the fused decode,
xb_apply_from); ``--base gather`` times the path before it (the bases
gathered into the staging rows, then applied: xb_gather + xb_apply), and
``--base both`` times both on every blob, in turn, beside the same memcpy
(the table's "dec gath" column is the gather path's).

A last line measures the zero test the sender runs on every page of the
initial copy (Compressor.note_sent_raw, for the zero base): over 1 GiB (quick:
256 MiB) in 16 MiB slices, each slice first copied into a reused buffer (the
gather of initial_copy, which leaves it hot in the cache; that copy is the
same-run baseline), once with zero pages (read whole) and once with random
pages (one word read each). A second line measures the receiver's twin: the
stream Decoder zero-tests every Format A page it receives, batch by batch
(KnownZero.note_raw over 1024-page batches, 4 MiB, each right after the copy
that fills the batch's buffer, as the receive does).

Times are taken on two clocks: this thread's CPU time (the table; stable on
a shared, loaded machine) and wall time (in the JSON beside it).
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
from typing import TypeVar

import lz4.frame
import numpy as np
import zstandard

from bench import load_average, save_json
from xenbind import PAGE_SIZE
from xenbind.compress import Compressor, Decompressor, Rows, gather
from xenbind.compress.zero import KnownZero

PATTERNS = ("unchanged", "1word", "16words", "run256", "half", "all", "miss")
SPARSE = ("1word", "16words", "run256")
WORDS = PAGE_SIZE // 4
MB = 1e6
_T = TypeVar("_T")


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


def median_time(fn: Callable[..., object], reps: int) -> float:
    """Median CPU time of fn(r) over reps calls r (see Clock)."""
    times = []
    for r in range(reps):
        t0 = time.thread_time()
        fn(r)
        times.append(time.thread_time() - t0)
    return statistics.median(times)


class Clock:
    """Both clocks of one measurement: wall time, and this thread's CPU time
    (CLOCK_THREAD_CPUTIME_ID: excludes the time the scheduler gave the core to
    other processes, includes memory stalls and page faults). On a shared,
    loaded machine the CPU time is the stable measure of the code; the wall
    time is what a caller waited."""

    def __init__(self) -> None:
        self.w0 = time.perf_counter()
        self.c0 = time.thread_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.w0, time.thread_time() - self.c0


class Copier:
    """The memcpy reference: a numpy copy of the batch's bytes into a buffer
    already faulted in, timed right beside every codec call, so each codec
    figure has a memcpy figure taken under the same load."""

    def __init__(self, src: np.ndarray) -> None:
        self.src = src
        self.dst = np.empty_like(src)
        np.copyto(self.dst, src)

    def time(self) -> tuple[float, float]:
        clk = Clock()
        np.copyto(self.dst, self.src)
        return clk.stop()


class Series:
    """Per-call (wall, cpu) times of a codec operation and of the memcpy beside it."""

    def __init__(self) -> None:
        self.op: list[tuple[float, float]] = []
        self.cpy: list[tuple[float, float]] = []

    def timed(self, copier: Copier, fn: Callable[..., _T]) -> _T:
        """Run fn() (a lambda may bind its loop values as defaults), timed,
        with the memcpy timed on both sides (the faster kept)."""
        c0 = copier.time()
        clk = Clock()
        res = fn()
        self.op.append(clk.stop())
        c1 = copier.time()
        self.cpy.append(min(c0, c1, key=lambda c: c[1]))
        return res

    def figures(self, nbytes: int, clock: int) -> tuple[float, float, float, float]:
        """(MB/s, memcpy MB/s, median per-call ratio, best-call ratio) on one clock."""
        op = [t[clock] for t in self.op]
        cp = [t[clock] for t in self.cpy]
        return (
            nbytes / statistics.median(op) / MB,
            nbytes / statistics.median(cp) / MB,
            statistics.median(c / t for c, t in zip(cp, op, strict=True)),
            min(cp) / min(op),
        )


def summarise(nbytes: int, enc: Series, dec: Series, dec_gather: Series | None = None) -> dict:
    res: dict = {}
    for clock, name in ((1, "cpu"), (0, "wall")):
        e, ce, er, eb = enc.figures(nbytes, clock)
        d, cd, dr, db = dec.figures(nbytes, clock)
        if dec_gather is not None:
            g, _, gr, gb = dec_gather.figures(nbytes, clock)
            res[name] = {
                "decode_gather_MBps": g,
                "decode_gather_vs_memcpy": gr,
                "decode_gather_vs_memcpy_best": gb,
            }
        res.setdefault(name, {}).update(
            {
                "encode_MBps": e,
                "decode_MBps": d,
                "memcpy_MBps": statistics.median([ce, cd]),
                "encode_vs_memcpy": er,  # median over calls of memcpy time / codec time
                "decode_vs_memcpy": dr,
                "encode_vs_memcpy_best": eb,  # best call against best copy
                "decode_vs_memcpy_best": db,
            }
        )
    return res


def bench_codec(
    codec: str,
    pattern: str,
    old: np.ndarray,
    new: np.ndarray,
    reps: int,
    copier: Copier,
    bases: str = "rows",
) -> dict:
    """Encode/decode throughput and size of one codec on one pattern.

    The calls alternate direction (old->new, then new->old), so the cache
    always holds the other version and every call sees the pattern; each blob
    is decoded right away by the receiver on its own pages (reading the delta
    pages' bases is timed with the decode), into a staging buffer (out=) as
    the receiver does. ``bases``: "rows", the kernel reads each base in the
    receiver's memory (Rows); "gather", they are gathered into the staging
    rows first (the path before); "both", each blob is decoded both ways in
    turn (the order alternating), the second into a staging buffer of its
    own. For 'miss', two disjoint pfn sets alternate
    through a cache of n pages, so every page misses and evicts.
    """
    n = len(old)
    nbytes = n * PAGE_SIZE
    pfns = np.arange(n, dtype=np.uint64)
    if pattern == "miss":
        sets = [(pfns, old), (pfns + n, new)]
        first = (pfns + n, new)
    else:
        sets = [(pfns, new), (pfns, old)]
        first = (pfns, old)
    comp, dec = Compressor(codec, n), Decompressor(codec)
    stage = np.empty((n, PAGE_SIZE), dtype=np.uint8)
    stage.fill(0)
    # the receiver's memory: delta pages decode on its pages (the base source
    # gathers them, as the receiver's Backup.read does, inside the timed call)
    held = np.zeros((2 * n, PAGE_SIZE), dtype=np.uint8)
    rows = Rows(held)  # the fused decode's base source

    def gathered(p: np.ndarray, out: np.ndarray) -> None:  # the path before
        gather(held, p, out)

    paths: list[tuple[Callable[[np.ndarray, np.ndarray], None], Series, np.ndarray]] = []
    if bases in ("rows", "both"):
        paths.append((rows, Series(), stage))
    if bases in ("gather", "both"):
        other = np.empty_like(stage) if bases == "both" else stage
        other.fill(0)
        paths.append((gathered, Series(), other))
    got = dec.decompress(comp.compress(*first), first[0], rows, out=stage)  # prime the cache
    held[first[0].astype(np.intp)] = got
    enc = Series()
    size = 0
    for r in range(2 * reps):
        want_pfns, want_pages = sets[r % 2]
        blob = enc.timed(copier, lambda p=want_pfns, g=want_pages: comp.compress(p, g))
        for base, series, into in paths[:: 1 if r % 2 == 0 else -1]:
            got = series.timed(
                copier,
                lambda b=blob, p=want_pfns, f=base, o=into: dec.decompress(b, p, f, out=o),
            )
            if r < 2 and not np.array_equal(got, want_pages):  # it checks what it times
                raise AssertionError(f"{codec}/{pattern}: decoded pages differ ({bases})")
        held[want_pfns.astype(np.intp)] = got  # the commit (not timed)
        if r < 2:
            size = len(blob)
    res = summarise(nbytes, enc, paths[0][1], paths[1][1] if len(paths) > 1 else None)
    res.update(bytes=size, ratio=nbytes / size, vs_format_a=size / nbytes)
    return res


def bench_none(new: np.ndarray, reps: int, copier: Copier) -> dict:
    """Format A: the page bytes themselves, out as bytes, back into staging."""
    nbytes = new.nbytes
    stage = np.empty_like(new)
    stage.fill(0)
    enc, dec = Series(), Series()
    for _ in range(2 * reps):
        blob = enc.timed(copier, new.tobytes)
        dec.timed(
            copier,
            lambda b=blob: np.copyto(stage, np.frombuffer(b, np.uint8).reshape(-1, PAGE_SIZE)),
        )
    res = summarise(nbytes, enc, dec)
    res.update(bytes=nbytes, ratio=1.0, vs_format_a=1.0)
    return res


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


#: initial_copy's slice: 16 MiB gathered, then sent (and zero-tested)
ZERO_SLICE_PAGES = 4096
#: the receiver's unit: one Format A batch (MAX_BATCH entries, 4 MiB)
RECEIVE_SLICE_PAGES = 1024


def bench_zero_test(total_pages: int, reps: int, side: str = "sender") -> dict:
    """The zero test over ``total_pages``, beside the copy that brings each
    slice in. ``side`` "sender": Compressor.note_sent_raw in 16 MiB slices
    (after the gather); "receiver": the stream Decoder's KnownZero.note_raw
    in 4 MiB Format A batches (after the receive into the batch buffer)."""
    slice_pages = ZERO_SLICE_PAGES if side == "sender" else RECEIVE_SLICE_PAGES
    rng = np.random.default_rng(5)
    src = {
        "zero": np.zeros((slice_pages, PAGE_SIZE), np.uint8),
        "random": rng.integers(0, 256, (slice_pages, PAGE_SIZE), dtype=np.uint8),
    }
    src["zero"].fill(0)  # real memory, not the kernel's shared zero page
    buf = np.empty((slice_pages, PAGE_SIZE), np.uint8)
    buf.fill(1)
    slices = max(1, total_pages // slice_pages)
    out: dict = {"side": side, "pages": slices * slice_pages, "slice_pages": slice_pages}
    for kind, data in src.items():
        total = slices * slice_pages
        if side == "sender":
            note = Compressor("seed", 1, known_pfns=total).note_sent_raw
        else:
            note = KnownZero(total, limit=total).note_raw  # what Decoder._on_page_data runs
        per_rep = []
        for _ in range(reps):
            test = [0.0, 0.0]
            copy = [0.0, 0.0]
            zeros = 0
            for k in range(slices):
                pfns = np.arange(k * slice_pages, (k + 1) * slice_pages, dtype=np.uint64)
                clk = Clock()
                np.copyto(buf, data)  # the gather / receive stand-in: leaves the slice hot
                w, c = clk.stop()
                copy[0] += w
                copy[1] += c
                clk = Clock()
                zeros += note(pfns, buf)
                w, c = clk.stop()
                test[0] += w
                test[1] += c
            if zeros != (total if kind == "zero" else 0):
                raise AssertionError(f"zero test: {zeros} zero pages among {kind} pages")
            per_rep.append((test, copy))
        res = {}
        for clock, name in ((1, "cpu"), (0, "wall")):
            t = statistics.median(r[0][clock] for r in per_rep)
            cp = statistics.median(r[1][clock] for r in per_rep)
            res[name] = {
                "test_s": t,
                "copy_s": cp,
                "test_vs_copy": t / cp if cp else 0.0,
                "test_MBps": out["pages"] * PAGE_SIZE / t / MB if t else 0.0,
            }
        out[kind] = res
    return out


def run(pages: int, reps: int, generic_pages: int, bases: str = "rows") -> dict:
    rng = np.random.default_rng(20110624)
    old = rng.integers(0, 256, (pages, PAGE_SIZE), dtype=np.uint8)
    copier = Copier(old)
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
        "bases": bases,
        "patterns": {},
    }
    for pattern in PATTERNS:
        new = make_pattern(pattern, old, rng)
        row: dict = {}
        for codec in ("seed", "xen"):
            row[codec] = bench_codec(codec, pattern, old, new, reps, copier, bases)
        row["none"] = bench_none(new, reps, copier)
        g = min(generic_pages, pages)
        row["raw"] = bench_generic(new[:g].tobytes(), max(1, reps // 2))
        xor = np.bitwise_xor(old[:g], new[:g]) if pattern != "miss" else new[:g]
        row["xor"] = bench_generic(xor.tobytes(), max(1, reps // 2))
        results["patterns"][pattern] = row
    results["targets"] = check_targets(results)
    return results


def print_zero_test(z: dict) -> None:
    what = (
        "Compressor.note_sent_raw"
        if z.get("side", "sender") == "sender"
        else "receiver: Decoder's KnownZero.note_raw"
    )
    print(
        f"\nzero test of the initial copy ({what}, zero base): "
        f"{z['pages'] * PAGE_SIZE / 2**30:.2f} GiB in {z['slice_pages'] * PAGE_SIZE >> 20} MiB "
        "slices, each right after the copy that brings it in (median of the runs, CPU clock)"
    )
    for kind in ("zero", "random"):
        t = z[kind]["cpu"]
        print(
            f"  {kind:<6} pages: {t['test_s'] * 1e3:8.1f} ms ({t['test_MBps']:7.0f} MB/s), "
            f"the copy of the same slices {t['copy_s'] * 1e3:7.1f} ms: "
            f"{t['test_vs_copy']:.3f} x the copy"
        )


def check_targets(results: dict) -> dict:
    """The issue's targets, judged on each clock."""
    out: dict = {}
    for clock in ("cpu", "wall"):
        for codec in ("seed", "xen"):
            speed, best, ratio, size = [], [], [], []
            for pattern, row in results["patterns"].items():
                r = row[codec]
                t = r[clock]
                if pattern in SPARSE:
                    speed.append(min(t["encode_vs_memcpy"], t["decode_vs_memcpy"]))
                    best.append(min(t["encode_vs_memcpy_best"], t["decode_vs_memcpy_best"]))
                    ratio.append(r["ratio"])
                size.append(r["vs_format_a"])
            out.setdefault(clock, {})[codec] = {
                "sparse_speed_vs_memcpy_min": min(speed),
                "sparse_speed_ok": min(speed) >= 0.5,
                "sparse_speed_best_vs_memcpy_min": min(best),
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
    print(
        f"codec benchmark: {res['pages']} pages ({res['pages'] * PAGE_SIZE / 2**20:.0f} MiB) per "
        f"batch and call, medians of {2 * res['reps']} calls, {res['machine']['cpu']} "
        f"({res['machine']['cpus']} cpus)"
    )
    print(
        "MB/s on the thread's CPU clock (wall-clock figures in the JSON); cpy = numpy copy of\n"
        "the same bytes timed beside each call; x cpy = median over calls of the per-call ratio\n"
    )
    hdr = (
        f"{'pattern':<10} {'codec':<10} {'enc MB/s':>9} {'dec MB/s':>9} {'cpy MB/s':>9} "
        f"{'enc x cpy':>9} {'dec x cpy':>9} {'bytes':>10} {'ratio':>8} {'x A':>6}"
    )
    if res.get("bases") == "both":
        hdr += f" {'dec gath':>9}"  # the gather path's dec x cpy, beside the fused one
    print(hdr)
    print("-" * len(hdr))
    scale = res["pages"] / min(res["generic_pages"], res["pages"])
    for pattern, row in res["patterns"].items():
        for codec in ("seed", "xen", "none"):
            r = row[codec]
            t = r["cpu"]
            print(
                f"{pattern:<10} {codec:<10} {t['encode_MBps']:9.0f} {t['decode_MBps']:9.0f} "
                f"{t['memcpy_MBps']:9.0f} {t['encode_vs_memcpy']:9.2f} {t['decode_vs_memcpy']:9.2f} "
                f"{r['bytes']:10d} {r['ratio']:8.1f} {r['vs_format_a']:6.3f}"
                + (
                    f" {t['decode_gather_vs_memcpy']:9.2f}"
                    if "decode_gather_vs_memcpy" in t
                    else ""
                )
            )
        for src in ("raw", "xor"):
            for name, r in row[src].items():
                print(
                    f"{'':<10} {name + '/' + src:<10} {r['encode_MBps']:9.0f} {r['decode_MBps']:9.0f} "
                    f"{'':>9} {'':>9} {'':>9} {round(r['bytes'] * scale):10d} {r['ratio']:8.1f} "
                    f"{r['bytes'] * scale / (res['pages'] * PAGE_SIZE):6.3f}"
                )
    print(
        f"\n(zlib/zstd/lz4 measured on the first {min(res['generic_pages'], res['pages'])} pages, "
        "bytes scaled to the batch; raw = new pages, xor = old ^ new)"
    )
    print("\ntargets (sparse = 1word, 16words, run256):")
    for clock, per in res["targets"].items():
        for codec, t in per.items():
            print(
                f"  {clock:<4} {codec:<5} sparse speed min {t['sparse_speed_vs_memcpy_min']:.2f}x memcpy "
                f"[{'ok' if t['sparse_speed_ok'] else 'MISSED'} >= 0.5] "
                f"(best calls {t['sparse_speed_best_vs_memcpy_min']:.2f}x)  "
                f"ratio min {t['sparse_ratio_min']:.1f} [{'ok' if t['sparse_ratio_ok'] else 'MISSED'} >= 10]  "
                f"size max {t['size_vs_format_a_max']:.4f} x A [{'ok' if t['size_ok'] else 'MISSED'} <= 1.01]"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer pages and repetitions")
    ap.add_argument("--pages", type=int, help="pages per batch (default 8192, quick 2048)")
    ap.add_argument("--reps", type=int, help="repetitions (default 5, quick 2)")
    ap.add_argument("--json", default="bench/results/codec.json", help="where to write the JSON")
    ap.add_argument("--zero-only", action="store_true", help="only the zero test line")
    ap.add_argument(
        "--base",
        choices=("rows", "gather", "both"),
        default="rows",
        help="how the decoder reads delta pages' bases: in place in the receiver's memory "
        "(rows, the default), gathered first (gather, the path before), or both in turn",
    )
    args = ap.parse_args(argv)
    pages = args.pages or (2048 if args.quick else 8192)
    reps = args.reps or (2 if args.quick else 5)
    zero_pages = (1 << 16) if args.quick else (1 << 18)  # 256 MiB / 1 GiB
    if args.zero_only:
        for side in ("sender", "receiver"):
            z = bench_zero_test(zero_pages, reps, side)
            print_zero_test(z)
            print(json.dumps(z, indent=1))
        return 0
    res = run(pages, reps, generic_pages=min(pages, 1024 if args.quick else 2048), bases=args.base)
    res["zero_test"] = bench_zero_test(zero_pages, reps)
    res["zero_test_receiver"] = bench_zero_test(zero_pages, reps, "receiver")
    res["loadavg_1min_after"] = load_average()
    print_table(res)
    print_zero_test(res["zero_test"])
    print_zero_test(res["zero_test_receiver"])
    print(
        f"\nload average (1 min) at the end: {res['loadavg_1min_after']} on {os.cpu_count()} cpus"
    )
    save_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
