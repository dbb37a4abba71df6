"""What the guest feels (issue 16): its throughput and its clients' latency, protected.

    python -m bench.e2e --only overhead [--quick] [--rounds N] [--json PATH] [--memory-mib M]
    python -m bench.overhead [same options]

The real daemons on two simulated hosts, as bench/e2e.py starts them
(``bench.e2e.Stack``: /dev/shm, ``remus-receiver`` with a 5 s failover
timeout, ``remusd``, 127.0.0.1 TCP, codec ``xen``). The guest is the
``ledger`` (1,000 accounts; 1 GiB, 256 MiB with --quick; a full round
writes ~14 million transactions at ~200,000/s, the log of a 256 MiB guest
holds 8 million) in its max-rate
mode (``set_rate(inf)``: a batch of 64 transactions after another, as fast
as its process gets a CPU), so that what protection costs it shows as
transactions it did not do.

Each round makes a fresh guest and measures it alternately unprotected and
protected: U, P(a), U, P(b), U, P(c), U, P(d), U, the intervals a..d being
25, 50, 100 and 200 ms in an order that rotates from round to round. Each P
window is compared with the mean of the two U windows beside it (the machine
is shared: its speed drifts). Warm-up before every window (1.5 s after a
protect, 0.5 s otherwise), window 6 s (2 s with --quick).

Figures per window:

throughput    transactions/s: the guest's step counter (its status page,
              read without a round trip to the guest) over the window
latency       per transaction, from its commit in the guest to its release
              to the client (the output buffer's release, on the backup's
              acknowledgement): the guest's output timing log
              (xenbind.sim.outputs, TIMING_DTYPE; one row per released batch
              of acknowledgements, the k-th of n committed at about
              first + (k+1)(last-first)/n) for the rows released inside the
              window; p50 / p99 / max and 201 quantiles for the CDF
split         for the same transactions: commit -> the barrier that closed
              its checkpoint (the rest of the epoch + the pause), and per
              checkpoint barrier -> release (send + the backup's ack +
              remusd's release request), and the epoch's real period
              (between consecutive barriers)
floor         interval/2 + pause (median, remusd's per-checkpoint history) +
              barrier -> release (median): what a transaction committed at a
              uniformly random moment of the epoch waits at least; the
              latency p50 is reported over it
CPU           of the guest's own process, remusd, the receiver, the two
              hosts (the primary's without its guest), % of one core; and
              where the guest's wall time went (/proc/PID/schedstat): on a
              CPU, runnable but waiting for one, asleep (paused); with the
              transactions per CPU second, this separates a guest that was
              paused, one that did not get a CPU and one that ran slower

Targets (issue 16): at 25 ms, protected throughput >= 90% of unprotected,
and latency p50 <= interval/2 + 2 ms. Prints the tables (median over the
rounds), writes JSON (default bench/results/overhead.json) and two plots
beside it: ``overhead-latency-cdf.png`` (latency CDF per interval) and
``overhead-throughput.png`` (throughput against interval). Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import load_average, save_json  # noqa: E402
from bench.e2e import (  # noqa: E402
    MEASURE_FAILOVER_MS,
    MiB,
    Stack,
    cpu_seconds,
    machine,
    tree_cpu,
    window,
)
from xenbind.sim.ledger import Layout  # noqa: E402
from xenbind.sim.outputs import TIMING_DTYPE  # noqa: E402
from xenbind.sim.workloads import DEFAULT_ACCOUNTS, MAGIC_PAGES  # noqa: E402

INTERVALS_MS = (25, 50, 100, 200)
CODEC = "xen"
#: quantiles kept per window for the CDF (percent)
QUANTILES = np.linspace(0, 100, 201)
TARGET_RATIO = 0.90
TARGET_OVER_HALF_MS = 2.0


# --- the guest's output timing log ------------------------------------------------------


class TimingLog:
    """The guest's output timing log, read as it grows."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.rows = np.empty(0, dtype=TIMING_DTYPE)

    def read(self) -> np.ndarray:
        """All rows written since the last read."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        whole = len(data) - len(data) % TIMING_DTYPE.itemsize
        self.offset += whole
        return np.frombuffer(data[:whole], dtype=TIMING_DTYPE)


def latencies(rows: np.ndarray) -> dict:
    """Per transaction (each record of each row): commit -> release, commit ->
    barrier; per checkpoint: barrier -> release and the barriers' period. ms."""
    n = rows["n"].astype(np.int64)
    total = int(n.sum())
    if not total:
        return {"transactions": 0}
    starts = np.cumsum(n) - n
    k = np.arange(total, dtype=np.int64) - np.repeat(starts, n)  # index within its burst
    first = np.repeat(rows["first_ns"], n).astype(np.float64)
    span = np.repeat(rows["last_ns"] - rows["first_ns"], n).astype(np.float64)
    commit = first + (k + 1) * span / np.repeat(n, n)
    lat = (np.repeat(rows["released_ns"], n) - commit) / 1e6
    out: dict = {
        "transactions": total,
        "latency_ms": _summary(lat),
        "quantiles_ms": [round(float(x), 4) for x in np.percentile(lat, QUANTILES)],
        "burst_us": _summary((rows["last_ns"] - rows["first_ns"]) / 1e3),
    }
    plugged = rows["barrier_ns"] > 0
    if plugged.any():
        bar = np.repeat(rows["barrier_ns"], n)[np.repeat(plugged, n)]
        wait = (bar - commit[np.repeat(plugged, n)]) / 1e6
        out["commit_to_barrier_ms"] = _summary(wait)
        # per checkpoint: one release per barrier
        b, idx = np.unique(rows["barrier_ns"][plugged], return_index=True)
        rel = rows["released_ns"][plugged][idx]
        out["barrier_to_release_ms"] = _summary((rel - b) / 1e6)
        out["checkpoints_seen"] = len(b)
        if len(b) > 1:
            out["period_ms"] = _summary(np.diff(b) / 1e6)
    out["released_unplugged"] = int(n[~plugged].sum())
    return out


def _summary(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        return {"n": 0}
    p50, p99 = np.percentile(a, [50, 99])
    return {
        "n": len(a),
        "p50": round(float(p50), 3),
        "p99": round(float(p99), 3),
        "max": round(float(a.max()), 3),
        "mean": round(float(a.mean()), 3),
    }


# --- windows ------------------------------------------------------------------------------


def schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of a process's main thread."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run, wait, _ = f.read().split()
        return int(run), int(wait)
    except (OSError, ValueError):
        return 0, 0


def _cpu(stack: Stack, guest_pid: int) -> dict[str, float]:
    return {
        "guest": cpu_seconds(guest_pid),
        "remusd": cpu_seconds(stack.pid("remusd")),
        "receiver": cpu_seconds(stack.pid("receiver")),
        "primary_host": tree_cpu(stack.primary.pid) - cpu_seconds(guest_pid),
        "backup_host": tree_cpu(stack.backup.pid),
        "bench": cpu_seconds(os.getpid()),
    }


def measure(stack: Stack, dom, log: TimingLog, seconds: float, protected: bool) -> dict:
    """One window: throughput, latency of what was released in it, CPU; and
    remusd's per-checkpoint figures when ``protected``."""
    pid = dom.status()["pid"]
    log.read()  # what was released before the window is not its own
    c0, q0 = _cpu(stack, pid), schedstat(pid)
    s0, t0, n0 = dom.step, time.monotonic(), time.monotonic_ns()
    if protected:
        w = window(stack, dom.name, seconds)
    else:
        time.sleep(seconds)
    s1, t1, n1 = dom.step, time.monotonic(), time.monotonic_ns()
    c1, q1 = _cpu(stack, pid), schedstat(pid)
    rows = log.read()
    rows = rows[(rows["released_ns"] >= n0) & (rows["released_ns"] <= n1)]
    elapsed = t1 - t0
    st = dom.status()
    if st["state"] != 1:  # running
        why = (
            "its ledger's log is full: give it more memory (--memory-mib)"
            if st["state"] == 4
            else ""
        )
        raise RuntimeError(f"the guest is not running (state {st['state']}) {why}")
    r = {
        "seconds": round(elapsed, 3),
        "tx_per_s": round((s1 - s0) / elapsed, 1),
        "cpu_percent": {k: round(100 * (c1[k] - c0[k]) / elapsed, 1) for k in c0},
        # where the guest's wall time went (schedstat): on a CPU, runnable but
        # waiting for one (contention), the rest asleep (paused, or waiting)
        "guest_running_percent": round((q1[0] - q0[0]) / (n1 - n0) * 100, 1),
        "guest_runqueue_percent": round((q1[1] - q0[1]) / (n1 - n0) * 100, 1),
        "guest_asleep_percent": round(100 - (q1[0] - q0[0] + q1[1] - q0[1]) / (n1 - n0) * 100, 1),
        "tx_per_cpu_s": round((s1 - s0) / ((q1[0] - q0[0]) / 1e9), 1) if q1[0] > q0[0] else None,
        "load_average": load_average(),
        **latencies(rows),
    }
    if protected:
        r.update(
            checkpoints_per_s=w["checkpoints_per_s"],
            pause_ms=w["pause_ms"],
            dirty_pages=w["dirty_pages"],
            bytes_per_checkpoint=w["bytes_per_checkpoint"],
            daemons_cpu_percent=w["cpu_percent"],
        )
    return r


def floor_ms(interval_ms: int, p: dict) -> float | None:
    """interval/2 + pause median + barrier->release median."""
    try:
        return round(
            interval_ms / 2 + p["pause_ms"]["median"] + p["barrier_to_release_ms"]["p50"], 3
        )
    except KeyError:
        return None


def one_round(
    stack: Stack, rnd: int, memory: int, seconds: float, warm: float, order: list[int]
) -> dict:
    name = f"ledger{rnd}"
    dom = stack.primary.create(memory, "ledger", seed=7 + rnd, rate=1000.0, name=name, paused=True)
    log_path = os.path.join(stack.base, f"{name}.timing")
    try:
        # the timing log is a simulator hook with no SimDomain method of its own
        dom._request("output_timing", b"L", log_path.encode())
        dom.set_rate(math.inf)  # the max-rate mode
        dom.unpause()
        log = TimingLog(log_path)
        time.sleep(warm)
        unprot: list[dict] = []
        prot: dict[str, dict] = {}
        for iv in order:
            time.sleep(0.5)
            unprot.append(measure(stack, dom, log, seconds, False))
            t0 = time.monotonic()
            copy = stack.protect(name, CODEC, iv)
            time.sleep(warm)
            p = measure(stack, dom, log, seconds, True)
            p["interval_ms"] = iv
            p["protect_s"] = round(time.monotonic() - t0 - warm, 2)
            p["initial_copy_s"] = copy["s"]
            stack.unprotect(name)
            prot[str(iv)] = p
        time.sleep(0.5)
        unprot.append(measure(stack, dom, log, seconds, False))
        for i, iv in enumerate(order):  # each P against the U windows beside it
            p = prot[str(iv)]
            ref = (unprot[i]["tx_per_s"] + unprot[i + 1]["tx_per_s"]) / 2
            p["unprotected_tx_per_s"] = round(ref, 1)
            p["ratio"] = round(p["tx_per_s"] / ref, 4) if ref else None
            eff = [u["tx_per_cpu_s"] for u in unprot[i : i + 2] if u.get("tx_per_cpu_s")]
            p["unprotected_tx_per_cpu_s"] = round(sum(eff) / len(eff), 1) if eff else None
            # the share of the window the guest sat paused by remusd
            p["paused_percent"] = round(
                p["checkpoints_per_s"] * p["pause_ms"].get("mean", 0) / 10, 2
            )
            p["floor_ms"] = floor_ms(iv, p)
            lat = p.get("latency_ms", {})
            if p["floor_ms"] is not None and lat.get("n"):
                p["p50_over_floor_ms"] = round(lat["p50"] - p["floor_ms"], 3)
                p["p50_over_half_interval_ms"] = round(lat["p50"] - iv / 2, 3)
        return {
            "order": order,
            "unprotected": unprot,
            "protected": {str(iv): prot[str(iv)] for iv in INTERVALS_MS},
            "log_capacity": Layout(DEFAULT_ACCOUNTS, memory // 4096 - MAGIC_PAGES).log_capacity,
            "transactions_at_end": dom.step,
        }
    finally:
        dom.destroy()
        with contextlib.suppress(OSError):
            os.unlink(log_path)


# --- the median over the rounds -----------------------------------------------------------


def _med(values) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.median(v)), 3) if v else None


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def combine(rounds: list[dict]) -> dict:
    """Median over the rounds of each figure the tables show."""
    unprot = [u for r in rounds for u in r["unprotected"]]
    out: dict = {
        "unprotected": {
            "tx_per_s": _med([u["tx_per_s"] for u in unprot]),
            "tx_per_s_rounds": [_med([u["tx_per_s"] for u in r["unprotected"]]) for r in rounds],
            "guest_cpu_percent": _med([u["cpu_percent"]["guest"] for u in unprot]),
            "guest_running_percent": _med([u.get("guest_running_percent") for u in unprot]),
            "guest_runqueue_percent": _med([u.get("guest_runqueue_percent") for u in unprot]),
            "tx_per_cpu_s": _med([u.get("tx_per_cpu_s") for u in unprot]),
            "latency_p50_ms": _med([_get(u, "latency_ms", "p50") for u in unprot]),
            "latency_max_ms": _med([_get(u, "latency_ms", "max") for u in unprot]),
        },
        "protected": {},
    }
    for iv in INTERVALS_MS:
        ps = [r["protected"][str(iv)] for r in rounds]

        def m(*keys, ps=ps):
            return _med([_get(p, *keys) for p in ps])

        out["protected"][str(iv)] = {
            "tx_per_s": m("tx_per_s"),
            "unprotected_tx_per_s": m("unprotected_tx_per_s"),
            "ratio": m("ratio"),
            "ratio_rounds": [p.get("ratio") for p in ps],
            "checkpoints_per_s": m("checkpoints_per_s"),
            "guest_running_percent": m("guest_running_percent"),
            "guest_runqueue_percent": m("guest_runqueue_percent"),
            "guest_asleep_percent": m("guest_asleep_percent"),
            "paused_percent": m("paused_percent"),
            "tx_per_cpu_s": m("tx_per_cpu_s"),
            "unprotected_tx_per_cpu_s": m("unprotected_tx_per_cpu_s"),
            "pause_ms": m("pause_ms", "median"),
            "pause_p99_ms": m("pause_ms", "p99"),
            "dirty_pages": m("dirty_pages", "median"),
            "latency_p50_ms": m("latency_ms", "p50"),
            "latency_p50_rounds": [_get(p, "latency_ms", "p50") for p in ps],
            "latency_p99_ms": m("latency_ms", "p99"),
            "latency_max_ms": m("latency_ms", "max"),
            "commit_to_barrier_p50_ms": m("commit_to_barrier_ms", "p50"),
            "barrier_to_release_p50_ms": m("barrier_to_release_ms", "p50"),
            "barrier_to_release_p99_ms": m("barrier_to_release_ms", "p99"),
            "period_p50_ms": m("period_ms", "p50"),
            "floor_ms": m("floor_ms"),
            "p50_over_floor_ms": m("p50_over_floor_ms"),
            "p50_over_half_interval_ms": m("p50_over_half_interval_ms"),
            "cpu_percent": {
                k: m("cpu_percent", k)
                for k in ("guest", "remusd", "receiver", "primary_host", "backup_host", "bench")
            },
            # the CDF: each quantile's median over the rounds
            "quantiles_ms": [
                round(float(np.median(q)), 4)
                for q in zip(*[p["quantiles_ms"] for p in ps if "quantiles_ms" in p], strict=True)
            ],
        }
    p25 = out["protected"]["25"]
    out["targets"] = {
        "throughput_25ms": {
            "target": f">= {TARGET_RATIO:.0%} of unprotected",
            "ratio": p25["ratio"],
            "met": p25["ratio"] is not None and p25["ratio"] >= TARGET_RATIO,
        },
        "latency_25ms": {
            "target": f"p50 <= interval/2 + {TARGET_OVER_HALF_MS} ms",
            "p50_ms": p25["latency_p50_ms"],
            "bound_ms": 25 / 2 + TARGET_OVER_HALF_MS,
            "met": p25["latency_p50_ms"] is not None
            and p25["latency_p50_ms"] <= 25 / 2 + TARGET_OVER_HALF_MS,
        },
    }
    return out


# --- output ------------------------------------------------------------------------------


def print_tables(res: dict) -> None:
    m, c = res["machine"], res["median"]
    u = c["unprotected"]
    print(
        f"\nwhat the guest feels: ledger at max rate, {res['memory_MiB']} MiB, codec {CODEC}; "
        f"median of {res['rounds']} rounds ({m['cpu']}, {m['cpus']} CPUs, load "
        f"{res['load_before']} -> {res['load_after']}; {res['elapsed_s']:.0f} s)"
    )
    print(
        f"\nunprotected: {u['tx_per_s']:.0f} tx/s (rounds "
        f"{' / '.join(f'{x:.0f}' for x in u['tx_per_s_rounds'])}), guest CPU "
        f"{u['guest_cpu_percent']:.0f}%, commit -> output {u['latency_p50_ms']} ms p50"
    )
    print(
        f"\n  {'interval':>8} {'tx/s':>8} {'unprot':>8} {'ratio':>6} {'ckpt/s':>7} {'pause':>6} "
        f"{'dirty':>5} {'guest':>6} {'remusd':>6} {'recv':>5} {'hosts':>6} {'bench':>6}"
    )
    for iv, p in c["protected"].items():
        cpu = p["cpu_percent"]
        hosts = (cpu["primary_host"] or 0) + (cpu["backup_host"] or 0)
        print(
            f"  {iv:>6}ms {p['tx_per_s']:>8.0f} {p['unprotected_tx_per_s']:>8.0f} "
            f"{p['ratio']:>6.3f} {p['checkpoints_per_s']:>7.1f} {p['pause_ms']:>5.2f}m "
            f"{p['dirty_pages']:>5.0f} {cpu['guest']:>5.0f}% {cpu['remusd']:>5.0f}% "
            f"{cpu['receiver']:>4.0f}% {hosts:>5.0f}% {cpu['bench'] or 0:>5.0f}%"
        )
    print(
        "\n  where the guest's wall time went (schedstat: on a CPU / runnable, waiting for one /"
        " asleep); remusd's pauses as a share of wall time; transactions per CPU second"
    )
    print(
        f"  {'interval':>8} {'on CPU':>7} {'runq':>6} {'asleep':>7} {'paused':>7} {'tx/CPU-s':>9} "
        f"{'unprot':>8}"
    )
    print(
        f"  {'unprot.':>8} {u.get('guest_running_percent') or 0:>6.1f}% "
        f"{u.get('guest_runqueue_percent') or 0:>5.1f}% {'':>7} {'':>7} "
        f"{u.get('tx_per_cpu_s') or 0:>9.0f}"
    )
    for iv, p in c["protected"].items():
        print(
            f"  {iv:>6}ms {p['guest_running_percent'] or 0:>6.1f}% "
            f"{p['guest_runqueue_percent'] or 0:>5.1f}% {p['guest_asleep_percent'] or 0:>6.1f}% "
            f"{p['paused_percent'] or 0:>6.2f}% {p['tx_per_cpu_s'] or 0:>9.0f} "
            f"{p['unprotected_tx_per_cpu_s'] or 0:>8.0f}"
        )
    print(
        "\n  output latency, commit -> release (ms); floor = interval/2 + pause + barrier->release"
    )
    print(
        f"  {'interval':>8} {'p50':>7} {'p99':>7} {'max':>7} {'->barrier':>9} {'->release':>9} "
        f"{'period':>7} {'floor':>7} {'p50-floor':>9} {'p50-iv/2':>8}"
    )
    for iv, p in c["protected"].items():
        print(
            f"  {iv:>6}ms {p['latency_p50_ms']:>7.2f} {p['latency_p99_ms']:>7.2f} "
            f"{p['latency_max_ms']:>7.2f} {p['commit_to_barrier_p50_ms']:>9.2f} "
            f"{p['barrier_to_release_p50_ms']:>9.2f} {p['period_p50_ms']:>7.2f} "
            f"{p['floor_ms']:>7.2f} {p['p50_over_floor_ms']:>9.2f} "
            f"{p['p50_over_half_interval_ms']:>8.2f}"
        )
    t = c["targets"]
    print(
        f"\n  throughput at 25 ms: {t['throughput_25ms']['ratio']:.3f} of unprotected "
        f"(target >= {TARGET_RATIO}: {'met' if t['throughput_25ms']['met'] else 'MISSED'})"
    )
    print(
        f"  latency p50 at 25 ms: {t['latency_25ms']['p50_ms']:.2f} ms (target <= "
        f"{t['latency_25ms']['bound_ms']} ms: {'met' if t['latency_25ms']['met'] else 'MISSED'})"
    )


def plot(res: dict, json_path: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    base = os.path.join(os.path.dirname(os.path.abspath(json_path)), "overhead")
    c = res["median"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for iv, p in c["protected"].items():
        q = np.asarray(p["quantiles_ms"])
        if len(q):
            (line,) = ax.plot(q, QUANTILES / 100, label=f"{iv} ms (p50 {p['latency_p50_ms']:.1f})")
            ax.axvline(int(iv) / 2, color=line.get_color(), lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("commit -> release to the client (ms); dotted: interval/2")
    ax.set_ylabel("fraction of transactions")
    ax.set_title(f"ledger output latency per interval (median of {res['rounds']} rounds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(base + "-latency-cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ivs = [int(iv) for iv in c["protected"]]
    ax.plot(ivs, [p["tx_per_s"] for p in c["protected"].values()], "o-", label="protected")
    ax.plot(
        ivs,
        [p["unprotected_tx_per_s"] for p in c["protected"].values()],
        "s--",
        label="unprotected (windows beside it)",
    )
    for r in res["rounds_raw"]:
        ax.plot(ivs, [r["protected"][str(iv)]["tx_per_s"] for iv in ivs], ".", color="grey")
    for iv, p in zip(ivs, c["protected"].values(), strict=True):
        ax.annotate(
            f"{p['ratio']:.2f}", (iv, p["tx_per_s"]), textcoords="offset points", xytext=(4, -12)
        )
    ax.set_xscale("log")
    ax.set_xticks(ivs, [str(iv) for iv in ivs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("checkpoint interval (ms)")
    ax.set_ylabel("ledger transactions/s")
    ax.set_title("max-rate ledger: throughput against interval (label: ratio)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(base + "-throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run(memory: int, rounds: int, seconds: float, warm: float, remusd_args: list[str]) -> dict:
    base = Path(tempfile.mkdtemp(prefix="bench-overhead-", dir="/dev/shm"))
    res: dict = {
        "machine": machine(),
        "memory_MiB": memory // MiB,
        "rounds": rounds,
        "window_s": seconds,
        "codec": CODEC,
        "remusd_args": remusd_args,
        "load_before": load_average(),
    }
    t0 = time.monotonic()
    stack = Stack(base / "stack", failover_ms=MEASURE_FAILOVER_MS, remusd_args=tuple(remusd_args))
    try:
        stack.start()
        raw = []
        for rnd in range(rounds):
            k = rnd % len(INTERVALS_MS)
            order = list(INTERVALS_MS[k:] + INTERVALS_MS[:k])
            print(f"round {rnd + 1}/{rounds}: intervals {order}", flush=True)
            raw.append(one_round(stack, rnd, memory, seconds, warm, order))
    except BaseException:
        for name in ("remusd", "receiver"):
            print(f"--- {name} log (last lines) ---\n{stack.log(name)[-3000:]}", file=sys.stderr)
        raise
    finally:
        stack.close()
        shutil.rmtree(base, ignore_errors=True)
    res["load_after"] = load_average()
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["median"] = combine(raw)
    res["rounds_raw"] = raw
    return res


def main(
    argv: list[str] | None = None,
    *,
    quick: bool = False,
    memory_mib: int | None = None,
    remusd_args: list[str] | None = None,
    json_path: str | None = None,
) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.overhead", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", default=quick, help="256 MiB, 2 s windows")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3; the median is shown)")
    p.add_argument("--memory-mib", type=int, default=memory_mib)
    p.add_argument(
        "--json", default=json_path or os.path.join(REPO, "bench", "results", "overhead.json")
    )
    p.add_argument("--remusd-arg", action="append", default=list(remusd_args or []), metavar="ARG")
    args = p.parse_args(argv)
    memory = (args.memory_mib or (256 if args.quick else 1024)) * MiB
    res = run(
        memory,
        args.rounds,
        2.0 if args.quick else 6.0,
        1.0 if args.quick else 1.5,
        args.remusd_arg,
    )
    res["quick"] = args.quick
    print_tables(res)
    save_json(res, args.json)
    for path in plot(res, args.json):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
