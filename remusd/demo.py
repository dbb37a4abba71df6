"""``python -m remusd.demo`` (``make demo``): Remus on one machine, in a minute.

What it does, every step a real process:

1. two simulated Xen hosts, "primary" and "backup" (directories under
   /dev/shm), each ``python -m xenbind.sim host``;
2. a ``ledger`` guest on the primary (a bank: every transaction moves money,
   is journaled to the guest's disk, and acknowledges itself to the outside
   world through its output); the disk is served by the mirroring block
   server (nbdkit, docs/disk.md) and replicated with the memory;
3. ``remus-receiver`` on the backup and ``remusd`` on the primary, linked
   over loopback by TLS 1.3 with mutual authentication, the default mode:
   a throwaway CA and a certificate per host are made at start with the
   ``openssl`` command (``daemonkit.pki``, the commands of docs/operations.md);
4. ``remusctl protect ledger --interval 100``, then a line of live figures
   per second: checkpoints/s, pause, dirty pages, compression ratio, MB/s;
5. the primary host and remusd are killed with SIGKILL (a power cut);
6. the receiver notices the silence and resumes the backup from the last
   checkpoint it committed;
7. ``ledger-check --acked`` on the backup checks that every transaction the
   primary acknowledged to the outside world (its released output) is in
   the backup's ledger, that no money was created or lost, and that the
   backup's disk journal holds exactly the transactions of its memory.

Exit status 0 only if the check passed. Every process started here is ended
on the way out (also on Ctrl-C) and the directories are removed (``--keep``
keeps them for a look).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemonkit import pki
from daemonkit.control import ControlError, control_request

PY = sys.executable
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> list[str]:
    """An installed entry point, or the module it stands for."""
    path = BIN / name
    if path.exists():
        return [str(path)]
    module = {"remusd": "remusd.cli", "remusctl": "remusd.ctl", "remus-receiver": "receiver.cli"}[
        name
    ]
    return [PY, "-m", module]


class Procs:
    """The processes of the demo; all of them are ended on close()."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.base / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        p = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = p
        return p

    def kill(self, name: str) -> None:
        p = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=5)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.base / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def sim(sim_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [PY, "-m", "xenbind.sim", "--dir", str(sim_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"xenbind.sim {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def wait_for(what: str, pred, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except (ControlError, OSError):
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)


def sessions_of(status: dict) -> list[dict]:
    """The per-domain entries of a daemon's status (remusd: domains)."""
    for key in ("domains", "sessions", "protections"):
        val = status.get(key)
        if isinstance(val, list):
            return [d for d in val if isinstance(d, dict)]
    return []


def run(args: argparse.Namespace) -> int:
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    base = Path(tempfile.mkdtemp(prefix="remus-demo-", dir=shm))
    procs = Procs(base)
    primary, backup = base / "primary", base / "backup"
    rsock, bsock = str(base / "remusd.sock"), str(base / "receiver.sock")
    port = _free_port()
    ok = False
    say = print
    try:
        say(f"remus demo: working directory {base}")
        disk_args: list[str] = []
        if args.disk not in ("0", ""):
            from xenbind.mirrorclient import missing

            lack = missing()
            if lack is None:
                disk_args = ["--disk", args.disk]
            else:
                say(f"   (no disk for the guest: {lack})")
        say("1. two simulated Xen hosts: primary and backup")
        for name, d in (("primary-host", primary), ("backup-host", backup)):
            procs.start(name, [PY, "-m", "xenbind.sim", "host", "--dir", str(d)])
        for d in (primary, backup):
            wait_for(f"the simulated host at {d}", lambda d=d: (d / "host.sock").exists(), 30)
        domid = sim(
            primary,
            "create",
            "--memory",
            args.memory,
            "--workload",
            "ledger",
            "--seed",
            "1",
            "--rate",
            str(args.rate),
            "--name",
            "ledger",
            *disk_args,
        ).stdout.strip()
        say(
            f"2. guest 'ledger' (domain {domid}, {args.memory}) runs a bank on the primary: "
            f"{args.rate} transactions/s, each "
            + (f"journaled to its {args.disk} disk and " if disk_args else "")
            + "acknowledged to its client"
        )
        tls = base / "tls"
        ca = pki.make_ca(tls, "remus-demo-ca")
        rx_cert = pki.make_host_cert(tls, ca, "backup.demo", ["127.0.0.1"])
        tx_cert = pki.make_host_cert(tls, ca, "primary.demo")
        say(
            f"3. remus-receiver on the backup (127.0.0.1:{port}), remusd on the primary, "
            f"linked by TLS 1.3 (throwaway CA and host certificates in {tls})"
        )
        procs.start(
            "receiver",
            _bin("remus-receiver")
            + [
                "--listen",
                f"127.0.0.1:{port}",
                "--sim-dir",
                str(backup),
                "--control",
                bsock,
                "--config",
                "/dev/null",
                "--tls-cert",
                rx_cert.cert,
                "--tls-key",
                rx_cert.key,
                "--tls-ca",
                ca.cert,
                "--allow-peer",
                "primary.demo",
            ],
        )
        procs.start(
            "remusd",
            _bin("remusd")
            + [
                "--sim-dir",
                str(primary),
                "--control",
                rsock,
                "--config",
                "/dev/null",
                "--tls-cert",
                tx_cert.cert,
                "--tls-key",
                tx_cert.key,
                "--tls-ca",
                ca.cert,
            ],
        )
        wait_for("remus-receiver", lambda: control_request(bsock, "status", timeout=2), 30)
        wait_for("remusd", lambda: control_request(rsock, "status", timeout=2), 30)
        control_request(
            rsock, "protect", domain="ledger", target=f"127.0.0.1:{port}", interval_ms=args.interval
        )
        say(f"4. remusctl protect ledger --to 127.0.0.1:{port} --interval {args.interval}")
        t0 = time.monotonic()
        wait_for(
            "the initial copy",
            lambda: sessions_of(control_request(rsock, "status"))[0]["state"] == "protected",
            60,
        )
        say(f"   initial copy done in {time.monotonic() - t0:.2f} s; checkpointing:")
        say("   time  state      ckpt/s  pause ms  dirty pages  ratio    MB/s  acked")
        prev = sessions_of(control_request(rsock, "status"))[0]
        prev_t = time.monotonic()
        for sec in range(1, args.seconds + 1):
            time.sleep(max(0.0, prev_t + 1.0 - time.monotonic()))
            cur = sessions_of(control_request(rsock, "status"))[0]
            now = time.monotonic()
            dt = now - prev_t
            cps = (cur["checkpoints"] - prev["checkpoints"]) / dt
            mbs = (cur["bytes_sent"] - prev["bytes_sent"]) / dt / 1e6
            ratio = "-" if cur["compression_ratio"] is None else f"{cur['compression_ratio']:.1f}:1"
            pause = "-" if cur["last_pause_ms"] is None else f"{cur['last_pause_ms']:.2f}"
            say(
                f"   {sec:3d} s  {cur['state']:<10} {cps:6.1f}  {pause:>8}  {cur['dirty_pages']!s:>11}"
                f"  {ratio:>6}  {mbs:6.2f}  {cur['acked']}"
            )
            prev, prev_t = cur, now
        final = sessions_of(control_request(rsock, "status"))[0]
        if final.get("disks"):
            fd = final["disks"]
            sync = fd["disks"][0]["sync"]
            say(
                f"   disk: {sync['differing']} of {sync['blocks']} blocks synced at the start, "
                f"{fd['mirrored_bytes'] / 1e6:.2f} MB of writes mirrored, one disk epoch "
                f"sealed in each pause ({fd['seals']} seals, last {fd['last_seal_ms']} ms)"
            )
        say("5. power cut: SIGKILL to the primary host and remusd")
        t_kill = time.monotonic()
        os.kill(procs.procs["primary-host"].pid, signal.SIGKILL)
        os.kill(procs.procs["remusd"].pid, signal.SIGKILL)
        procs.kill("primary-host")
        procs.kill("remusd")

        def failed_over():
            for s in sessions_of(control_request(bsock, "status", timeout=2)):
                if s.get("state") == "failed-over":
                    return s
            return None

        s = wait_for("the backup to take over", failed_over, 30)
        detect = time.monotonic() - t_kill
        say(
            f"6. the backup took over {detect:.2f} s after the kill, resuming from checkpoint "
            f"{s.get('last_committed')} (remusd had seen checkpoint {final['acked']} or later "
            "acknowledged)"
        )
        acked = base / "acked.txt"
        out = sim(primary, "outputs", "ledger").stdout
        acked.write_text(out)
        n_acked = sum(1 for ln in out.splitlines() if ln.startswith("ack "))
        time.sleep(1.0)  # let the resumed guest run a little
        bl = json.loads(sim(backup, "list", "--json").stdout)
        bdom = next(
            (
                d
                for d in (bl if isinstance(bl, list) else bl.get("domains", []))
                if d.get("name") == "ledger"
            ),
            None,
        )
        # the check reads the guest's memory: pause it for a consistent view
        sim(backup, "pause", "ledger")
        say(
            "7. ledger-check on the (now paused) backup against the primary's released "
            f"outputs ({n_acked} acknowledged transactions)"
        )
        chk = sim(backup, "ledger-check", "ledger", "--acked", str(acked), check=False)
        for line in (chk.stdout + chk.stderr).strip().splitlines():
            say(f"   {line}")
        ok = chk.returncode == 0
        say("")
        say("summary")
        say(
            f"  checkpoints acknowledged before the cut: {final['checkpoints']} "
            f"(interval {args.interval} ms), last pause {final['last_pause_ms']} ms, "
            f"compression {final['compression_ratio']}:1"
        )
        say(
            f"  failover detected and done in {detect:.2f} s; backup domain "
            f"{bdom.get('domid') if bdom else '?'} is {bdom.get('state') if bdom else '?'}"
        )
        say(f"  every acknowledged transaction survived: {'YES' if ok else 'NO'}")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("\ninterrupted; cleaning up")
        return 130
    except (RuntimeError, ControlError, subprocess.TimeoutExpired) as e:
        say(f"demo failed: {e}")
        for name in procs.procs:
            say(f"--- last lines of {name}.log ---\n{procs.tail(name)}")
        return 1
    finally:
        procs.close()
        if args.keep:
            say(f"(kept {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m remusd.demo",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=int, default=8, help="seconds of live figures (default 8)")
    p.add_argument(
        "--interval", type=int, default=100, help="checkpoint interval, ms (default 100)"
    )
    p.add_argument("--memory", default="64M", help="guest memory (default 64M)")
    p.add_argument(
        "--rate", type=int, default=2000, help="ledger transactions per second (default 2000)"
    )
    p.add_argument(
        "--disk",
        default="64M",
        help="the guest's replicated disk (default 64M; 0: no disk). Needs nbdkit with its "
        "Python plugin (scripts/install-system-deps); without them the demo runs diskless",
    )
    p.add_argument("--keep", action="store_true", help="keep the working directory and logs")
    args = p.parse_args(argv)

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
