"""Wire compression codecs on real checkpoint streams: ratio and speed, per part.

    python -m bench.wire [--quick] [--seconds S] [--memory-mib M] [--json PATH]
    # bench/results/wire.json

What it measures (the real code paths, not a model of them):

1. Streams. remusd (the real daemon, codec xen) protects simulated guests to
   a file target (``--to file:``: the bare legacy stream) for a few seconds
   at 25 ms: a ``ledger`` guest (its memory as the simulator leaves it:
   mostly zero pages, as a freshly booted guest's), and a ``hotset`` guest
   whose memory bench.e2e fills first with 16 MiB of random bytes repeated
   (the worst case for a general-purpose compressor: nothing repeats within
   a segment). Each stream is cut into its initial copy (checkpoint 0) and
   its checkpoints, at the checkpoint boundaries xenbind.stream's Decoder
   reports.
2. Codecs. Each part goes through ``xenbind.wirecomp.Encoder`` (lz4; zstd at
   levels -1, 1, 3, 6; zstd 1 and 3 with 2 worker threads) as remusd.link
   sends it: the initial copy in its 1 MiB segments, each checkpoint as one
   send; then back through ``xenbind.wirecomp.Decoder`` as the receiver
   reads it, every byte checked. Times are CPU seconds of the process
   (zstd's worker threads included), medians of ``--reps`` passes.
3. Break-even. Compressing a part pays on a link of bandwidth L when
   ``1/L > 1/C + 1/(r L)`` (sender compress at C bytes/s, ratio r, the wire
   time shrinking r-fold), i.e. below ``L* = C (1 - 1/r)``; the receiver's
   decode runs while later segments are still arriving. The table gives L*
   in Mbit/s per codec and part: above it the link is fast enough that
   compressing only adds latency, which is why ``auto`` waits for TCP to say
   the network is the limit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import save_json
from bench.e2e import Stack, create, wait_for
from daemonkit.control import control_request
from xenbind.stream import CheckpointEnd, Decoder, Image
from xenbind.wirecomp import Decoder as WireDecoder
from xenbind.wirecomp import Encoder

MiB = 1 << 20
#: codec configurations: (label, codec, level, threads)
CONFIGS = [
    ("lz4", "lz4", 1, 0),
    ("zstd-1", "zstd", -1, 0),
    ("zstd1", "zstd", 1, 0),
    ("zstd3", "zstd", 3, 0),
    ("zstd6", "zstd", 6, 0),
    ("zstd1 x2", "zstd", 1, 2),
    ("zstd3 x2", "zstd", 3, 2),
]


def capture(
    stack: Stack, name: str, workload: str, memory: int, rate: float, seconds: float, path: str
) -> None:
    """Protect ``name`` to ``file:path`` for ``seconds``, then end cleanly."""
    create(stack, name, memory, workload, rate)
    control_request(
        stack.rsock, "protect", domain=name, target=f"file:{path}", interval_ms=25, codec="xen"
    )
    wait_for(f"{name} protected", lambda: stack.status(name)["state"] == "protected", 120)
    time.sleep(seconds)
    control_request(stack.rsock, "unprotect", domain=name, wait_s=60, timeout=70)
    wait_for(f"{name} stopped", lambda: stack.status(name)["state"] == "stopped", 60)


def split(stream: bytes) -> tuple[bytes, list[bytes]]:
    """The initial copy and each checkpoint's bytes, cut where the decoder
    ends each checkpoint (fed 4 KiB at a time: the cut is within 4 KiB of
    the checkpoint's last byte, which is where remusd's send of it ends)."""
    d = Decoder(max_p2m_size=1 << 24, base=Image().base)
    cuts = [0]
    step = 4096
    for at in range(0, len(stream), step):
        for ev in d.feed(stream[at : at + step]):
            if isinstance(ev, CheckpointEnd):
                cuts.append(min(len(stream), at + step))
    parts = [stream[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    return parts[0], parts[1:]


def run_config(units: list[bytes], codec: str, level: int, threads: int, reps: int) -> dict:
    comp, dec = [], []
    wire_bytes = raw_bytes = 0
    for _ in range(reps):
        enc = Encoder(codec, level, threads)
        t = time.process_time()
        wires = [b"".join(bytes(s) for s in enc.encode([u], True)) for u in units]
        comp.append(time.process_time() - t)
        wd = WireDecoder(codec)
        t = time.process_time()
        out = [b"".join(bytes(p) for p in wd.feed(w)) for w in wires]
        dec.append(time.process_time() - t)
        assert out == units, f"{codec}:{level} did not round-trip"
        wire_bytes, raw_bytes = enc.counts.wire_bytes, enc.counts.raw_bytes
    c, d = statistics.median(comp), statistics.median(dec)
    r = raw_bytes / wire_bytes
    cps = raw_bytes / c if c > 0 else float("inf")
    return {
        "raw_bytes": raw_bytes,
        "wire_bytes": wire_bytes,
        "ratio": round(r, 3),
        "compress_MBps": round(cps / 1e6, 1),
        "decompress_MBps": round(raw_bytes / d / 1e6, 1) if d > 0 else None,
        "break_even_Mbitps": round(cps * (1 - 1 / r) * 8 / 1e6, 1) if r > 1 else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB guests, 2 s, 2 reps")
    ap.add_argument(
        "--seconds", type=float, default=None, help="seconds of checkpoints (default 4)"
    )
    ap.add_argument("--memory-mib", type=int, default=None, help="guest size (default 1024)")
    ap.add_argument("--reps", type=int, default=None, help="passes per codec (default 3)")
    ap.add_argument("--json", default="bench/results/wire.json")
    a = ap.parse_args(argv)
    memory = (a.memory_mib or (256 if a.quick else 1024)) * MiB
    seconds = a.seconds or (2.0 if a.quick else 4.0)
    reps = a.reps or (2 if a.quick else 3)
    results: dict = {"memory_MiB": memory // MiB, "seconds": seconds, "reps": reps, "streams": {}}
    with tempfile.TemporaryDirectory(prefix="bench-wire-", dir="/dev/shm") as tmp:
        stack = Stack(Path(tmp) / "stack").start()
        try:
            for name, workload, rate in (
                ("ledger", "ledger", 20000.0),
                ("hotset", "hotset", 40000.0),
            ):
                path = os.path.join(tmp, f"{name}.stream")
                capture(stack, name, workload, memory, rate, seconds, path)
                stream = Path(path).read_bytes()
                os.unlink(path)
                initial, ckpts = split(stream)
                units = {
                    "initial copy": [initial[i : i + MiB] for i in range(0, len(initial), MiB)],
                    "checkpoints": ckpts,
                }
                res: dict = {}
                for part, us in units.items():
                    res[part] = {
                        "bytes": sum(map(len, us)),
                        "units": len(us),
                        "codecs": {
                            lab: run_config(us, c, lv, th, reps) for lab, c, lv, th in CONFIGS
                        },
                    }
                results["streams"][name] = res
                stack.primary.hv.destroy(name)
        finally:
            stack.close()
    results["load_end"] = os.getloadavg()[0]
    print_table(results)
    save_json(results, a.json)
    return 0


def print_table(r: dict) -> None:
    print(
        f"wire compression on real streams ({r['memory_MiB']} MiB guests, codec xen, 25 ms; CPU clock, median of {r['reps']})"
    )
    for name, parts in r["streams"].items():
        for part, p in parts.items():
            n = p["units"]
            print(
                f"\n{name}, {part}: {p['bytes'] / MiB:.1f} MiB in {n} send(s) ({p['bytes'] / max(n, 1) / 1024:.1f} KiB each)"
            )
            print(
                f"  {'codec':10} {'ratio':>7} {'comp MB/s':>10} {'dec MB/s':>9} {'pays below':>12}"
            )
            for lab, c in p["codecs"].items():
                print(
                    f"  {lab:10} {c['ratio']:7.2f} {c['compress_MBps']:10.1f} "
                    f"{c['decompress_MBps'] or 0:9.1f} {c['break_even_Mbitps']:>8.0f} Mbit/s"
                )
    print(f"\nload average (1 min) at the end: {r['load_end']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
