"""Network buffer benchmark: the per-epoch barrier + release, netlink against tc.

    python -m bench.netbuf [--quick] [--epochs N] [--json PATH]

Runs itself in a private network namespace (``unshare -n``; root), where a
veth pair stands in for a guest's ``vif7.0``, and times one epoch's two
output-buffer operations (barrier, then release, timed as one span; wall
clock, perf_counter_ns) three ways in the same run:

  netlink   xenbind.netbuf.OutputBuffer.barrier() + .release(): two
            pre-encoded RTM_NEWQDISC requests on the open IPRoute socket
            and their ACKs (what remusd runs)
  IPRoute   pyroute2's high-level ``IPRoute.tc("change", ...)``, twice
  tc        two ``tc qdisc change`` processes (the old xenbind.netbuf:
            ``tc_epoch`` below is that reference path, with tc's own plug
            words ``block`` / ``release``)

With ``sch_plug`` in the kernel the operations act on the real plug qdisc
(OutputBuffer set up as on a dom0: IFB, plug, ingress redirect). Without it
(CONFIG_NET_SCH_PLUG unset) the same requests go to a stand-in: the IFB's root
is a ``pfifo`` and each operation is a change of its limit, through the same
OutputBuffer barrier/release code and NetlinkChannel (only the pre-encoded
messages differ: TCA_KIND "pfifo" instead of "plug"), the same rtnetlink
path in the kernel (tc_modify_qdisc -> the qdisc's change op, under the
RTNL), and ``tc qdisc change ... pfifo limit N`` for the tc row. The JSON
and the table say which was measured. Target (issue 15): barrier + release
< 100 us median by netlink. Prints a table and writes JSON (default
bench/results/netbuf.json). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from bench import load_average, save_json

INNER_ENV = "REMUS_BENCH_NETBUF_INNER"
VIF = "vif7.0"
IFB = "rifb7.0"
TARGET_US = 100.0


def tc_epoch(ifb: str, barrier: list[str], release: list[str]) -> None:
    """One epoch of the old path: one ``tc`` process per operation."""
    for words in (barrier, release):
        subprocess.run(
            ["tc", "qdisc", "change", "dev", ifb, "root", "handle", "1:", *words],
            check=True,
            capture_output=True,
            timeout=5,
        )


def timed(fn: Callable[[], None], n: int, warmup: int) -> list[float]:
    """Microseconds of each of ``n`` calls of ``fn`` (after ``warmup``)."""
    for _ in range(warmup):
        fn()
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1e3)
    return out


def summary(us: list[float]) -> dict[str, float]:
    s = sorted(us)
    n = len(s)
    return {
        "epochs": n,
        "median_us": statistics.median(s),
        "p90_us": s[min(n - 1, int(n * 0.90))],
        "p99_us": s[min(n - 1, int(n * 0.99))],
        "max_us": s[-1],
        "mean_us": statistics.fmean(s),
    }


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=10)


def plug_available() -> tuple[bool, str]:
    """(True, "") if this kernel has the plug qdisc, else (False, its answer)."""
    _sh("ip", "link", "add", "name", "probe0", "type", "ifb")
    try:
        r = subprocess.run(
            ["tc", "qdisc", "add", "dev", "probe0", "root", "plug"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    finally:
        _sh("ip", "link", "del", "dev", "probe0")
    return r.returncode == 0, (r.stderr or r.stdout).strip()


def run_inner(epochs: int, ipr_epochs: int, tc_epochs: int) -> dict[str, Any]:
    from xenbind import netbuf

    _sh("ip", "link", "add", "name", VIF, "type", "veth", "peer", "name", "geth0")
    _sh("ip", "link", "set", "dev", VIF, "up")
    has_plug, answer = plug_available()
    buf = netbuf.OutputBuffer(7, [VIF])
    if has_plug:
        mode = "plug"
        buf.barrier()  # the whole dom0 setup (IFB, plug, redirect) + a first barrier
        buf.release()
        idx = buf._index(buf._ipr, IFB)
        kind = "plug"
        opts_b: dict[str, int] = {"action": netbuf.TCQ_PLUG_BUFFER}
        opts_r: dict[str, int] = {"action": netbuf.TCQ_PLUG_RELEASE_ONE}
        tc_b, tc_r = ["plug", "block"], ["plug", "release"]
    else:
        mode = "stand-in: pfifo (no sch_plug)"
        buf._open()
        idx = buf._add_ifb(VIF, IFB)
        buf._add_redirect(VIF, IFB, idx)
        buf._ipr.tc("add", "pfifo", idx, handle="1:", limit=1000)
        # the same barrier()/release() code, with pfifo messages in place of plug ones
        buf._msgs = {
            netbuf.TCQ_PLUG_BUFFER: [netbuf.encode_qdisc(idx, "pfifo", {"limit": 1000})],
            netbuf.TCQ_PLUG_RELEASE_ONE: [netbuf.encode_qdisc(idx, "pfifo", {"limit": 1001})],
            netbuf.TCQ_PLUG_RELEASE_INDEFINITE: [
                netbuf.encode_qdisc(idx, "pfifo", {"limit": 1000})
            ],
        }
        buf._ready = True
        kind = "pfifo"
        opts_b, opts_r = {"limit": 1000}, {"limit": 1001}
        tc_b, tc_r = ["pfifo", "limit", "1000"], ["pfifo", "limit", "1001"]

    def netlink_epoch() -> None:
        buf.barrier()
        buf.release()

    ipr = buf._ipr

    def ipr_epoch() -> None:
        ipr.tc("change", kind, idx, handle="1:", **opts_b)
        ipr.tc("change", kind, idx, handle="1:", **opts_r)

    rows = {
        "netlink": summary(timed(netlink_epoch, epochs, warmup=200)),
        "IPRoute.tc": summary(timed(ipr_epoch, ipr_epochs, warmup=20)),
        "tc": summary(timed(lambda: tc_epoch(IFB, tc_b, tc_r), tc_epochs, warmup=5)),
    }
    buf.unplug()
    med = rows["netlink"]["median_us"]
    return {
        "mode": mode,
        "kernel_answer_for_plug": answer if not has_plug else "ok",
        "rows": rows,
        "target_us": TARGET_US,
        "target_met": med < TARGET_US,
        "netlink_vs_tc_median": rows["tc"]["median_us"] / med if med else 0.0,
        "machine": {
            "node": platform.node(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pyroute2": version("pyroute2"),
            "tc": subprocess.run(["tc", "-V"], capture_output=True, text=True).stdout.strip(),
        },
    }


def print_table(res: dict[str, Any]) -> None:
    print(
        f"network buffer: one epoch = barrier + release, wall clock, {res['mode']}; "
        f"kernel {res['machine']['kernel']}, {res['machine']['cpus']} cpus, "
        f"pyroute2 {res['machine']['pyroute2']}"
    )
    hdr = f"{'path':<12} {'epochs':>7} {'median us':>10} {'p90 us':>9} {'p99 us':>9} {'max us':>9}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in res["rows"].items():
        print(
            f"{name:<12} {r['epochs']:7d} {r['median_us']:10.1f} {r['p90_us']:9.1f} "
            f"{r['p99_us']:9.1f} {r['max_us']:9.1f}"
        )
    ok = "met" if res["target_met"] else "MISSED"
    print(
        f"\ntarget: netlink median < {res['target_us']:.0f} us [{ok}]; "
        f"tc / netlink median: {res['netlink_vs_tc_median']:.0f}x"
    )
    if res["mode"] != "plug":
        print(f"(the kernel's answer to a plug qdisc: {res['kernel_answer_for_plug']!r})")
    print(f"load average (1 min) at the end: {res['loadavg_1min_after']}")


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(prog="python -m bench.netbuf", description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs")
    ap.add_argument("--epochs", type=int, help="netlink epochs (default 20000, quick 2000)")
    ap.add_argument("--json", default="bench/results/netbuf.json", help="where to write the JSON")
    args = ap.parse_args(argv)
    if os.environ.get(INNER_ENV) != "1":
        if os.geteuid() != 0:
            print("bench.netbuf: needs root (it creates a network namespace)", file=sys.stderr)
            return 2
        env = dict(os.environ, **{INNER_ENV: "1"})
        cmd = ["unshare", "-n", sys.executable, "-m", "bench.netbuf", *(argv or sys.argv[1:])]
        return subprocess.run(cmd, env=env, check=False).returncode
    epochs = args.epochs or (2000 if args.quick else 20000)
    res = run_inner(epochs, max(100, epochs // 10), max(50, epochs // 50))
    res["loadavg_1min_after"] = load_average()
    print_table(res)
    save_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
