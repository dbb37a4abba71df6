"""Disk mirror benchmark: what the mirroring block server costs a guest's writes,
and the seal's round trip (issue 13).

    python -m bench.disk_mirror [--quick] [--runs N] [--dir DIR] [--json PATH]

Three block servers run side by side, each on its own disk file (``--dir``,
default /tmp: the root file system), each driven through a Unix socket by one
synchronous libnbd client (Debian's python3-libnbd, in this process; one
request in flight, so latency = the request's round trip):

  file          nbdkit's own ``file`` plugin (C): the baseline
  nbdmirror     xenbind/nbdmirror.py behind the blocksize filter, not mirroring
                (the unprotected guest)
  mirroring     the same, mirroring (the protected guest) to a consumer
                process (a xenbind.mirrorclient.MirrorStream whose bytes are
                taken out and dropped as they come: remusd's place)

Workloads: 4 KiB writes at random 4 KiB-aligned offsets, and 1 MiB sequential
writes over the whole disk (both without FUA: the page cache's speed, as a
guest's writes between flushes). The servers take turns in blocks of writes
(BLOCK_4K / BLOCK_1M, the order rotated each round), so that a shared
machine's load falls on all three alike; each server's MB/s is its bytes over
the time of its own blocks. Reported per server: MB/s, writes per second,
median and p99 latency (wall clock, perf_counter_ns), and the ratios
protected / unprotected (mirroring / nbdmirror) and mirroring / file.

Then the seal: ``MirrorClient.seal()`` round trips on the mirroring server
(the request, SEAL queued under the write lock, the reply), median and p99,
with the guest idle, and with a writer process (4 KiB random writes back to
back, through its own libnbd connection) running. That round trip is what a
checkpoint's pause pays for the disk.

The whole run is repeated ``--runs`` times (default 3) with fresh servers;
the table gives the median over the runs of each figure (each ratio is taken
within its run, then the median). Prints the table and writes JSON (default
bench/results/disk_mirror.json: every run and the medians). Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from bench import load_average, save_json
from xenbind import mirrorclient, nbdmirror
from xenbind.mirrorclient import MirrorClient

KIB = 1 << 10
MIB = 1 << 20
SMALL = 4 * KIB
LARGE = MIB
KINDS = ("file", "nbdmirror", "mirroring")
WORKLOADS = ("4k-random", "1m-sequential")
#: Writes each server does per turn.
BLOCK_4K = 500
BLOCK_1M = 16

#: The writer process of the seal-under-load row: 4 KiB random writes until
#: its stdin closes. Runs in this interpreter with Debian's libnbd path added.
WRITER = """
import random, sys, threading
sys.path.append({dist!r})
import nbd
h = nbd.NBD()
h.connect_unix({sock!r})
size = h.get_size()
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
rng = random.Random(2)
buf = rng.randbytes(4096)
n = 0
print("ready", flush=True)
while not stop.is_set():
    h.pwrite(buf, rng.randrange(size // 4096) * 4096)
    n += 1
h.shutdown()
print(n, flush=True)
"""

#: The consumer process (remusd's place): starts the mirror, takes the
#: stream's bytes out as they come until its stdin closes, then prints the
#: bytes it took and whether the mirror held.
CONSUMER = """
import sys, threading
from xenbind.mirrorclient import MirrorClient
client = MirrorClient({control!r})
stream = client.start(0)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
n = 0
while not stop.wait(0.005):
    n += sum(len(p) for p in stream.take_available())
held = bool(client.info()["mirroring"])
client.stop()
stream.wait_lost(10)
n += sum(len(p) for p in stream.take_available())
stream.close()
print(n, held, flush=True)
"""


def summary(us: list[float], nbytes: int, seconds: float) -> dict[str, float]:
    s = sorted(us)
    n = len(s)
    return {
        "writes": n,
        "mb_per_s": nbytes / seconds / 1e6,
        "writes_per_s": n / seconds,
        "median_us": statistics.median(s),
        "p99_us": s[min(n - 1, int(n * 0.99))],
        "max_us": s[-1],
    }


def latencies(fn: Callable[[], object], n: int, warmup: int) -> tuple[list[float], float]:
    """Microseconds of each of ``n`` calls (after ``warmup``), and the total seconds."""
    for _ in range(warmup):
        fn()
    clock = time.perf_counter_ns
    out = []
    t_start = clock()
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1e3)
    return out, (clock() - t_start) / 1e9


def make_disk(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        os.posix_fallocate(f.fileno(), 0, size)


@contextmanager
def server(
    kind: str, disk: str, d: str, plugin: str | None = None
) -> Iterator[tuple[str, MirrorClient | None]]:
    """One fresh server on ``disk``; yields (its NBD socket, its control client).
    ``plugin``: another copy of xenbind/nbdmirror.py to run (an older one, to
    compare), with its diskstream.py and errors.py beside it."""
    sock = os.path.join(d, f"{kind}.sock")
    if kind == "file":
        proc = subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "--unix", sock, "file", disk],
            stdin=subprocess.DEVNULL,
        )
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise SystemExit(f"nbdkit file exited with {proc.returncode}")
            time.sleep(0.01)
        client = None
    else:
        control = os.path.join(d, f"{kind}.ctl")
        if plugin is None:
            proc = mirrorclient.start_server([disk], sock, control)
        else:
            argv = [
                os.path.abspath(plugin) if a == nbdmirror.__file__ else a
                for a in nbdmirror.command([disk], sock, control)
            ]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            while not os.path.exists(control):
                if proc.poll() is not None:
                    raise SystemExit(f"{plugin} exited with {proc.returncode}")
                time.sleep(0.01)
        client = MirrorClient(control)
    try:
        yield sock, client
    finally:
        if client is not None:
            client.close()
        proc.terminate()
        proc.wait(10)


class Consumer:
    """The mirror's consumer, in a process of its own (as remusd is)."""

    def __init__(self, control: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CONSUMER.format(control=control)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the consumer process did not start")

    def close(self) -> tuple[int, bool]:
        """Stop it: (the stream bytes it took, whether the mirror held to the end)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        n, held = self.proc.stdout.readline().split()
        self.proc.wait(10)
        return int(n), held == "True"


class Writer:
    """One server's client and its position in each workload."""

    def __init__(self, nbd: Any, sock: str, size: int, seed: int) -> None:
        self.h = nbd.NBD()
        self.h.connect_unix(sock)
        self.size = size
        rng = random.Random(seed)
        self.small = rng.randbytes(SMALL)
        self.large = rng.randbytes(LARGE)
        self.rng = random.Random(seed + 1)
        self.pos = 0
        self.us: dict[str, list[float]] = {w: [] for w in WORKLOADS}
        self.secs = dict.fromkeys(WORKLOADS, 0.0)

    def small_write(self) -> None:
        self.h.pwrite(self.small, self.rng.randrange(self.size // SMALL) * SMALL)

    def large_write(self) -> None:
        self.h.pwrite(self.large, self.pos)
        self.pos = (self.pos + LARGE) % self.size

    def block(self, workload: str, n: int) -> None:
        fn = self.small_write if workload == "4k-random" else self.large_write
        us, secs = latencies(fn, n, warmup=0)
        self.us[workload] += us
        self.secs[workload] += secs

    def rows(self) -> dict[str, Any]:
        self.h.flush()
        self.h.shutdown()
        out: dict[str, Any] = {}
        for w, size in (("4k-random", SMALL), ("1m-sequential", LARGE)):
            us = self.us[w]
            out[w] = summary(us, len(us) * size, self.secs[w])
        return out


def write_rows(writers: dict[str, Writer], small_n: int, large_n: int) -> None:
    """Every workload on every server, in turns of a block each."""
    for w in writers.values():  # warm up: page cache, first faults
        for _ in range(100):
            w.small_write()
        for _ in range(8):
            w.large_write()
    for workload, total, block in (
        ("4k-random", small_n, BLOCK_4K),
        ("1m-sequential", large_n, BLOCK_1M),
    ):
        order = list(writers)
        for r in range(max(1, total // block)):
            for kind in order[r % 3 :] + order[: r % 3]:
                writers[kind].block(workload, block)


def seal_rows(client: MirrorClient, sock: str, seals: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    us, _ = latencies(client.seal, seals, warmup=50)
    out["idle"] = _seal_summary(us)
    out["idle"]["in_server"] = client.info()["seal_time"]
    dist = mirrorclient.DEBIAN_DIST_PACKAGES
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(dist=dist, sock=sock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdout.readline()  # ready
    t0 = time.monotonic()
    us, _ = latencies(client.seal, seals, warmup=50)
    elapsed = time.monotonic() - t0
    writer.stdin.close()
    written = int(writer.stdout.readline())
    writer.wait(10)
    out["writer"] = _seal_summary(us)
    out["writer"]["in_server"] = client.info()["seal_time"]
    out["writer"]["writer_writes_per_s"] = written / elapsed  # roughly: its whole run
    return out


def _seal_summary(us: list[float]) -> dict[str, float]:
    s = sorted(us)
    n = len(s)
    return {
        "seals": n,
        "median_us": statistics.median(s),
        "p99_us": s[min(n - 1, int(n * 0.99))],
        "max_us": s[-1],
    }


def run_once(
    d: str, size: int, small_n: int, large_passes: int, seals: int, plugin: str | None
) -> dict[str, Any]:
    nbd = mirrorclient.load_libnbd()
    res: dict[str, Any] = {"rows": {}}
    with ExitStack() as stack:
        socks: dict[str, str] = {}
        clients: dict[str, MirrorClient | None] = {}
        for kind in KINDS:
            disk = os.path.join(d, f"{kind}.img")
            make_disk(disk, size)
            stack.callback(os.unlink, disk)
            socks[kind], clients[kind] = stack.enter_context(server(kind, disk, d, plugin))
        control = os.path.join(d, "mirroring.ctl")
        consumer = Consumer(control)
        writers = {k: Writer(nbd, socks[k], size, seed=1) for k in KINDS}
        write_rows(writers, small_n, large_passes * (size // LARGE))
        for kind, w in writers.items():
            res["rows"][kind] = w.rows()
        client = clients["mirroring"]
        assert client is not None
        res["seal"] = seal_rows(client, socks["mirroring"], seals)
        nbytes, held = consumer.close()
        res["mirror_bytes"] = nbytes
        res["mirror_held_to_the_end"] = held
    res["ratios"] = {
        w: {
            "mirroring/nbdmirror": res["rows"]["mirroring"][w]["mb_per_s"]
            / res["rows"]["nbdmirror"][w]["mb_per_s"],
            "mirroring/file": res["rows"]["mirroring"][w]["mb_per_s"]
            / res["rows"]["file"][w]["mb_per_s"],
            "added_median_us": res["rows"]["mirroring"][w]["median_us"]
            - res["rows"]["nbdmirror"][w]["median_us"],
        }
        for w in WORKLOADS
    }
    return res


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' median of every number, by the same keys (the first run's shape)."""

    def med(path: tuple[str, ...], proto: Any) -> Any:
        if isinstance(proto, dict):
            return {k: med((*path, k), v) for k, v in proto.items()}
        if isinstance(proto, bool) or not isinstance(proto, int | float):
            return [_at(r, path) for r in runs]
        return statistics.median(_at(r, path) for r in runs)

    return dict(med((), runs[0]))


def _at(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        d = d[k]
    return d


def machine() -> dict[str, Any]:
    return {
        "node": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "nbdkit": subprocess.run(
            ["nbdkit", "--version"], capture_output=True, text=True
        ).stdout.strip(),
    }


def print_table(res: dict[str, Any]) -> None:
    m = res["machine"]
    med = res["median"]
    print(
        f"disk mirror: synchronous libnbd writes over a Unix socket, {res['disk_bytes'] >> 20} MiB "
        f"disks in {res['dir']}; {m['nbdkit']}, kernel {m['kernel']}, {m['cpus']} cpus; "
        f"median of {len(res['runs'])} runs (load average {res['loadavg_1min_after']})"
    )
    print(f"plugin: {res['plugin']}")
    hdr = (
        f"{'workload':<14} {'server':<10} {'writes':>7} {'MB/s':>8} {'writes/s':>9} "
        f"{'median us':>10} {'p99 us':>9} {'vs nbdmirror':>13} {'vs file':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for wl in WORKLOADS:
        for kind in KINDS:
            r = med["rows"][kind][wl]
            rel = ""
            if kind == "mirroring":
                q = med["ratios"][wl]
                rel = f"{q['mirroring/nbdmirror']:13.0%} {q['mirroring/file']:8.0%}"
            print(
                f"{wl:<14} {kind:<10} {r['writes']:7.0f} {r['mb_per_s']:8.1f} "
                f"{r['writes_per_s']:9.0f} {r['median_us']:10.1f} {r['p99_us']:9.1f} {rel}"
            )
        q = med["ratios"][wl]
        per_run = ", ".join(f"{r['ratios'][wl]['mirroring/nbdmirror']:.0%}" for r in res["runs"])
        print(
            f"{'':<14} protected/unprotected per run: {per_run}; added median latency "
            f"{q['added_median_us']:.1f} us"
        )
    s = med["seal"]
    print(f"\nseal round trip (MirrorClient.seal), {s['idle']['seals']:.0f} seals each")
    print(
        f"{'guest':<16} {'median us':>10} {'p99 us':>9} {'max us':>9}   "
        f"in the server (last {s['idle']['in_server']['seals']:.0f}): median, p99, max us"
    )
    for name, key in (("idle", "idle"), ("writer running", "writer")):
        r = s[key]
        srv = r["in_server"]
        print(
            f"{name:<16} {r['median_us']:10.1f} {r['p99_us']:9.1f} {r['max_us']:9.1f}   "
            f"{srv['median_us']:.1f}, {srv['p99_us']:.1f}, {srv['max_us']:.1f}"
        )
    print(
        f"(the writer did about {s['writer']['writer_writes_per_s']:.0f} 4 KiB writes/s meanwhile)"
    )
    print(
        f"mirrored {med['mirror_bytes'] / MIB:.0f} MiB of stream per run; mirror held to the "
        f"end: {all(r['mirror_held_to_the_end'] for r in res['runs'])}"
    )


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(prog="python -m bench.disk_mirror", description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer writes and seals")
    ap.add_argument("--runs", type=int, default=3, help="runs to take the median of (default 3)")
    ap.add_argument(
        "--plugin",
        help="another copy of xenbind/nbdmirror.py to measure instead (its diskstream.py "
        "and errors.py beside it)",
    )
    ap.add_argument("--dir", default="/tmp", help="where the disk files go (default /tmp)")
    ap.add_argument(
        "--json", default="bench/results/disk_mirror.json", help="where to write the JSON"
    )
    args = ap.parse_args(argv)
    why = mirrorclient.missing()
    if why:
        print(f"bench.disk_mirror: {why}", file=sys.stderr)
        return 2
    if args.quick:
        size, small_n, large_passes, seals = 64 * MIB, 2000, 1, 1100
    else:
        size, small_n, large_passes, seals = 256 * MIB, 20000, 2, 5000
    runs = []
    for _ in range(max(1, args.runs)):
        d = tempfile.mkdtemp(prefix="diskbench", dir=args.dir)
        try:
            runs.append(run_once(d, size, small_n, large_passes, seals, args.plugin))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    res: dict[str, Any] = {
        "disk_bytes": size,
        "dir": args.dir,
        "plugin": os.path.abspath(args.plugin or nbdmirror.__file__),
        "machine": machine(),
        "runs": runs,
        "median": median_of(runs),
    }
    res["loadavg_1min_after"] = load_average()
    print_table(res)
    save_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
