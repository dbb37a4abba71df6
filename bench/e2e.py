"""End-to-end benchmark: the real daemons on two simulated hosts over loopback.

    python -m bench.e2e [--quick] [--json PATH] [--plot PATH] [--only PHASE,...]
                        [--transport tls,plain] [--median RUN.json ...]

Every figure comes from real processes: two ``python -m xenbind.sim host``
(primary, backup, directories on /dev/shm), ``remus-receiver`` on the backup
and ``remusd`` on the primary, linked over 127.0.0.1 TCP. Figures are read
from remusd's control socket (``status``, with ``"history": true`` for the
per-checkpoint pause / dirty pages / bytes of the last 4096 checkpoints), the
receiver's control socket, remusd's log (initial copy line) and
/proc/PID/stat (CPU). Each figure stands beside a reference measured in the
same run, under the same load (the machine is a shared, noisy 2-core box).

Every phase runs over both transports of the replication link (``--transport``
picks): mutual TLS 1.3, the daemons' default (``Stack(tls=True)``: a
throwaway CA and host certificates made with daemonkit.pki at start, the
receiver allowing the primary's name, remusd checking the receiver's
127.0.0.1 SAN), and plaintext (both daemons ``--insecure``). Both stacks are
up together; measurement by measurement the transports take turns (A B, B A,
A B, ...), the guest of the one not measured paused, so that a drift of the
machine hits both alike. JSON and tables carry each transport's figures
(``RESULT[PHASE][TRANSPORT]``, the layout of one transport's phase as
before), ``tls_vs_plain`` the headline figures side by side with TLS / plain,
and ``tls_targets`` the issue's TLS targets: initial copy over TLS >= 0.5 of
a TLS socket copy; at 25 ms with the default codec, checkpoints/s >= 0.9
and median pause <= 1.1 of plaintext's.
The measuring stack's receiver runs with --failover-timeout 5000 so that a
stall of the machine cannot end a measurement with a false failover (the
failover phase measures the real timeouts).

Phases (``--only`` picks some; all by default):

copy      Initial copy of a populated guest (1 GiB; 256 MiB with --quick):
          MB/s from remusd's "initial copy of N pages ... T s" log line (the
          median of 3 protect sessions, each to a new backup domain; each
          session's figure and its protect-request-to-protected time are
          kept too), beside
          a plain TCP copy of the same bytes (the guest's memory file, mmap'd,
          sendall in 16 MiB slices -> recv_into) over loopback. Target >= 50%.
          Over TLS the reference is a TLS socket copy of the same bytes in the
          same way (Python ssl, the daemons' contexts built by
          daemonkit.tls.build_context from the same certificates: the cipher
          the link negotiates, recorded beside it). Target >= 50%; and the
          TLS socket copy against the plain one says what TLS costs here.
          Also: the same socket copy received straight into a fresh tmpfs
          mapping (what writing a new guest's memory costs on this machine),
          and the allocation of such a mapping alone (MADV_POPULATE_WRITE).
pause     Pause per checkpoint (median, p99, max) with ``random`` dirtying
          about 100, 1,000, 10,000 pages per epoch (interval 200 ms, rate
          calibrated on the observed dirty counts), beside a numpy gather
          (``np.take`` from the guest's mapping, the sim's own gather) of as
          many random pages, timed in the bench process during the same
          window. Target: median pause <= 2 x gather + 1 ms.
rate      Per codec (seed, xen, none): ``hotset`` (working set 8192 pages,
          Zipf 1.1) calibrated to about 1,000 dirty pages per 25 ms epoch:
          checkpoints/s achieved, CPU of remusd and the receiver (and of each
          sim host with its guest workers, for context), bytes on the wire per
          checkpoint, pause distribution, rate over time (for --plot). Then the
          best codec at a 10 ms interval with the same pages per
          epoch: how far above 40/s the pair goes. Target: 40/s at 25 ms.
ratio     Compression on the wire (page bytes / bytes sent for the checkpoints,
          chunk headers and tails included) and page-cache hit rate per
          workload (ledger, hotset, random, scan) and codec, at 25 ms, each
          at the simulator's default rate (ledger 1,000 transactions/s,
          random 1,000 and scan 10,000 pages/s; hotset as in ``rate``).
          Target: >= 10:1 on ledger and hotset.
cache     The page-cache size (remusd --cache-pages 2048, 8192, 32768) against
          a hotset of 16,384 pages (twice the default cache): ratio, hit rate,
          CPU, for seed and xen (256 MiB guests).
failover  Kill -9 of the primary sim host and remusd -> the backup domain
          running (polled every 2 ms in the backup host's domain list), at the
          receiver's default timeout (interval 200 ms, derived 900 ms) and at
          the shortest safe one: the smallest --failover-timeout among a
          descending list for which a loaded 25 ms session ran a soak period
          with no false failover and no retry. Target <= 1 s at the default.
          One stack per trial; the transports take turns trial by trial.

Prints a table, writes JSON (default bench/results/e2e.json); ``--plot PNG``
draws the pause distribution and the checkpoint rate over time per codec
and transport (matplotlib). A full run over both transports takes about
12-20 minutes, ``--quick`` 3-4 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from daemonkit import pki  # noqa: E402
from daemonkit.control import ControlError, control_request  # noqa: E402
from daemonkit.tls import TlsSettings, build_context  # noqa: E402
from remusd.config import DEFAULT_CODEC  # noqa: E402
from tests.simhost import SimHost  # noqa: E402
from xenbind import PAGE_SIZE  # noqa: E402
from xenbind.compress.formats import CODECS  # noqa: E402  (every codec is benched)
from xenbind.sim import layout as L  # noqa: E402
from xenbind.sim.workloads import DEFAULT_RATE  # noqa: E402

BIN = Path(sys.executable).parent
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
WORKLOADS = ("ledger", "hotset", "random", "scan")
#: hotset shape: working set = the codecs' default cache (8192 pages, 32 MiB)
HOTSET_WSS = 8192
#: target pages per epoch for the rate phase, and the interval it is judged at
RATE_PAGES, RATE_INTERVAL_MS, FAST_INTERVAL_MS = 1000, 25, 10
PAUSE_INTERVAL_MS = 200
PAUSE_PAGES = (100, 1000, 10000)
#: pages (ledger: transactions) per second in the ratio phase: the simulator's
#: defaults (hotset: calibrated to RATE_PAGES per epoch, as in the rate phase)
RATIO_RATE = {k: DEFAULT_RATE[k] for k in ("ledger", "random", "scan")}
#: the receiver's failover timeout in the measuring stack: long, so that a
#: stall on this shared box cannot end a measurement with a false failover
#: (the failover phase measures the real timeouts)
MEASURE_FAILOVER_MS = 5000
SOCKET_SLICE = 16 * MiB
FAILOVER_CANDIDATES_MS = (400, 300, 200, 150, 100, 75, 50)
#: cache phase: page-cache sizes tried, against a hotset twice the default cache
CACHE_SIZES = (2048, 8192, 32768)
CACHE_WSS = 16384
CACHE_RATE = 60000.0
#: what the link runs over: mutual TLS (the daemons' default) and plaintext
#: (--insecure); every phase measures each, interleaved, in the same run
TRANSPORTS = ("tls", "plain")
#: the certificate names of the throwaway PKI (the receiver allows the primary's)
BACKUP_CERT_NAME, PRIMARY_CERT_NAME = "backup.bench", "primary.bench"
#: targets of the TLS figures (issue 16): the initial copy over TLS against a
#: plain TLS socket copy; rate and pause at 25 ms against plaintext
TLS_COPY_TARGET = 0.5
TLS_RATE_MIN, TLS_PAUSE_MAX = 0.9, 1.1


# --- processes ---------------------------------------------------------------------------


def _bin(name: str, module: str) -> list[str]:
    path = BIN / name
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, pred, timeout: float, every: float = 0.02):
    deadline = time.monotonic() + timeout
    err = None
    while True:
        try:
            v = pred()
        except (ControlError, OSError, KeyError, IndexError) as e:
            v, err = None, e
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"timed out after {timeout} s waiting for {what}"
                + (f" (last error: {err})" if err else "")
            )
        time.sleep(every)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (/proc/PID/stat fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(pid: int) -> float:
    """A process and its direct children (a sim host and its domain workers)."""
    total = cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    return total + sum(cpu_seconds(k) for k in kids)


def make_certs(directory: Path) -> dict[str, pki.CertFiles]:
    """A throwaway CA and the two hosts' certificates (daemonkit.pki, as the demo
    makes them): ``ca``; ``backup`` (the receiver: BACKUP_CERT_NAME, SAN
    127.0.0.1, the address remusd connects to and checks); ``primary``
    (remusd: PRIMARY_CERT_NAME, the name the receiver allows)."""
    ca = pki.make_ca(directory, "remus-bench-ca")
    return {
        "ca": ca,
        "backup": pki.make_host_cert(directory, ca, BACKUP_CERT_NAME, ["127.0.0.1"]),
        "primary": pki.make_host_cert(directory, ca, PRIMARY_CERT_NAME),
    }


class Stack:
    """Two sim hosts, remus-receiver on the backup, remusd on the primary;
    linked over mutual TLS (``tls=True``) or plaintext (``--insecure``)."""

    def __init__(
        self,
        base: Path,
        *,
        failover_ms: int | None = None,
        remusd_args: tuple[str, ...] = (),
        tls: bool = False,
    ) -> None:
        self.base = base
        #: True: the link runs over mutual TLS (the daemons' default mode), with a
        #: throwaway CA and host certificates made in BASE/tls at start; False:
        #: both daemons with --insecure (plaintext TCP)
        self.tls = tls
        self.certs: dict[str, pki.CertFiles] = {}
        base.mkdir(parents=True, exist_ok=True)
        self.primary = SimHost(str(base / "primary"))
        self.backup = SimHost(str(base / "backup"))
        self.port = free_port()
        self.rsock = str(base / "remusd.sock")
        self.bsock = str(base / "receiver.sock")
        self.failover_ms = failover_ms
        self.remusd_args = list(remusd_args)
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def transport(self) -> str:
        """``tls`` or ``plain``: what the replication link runs over."""
        return "tls" if self.tls else "plain"

    def _security(self, role: str) -> list[str]:
        """The link-security flags of ``role`` (``backup``: the receiver,
        ``primary``: remusd): --insecure, or the TLS files (and the receiver's
        --allow-peer, the sender's certificate name)."""
        if not self.tls:
            return ["--insecure"]
        c = self.certs[role]
        flags = ["--tls-cert", c.cert, "--tls-key", c.key, "--tls-ca", self.certs["ca"].cert]
        return flags + (["--allow-peer", PRIMARY_CERT_NAME] if role == "backup" else [])

    def session_tls(self) -> tuple[str, str] | None:
        """(version, cipher) of the receiver's last TLS session, from its log line
        "session ID over TLSv1.3 CIPHER, peer NAME"; None before one (or plaintext)."""
        found = re.findall(r"session \w+ over (TLSv[\d.]+) (\S+), peer", self.log("receiver"))
        return (found[-1][0], found[-1][1]) if found else None

    def _start(self, name: str, argv: list[str], control: str) -> None:
        log = open(self.base / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            p = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=ENV, cwd=REPO
            )
        finally:
            log.close()
        self.procs[name] = p

        def up():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}: {self.log(name)[-2000:]}")
            return control_request(control, "status", timeout=2)

        wait_for(name, up, 30)

    def start(self) -> Stack:
        if self.tls:
            self.certs = make_certs(self.base / "tls")
        self.primary.start()
        self.backup.start()
        extra = ["--failover-timeout", str(self.failover_ms)] if self.failover_ms else []
        self._start(
            "receiver",
            _bin("remus-receiver", "receiver.cli")
            + [
                "--listen",
                self.target,
                "--sim-dir",
                self.backup.dir,
                "--control",
                self.bsock,
                *self._security("backup"),
                "--config",
                "/dev/null",
                *extra,
            ],
            self.bsock,
        )
        self._start(
            "remusd",
            _bin("remusd", "remusd.cli")
            + [
                "--sim-dir",
                self.primary.dir,
                "--control",
                self.rsock,
                *self._security("primary"),
                "--config",
                "/dev/null",
                *self.remusd_args,
            ],
            self.rsock,
        )
        return self

    def log(self, name: str) -> str:
        try:
            return (self.base / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.primary.stop()
        self.backup.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # --- remusd -----------------------------------------------------------------------------

    def status(self, name: str, history: bool = False) -> dict:
        st = control_request(self.rsock, "status", timeout=20, history=history)
        for d in st["domains"]:
            if d["name"] == name:
                return d
        raise KeyError(name)

    def protect(self, name: str, codec: str, interval_ms: int, timeout: float = 180) -> dict:
        """Protect ``name``; wait for checkpoint 0's ACK. The initial copy figures."""
        t0 = time.monotonic()
        control_request(
            self.rsock,
            "protect",
            domain=name,
            target=self.target,
            interval_ms=interval_ms,
            codec=codec,
        )

        def protected():
            d = self.status(name)
            if d["state"] in ("unprotected", "stopped"):
                raise RuntimeError(
                    f"protect {name} failed: {d['reason']}\n{self.log('remusd')[-2000:]}"
                )
            return d["state"] == "protected"

        wait_for(f"{name} protected", protected, timeout)
        wall = time.monotonic() - t0
        lines = re.findall(
            rf"domain {re.escape(name)} protected: initial copy of (\d+) pages in "
            r"(\d+) round\(s\), ([\d.]+) MB, ([\d.]+) s, final pause ([\d.]+) ms",
            self.log("remusd"),
        )
        if not lines:
            raise RuntimeError(f"no initial-copy line for {name} in remusd's log")
        pages, rounds, mb, secs, final = lines[-1]
        return {
            "pages": int(pages),
            "rounds": int(rounds),
            "MB": float(mb),
            "s": float(secs),
            "final_pause_ms": float(final),
            "protect_to_protected_s": round(wall, 3),
            "MBps": round(int(pages) * PAGE_SIZE / float(secs) / 1e6, 1),
        }

    def unprotect(self, name: str) -> None:
        control_request(self.rsock, "unprotect", domain=name, wait_s=60, timeout=70)

        def backup_gone():  # the receiver destroys the backup after a clean end
            return not any(i.name == name for i in self.backup.hv.list())

        wait_for(f"the backup of {name} to go", backup_gone, 30)


# --- measurements -----------------------------------------------------------------------


def pct(values, q: float) -> float:
    return round(float(np.percentile(np.asarray(values, dtype=float), q)), 3)


def summary(values) -> dict:
    a = np.asarray(values, dtype=float)
    if not len(a):
        return {"n": 0}
    return {
        "n": int(len(a)),
        "median": pct(a, 50),
        "p99": pct(a, 99),
        "max": round(float(a.max()), 3),
        "mean": round(float(a.mean()), 3),
    }


def create(stack: Stack, name: str, memory: int, workload: str, rate: float, **kw):
    """A primary domain; page-writing workloads get their memory filled first
    (random bytes, 16 MiB repeated), so every page is real, as a booted guest's."""
    dom = stack.primary.create(memory, workload, seed=7, rate=rate, name=name, paused=True, **kw)
    if workload != "ledger":
        rng = np.random.default_rng(7)
        block = rng.integers(0, 256, (4096, PAGE_SIZE), dtype=np.uint8)
        pages = memory // PAGE_SIZE
        for s in range(0, pages, len(block)):
            n = min(len(block), pages - s)
            dom.scatter(np.arange(s, s + n, dtype=np.uint64), block[:n])
    dom.unpause()
    return dom


def window(stack: Stack, name: str, seconds: float, every: float = 0.25, probe=None) -> dict:
    """Watch a protected domain for ``seconds``: checkpoints over time, CPU of
    each process, then the per-checkpoint history of exactly that window."""
    s0 = stack.status(name)
    procs = {"remusd": stack.pid("remusd"), "receiver": stack.pid("receiver")}
    hosts = {"primary_host": stack.primary.pid, "backup_host": stack.backup.pid}
    c0 = {k: cpu_seconds(p) for k, p in procs.items()} | {k: tree_cpu(p) for k, p in hosts.items()}
    t0 = time.monotonic()
    timeline = [(0.0, s0["checkpoints"])]
    probes = []
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        if probe is not None:
            probes.append(probe())
        time.sleep(max(0.0, min(every, t0 + seconds - time.monotonic())))
        d = stack.status(name)
        timeline.append((round(time.monotonic() - t0, 3), d["checkpoints"]))
    elapsed = time.monotonic() - t0
    c1 = {k: cpu_seconds(p) for k, p in procs.items()} | {k: tree_cpu(p) for k, p in hosts.items()}
    s1 = stack.status(name, history=True)
    if s1["sessions"] != s0["sessions"] or s1["state"] != "protected":
        raise RuntimeError(
            f"{name}: the session did not stay protected ({s1['state']}: {s1['reason']})"
        )
    h = s1.pop("history")
    lo, hi = s0["acked"], s1["acked"]
    keep = [i for i, x in enumerate(h["index"]) if lo < x <= hi]
    if h["index"] and h["index"][0] > lo + 1:
        raise RuntimeError("history ring too short for this window")
    pause = [h["pause_ms"][i] for i in keep]
    pages = [h["pages"][i] for i in keep]
    nbytes = [h["bytes"][i] for i in keep]
    n = len(keep)
    hits = s1["cache_hits"] - s0["cache_hits"]
    misses = s1["cache_misses"] - s0["cache_misses"]
    zero_base = s1.get("cache_zero_base", 0) - s0.get("cache_zero_base", 0)
    page_bytes = sum(pages) * PAGE_SIZE
    return {
        "seconds": round(elapsed, 3),
        "checkpoints": n,
        "checkpoints_per_s": round(n / elapsed, 2),
        "pause_ms": summary(pause),
        "dirty_pages": summary(pages),
        "bytes_per_checkpoint": summary(nbytes),
        "wire_MBps": round(sum(nbytes) / elapsed / 1e6, 3),
        "ratio": round(page_bytes / sum(nbytes), 2) if sum(nbytes) else None,
        "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
        # misses sent as deltas against a zero page (the receiver held the PFN as zeros)
        "zero_base_per_checkpoint": round(zero_base / n, 3) if n else None,
        "cpu_percent": {k: round(100 * (c1[k] - c0[k]) / elapsed, 1) for k in c0},
        "timeline": timeline,
        "pause_samples_ms": pause,
        "probes": probes,
    }


def calibrate(
    stack: Stack, dom, name: str, rate: float, want: int, seconds: float, steps: int = 3
) -> float:
    """Adjust the workload's rate until the median dirty pages per checkpoint
    is near ``want`` (the pages actually dirtied depend on the epoch's real
    length and on repeats); returns the rate."""
    for _ in range(steps):
        dom.set_rate(rate)
        time.sleep(0.3)
        w = window(stack, name, seconds)
        got = w["dirty_pages"].get("median") or 0
        if got and abs(got - want) <= 0.1 * want:
            break
        # at most x2 / 2 per step: a window spoiled by a slow epoch must not
        # send the rate far off
        rate *= min(2.0, max(0.5, want / got)) if got else 2.0
    dom.set_rate(rate)
    return rate


# --- phases ------------------------------------------------------------------------------


#: initial copies measured (one protect session each, each with a new backup
#: domain); the figure is their median. On this VM the first one is often the
#: slowest: its backup's memory is memory the hypervisor took back (free page
#: reporting), and touching it again costs a host-side fault per page.
COPY_REPEATS = 3

MADV_POPULATE_WRITE = 23  # Linux 5.14: fault a range in, writable, in one call


def fresh_tmpfs(directory: str, nbytes: int) -> tuple[mmap.mmap, memoryview]:
    """A fresh (unallocated) shared mapping of a tmpfs file, as a backup
    domain's memory is when its initial copy starts."""
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED)
    finally:
        os.close(fd)
        os.unlink(path)
    return mm, memoryview(mm)


def populate_cost(directory: str, nbytes: int) -> dict:
    """Time to allocate a fresh tmpfs mapping of ``nbytes`` (MADV_POPULATE_WRITE):
    what a receiver pays, at least, to write a guest's memory for the first time."""
    mm, mv = fresh_tmpfs(directory, nbytes)
    try:
        t0 = time.perf_counter()
        mm.madvise(MADV_POPULATE_WRITE)
        secs = time.perf_counter() - t0
    finally:
        mv.release()
        mm.close()
    return {"s": round(secs, 3), "MBps": round(nbytes / secs / 1e6, 1)}


def tls_contexts(certs: dict[str, pki.CertFiles]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) SSLContexts built as the daemons build theirs
    (daemonkit.tls.build_context: TLS 1.3, mutual authentication) from a
    Stack's certificates: the receiver's side and remusd's."""
    ca = certs["ca"].cert
    b, p = certs["backup"], certs["primary"]
    server = build_context(TlsSettings(b.cert, b.key, ca, (PRIMARY_CERT_NAME,)), server=True)
    client = build_context(TlsSettings(p.cert, p.key, ca), server=False)
    return server, client


def socket_copy(
    mem_path: str,
    nbytes: int,
    into_tmpfs: str | None = None,
    tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
) -> dict:
    """A plain loopback TCP copy of the guest's memory file: sendall of 16 MiB
    memoryview slices of its mmap, recv_into a reused 16 MiB buffer, or (with
    ``into_tmpfs``) straight into a fresh tmpfs mapping of the same size.
    With ``tls`` (server and client contexts, ``tls_contexts``) the same copy
    over Python ``ssl`` (TLS 1.3, mutual authentication, the handshake before
    the clock starts): the same sendall of 16 MiB slices and recv_into (which
    returns one TLS record, <= 16 KiB, a call). The receiver stops at the
    last byte."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(60)
    port = srv.getsockname()[1]
    got = [0]
    failed: list[BaseException] = []

    def receive():
        try:
            raw, _ = srv.accept()
            raw.settimeout(120)
            conn = raw if tls is None else tls[0].wrap_socket(raw, server_side=True)
            if into_tmpfs:
                dst, whole = fresh_tmpfs(into_tmpfs, nbytes)
            else:
                dst, whole = None, memoryview(bytearray(SOCKET_SLICE))
            with conn:
                while got[0] < nbytes:
                    at = got[0] if dst is not None else 0
                    k = conn.recv_into(whole[at : at + SOCKET_SLICE])
                    if not k:
                        break
                    got[0] += k
            whole.release()
            if dst is not None:
                dst.close()
        except BaseException as e:  # reported by the sending side
            failed.append(e)

    th = threading.Thread(target=receive, daemon=True)
    th.start()
    fd = os.open(mem_path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    mv = memoryview(mm)
    cipher = None
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            c: socket.socket = raw
            if tls is not None:
                c = tls[1].wrap_socket(raw, server_hostname="127.0.0.1")
                cipher = c.cipher()
            t0, cpu0 = time.perf_counter(), time.process_time()
            for off in range(0, nbytes, SOCKET_SLICE):
                c.sendall(mv[off : off + SOCKET_SLICE])
            c.shutdown(socket.SHUT_WR)
            th.join(120)
            secs = time.perf_counter() - t0
            cpu = time.process_time() - cpu0  # both threads: sender and receiver
    finally:
        mv.release()
        mm.close()
        srv.close()
    if failed:
        raise RuntimeError(f"socket copy: the receiving side failed: {failed[0]!r}")
    if got[0] != nbytes:
        raise RuntimeError(f"socket copy moved {got[0]} of {nbytes} bytes")
    out: dict = {
        "s": round(secs, 3),
        "MBps": round(nbytes / secs / 1e6, 1),
        "cpu_s_per_GiB": round(cpu / (nbytes / 2**30), 3),
    }
    if cipher is not None:
        out["tls"] = f"{cipher[1]} {cipher[0]}"
    return out


def order(i: int, transports: list[str]) -> list[str]:
    """The transports in the order of step ``i``: as given, then reversed, in
    turn (A B, B A, A B, ...), so that a drift of the machine hits both alike."""
    return list(transports) if i % 2 == 0 else list(reversed(transports))


def _median_of(items: list[dict], key: str) -> dict:
    """The item with the median ``key`` (the middle one of an odd count)."""
    return sorted(items, key=lambda c: c[key])[len(items) // 2]


def protect_with_cpu(stack: Stack, name: str) -> dict:
    """``stack.protect`` (codec xen, 200 ms) and the CPU time each process
    spent from the request to protected (remusd, the receiver, each sim host
    with its domain workers: the backup host builds the backup's memory), in
    seconds per GiB of guest copied: beside the wall time, where it went."""
    procs = {"remusd": stack.pid("remusd"), "receiver": stack.pid("receiver")}
    hosts = {"primary_host": stack.primary.pid, "backup_host": stack.backup.pid}

    def now() -> dict[str, float]:
        return {k: cpu_seconds(p) for k, p in procs.items()} | {
            k: tree_cpu(p) for k, p in hosts.items()
        }

    c0 = now()
    ic = stack.protect(name, "xen", 200)
    c1 = now()
    gib = ic["pages"] * PAGE_SIZE / 2**30
    per = {k: round((c1[k] - c0[k]) / gib, 3) for k in c0}
    ic["cpu_s_per_GiB"] = per | {"total": round(sum(per.values()), 3)}
    return ic


def phase_copy(stacks: dict[str, Stack], memory: int) -> dict:
    """Initial copies over each transport, interleaved (COPY_REPEATS protect
    sessions each, in the order ``order`` gives), between two rounds of the
    references: the plain socket copy and, with a TLS stack, the TLS socket
    copy (its certificates and contexts). Returns {transport: the
    single-transport dict, the references in each}."""
    name = "copy"
    ts = list(stacks)
    doms = {t: create(s, name, memory, "idle", 0.0) for t, s in stacks.items()}
    first = stacks[ts[0]]
    mem_path = L.path(first.primary.dir, doms[ts[0]].domid, "mem")
    ctx = tls_contexts(stacks["tls"].certs) if "tls" in stacks else None

    def references() -> dict:
        r = {"plain": socket_copy(mem_path, memory)}
        if ctx is not None:
            r["tls"] = socket_copy(mem_path, memory, tls=ctx)
        return r

    references()  # warm-up: fault the mapping in, grow socket buffers, TLS code paths
    before = references()
    copies: dict[str, list[dict]] = {t: [] for t in ts}  # each protect: a new backup domain
    for i in range(COPY_REPEATS):
        for t in order(i, ts):
            copies[t].append(protect_with_cpu(stacks[t], name))
            stacks[t].unprotect(name)
    after = references()
    into = socket_copy(mem_path, memory, into_tmpfs=first.backup.dir)
    for d in doms.values():
        d.destroy()
    alloc = populate_cost(first.backup.dir, memory)
    ref = max(before["plain"]["MBps"], after["plain"]["MBps"])  # the better: the machine's limit
    shared: dict = {
        "memory_MiB": memory // MiB,
        "socket_copy_before": before["plain"],
        "socket_copy_after": after["plain"],
        "socket_copy_into_fresh_tmpfs": into,
        "tmpfs_allocation": alloc,
    }
    tls_ref = None
    if ctx is not None:
        tls_ref = max(before["tls"]["MBps"], after["tls"]["MBps"])
        shared |= {
            "tls_socket_copy_before": before["tls"],
            "tls_socket_copy_after": after["tls"],
            "tls_socket_vs_socket": round(tls_ref / ref, 3),
        }
    out: dict = {}
    for t in ts:
        ic = _median_of(copies[t], "MBps")
        one = shared | {
            "initial_copy": ic,
            "initial_copies": copies[t],
            "vs_socket": round(ic["MBps"] / ref, 3),
            "vs_socket_into_fresh_tmpfs": round(ic["MBps"] / into["MBps"], 3),
        }
        if t == "tls" and tls_ref is not None:
            link = stacks[t].session_tls()
            one |= {
                "link_tls": " ".join(link) if link else None,
                "vs_tls_socket": round(ic["MBps"] / tls_ref, 3),
                "target": f">= {TLS_COPY_TARGET} of the TLS socket copy",
                "met": ic["MBps"] / tls_ref >= TLS_COPY_TARGET,
            }
        else:
            one |= {"target": ">= 0.5 of the plain socket copy", "met": ic["MBps"] / ref >= 0.5}
        out[t] = one
    return out


def pause_components(stack: Stack, memory: int, levels: dict, reps: int) -> dict:
    """The steps of remusd's capture (remusd/epoch.py), timed one by one in
    this process on a second ``random`` domain of the same size that no remusd
    watches, at the rates the levels used: where the pause goes. ``prescan``
    runs before the pause (the guest running) and is not part of ``paused``."""
    from remusd.epoch import merge_sorted, strictly_sorted

    dom = create(stack, "probe", memory, "random", 100.0)
    pages = memory // PAGE_SIZE
    buf = np.empty((min(pages, 65536), PAGE_SIZE), dtype=np.uint8)
    for s in range(0, pages, 4096):  # map every page here once, as remusd has
        part = np.arange(s, min(s + 4096, pages), dtype=np.uint64)
        dom.gather(part, buf[: len(part)])
    dom.enable_logdirty()
    out = {}
    try:
        for want, lv in levels.items():
            dom.set_rate(lv["rate_pages_per_s"])
            dom.read_and_clear_dirty()
            steps: dict[str, list[float]] = {k: [] for k in PAUSE_STEPS}
            n = []
            for _ in range(reps):
                time.sleep(lv["interval_ms"] / 1000)
                t = [time.perf_counter()]
                early = strictly_sorted(dom.read_and_clear_dirty())
                t.append(time.perf_counter())
                dom.checkpoint_stop()
                t.append(time.perf_counter())
                late = strictly_sorted(dom.read_and_clear_dirty())
                t.append(time.perf_counter())
                pfns = merge_sorted(early, late)[: len(buf)]
                t.append(time.perf_counter())
                dom.gather(pfns, buf[: len(pfns)])
                t.append(time.perf_counter())
                dom.get_context()
                dom.output_barrier()
                t.append(time.perf_counter())
                dom.checkpoint_go()
                t.append(time.perf_counter())
                for i, k in enumerate(PAUSE_STEPS[:-1]):
                    steps[k].append((t[i + 1] - t[i]) * 1e3)
                steps["paused"].append((t[-1] - t[1]) * 1e3)
                n.append(len(pfns))
            out[want] = {"dirty_pages": summary(n)} | {
                k: round(float(np.median(v)), 3) for k, v in steps.items()
            }
    finally:
        dom.destroy()
    return out


#: capture()'s steps as pause_components times them (the last is the sum of
#: the paused ones: checkpoint_stop to checkpoint_go)
PAUSE_STEPS = (
    "prescan",
    "stop",
    "read_and_clear_dirty",
    "merge",
    "gather",
    "context_barrier",
    "go",
    "paused",
)


def pause_interval(want: int) -> int:
    """The epoch length for a level: 200 ms, longer for big levels so that the
    pair is not asked for more than ~50k missed pages/s (on this 2-core box a
    bigger stream outruns the pipeline and every epoch grows: see
    docs/performance.md)."""
    return max(PAUSE_INTERVAL_MS, want // 10)


def phase_pause(stacks: dict[str, Stack], memory: int, seconds: float) -> dict:
    """Per level, each transport in turn (``order``): a session of its own at
    the level's interval, calibrated to the level's dirty pages (the second
    transport starts from the first one's rate), then the watched window with
    the gather probe. The domain of the transport not measured is paused.
    Returns {transport: {"levels": ...}} and "components_ms" (the capture's
    steps, no link involved: timed once, on the first transport's host)."""
    name = "pause"
    ts = list(stacks)
    pages = memory // PAGE_SIZE
    rng = np.random.default_rng(11)
    doms = {}
    # map every page into this process once, as remusd's mapping is after the
    # initial copy: the reference gather then pays no first-touch faults
    scratch = np.empty((4096, PAGE_SIZE), dtype=np.uint8)
    for t, s in stacks.items():
        doms[t] = dom = create(s, name, memory, "random", 100.0)
        for p0 in range(0, pages, len(scratch)):
            part = np.arange(p0, min(p0 + len(scratch), pages), dtype=np.uint64)
            dom.gather(part, scratch[: len(part)])
        dom.pause()
    out: dict = {t: {"workload": "random", "codec": "seed", "levels": {}} for t in ts}
    for li, want in enumerate(PAUSE_PAGES):
        interval = pause_interval(want)
        rate = want * 1000 / interval
        buf = np.empty((want, PAGE_SIZE), dtype=np.uint8)
        for t in order(li, ts):
            stack, dom = stacks[t], doms[t]
            dom.unpause()
            ic = stack.protect(name, "seed", interval)
            out[t].setdefault("initial_copy", ic)
            rate = calibrate(stack, dom, name, rate, want, 1.5)

            def probe(want=want, buf=buf, dom=dom):
                pfns = np.sort(rng.choice(pages - 3, want, replace=False)).astype(np.uint64)
                t0 = time.perf_counter()
                dom.gather(pfns, buf)
                return (time.perf_counter() - t0) * 1e3

            w = window(stack, name, seconds, every=0.1, probe=probe)
            stack.unprotect(name)
            dom.pause()
            gather = summary(w.pop("probes"))
            med = w["pause_ms"].get("median", float("inf"))
            bound = 2 * gather["median"] + 1.0
            out[t]["levels"][str(want)] = {
                "interval_ms": interval,
                "rate_pages_per_s": round(rate),
                **w,
                "numpy_gather_ms": gather,
                "bound_ms": round(bound, 3),
                "met": med <= bound,
            }
    for d in doms.values():
        d.destroy()
    out["components_ms"] = pause_components(stacks[ts[0]], memory, out[ts[0]]["levels"], 15)
    return out


def phase_workloads(
    stacks: dict[str, Stack],
    memory: int,
    seconds: float,
    rate_seconds: float,
    codecs: tuple[str, ...],
    warmup: float,
) -> tuple[dict, dict]:
    """The rate phase (hotset per codec, then 10 ms) and the ratio phase
    (every workload per codec), sharing one domain per workload and transport;
    per codec the transports in turn (``order``), the domain of the one not
    measured paused. The hotset's rate is calibrated once, on the first
    transport, and used by both. Returns ({transport: rate}, {transport: ratio})."""
    ts = list(stacks)
    ratio: dict = {t: {} for t in ts}
    rate: dict = {
        t: {"interval_ms": RATE_INTERVAL_MS, "pages_per_epoch": RATE_PAGES, "codecs": {}}
        for t in ts
    }
    step = 0
    for workload in WORKLOADS:
        name = f"w-{workload}"
        kw = {"wss": HOTSET_WSS} if workload == "hotset" else {}
        doms = {}
        for t, s in stacks.items():
            doms[t] = create(s, name, memory, workload, RATIO_RATE.get(workload, 100000.0), **kw)
            doms[t].pause()
            ratio[t][workload] = {}
        hot_rate = 0.0  # the hotset's calibrated rate (pages/s); only hotset uses it
        if workload == "hotset":  # in a session of its own: every codec then starts cold
            s, dom = stacks[ts[0]], doms[ts[0]]
            dom.unpause()
            s.protect(name, "none", RATE_INTERVAL_MS)
            hot_rate = calibrate(s, dom, name, 120000.0, RATE_PAGES, 1.5)
            s.unprotect(name)
            dom.pause()
            for d in doms.values():
                d.set_rate(hot_rate)
        for codec in codecs:
            for t in order(step, ts):
                stack, dom = stacks[t], doms[t]
                dom.unpause()
                ic = stack.protect(name, codec, RATE_INTERVAL_MS)
                time.sleep(warmup)  # the same for every codec: the cache fills
                if workload == "hotset":
                    w = window(stack, name, rate_seconds)
                    w["rate_pages_per_s"] = round(hot_rate)
                    w["initial_copy"] = ic
                    rate[t]["codecs"][codec] = w
                else:
                    w = window(stack, name, seconds)
                stack.unprotect(name)
                dom.pause()
                ratio[t][workload][codec] = {
                    k: w[k]
                    for k in (
                        "ratio",
                        "cache_hit_rate",
                        "checkpoints",
                        "dirty_pages",
                        "bytes_per_checkpoint",
                        "wire_MBps",
                        "zero_base_per_checkpoint",
                    )
                }
            step += 1
        if workload == "hotset":  # the codec with the best ratio, over the transports
            best = max(
                (c for c in codecs if c != "none"),
                key=lambda c: sum(rate[t]["codecs"][c]["ratio"] or 0 for t in ts),
                default=codecs[0],
            )
            for t in order(step, ts):
                stack, dom = stacks[t], doms[t]
                dom.unpause()
                stack.protect(name, best, FAST_INTERVAL_MS)
                dom.set_rate(hot_rate * RATE_INTERVAL_MS / FAST_INTERVAL_MS)
                time.sleep(warmup)
                w = window(stack, name, rate_seconds)
                w["codec"] = best
                rate[t]["fast"] = {"interval_ms": FAST_INTERVAL_MS, **w}
                stack.unprotect(name)
                dom.pause()
            step += 1
        for d in doms.values():
            d.destroy()
    return rate, ratio


def phase_cache(
    base: Path,
    memory: int,
    seconds: float,
    sizes: tuple[int, ...] = CACHE_SIZES,
    codecs: tuple[str, ...] = ("seed", "xen"),
    transports: tuple[str, ...] = ("plain",),
) -> dict:
    """hotset with a working set of CACHE_WSS pages (twice the default cache)
    at 25 ms, seed and xen, for each cache size (remusd --cache-pages; the
    receiver's mirror follows the HELLO): ratio, hit rate, CPU. Per size one
    stack per transport, up together; per codec the transports in turn
    (``order``), the domain not measured paused. Returns {transport: ...}."""
    ts = list(transports)
    out: dict = {
        t: {
            "workload": "hotset",
            "wss_pages": CACHE_WSS,
            "rate_pages_per_s": CACHE_RATE,
            "interval_ms": RATE_INTERVAL_MS,
            "sizes": {},
        }
        for t in ts
    }
    step = 0
    for pages in sizes:
        stacks: dict[str, Stack] = {}
        try:
            for t in ts:
                stacks[t] = Stack(
                    base / f"cache-{pages}-{t}",
                    failover_ms=MEASURE_FAILOVER_MS,
                    remusd_args=("--cache-pages", str(pages)),
                    tls=t == "tls",
                ).start()
            doms = {}
            for t, s in stacks.items():
                doms[t] = create(s, "c", memory, "hotset", CACHE_RATE, wss=CACHE_WSS)
                doms[t].pause()
                out[t]["sizes"][str(pages)] = {}
            for codec in codecs:
                for t in order(step, ts):
                    stack, dom = stacks[t], doms[t]
                    dom.unpause()
                    stack.protect("c", codec, RATE_INTERVAL_MS)
                    time.sleep(1.0)  # warm the cache
                    w = window(stack, "c", seconds)
                    stack.unprotect("c")
                    dom.pause()
                    out[t]["sizes"][str(pages)][codec] = {
                        k: w[k]
                        for k in (
                            "ratio",
                            "cache_hit_rate",
                            "checkpoints_per_s",
                            "dirty_pages",
                            "bytes_per_checkpoint",
                            "cpu_percent",
                        )
                    }
                step += 1
            for d in doms.values():
                d.destroy()
        finally:
            for s in stacks.values():
                s.close()
    return out


def failover_trial(
    base: Path,
    memory: int,
    interval_ms: int,
    failover_ms: int | None,
    soak: float,
    *,
    tls: bool = False,
) -> dict:
    """One stack: a loaded domain protected for ``soak`` seconds (false
    failover or retry = unsafe), then kill -9 of the primary host and remusd."""
    stack = Stack(base, failover_ms=failover_ms, tls=tls).start()
    try:
        name = "fo"
        create(stack, name, memory, "hotset", 40000.0, wss=HOTSET_WSS)
        stack.protect(name, "seed", interval_ms)
        t_end = time.monotonic() + soak
        safe = True
        why = None
        while time.monotonic() < t_end:
            d = stack.status(name)
            rx = [
                s
                for s in control_request(stack.bsock, "status")["sessions"]
                if s.get("domain") == name
            ]
            if (
                d["state"] != "protected"
                or d["retries"]
                or d["sessions"] != 1
                or any(s.get("state") == "failed-over" for s in rx)
            ):
                safe, why = (
                    False,
                    f"remusd {d['state']} ({d['reason']}), receiver {[s.get('state') for s in rx]}",
                )
                break
            time.sleep(0.1)
        res = {
            "failover_timeout_ms": failover_ms,
            "interval_ms": interval_ms,
            "soak_s": soak,
            "safe": safe,
            "unsafe_because": why,
        }
        if not safe:
            return res
        rx = [
            s for s in control_request(stack.bsock, "status")["sessions"] if s.get("domain") == name
        ][-1]
        res["effective_timeout_ms"] = rx["failover_timeout_ms"]
        backup = stack.backup.hv
        t_kill = time.monotonic()
        os.kill(stack.primary.pid, signal.SIGKILL)
        os.kill(stack.pid("remusd"), signal.SIGKILL)

        def running():
            return any(i.name == name and i.state == "running" for i in backup.list())

        wait_for("the backup to run", running, 30, every=0.002)
        res["kill_to_running_s"] = round(time.monotonic() - t_kill, 3)
        rx = [
            s for s in control_request(stack.bsock, "status")["sessions"] if s.get("domain") == name
        ][-1]
        res["receiver_detection_ms"] = rx.get("detection_ms")
        stack.primary.kill()
        with contextlib.suppress(Exception):
            stack.procs["remusd"].wait(5)
        return res
    finally:
        stack.close()


def phase_failover(
    base: Path,
    memory: int,
    reps: int,
    soak: float,
    candidates: tuple[int, ...] = FAILOVER_CANDIDATES_MS,
    transports: tuple[str, ...] = ("plain",),
) -> dict:
    """The default-timeout trials and the search for the shortest safe
    timeout, per transport; trial by trial the transports in turn (``order``;
    each trial is a stack of its own). A transport's search stops at its first
    unsafe timeout. Returns {transport: ...}."""
    ts = list(transports)
    default: dict[str, list[dict]] = {t: [] for t in ts}
    for i in range(reps):
        for t in order(i, ts):
            default[t].append(
                failover_trial(
                    base / f"fo-default-{i}-{t}", memory, 200, None, soak, tls=t == "tls"
                )
            )
    search: dict[str, list[dict]] = {t: [] for t in ts}
    shortest: dict[str, dict | None] = {t: None for t in ts}
    searching = set(ts)
    for j, ms in enumerate(candidates):
        for t in order(j, ts):
            if t not in searching:
                continue
            r = failover_trial(
                base / f"fo-{ms}-{t}",
                min(memory, 256 * MiB),
                RATE_INTERVAL_MS,
                ms,
                soak,
                tls=t == "tls",
            )
            search[t].append(r)
            if r["safe"]:
                shortest[t] = r
            else:
                searching.discard(t)
    out: dict = {}
    for t in ts:
        times = [
            r["kill_to_running_s"] for r in default[t] if r.get("kill_to_running_s") is not None
        ]
        med = float(np.median(times)) if times else None
        out[t] = {
            "default": default[t],
            "default_median_s": med,
            "search": search[t],
            "shortest_safe": shortest[t],
            "target": "<= 1 s at the default",
            "met": med is not None and med <= 1.0,
        }
    return out


# --- output ------------------------------------------------------------------------------


def machine() -> dict:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


LABEL = {"tls": "over mutual TLS", "plain": "over plaintext (--insecure)"}


def _get(d: Any, *path: Any) -> Any:
    """d[path[0]][path[1]]...; None where a key is missing."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def figures(r: dict, t: str) -> dict[str, float | None]:
    """The headline figures of one transport, by name (the TLS/plain table's rows)."""
    f: dict[str, float | None] = {}
    c = _get(r, "copy", t)
    if c:
        f["initial copy, MB/s"] = c["initial_copy"]["MBps"]
        f["initial copy / plain socket copy"] = c["vs_socket"]
        f["protect -> protected, s (median session)"] = float(
            np.median([x["protect_to_protected_s"] for x in c["initial_copies"]])
        )
        for k in ("total", "remusd", "receiver", "backup_host"):
            per = [x["cpu_s_per_GiB"][k] for x in c["initial_copies"] if "cpu_s_per_GiB" in x]
            if per:
                f[f"initial copy CPU s/GiB: {k} (median session)"] = float(np.median(per))
    for want, lv in (_get(r, "pause", t, "levels") or {}).items():
        f[f"pause median, ms: {want} pages/epoch"] = lv["pause_ms"].get("median")
        f[f"pause p99, ms: {want} pages/epoch"] = lv["pause_ms"].get("p99")
        f[f"remusd CPU %: {want} pages/epoch"] = lv["cpu_percent"]["remusd"]
    rt = _get(r, "rate", t)
    if rt:
        rows = [(f"{c} @{rt['interval_ms']} ms", w) for c, w in rt["codecs"].items()]
        if "fast" in rt:
            rows.append((f"{rt['fast']['codec']} @{rt['fast']['interval_ms']} ms", rt["fast"]))
        for what, w in rows:
            f[f"ckpt/s: hotset {what}"] = w["checkpoints_per_s"]
            f[f"pause median, ms: hotset {what}"] = w["pause_ms"].get("median")
            f[f"pause p99, ms: hotset {what}"] = w["pause_ms"].get("p99")
            f[f"remusd CPU %: hotset {what}"] = w["cpu_percent"]["remusd"]
            f[f"receiver CPU %: hotset {what}"] = w["cpu_percent"]["receiver"]
    for wl, per in (_get(r, "ratio", t) or {}).items():
        for codec, x in per.items():
            f[f"wire ratio: {wl} {codec}"] = x["ratio"]
    for size, per in (_get(r, "cache", t, "sizes") or {}).items():
        for codec, x in per.items():
            hit = x["cache_hit_rate"]
            f[f"cache hit %: {size} pages, {codec}"] = None if hit is None else 100 * hit
            f[f"remusd CPU %: cache {size} pages, {codec}"] = x["cpu_percent"]["remusd"]
    fo = _get(r, "failover", t)
    if fo:
        f["failover at the default timeout, s"] = fo["default_median_s"]
        ss = fo["shortest_safe"]
        f["shortest safe failover timeout, ms"] = ss["failover_timeout_ms"] if ss else None
    return f


def tls_vs_plain(r: dict) -> dict:
    """{figure: {"tls", "plain", "ratio" (tls / plain)}} for every figure both have."""
    if not all(t in r.get("transports", ()) for t in TRANSPORTS):
        return {}
    a, b = figures(r, "tls"), figures(r, "plain")
    out = {}
    for k, x in a.items():
        y = b.get(k)
        ratio = round(x / y, 3) if x is not None and y else None
        out[k] = {"tls": None if x is None else round(x, 3), "plain": y, "ratio": ratio}
    return out


def tls_targets(r: dict) -> dict:
    """The issue's TLS targets: {name: {"value", "bound", "higher_is_better", "met"}}:
    the initial copy against the TLS socket copy, and at 25 ms with the default
    codec checkpoints/s and the median pause against plaintext's."""
    out: dict = {}
    c = _get(r, "copy", "tls")
    if c and "vs_tls_socket" in c:
        out["initial copy over TLS / TLS socket copy"] = {
            "value": c["vs_tls_socket"],
            "bound": TLS_COPY_TARGET,
            "higher_is_better": True,
        }
    cmp = r.get("tls_vs_plain") or tls_vs_plain(r)
    # the default path: remusd's default codec (the other codecs' ratios are in
    # tls_vs_plain; codec none at ~1,000 pages an epoch is near the rate where
    # longer epochs make bigger checkpoints make longer epochs, and a small
    # difference in cost there shows as a large one in checkpoints/s)
    for codec in [c for c in _get(r, "rate", "tls", "codecs") or {} if c == DEFAULT_CODEC]:
        what = f"hotset {codec} @{RATE_INTERVAL_MS} ms"
        for fig, bound, hib in (
            ("ckpt/s", TLS_RATE_MIN, True),
            ("pause median, ms", TLS_PAUSE_MAX, False),
        ):
            x = cmp.get(f"{fig}: {what}")
            if x and x["ratio"] is not None:
                out[f"{fig.split(',')[0]} TLS / plain: {what}"] = {
                    "value": x["ratio"],
                    "bound": bound,
                    "higher_is_better": hib,
                }
    return judge(out)


def judge(targets: dict) -> dict:
    """Set each target's "met" from its value (after a median too)."""
    for x in targets.values():
        v, b = x["value"], x["bound"]
        x["met"] = v is not None and (v >= b if x["higher_is_better"] else v <= b)
    return targets


def _transports(r: dict, phase: str) -> list[tuple[str, dict]]:
    return [(t, r[phase][t]) for t in r.get("transports", TRANSPORTS) if t in r.get(phase, {})]


def print_copy(c: dict, label: str) -> None:
    ic = c["initial_copy"]
    print(
        f"\ninitial copy, {label}: {ic['MBps']:>8.1f} MB/s  ({ic['pages']} pages, {ic['rounds']} "
        f"round(s), {ic['s']:.2f} s; median of {len(c.get('initial_copies', [ic]))} sessions)"
    )
    for i, one in enumerate(c.get("initial_copies", [])):
        cpu = one.get("cpu_s_per_GiB")
        where = (
            f"; CPU s/GiB {cpu['total']:.2f} (remusd {cpu['remusd']:.2f}, receiver "
            f"{cpu['receiver']:.2f}, backup host {cpu['backup_host']:.2f}, primary host "
            f"{cpu['primary_host']:.2f})"
            if cpu
            else ""
        )
        print(
            f"  session {i + 1}: {one['MBps']:>8.1f} MB/s, copy {one['s']:.2f} s, protect request "
            f"-> protected {one['protect_to_protected_s']:.2f} s{where}"
        )
    print(f"  / plain socket copy {c['vs_socket']:.2f} (target >= 0.5 without TLS)")
    if "vs_tls_socket" in c:
        print(
            f"  / TLS socket copy {c['vs_tls_socket']:.2f} (target >= {TLS_COPY_TARGET}: "
            f"{'met' if c['met'] else 'MISSED'}); the link negotiated {c.get('link_tls')}"
        )
    else:
        print(f"  target: {'met' if c['met'] else 'MISSED'}")


def _cpu(x: dict) -> str:
    return f", CPU {x['cpu_s_per_GiB']:.2f} s/GiB" if "cpu_s_per_GiB" in x else ""


def print_copy_references(c: dict) -> None:
    b, a = c["socket_copy_before"], c["socket_copy_after"]
    print(
        f"plain socket copy     {b['MBps']:>8.1f} / {a['MBps']:.1f} MB/s (before / after{_cpu(b)})"
    )
    if "tls_socket_copy_before" in c:
        b, a = c["tls_socket_copy_before"], c["tls_socket_copy_after"]
        print(
            f"TLS socket copy       {b['MBps']:>8.1f} / {a['MBps']:.1f} MB/s (before / after; "
            f"{b.get('tls')}{_cpu(b)}); / plain socket copy {c['tls_socket_vs_socket']:.2f}"
        )
    print(
        f"socket copy into fresh tmpfs memory {c['socket_copy_into_fresh_tmpfs']['MBps']:>6.1f} MB/s"
        f"; allocating fresh tmpfs alone {c['tmpfs_allocation']['MBps']:.1f} MB/s"
    )


def print_pause(pz: dict, label: str) -> None:
    print(
        f"\npause per checkpoint, {label} (random workload, codec seed; target median <= "
        "2 x gather + 1 ms)"
    )
    print(
        f"  {'pages/epoch':>11} {'interval':>8} {'dirty med':>9} {'median':>8} {'p99':>8} "
        f"{'max':>8} {'gather':>8} {'bound':>8}  target"
    )
    for want, lv in pz["levels"].items():
        p = lv["pause_ms"]
        if not p.get("n"):
            print(f"  {want:>11} no checkpoint in the window")
            continue
        print(
            f"  {want:>11} {lv['interval_ms']:>6}ms {lv['dirty_pages'].get('median', 0):>9.0f} "
            f"{p['median']:>6.2f}ms {p['p99']:>6.2f}ms {p['max']:>6.2f}ms "
            f"{lv['numpy_gather_ms']['median']:>6.2f}ms {lv['bound_ms']:>6.2f}ms  "
            f"{'met' if lv['met'] else 'MISSED'}"
        )


def print_components(comp: dict) -> None:
    if not comp:
        return
    keys = [k for k in PAUSE_STEPS if k in next(iter(comp.values()))]
    print(
        "  where the pause goes (capture's steps timed one by one on an unwatched "
        "domain, no link involved, median ms; prescan runs before the pause):"
    )
    print("  " + f"{'pages':>7}" + "".join(f" {k[:12]:>12}" for k in keys))
    for c in comp.values():
        print(
            "  "
            + f"{c['dirty_pages'].get('median', 0):>7.0f}"
            + "".join(f" {c[k]:>12.3f}" for k in keys)
        )


def print_rate(rt: dict, label: str) -> None:
    print(
        f"\nsustained rate, {label} (hotset, ~{rt['pages_per_epoch']} dirty pages/epoch, "
        f"interval {rt['interval_ms']} ms; target 40/s)"
    )
    print(
        f"  {'codec':<6} {'ckpt/s':>7} {'dirty':>6} {'pause med':>9} {'p99':>7} {'KB/ckpt':>8} "
        f"{'ratio':>6} {'hit':>6} {'remusd':>7} {'recv':>6} {'prim.host':>9} {'bkp.host':>8}"
    )
    rows = list(rt["codecs"].items())
    if "fast" in rt:
        rows.append((f"{rt['fast']['codec']}@{rt['fast']['interval_ms']}", rt["fast"]))
    for codec, w in rows:
        cpu = w["cpu_percent"]
        hit = "-" if w["cache_hit_rate"] is None else f"{100 * w['cache_hit_rate']:.1f}%"
        print(
            f"  {codec:<6} {w['checkpoints_per_s']:>7.1f} {w['dirty_pages'].get('median', 0):>6.0f} "
            f"{w['pause_ms'].get('median', 0):>7.2f}ms {w['pause_ms'].get('p99', 0):>5.2f}ms "
            f"{w['bytes_per_checkpoint'].get('median', 0) / 1e3:>8.1f} {w['ratio'] or 0:>6.1f} "
            f"{hit:>6} {cpu['remusd']:>6.0f}% {cpu['receiver']:>5.0f}% "
            f"{cpu['primary_host']:>8.0f}% {cpu['backup_host']:>7.0f}%"
        )


def print_ratio(ra: dict, label: str) -> None:
    print(
        f"\ncompression on the wire, {label} (page bytes / bytes sent), cache hit rate, misses "
        f"sent against a zero page per checkpoint; interval {RATE_INTERVAL_MS} ms"
    )
    codecs = list(next(iter(ra.values())).keys())
    print("  " + f"{'workload':<8}" + "".join(f" {c:>23}" for c in codecs))
    for wl, per in ra.items():
        cells = []
        for c in codecs:
            x = per[c]
            hit = "" if x["cache_hit_rate"] is None else f" {100 * x['cache_hit_rate']:.0f}%"
            zb = x.get("zero_base_per_checkpoint")
            zb = "" if zb is None or c == "none" else f" z{zb:.2f}"
            cells.append(f" {(x['ratio'] or 0):>9.1f}:1{hit:>5}{zb:>7}")
        print(f"  {wl:<8}" + "".join(cells))


def print_cache(c: dict, label: str) -> None:
    print(
        f"\npage cache size, {label} (hotset, working set {c['wss_pages']} pages, "
        f"{c['rate_pages_per_s']:.0f} pages/s, interval {c['interval_ms']} ms)"
    )
    print(
        f"  {'cache pages':>11} {'MiB/side':>8} {'codec':>6} {'dirty':>6} {'hit':>6} {'ratio':>7} "
        f"{'KB/ckpt':>8} {'remusd':>7} {'recv':>6}"
    )
    for size, per in c["sizes"].items():
        for codec, x in per.items():
            hit = "-" if x["cache_hit_rate"] is None else f"{100 * x['cache_hit_rate']:.1f}%"
            print(
                f"  {size:>11} {int(size) * PAGE_SIZE / MiB:>8.0f} {codec:>6} "
                f"{x['dirty_pages'].get('median', 0):>6.0f} {hit:>6} {x['ratio'] or 0:>6.1f} "
                f"{x['bytes_per_checkpoint'].get('median', 0) / 1e3:>8.1f} "
                f"{x['cpu_percent']['remusd']:>6.0f}% {x['cpu_percent']['receiver']:>5.0f}%"
            )


def print_failover(f: dict, label: str) -> None:
    print(f"\nfailover, {label} (kill -9 of primary host + remusd -> backup running)")
    for t in f["default"]:
        print(
            f"  default timeout ({t.get('effective_timeout_ms')} ms, interval 200 ms): "
            f"{t.get('kill_to_running_s')} s (receiver detection {t.get('receiver_detection_ms')} ms)"
        )
    for t in f["search"]:
        state = (
            f"safe; failover {t['kill_to_running_s']} s"
            if t["safe"]
            else f"UNSAFE: {t['unsafe_because']}"
        )
        print(
            f"  --failover-timeout {t['failover_timeout_ms']} ms, interval {t['interval_ms']} ms: "
            f"{state}"
        )
    print(f"  target <= 1 s at the default: {'met' if f['met'] else 'MISSED'}")


def print_table(r: dict) -> None:
    m = r["machine"]
    print(
        f"\nend-to-end benchmark ({r['memory_MiB']} MiB guests; {m['cpu']}, {m['cpus']} CPUs, "
        f"kernel {m['kernel']}, load {m['loadavg_at_start'][0]:.1f}; {r['elapsed_s']:.0f} s; "
        f"link {', '.join(LABEL[t] for t in r.get('transports', ()))})"
    )
    if "copy" in r:
        for t, c in _transports(r, "copy"):
            print_copy(c, LABEL[t])
        print_copy_references(_transports(r, "copy")[0][1])
    if "pause" in r:
        for t, pz in _transports(r, "pause"):
            print_pause(pz, LABEL[t])
        print_components(r["pause"].get("components_ms", {}))
    for phase, show in (
        ("rate", print_rate),
        ("ratio", print_ratio),
        ("cache", print_cache),
        ("failover", print_failover),
    ):
        for t, x in _transports(r, phase):
            show(x, LABEL[t])
    cmp = r.get("tls_vs_plain") or {}
    if cmp:
        print("\nTLS against plaintext, same run (ratio = TLS / plain)")
        width = max(len(k) for k in cmp)
        print(f"  {'figure':<{width}} {'TLS':>10} {'plain':>10} {'ratio':>7}")
        for k, x in cmp.items():
            cells = [
                f"{v:>10.3f}" if isinstance(v, int | float) else f"{'-':>10}"
                for v in (x["tls"], x["plain"])
            ]
            ratio = f"{x['ratio']:>7.3f}" if x["ratio"] is not None else f"{'-':>7}"
            print(f"  {k:<{width}} {cells[0]} {cells[1]} {ratio}")
    targets = r.get("tls_targets") or {}
    if targets:
        print("\nTLS targets (issue 16)")
        for k, x in targets.items():
            rel = ">=" if x["higher_is_better"] else "<="
            print(
                f"  {k}: {x['value']} (target {rel} {x['bound']}): "
                f"{'met' if x['met'] else 'MISSED'}"
            )


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t, rt in _transports(r, "rate"):
        for codec, w in rt["codecs"].items():
            s = np.sort(np.asarray(w["pause_samples_ms"]))
            ls = "-" if t == "tls" else ":"
            if len(s):
                a.plot(
                    s, np.arange(1, len(s) + 1) / len(s), ls, label=f"{codec} {t} (hotset, 25 ms)"
                )
            tl = np.asarray(w["timeline"], dtype=float)
            if len(tl) > 4:  # checkpoints/s over a sliding window of >= 1 s
                j = np.searchsorted(tl[:, 0], tl[:, 0] - 1.0, side="right") - 1
                ok = j >= 0
                jj = j[ok]
                rate = (tl[ok, 1] - tl[jj, 1]) / (tl[ok, 0] - tl[jj, 0])
                b.plot(tl[ok, 0], rate, ls, label=f"{codec} {t}")
    for t, pz in _transports(r, "pause"):
        for want, lv in pz["levels"].items():
            s = np.sort(np.asarray(lv["pause_samples_ms"]))
            if len(s):
                a.plot(
                    s,
                    np.arange(1, len(s) + 1) / len(s),
                    "--",
                    label=f"seed {t}, {want} pages/epoch",
                )
    a.set_xscale("log")
    a.set_xlabel("pause per checkpoint (ms)")
    a.set_ylabel("fraction of checkpoints")
    a.set_title("pause distribution (CDF)")
    a.legend(fontsize=6)
    b.axhline(40, color="grey", lw=0.8, ls=":")
    b.set_xlabel("time (s)")
    b.set_ylabel("checkpoints/s")
    b.set_title("checkpoint rate over time, 1 s sliding window (hotset, 25 ms)")
    b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def median_of_runs(runs: list[Any]) -> Any:
    """Element-wise median of several runs' results: numbers -> median,
    booleans -> true if true in most runs, lists of dicts -> element-wise,
    sample lists and strings -> the first run's."""
    first = runs[0]
    if isinstance(first, bool):
        return sum(bool(r) for r in runs) * 2 > len(runs)
    if isinstance(first, int | float) and not isinstance(first, bool):
        vals = [r for r in runs if isinstance(r, int | float)]
        if len(vals) != len(runs):
            return first
        m = round(float(np.median(vals)), 3)
        return int(m) if all(isinstance(v, int) for v in vals) and m.is_integer() else m
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(r, dict) and k in r for r in runs)]
        return {k: median_of_runs([r[k] for r in runs]) for k in keys}
    if (
        isinstance(first, list)
        and first
        and all(isinstance(x, dict) for x in first)
        and all(isinstance(r, list) and len(r) == len(first) for r in runs)
    ):
        return [median_of_runs([r[i] for r in runs]) for i in range(len(first))]
    return first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__.split("\n\n")[0],
        epilog="Phases, references and targets: see the module's docstring "
        "(python -c 'import bench.e2e; help(bench.e2e)') and docs/performance.md.",
    )
    p.add_argument("--quick", action="store_true", help="256 MiB guests, short windows (~3 min)")
    p.add_argument(
        "--json",
        default=os.path.join(REPO, "bench", "results", "e2e.json"),
        help="where the results go (default bench/results/e2e.json)",
    )
    p.add_argument("--plot", metavar="PNG", help="draw pause CDF and rate over time per codec")
    p.add_argument(
        "--only",
        default="copy,pause,rate,cache,failover",
        help="phases to run, comma-separated (copy, pause, rate, cache, failover; "
        "rate includes ratio); 'overhead' alone runs bench/overhead.py (what the guest "
        "feels, issue 16: its own options, JSON and plots)",
    )
    p.add_argument(
        "--transport",
        default=",".join(TRANSPORTS),
        help="what the link runs over, comma-separated: tls (mutual TLS 1.3, the "
        "daemons' default; a throwaway CA and host certificates made at start), plain "
        "(both daemons --insecure). Default both: every phase measures each, "
        "interleaved in the same run, and the tables and JSON add TLS / plain per figure",
    )
    p.add_argument("--memory-mib", type=int, help="guest size (default 1024, --quick 256)")
    p.add_argument(
        "--remusd-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to remusd in the copy/pause/rate phases (repeatable), e.g. "
        "--remusd-arg=--no-prescan to measure without the pre-pause dirty scan",
    )
    p.add_argument(
        "--median",
        nargs="+",
        metavar="RUN_JSON",
        help="run nothing: print the element-wise median of these runs' JSON "
        "(and write it to --json); the TLS / plain ratios are the median of each "
        "run's ratio, the targets are judged on the median",
    )
    args, rest = p.parse_known_args(argv)
    if args.only == "overhead":
        from bench import overhead

        return overhead.main(
            rest,
            quick=args.quick,
            memory_mib=args.memory_mib,
            remusd_args=args.remusd_arg,
            json_path=None if args.json == p.get_default("json") else args.json,
        )
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.median:
        runs = []
        for path in args.median:
            with open(path) as f:
                runs.append(json.load(f))
        med = median_of_runs(runs)
        med["median_of"] = args.median
        judge(med.get("tls_targets") or {})
        print(f"median of {len(runs)} runs: {', '.join(args.median)}")
        print_table(med)
        with open(args.json, "w") as f:
            json.dump(med, f, indent=1)
        print(f"\nJSON: {args.json}")
        if args.plot:  # samples and timelines are the first run's
            plot(med, args.plot)
            print(f"plot: {args.plot} (samples of {args.median[0]})")
        return 0
    phases = set(args.only.split(","))
    transports = tuple(dict.fromkeys(t.strip() for t in args.transport.split(",") if t.strip()))
    if not transports or not set(transports) <= set(TRANSPORTS):
        p.error(f"--transport: a comma-separated list of {', '.join(TRANSPORTS)}")
    memory = (args.memory_mib or (256 if args.quick else 1024)) * MiB
    win = 1.5 if args.quick else 4.0
    rate_win = 2.5 if args.quick else 10.0
    base = Path(
        tempfile.mkdtemp(prefix="bench-e2e-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    results: dict = {
        "machine": machine(),
        "memory_MiB": memory // MiB,
        "quick": args.quick,
        "transports": list(transports),
    }
    t0 = time.monotonic()
    stacks: dict[str, Stack] = {}
    try:
        if phases & {"copy", "pause", "rate"}:
            for t in transports:
                stacks[t] = Stack(
                    base / f"main-{t}",
                    failover_ms=MEASURE_FAILOVER_MS,
                    remusd_args=args.remusd_arg,
                    tls=t == "tls",
                ).start()
            first = stacks[transports[0]]
            results["remusd_args"] = args.remusd_arg
            results["measure_failover_timeout_ms"] = MEASURE_FAILOVER_MS
            results["dirty_mode"] = first.primary.hv.ping()["dirty_mode"]
            if "copy" in phases:
                results["copy"] = phase_copy(stacks, memory)
            if "pause" in phases:
                results["pause"] = phase_pause(stacks, memory, win * 1.5)
            if "rate" in phases:
                results["rate"], results["ratio"] = phase_workloads(
                    stacks, memory, win, rate_win, CODECS, 1.0 if args.quick else 2.0
                )
            if "tls" in stacks:
                link = stacks["tls"].session_tls()
                results["link_tls"] = " ".join(link) if link else None
            for s in list(stacks.values()):
                s.close()
            stacks = {}
        if "cache" in phases:
            results["cache"] = phase_cache(
                base,
                min(memory, 256 * MiB),
                win,
                CACHE_SIZES[:2] if args.quick else CACHE_SIZES,
                ("xen",) if args.quick else ("seed", "xen"),
                transports=transports,
            )
        if "failover" in phases:
            results["failover"] = phase_failover(
                base,
                memory,
                1 if args.quick else 3,
                2.0 if args.quick else 6.0,
                (200, 100, 50) if args.quick else FAILOVER_CANDIDATES_MS,
                transports=transports,
            )
    except BaseException:
        for t, s in stacks.items():
            for name in ("remusd", "receiver"):
                print(
                    f"--- {name} ({t}) log (last lines) ---\n{s.log(name)[-3000:]}",
                    file=sys.stderr,
                )
        raise
    finally:
        for s in stacks.values():
            s.close()
        shutil.rmtree(base, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["tls_vs_plain"] = tls_vs_plain(results)
    results["tls_targets"] = tls_targets(results)
    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nJSON: {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
