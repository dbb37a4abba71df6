"""Pause per checkpoint with disk writes (issue 13).

    python -m bench.disk_pause [--quick] [--rounds N] [--mbps 50] [--json PATH]

Target (issue 13): the pause per checkpoint with 1,000 dirty pages and a
guest writing 50 MB/s to its disk is no more than 0.5 ms above the same run
without disk writes.

The real daemons, as bench/e2e.py starts them (``bench.e2e.Stack``: two
simulated hosts on /dev/shm, ``remus-receiver`` with a 5 s failover timeout,
``remusd --ack-timeout 5``, 127.0.0.1 TCP, codec ``xen``, interval 25 ms). Three ``hotset``
guests of the same size and working set (256 MiB, 8,192 pages, Zipf 1.1),
all at the rate that gives about 1,000 dirty pages per 25 ms epoch
(calibrated on the first, ``bench.e2e.calibrate``):

  no-disk       no disk
  disk-idle     a 64 MiB disk (served by xenbind/nbdmirror.py, mirrored,
                sealed in every pause) and no disk writes (disk_every 0)
  disk-50MBps   the same disk, one 4 KiB block written every K steps, K
                chosen from the calibrated rate for --mbps MB/s

Only the guest being measured runs (the others are paused, unprotected).
Each round protects each guest in turn (the order rotates from round to
round), waits a warm-up, watches a window, unprotects. Figures per window:
pause median / p99 and dirty pages from remusd's per-checkpoint history
(``status`` with ``history``, as bench/e2e.py), checkpoints/s, CPU of remusd,
the receiver and the primary host's tree (guest workers and block servers);
the disk's MB/s twice: from the guest's steps (steps / K x 4 KiB) and from
remusd's ``disks.mirrored_bytes`` (records' headers and SEALs included); the
seal's round trip: remusd's ``disks.last_seal_ms`` sampled every 40 ms (each
new seal seen is one sample; the status is polled the same way for every
case, so the polling's cost is the same in all three). After each round,
each guest in turn runs unprotected while the bench times its own
checkpoint_stop() round trips (the simulated guest answers a stop between two
batches of steps, so a batch's disk writes in flight are waited for:
``stop_probe``; no mirror then, so its writes are faster). The table gives the
median over the rounds of each window's figure, and the differences to the
no-disk and disk-idle cases. Writes JSON (default
bench/results/disk_pause.json). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import save_json  # noqa: E402
from bench.e2e import (  # noqa: E402
    HOTSET_WSS,
    MEASURE_FAILOVER_MS,
    RATE_INTERVAL_MS,
    RATE_PAGES,
    Stack,
    calibrate,
    create,
    machine,
    summary,
    window,
)
from daemonkit.control import control_request  # noqa: E402
from tests.e2e.conftest import entries  # noqa: E402
from xenbind.sim.workloads import DISK_BLOCK  # noqa: E402

MiB = 1 << 20
MEMORY = 256 * MiB
DISK = 64 * MiB
CODEC = "xen"
CASES = ("no-disk", "disk-idle", "disk-50MBps")
#: how often the seal sampler reads remusd's status (s)
SEAL_POLL_S = 0.04
#: remusd's ACK timeout here (s): long, like the receiver's failover timeout,
#: so that a stall of this shared box does not end a window
ACK_TIMEOUT = "5"
#: checkpoint_stop() round trips timed per case and round (stop_probe)
PROBES = 100


def disk_every_for(rate: float, mbps: float) -> int:
    """Steps between two 4 KiB disk writes for ``mbps`` MB/s at ``rate`` steps/s."""
    return max(1, round(rate * DISK_BLOCK / (mbps * 1e6)))


class SealSampler:
    """remusd's ``disks`` block of one domain, polled every SEAL_POLL_S
    seconds while a window runs: each new seal's ``last_seal_ms``."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack, self.name = stack, name
        self.samples: list[float] = []
        self.polls = 0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SealSampler:
        self._th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join(5)

    def _run(self) -> None:
        seen = None
        while not self._stop.wait(SEAL_POLL_S):
            try:
                d = self.stack.status(self.name)
            except Exception:  # noqa: BLE001 - a missed sample, not a failure
                continue
            self.polls += 1
            disks = d.get("disks")
            if not disks:
                continue
            if seen is not None and disks["seals"] != seen:
                self.samples.append(float(disks["last_seal_ms"]))
            seen = disks["seals"]


def measure(stack: Stack, name: str, every: int, warmup: float, seconds: float) -> dict:
    """One protect session of ``name``: a warm-up, then one window."""
    dom = stack.primary.lookup(name)
    try:
        dom.unpause()
        stack.protect(name, CODEC, RATE_INTERVAL_MS)
        time.sleep(warmup)
        d0 = stack.status(name)
        rx0 = _rx_disks(stack, name)
        step0, t0 = dom.step, time.monotonic()
        with SealSampler(stack, name) as seals:
            w = window(stack, name, seconds)
        step1, t1 = dom.step, time.monotonic()
        d1 = stack.status(name)
        rx1 = _rx_disks(stack, name)
        stack.unprotect(name)
        dom.pause()
    finally:
        dom.close()
    el = t1 - t0
    out = {k: w[k] for k in ("seconds", "checkpoints", "checkpoints_per_s", "pause_ms")}
    out |= {k: w[k] for k in ("dirty_pages", "wire_MBps", "cpu_percent")}
    out["steps_per_s"] = round((step1 - step0) / el)
    out["disk_every"] = every
    out["guest_disk_MBps"] = (
        round((step1 - step0) / every * DISK_BLOCK / el / 1e6, 2) if every else 0
    )
    if d0.get("disks") and d1.get("disks"):
        mirrored = d1["disks"]["mirrored_bytes"] - d0["disks"]["mirrored_bytes"]
        out["mirrored_MBps"] = round(mirrored / el / 1e6, 2)
        out["seals"] = d1["disks"]["seals"] - d0["disks"]["seals"]
        out["seal_ms"] = summary(seals.samples)
    if rx0 and rx1:
        out["rx_epochs_applied"] = rx1["epochs_applied"] - rx0["epochs_applied"]
        out["rx_applied_MBps"] = round((rx1["bytes_applied"] - rx0["bytes_applied"]) / el / 1e6, 2)
        out["rx_spilled_bytes"] = rx1["epoch_spilled_bytes"]
    out["status_polls"] = seals.polls
    out["pause_samples_ms"] = w["pause_samples_ms"]
    return out


def stop_probe(stack: Stack, name: str, every: int, n: int) -> dict:
    """The guest unprotected (no mirror, no remusd): ``n`` times, the time
    the bench's own ``checkpoint_stop()`` takes to return (the simulated
    guest answers between two batches of steps, so a batch's synchronous disk
    writes in flight are waited for), one every interval."""
    dom = stack.primary.lookup(name)
    lat: list[float] = []
    try:
        dom.unpause()
        time.sleep(0.3)
        step0, t0 = dom.step, time.monotonic()
        for _ in range(n):
            time.sleep(RATE_INTERVAL_MS / 1e3)
            t = time.perf_counter()
            dom.checkpoint_stop()
            lat.append((time.perf_counter() - t) * 1e3)
            dom.checkpoint_go()
        step1, t1 = dom.step, time.monotonic()
        dom.pause()
    finally:
        dom.close()
    el = t1 - t0
    mbps = round((step1 - step0) / every * DISK_BLOCK / el / 1e6, 2) if every else 0.0
    return {"stop_ms": summary(lat), "steps_per_s": round((step1 - step0) / el), "disk_MBps": mbps}


def _rx_disks(stack: Stack, name: str) -> dict | None:
    """The receiver's ``disks`` block of the domain's (last) session."""
    found = [
        s
        for s in entries(control_request(stack.bsock, "status", timeout=10))
        if name in (s.get("domain"), s.get("name"))
    ]
    return found[-1].get("disks") if found else None


def med(xs: list) -> float | None:
    have = [x for x in xs if x is not None]
    return round(statistics.median(have), 3) if have else None


def combine(windows: list[dict]) -> dict:
    """The median over the rounds of each window's figures."""
    out: dict = {"rounds": len(windows)}
    out["pause_median_ms"] = med([w["pause_ms"]["median"] for w in windows])
    out["pause_p99_ms"] = med([w["pause_ms"]["p99"] for w in windows])
    out["checkpoints_per_s"] = med([w["checkpoints_per_s"] for w in windows])
    out["dirty_pages_median"] = med([w["dirty_pages"]["median"] for w in windows])
    out["guest_disk_MBps"] = med([w["guest_disk_MBps"] for w in windows])
    out["mirrored_MBps"] = med([w.get("mirrored_MBps") for w in windows])
    seal = [w["seal_ms"] for w in windows if w.get("seal_ms", {}).get("n")]
    out["seal_median_ms"] = med([s["median"] for s in seal])
    out["seal_p99_ms"] = med([s["p99"] for s in seal])
    out["seal_samples"] = sum(s["n"] for s in seal)
    for k in ("remusd", "receiver", "primary_host", "backup_host"):
        out[f"cpu_{k}_pct"] = med([w["cpu_percent"][k] for w in windows])
    out["steps_per_s"] = med([w["steps_per_s"] for w in windows])
    return out


def print_table(r: dict) -> None:
    c = r["cases"]
    print(
        f"\nhotset {r['memory_MiB']} MiB, wss {HOTSET_WSS}, rate {r['rate']:.0f} pages/s, "
        f"interval {RATE_INTERVAL_MS} ms, codec {CODEC}, disk {r['disk_MiB']} MiB, "
        f"disk_every {r['disk_every']}; median of {r['rounds']} rounds"
    )
    hdr = (
        f"{'case':12s} {'pause med':>9s} {'p99':>6s} {'ckpt/s':>6s} {'dirty':>6s} "
        f"{'disk MB/s':>9s} {'mirr MB/s':>9s} {'seal med':>8s} {'p99':>6s} "
        f"{'remusd%':>7s} {'rx%':>5s} {'host%':>5s}"
    )
    print(hdr)

    def f(v, w=6, p=2):
        return f"{'-':>{w}s}" if v is None else f"{v:{w}.{p}f}"

    for k in CASES:
        x = c[k]
        print(
            f"{k:12s} {f(x['pause_median_ms'], 9)} {f(x['pause_p99_ms'])} "
            f"{f(x['checkpoints_per_s'], 6, 1)} {f(x['dirty_pages_median'], 6, 0)} "
            f"{f(x['guest_disk_MBps'], 9, 1)} {f(x['mirrored_MBps'], 9, 1)} "
            f"{f(x['seal_median_ms'], 8, 3)} {f(x['seal_p99_ms'], 6, 3)} "
            f"{f(x['cpu_remusd_pct'], 7, 0)} {f(x['cpu_receiver_pct'], 5, 0)} "
            f"{f(x['cpu_primary_host_pct'], 5, 0)}"
        )
    print(
        "\nunprotected (no mirror): the bench's checkpoint_stop() round trip, and what the "
        "guest reaches"
    )
    print(f"{'case':12s} {'stop med':>8s} {'p99':>6s} {'steps/s':>8s} {'disk MB/s':>9s}")
    for k in CASES:
        x = c[k]
        print(
            f"{k:12s} {f(x['unprotected_stop_median_ms'], 8, 3)} "
            f"{f(x['unprotected_stop_p99_ms'], 6, 3)} {f(x['unprotected_steps_per_s'], 8, 0)} "
            f"{f(x['unprotected_disk_MBps'], 9, 1)}"
        )
    d = r["deltas"]
    print(
        f"pause median, disk-50MBps - no-disk: {d['write_vs_nodisk_ms']:+.3f} ms; "
        f"- disk-idle: {d['write_vs_idle_ms']:+.3f} ms; disk-idle - no-disk: "
        f"{d['idle_vs_nodisk_ms']:+.3f} ms (per round: {d['per_round_write_vs_nodisk_ms']})"
    )
    print(f"target: disk-50MBps <= no-disk + 0.5 ms: {'met' if d['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.disk_pause", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one round, short windows")
    p.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    p.add_argument("--mbps", type=float, default=50.0, help="the writing guest's disk MB/s")
    p.add_argument("--seconds", type=float, help="window per case (default 6, --quick 3)")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "disk_pause.json"))
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    warmup = 1.0 if args.quick else 2.0
    base = Path(
        tempfile.mkdtemp(
            prefix="bench-diskpause-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
    )
    t0 = time.monotonic()
    result: dict = {
        "machine": machine(),
        "memory_MiB": MEMORY // MiB,
        "disk_MiB": DISK // MiB,
        "interval_ms": RATE_INTERVAL_MS,
        "codec": CODEC,
        "target_pages": RATE_PAGES,
        "mbps_wanted": args.mbps,
        "rounds": rounds,
        "load_at_start": os.getloadavg(),
    }
    stack = Stack(
        base / "main", failover_ms=MEASURE_FAILOVER_MS, remusd_args=("--ack-timeout", ACK_TIMEOUT)
    ).start()
    try:
        kw = {"wss": HOTSET_WSS}
        dom = create(stack, "no-disk", MEMORY, "hotset", 120000.0, **kw)
        stack.protect("no-disk", CODEC, RATE_INTERVAL_MS)
        rate = calibrate(stack, dom, "no-disk", 120000.0, RATE_PAGES, 1.5)
        stack.unprotect("no-disk")
        dom.pause()
        dom.close()
        every = disk_every_for(rate, args.mbps)
        result |= {"rate": rate, "disk_every": every}
        print(f"calibrated: {rate:.0f} pages/s; disk_every {every}", flush=True)
        for name, ev in (("disk-idle", 0), ("disk-50MBps", every)):
            d = create(stack, name, MEMORY, "hotset", rate, disks=[DISK], disk_every=ev, **kw)
            d.pause()
            d.close()
        evs = {"no-disk": 0, "disk-idle": 0, "disk-50MBps": every}
        per: dict[str, list[dict]] = {k: [] for k in CASES}
        probes: dict[str, list[dict]] = {k: [] for k in CASES}
        for r in range(rounds):
            order = CASES[r % 3 :] + CASES[: r % 3]
            for case in order:
                w = measure(stack, case, evs[case], warmup, seconds)
                w["round"] = r
                per[case].append(w)
                print(
                    f"round {r} {case:12s} pause median {w['pause_ms']['median']:.3f} ms "
                    f"p99 {w['pause_ms']['p99']:.3f}, {w['checkpoints_per_s']:.1f}/s, "
                    f"{w['dirty_pages']['median']:.0f} pages, disk {w['guest_disk_MBps']} MB/s, "
                    f"seal {w.get('seal_ms', {}).get('median', '-')} ms",
                    flush=True,
                )
            for case in order:
                pr = stop_probe(stack, case, evs[case], PROBES)
                probes[case].append(pr)
                print(
                    f"round {r} {case:12s} unprotected: checkpoint_stop median "
                    f"{pr['stop_ms']['median']:.3f} ms p99 {pr['stop_ms']['p99']:.3f}, "
                    f"{pr['steps_per_s']} steps/s, disk {pr['disk_MBps']} MB/s",
                    flush=True,
                )
    finally:
        stack.close()
        shutil.rmtree(base, ignore_errors=True)
    cases = {k: combine(v) for k, v in per.items()}
    for k, prs in probes.items():
        cases[k]["unprotected_stop_median_ms"] = med([x["stop_ms"]["median"] for x in prs])
        cases[k]["unprotected_stop_p99_ms"] = med([x["stop_ms"]["p99"] for x in prs])
        cases[k]["unprotected_disk_MBps"] = med([x["disk_MBps"] for x in prs])
        cases[k]["unprotected_steps_per_s"] = med([x["steps_per_s"] for x in prs])
    pm = {k: cases[k]["pause_median_ms"] for k in CASES}
    per_round = [
        round(a["pause_ms"]["median"] - b["pause_ms"]["median"], 3)
        for a, b in zip(per["disk-50MBps"], per["no-disk"], strict=True)
    ]
    result["cases"] = cases
    result["deltas"] = {
        "write_vs_nodisk_ms": round(pm["disk-50MBps"] - pm["no-disk"], 3),
        "write_vs_idle_ms": round(pm["disk-50MBps"] - pm["disk-idle"], 3),
        "idle_vs_nodisk_ms": round(pm["disk-idle"] - pm["no-disk"], 3),
        "per_round_write_vs_nodisk_ms": per_round,
        "met": pm["disk-50MBps"] - pm["no-disk"] <= 0.5,
    }
    result["windows"] = per
    result["stop_probes"] = probes
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    print_table(result)
    save_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
