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
            With a disk, every transaction is journaled to it before it is acknowledged.

disks (--disk SIZE): a sparse image DIR/dom-N-disk0.img served by the domain's
block server (nbdkit) on DIR/dom-N.nbd; the guest writes it over NBD. random and
hotset write a 4 KiB block every --disk-every steps; disk-check verifies them.

examples:
  python -m xenbind.sim host --dir /dev/shm/primary &
  python -m xenbind.sim --dir /dev/shm/primary create --memory 64M --workload ledger --seed 1
  python -m xenbind.sim --dir /dev/shm/primary list --json
  python -m xenbind.sim --dir /dev/shm/primary outputs 1 > acked.txt
  python -m xenbind.sim --dir /dev/shm/backup ledger-check 1 --acked acked.txt
  python -m xenbind.sim --dir /dev/shm/primary create --workload random --disk 64M --disk-rate 50
  python -m xenbind.sim --dir /dev/shm/primary disk-check 2

files in DIR:
  host.sock, host.pid, host.lock   the running host
  dom-N.mem                        guest memory, PFN p at byte p*4096
  dom-N.json, dom-N.ctl            metadata; live status page
  dom-N.out                        released output;  dom-N.log  the domain's log
  dom-N-diskI.img, dom-N.nbd       disk images; the block server's NBD socket
  dom-N.dctl, dom-N.disklog        the block server's control socket; its log

pauses are counted as Xen counts them: a domain paused twice (say by the
operator and by remusd) runs again only after two unpauses.

exit status: 0 success; 1 the operation or check failed; 2 bad usage.
See docs/simulator.md for the whole story.
"""


#: the default of ``host --create-delay`` (seconds), for hosts started by others (tests)
CREATE_DELAY_ENV = "REMUS_SIM_CREATE_DELAY_S"


def parse_disk_size(text: str) -> int:
    """A disk size: as ``parse_size``, in whole 512-byte sectors."""
    return parse_size(text, 512, "512-byte sectors")


def parse_size(text: str, unit: int = 4096, units_name: str = "4 KiB pages") -> int:
    """'64M', '1G', '65536K', '4096' (bytes) -> bytes; whole pages only."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    if not t.isdigit():
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 64M, 1G, 262144K)")
    size = int(t) * mult
    if size % unit or size <= 0:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not a positive whole number of {units_name}"
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
    c.add_argument(
        "--disk",
        metavar="SIZE",
        type=parse_disk_size,
        action="append",
        default=[],
        help="a new sparse disk of SIZE (64M, 1G; 1M to 64G), served over NBD by "
        "the domain's block server; repeatable",
    )
    c.add_argument(
        "--disk-file",
        metavar="PATH",
        action="append",
        default=[],
        help="an existing disk image, used as it is and never deleted; repeatable "
        "(instead of --disk)",
    )
    dr = c.add_mutually_exclusive_group()
    dr.add_argument(
        "--disk-every",
        metavar="K",
        type=int,
        default=None,
        help="random/hotset with a disk: every K-th step writes a 4 KiB block (default 16)",
    )
    dr.add_argument(
        "--disk-rate",
        metavar="WRITES_PER_S",
        type=float,
        default=None,
        help="random/hotset with a disk: about this many block writes per second "
        "(sets K = rate / WRITES_PER_S, at least 1)",
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
    lc.add_argument(
        "--disk",
        metavar="PATH",
        default=None,
        help="the disk image whose journal is checked (default: the domain's disk 0, "
        "if it has one)",
    )
    dc = add(
        "disk-check",
        "check a domain's disk against what its workload wrote",
        "Compare the domain's disk 0 with what its workload must have written by its\n"
        "current step: random/hotset, every 4 KiB block holds the write of the last\n"
        "step that chose it (or zeros); ledger, the journal (as ledger-check). Pauses a\n"
        "running domain for the check. Works after the host died. Exit status 1 and one\n"
        "line per wrong block on any failure.",
    )
    dc.add_argument("id", metavar="ID", help="domid or name")
    dc.add_argument(
        "--disk", metavar="PATH", default=None, help="another copy of the disk to check"
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

    if args.cmd in ("digest", "outputs", "ledger-check", "disk-check"):
        if not os.path.isdir(sim_dir):
            print(f"error: {sim_dir} is not a directory", file=sys.stderr)
            return 1
        if args.cmd == "digest":
            print(postmortem.digest(sim_dir, args.id))
            return 0
        if args.cmd == "outputs":
            sys.stdout.buffer.write(postmortem.outputs(sim_dir, args.id))
            return 0
        if args.cmd == "ledger-check":
            problems, summary = postmortem.ledger_check(sim_dir, args.id, args.acked, args.disk)
        else:
            problems, summary = postmortem.disk_check(sim_dir, args.id, args.disk)
        for p in problems:
            print(f"{args.cmd}: domain {args.id}: {p}", file=sys.stderr)
        facts = ", ".join(f"{k} {v}" for k, v in summary.items())
        if problems:
            print(f"{args.cmd}: domain {args.id}: FAILED ({facts})", file=sys.stderr)
            return 1
        print(f"{args.cmd}: domain {args.id}: OK ({facts})")
        return 0

    hv = SimHypervisor(sim_dir)
    if args.cmd == "create":
        every = args.disk_every
        if args.disk_rate is not None:
            if not args.disk_rate > 0:
                print("error: --disk-rate must be a positive number", file=sys.stderr)
                return 2
            from .workloads import DEFAULT_RATE

            rate = args.rate if args.rate is not None else DEFAULT_RATE[args.workload]
            every = max(1, round(rate / args.disk_rate))
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
            disks=args.disk,
            disk_files=args.disk_file,
            disk_every=every,
        )
        print(dom.domid)
    elif args.cmd == "list":
        infos = hv.list()
        metas = {m["domid"]: m for m in hv.request({"op": "list"}, "list")["domains"]}
        disks = {i.domid: metas.get(i.domid, {}).get("disks", []) for i in infos}
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
                    "disks": disks[i.domid],
                }
                for i in infos
            ]
            print(json.dumps(rows, indent=1))
        else:
            print(
                f"{'ID':>4} {'NAME':<16} {'MEMORY':>8} {'WORKLOAD':<8} {'STATE':<9} {'STEP':>10} "
                "DIRTY    DISKS"
            )
            for i in infos:
                ds = ",".join(_size(d["size"]) for d in disks[i.domid]) or "-"
                print(
                    f"{i.domid:>4} {i.name:<16} {i.pages * 4096 >> 20:>7}M {i.extra['workload']:<8} "
                    f"{i.state:<9} {i.extra['step']:>10} {i.extra['dirty_mode']:<8} {ds}"
                )
                for n, d in enumerate(disks[i.domid]):
                    print(f"{'':>6}disk {n}: {d['path']} (nbd {d['nbd']}, control {d['control']})")
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


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


if __name__ == "__main__":
    sys.exit(main())
