"""Fault campaign: real daemons on simulated hosts, killed, frozen, cut and starved.

    python -m bench.faults [--runs N] [--json PATH] [--seed S] [--scenario NAME ...]
                           [--keep-logs DIR]

Every run uses real processes over loopback: ``python -m xenbind.sim host``
(primary and backup), ``remus-receiver`` and ``remusd`` (debug log), a
``ledger`` guest (16 MiB, 3000 transactions/s) protected every 30 ms in
verify mode (every checkpoint carries the primary's memory digest; the
receiver checks each commit, and digests the backup again just before a
failover). ``--runs N`` runs are spread over the scenarios round-robin.

Scenarios (docs/faults.md says what each proves):

kill-initial-copy   REMUSD_FAULT stall-mid-checkpoint:1:0, then kill -9 of the
                    primary host and remusd: nothing committed, so no failover
                    and no backup left
kill-paused         stall-paused:1:N (guest paused in the capture of N)   -> N-1
kill-mid-chunk      stall-mid-chunk:1:N (half of N's first chunk sent)    -> N-1
kill-mid-checkpoint stall-mid-checkpoint:1:N (half of N's bytes sent)     -> N-1
kill-before-tail    stall-before-tail:1:N (N sent but its tail; N >= 0)   -> N-1
kill-after-ack      stall-after-ack:1:N (N acked, output held back)       -> N
kill-after-release  stall-after-release:1:N (N acked, output released)    -> N
kill-random         kill -9 at a random time 0..1.5 s after `protect`
                    (initial copy included): failover iff the receiver had
                    committed something, from a checkpoint >= the last one
                    remusd saw acknowledged
sigstop             remusd frozen (SIGSTOP): the receiver fails over after its
                    timeout; SIGCONT: remusd must find itself fenced, pause its
                    stale guest, release no more output, and not retry
tcp-reset           a TCP proxy between the daemons cuts the link in the
                    middle of a checkpoint chunk with RST both ways: no
                    failover, remusd unprotected then protected again; then a
                    power cut proves the re-protected backup holds everything
receiver-restart    receiver kill -9 and restart: the guest runs unprotected,
                    is protected again, then a power cut fails over cleanly
remusd-crash        (at a 200 ms interval: the receiver's default 900 ms failover
                    timeout) kill -9 of remusd alone (the primary host lives: the guest
                    runs on, output held, log-dirty on), then remusd started
                    again, at once as systemd would or up to 1 s later: it must
                    adopt the orphan and either re-protect it (its HELLO came
                    before the receiver's failover timeout: no failover) or,
                    if the backup took over, pause the stale copy with
                    "fenced-backup-took-over"; never two copies releasing
                    output; then the ledger holds (power cut / the backup)
disk-full           the backup host's directory (and the receiver's log) on a
                    small tmpfs: first too small for the backup (clear refusal,
                    remusd retrying, receiver serving), then grown, then filled
                    to the last byte while checkpoints commit; a power cut then
                    fails over with every acknowledged transaction (root only)
plain-power-cut     (a pair of its own, no witness, failover timeout 600 ms)
                    kill -9 of the primary host and remusd: the figure is the
                    time from the kill to the backup running (failover_s),
                    the baseline of the next one
witness-power-cut   the same with the witness (etcd, lease TTL 2 s): failover_s
                    is about TTL + the timeout
witness-link-cut    the link cut, the primary reaching etcd: no failover over
                    2 TTLs (false_failovers, target 0); re-protected after
witness-partition   the primary cut from the link and from etcd: released
                    outputs of both copies sampled every 10 ms; a sample in
                    which both grew is a double-release window (target 0);
                    when the primary's output stopped, when the backup's began
disk-power-cut      (issue 13) a ledger guest and a hotset guest, each with an
                    8 MiB disk (the hotset writes a 4 KiB block every 2 steps),
                    protected every 30 ms; kill -9 of the primary host and
                    remusd at a random moment 0..1 s after both are protected:
                    the ledger's memory, disk journal and acknowledged outputs
                    agree (ledger-check), the hotset's disk holds exactly what
                    its memory's step implies (disk-check); both guests run on
                    on the backup and the checks pass again. Figures:
                    failover_s, disk_differs, ledger_check_failed
disk-receiver-kill  (issue 13) a receiver of its own killed (-9) at a random
                    moment and restarted on the same --disk-dir: remusd
                    reconnects and the new session copies only the 64 KiB
                    blocks whose hashes differ (no more than the blocks the
                    guest's writes since the kill could have touched); then a
                    power cut and the checks of disk-power-cut

After every failover: the backup's memory digest taken by the receiver just
before it resumed equals the primary's digest of that checkpoint (remusd's
status / debug log; for a checkpoint the receiver committed but remusd never
saw acknowledged, the receiver's own verification of it), and
``ledger-check --acked`` passes on the backup with the primary's released
outputs. Output: one line per run, a table per scenario, the figures the
runs measured (min / median / max / sum per scenario), JSON with --json.
Run times are wall clock on a shared box: for orientation only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.daemonkit.etcd_cluster import EtcdCluster, etcd_binary, start_cluster
from tests.e2e.conftest import Daemon, Receiver, Remusd, free_port, wait_until
from tests.e2e.test_witness import Proxy, receiver_config, released, witness_flags
from tests.simhost import SimHost, sim_dir
from xenbind.session import DISK_HASH_BLOCK
from xenbind.sim.workloads import DISK_BLOCK, disk_write

INTERVAL_MS = 30
MEMORY = "16M"
RATE = 3000
#: remusd's debug line after each ACK in verify mode (remusd/protector.py)
ACK_LINE = re.compile(r"domain (\S+): checkpoint (\d+) acknowledged, xxh3-128 ([0-9a-f]{32})")

KILL_POINTS = {  # scenario -> (REMUSD_FAULT kind, smallest N, resumed checkpoint = N + offset)
    "kill-initial-copy": ("stall-mid-checkpoint", 0, None),
    "kill-paused": ("stall-paused", 1, -1),
    "kill-mid-chunk": ("stall-mid-chunk", 1, -1),
    "kill-mid-checkpoint": ("stall-mid-checkpoint", 1, -1),
    "kill-before-tail": ("stall-before-tail", 0, -1),
    "kill-after-ack": ("stall-after-ack", 0, 0),
    "kill-after-release": ("stall-after-release", 0, 0),
}
#: the witness's scenarios (issue 14; a 3-member etcd the campaign starts once)
WITNESS_SCENARIOS = (
    "plain-power-cut",
    "witness-power-cut",
    "witness-link-cut",
    "witness-partition",
)
#: the disk scenarios (issue 13)
DISK_SCENARIOS = ("disk-power-cut", "disk-receiver-kill")
SCENARIOS = (
    *KILL_POINTS,
    "kill-random",
    "sigstop",
    "tcp-reset",
    "receiver-restart",
    "remusd-crash",
    "disk-full",
    *WITNESS_SCENARIOS,
    *DISK_SCENARIOS,
)


class Failed(AssertionError):
    pass


def check(cond: object, what: str) -> None:
    if not cond:
        raise Failed(what)


@dataclass
class Result:
    scenario: str
    run: int
    ok: bool
    seconds: float
    detail: str = ""
    error: str | None = None
    logs: str | None = None
    #: what a run measured, for the scenario's figures (summarize)
    figures: dict = field(default_factory=dict)


@dataclass
class Ctx:
    """What one run needs: a private directory and the shared backup side."""

    workdir: Path
    rng: random.Random
    backup: SimHost
    rx: Receiver
    notes: dict = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    #: the campaign's etcd cluster, started on first use (witness scenarios)
    etcd: Callable[[], EtcdCluster] | None = None
    figures: dict = field(default_factory=dict)


# --------------------------------------------------------------------- helpers


def proc(daemon: Daemon) -> subprocess.Popen:
    """The daemon's process (every daemon here is started before it is used)."""
    assert daemon.proc is not None, f"{daemon.name} was never started"
    return daemon.proc


def start_remusd(ctx: Ctx, primary: SimHost, *extra: str, fault: str | None = None) -> Remusd:
    env = {"REMUSD_FAULT": fault} if fault else None
    d = Remusd(ctx.workdir, primary, *extra, env=env)
    ctx.cleanups.append(d.kill)
    return d.start()


def start_primary(ctx: Ctx, name: str) -> SimHost:
    host = SimHost(sim_dir("faults-primary-")).start()
    ctx.cleanups.append(host.cleanup)
    host.create(MEMORY, "ledger", seed=ctx.rng.randrange(1 << 32), rate=RATE, name=name)
    return host


def rx_session(rx: Receiver, name: str) -> dict | None:
    return rx.session(name)


def rx_lines(rx: Receiver, name: str) -> list[str]:
    return [ln for ln in rx.log().splitlines() if f"domain {name} (" in ln]


def acked_digests(remusd: Remusd, name: str) -> dict[int, str]:
    """index -> digest of the checkpoints remusd saw acknowledged in the
    domain's last session (indexes restart at 0 with each session)."""
    out: dict[int, str] = {}
    start = f"domain {name}: session "
    for line in remusd.log().splitlines():
        if start in line:
            out = {}
        m = ACK_LINE.search(line)
        if m and m.group(1) == name:
            out[int(m.group(2))] = m.group(3)
    return out


def released_outputs(primary: SimHost, name: str, path: Path | None = None) -> int:
    out = primary.cli("outputs", name).stdout
    if path is not None:
        path.write_text(out)
    return sum(1 for ln in out.splitlines() if ln.startswith("ack "))


def power_cut(primary: SimHost, remusd: Remusd) -> None:
    remusd.kill()
    primary.kill()


def wait_final(rx: Receiver, name: str, timeout: float = 20) -> dict | None:
    """The receiver's session once it settled after the primary died."""

    def settled():
        s = rx_session(rx, name)
        if s is None or s["state"] in ("gone", "failed-over"):
            return {"s": s}
        if s["state"] in ("corrupt", "broken", "ended", "superseded"):
            raise Failed(f"receiver session ended {s['state']}: {s.get('error')}")
        return None

    return wait_until(f"the receiver to settle domain {name}", settled, timeout)["s"]


def check_failover(
    ctx: Ctx,
    primary: SimHost,
    remusd: Remusd,
    name: str,
    s: dict | None,
    acked: int | None,
    acked_digest: str | None,
    expect: int | None = None,
) -> str:
    """The backup resumed from the right checkpoint, byte for byte, and holds
    every acknowledged transaction."""
    k, how = check_resumed(ctx, remusd, name, s, acked, acked_digest, expect)
    backup = ctx.backup
    acked_file = ctx.workdir / f"{name}.acked"
    n = released_outputs(primary, name, acked_file)
    backup.cli("pause", name)
    r = backup.cli("ledger-check", name, "--acked", str(acked_file), check=False)
    check(r.returncode == 0, f"ledger-check failed: {r.stdout}{r.stderr}")
    return f"resumed from {k} ({how}), {n} released outputs all on the backup"


def check_resumed(
    ctx: Ctx,
    remusd: Remusd,
    name: str,
    s: dict | None,
    acked: int | None,
    acked_digest: str | None,
    expect: int | None = None,
) -> tuple[int, str]:
    """The backup runs, resumed from the right checkpoint, its memory the
    primary's digest of it (or verified by the receiver): (checkpoint, how)."""
    rx, backup = ctx.rx, ctx.backup
    if s is None:  # wait_final: the receiver has no session left, so it did not fail over
        raise Failed(f"no failover: the receiver has no session for domain {name}")
    k = s["last_committed"]
    check(s["state"] == "failed-over", f"state {s['state']}")
    if expect is not None:
        check(k == expect, f"resumed from checkpoint {k}, expected {expect}")
    if acked is not None:
        check(k >= acked, f"resumed from {k}, older than the acknowledged {acked}")
    check(s["mismatches"] == 0, f"receiver verify mismatches {s['mismatches']}")
    logged = acked_digests(remusd, name)
    if acked is not None and acked_digest:
        logged[acked] = acked_digest
    fd = s.get("failover_digest")
    check(fd, "no failover digest in the receiver's status")
    if k in logged:
        check(
            fd == logged[k],
            f"backup memory at failover {fd} != primary's digest {logged[k]} of checkpoint {k}",
        )
        how = "digest = primary's"
    else:
        top = max(logged, default=-1)
        check(k == top + 1, f"resumed from {k}, but remusd saw only up to {top} acknowledged")
        check(
            s["verified"] == s["checkpoints"],
            f"only {s['verified']} of {s['checkpoints']} commits verified",
        )
        how = "committed, ACK lost with the primary; verified by the receiver"
    lines = rx_lines(rx, name)
    check(
        any("FAILOVER" in ln and f"from checkpoint {k}" in ln for ln in lines),
        "no FAILOVER line naming the checkpoint in the receiver's log",
    )
    info = backup.lookup(name).info()
    check(info.state == "running", f"backup domain is {info.state}")
    return k, how


def destroy_backup(ctx: Ctx, name: str) -> None:
    with contextlib.suppress(Exception):
        ctx.backup.hv.destroy(name)


# --------------------------------------------------------------------- scenarios


def run_kill_point(ctx: Ctx, scenario: str, run: int) -> str:
    kind, lo, offset = KILL_POINTS[scenario]
    n = lo if scenario == "kill-initial-copy" else ctx.rng.randint(lo, lo + 6)
    name = f"led{run}"
    primary = start_primary(ctx, name)
    ctx.cleanups.append(lambda: destroy_backup(ctx, name))
    remusd = start_remusd(ctx, primary, fault=f"{kind}:1:{n}")
    remusd.ctl("protect", name, "--to", ctx.rx.target, "--interval", str(INTERVAL_MS), "--verify")
    wait_until("remusd to reach the fault point", lambda: "stalling" in remusd.log(), 30)
    d = remusd.domain(name)
    acked, digest = d["acked"], d["acked_digest"]
    if offset is not None:
        want = n + offset
        check(acked == (want if want >= 0 else None), f"remusd status acked {acked} at {kind}:{n}")
    power_cut(primary, remusd)
    s = wait_final(ctx.rx, name)
    if offset is None or n + offset < 0:
        return check_nothing_committed(ctx, name, s, acked)
    return (
        check_failover(ctx, primary, remusd, name, s, acked, digest, expect=n + offset)
        + f" [{kind}:1:{n}]"
    )


def check_nothing_committed(ctx: Ctx, name: str, s: dict | None, acked: int | None) -> str:
    check(acked is None, f"remusd saw checkpoint {acked} acknowledged, but no failover")
    check(s is None or s["state"] == "gone", f"receiver session {s}")
    time.sleep(0.6)  # longer than the failover timeout: still nothing
    check(not any("FAILOVER" in ln for ln in rx_lines(ctx.rx, name)), "a FAILOVER happened")
    names = [i.name for i in ctx.backup.hv.list()]
    check(name not in names, "a backup that committed nothing survived")
    return "nothing committed: no failover, backup destroyed"


def run_kill_random(ctx: Ctx, scenario: str, run: int) -> str:
    name = f"led{run}"
    primary = start_primary(ctx, name)
    ctx.cleanups.append(lambda: destroy_backup(ctx, name))
    remusd = start_remusd(ctx, primary)
    delay = ctx.rng.uniform(0.0, 1.5)
    remusd.ctl("protect", name, "--to", ctx.rx.target, "--interval", str(INTERVAL_MS), "--verify")
    time.sleep(delay)
    d = remusd.domain(name)  # a lower bound: more may be acknowledged before the kill
    power_cut(primary, remusd)
    logged = acked_digests(remusd, name)
    acked = max(logged, default=d["acked"])
    s = wait_final(ctx.rx, name)
    if s is None or s["state"] == "gone":
        return check_nothing_committed(ctx, name, s, acked) + f" (killed at {delay:.2f} s)"
    return (
        check_failover(ctx, primary, remusd, name, s, acked, logged.get(acked))
        + f" (killed at {delay:.2f} s)"
    )


def run_sigstop(ctx: Ctx, scenario: str, run: int) -> str:
    name = f"led{run}"
    rx = ctx.rx
    primary = start_primary(ctx, name)
    ctx.cleanups.append(lambda: destroy_backup(ctx, name))
    remusd = start_remusd(ctx, primary)
    remusd.ctl("protect", name, "--to", rx.target, "--interval", str(INTERVAL_MS), "--verify")
    remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 3, name, what="protection"
    )
    time.sleep(ctx.rng.uniform(0, 0.3))
    os.kill(proc(remusd).pid, signal.SIGSTOP)
    ctx.cleanups.insert(0, lambda: os.kill(proc(remusd).pid, signal.SIGCONT))
    t0 = time.monotonic()
    s = wait_until(
        "the receiver to fail over",
        lambda: (lambda s: s if s and s["state"] == "failed-over" else None)(rx_session(rx, name)),
        10,
    )
    detect = time.monotonic() - t0
    out_at_failover = released_outputs(primary, name)
    backup_domid = s["backup_domid"]
    os.kill(proc(remusd).pid, signal.SIGCONT)
    d = remusd.wait(
        lambda d: d["state"] == "fenced", name, timeout=10, what="remusd to find itself fenced"
    )
    check("failed-over" in d["reason"] or "took over" in d["reason"], d["reason"])
    check(primary.lookup(name).info().state == "paused", "the stale primary guest still runs")
    time.sleep(1.5)  # no retry loop against the receiver meanwhile
    d = remusd.domain(name)
    check(
        d["state"] == "fenced" and d["retries"] == 0 and d["sessions"] == 1,
        f"remusd after fencing: state {d['state']}, retries {d['retries']}, "
        f"sessions {d['sessions']}",
    )
    check(proc(remusd).poll() is None, "remusd died")
    s2 = rx_session(rx, name)
    assert s2 is not None, "the receiver dropped the session that failed over"
    check(
        s2["state"] == "failed-over" and s2["backup_domid"] == backup_domid,
        f"the backup that took over was touched: {s2['state']} {s2['backup_domid']}",
    )
    refusals = [
        ln
        for ln in rx.log().splitlines()
        if "refused session" in ln and f"for domain {name} " in ln
    ]
    check(len(refusals) <= 1, f"remusd hammered the receiver: {len(refusals)} refusals")
    out_after = released_outputs(primary, name)
    check(
        out_after == out_at_failover,
        f"the fenced primary released {out_after - out_at_failover}"
        " outputs after the backup took over",
    )
    d_ack = remusd.domain(name)
    res = check_failover(ctx, primary, remusd, name, s2, d_ack["acked"], d_ack["acked_digest"])
    return f"failover {detect * 1000:.0f} ms after SIGSTOP; remusd fenced, guest paused; " + res


class ResetProxy:
    """TCP forwarder remusd -> receiver that can cut the link mid-chunk.

    ``cut()``: the next data remusd sends is forwarded only by half, then
    both connections are closed with SO_LINGER 0 (RST both ways).
    """

    def __init__(self, upstream_port: int) -> None:
        self.up = upstream_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self._cut = threading.Event()
        self.cut_done = threading.Event()
        self.cut_bytes = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        self._cut.set()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.up), timeout=5)
            except OSError:
                c.close()
                continue
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()

    @staticmethod
    def _rst(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

    def _pump(self, c: socket.socket, u: socket.socket) -> None:
        c.setblocking(True)
        u.setblocking(True)
        try:
            while True:
                r, _, _ = select.select([c, u], [], [], 0.5)
                for s in r:
                    data = s.recv(1 << 16)
                    if not data:
                        self._rst(c, u)
                        return
                    if s is c and self._cut.is_set() and len(data) >= 64:
                        self._cut.clear()
                        u.sendall(data[: len(data) // 2])
                        self.cut_bytes = len(data) // 2
                        time.sleep(0.05)  # let the half chunk reach the receiver first
                        self._rst(c, u)
                        self.cut_done.set()
                        return
                    (u if s is c else c).sendall(data)
        except OSError:
            self._rst(c, u)

    def close(self) -> None:
        self._stop = True
        self.lsock.close()


def run_tcp_reset(ctx: Ctx, scenario: str, run: int) -> str:
    name = f"led{run}"
    rx = ctx.rx
    primary = start_primary(ctx, name)
    ctx.cleanups.append(lambda: destroy_backup(ctx, name))
    proxy = ResetProxy(rx.port)
    ctx.cleanups.append(proxy.close)
    remusd = start_remusd(ctx, primary)
    remusd.ctl("protect", name, "--to", proxy.target, "--interval", str(INTERVAL_MS), "--verify")
    remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 3, name, what="protection"
    )
    time.sleep(ctx.rng.uniform(0, 0.3))
    s0 = rx_session(rx, name)
    assert s0 is not None, "remusd is protected, but the receiver has no session"
    committed_before = s0["last_committed"]
    proxy.cut()
    check(proxy.cut_done.wait(10), "the proxy saw no data to cut")
    d = remusd.wait(
        lambda d: d["sessions"] >= 2 and d["state"] == "protected",
        name,
        timeout=20,
        what="re-protection after the reset",
    )
    lines = rx_lines(rx, name)
    check(not any("FAILOVER" in ln for ln in lines), "the backup failed over after a reset")
    check(any("reset" in ln.lower() for ln in lines), "the receiver's log does not say reset")
    check(
        any("unprotected" in ln and name in ln for ln in remusd.log().splitlines()),
        "remusd's log does not say unprotected",
    )
    s = rx_session(rx, name)
    assert s is not None, "remusd is protected again, but the receiver has no session"
    check(s["state"] == "receiving" and s["mismatches"] == 0, f"new session {s}")
    # a protected guest is paused for a moment at each checkpoint: look a few times
    states = [primary.lookup(name).info().state for _ in range(5)]
    check("running" in states, f"the primary guest stopped ({states})")
    # the new protection holds everything: power cut, failover, ledger-check
    c1 = d["checkpoints"]
    remusd.wait(lambda d: d["checkpoints"] >= c1 + 5, name, what="5 more checkpoints")
    d = remusd.domain(name)
    power_cut(primary, remusd)
    s = wait_final(rx, name)
    res = check_failover(ctx, primary, remusd, name, s, d["acked"], d["acked_digest"])
    return (
        f"RST after {proxy.cut_bytes} bytes of a chunk (committed {committed_before} "
        f"before); no failover, re-protected; then {res}"
    )


def run_receiver_restart(ctx: Ctx, scenario: str, run: int) -> str:
    name = f"led{run}"
    primary = start_primary(ctx, name)
    backup = SimHost(sim_dir("faults-backup-")).start()
    ctx.cleanups.append(backup.cleanup)
    rx = Receiver(ctx.workdir, backup, free_port())
    ctx.cleanups.append(rx.kill)
    rx.start()
    own = Ctx(ctx.workdir, ctx.rng, backup=backup, rx=rx)
    remusd = start_remusd(
        ctx, primary, "--ack-timeout", "1", "--retry-min", "0.2", "--retry-max", "0.5"
    )
    remusd.ctl("protect", name, "--to", rx.target, "--interval", str(INTERVAL_MS), "--verify")
    remusd.wait(lambda d: d["state"] == "protected", name, what="protection")
    time.sleep(ctx.rng.uniform(0, 0.5))
    rx.kill()
    d = remusd.wait(lambda d: d["state"] == "unprotected", name, timeout=10, what="unprotected")
    check("backup lost" in d["reason"], d["reason"])
    n0 = released_outputs(primary, name)
    time.sleep(0.3)
    check(released_outputs(primary, name) > n0, "outputs held back while unprotected")
    rx.start()
    remusd.wait(
        lambda d: d["state"] == "protected" and d["sessions"] >= 2,
        name,
        timeout=20,
        what="re-protection",
    )
    remusd.wait(lambda d: d["acked"] is not None and d["acked"] >= 5, name, what="5 checkpoints")
    d = remusd.domain(name)
    power_cut(primary, remusd)
    s = wait_final(rx, name)
    return "unprotected, re-protected; then " + check_failover(
        own, primary, remusd, name, s, d["acked"], d["acked_digest"]
    )


#: remusd-crash runs at remusd's default interval: the receiver's default failover
#: timeout (900 ms) is what a restarted remusd has to reconnect in
CRASH_INTERVAL_MS = 200


def run_remusd_crash(ctx: Ctx, scenario: str, run: int) -> str:
    name = f"led{run}"
    rx = ctx.rx
    primary = start_primary(ctx, name)
    ctx.cleanups.append(lambda: destroy_backup(ctx, name))
    remusd = start_remusd(ctx, primary)
    remusd.ctl("protect", name, "--to", rx.target, "--interval", str(CRASH_INTERVAL_MS), "--verify")
    remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 3, name, what="protection"
    )
    time.sleep(ctx.rng.uniform(0, 0.3))
    # half the runs restart at once (systemd's RestartSec=100ms), the others late
    late = ctx.rng.random() < 0.5
    delay = ctx.rng.uniform(0.2, 1.0) if late else 0.0
    remusd.kill()  # remusd alone: the primary host and its guest live on
    t_kill = time.monotonic()
    out_at_kill = released_outputs(primary, name)
    logged = acked_digests(remusd, name)
    acked = max(logged, default=None)
    st = primary.lookup(name).status()
    check(st["logdirty"], "log-dirty went off with the dead remusd")
    time.sleep(delay)
    again = start_remusd(ctx, primary)
    started = time.monotonic() - t_kill
    d = again.wait(
        lambda d: (
            d["state"] in ("protected", "fenced", "stopped")
            or (d["state"] == "unprotected" and d["reason"].endswith("(not retrying)"))
        ),
        name,
        timeout=30,
        what="the restarted remusd to settle the orphan",
    )
    check(d["adopted"], f"the restarted remusd did not adopt the orphan: {d}")
    check("ORPHAN found" in again.log(), "no 'ORPHAN found' line in remusd's log")
    s = rx_session(rx, name)
    assert s is not None, "the receiver has no session for the domain"
    failed_over = any("FAILOVER" in ln for ln in rx_lines(rx, name))
    if d["state"] == "protected":
        # the HELLO superseded the dead session in time: one copy, protected
        check(not failed_over, "re-protected, but the backup failed over too: two copies")
        check(s["state"] == "receiving", f"receiver session {s['state']}")
        check(d["case"] == "protected", f"case {d['case']}")
        again.wait(lambda d: d["acked"] is not None and d["acked"] >= 5, name, what="5 more")
        d = again.domain(name)
        power_cut(primary, again)
        s2 = wait_final(rx, name)
        res = check_failover(ctx, primary, again, name, s2, d["acked"], d["acked_digest"])
        return f"restarted after {started:.2f} s: re-protected, no failover; then {res}"
    # too late: the backup took over; this copy must be the fence
    check(d["state"] == "fenced", f"remusd after the restart: {d['state']}: {d['reason']}")
    check(d["case"] == "fenced-backup-took-over", f"case {d['case']}: {d['reason']}")
    check(failed_over and s["state"] == "failed-over", f"receiver session {s['state']}")
    check(primary.lookup(name).info().state == "paused", "the stale primary guest still runs")
    time.sleep(0.5)
    check(
        released_outputs(primary, name) == out_at_kill,
        "the primary released output after remusd died, beside the backup that took over",
    )
    res = check_failover(ctx, primary, again, name, s, acked, logged.get(acked or 0))
    return f"restarted after {started:.2f} s: backup had taken over, stale copy fenced; {res}"


def _mount_tmpfs(size: str) -> str:
    mnt = tempfile.mkdtemp(prefix="remus-faults-tmpfs-")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", mnt],
        check=True,
        capture_output=True,
    )
    return mnt


def _umount(mnt: str) -> None:
    subprocess.run(["umount", "-l", mnt], capture_output=True)
    shutil.rmtree(mnt, ignore_errors=True)


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full; the bytes written."""
    n = 0
    block = b"\xa5" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    n += f.write(block[:size])
                except OSError:
                    break
    return n


def run_disk_full(ctx: Ctx, scenario: str, run: int) -> str:
    if os.geteuid() != 0:
        raise Skip("needs root to mount a small tmpfs")
    mnt = _mount_tmpfs("6m")
    ctx.cleanups.append(lambda: _umount(mnt))
    try:
        return _disk_full(ctx, run, mnt)
    except Exception:  # keep the logs that live on the tmpfs
        for sub in ("rx", "backup"):
            with contextlib.suppress(OSError):
                shutil.copytree(
                    Path(mnt) / sub,
                    ctx.workdir / f"tmpfs-{sub}",
                    ignore=shutil.ignore_patterns("*.mem", "*.sock", "filler"),
                )
        raise


def _disk_full(ctx: Ctx, run: int, mnt: str) -> str:
    name = f"led{run}"
    primary = start_primary(ctx, name)
    backup = SimHost(os.path.join(mnt, "backup")).start()
    ctx.cleanups.insert(0, backup.kill)
    rxdir = Path(mnt) / "rx"
    rxdir.mkdir()
    rx = Receiver(rxdir, backup, free_port())  # its log on the small tmpfs too
    ctx.cleanups.insert(0, rx.kill)
    rx.start()
    own = Ctx(ctx.workdir, ctx.rng, backup=backup, rx=rx)
    remusd = start_remusd(ctx, primary, "--retry-min", "0.2", "--retry-max", "0.4")
    remusd.ctl("protect", name, "--to", rx.target, "--interval", str(INTERVAL_MS), "--verify")
    # 1. no room for the backup's 16 MiB: refused, remusd retries, the receiver serves on
    d = remusd.wait(
        lambda d: d["state"] == "unprotected" and d["retries"] >= 2,
        name,
        timeout=15,
        what="refusals and retries",
    )
    check("No space left" in (d["reason"] or ""), f"reason: {d['reason']}")
    check(proc(rx).poll() is None and rx.status()["role"] == "receiver", "the receiver died")
    check(
        any("refused" in ln and "No space left" in ln for ln in rx.log().splitlines()),
        "the receiver's log does not say why it refused",
    )
    # 2. room enough: protected at the next retry
    subprocess.run(["mount", "-o", "remount,size=40m", mnt], check=True, capture_output=True)
    remusd.wait(lambda d: d["state"] == "protected", name, timeout=15, what="protection")
    # 3. fill the filesystem to the last byte while checkpoints commit
    filled = fill(Path(mnt) / "filler")
    c0 = remusd.domain(name)["checkpoints"]
    remusd.wait(
        lambda d: d["checkpoints"] >= c0 + 20,
        name,
        timeout=20,
        what="20 checkpoints on a full filesystem",
    )
    s = rx_session(rx, name)
    assert s is not None, "remusd is protected, but the receiver has no session"
    check(s["state"] == "receiving" and s["mismatches"] == 0, f"session {s}")
    check(proc(rx).poll() is None, "the receiver died")
    d = remusd.domain(name)
    power_cut(primary, remusd)
    s = wait_final(rx, name)
    check(proc(rx).poll() is None, "the receiver died at failover")
    os.unlink(Path(mnt) / "filler")  # so the resumed guest's output reaches its file
    res = check_failover(own, primary, remusd, name, s, d["acked"], d["acked_digest"])
    return (
        f"refused for space, retried, protected; filled {filled >> 20} MiB; 20 commits "
        f"on a full fs; then {res}"
    )


class Skip(Exception):
    pass


# --------------------------------------------------------------------- the witness

#: the witness pair's timings (as tests/e2e/test_witness.py): a 2 s lease, a
#: 600 ms failover timeout on the receiver, with and without a witness
W_TTL = 2
W_FAILOVER_MS = 600


def _witness_pair(ctx: Ctx, *, witness: bool, etcd_proxy: bool = False) -> tuple:
    """A pair of its own: the ledger guest protected every 20 ms through a
    link proxy, with or without the witness (a 3-member etcd; the primary
    reaching it through proxies the run can cut, with ``etcd_proxy``).
    (primary, backup, remusd, receiver, link proxy, etcd proxies)."""
    primary = start_primary(ctx, "ledger")
    backup = SimHost(sim_dir("faults-wbackup-")).start()
    ctx.cleanups.append(backup.cleanup)
    rxdir = ctx.workdir / "rx"
    rxdir.mkdir()
    prefix = f"/remus/f{ctx.rng.randrange(1 << 32):08x}"
    flags: list[str] = []
    etcd_px: list[Proxy] = []
    if witness:
        if ctx.etcd is None or etcd_binary() is None:
            raise Skip("no etcd binary (apt-get install etcd-server)")
        eps = ctx.etcd().endpoints
        config = receiver_config(rxdir, eps, prefix)
        if etcd_proxy:
            etcd_px = [Proxy(int(e.rsplit(":", 1)[1])) for e in eps]
            ctx.cleanups += [p.close for p in etcd_px]
            eps = [f"http://127.0.0.1:{p.port}" for p in etcd_px]
        flags = witness_flags(eps, prefix)
    else:
        config = str(rxdir / "receiver.toml")
        Path(config).write_text(f"failover-timeout = {W_FAILOVER_MS}\n")
    rx = Receiver(rxdir, backup, free_port(), "--config", config)
    ctx.cleanups.append(rx.kill)
    rx.start()
    link = Proxy(rx.port)
    ctx.cleanups.append(link.close)
    remusd = start_remusd(
        ctx, primary, "--ack-timeout", "0.5", "--retry-min", "0.2", "--retry-max", "0.5", *flags
    )
    remusd.ctl("protect", "ledger", "--to", f"127.0.0.1:{link.port}", "--interval", "20")
    d = remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 5, "ledger", what="protection"
    )
    check(d["split_brain_protection"] is witness, f"split_brain_protection is {witness}")
    return primary, backup, remusd, rx, link, etcd_px


def run_witness_power_cut(ctx: Ctx, scenario: str, run: int) -> str:
    """The primary host dies: the time from the kill to the backup running,
    with the witness (TTL + failover timeout) and without (the timeout)."""
    witness = scenario == "witness-power-cut"
    primary, backup, remusd, rx, _link, _ = _witness_pair(ctx, witness=witness)
    seen = remusd.domain("ledger")["acked"]
    t0 = time.monotonic()
    power_cut(primary, remusd)
    s = wait_until(
        "the backup to take over",
        lambda: (lambda s: s if s and s["state"] == "failed-over" else None)(rx.session("ledger")),
        W_TTL + W_FAILOVER_MS / 1000 + 10,
        every=0.01,
    )
    took = time.monotonic() - t0
    check(s["last_committed"] >= seen, "resumed from a checkpoint below the last acknowledged")
    check(backup.lookup("ledger").info().state == "running", "the backup does not run")
    acked = ctx.workdir / "acked.txt"
    check(released_outputs(primary, "ledger", acked) > 0, "no acknowledged output")
    backup.cli("pause", "ledger")
    r = backup.cli("ledger-check", "ledger", "--acked", str(acked), check=False)
    check(r.returncode == 0, f"ledger-check: {r.stdout}{r.stderr}")
    ctx.figures["failover_s"] = round(took, 3)
    return f"failover {took:.2f} s after the kill ({'witness' if witness else 'no witness'})"


def run_witness_link_cut(ctx: Ctx, scenario: str, run: int) -> str:
    """The replication link cut, the primary still reaching etcd: no failover
    for two lease TTLs (the receiver's claims are refused), the guest runs on;
    re-protected once the link is back."""
    primary, _backup, remusd, rx, link, _ = _witness_pair(ctx, witness=True)
    link.cut()
    remusd.wait(lambda d: d["state"] == "unprotected", "ledger", timeout=10, what="unprotected")
    n0 = released(primary, "ledger")
    time.sleep(2 * W_TTL + W_FAILOVER_MS / 1000)
    false_failovers = rx.log().count("FAILOVER")
    ctx.figures["false_failovers"] = false_failovers
    check(false_failovers == 0, "the receiver failed over while the primary held its lease")
    check(released(primary, "ledger") > n0, "the guest released nothing while unprotected")
    link.restore()
    remusd.wait(
        lambda d: d["state"] == "protected" and d["sessions"] >= 2,
        "ledger",
        timeout=20,
        what="re-protection",
    )
    return "no failover over 2 TTLs; re-protected when the link came back"


def run_witness_partition(ctx: Ctx, scenario: str, run: int) -> str:
    """The primary cut from the receiver and from etcd: it stops releasing and
    pauses before the receiver wins the key. Sampled every 10 ms: a sample in
    which both copies' released outputs grew is a double-release window."""
    primary, backup, remusd, rx, link, etcd_px = _witness_pair(ctx, witness=True, etcd_proxy=True)
    samples: list[tuple[float, int, int]] = []
    for p in etcd_px:
        p.cut()
    link.cut()
    t0 = time.monotonic()
    deadline = t0 + W_TTL + W_FAILOVER_MS / 1000 + 8
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), released(primary, "ledger"), released(backup, "ledger")))
        if len([s for s in samples if s[2] > 0]) > 25:
            break
        time.sleep(0.01)
    first = next((i for i, s in enumerate(samples) if s[2] > 0), None)
    check(first is not None and first > 0, "the backup never took over")
    assert first is not None
    windows = sum(1 for a, b in zip(samples, samples[1:], strict=False) if b[1] > a[1] and b[2] > 0)
    frozen_at = next(s[0] for s in samples if s[1] == samples[-1][1])  # its last release
    ctx.figures["double_release_windows"] = windows
    ctx.figures["backup_first_release_s"] = round(samples[first][0] - t0, 3)
    ctx.figures["primary_last_release_s"] = round(frozen_at - t0, 3)
    check(windows == 0, f"{windows} sample(s) in which both copies released output")
    d = remusd.domain("ledger")
    check(d["state"] == "paused-no-witness", f"primary is {d['state']}, not paused-no-witness")
    check(rx.session("ledger")["state"] == "failed-over", "the receiver did not fail over")
    return (
        f"primary's output stopped {ctx.figures['primary_last_release_s']:.2f} s after the "
        f"cut, the backup's began {ctx.figures['backup_first_release_s']:.2f} s after; "
        "0 double-release windows"
    )


# --------------------------------------------------------------------- disks (issue 13)

#: the disk scenarios' guests: a ledger (its journal on its disk) and a
#: hotset writing a 4 KiB block every DISK_HOT_EVERY steps, 8 MiB disks each
DISK_SIZE = 8 << 20
DISK_INTERVAL_MS = 30
DISK_LEDGER_RATE = 2000
DISK_HOT_RATE = 5000
DISK_HOT_EVERY = 2  # 2,500 disk writes/s, 10 MB/s
#: disk-receiver-kill: a larger disk written less often, so that the blocks
#: written while the receiver is away are a small part of it (100 writes/s)
RESYNC_DISK_SIZE = 64 << 20
RESYNC_HOT_EVERY = 50
#: disk-receiver-kill: how far before the kill the receiver's last committed
#: epoch may lie (generous: 10 intervals) when bounding the blocks that differ
RESYNC_MARGIN_S = 0.3


def start_disk_primary(
    ctx: Ctx, led: str, hot: str, disk: int = DISK_SIZE, every: int = DISK_HOT_EVERY
) -> tuple[SimHost, int]:
    """A primary host with the two disk guests; (host, the hotset's seed)."""
    host = SimHost(sim_dir("faults-dprimary-")).start()
    ctx.cleanups.append(host.cleanup)
    host.create(
        MEMORY,
        "ledger",
        seed=ctx.rng.randrange(1 << 32),
        rate=DISK_LEDGER_RATE,
        name=led,
        disks=[disk],
    )
    seed = ctx.rng.randrange(1 << 32)
    host.create(
        MEMORY, "hotset", seed=seed, rate=DISK_HOT_RATE, name=hot, disks=[disk], disk_every=every
    )
    return host, seed


def guest_step(host: SimHost, name: str) -> int:
    dom = host.lookup(name)
    try:
        return dom.step
    finally:
        dom.close()


def protect_disks(remusd: Remusd, target: str, names: tuple[str, ...]) -> None:
    for n in names:
        remusd.ctl("protect", n, "--to", target, "--interval", str(DISK_INTERVAL_MS), "--verify")
    for n in names:
        d = remusd.wait(
            lambda d: d["state"] == "protected" and d["checkpoints"] >= 3, n, what="protection"
        )
        check(d["disks"]["disks"][0]["sync"]["done"], f"{n}: disk sync not done: {d['disks']}")


def sim_check(host: SimHost, *args: str) -> tuple[bool, str]:
    r = host.cli(*args, check=False)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def disk_cut_and_check(ctx: Ctx, primary: SimHost, remusd: Remusd, led: str, hot: str) -> str:
    """Power cut; both guests fail over; the backup's memory is the acked
    checkpoint's, its ledger (memory, journal, released outputs) and hotset
    disk agree with it; then both guests run on and the checks hold again."""
    rx, backup = ctx.rx, ctx.backup
    before = {n: remusd.domain(n) for n in (led, hot)}  # lower bounds of the acked
    t0 = time.monotonic()
    power_cut(primary, remusd)
    states: dict[str, dict | None] = {}

    def settled(n: str) -> dict | None:
        s = rx_session(rx, n)
        return {"s": s} if s is None or s["state"] in ("gone", "failed-over") else None

    for n in (led, hot):
        states[n] = wait_until(
            f"the receiver to settle domain {n}", functools.partial(settled, n), 20, every=0.01
        )["s"]
    ctx.figures["failover_s"] = round(time.monotonic() - t0, 3)
    resumed = {}
    for n in (led, hot):
        logged = acked_digests(remusd, n)
        acked = max(logged, default=before[n]["acked"])
        resumed[n] = check_resumed(ctx, remusd, n, states[n], acked, logged.get(acked))
    acked_file = ctx.workdir / f"{led}.acked"
    outputs = released_outputs(primary, led, acked_file)
    check(outputs > 0, "the ledger released no output")
    for n in (led, hot):
        backup.cli("pause", n)
    led_ok, led_out = sim_check(backup, "ledger-check", led, "--acked", str(acked_file))
    hot_ok, hot_out = sim_check(backup, "disk-check", hot)
    ctx.figures["ledger_check_failed"] = int(not led_ok)
    ctx.figures["disk_differs"] = int(not hot_ok)
    check(led_ok, f"ledger-check: {led_out}")
    check(hot_ok, f"disk-check: {hot_out}")
    hs = rx_session(rx, hot)
    assert hs is not None
    ctx.figures["hot_epochs_applied"] = hs["disks"]["epochs_applied"]
    # (c) the guests run on, on the backup's disks
    at = {n: guest_step(backup, n) for n in (led, hot)}
    for n in (led, hot):
        backup.cli("unpause", n)

    def ran_on(n: str, more: int) -> bool:
        return guest_step(backup, n) > at[n] + more

    for n, more in ((led, 100), (hot, 500)):
        wait_until(f"{n} to run on", functools.partial(ran_on, n, more), 20)
    for n in (led, hot):
        backup.cli("pause", n)
    led_ok, led_out = sim_check(backup, "ledger-check", led, "--acked", str(acked_file))
    hot_ok, hot_out = sim_check(backup, "disk-check", hot)
    ctx.figures["run_on_failed"] = int(not (led_ok and hot_ok))
    check(led_ok, f"ledger-check after running on: {led_out}")
    check(hot_ok, f"disk-check after running on: {hot_out}")
    return (
        f"failover {ctx.figures['failover_s']:.2f} s; {led} from {resumed[led][0]}, "
        f"{hot} from {resumed[hot][0]} ({hs['disks']['epochs_applied']} disk epochs applied); "
        f"ledger-check ({outputs} outputs) and disk-check pass, and again after running on"
    )


def run_disk_power_cut(ctx: Ctx, scenario: str, run: int) -> str:
    led, hot = f"dled{run}", f"dhot{run}"
    primary, _ = start_disk_primary(ctx, led, hot)
    for n in (led, hot):
        ctx.cleanups.append(functools.partial(destroy_backup, ctx, n))
    remusd = start_remusd(ctx, primary)
    protect_disks(remusd, ctx.rx.target, (led, hot))
    delay = ctx.rng.uniform(0.0, 1.0)
    time.sleep(delay)
    return f"killed {delay:.2f} s after protection; " + disk_cut_and_check(
        ctx, primary, remusd, led, hot
    )


def blocks_written(seed: int, every: int, nblocks: int, lo: int, hi: int) -> set[int]:
    """The hash blocks (DISK_HASH_BLOCK) the hotset's disk writes of steps
    [lo, hi) touch."""
    first = lo + (every - 1 - lo) % every
    per = DISK_HASH_BLOCK // DISK_BLOCK
    return {disk_write(seed, i, nblocks)[0] // per for i in range(first, hi, every)}


def run_disk_receiver_kill(ctx: Ctx, scenario: str, run: int) -> str:
    led, hot = f"dled{run}", f"dhot{run}"
    primary, seed = start_disk_primary(ctx, led, hot, RESYNC_DISK_SIZE, RESYNC_HOT_EVERY)
    backup = SimHost(sim_dir("faults-dbackup-")).start()
    ctx.cleanups.append(backup.cleanup)
    rx = Receiver(ctx.workdir, backup, free_port())  # its disks under the backup's directory
    ctx.cleanups.append(rx.kill)
    rx.start()
    own = Ctx(ctx.workdir, ctx.rng, backup=backup, rx=rx, figures=ctx.figures)
    remusd = start_remusd(
        ctx, primary, "--ack-timeout", "1", "--retry-min", "0.2", "--retry-max", "0.5"
    )
    protect_disks(remusd, rx.target, (led, hot))
    time.sleep(ctx.rng.uniform(0.0, 0.5))
    step0 = guest_step(primary, hot)
    rx.kill()
    for n in (led, hot):
        remusd.wait(lambda d: d["state"] == "unprotected", n, timeout=10, what="unprotected")
    time.sleep(ctx.rng.uniform(0.0, 0.5))
    rx.start()  # the same --disk-dir: the images of the first session are there
    for n in (led, hot):
        remusd.wait(
            lambda d: d["state"] == "protected" and d["sessions"] >= 2 and d["checkpoints"] > 0,
            n,
            timeout=30,
            what="re-protection",
        )
    step1 = guest_step(primary, hot)
    sync = {n: remusd.domain(n)["disks"]["disks"][0]["sync"] for n in (led, hot)}
    for n in (led, hot):
        s = rx_session(rx, n)
        assert s is not None, f"no receiver session for {n}"
        check(s["disks"]["disks"][0]["reused"], f"{n}: the receiver did not reuse its image")
        check(sync[n]["done"], f"{n}: sync not done: {sync[n]}")
    hs = sync[hot]
    margin = int(RESYNC_MARGIN_S * DISK_HOT_RATE)
    bound = len(
        blocks_written(
            seed, RESYNC_HOT_EVERY, RESYNC_DISK_SIZE // DISK_BLOCK, max(0, step0 - margin), step1
        )
    )
    ctx.figures["resync_differing"] = hs["differing"]
    ctx.figures["resync_bound"] = bound
    ctx.figures["resync_MB"] = round(hs["bytes_sent"] / 1e6, 3)
    ctx.figures["ledger_resync_differing"] = sync[led]["differing"]
    check(
        hs["differing"] <= bound,
        f"{hot}: {hs['differing']} of {hs['blocks']} blocks differ, but the guest's writes "
        f"since the kill touch at most {bound}",
    )
    check(
        sync[led]["differing"] < sync[led]["blocks"] // 2,
        f"{led}: {sync[led]['differing']} of {sync[led]['blocks']} blocks copied again",
    )
    c1 = remusd.domain(hot)["checkpoints"]
    remusd.wait(lambda d: d["checkpoints"] >= c1 + 5, hot, what="5 more checkpoints")
    res = disk_cut_and_check(own, primary, remusd, led, hot)
    return (
        f"re-synced {hs['differing']} of {hs['blocks']} blocks (bound {bound}; ledger "
        f"{sync[led]['differing']}); then {res}"
    )


RUNNERS: dict[str, Callable[[Ctx, str, int], str]] = {
    **{k: run_kill_point for k in KILL_POINTS},
    "kill-random": run_kill_random,
    "sigstop": run_sigstop,
    "tcp-reset": run_tcp_reset,
    "receiver-restart": run_receiver_restart,
    "remusd-crash": run_remusd_crash,
    "disk-full": run_disk_full,
    "plain-power-cut": run_witness_power_cut,
    "witness-power-cut": run_witness_power_cut,
    "witness-link-cut": run_witness_link_cut,
    "witness-partition": run_witness_partition,
    "disk-power-cut": run_disk_power_cut,
    "disk-receiver-kill": run_disk_receiver_kill,
}


# --------------------------------------------------------------------- campaign


class Campaign:
    """The shared backup host and receiver, and the runs."""

    def __init__(self, root: Path, seed: int, keep_logs: Path | None = None) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.keep_logs = keep_logs
        self.backup: SimHost | None = None
        self.rx: Receiver | None = None
        self._etcd: EtcdCluster | None = None

    def etcd(self) -> EtcdCluster:
        """The witness scenarios' etcd (three members on loopback), started once."""
        if self._etcd is None:
            self._etcd = start_cluster(self.root / "etcd")
        return self._etcd

    def _shared(self) -> None:
        if (
            self.rx is not None
            and self.backup is not None  # set with rx, before it
            and proc(self.rx).poll() is None
            and self.backup.running()
        ):
            return
        self.close()
        self.backup = SimHost(sim_dir("faults-backup-")).start()
        rxdir = self.root / "shared-rx"
        rxdir.mkdir(exist_ok=True)
        self.rx = Receiver(rxdir, self.backup, free_port()).start()

    def run(self, scenario: str, run: int) -> Result:
        self._shared()
        assert self.backup is not None and self.rx is not None  # _shared() set both
        wd = self.root / f"run-{run:04d}-{scenario}"
        wd.mkdir()
        ctx = Ctx(
            wd, random.Random(self.rng.randrange(1 << 32)), self.backup, self.rx, etcd=self.etcd
        )
        t0 = time.monotonic()
        try:
            detail = RUNNERS[scenario](ctx, scenario, run)
            res = Result(scenario, run, True, time.monotonic() - t0, detail, figures=ctx.figures)
        except Skip as e:
            res = Result(scenario, run, True, time.monotonic() - t0, f"skipped: {e}")
        except Exception as e:  # a failed run: keep its logs, go on
            res = Result(
                scenario,
                run,
                False,
                time.monotonic() - t0,
                error=f"{type(e).__name__}: {e}",
                figures=ctx.figures,  # what it measured before it failed (disk_differs ...)
            )
        finally:
            for c in ctx.cleanups:
                with contextlib.suppress(Exception):
                    c()
        if not res.ok:
            res.logs = self._keep(wd, run, scenario)
        else:
            shutil.rmtree(wd, ignore_errors=True)
        return res

    def _keep(self, wd: Path, run: int, scenario: str) -> str:
        dest = (self.keep_logs or Path(tempfile.gettempdir())) / f"faults-{run:04d}-{scenario}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(wd, dest, ignore=shutil.ignore_patterns("*.sock"))
        if self.rx is not None:
            with contextlib.suppress(OSError):
                shutil.copy(self.rx.log_path, dest / "shared-receiver.log")
        return str(dest)

    def close(self) -> None:
        if self._etcd is not None:
            self._etcd.close()
            self._etcd = None
        if self.rx is not None:
            self.rx.kill()
            self.rx = None
        if self.backup is not None:
            self.backup.cleanup()
            self.backup = None


def summarize(results: list[Result]) -> dict:
    per: dict[str, dict] = {}
    for r in results:
        p = per.setdefault(
            r.scenario, {"runs": 0, "ok": 0, "failed": 0, "skipped": 0, "seconds": []}
        )
        p["runs"] += 1
        for k, v in r.figures.items():
            p.setdefault("figures", {}).setdefault(k, []).append(v)
        if not r.ok:
            p["failed"] += 1
        elif r.detail.startswith("skipped"):
            p["skipped"] += 1
        else:
            p["ok"] += 1
        p["seconds"].append(r.seconds)
    for p in per.values():
        s = sorted(p.pop("seconds"))
        p["seconds_mean"] = round(sum(s) / len(s), 2)
        p["seconds_max"] = round(s[-1], 2)
        for k, vs in p.get("figures", {}).items():
            vs.sort()
            p["figures"][k] = {
                "n": len(vs),
                "min": vs[0],
                "median": vs[len(vs) // 2],
                "max": vs[-1],
                "sum": round(sum(vs), 3),
            }
    return per


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=len(SCENARIOS),
        help="runs in all, spread over the scenarios (default: one each)",
    )
    ap.add_argument(
        "--scenario", action="append", choices=SCENARIOS, help="only these scenarios (repeatable)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument(
        "--keep-logs",
        metavar="DIR",
        help="where failed runs' logs go (default: the temp directory)",
    )
    args = ap.parse_args(argv)
    scenarios = args.scenario or list(SCENARIOS)
    root = Path(tempfile.mkdtemp(prefix="remus-faults-"))
    camp = Campaign(root, args.seed, Path(args.keep_logs) if args.keep_logs else None)
    results: list[Result] = []
    t0 = time.monotonic()
    try:
        for i in range(args.runs):
            sc = scenarios[i % len(scenarios)]
            r = camp.run(sc, i)
            results.append(r)
            mark = "ok  " if r.ok else "FAIL"
            print(
                f"{mark} {i:4d} {sc:20s} {r.seconds:5.1f} s  {r.detail if r.ok else r.error}",
                flush=True,
            )
            if r.logs:
                print(f"          logs: {r.logs}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        camp.close()
        shutil.rmtree(root, ignore_errors=True)
    total = time.monotonic() - t0
    per = summarize(results)
    print(
        f"\n{'scenario':20s} {'runs':>5s} {'ok':>5s} {'failed':>6s} {'skipped':>7s} "
        f"{'mean s':>7s} {'max s':>6s}"
    )
    for sc, p in per.items():
        print(
            f"{sc:20s} {p['runs']:5d} {p['ok']:5d} {p['failed']:6d} {p['skipped']:7d} "
            f"{p['seconds_mean']:7.2f} {p['seconds_max']:6.2f}"
        )
    figs = [(sc, k, f) for sc, p in per.items() for k, f in p.get("figures", {}).items()]
    if figs:
        print(
            f"\n{'scenario':20s} {'figure':24s} {'n':>3s} {'min':>7s} {'median':>7s} {'max':>7s} {'sum':>7s}"
        )
        for sc, k, f in figs:
            print(
                f"{sc:20s} {k:24s} {f['n']:3d} {f['min']:7g} {f['median']:7g} {f['max']:7g} "
                f"{f['sum']:7g}"
            )
    failed = [r for r in results if not r.ok]
    print(
        f"{len(results)} runs, {len(failed)} failed, {total:.0f} s "
        f"({total / max(1, len(results)):.1f} s per run)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "runs": len(results),
                    "failed": len(failed),
                    "seconds": round(total, 1),
                    "seed": args.seed,
                    "scenarios": per,
                    "results": [asdict(r) for r in results],
                },
                indent=1,
            )
            + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
