"""Scale (issue 16): many guests on one pair, big guests, short intervals.

    python -m bench.scale [--quick] [--json PATH] [--only guests,size,interval] [--windows N]
                          [--profile DIR] [--sizes-gib 1,4,8] [--intervals-ms 10,5,2]

The real daemons on two simulated hosts, as bench/e2e.py starts them
(``bench.e2e.Stack``: /dev/shm, ``remus-receiver`` with a 5 s failover
timeout so that a stall of this shared machine cannot end a measurement with
a false failover, ``remusd``, 127.0.0.1 TCP, codec ``xen``); guests made by
``bench.e2e.create`` (memory filled with random bytes first) and watched by
``bench.e2e.window`` (remusd's per-checkpoint history, /proc CPU). Every
figure of a configuration is the median of ``--windows`` windows (3; each
window's own figures are in the JSON), taken one after another on the same
guests after a warm-up.

Phases (``--only`` picks some; all by default):

guests    1, 2, 4 and 8 ``hotset`` guests (256 MiB each, working set 8,192
          pages, Zipf 1.1) on one remusd and one receiver, each protected at
          25 ms, each writing at the rate calibrated (one guest alone, in a
          stack of its own) for ~1,000 dirty pages per epoch. Per guest:
          checkpoints/s, pause, dirty pages, its worker's CPU; per run: CPU
          of remusd and the receiver (total and per guest) and of the hosts,
          the sum over the processes against the machine's cores. Windows run
          on all guests at once (one ``window`` thread per guest, status
          polled every second). ``--profile DIR``: at 4 and 8 guests one more
          window while py-spy samples remusd and the receiver (100 Hz,
          ``--gil --nonblocking``: only stacks holding the GIL, so the
          samples' share of the window is how busy each daemon's GIL was;
          raw stacks in DIR, the top frames in the JSON).
          Target: 4 guests each at >= 39 checkpoints/s.
size      One hotset guest of 1, 4 and 8 GiB (working set 8,192 pages, the
          rate calibrated once, on the first, for ~1,000 pages per 25 ms
          epoch), one size at a time, each in a fresh stack removed before
          the next (an 8 GiB guest takes 8 GiB on each side; a size that does
          not fit in MemAvailable is skipped and says so). Three ways each:
          ``walk`` (the guest made with ``write_marks=False``: every read of
          the log walks the whole guest with PAGEMAP_SCAN, the code before
          this change), ``marks`` (the paused read takes the vCPU's write
          marks, xenbind.sim.dirty), ``marks-noprescan`` (the same, remusd
          ``--no-prescan``). Pause (remusd's history) and remusd CPU per
          checkpoint; then, unprotected, capture()'s steps timed one by one
          in this process on the same guest (``prescan`` running,
          ``paused_read`` while stopped, 30 epochs of 25 ms). Before the
          stacks, the same steps on a lone sim host (no daemons, one copy of
          the memory: the size that fits once but not twice is measured
          there too).
          Target: the 8 GiB pause <= 1.5 x the 1 GiB pause (``marks``).
interval  One hotset guest (1 GiB; 256 MiB with --quick) at 10, 5 and 2 ms
          intervals (one under remusd's minimum is refused, and says so), the rate set for ~200 dirty pages per epoch
          (calibrated at 5 ms, scaled by interval). Checkpoints/s against
          the interval's ceiling, pause, CPU. Target: 200 checkpoints/s
          sustained with ~200 dirty pages per epoch.

Prints the tables, writes JSON (default bench/results/scale.json). Not a
test: nothing is asserted. A full run takes ~12 minutes, --quick ~3
(smaller guests, shorter windows, 1 window, sizes 256 MiB / 1 GiB / 2 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import load_average, save_json  # noqa: E402
from bench.e2e import (  # noqa: E402
    HOTSET_WSS,
    MEASURE_FAILOVER_MS,
    Stack,
    calibrate,
    cpu_seconds,
    create,
    machine,
    summary,
    window,
)
from remusd.epoch import merge_sorted, strictly_sorted  # noqa: E402
from tests.simhost import SimHost  # noqa: E402
from xenbind import PAGE_SIZE  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CODEC = "xen"
#: guests phase: how many guests, their size, interval, pages per epoch, target
GUEST_COUNTS = (1, 2, 4, 8)
GUEST_MIB = 256
GUEST_INTERVAL_MS = 25
GUEST_PAGES = 1000
GUEST_TARGET_PER_S = 39.0
#: at these guest counts --profile samples the daemons
PROFILE_AT = (4, 8)
PROFILE_RATE_HZ = 100
#: size phase: guest sizes (GiB), the ways the log is read, pages per epoch
SIZES_GIB = (1, 4, 8)
SIZE_MODES = ("walk", "marks", "marks-noprescan")
SIZE_INTERVAL_MS = 25
SIZE_PAGES = 1000
SIZE_TARGET_RATIO = 1.5
#: memory besides the guest's copies a size needs free (daemons, buffers, and
#: the other work of a shared machine: 8 GiB twice with 18 GiB free OOMed)
SIZE_MARGIN = 4 * GiB
#: interval phase: intervals tried, pages per epoch, where it is calibrated, target
INTERVALS_MS = (10, 5, 2)
INTERVAL_PAGES = 200
INTERVAL_CALIBRATE_MS = 5
INTERVAL_TARGET_PER_S = 200.0
#: hotset rate the calibrations start from (pages/s): ~1,000 pages per 25 ms
START_RATE = 144000.0
#: capture()'s steps timed in the size phase (the last: stop to go)
#: epochs capture_steps times per guest (its figures are their medians)
STEP_REPS = 30
STEPS = ("prescan", "stop", "paused_read", "merge", "gather", "context_barrier", "go", "paused")


def _med(values) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.median(vals)), 3) if vals else None


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


#: the receiver's cap on a plaintext session's memory (its default, 1 GiB,
#: would refuse the size phase's 4 and 8 GiB guests over 127.0.0.1)
INSECURE_MAX_MB = 65536


class ScaleStack(Stack):
    """bench.e2e's Stack, the receiver taking plaintext sessions of big guests."""

    def _start(self, name: str, argv: list[str], control: str) -> None:
        if name == "receiver":
            argv = [*argv, "--insecure-max-mb", str(INSECURE_MAX_MB)]
        super()._start(name, argv, control)


def new_stack(base: Path, name: str, remusd_args: tuple[str, ...] = ()) -> Stack:
    stack = ScaleStack(base / name, failover_ms=MEASURE_FAILOVER_MS, remusd_args=remusd_args)
    return stack.start()


def _brief(w: dict) -> dict:
    """One guest's window without the samples."""
    return {k: v for k, v in w.items() if k not in ("timeline", "pause_samples_ms", "probes")}


# --- guests ------------------------------------------------------------------------------


def calibrated_rate(base: Path, memory: int, interval_ms: int, pages: int, start: float) -> float:
    """The hotset rate (pages/s) for ``pages`` dirty pages an epoch, one guest alone."""
    stack = new_stack(base, f"cal-{interval_ms}")
    try:
        dom = create(stack, "cal", memory, "hotset", start, wss=HOTSET_WSS)
        stack.protect("cal", CODEC, interval_ms)
        time.sleep(1.0)
        return calibrate(stack, dom, "cal", start, pages, 1.5, steps=4)
    finally:
        stack.close()


def all_windows(stack: Stack, names: list[str], doms: list, seconds: float) -> dict:
    """``window`` on every guest at once (a thread each), with each guest's worker CPU."""
    pids = [d.status()["pid"] for d in doms]
    c0 = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    res: dict[str, Any] = {}
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            # each status answers for every guest: at 8 guests, 8 pollers a
            # second were ~30% of remusd's GIL samples (JSON); poll less
            res[name] = window(stack, name, seconds, every=max(1.0, len(names) / 2))
        except BaseException as e:  # reported after the join
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise errors[0]
    guest_cpu = [
        round(100 * (cpu_seconds(p) - c) / elapsed, 1) for p, c in zip(pids, c0, strict=True)
    ]
    return {"per_guest": {n: _brief(res[n]) for n in names}, "guest_cpu_percent": guest_cpu}


def profile_daemons(stack: Stack, names: list[str], doms: list, seconds: float, out: Path) -> dict:
    """py-spy on remusd and the receiver during one more window: the top frames."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        return {"error": "py-spy not installed (pip install py-spy)"}
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for who in ("remusd", "receiver"):
        path = out / f"{who}-{len(names)}guests.txt"
        procs[who] = (
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(stack.pid(who)),
                    "-d",
                    str(int(seconds)),
                    "-r",
                    str(PROFILE_RATE_HZ),
                    "--threads",
                    "--gil",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
            path,
        )
    w = all_windows(stack, names, doms, seconds)
    prof: dict[str, Any] = {"window": _rates(w)}
    for who, (p, path) in procs.items():
        try:
            _, err = p.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if path.exists():
            prof[who] = top_frames(path)
            # --gil: only samples holding the GIL, so their share of all the
            # samples the window could have had is how busy the GIL was
            prof[who]["gil_busy_percent"] = round(
                100 * prof[who]["samples"] / (PROFILE_RATE_HZ * seconds), 1
            )
        else:
            prof[who] = {"error": err.decode()[-500:]}
    return prof


def top_frames(path: Path, n: int = 15) -> dict:
    """From py-spy's raw output (``frame;frame;... count`` per line): samples
    per thread, the leaf frames (self time) and the frames seen anywhere in a
    stack (inclusive), as shares of the samples."""
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        total += k
        if frames and frames[0].startswith(("thread", "process")):
            head = [f for f in frames if f.startswith("thread")]
            threads[head[0] if head else frames[0]] += k
            frames = [f for f in frames if not f.startswith(("thread", "process"))]
        if not frames:
            continue
        leaf[frames[-1]] += k
        for f in set(frames):
            incl[f] += k

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * v / total, 1)) for f, v in c.most_common(n)]

    return {
        "samples": total,
        "seconds_of_samples": round(total / PROFILE_RATE_HZ, 2),
        "threads": share(threads),
        "self": share(leaf),
        "inclusive": share(incl),
        "raw": str(path),
    }


def _rates(w: dict) -> dict:
    per = w["per_guest"]
    return {n: per[n]["checkpoints_per_s"] for n in per}


def phase_guests(
    base: Path,
    counts: tuple[int, ...],
    seconds: float,
    windows: int,
    warm: float,
    prof: Path | None,
) -> dict:
    memory = GUEST_MIB * MiB
    rate = calibrated_rate(base, memory, GUEST_INTERVAL_MS, GUEST_PAGES, START_RATE)
    out: dict[str, Any] = {
        "guest_MiB": GUEST_MIB,
        "interval_ms": GUEST_INTERVAL_MS,
        "rate_pages_per_s": round(rate),
        "runs": {},
    }
    for n in counts:
        stack = new_stack(base, f"guests-{n}")
        try:
            names = [f"g{i}" for i in range(n)]
            doms = [create(stack, nm, memory, "hotset", rate, wss=HOTSET_WSS) for nm in names]
            for nm in names:
                stack.protect(nm, CODEC, GUEST_INTERVAL_MS)
            time.sleep(warm)
            wins = [all_windows(stack, names, doms, seconds) for _ in range(windows)]
            run = combine_guests(wins, names)
            run["windows"] = wins
            run["load_average"] = load_average()
            if prof is not None and n in PROFILE_AT:
                run["profile"] = profile_daemons(stack, names, doms, seconds, prof)
            out["runs"][str(n)] = run
            print(f"  {n} guest(s): {run['rates_per_s']} checkpoints/s", flush=True)
        finally:
            stack.close()
    four = out["runs"].get("4")
    out["target"] = f"4 guests each >= {GUEST_TARGET_PER_S}/s"
    out["met"] = None if four is None else min(four["rates_per_s"]) >= GUEST_TARGET_PER_S
    return out


def combine_guests(wins: list[dict], names: list[str]) -> dict:
    """Median over the windows of each guest's figures and of the run's CPU."""
    first = wins[0]["per_guest"][names[0]]
    n = len(names)

    def per(name: str, *keys: str) -> float | None:
        vals = []
        for w in wins:
            x: Any = w["per_guest"][name]
            for k in keys:
                x = x.get(k) if isinstance(x, dict) else None
            vals.append(x)
        return _med(vals)

    cpu = {
        k: _med([w["per_guest"][names[0]]["cpu_percent"][k] for w in wins])
        for k in first["cpu_percent"]
    }
    guest_cpu = [_med([w["guest_cpu_percent"][i] for w in wins]) for i in range(n)]
    total = sum(v or 0.0 for v in cpu.values())
    return {
        "rates_per_s": [per(nm, "checkpoints_per_s") for nm in names],
        "pause_median_ms": [per(nm, "pause_ms", "median") for nm in names],
        "pause_p99_ms": [per(nm, "pause_ms", "p99") for nm in names],
        "dirty_pages_median": [per(nm, "dirty_pages", "median") for nm in names],
        "bytes_per_checkpoint_median": [per(nm, "bytes_per_checkpoint", "median") for nm in names],
        "guest_cpu_percent": guest_cpu,
        "cpu_percent": cpu,
        "remusd_cpu_per_guest": round((cpu["remusd"] or 0) / n, 1),
        "receiver_cpu_per_guest": round((cpu["receiver"] or 0) / n, 1),
        # remusd + receiver + both host trees (guests included), of os.cpu_count() cores
        "all_processes_percent": round(total, 1),
        "cores_percent": 100 * (os.cpu_count() or 1),
    }


# --- size --------------------------------------------------------------------------------


def capture_steps(dom, interval_ms: int, reps: int, prescan: bool = True) -> dict:
    """capture()'s steps (remusd/epoch.py) timed one by one in this process on
    ``dom`` (unprotected, writing at its rate): where its pause goes."""
    pages = dom.pages
    buf = np.empty((min(pages, 65536), PAGE_SIZE), dtype=np.uint8)
    for s in range(0, pages, 4096):  # map every page here once, as remusd has
        part = np.arange(s, min(s + 4096, pages), dtype=np.uint64)
        dom.gather(part, buf[: len(part)])
    if dom.logdirty_enabled():  # left on by the session
        dom.disable_logdirty()
    dom.enable_logdirty()
    try:
        late = dom.read_and_clear_dirty()
        steps: dict[str, list[float]] = {k: [] for k in STEPS}
        n = []
        for _ in range(reps):
            time.sleep(interval_ms / 1000)
            t = [time.perf_counter()]
            early = strictly_sorted(dom.read_and_clear_dirty()) if prescan else late[:0]
            t.append(time.perf_counter())
            dom.checkpoint_stop()
            t.append(time.perf_counter())
            late = strictly_sorted(dom.read_and_clear_dirty())
            t.append(time.perf_counter())
            pfns = merge_sorted(early, late)[: len(buf)]
            t.append(time.perf_counter())
            dom.gather(pfns, buf[: len(pfns)])
            t.append(time.perf_counter())
            dom.get_context()
            dom.output_barrier()
            t.append(time.perf_counter())
            dom.checkpoint_go()
            t.append(time.perf_counter())
            for i, k in enumerate(STEPS[:-1]):
                steps[k].append((t[i + 1] - t[i]) * 1e3)
            steps["paused"].append((t[-1] - t[1]) * 1e3)
            n.append(len(pfns))
    finally:
        dom.disable_logdirty()
    return {"dirty_pages": summary(n)} | {
        k: round(float(np.median(v)), 3) for k, v in steps.items()
    }


def one_size(
    base: Path, gib: float, mode: str, rate: float, seconds: float, windows: int, warm: float
) -> dict:
    memory = int(gib * GiB) // PAGE_SIZE * PAGE_SIZE
    args = ("--no-prescan",) if mode.endswith("noprescan") else ()
    stack = new_stack(base, f"size-{gib:g}-{mode}", args)
    try:
        name = f"s{gib:g}"
        t0 = time.monotonic()
        dom = create(
            stack, name, memory, "hotset", rate, wss=HOTSET_WSS, write_marks=mode != "walk"
        )
        made = time.monotonic() - t0
        ic = stack.protect(name, CODEC, SIZE_INTERVAL_MS, timeout=900)
        time.sleep(warm)
        wins = [window(stack, name, seconds) for _ in range(windows)]
        stack.unprotect(name)
        steps = capture_steps(dom, SIZE_INTERVAL_MS, STEP_REPS)
        dom.destroy()
    finally:
        stack.close()
    per_epoch = [
        w["cpu_percent"]["remusd"] / 100 / w["checkpoints_per_s"] * 1e3
        for w in wins
        if w["checkpoints_per_s"]
    ]
    return {
        "GiB": gib,
        "mode": mode,
        "create_and_fill_s": round(made, 1),
        "initial_copy": ic,
        "checkpoints_per_s": _med([w["checkpoints_per_s"] for w in wins]),
        "pause_median_ms": _med([w["pause_ms"].get("median") for w in wins]),
        "pause_p99_ms": _med([w["pause_ms"].get("p99") for w in wins]),
        "dirty_pages_median": _med([w["dirty_pages"].get("median") for w in wins]),
        "remusd_cpu_percent": _med([w["cpu_percent"]["remusd"] for w in wins]),
        "remusd_cpu_ms_per_checkpoint": _med(per_epoch),
        "receiver_cpu_percent": _med([w["cpu_percent"]["receiver"] for w in wins]),
        "steps_ms": steps,
        "windows": [_brief(w) for w in wins],
        "load_average": load_average(),
    }


def bare_steps(base: Path, gib: float, mode: str, rate: float, reps: int) -> dict:
    """capture()'s steps on a guest of ``gib`` on a lone sim host (no daemons,
    no backup: one copy of its memory), for sizes two copies do not fit."""
    host = SimHost(str(base / f"steps-{gib:g}-{mode}")).start()
    try:
        memory = int(gib * GiB) // PAGE_SIZE * PAGE_SIZE
        t0 = time.monotonic()
        dom = create(
            cast(Stack, SimpleNamespace(primary=host)),  # create() uses only .primary
            "st",
            memory,
            "hotset",
            rate,
            wss=HOTSET_WSS,
            write_marks=mode != "walk",
        )
        made = time.monotonic() - t0
        steps = capture_steps(dom, SIZE_INTERVAL_MS, reps, prescan=not mode.endswith("noprescan"))
        dom.destroy()
    finally:
        host.cleanup()
    return {"GiB": gib, "mode": mode, "create_and_fill_s": round(made, 1), "steps_ms": steps}


def phase_size(
    base: Path,
    sizes: tuple[float, ...],
    modes: tuple[str, ...],
    seconds: float,
    windows: int,
    warm: float,
) -> dict:
    out: dict[str, Any] = {"interval_ms": SIZE_INTERVAL_MS, "sizes": {}, "skipped": {}}
    first = int(sizes[0] * GiB) // PAGE_SIZE * PAGE_SIZE
    rate = calibrated_rate(base, first, SIZE_INTERVAL_MS, SIZE_PAGES, START_RATE)
    out["rate_pages_per_s"] = round(rate)
    out["steps"] = {}
    for gib in sizes:  # one copy of the memory: no daemons
        for mode in modes:
            if mem_available() < int(gib * GiB) + SIZE_MARGIN:
                out["skipped"][f"steps {gib:g}/{mode}"] = "not enough memory for one copy"
                continue
            try:
                r = bare_steps(base, gib, mode, rate, STEP_REPS)
            except Exception as e:  # recorded: the other sizes still run
                out["skipped"][f"steps {gib:g}/{mode}"] = f"failed: {str(e)[:400]}"
                print(f"  steps {gib:g} GiB {mode}: failed: {e}", flush=True)
                continue
            out["steps"].setdefault(f"{gib:g}", {})[mode] = r
            st = r["steps_ms"]
            print(
                f"  steps {gib:g} GiB {mode}: paused {st['paused']} ms (paused read "
                f"{st['paused_read']}, prescan {st['prescan']})",
                flush=True,
            )
    for gib in sizes:
        need = int(2 * gib * GiB) + SIZE_MARGIN
        for mode in modes:
            avail = mem_available()
            if avail < need:
                out["skipped"][f"{gib:g}/{mode}"] = (
                    f"needs {need / GiB:.1f} GiB, {avail / GiB:.1f} GiB available"
                )
                print(f"  {gib:g} GiB {mode}: skipped ({out['skipped'][f'{gib:g}/{mode}']})")
                continue
            try:
                r = one_size(base, gib, mode, rate, seconds, windows, warm)
            except Exception as e:  # recorded: the other sizes still run
                out["skipped"][f"{gib:g}/{mode}"] = f"failed: {str(e)[:400]}"
                print(f"  {gib:g} GiB {mode}: failed: {e}", flush=True)
                continue
            out["sizes"].setdefault(f"{gib:g}", {})[mode] = r
            print(
                f"  {gib:g} GiB {mode}: pause {r['pause_median_ms']} ms, "
                f"paused read {r['steps_ms']['paused_read']} ms, "
                f"remusd {r['remusd_cpu_ms_per_checkpoint']} ms CPU/checkpoint",
                flush=True,
            )
    lo, hi = f"{sizes[0]:g}", f"{sizes[-1]:g}"
    verdict: dict[str, Any] = {"target": f"pause at {hi} GiB <= {SIZE_TARGET_RATIO} x {lo} GiB"}
    for mode in modes:
        a = out["sizes"].get(lo, {}).get(mode, {}).get("pause_median_ms")
        b = out["sizes"].get(hi, {}).get(mode, {}).get("pause_median_ms")
        if a and b:
            verdict[mode] = {"ratio": round(b / a, 2), "met": b / a <= SIZE_TARGET_RATIO}
    for mode in modes:
        a = out["steps"].get(lo, {}).get(mode, {}).get("steps_ms", {}).get("paused")
        b = out["steps"].get(hi, {}).get(mode, {}).get("steps_ms", {}).get("paused")
        if a and b:
            verdict[f"steps {mode}"] = {"ratio": round(b / a, 2), "met": b / a <= SIZE_TARGET_RATIO}
    out["verdict"] = verdict
    return out


# --- interval ----------------------------------------------------------------------------


def phase_interval(
    base: Path, memory: int, intervals: tuple[int, ...], seconds: float, windows: int, warm: float
) -> dict:
    start = START_RATE * INTERVAL_PAGES / GUEST_PAGES * GUEST_INTERVAL_MS / INTERVAL_CALIBRATE_MS
    rate5 = calibrated_rate(base, memory, INTERVAL_CALIBRATE_MS, INTERVAL_PAGES, start)
    out: dict[str, Any] = {
        "guest_MiB": memory // MiB,
        "pages_per_epoch": INTERVAL_PAGES,
        "rate_at_5ms": round(rate5),
        "intervals": {},
    }
    stack = new_stack(base, "interval")
    try:
        name = "iv"
        dom = create(stack, name, memory, "hotset", rate5, wss=HOTSET_WSS)
        for iv in intervals:
            rate = rate5 * INTERVAL_CALIBRATE_MS / iv
            dom.set_rate(rate)
            try:
                stack.protect(name, CODEC, iv)
            except Exception as e:  # e.g. an interval under remusd's minimum
                out["intervals"][str(iv)] = {"error": str(e)[:300]}
                continue
            time.sleep(warm)
            wins = [window(stack, name, seconds) for _ in range(windows)]
            stack.unprotect(name)
            r = {
                "rate_pages_per_s": round(rate),
                "ceiling_per_s": 1000 / iv,
                "checkpoints_per_s": _med([w["checkpoints_per_s"] for w in wins]),
                "pause_median_ms": _med([w["pause_ms"].get("median") for w in wins]),
                "pause_p99_ms": _med([w["pause_ms"].get("p99") for w in wins]),
                "dirty_pages_median": _med([w["dirty_pages"].get("median") for w in wins]),
                "bytes_per_checkpoint_median": _med(
                    [w["bytes_per_checkpoint"].get("median") for w in wins]
                ),
                "cpu_percent": {
                    k: _med([w["cpu_percent"][k] for w in wins]) for k in wins[0]["cpu_percent"]
                },
                "windows": [_brief(w) for w in wins],
                "load_average": load_average(),
            }
            out["intervals"][str(iv)] = r
            print(
                f"  {iv} ms: {r['checkpoints_per_s']}/s (ceiling {r['ceiling_per_s']:g}), "
                f"{r['dirty_pages_median']} pages, pause {r['pause_median_ms']} ms",
                flush=True,
            )
        dom.destroy()
    finally:
        stack.close()
    best = [
        (int(iv), r)
        for iv, r in out["intervals"].items()
        if "checkpoints_per_s" in r and (r["checkpoints_per_s"] or 0) >= INTERVAL_TARGET_PER_S
    ]
    out["target"] = f">= {INTERVAL_TARGET_PER_S:g} checkpoints/s, ~{INTERVAL_PAGES} pages/epoch"
    out["met"] = bool(best)
    out["met_at_ms"] = sorted(iv for iv, _ in best)
    return out


# --- output ------------------------------------------------------------------------------


def print_tables(res: dict) -> None:
    g = res.get("guests")
    if g:
        print(
            f"\nMany guests ({g['guest_MiB']} MiB hotset each, {g['interval_ms']} ms, "
            f"{g['rate_pages_per_s']} pages/s each; median of the windows)"
        )
        print(
            f"{'guests':>6} {'ckpt/s each (min-max)':>22} {'pause med':>10} {'pause p99':>10} "
            f"{'pages':>6} {'remusd %':>9} {'/guest':>7} {'recv %':>7} {'/guest':>7} "
            f"{'guest %':>8} {'all %':>6}"
        )
        for n, r in g["runs"].items():
            rates = [x for x in r["rates_per_s"] if x is not None]
            pm = _med(r["pause_median_ms"])
            p99 = _med(r["pause_p99_ms"])
            print(
                f"{n:>6} {f'{_med(rates)} ({min(rates)}-{max(rates)})':>22} {pm:>10} {p99:>10} "
                f"{_med(r['dirty_pages_median']):>6} {r['cpu_percent']['remusd']:>9} "
                f"{r['remusd_cpu_per_guest']:>7} {r['cpu_percent']['receiver']:>7} "
                f"{r['receiver_cpu_per_guest']:>7} {_med(r['guest_cpu_percent']):>8} "
                f"{r['all_processes_percent']:>6}"
            )
        print(f"target: {g['target']}: {'met' if g['met'] else 'NOT met'}")
        for n, r in g["runs"].items():
            for who in ("remusd", "receiver"):
                p = r.get("profile", {}).get(who)
                if p and "self" in p:
                    print(
                        f"\nprofile, {n} guests, {who}: GIL held {p['gil_busy_percent']}% of "
                        f"the window ({p['samples']} samples); self time:"
                    )
                    for f, s in p["self"][:10]:
                        print(f"  {s:5.1f}%  {f}")
    s = res.get("size")
    if s:
        print(
            f"\nGuest size ({s['interval_ms']} ms, {s['rate_pages_per_s']} pages/s; pause from "
            "remusd's history, steps timed unprotected in the bench)"
        )
        print(
            f"{'GiB':>4} {'mode':>16} {'ckpt/s':>7} {'pages':>6} {'pause med':>10} {'p99':>7} "
            f"{'prescan':>8} {'paused read':>12} {'paused':>7} {'remusd %':>9} {'CPU ms/ckpt':>12}"
        )
        for gib, modes in s["sizes"].items():
            for mode, r in modes.items():
                st = r["steps_ms"]
                print(
                    f"{gib:>4} {mode:>16} {r['checkpoints_per_s']:>7} {r['dirty_pages_median']:>6} "
                    f"{r['pause_median_ms']:>10} {r['pause_p99_ms']:>7} {st['prescan']:>8} "
                    f"{st['paused_read']:>12} {st['paused']:>7} {r['remusd_cpu_percent']:>9} "
                    f"{r['remusd_cpu_ms_per_checkpoint']:>12}"
                )
        print(
            f"\ncapture()'s steps on a lone sim host (no daemons; ms, median of {STEP_REPS} epochs)"
        )
        print(
            f"{'GiB':>4} {'mode':>16} {'pages':>6} {'prescan':>8} {'stop':>6} "
            f"{'paused read':>12} {'gather':>7} {'go':>6} {'paused':>7}"
        )
        for gib, modes in s.get("steps", {}).items():
            for mode, r in modes.items():
                st = r["steps_ms"]
                print(
                    f"{gib:>4} {mode:>16} {st['dirty_pages'].get('median')!s:>6} "
                    f"{st['prescan']:>8} {st['stop']:>6} {st['paused_read']:>12} "
                    f"{st['gather']:>7} {st['go']:>6} {st['paused']:>7}"
                )
        for k, why in s["skipped"].items():
            print(f"  skipped {k}: {why}")
        print(f"target: {s['verdict']}")
    iv = res.get("interval")
    if iv:
        print(
            f"\nShort intervals ({iv['guest_MiB']} MiB hotset, ~{iv['pages_per_epoch']} pages/epoch)"
        )
        print(
            f"{'ms':>4} {'ckpt/s':>7} {'ceiling':>8} {'pages':>6} {'pause med':>10} {'p99':>7} "
            f"{'remusd %':>9} {'recv %':>7} {'primary %':>10}"
        )
        for ms, r in iv["intervals"].items():
            if "error" in r:
                print(f"{ms:>4} refused: {r['error']}")
                continue
            c = r["cpu_percent"]
            print(
                f"{ms:>4} {r['checkpoints_per_s']:>7} {r['ceiling_per_s']:>8g} "
                f"{r['dirty_pages_median']:>6} {r['pause_median_ms']:>10} {r['pause_p99_ms']:>7} "
                f"{c['remusd']:>9} {c['receiver']:>7} {c['primary_host']:>10}"
            )
        print(
            f"target: {iv['target']}: {'met at ' + str(iv['met_at_ms']) + ' ms' if iv['met'] else 'NOT met'}"
        )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description="Scale (issue 16): many guests on one pair (1/2/4/8 x 256 MiB at 25 ms), "
        "guest size (1/4/8 GiB, the paused read of the log from the vCPU's write marks "
        "against the whole-guest walk), and short intervals (10/5/2 ms, ~200 pages per "
        "epoch), with the real daemons on two simulated hosts. Prints tables, writes JSON.",
        epilog="Run it on a quiet machine: every figure is CPU-bound on 2 cores.",
    )
    p.add_argument("--quick", action="store_true", help="smaller guests, 2 s windows, 1 window")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "scale.json"))
    p.add_argument("--only", default="guests,size,interval", help="phases, comma-separated")
    p.add_argument("--windows", type=int, help="windows per configuration (default 3; quick 1)")
    p.add_argument("--seconds", type=float, help="window length (default 5 s; quick 2 s)")
    p.add_argument("--guests", type=_ints, default=GUEST_COUNTS, help="guest counts (1,2,4,8)")
    p.add_argument(
        "--sizes-gib", type=_floats, help="guest sizes in GiB (default 1,4,8; quick 0.25,1,2)"
    )
    p.add_argument(
        "--size-modes",
        default=",".join(SIZE_MODES),
        help="how the size phase reads the log: walk, marks, marks-noprescan",
    )
    p.add_argument("--intervals-ms", type=_ints, default=INTERVALS_MS, help="(10,5,2)")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help=f"py-spy remusd and the receiver at {PROFILE_AT} guests; raw stacks in DIR",
    )
    args = p.parse_args(argv)
    phases = [x for x in args.only.split(",") if x]
    unknown = set(phases) - {"guests", "size", "interval"}
    if unknown:
        p.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    windows = args.windows or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    warm = 1.0 if args.quick else 2.0
    sizes = args.sizes_gib or (
        (0.25, 1.0, 2.0) if args.quick else tuple(float(s) for s in SIZES_GIB)
    )
    modes = tuple(m for m in args.size_modes.split(",") if m)
    if set(modes) - set(SIZE_MODES):
        p.error(f"size modes are {', '.join(SIZE_MODES)}")
    res: dict[str, Any] = {"machine": machine(), "load_before": load_average()}
    base = Path(tempfile.mkdtemp(prefix="bench-scale-", dir="/dev/shm"))
    t0 = time.monotonic()
    prof = Path(args.profile) if args.profile else None
    memory = (256 if args.quick else 1024) * MiB
    run = {
        "guests": lambda: phase_guests(base, args.guests, seconds, windows, warm, prof),
        "size": lambda: phase_size(base, sizes, modes, seconds, windows, warm),
        "interval": lambda: phase_interval(base, memory, args.intervals_ms, seconds, windows, warm),
    }
    try:
        for phase in ("guests", "size", "interval"):
            if phase not in phases:
                continue
            print(f"{phase} ...", flush=True)
            try:
                res[phase] = run[phase]()
            except Exception as e:  # recorded; the other phases still run
                res.setdefault("errors", {})[phase] = str(e)[:2000]
                print(f"{phase} failed: {e}", flush=True)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(base)
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["load_after"] = load_average()
    print_tables(res)
    save_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
