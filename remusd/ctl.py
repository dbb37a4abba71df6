"""``remusctl``: drive remusd (and read remus-receiver's status) over a control socket.

Commands map one to one to control requests (remusd.control): ``protect``
(``--wait``: then poll ``status`` until protected or failed), ``unprotect``,
``resume-here``, ``destroy-stale``, ``status``. Human output is a table;
``status --json`` prints the daemon's status object unchanged (schema:
docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from typing import Any

from daemonkit.control import ControlError, control_request
from xenbind.compress.formats import CODECS
from xenbind.errors import ConfigError

from .config import DEFAULT_CONTROL, MAX_INTERVAL_MS, MIN_INTERVAL_MS, Target

DESCRIPTION = textwrap.dedent("""\
    remusctl controls remusd(8), the Remus primary-host daemon, through its
    control socket: it starts and ends the protection of domains and shows
    their state. Pointed at a remus-receiver's control socket, `remusctl
    status` shows the backup side's sessions.""")

EPILOG = textwrap.dedent("""\
    commands:
      protect DOMAIN --to TARGET   start protecting DOMAIN (a domid or a name);
                                   --wait: return once protected, or failed
      unprotect DOMAIN             end it cleanly; the guest keeps running
      switchover DOMAIN            move it to the backup host (planned): the
                                   backup resumes it, this copy is fenced
      resume-here DOMAIN           run a fenced (or orphaned) copy here, unprotected
      destroy-stale DOMAIN         destroy a fenced copy (its backup took over)
      failover DOMAIN              (receiver's socket) run the backup now
      status                       show every protected domain

    examples:
      remusctl protect ledger --to 10.0.0.2:7788
      remusctl protect 3 --to backup.example:7788 --interval 50 --codec xen
      remusctl protect ledger --to file:/var/lib/remus/ledger.stream --codec none
      remusctl unprotect ledger
      remusctl switchover ledger
      remusctl status --json
      remusctl --control /run/remus/receiver.sock status

    exit status:
      0  success (protect --wait: the domain is protected)
      1  the daemon refused the request or could not be reached, or (protect
         --wait) the protection failed: refused, fenced, stopped (message on stderr)
      2  bad command line
      3  protect --wait: not protected within the wait (remusd keeps retrying;
         the reason is on stderr)

    files:
      /run/remus/remusd.sock     remusd's control socket (default --control)
      /run/remus/receiver.sock   remus-receiver's control socket

    see also: remusd(8), remus-receiver(8), docs/operations.md""")

PROTECT_HELP = textwrap.dedent("""\
    Protect DOMAIN: remusd copies the running guest to the backup (the initial
    live copy), then checkpoints it every INTERVAL, holding the guest's output
    until the backup acknowledged the checkpoint that holds it. The command
    returns once remusd has accepted the request; follow progress with
    `remusctl status` (state initial-copy, then protected). With --wait it
    returns only once the domain is protected (exit 0) or the protection
    failed (exit 1: refused, fenced, stopped) or was not reached within
    SECONDS (exit 3: e.g. nothing listens at TARGET; remusd keeps retrying),
    with the reason on stderr.""")

RESUME_HELP = textwrap.dedent("""\
    Run DOMAIN's copy on this host, unprotected: unpause it (or resume a
    guest left suspended mid-checkpoint), release its held output, turn
    log-dirty off. Only for a fenced copy (its backup took over: state
    fenced) or an orphan no remusd protects (log-dirty on or stopped). It
    means: THIS copy is the guest from now on. If the backup's copy runs too
    (check the receiver: remusctl --control /run/remus/receiver.sock status
    on the backup host), two copies serve clients: destroy one of them.""")

DESTROY_HELP = textwrap.dedent("""\
    Destroy DOMAIN's stale copy on this host. Only for a fenced copy: the
    receiver said its backup took over, so the backup host runs the guest
    and this paused copy is out of date. Protect the guest again from the
    backup host (roles swapped) afterwards.""")

PROTECT_EPILOG = textwrap.dedent("""\
    targets:
      HOST:PORT    a remus-receiver listening there, over TLS (remusd's
                   tls-cert/tls-key/tls-ca; the receiver's certificate must
                   name HOST) or plaintext if remusd runs with --insecure
      file:PATH    write the session's legacy stream to PATH (no handshake):
                   `python -m xenbind.stream inspect PATH` and `replay` read it,
                   and with --codec none Xen's convert-legacy-stream reads its
                   first checkpoint. Each checkpoint counts as acknowledged once
                   written and flushed. A relative PATH is made absolute here.

    examples:
      remusctl protect ledger --to 10.0.0.2:7788 --interval 100
      remusctl protect 7 --to file:/tmp/7.stream --codec none --verify""")

UNPROTECT_HELP = textwrap.dedent("""\
    End the protection of DOMAIN cleanly: remusd sends one last checkpoint
    marked LAST_CHECKPOINT, waits for its acknowledgement and closes the
    session, so the backup does not take over. The guest keeps running on the
    primary, unprotected (its output is no longer held back).""")

SWITCHOVER_HELP = textwrap.dedent("""\
    Move DOMAIN to its backup host, as planned maintenance or the way back
    after a failover (failback). remusd stops the guest at one last checkpoint
    (marked SWITCHOVER and LAST_CHECKPOINT), sends it, releases its output once
    the receiver acknowledges it (all the guest produced: it stays stopped)
    and, with a witness, gives up the owner key. The receiver then resumes its
    backup from that checkpoint (with a witness, once it holds the key) and
    says so; this copy is fenced: stopped, its output all released, case
    fenced-backup-took-over. Nothing is lost and nothing goes out twice.
    Destroy it with `remusctl destroy-stale DOMAIN`, then protect the guest
    back from the other host if wanted.

    If the receiver cannot resume its backup it says so
    (switchover-failed): the guest runs here again and is protected afresh.
    If the link breaks after the last checkpoint went out whole, the outcome
    is unknown: this copy stays stopped (case switchover-unknown) until an
    operator has looked at the backup host (destroy-stale if the guest runs
    there, else resume-here). Only a protected domain (over TCP) can switch
    over.

    exit status: 0 switched over; 1 refused, failed or unknown (the message
    says which).""")

#: the least a switchover is waited for: the ACK, the receiver's claim of the
#: witness key (up to its TTL + 1 s) and the resume
SWITCHOVER_WAIT_S = 90.0

FAILOVER_HELP = textwrap.dedent("""\
    Ask a remus-receiver (give its socket with --control) to fail DOMAIN over
    now: the backup domain gets the last committed checkpoint and is unpaused,
    whatever the failover timer says. DOMAIN is the protected domain's name,
    its UUID or the backup's domid. Use it when the receiver's policy kept the
    backup paused (on-violation=wait, on-link-loss=wait) and you have made
    sure the primary is dead: failing over while the primary still runs
    gives two running copies of the guest (see "Split brain" in
    docs/operations.md). The backup is then fenced: the old primary cannot
    re-protect to this receiver.""")

STATUS_HELP = textwrap.dedent("""\
    Show each protected domain: its state (initial-copy, protected,
    reconnecting, unprotected, fenced, stopped), its case (what it means
    for an operator: protected, reconnecting-orphan, unprotected-retrying,
    refused, fenced-backup-took-over, fenced-possible-split-brain, ...) and
    why, checkpoints acknowledged and their rate, the age of the last ACK,
    the last pause, the pages dirtied in the last epoch, bytes sent, the
    compression ratio, the receiver's failover timeout, its address and
    certificate (names, days to expiry), the target, codec and interval.
    Against a receiver's socket it shows the receiver's sessions. --json
    prints the daemon's status object (docs/operations.md).""")


def _interval(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of ms") from None
    if not MIN_INTERVAL_MS <= v <= MAX_INTERVAL_MS:
        raise argparse.ArgumentTypeError(
            f"interval must be {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS} ms, not {v}"
        )
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return v


#: protect --wait without SECONDS
DEFAULT_WAIT_S = 60.0


def _target(text: str) -> str:
    try:
        t = Target.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if t.kind == "file":
        return f"file:{os.path.abspath(t.path)}"
    return str(t)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="remusctl", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt
    )
    p.add_argument(
        "--control",
        metavar="PATH",
        default=DEFAULT_CONTROL,
        help=f"the daemon's control socket (default {DEFAULT_CONTROL})",
    )
    p.add_argument(
        "--timeout",
        metavar="SEC",
        type=_seconds,
        default=30.0,
        help="how long to wait for the daemon's answer (default 30)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    pr = sub.add_parser(
        "protect",
        help="start protecting a domain",
        description=PROTECT_HELP,
        epilog=PROTECT_EPILOG,
        formatter_class=fmt,
    )
    pr.add_argument("domain", metavar="DOMAIN", help="domid or name of the domain")
    pr.add_argument(
        "--to",
        metavar="TARGET",
        required=True,
        type=_target,
        help="HOST:PORT of the backup's remus-receiver, or file:PATH",
    )
    pr.add_argument(
        "--interval",
        metavar="MS",
        type=_interval,
        help=f"checkpoint interval in ms (default: remusd's, 200 unless "
        f"configured; minimum {MIN_INTERVAL_MS})",
    )
    pr.add_argument(
        "--codec",
        choices=list(CODECS),
        help="checkpoint compression (default: remusd's, seed unless configured): "
        "seed, xen (Xen 4.2-4.5's format) or none (uncompressed)",
    )
    pr.add_argument(
        "--verify",
        action="store_true",
        default=None,
        help="send a digest of all guest memory with each checkpoint; the "
        "backup checks it (debugging: lengthens the pause)",
    )
    pr.add_argument(
        "--wait",
        metavar="SECONDS",
        nargs="?",
        type=_seconds,
        const=DEFAULT_WAIT_S,
        help="return only once the domain is protected (exit 0) or the protection "
        f"failed (1), or after SECONDS (default {DEFAULT_WAIT_S:g}) without "
        "protection (3); write it --wait=SECONDS before DOMAIN",
    )

    un = sub.add_parser(
        "unprotect",
        help="end the protection of a domain cleanly",
        description=UNPROTECT_HELP,
        formatter_class=fmt,
        epilog="example:\n  remusctl unprotect ledger",
    )
    un.add_argument("domain", metavar="DOMAIN", help="domid or name of the domain")

    for name, helptext, desc, example in (
        ("switchover", "move a protected domain to its backup host (planned)", SWITCHOVER_HELP, ""),
        ("resume-here", "run a fenced or orphaned copy here, unprotected", RESUME_HELP, ""),
        ("destroy-stale", "destroy a fenced copy (its backup took over)", DESTROY_HELP, ""),
    ):
        c = sub.add_parser(
            name,
            help=helptext,
            description=desc,
            formatter_class=fmt,
            epilog=f"example:\n  remusctl {name} ledger{example}",
        )
        c.add_argument("domain", metavar="DOMAIN", help="domid, name or UUID of the domain")

    fo = sub.add_parser(
        "failover",
        help="(receiver) run the backup of a domain now",
        description=FAILOVER_HELP,
        formatter_class=fmt,
        epilog="example:\n  remusctl --control /run/remus/receiver.sock failover ledger",
    )
    fo.add_argument(
        "domain",
        metavar="DOMAIN",
        help="name or UUID of the protected domain, or the backup's domid",
    )

    st = sub.add_parser(
        "status",
        help="show the protected domains",
        description=STATUS_HELP,
        formatter_class=fmt,
        epilog="examples:\n  remusctl status\n  remusctl status --json\n"
        "  remusctl --control /run/remus/receiver.sock status",
    )
    st.add_argument("--json", action="store_true", help="machine-readable output (stable)")
    return p


# --------------------------------------------------------------------------- output


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _peer(d: dict) -> str:
    names = d.get("peer_names") or []
    days = d.get("peer_expires_in_days")
    if not names:
        return d.get("peer_address") or "-"
    return f"{names[0]}" + ("" if days is None else f" ({days:g} d)")


def _wire(d: dict) -> str:
    """The WIRE column: the session's wire compression and its ratio."""
    w = d.get("wire")
    if not w:
        return "off" if d.get("wire_compression", "off") == "off" else "raw"
    state = "" if w.get("compressing") else " raw now"
    return f"{w.get('codec')} {w.get('ratio', 1.0):.1f}:1{state}"


REMUSD_COLUMNS = [
    ("DOMAIN", lambda d: f"{d['name']} ({d['domid']})"),
    ("STATE", lambda d: d["state"]),
    ("CHECKPOINTS", lambda d: str(d["checkpoints"])),
    ("ACKED", lambda d: _cell(d["acked"])),
    ("RATE/s", lambda d: _cell(d.get("checkpoint_rate"))),
    ("ACK AGE s", lambda d: _cell(d.get("last_ack_age_s"))),
    ("PAUSE ms", lambda d: _cell(d["last_pause_ms"])),
    ("DIRTY", lambda d: _cell(d["dirty_pages"])),
    ("SENT", lambda d: _fmt_bytes(d["bytes_sent"])),
    (
        "RATIO",
        lambda d: "-" if d["compression_ratio"] is None else f"{d['compression_ratio']:.1f}:1",
    ),
    ("WIRE", _wire),
    ("TARGET", lambda d: d["target"]),
    ("PEER", _peer),
    ("FAILOVER ms", lambda d: _cell(d.get("failover_timeout_ms"))),
    ("CODEC", lambda d: d["codec"] + ("+verify" if d.get("verify") else "")),
    ("INTERVAL", lambda d: f"{d['interval_ms']} ms"),
    ("CASE", lambda d: d.get("case") or "-"),
]


def render_status(st: Any) -> str:
    if not isinstance(st, dict):
        return json.dumps(st, indent=2)
    who = st.get("daemon") or st.get("role") or "daemon"
    head = [f"{who} {st.get('version', '')}".strip()]
    for k in ("pid", "hypervisor", "listen", "uptime_s"):
        if k in st:
            head.append(f"{k} {_cell(st[k])}")
    out = ["  ".join(head)]
    if isinstance(st.get("domains"), list) and st.get("daemon") == "remusd":
        doms = st["domains"]
        if not doms:
            return out[0] + "\nno protected domains"
        rows = [[f(d) for _, f in REMUSD_COLUMNS] for d in doms]
        out.append(table(rows, [h for h, _ in REMUSD_COLUMNS]))
        reasons = [
            f"  {d['name']}: {d['reason']}"
            for d in doms
            if d.get("reason")
            and d["state"] in ("unprotected", "fenced", "stopped", "reconnecting")
        ]
        if reasons:
            out.append("reasons:\n" + "\n".join(reasons))
        out += _disk_lines(doms, "name", _sender_disk)
        return "\n".join(out)
    # another daemon (the receiver): scalars in the head line, then each list of
    # objects as a table: the receiver's main columns when they are there, else
    # every key (--json has everything)
    for key, val in st.items():
        if isinstance(val, list) and all(isinstance(x, dict) for x in val):
            if not val:
                out.append(f"no {key}")
                continue
            keys: list[str] = []
            for item in val:
                keys += [c for c in item if c not in keys]
            cols = [c for c in RECEIVER_COLUMNS if c in keys] or keys
            rows = [[_cell(item.get(c)) for c in cols] for item in val]
            out.append(table(rows, [RECEIVER_HEADERS.get(c, c.upper()) for c in cols]))
            errors = [
                f"  {item.get('domain', '?')}: {item['error']}" for item in val if item.get("error")
            ]
            if errors:
                out.append("errors:\n" + "\n".join(errors))
            out += _disk_lines(val, "domain", _receiver_disk)
    return "\n".join(out)


def _mib(n: Any) -> str:
    return f"{(n or 0) / (1 << 20):.1f} MiB"


def _sender_disk(i: int, disk: dict[str, Any], block: dict[str, Any]) -> str:
    sync = disk.get("sync") or {}
    state = "sync done" if sync.get("done") else f"syncing ({sync.get('hashed', 0)} hashed)"
    line = (
        f"disk{i} {_mib(disk.get('size'))}: {state}, {sync.get('differing', 0)} of "
        f"{sync.get('blocks', 0)} blocks differed, {_mib(sync.get('bytes_sent'))} synced"
    )
    if i == 0:  # one stream for all of a domain's disks
        line += (
            f"; mirrored {_mib(block.get('mirrored_bytes'))}, open epoch "
            f"{_mib(block.get('open_epoch_bytes'))}, {block.get('seals', 0)} seals "
            f"(last {block.get('last_seal_ms', 0)} ms)"
        )
    return line


def _receiver_disk(i: int, disk: dict[str, Any], block: dict[str, Any]) -> str:
    line = f"disk{i} {_mib(disk.get('size'))} {disk.get('path')}"
    line += " (reused)" if disk.get("reused") else " (new)"
    if i == 0:
        line += (
            f": {block.get('epochs_applied', 0)} epochs applied (last "
            f"{block.get('last_applied_epoch')}), buffer {_mib(block.get('epoch_buffer_bytes'))} "
            f"in memory, {_mib(block.get('epoch_spilled_bytes'))} spilled, "
            f"{_mib(block.get('bytes_synced'))} synced"
        )
    return line


def _disk_lines(items: list[Any], key: str, line: Any) -> list[str]:
    """A ``disks:`` section for the items whose status has a ``disks`` block."""
    rows = []
    for item in items:
        block = item.get("disks") if isinstance(item, dict) else None
        if not isinstance(block, dict):
            continue
        for i, disk in enumerate(block.get("disks") or []):
            rows.append(f"  {item.get(key, '?')} {line(i, disk, block)}")
    return ["disks:\n" + "\n".join(rows)] if rows else []


#: The receiver's session fields shown in the human table (remus-receiver's
#: status object, see its documentation; --json shows all of them).
RECEIVER_COLUMNS = [
    "domain",
    "backup_domid",
    "state",
    "last_committed",
    "checkpoints",
    "bytes",
    "last_life_age_s",
    "failover_timeout_ms",
    "verified",
    "mismatches",
    "peer",
]
RECEIVER_HEADERS = {
    "backup_domid": "BACKUP",
    "last_committed": "COMMITTED",
    "last_life_age_s": "SILENT s",
    "failover_timeout_ms": "FAILOVER ms",
}


# --------------------------------------------------------------------------- main

#: protect --wait: how often the status is read
WAIT_POLL_S = 0.1


def wait_protected(args: argparse.Namespace, first: dict) -> int:
    """Poll the status until the domain protected at ``first`` is protected
    (0), failed (1: refused, fenced, stopped) or the wait is over (3)."""
    domid, name = first["domid"], first["name"]
    deadline = time.monotonic() + args.wait
    d = first
    while True:
        if d["state"] == "protected":
            print(f"{name} ({domid}) is protected: checkpoint {d['acked']} acknowledged")
            return 0
        reason = d.get("reason") or ""
        if d["state"] in ("fenced", "stopped") or (
            d["state"] == "unprotected" and reason.endswith("(not retrying)")
        ):
            print(
                f"remusctl: {name} ({domid}) is NOT protected: {d['state']} "
                f"({d.get('case')}): {reason}",
                file=sys.stderr,
            )
            return 1
        if time.monotonic() >= deadline:
            print(
                f"remusctl: {name} ({domid}) is not protected after {args.wait:g} s: "
                f"{d['state']}{': ' + reason if reason else ''} (remusd keeps retrying; "
                f"`remusctl unprotect {name}` stops it)",
                file=sys.stderr,
            )
            return 3
        time.sleep(WAIT_POLL_S)
        st = control_request(args.control, "status", timeout=args.timeout)
        found = [x for x in st.get("domains", []) if x.get("domid") == domid]
        if not found:
            print(f"remusctl: {name} ({domid}) is no longer in remusd's status", file=sys.stderr)
            return 1
        d = found[0]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            st = control_request(args.control, "status", timeout=args.timeout)
            if args.json:
                print(json.dumps(st, indent=2, sort_keys=True))
            else:
                print(render_status(st))
        elif args.command == "protect":
            req: dict[str, Any] = {"domain": args.domain, "target": args.to}
            if args.interval is not None:
                req["interval_ms"] = args.interval
            if args.codec is not None:
                req["codec"] = args.codec
            if args.verify:
                req["verify"] = True
            d = control_request(args.control, "protect", timeout=args.timeout, **req)
            print(
                f"protecting {d['name']} ({d['domid']}) to {d['target']}: every "
                f"{d['interval_ms']} ms, codec {d['codec']}"
                f"{', verify' if d['verify'] else ''}"
            )
            if args.wait is not None:
                return wait_protected(args, d)
        elif args.command == "unprotect":
            d = control_request(
                args.control,
                "unprotect",
                domain=args.domain,
                timeout=args.timeout + 5,
                wait_s=args.timeout,
            )
            print(
                f"{d['name']} ({d['domid']}): {d['state']} after {d['checkpoints']} "
                f"checkpoints; the guest runs unprotected"
            )
        elif args.command == "switchover":
            wait = max(args.timeout, SWITCHOVER_WAIT_S)
            d = control_request(
                args.control, "switchover", domain=args.domain, timeout=wait + 5, wait_s=wait
            )
            print(f"{d['name']} ({d['domid']}): {d['case']}: {d['reason']}")
            if d["case"] != "fenced-backup-took-over":
                return 1
        elif args.command in ("resume-here", "destroy-stale"):
            d = control_request(
                args.control,
                args.command,
                domain=args.domain,
                timeout=args.timeout + 5,
                wait_s=args.timeout,
            )
            print(f"{d['name']} ({d['domid']}): {d['case']}: {d['reason']}")
            if d.get("meaning"):
                print(f"  {d['meaning']}")
        elif args.command == "failover":
            d = control_request(args.control, "failover", domain=args.domain, timeout=args.timeout)
            print(
                f"{d['domain']}: backup domain {d['backup_domid']} is running, resumed from "
                f"checkpoint {d['resumed_from']}"
            )
    except ControlError as e:
        print(f"remusctl: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
