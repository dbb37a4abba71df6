"""Benchmark of the simulated host's per-epoch operations.

    python -m bench.sim [--quick] [--json PATH]

Measures, on a host started in a fresh /dev/shm directory:
- pause + unpause round trip (median, p99) of a running guest, as the
  sender does every epoch (random workload, and a busy ledger);
- read-and-clear of the dirty bitmap of a 1 GiB guest whose memory is all
  populated: with nothing dirty, and with ~1,000 distinct dirty pages (the
  scan workload run for exactly 1,000 steps), in each dirty mode;
- gather of 100 / 1,000 / 10,000 random pages from the domain's mapping vs a
  plain ``numpy.take`` from an anonymous array of the same size.

Prints a table and writes JSON (default bench/results/sim.json). ``--quick``
uses a 256 MiB guest and fewer repetitions. Figures depend on the machine's
load; they are measurements, not pass/fail thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.simhost import SimHost  # noqa: E402
from xenbind import PAGE_SIZE  # noqa: E402


def stats(samples_s: list[float]) -> dict:
    us = np.array(samples_s) * 1e6
    return {
        "n": len(us),
        "median_us": round(float(np.median(us)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
        "min_us": round(float(us.min()), 1),
    }


def run_exactly(dom, n: int) -> None:
    target = dom.step + n
    dom.stop_at(target)
    dom.unpause()
    dom.wait_step(target, timeout=120)
    dom.pause()
    dom.stop_at(None)


def bench_pause(host: SimHost, reps: int) -> dict:
    out = {}
    for label, workload, rate in (
        ("random 20k pages/s", "random", 20000),
        ("ledger 20k tx/s", "ledger", 20000),
    ):
        dom = host.create("64M", workload, seed=1, rate=rate)
        time.sleep(0.05)
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            dom.pause()
            dom.unpause()
            samples.append(time.perf_counter() - t)
            time.sleep(0.0002)
        out[label] = stats(samples)
        dom.destroy()
    return out


def bench_dirty(host: SimHost, memory: int, reps: int, mode: str) -> dict:
    pages = memory // PAGE_SIZE
    dom = host.create(memory, "scan", seed=1, rate=5e6, paused=True, dirty_mode=mode)
    t = time.perf_counter()
    run_exactly(dom, pages)  # populate: the scan touches every usable page once
    populate_s = time.perf_counter() - t
    dom.enable_logdirty()
    first = dom.read_and_clear_dirty()
    idle, thousand, counts = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        n0 = len(dom.read_and_clear_dirty())
        idle.append(time.perf_counter() - t)
        assert n0 == 0
        run_exactly(dom, 1000)
        t = time.perf_counter()
        got = dom.read_and_clear_dirty()
        thousand.append(time.perf_counter() - t)
        counts.append(len(got))
    res = {
        "mode": dom.dirty_mode,
        "guest_pages": pages,
        "populate_s": round(populate_s, 2),
        "after_enable": int(len(first)),
        "idle": stats(idle),
        "1000_dirty": stats(thousand),
        "dirty_pages_seen": sorted(set(counts)),
    }
    dom.destroy()
    return res


def bench_gather(host: SimHost, memory: int, reps: int) -> dict:
    pages = memory // PAGE_SIZE
    dom = host.create(memory, "idle", seed=1, paused=True)
    dom.scatter(
        np.arange(0, pages, 64, dtype=np.uint64),
        np.full((len(range(0, pages, 64)), PAGE_SIZE), 7, np.uint8),
    )
    anon = np.ones((pages, PAGE_SIZE), dtype=np.uint8)
    rng = np.random.default_rng(1)
    out = {}
    for n in (100, 1000, 10000):
        pfns = np.sort(rng.choice(pages, n, replace=False)).astype(np.uint64)
        buf = np.empty((n, PAGE_SIZE), dtype=np.uint8)
        dom.gather(pfns, buf)  # map + fault in once
        g, a = [], []
        idx = pfns.astype(np.intp)
        for _ in range(reps):
            t = time.perf_counter()
            dom.gather(pfns, buf)
            g.append(time.perf_counter() - t)
            t = time.perf_counter()
            np.take(anon, idx, axis=0, out=buf, mode="clip")
            a.append(time.perf_counter() - t)
        gs, as_ = stats(g), stats(a)
        gs["GB_per_s"] = round(n * PAGE_SIZE / (gs["median_us"] * 1e-6) / 1e9, 2)
        as_["GB_per_s"] = round(n * PAGE_SIZE / (as_["median_us"] * 1e-6) / 1e9, 2)
        out[str(n)] = {"gather": gs, "numpy_take_anonymous": as_}
    dom.destroy()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB guest, fewer repetitions")
    p.add_argument(
        "--json",
        default=os.path.join(REPO, "bench", "results", "sim.json"),
        help="where to write JSON",
    )
    args = p.parse_args(argv)
    memory = (256 if args.quick else 1024) << 20
    reps = 200 if args.quick else 2000
    dreps = 10 if args.quick else 30
    host = SimHost().start()
    try:
        results = {
            "machine": {
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "loadavg_at_start": os.getloadavg(),
            },
            "host_dirty_mode": host.hv.ping()["dirty_mode"],
            "pause_unpause": bench_pause(host, reps),
            "read_and_clear_dirty": {},
            "gather": bench_gather(host, memory, 50 if args.quick else 200),
        }
        for mode in ("uffd-wp", "bitmap"):
            if mode == "uffd-wp" and results["host_dirty_mode"] != "uffd-wp":
                continue
            results["read_and_clear_dirty"][mode] = bench_dirty(host, memory, dreps, mode)
    finally:
        host.cleanup()

    print(
        f"simulated host benchmark ({memory >> 20} MiB guest; {os.cpu_count()} CPUs, "
        f"load {results['machine']['loadavg_at_start'][0]:.1f})"
    )
    print(f"\n{'pause + unpause round trip':<40} {'median':>10} {'p99':>10}")
    for label, s in results["pause_unpause"].items():
        print(f"  {label:<38} {s['median_us']:>8.1f}us {s['p99_us']:>8.1f}us")
    print(
        f"\n{'read-and-clear dirty, ' + str(memory >> 20) + ' MiB populated':<40} {'median':>10} {'p99':>10}"
    )
    for mode, r in results["read_and_clear_dirty"].items():
        for key in ("idle", "1000_dirty"):
            s = r[key]
            print(
                f"  {mode + ', ' + key.replace('_', ' '):<38} {s['median_us']:>8.1f}us {s['p99_us']:>8.1f}us"
            )
    print(
        f"\n{'gather (random pages)':<22} {'mapping':>12} {'GB/s':>7} {'numpy take':>12} {'GB/s':>7}"
    )
    for n, r in results["gather"].items():
        g, a = r["gather"], r["numpy_take_anonymous"]
        print(
            f"  {n + ' pages':<20} {g['median_us']:>10.1f}us {g['GB_per_s']:>7.2f} "
            f"{a['median_us']:>10.1f}us {a['GB_per_s']:>7.2f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
