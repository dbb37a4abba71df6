"""A thin link (issue 16): checkpoints over shaped links, with and without wire compression.

    python -m bench.thinlink [--quick] [--json PATH] [--links 1g,100m,100m-10ms]
                             [--modes off,lz4,zstd,auto] [--workloads hotset,ledger,ledger-max]
    python -m bench.thinlink --median RUN1.json RUN2.json RUN3.json [--json PATH]

Root only. The real daemons on two simulated hosts (``bench.e2e.Stack``,
memory on /dev/shm, codec ``xen``), but the replication link is a veth pair
between two network namespaces made for the run, ``thinlink-PID-a`` (remusd,
10.77.0.1) and ``thinlink-PID-b`` (remus-receiver, 10.77.0.2), shaped with
tc. The daemons are started with ``ip netns exec NS``; the sim hosts, the
control sockets and the guests' worker sockets stay in the root namespace:
they are all path-based Unix sockets under /dev/shm (no abstract ones), which
a process in another network namespace reaches by path.

Links (``--links``; any ``RATE[-RTTms]``, RATE ``Nm`` or ``Ng`` bit/s):

  1g           tbf 1 Gbit/s each way
  100m         tbf 100 Mbit/s each way
  100m-10ms    tbf 100 Mbit/s each way, and half the round trip added each way

Rate: ``tc qdisc replace dev VETH root tbf rate R burst B latency 50ms`` on
the egress of both veth ends (both directions shaped), B = max(16 KiB, R x
2 ms). Delay: this kernel has no sch_netem, so netem's ``delay`` is made
in user space the way netem makes it, per packet: tc redirects every IPv4
packet arriving at a veth end (``ingress``, ``u32``, ``mirred egress
redirect``) to a tun device in that namespace, where bench/delayline.py holds
it RTT/2 ms and gives it back to the kernel (docs in that module). So each
direction is shaped first (tbf, at the sender's end) and delayed second (at
the receiving end), as a real link serialises and then propagates.

The shaping is measured in the same run, before and after each link's cases;
before, the run stops (exit 1, message) unless it holds (after, a failed
check is a WARNING on stderr and ``shaping_held_after: false`` in the JSON,
the cases kept): TCP goodput each way (a
plain TCP copy across the link from this process, sockets opened in the
namespaces, 2.5 s, the first 0.5 s dropped) between 0.85 and 1.02 of the
configured rate (TCP/IP and Ethernet headers take ~4.4% at MTU 1500), and the
TCP round trip (1-byte ping-pong, TCP_NODELAY, median of 40) at least the
configured RTT and at most RTT + max(2 ms, 20%). Both are printed beside
the configured figures.

Modes (``--modes``, remusd's ``--wire-compression``): ``off`` (the raw
legacy stream: the stream as it was), ``lz4``, ``zstd`` (level 1) or
``zstd:N``, ``auto`` (remusd compresses while TCP says the network holds the
data back). One remusd (and receiver) per link x mode. Every mode is checked
on the receiver: the session must have negotiated the mode's codec (off: no
codec), and the receiver's peer must be remusd's namespace address.

Workloads (``--workloads``):

  hotset      working set 8,192 pages (Zipf 1.1), the rate calibrated once per
              run (at 25 ms, mode off, unshaped veth) to ~1,000 dirty pages
              per 25 ms epoch, as bench.e2e's rate phase; memory filled with
              random bytes first (a 16 MiB random block repeated), as there
  ledger      1,000 accounts at 1,000 transactions/s (bench.e2e's ratio phase)
  ledger-max  the same guest in the max-rate mode (bench.overhead:
              ``set_rate(inf)``): as many transactions as its core allows,
              each a new 32-byte log entry; a fresh guest for each interval
              (its log must not fill)

The guest's write rate is the workload's, whatever the interval: a longer
interval has more pages per checkpoint (and more repeats among them).

Figures per link x mode x workload:

copy      initial copy of a COPY_MIB guest (hotset and ledger; ledger-max
          starts as the ledger): remusd's "initial copy" log line (seconds,
          stream MB) and protect request -> protected (backup creation
          included); bytes on the wire for it (the receiver's ``bytes`` when
          protected). The guest runs its workload during the copy.
rate      the highest checkpoint rate: 25 ms (the target's) first; kept
          (checkpoints/s by remusd's counter >= 95% of 1000/interval), then
          10 ms (remusd's minimum); not kept, 50, 100, 200 ms in turn
          until one is kept. Each interval is a protect of
          its own (the interval is a session's) of a RATE_MIB guest whose
          workload is stopped during the copy (hotset: rate 0; ledger-max
          starts at 1,000/s and goes to max once protected). The window opens
          after WARM s and SETTLE_CHECKPOINTS acknowledged checkpoints (the
          first after the copy carries everything the guest wrote meanwhile
          against a cold page cache: seconds on a thin link) and lasts
          SECONDS, or 5 periods of the last checkpoint if longer (at most 30
          s). Per interval: checkpoints/s, kept or not, pause, dirty pages,
          stream bytes per checkpoint (remusd's per-checkpoint history; and
          the receiver's stream counter over the window / checkpoints), wire
          bytes per checkpoint (the receiver's byte counter over the window /
          checkpoints, heartbeats included), wire Mbit/s and its share of the
          link, CPU of remusd, the receiver, the hosts and the delay lines,
          the guest's steps/s, and remusd's status ``wire`` (under ``auto``:
          whether it was compressing, its switches, the network-limited share).
The stream's compressibility itself (levels, threads, lz4 against zstd on
captured streams, no link) is bench/wire.py's.

``--quick``: COPY_MIB 128, WARM 1 s, SECONDS 2.5. Without: COPY_MIB 256,
WARM 1.5 s, SECONDS 4 (~20-30 minutes on the shared 2-core box; a 1 GiB copy
over 100 Mbit/s takes 86 s uncompressed, and the hotset's pre-copy rounds add
5 x 32 MiB: with 1 GiB guests the copies alone would take 15 minutes. A
link-bound copy scales with the size: its MB/s is the figure). RATE_MIB is
64 in both (the checkpoint figures do not depend on the guest's size but
through the pause's scan, which is ~0.2-0.7 ms at this size). At most two
guests' memory exists at a time (a guest and its backup); everything is
destroyed between cases, and the namespaces, delay lines and daemons are
torn down on exit, Ctrl-C and errors included.

Prints a table per link; writes JSON (default
bench/results/thinlink.json). ``--median`` prints and writes the element-wise
median of several runs (bench.e2e's rule; an interval only if every run tried
it; "kept" again from the median rate). Not a test: nothing is asserted,
but a link that is not shaped as configured, a daemon that fails or a mode
that was not negotiated stops the run with an error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import load_average, save_json  # noqa: E402
from bench.e2e import (  # noqa: E402
    HOTSET_WSS,
    MEASURE_FAILOVER_MS,
    RATE_INTERVAL_MS,
    RATE_PAGES,
    MiB,
    Stack,
    calibrate,
    cpu_seconds,
    create,
    machine,
    median_of_runs,
    wait_for,
    window,
)
from daemonkit.control import control_request  # noqa: E402

#: namespace names: PREFIX-PID-a (remusd) and PREFIX-PID-b (receiver)
NS_PREFIX = "thinlink"
A_ADDR, B_ADDR, PREFIX_LEN = "10.77.0.1", "10.77.0.2", 24
#: the receiver's port inside its namespace (the namespace is the run's own)
PORT = 7788
#: remusd's ack timeout here: a checkpoint on a thin, loaded link may take long
ACK_TIMEOUT_S = 5
#: tbf: the queue a packet may wait in (ms), and the burst, R x BURST_MS, at least BURST_MIN
TBF_LATENCY_MS, TBF_BURST_MS, TBF_BURST_MIN = 50, 2.0, 16 * 1024
#: the shaping must hold: goodput / configured rate within these bounds
GOODPUT_MIN, GOODPUT_MAX = 0.85, 1.02
#: measured RTT may exceed the configured one by this much (ms, or the share)
RTT_SLACK_MS, RTT_SLACK_SHARE = 2.0, 0.20
#: the goodput probe: seconds sent, and the head dropped (slow start)
PROBE_S, PROBE_HEAD_S = 2.5, 0.5
RTT_PROBES = 40
#: intervals tried, shortest first; the first one kept ends the search (25 ms always runs)
INTERVALS_MS = (10, 25, 50, 100, 200)
TARGET_INTERVAL_MS = 25
#: an interval is kept when checkpoints/s >= this share of 1000 / interval
KEPT = 0.95
#: after a protect: checkpoints acknowledged before the window opens, and the
#: longest wait for them (s); the window lasts at least WINDOW_PERIODS of the
#: last period seen, at most MAX_WINDOW_S
SETTLE_CHECKPOINTS, SETTLE_MAX_S = 4, 60.0
WINDOW_PERIODS, MAX_WINDOW_S = 5, 30.0
#: guest sizes: the rate search's guests, the copy's (--quick, full)
RATE_MIB = 64
COPY_MIB_QUICK, COPY_MIB_FULL = 128, 256
COPY_INTERVAL_MS = 200
LEDGER_RATE = 1000.0  # transactions/s of the ledger workload (bench.e2e's ratio phase)
WORKLOADS = ("hotset", "ledger", "ledger-max")
COPY_WORKLOADS = ("hotset", "ledger")
DEFAULT_LINKS = "1g,100m,100m-10ms"
DEFAULT_MODES = "off,lz4,zstd,auto"
CLONE_NEWNET = 0x40000000


# --- links -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkSpec:
    """A link: rate each way (Mbit/s) and round-trip time added (ms)."""

    name: str
    mbit: float
    rtt_ms: float

    @property
    def bytes_per_s(self) -> float:
        return self.mbit * 1e6 / 8


def parse_link(text: str) -> LinkSpec:
    """``1g``, ``100m``, ``100m-10ms``: RATE (m: Mbit/s, g: Gbit/s)[-RTTms]."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([mg])(?:-(\d+(?:\.\d+)?)ms)?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a link (RATE[-RTTms], e.g. 100m-10ms)")
    mbit = float(m.group(1)) * (1000 if m.group(2) == "g" else 1)
    return LinkSpec(text.strip().lower(), mbit, float(m.group(3) or 0))


def sh(command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``command`` (words split on spaces: no quoting needed here); raise on failure."""
    argv = command.split()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(
            f"{' '.join(argv)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()}"
        )
    return r


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread in network namespace ``name``: sockets
    made in it belong to that namespace for their whole life."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(there, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back home")
    finally:
        os.close(home)
        os.close(there)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Namespaces a killed earlier run of this bench left (its pid is gone)."""
    gone = []
    for line in sh("ip netns list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{NS_PREFIX}-(\d+)-[ab]", name)
        if m and not _pid_alive(int(m.group(1))):
            sh(f"ip netns del {name}", check=False)
            gone.append(name)
    return gone


class NetPair:
    """Two network namespaces joined by a veth pair, shaped, optionally delayed."""

    def __init__(self, base: Path) -> None:
        pid = os.getpid()
        self.a, self.b = f"{NS_PREFIX}-{pid}-a", f"{NS_PREFIX}-{pid}-b"
        self.va, self.vb = "tlva", "tlvb"  # veth ends (in a, in b)
        self.ta, self.tb = "tlda", "tldb"  # delay-line tun devices (in a, in b)
        self.base = base
        self.delays: dict[str, subprocess.Popen] = {}
        self.spec: LinkSpec | None = None
        self.made: list[str] = []

    def create(self) -> NetPair:
        for ns in (self.a, self.b):
            sh(f"ip netns add {ns}")
            self.made.append(ns)
            sh(f"ip -n {ns} link set lo up")
            # the delay line hands packets back on the tun device, not the veth:
            # reverse-path filtering must not drop them
            for key in ("all", "default"):
                sh(f"ip netns exec {ns} sysctl -qw net.ipv4.conf.{key}.rp_filter=0")
        sh(f"ip link add {self.va} netns {self.a} type veth peer name {self.vb} netns {self.b}")
        sh(f"ip -n {self.a} addr add {A_ADDR}/{PREFIX_LEN} dev {self.va}")
        sh(f"ip -n {self.b} addr add {B_ADDR}/{PREFIX_LEN} dev {self.vb}")
        sh(f"ip -n {self.a} link set {self.va} up")
        sh(f"ip -n {self.b} link set {self.vb} up")
        return self

    def sides(self) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        return (self.a, self.va, self.ta), (self.b, self.vb, self.tb)

    def _unshape(self) -> None:
        for name in list(self.delays):
            self._stop_delay(name)
        for ns, veth, tun in self.sides():
            sh(f"tc -n {ns} qdisc del dev {veth} root", check=False)
            sh(f"tc -n {ns} qdisc del dev {veth} ingress", check=False)
            sh(f"ip -n {ns} link del {tun}", check=False)
        self.spec = None

    def shape(self, spec: LinkSpec | None) -> None:
        """Shape both directions to ``spec`` (None: the bare veth)."""
        self._unshape()
        if spec is None:
            return
        burst = max(TBF_BURST_MIN, int(spec.bytes_per_s * TBF_BURST_MS / 1e3))
        for ns, veth, tun in self.sides():
            sh(
                f"tc -n {ns} qdisc replace dev {veth} root tbf rate {spec.mbit:g}mbit "
                f"burst {burst} latency {TBF_LATENCY_MS}ms"
            )
            if spec.rtt_ms > 0:
                sh(f"ip -n {ns} tuntap add mode tun dev {tun}")
                sh(f"ip -n {ns} link set {tun} up txqueuelen 10000")
                self._start_delay(ns, tun, spec.rtt_ms / 2)
                sh(f"tc -n {ns} qdisc add dev {veth} ingress")
                sh(
                    f"tc -n {ns} filter add dev {veth} parent ffff: protocol ip "
                    f"u32 match u32 0 0 action mirred egress redirect dev {tun}"
                )
        self.spec = spec

    def _start_delay(self, ns: str, tun: str, delay_ms: float) -> None:
        ready = self.base / f"delay-{tun}.ready"
        with contextlib.suppress(OSError):
            ready.unlink()
        log = open(self.base / f"delay-{tun}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            stats = self.base / f"delay-{tun}.json"
            argv = f"ip netns exec {ns} {sys.executable} -m bench.delayline --dev {tun}".split()
            p = subprocess.Popen(
                [*argv, "--delay-ms", str(delay_ms), "--ready", str(ready), "--stats", str(stats)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )
        finally:
            log.close()
        self.delays[tun] = p

        def up() -> bool:
            if p.poll() is not None:
                raise RuntimeError(f"the delay line on {tun} exited with {p.returncode}")
            return ready.exists()

        wait_for(f"the delay line on {tun}", up, 20)

    def _stop_delay(self, tun: str) -> dict | None:
        p = self.delays.pop(tun)
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        try:
            with open(self.base / f"delay-{tun}.json", encoding="utf-8") as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return None

    def delay_stats(self) -> dict:
        """Stop the delay lines and return their counters (end of a link)."""
        return {tun: self._stop_delay(tun) for tun in list(self.delays)}

    def check_delays(self) -> None:
        for tun, p in self.delays.items():
            if p.poll() is not None:
                raise RuntimeError(f"the delay line on {tun} died (exit {p.returncode})")

    def delay_cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.delays.values())

    def close(self) -> None:
        for tun in list(self.delays):
            with contextlib.suppress(Exception):
                self._stop_delay(tun)
        for ns in self.made:
            sh(f"ip netns del {ns}", check=False)
        self.made = []

    # --- the shaping, measured -----------------------------------------------------------

    def goodput(self, src: str, dst: str, dst_addr: str, seconds: float = PROBE_S) -> float:
        """TCP goodput src -> dst (bytes/s over the probe less its head)."""
        with in_netns(dst):
            srv = socket.create_server((dst_addr, 0))
        srv.settimeout(10)
        port = srv.getsockname()[1]
        marks: list[tuple[float, int]] = []

        def receive() -> None:
            conn, _ = srv.accept()
            buf = bytearray(1 << 20)
            got = 0
            with conn:
                while True:
                    k = conn.recv_into(buf)
                    if not k:
                        break
                    got += k
                    marks.append((time.monotonic(), got))

        th = threading.Thread(target=receive, daemon=True)
        th.start()
        with in_netns(src):
            c = socket.create_connection((dst_addr, port), timeout=10)
        chunk = memoryview(bytes(256 * 1024))
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                c.sendall(chunk)
        finally:
            c.close()
            th.join(30)
            srv.close()
        start = t0 + PROBE_HEAD_S
        steady = [(t, n) for t, n in marks if t >= start]
        if len(steady) < 2:
            raise RuntimeError(f"goodput probe {src} -> {dst}: nothing arrived after the head")
        (ta, na), (tb, nb) = steady[0], steady[-1]
        return (nb - na) / (tb - ta)

    def rtt_ms(self, n: int = RTT_PROBES) -> dict:
        """TCP round trip a -> b -> a, 1 byte each way, TCP_NODELAY (ms)."""
        with in_netns(self.b):
            srv = socket.create_server((B_ADDR, 0))
        srv.settimeout(10)
        port = srv.getsockname()[1]

        def echo() -> None:
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while d := conn.recv(1):
                    conn.sendall(d)

        th = threading.Thread(target=echo, daemon=True)
        th.start()
        with in_netns(self.a):
            c = socket.create_connection((B_ADDR, port), timeout=10)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        try:
            for i in range(n + 5):
                t = time.perf_counter()
                c.sendall(b"x")
                if c.recv(1) != b"x":
                    raise RuntimeError("rtt probe: the echo broke")
                if i >= 5:  # the first few warm the path (ARP, the delay lines' first wake-ups)
                    times.append((time.perf_counter() - t) * 1e3)
        finally:
            c.close()
            th.join(10)
            srv.close()
        a = np.asarray(times)
        return {
            "median": round(float(np.median(a)), 3),
            "p90": round(float(np.percentile(a, 90)), 3),
            "min": round(float(a.min()), 3),
        }

    def measure(self, check: bool = True) -> dict:
        """The link as it is now: goodput each way, RTT; raises (``check``)
        unless it is shaped as configured."""
        spec = self.spec
        fwd = self.goodput(self.a, self.b, B_ADDR)
        back = self.goodput(self.b, self.a, A_ADDR)
        rtt = self.rtt_ms()
        out: dict[str, Any] = {
            "goodput_a_to_b_Mbps": round(fwd * 8 / 1e6, 2),
            "goodput_b_to_a_Mbps": round(back * 8 / 1e6, 2),
            "rtt_ms": rtt,
            "load_average": load_average(),
        }
        if spec is None:
            return out
        bad = []
        for key, v in (("a -> b", fwd), ("b -> a", back)):
            share = v / spec.bytes_per_s
            out[f"goodput_share_{key.replace(' -> ', '_to_')}"] = round(share, 3)
            if not GOODPUT_MIN <= share <= GOODPUT_MAX:
                bad.append(
                    f"goodput {key} {v * 8 / 1e6:.1f} Mbit/s is {share:.2f} of the configured "
                    f"{spec.mbit:g} (allowed {GOODPUT_MIN}-{GOODPUT_MAX})"
                )
        hi = spec.rtt_ms + max(RTT_SLACK_MS, RTT_SLACK_SHARE * spec.rtt_ms)
        if not spec.rtt_ms <= rtt["median"] <= hi:
            bad.append(
                f"TCP round trip {rtt['median']:.2f} ms, configured {spec.rtt_ms:g} ms "
                f"(allowed {spec.rtt_ms:g}-{hi:g})"
            )
        if bad and check:
            raise RuntimeError(f"link {spec.name} is not shaped as configured: " + "; ".join(bad))
        return out

    def qdiscs(self) -> dict:
        """tc's view of both ends (kept in the JSON: what was configured)."""
        return {
            ns: sh(f"tc -n {ns} -s qdisc show").stdout.strip().splitlines()
            for ns in (self.a, self.b)
        }


# --- the daemons in the namespaces ---------------------------------------------------------


_HELP: str | None = None


def remusd_has_wire() -> bool:
    """Whether this remusd has --wire-compression (the issue's second stage)."""
    global _HELP
    if _HELP is None:
        exe = Path(sys.executable).parent / "remusd"
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "remusd.cli"]
        _HELP = subprocess.run(
            [*argv, "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
        ).stdout
    return "--wire-compression" in _HELP


def mode_args(mode: str) -> tuple[str, ...]:
    if remusd_has_wire():
        return ("--wire-compression", mode)
    if mode != "off":
        raise RuntimeError(
            f"mode {mode}: this remusd has no --wire-compression (the second stage has not landed)"
        )
    return ()


def expected_codec(mode: str) -> str:
    """The codec a session of ``mode`` must negotiate ("" for the raw stream)."""
    parts = mode.split(":")
    if parts[0] == "off":
        return ""
    if parts[0] == "auto":
        parts = parts[1:] or ["zstd"]
    return parts[0]


class NsStack(Stack):
    """bench.e2e.Stack with remusd in namespace a and the receiver in b."""

    def __init__(self, base: Path, pair: NetPair, mode: str) -> None:
        super().__init__(
            base,
            failover_ms=MEASURE_FAILOVER_MS,
            remusd_args=("--ack-timeout", str(ACK_TIMEOUT_S), *mode_args(mode)),
        )
        self.pair = pair
        self.mode = mode
        self.port = PORT

    @property
    def target(self) -> str:
        return f"{B_ADDR}:{self.port}"

    def _start(self, name: str, argv: list[str], control: str) -> None:
        ns = self.pair.b if name == "receiver" else self.pair.a
        if name == "receiver":  # plaintext (as bench.e2e) from remusd's namespace address
            argv = [*argv, "--insecure-allow", f"{A_ADDR}/32"]
        super()._start(name, ["ip", "netns", "exec", ns, *argv], control)

    def session(self, name: str) -> dict:
        """The receiver's status of its session for ``name``."""
        st = control_request(self.bsock, "status", timeout=20)
        for s in st["sessions"]:
            if s["domain"] == name:
                return dict(s)
        raise KeyError(name)

    def check_session(self, name: str) -> dict:
        """The session went over the veth and negotiated the mode's codec."""
        s = self.session(name)
        peer = str(s.get("peer") or "")
        if not peer.startswith(A_ADDR + ":"):
            raise RuntimeError(f"{name}: the receiver's peer is {peer!r}, not remusd's {A_ADDR}")
        want = expected_codec(self.mode)
        if "wire" not in s:
            if want:
                raise RuntimeError(f"mode {self.mode}: the receiver reports no wire compression")
            return s
        got = (s["wire"] or {}).get("codec", "")
        if got != want:
            raise RuntimeError(
                f"mode {self.mode}: the session negotiated {got or 'no codec'!r}, "
                f"expected {want or 'none'!r}\n{self.log('remusd')[-1500:]}"
            )
        return s


def stream_bytes(s: dict) -> int:
    """Stream bytes the receiver got (after wire decompression)."""
    w = s.get("wire")
    return int(w["stream_bytes"]) if w else int(s["bytes"])


# --- measurements ----------------------------------------------------------------------------


def measured_window(stack: NsStack, dom: Any, name: str, seconds: float, iv: int) -> dict:
    """bench.e2e.window plus what the link carried: the receiver's wire and
    stream bytes, remusd's wire status, the delay lines' CPU, the guest's steps."""
    spec = stack.pair.spec
    r0, d0, g0 = stack.session(name), stack.pair.delay_cpu(), dom.step
    w = window(stack, name, seconds)
    r1, d1, g1 = stack.session(name), stack.pair.delay_cpu(), dom.step
    stack.pair.check_delays()
    secs = w["seconds"]
    # acknowledged checkpoints by remusd's counter over the window (the
    # per-checkpoint history gives the pause, pages and bytes)
    n = w["timeline"][-1][1] - w["timeline"][0][1]
    wire = int(r1["bytes"]) - int(r0["bytes"])
    stream = stream_bytes(r1) - stream_bytes(r0)
    st = stack.status(name)
    rate = n / secs
    out = {
        k: w[k]
        for k in (
            "seconds",
            "pause_ms",
            "dirty_pages",
            "cache_hit_rate",
            "cpu_percent",
            "timeline",
        )
    }
    out.update(
        checkpoints=n,
        checkpoints_per_s=round(rate, 2),
        history_checkpoints=w["checkpoints"],
        interval_ms=iv,
        nominal_per_s=round(1000 / iv, 2),
        kept=rate >= KEPT * 1000 / iv,
        stream_bytes_per_checkpoint=w["bytes_per_checkpoint"],  # remusd's history
        stream_bytes_per_checkpoint_mean=round(stream / n) if n else None,
        wire_bytes_per_checkpoint=round(wire / n) if n else None,
        wire_ratio=round(stream / wire, 3) if wire else None,
        wire_Mbps=round(wire * 8 / secs / 1e6, 3),
        stream_Mbps=round(stream * 8 / secs / 1e6, 3),
        link_share=round(wire / secs / spec.bytes_per_s, 3) if spec else None,
        guest_steps_per_s=round((g1 - g0) / secs, 1),
        remusd_wire=st.get("wire"),
        load_average=load_average(),
    )
    out["cpu_percent"]["delay_lines"] = round(100 * (d1 - d0) / secs, 1)
    # remusd's counter and its per-checkpoint history must agree on the window
    if abs(w["checkpoints"] - n) > max(2, 0.05 * n):
        out["history_disagrees"] = True
        print(
            f"WARNING: {name} at {iv} ms: remusd's counter says {n} checkpoints in the "
            f"window, its history {w['checkpoints']}: pause/pages/bytes of this window "
            "are suspect",
            file=sys.stderr,
            flush=True,
        )
    return out


def guest(stack: NsStack, workload: str, memory: int, hot_rate: float, tag: str) -> tuple[str, Any]:
    name = f"{workload}-{tag}"
    if workload == "hotset":
        return name, create(stack, name, memory, "hotset", hot_rate, wss=HOTSET_WSS)
    return name, create(stack, name, memory, "ledger", LEDGER_RATE)


def calibrate_hotset(base: Path, pair: NetPair, memory: int) -> dict:
    """The hotset's rate for ~RATE_PAGES dirty pages per 25 ms epoch, on the
    unshaped veth, mode off (bench.e2e.calibrate)."""
    pair.shape(None)
    stack = NsStack(base / "calibrate", pair, "off")
    stack.start()
    try:
        name, dom = guest(stack, "hotset", memory, 120000.0, "cal")
        stack.protect(name, "xen", RATE_INTERVAL_MS)
        rate = calibrate(stack, dom, name, 120000.0, RATE_PAGES, 1.5, steps=4)
        w = window(stack, name, 2.0)
        stack.unprotect(name)
        dom.destroy()
    finally:
        stack.close()
    return {
        "rate_pages_per_s": round(rate),
        "dirty_pages_median": w["dirty_pages"].get("median"),
        "checkpoints_per_s": w["checkpoints_per_s"],
    }


def copy_case(stack: NsStack, workload: str, memory: int, hot_rate: float) -> dict:
    name, dom = guest(stack, workload, memory, hot_rate, "copy")
    try:
        ic = stack.protect(name, "xen", COPY_INTERVAL_MS, timeout=900)
        s = stack.check_session(name)
        st = stack.status(name)
        stack.unprotect(name)
    finally:
        dom.destroy()
    wire = int(s["bytes"])
    return {
        **ic,
        "memory_MiB": memory // MiB,
        "wire_MB": round(wire / 1e6, 3),
        "stream_MB_received": round(stream_bytes(s) / 1e6, 3),
        "wire_ratio": round(stream_bytes(s) / wire, 3) if wire else None,
        "effective_MBps": round(memory / ic["s"] / 1e6, 1),
        "remusd_wire": st.get("wire"),
    }


def settle(stack: NsStack, name: str, warm: float) -> dict:
    """Wait ``warm`` s and for SETTLE_CHECKPOINTS acknowledged checkpoints
    after the copy (the first one carries every page the guest wrote during
    the copy against a cold page cache: on a thin link it takes seconds, and
    the next ones are large too). Returns the wait and the period of the
    last of them, which sets the window's length."""
    t0 = time.monotonic()
    c0 = stack.status(name)["checkpoints"]
    marks: list[float] = []
    last = c0
    while True:
        c = stack.status(name)["checkpoints"]
        now = time.monotonic()
        if c > last:
            marks.extend([now] * (c - last))
            last = c
        if (len(marks) >= SETTLE_CHECKPOINTS and now - t0 >= warm) or now - t0 > SETTLE_MAX_S:
            break
        time.sleep(0.02)
    period = (marks[-1] - marks[-2]) if len(marks) >= 2 else None
    return {
        "settle_s": round(time.monotonic() - t0, 2),
        "settle_checkpoints": len(marks),
        "last_period_s": None if period is None else round(period, 3),
    }


def rate_case(
    stack: NsStack, workload: str, memory: int, hot_rate: float, warm: float, seconds: float
) -> dict:
    """25 ms first; kept, the next shorter interval (10 ms) too; not kept,
    longer ones in turn until one is kept."""
    per: dict[str, dict] = {}
    dom = None
    name = ""
    try:
        queue = [TARGET_INTERVAL_MS]
        while queue:
            iv = queue.pop(0)
            if dom is None:
                name, dom = guest(stack, workload, memory, hot_rate, f"r{iv}")
            if workload == "hotset":  # the copy of an idle guest: one round, not five
                dom.set_rate(0.0)
            ic = stack.protect(name, "xen", iv, timeout=600)
            stack.check_session(name)
            if workload == "ledger-max":
                dom.set_rate(math.inf)
            elif workload == "hotset":
                dom.set_rate(hot_rate)
            st = settle(stack, name, warm)
            period = st["last_period_s"] or 0.0
            length = max(seconds, min(MAX_WINDOW_S, WINDOW_PERIODS * period))
            w = measured_window(stack, dom, name, length, iv)
            w.update(st, initial_copy_s=ic["s"])
            stack.unprotect(name)
            if workload.startswith("ledger") and dom.status()["state"] != 1:
                raise RuntimeError(
                    f"{name}: the guest stopped running (state {dom.status()['state']}; 4: its "
                    "log filled): give it more memory"
                )
            if workload == "ledger-max":  # a fresh log for the next interval
                dom.destroy()
                dom = None
            per[str(iv)] = w
            if iv == TARGET_INTERVAL_MS:  # kept: can it go faster? not: how slow must it go?
                queue = [x for x in INTERVALS_MS if (x < iv if w["kept"] else x > iv)]
                queue.sort(reverse=w["kept"])
            if iv != TARGET_INTERVAL_MS and (w["kept"] if iv > TARGET_INTERVAL_MS else True):
                break
    finally:
        if dom is not None:
            dom.destroy()
    best_w = max(per.values(), key=lambda w: w["checkpoints_per_s"])
    kept = [w["interval_ms"] for w in per.values() if w["kept"]]
    return {
        "intervals": per,
        "max_checkpoints_per_s": best_w["checkpoints_per_s"],
        "max_at_interval_ms": best_w["interval_ms"],
        "shortest_kept_ms": min(kept) if kept else None,
        "longest_tried_ms": max(int(iv) for iv in per),
    }


# --- the run ---------------------------------------------------------------------------------


def run_link(
    base: Path,
    pair: NetPair,
    spec: LinkSpec,
    modes: list[str],
    workloads: list[str],
    hot_rate: float,
    copy_mem: int,
    warm: float,
    seconds: float,
) -> dict:
    pair.shape(spec)
    before = pair.measure()
    print(f"link {spec.name}: {link_line(spec, before)}", flush=True)
    out: dict[str, Any] = {
        "mbit": spec.mbit,
        "rtt_ms": spec.rtt_ms,
        "measured_before": before,
        "qdiscs": pair.qdiscs(),
        "modes": {},
    }
    for mode in modes:
        stack = NsStack(base / f"{spec.name}-{mode.replace(':', '_')}", pair, mode)
        stack.start()
        per: dict[str, Any] = {}
        out["modes"][mode] = per
        try:
            for wl in workloads:
                t0 = time.monotonic()
                case: dict[str, Any] = {}
                if wl in COPY_WORKLOADS:
                    case["copy"] = copy_case(stack, wl, copy_mem, hot_rate)
                case["rate"] = rate_case(stack, wl, RATE_MIB * MiB, hot_rate, warm, seconds)
                case["elapsed_s"] = round(time.monotonic() - t0, 1)
                per[wl] = case
                print(f"  {mode:<8} {wl:<10} {case_line(case)}", flush=True)
        except BaseException:
            for name in ("remusd", "receiver"):
                print(
                    f"--- {name} log (last lines) ---\n{stack.log(name)[-3000:]}", file=sys.stderr
                )
            raise
        finally:
            stack.close()
    try:
        out["measured_after"] = pair.measure()
        out["shaping_held_after"] = True
    except RuntimeError as e:  # the cases are measured: keep them, say it loudly
        print(f"WARNING: after the cases, {e}", file=sys.stderr, flush=True)
        out["measured_after"] = pair.measure(check=False)
        out["shaping_held_after"] = False
        out["shaping_after_error"] = str(e)
    out["delay_lines"] = pair.delay_stats()
    print(f"  after: {link_line(spec, out['measured_after'])}", flush=True)
    return out


# --- tables ----------------------------------------------------------------------------------


def link_line(spec: LinkSpec, m: dict) -> str:
    return (
        f"configured {spec.mbit:g} Mbit/s each way, RTT {spec.rtt_ms:g} ms; measured goodput "
        f"{m['goodput_a_to_b_Mbps']:.1f} / {m['goodput_b_to_a_Mbps']:.1f} Mbit/s (a->b / b->a), "
        f"TCP RTT {m['rtt_ms']['median']:.2f} ms (p90 {m['rtt_ms']['p90']:.2f})"
    )


def case_line(case: dict) -> str:
    r = case["rate"]
    at = r["intervals"].get(str(TARGET_INTERVAL_MS), {})
    c = case.get("copy")
    copy = f"copy {c['s']:.1f} s ({c['wire_MB']:.0f} MB on the wire), " if c else ""
    return (
        f"{copy}max {r['max_checkpoints_per_s']:.1f}/s at {r['max_at_interval_ms']} ms; "
        f"25 ms: {at.get('checkpoints_per_s', 0):.1f}/s"
    )


def print_tables(r: dict) -> None:
    m = r["machine"]
    print(
        f"\nthin link benchmark ({m['cpu']}, {m['cpus']} CPUs, kernel {m['kernel']}, load "
        f"{m['loadavg_at_start'][0]:.1f}; {r.get('elapsed_s', 0):.0f} s; copy guests "
        f"{r['copy_MiB']} MiB, rate guests {r['rate_MiB']} MiB; hotset at "
        f"{r['calibration']['rate_pages_per_s']} pages/s)"
    )
    for lname, link in r["links"].items():
        b, a = link["measured_before"], link["measured_after"]
        print(
            f"\nlink {lname}: configured {link['mbit']:g} Mbit/s each way, RTT {link['rtt_ms']:g} ms;"
            f" measured goodput a->b {b['goodput_a_to_b_Mbps']:.1f} / {a['goodput_a_to_b_Mbps']:.1f}"
            f" Mbit/s, b->a {b['goodput_b_to_a_Mbps']:.1f} / {a['goodput_b_to_a_Mbps']:.1f}, "
            f"TCP RTT {b['rtt_ms']['median']:.2f} / {a['rtt_ms']['median']:.2f} ms (before / after)"
        )
        print(
            f"  {'workload':<10} {'mode':<8} {'copy s':>7} {'wire MB':>8} {'ratio':>6} | "
            f"{'max/s':>6} {'@ms':>4} {'kept':>5} | {'25ms/s':>6} {'kept':>4} {'stream KB':>9} "
            f"{'wire KB':>8} {'ratio':>6} {'Mbit/s':>7} {'link':>5} {'remusd':>6} {'recv':>5} "
            f"{'delay':>5} {'auto':>5}"
        )
        modes = link["modes"]
        wls = [w for w in WORKLOADS if any(w in per for per in modes.values())]
        for wl in wls:
            for mode, per in modes.items():
                if wl not in per:
                    continue
                case = per[wl]
                c = case.get("copy")
                rt = case["rate"]
                at = rt["intervals"].get(str(TARGET_INTERVAL_MS), {})
                copy = (
                    f"{c['s']:>7.1f} {c['wire_MB']:>8.1f} {c['wire_ratio'] or 0:>6.2f}"
                    if c
                    else f"{'-':>7} {'-':>8} {'-':>6}"
                )
                kept = rt["shortest_kept_ms"]
                cpu = at.get("cpu_percent", {})
                aw = at.get("remusd_wire") or {}
                auto = (
                    "-"
                    if not mode.startswith("auto")
                    else ("on" if aw.get("compressing") else "off")
                )
                med = at.get("stream_bytes_per_checkpoint_mean") or 0
                print(
                    f"  {wl:<10} {mode:<8} {copy} | {rt['max_checkpoints_per_s']:>6.1f} "
                    f"{rt['max_at_interval_ms']:>4} {kept if kept else 'none':>5} | "
                    f"{at.get('checkpoints_per_s', 0):>6.1f} {'yes' if at.get('kept') else 'NO':>4} "
                    f"{med / 1e3:>9.1f} {(at.get('wire_bytes_per_checkpoint') or 0) / 1e3:>8.1f} "
                    f"{at.get('wire_ratio') or 0:>6.2f} {at.get('wire_Mbps', 0):>7.1f} "
                    f"{100 * (at.get('link_share') or 0):>4.0f}% {cpu.get('remusd', 0):>5.0f}% "
                    f"{cpu.get('receiver', 0):>4.0f}% {cpu.get('delay_lines', 0):>4.0f}% {auto:>5}"
                )
        print(
            "  copy: initial copy (remusd's figure), wire MB and stream/wire ratio; max/s: the "
            "highest checkpoint rate over the intervals tried and its interval; kept: the "
            "shortest interval kept (>= 95%); 25ms: the target interval's figures"
        )
        print("  per interval tried (checkpoints/s, kept, wire KB per checkpoint):")
        for wl in wls:
            for mode, per in modes.items():
                if wl not in per:
                    continue
                cells = []
                for iv, w in per[wl]["rate"]["intervals"].items():
                    cells.append(
                        f"{iv}ms {w['checkpoints_per_s']:.1f}{'' if w['kept'] else '!'} "
                        f"{(w['wire_bytes_per_checkpoint'] or 0) / 1e3:.1f}KB"
                    )
                print(f"    {wl:<10} {mode:<8} " + ", ".join(cells))
    v = r.get("verdicts")
    if v:
        print("\ntarget: at 100 Mbit/s the ledger guests sustain 40 checkpoints/s (25 ms)")
        for line in v:
            print(f"  {line}")


def rekeep(r: dict) -> dict:
    """After a median: "kept" from the median rate (a majority of the runs'
    flags can disagree with it), and the case figures from those windows;
    an interval counts only if every run tried it (median_of_runs' rule)."""
    for link in r["links"].values():
        for per in link["modes"].values():
            for case in per.values():
                rt = case["rate"]
                ws = list(rt["intervals"].values())
                for w in ws:
                    w["kept"] = w["checkpoints_per_s"] >= KEPT * 1000 / w["interval_ms"]
                best = max(ws, key=lambda w: w["checkpoints_per_s"])
                kept = [w["interval_ms"] for w in ws if w["kept"]]
                rt["max_checkpoints_per_s"] = best["checkpoints_per_s"]
                rt["max_at_interval_ms"] = best["interval_ms"]
                rt["shortest_kept_ms"] = min(kept) if kept else None
    return r


def verdicts(r: dict) -> list[str]:
    out = []
    for lname, link in r["links"].items():
        if link["mbit"] != 100:
            continue
        for wl in ("ledger", "ledger-max"):
            met: list[str] = []
            missed: list[str] = []
            for mode, per in link["modes"].items():
                if wl not in per:
                    continue
                at = per[wl]["rate"]["intervals"].get(str(TARGET_INTERVAL_MS), {})
                rate = at.get("checkpoints_per_s", 0)
                (met if at.get("kept") else missed).append(f"{mode} {rate:.1f}/s")
            if met or missed:
                out.append(
                    f"{lname} {wl}: met with {', '.join(met) or 'no mode'}"
                    + (f"; missed with {', '.join(missed)}" if missed else "")
                )
    return out


class Interrupted(Exception):
    """SIGTERM: tear down as for Ctrl-C."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.thinlink",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--quick", action="store_true", help="256 MiB copy guests, 2.5 s windows")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "thinlink.json"))
    p.add_argument(
        "--links", default=DEFAULT_LINKS, help=f"links, comma-separated (default {DEFAULT_LINKS})"
    )
    p.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help=f"remusd --wire-compression modes (default {DEFAULT_MODES})",
    )
    p.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"default {','.join(WORKLOADS)}"
    )
    p.add_argument(
        "--copy-mib",
        type=int,
        help=f"copy guests' size (default {COPY_MIB_FULL}, --quick {COPY_MIB_QUICK})",
    )
    p.add_argument(
        "--median", nargs="+", metavar="RUN_JSON", help="run nothing: the median of these runs"
    )
    args = p.parse_args(argv)
    if args.median:
        runs = []
        for path in args.median:
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f))
        med = rekeep(median_of_runs(runs))
        med["median_of"] = args.median
        med["verdicts"] = verdicts(med)
        print_tables(med)
        save_json(med, args.json)
        return 0
    links = [parse_link(x) for x in args.links.split(",") if x.strip()]
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    workloads = [x.strip() for x in args.workloads.split(",") if x.strip()]
    for wl in workloads:
        if wl not in WORKLOADS:
            p.error(f"unknown workload {wl!r} (known: {', '.join(WORKLOADS)})")
    if os.geteuid() != 0:
        p.error("root is needed (network namespaces, tc)")
    for mode in modes:
        mode_args(mode)  # fails now, not after an hour, if the mode cannot run
    copy_mem = (args.copy_mib or (COPY_MIB_QUICK if args.quick else COPY_MIB_FULL)) * MiB
    seconds = 2.5 if args.quick else 4.0
    warm = 1.0 if args.quick else 1.5

    def on_term(signum: int, frame: object) -> None:
        raise Interrupted

    signal.signal(signal.SIGTERM, on_term)
    stale = remove_stale_namespaces()
    base = Path(tempfile.mkdtemp(prefix="bench-thinlink-", dir="/dev/shm"))
    results: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "copy_MiB": copy_mem // MiB,
        "rate_MiB": RATE_MIB,
        "modes": modes,
        "workloads": workloads,
        "remusd_has_wire_compression": remusd_has_wire(),
        "stale_namespaces_removed": stale,
        "links": {},
    }
    t0 = time.monotonic()
    pair = NetPair(base)
    try:
        pair.create()
        results["congestion_control"] = sh(
            f"ip netns exec {pair.a} sysctl -n net.ipv4.tcp_congestion_control"
        ).stdout.strip()
        results["calibration"] = calibrate_hotset(base, pair, RATE_MIB * MiB)
        hot_rate = float(results["calibration"]["rate_pages_per_s"])
        print(f"hotset calibrated: {results['calibration']}", flush=True)
        for spec in links:
            results["links"][spec.name] = run_link(
                base, pair, spec, modes, workloads, hot_rate, copy_mem, warm, seconds
            )
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: tearing down", file=sys.stderr)
        return 130
    finally:
        pair.close()
        shutil.rmtree(base, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["verdicts"] = verdicts(results)
    print_tables(results)
    save_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
