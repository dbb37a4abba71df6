"""Disk mirror benchmark: what the mirroring block server costs a guest's writes,
and the seal's round trip (issue 13).

    python -m bench.disk_mirror [--quick] [--dir DIR] [--json PATH]

Three block servers, each started fresh on its own disk file (``--dir``,
default /tmp: the root file system), each driven through a Unix socket by one
synchronous libnbd client (Debian's python3-libnbd, in this process; one
request in flight, so latency = the request's round trip):

  file          nbdkit's own ``file`` plugin (C): the baseline
  nbdmirror     xenbind/nbdmirror.py behind the blocksize filter, not mirroring
  mirroring     the same, mirroring to a xenbind.mirrorclient.MirrorStream in
                this process whose bytes are taken out (and dropped) as the
                writes go

Workloads per server: 4 KiB writes at random 4 KiB-aligned offsets, and 1 MiB
sequential writes over the whole disk (both without FUA: the page cache's
speed, as a guest's writes between flushes). Reported: MB/s, writes per
second, median and p99 latency (wall clock, perf_counter_ns).

Then the seal: ``MirrorClient.seal()`` round trips (the request, SEAL appended
under the write lock, the reply), median and p99, with the guest idle, and
with a writer process (4 KiB random writes back to back, through its own
libnbd connection) running. That round trip is what a checkpoint's pause pays
for the disk. Prints a table and writes JSON (default
bench/results/disk_mirror.json). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from xenbind import mirrorclient
from xenbind.mirrorclient import MirrorClient

KIB = 1 << 10
MIB = 1 << 20
SMALL = 4 * KIB
LARGE = MIB

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
def server(kind: str, disk: str, d: str) -> Iterator[tuple[str, MirrorClient | None]]:
    """One fresh server on ``disk``; yields (its NBD socket, its control client)."""
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
        proc = mirrorclient.start_server([disk], sock, control)
        client = MirrorClient(control)
    try:
        yield sock, client
    finally:
        if client is not None:
            client.close()
        proc.terminate()
        proc.wait(10)


class Drain:
    """Takes the mirror stream's bytes out as they come (remusd would forward them)."""

    def __init__(self, stream: mirrorclient.MirrorStream) -> None:
        self.stream = stream
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.bytes += sum(len(p) for p in self.stream.take_available())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes += sum(len(p) for p in self.stream.take_available())
        self.stream.close()


def write_rows(nbd: Any, sock: str, size: int, small_n: int, large_passes: int) -> dict[str, Any]:
    h = nbd.NBD()
    h.connect_unix(sock)
    rng = random.Random(1)
    small = rng.randbytes(SMALL)
    large = rng.randbytes(LARGE)
    offsets = [rng.randrange(size // SMALL) * SMALL for _ in range(small_n + 100)]
    it = iter(offsets)
    us, secs = latencies(lambda: h.pwrite(small, next(it)), small_n, warmup=100)
    rows = {"4k-random": summary(us, small_n * SMALL, secs)}
    pos = [0]

    def seq() -> None:
        h.pwrite(large, pos[0])
        pos[0] = (pos[0] + LARGE) % size

    n = large_passes * (size // LARGE)
    us, secs = latencies(seq, n, warmup=8)
    rows["1m-sequential"] = summary(us, n * LARGE, secs)
    h.flush()
    h.shutdown()
    return rows


def seal_rows(client: MirrorClient, sock: str, seals: int) -> dict[str, Any]:
    stream = client.start(0)
    drain = Drain(stream)
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
    client.stop()
    drain.close()
    out["stream_bytes"] = drain.bytes
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


def run(d: str, size: int, small_n: int, large_passes: int, seals: int) -> dict[str, Any]:
    nbd = mirrorclient.load_libnbd()
    res: dict[str, Any] = {"rows": {}, "disk_bytes": size, "dir": d}
    for kind in ("file", "nbdmirror", "mirroring"):
        disk = os.path.join(d, f"{kind}.img")
        make_disk(disk, size)
        with server(kind, disk, d) as (sock, client):
            drain = None
            if kind == "mirroring":
                assert client is not None
                drain = Drain(client.start(0))
            res["rows"][kind] = write_rows(nbd, sock, size, small_n, large_passes)
            if drain is not None:
                assert client is not None
                info = client.info()
                drain.close()
                res["rows"][kind]["mirror_bytes"] = drain.bytes
                res["rows"][kind]["mirror_held_to_the_end"] = bool(info["mirroring"])
            if kind == "nbdmirror":
                assert client is not None
                res["seal"] = seal_rows(client, sock, seals)
        os.unlink(disk)
    res["machine"] = {
        "node": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "nbdkit": subprocess.run(
            ["nbdkit", "--version"], capture_output=True, text=True
        ).stdout.strip(),
    }
    return res


def print_table(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(
        f"disk mirror: synchronous libnbd writes over a Unix socket, {res['disk_bytes'] >> 20} MiB "
        f"disk in {res['dir']}; {m['nbdkit']}, kernel {m['kernel']}, {m['cpus']} cpus"
    )
    hdr = (
        f"{'server':<10} {'workload':<14} {'writes':>7} {'MB/s':>8} {'writes/s':>9} "
        f"{'median us':>10} {'p99 us':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    for kind, rows in res["rows"].items():
        for wl in ("4k-random", "1m-sequential"):
            r = rows[wl]
            print(
                f"{kind:<10} {wl:<14} {r['writes']:7d} {r['mb_per_s']:8.1f} "
                f"{r['writes_per_s']:9.0f} {r['median_us']:10.1f} {r['p99_us']:9.1f}"
            )
    s = res["seal"]
    print(f"\nseal round trip (MirrorClient.seal), {s['idle']['seals']} seals each")
    print(
        f"{'guest':<16} {'median us':>10} {'p99 us':>9} {'max us':>9}   "
        f"in the server (last {s['idle']['in_server']['seals']}): median, p99, max us"
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
    mir = res["rows"]["mirroring"]
    print(
        f"mirrored {mir['mirror_bytes'] >> 20} MiB of stream; mirror held to the end: "
        f"{mir['mirror_held_to_the_end']}"
    )


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(prog="python -m bench.disk_mirror", description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer writes and seals")
    ap.add_argument("--dir", default="/tmp", help="where the disk files go (default /tmp)")
    ap.add_argument(
        "--json", default="bench/results/disk_mirror.json", help="where to write the JSON"
    )
    args = ap.parse_args(argv)
    why = mirrorclient.missing()
    if why:
        print(f"bench.disk_mirror: {why}", file=sys.stderr)
        return 2
    d = tempfile.mkdtemp(prefix="diskbench", dir=args.dir)
    try:
        if args.quick:
            res = run(d, 64 * MIB, small_n=2000, large_passes=1, seals=1100)
        else:
            res = run(d, 256 * MIB, small_n=20000, large_passes=2, seals=5000)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    try:
        res["loadavg_1min_after"] = os.getloadavg()[0]
    except OSError:
        res["loadavg_1min_after"] = None
    print_table(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
