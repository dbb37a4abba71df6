"""python -m xenbind.sim: run a simulated Xen host and operate its domains.

Exit status: 0 success, 1 a domain operation or check failed (the message on
stderr says which domain and why), 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DESCRIPTION = """\
Run a simulated Xen host and operate its domains.

A simulated host is one process owning one directory (DIR). Each domain is a
process of its own whose memory is the file DIR/dom-N.mem: the remus daemons
map it the way Xen's foreign mapping would. Put DIR on tmpfs (/dev/shm): guest
memory is then RAM, not a disk file. Log-dirty tracking uses userfaultfd write
protection where the kernel supports it for DIR's filesystem and otherwise
falls back to a bitmap the workloads keep (the host says which in its log and
in 'list'). Killing the host, even with SIGKILL, kills its domains, as a host
failure would; digest, outputs and ledger-check still work on DIR afterwards.

DIR is given with --dir or the REMUS_SIM_DIR environment variable.
"""

EPILOG = """\
workloads (one step = one page write, except ledger: one transaction):
  idle      writes nothing
  random    pages uniformly at random over the guest; --rate pages/s
  hotset    a Zipf-skewed working set of --wss pages (exponent --zipf); --rate pages/s
  scan      pages 0, 1, 2, ... in turn: N steps dirty exactly N distinct pages
  ledger    a bank: --accounts accounts and a transaction log; --rate transactions/s.
            Every transaction prints 'ack TXID FROM TO AMOUNT' to its output, which
            reaches DIR/dom-N.out only when the protecting daemon releases it.

examples:
  python -m xenbind.sim host --dir /dev/shm/primary &
  python -m xenbind.sim --dir /dev/shm/primary create --memory 64M --workload ledger --seed 1
  python -m xenbind.sim --dir /dev/shm/primary list --json
  python -m xenbind.sim --dir /dev/shm/primary outputs 1 > acked.txt
  python -m xenbind.sim --dir /dev/shm/backup ledger-check 1 --acked acked.txt

files in DIR:
  host.sock, host.pid, host.lock   the running host
  dom-N.mem                        guest memory, PFN p at byte p*4096
  dom-N.json, dom-N.ctl            metadata; live status page
  dom-N.out                        released output;  dom-N.log  the domain's log

pauses are counted as Xen counts them: a domain paused twice (say by the
operator and by remusd) runs again only after two unpauses.

exit status: 0 success; 1 the operation or check failed; 2 bad usage.
See docs/simulator.md for the whole story.
"""


#: the default of ``host --create-delay`` (seconds), for hosts started by others (tests)
CREATE_DELAY_ENV = "REMUS_SIM_CREATE_DELAY_S"


def parse_size(text: str) -> int:
    """'64M', '1G', '65536K', '4096' (bytes) -> bytes; whole pages only."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    if not t.isdigit():
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 64M, 1G, 262144K)")
    size = int(t) * mult
    if size % 4096 or size <= 0:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not a positive whole number of 4 KiB pages"
        )
    return size


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        default=argparse.SUPPRESS,
        help="the simulated host's directory (default: $REMUS_SIM_DIR)",
    )
    p = argparse.ArgumentParser(
        prog="python -m xenbind.sim",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name: str, help_: str, desc: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=desc or help_,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    h = add(
        "host",
        "run the simulated host in the foreground",
        "Run the simulated host owning DIR in the foreground until SIGTERM or SIGINT\n"
        "(a clean stop: every domain dies, the files stay). One host per DIR.",
    )
    h.add_argument(
        "--create-delay",
        metavar="SECONDS",
        type=float,
        default=float(os.environ.get(CREATE_DELAY_ENV) or 0),
        help="a slow toolstack: every create is answered this long after it is done, "
        f"the host serving other requests meanwhile (default ${CREATE_DELAY_ENV} or 0)",
    )
    c = add(
        "create",
        "create a domain and print its domid",
        "Create a domain, start its workload (unless --paused) and print its domid.",
    )
    c.add_argument(
        "--memory",
        metavar="SIZE",
        type=parse_size,
        default=parse_size("64M"),
        help="guest memory: bytes or K/M/G suffix, whole 4 KiB pages (default 64M)",
    )
    c.add_argument(
        "--workload",
        default="idle",
        choices=["idle", "random", "hotset", "scan", "ledger"],
        help="what the guest does (see 'python -m xenbind.sim --help'; default idle)",
    )
    c.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    c.add_argument(
        "--rate",
        type=float,
        default=None,
        help="steps per second (pages/s; ledger: transactions/s)",
    )
    c.add_argument("--name", default=None, help="domain name (default simN)")
    c.add_argument("--paused", action="store_true", help="create the domain paused")
    c.add_argument("--wss", type=int, default=0, help="hotset: working-set pages (default 1024)")
    c.add_argument("--zipf", type=float, default=0.0, help="hotset: Zipf exponent (default 1.1)")
    c.add_argument(
        "--accounts", type=int, default=0, help="ledger: number of accounts (default 1000)"
    )
    c.add_argument(
        "--dirty-mode",
        default="auto",
        choices=["auto", "uffd-wp", "bitmap"],
        help="log-dirty mechanism",
    )
    ls = add("list", "list the host's domains")
    ls.add_argument(
        "--json",
        action="store_true",
        help="one JSON array: domid, name, pages, workload, state, ...",
    )
    for name, what in (
        ("pause", "pause a domain (pauses are counted)"),
        ("unpause", "unpause a domain"),
        ("destroy", "destroy a domain and remove its files"),
    ):
        add(name, what).add_argument("id", metavar="ID", help="domid or name")
    r = add("set-rate", "change a domain's workload rate")
    r.add_argument("id", metavar="ID", help="domid or name")
    r.add_argument("rate", type=float, help="steps per second")
    add(
        "digest",
        "print the SHA-256 of a domain's memory",
        "Print the SHA-256 of the domain's whole memory file. Pause the domain first\n"
        "for a stable answer. Works after the host died.",
    ).add_argument("id", metavar="ID", help="domid or name")
    add(
        "outputs",
        "print a domain's released output",
        "Print the output the domain released to the outside world (for ledger:\n"
        "'ack TXID FROM TO AMOUNT' lines). Works after the host died.",
    ).add_argument("id", metavar="ID", help="domid or name")
    lc = add(
        "ledger-check",
        "check the ledger invariants in a domain's memory",
        "Check the ledger guest in the domain's memory: header well formed, total\n"
        "intact, no negative balance, log entries well formed and numbered, balances\n"
        "equal to replaying the log, and (with --acked) every acknowledged transaction\n"
        "present in the log with the same fields. Pause the domain first. Works after\n"
        "the host died. Exit status 1 and one line per violation on any failure.",
    )
    lc.add_argument("id", metavar="ID", help="domid or name")
    lc.add_argument(
        "--acked",
        metavar="FILE",
        help="acknowledgements ('outputs' format) that must be in the log",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sim_dir = getattr(args, "dir", None) or os.environ.get("REMUS_SIM_DIR")
    if not sim_dir:
        print("error: no host directory: give --dir DIR or set REMUS_SIM_DIR", file=sys.stderr)
        return 2
    if args.cmd == "host":
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from .host import main as host_main

        if args.create_delay < 0:
            print("error: --create-delay must be 0 or more seconds", file=sys.stderr)
            return 2
        return host_main(sim_dir, args.create_delay)

    from ..errors import RemusError

    try:
        return _run(args, os.path.abspath(sim_dir))
    except RemusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args, sim_dir: str) -> int:
    from . import postmortem
    from .client import SimHypervisor

    if args.cmd in ("digest", "outputs", "ledger-check"):
        if not os.path.isdir(sim_dir):
            print(f"error: {sim_dir} is not a directory", file=sys.stderr)
            return 1
        if args.cmd == "digest":
            print(postmortem.digest(sim_dir, args.id))
        elif args.cmd == "outputs":
            sys.stdout.buffer.write(postmortem.outputs(sim_dir, args.id))
        else:
            problems, summary = postmortem.ledger_check(sim_dir, args.id, args.acked)
            for p in problems:
                print(f"ledger-check: domain {args.id}: {p}", file=sys.stderr)
            facts = ", ".join(f"{k} {v}" for k, v in summary.items())
            if problems:
                print(f"ledger-check: domain {args.id}: FAILED ({facts})", file=sys.stderr)
                return 1
            print(f"ledger-check: domain {args.id}: OK ({facts})")
        return 0

    hv = SimHypervisor(sim_dir)
    if args.cmd == "create":
        dom = hv.create(
            args.memory,
            args.workload,
            args.seed,
            args.rate,
            args.name,
            paused=args.paused,
            wss=args.wss,
            zipf=args.zipf,
            accounts=args.accounts,
            dirty_mode=args.dirty_mode,
        )
        print(dom.domid)
    elif args.cmd == "list":
        infos = hv.list()
        if args.json:
            rows = [
                {
                    "domid": i.domid,
                    "name": i.name,
                    "uuid": i.uuid,
                    "pages": i.pages,
                    "vcpus": i.vcpus,
                    "state": i.state,
                    "workload": i.extra["workload"],
                    "dirty_mode": i.extra["dirty_mode"],
                    **{k: v for k, v in i.extra.items() if k not in ("workload", "dirty_mode")},
                }
                for i in infos
            ]
            print(json.dumps(rows, indent=1))
        else:
            print(
                f"{'ID':>4} {'NAME':<16} {'MEMORY':>8} {'WORKLOAD':<8} {'STATE':<9} {'STEP':>10} DIRTY"
            )
            for i in infos:
                print(
                    f"{i.domid:>4} {i.name:<16} {i.pages * 4096 >> 20:>7}M {i.extra['workload']:<8} "
                    f"{i.state:<9} {i.extra['step']:>10} {i.extra['dirty_mode']}"
                )
    elif args.cmd in ("pause", "unpause", "set-rate"):
        dom = hv.lookup(args.id)
        try:
            if args.cmd == "pause":
                dom.pause()
            elif args.cmd == "unpause":
                dom.unpause()
            else:
                dom.set_rate(args.rate)
        finally:
            dom.close()
    elif args.cmd == "destroy":
        hv.destroy(args.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
