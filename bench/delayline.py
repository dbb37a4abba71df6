"""A fixed one-way packet delay on a tun device: netem's ``delay``, in user space.

    python -m bench.delayline --dev TUN --delay-ms D [--ready PATH] [--stats PATH]

bench/thinlink.py needs a link with a round-trip time, and this kernel has no
``sch_netem`` (CONFIG_NET_SCH_NETEM unset, no modules). So the delay is made
the way netem makes it, one packet at a time, but here: tc on the receiving
end of the veth redirects every IPv4 packet arriving there (``ingress``,
``u32 match u32 0 0``, ``mirred egress redirect``) to the tun device TUN,
already created and up in the same network namespace (``ip tuntap add mode
tun``: IFF_TUN | IFF_NO_PI, so a read is one IP packet, nothing before it).
This process attaches to TUN (TUNSETIFF), reads each packet as it comes,
holds it D ms from the moment it was read, and writes it back to the same
device, where the kernel takes it as received on TUN and delivers it (its
destination is an address of this namespace). Order is kept (one FIFO);
ARP and anything not IPv4 is not redirected and is not delayed.

Rules:
- A packet is written no earlier than D ms after it was read (the deadline
  is its read time + D; ``select`` waits for the earliest deadline with a
  microsecond timeout), and in the order read.
- Nothing is dropped here: the queue is unbounded (a link whose rate is
  shaped before the delay, by tbf, holds at most rate x D bytes in it).
- The packets are not parsed or changed: the kernel computed their checksums
  before the tun device took them (the device offers no offloads).
- On SIGTERM or SIGINT the process writes its counters as JSON to ``--stats``
  (packets, bytes, the largest queue, how late writes were past their
  deadline: median, p99, max, in us) and exits 0. It dies with its parent
  (PR_SET_PDEATHSIG), so a killed bench leaves no delay line behind; its
  timer slack is 1 us (PR_SET_TIMERSLACK), not the default 50 us, and it
  runs at nice 0 whatever its caller's niceness (the network is not the
  hosts' CPU; it competes for this box's cores all the same).
- ``--ready PATH``: the file is written (its pid) once the device is attached,
  so that the caller knows the delay is in place.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import struct
import sys
import time
from collections import deque

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001  # an IP-level device (no Ethernet header)
IFF_NO_PI = 0x1000  # no 4-byte packet-information prefix on reads and writes
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29
#: timer slack asked for (ns): select's wake-up is what makes the delay exact
TIMER_SLACK_NS = 1000
#: the largest packet a read may return (a tun device's MTU is at most 65535)
MAX_PACKET = 65536
#: late-write samples kept for the percentiles (a ring; the max is exact)
LATE_SAMPLES = 100_000


def attach(dev: str) -> int:
    """Open /dev/net/tun and attach it to the existing tun device ``dev``."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class Stop(Exception):
    """SIGTERM or SIGINT: write the counters and leave."""


def run(fd: int, delay_s: float, stats_path: str | None) -> None:
    queue: deque[tuple[float, bytes]] = deque()
    packets = nbytes = max_queue = 0
    late_us: deque[float] = deque(maxlen=LATE_SAMPLES)
    late_max = 0.0
    clock = time.monotonic

    def stop(signum: int, frame: object) -> None:
        raise Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            if queue:
                wait = max(0.0, queue[0][0] - clock())
                ready, _, _ = select.select([fd], [], [], wait)
            else:
                ready, _, _ = select.select([fd], [], [], 1.0)
            now = clock()
            if ready:
                while True:
                    try:
                        pkt = os.read(fd, MAX_PACKET)
                    except BlockingIOError:
                        break
                    queue.append((now + delay_s, pkt))
                    packets += 1
                    nbytes += len(pkt)
                max_queue = max(max_queue, len(queue))
            while queue and queue[0][0] <= now:
                due, pkt = queue.popleft()
                os.write(fd, pkt)
                late = (clock() - due) * 1e6
                late_us.append(late)
                late_max = max(late_max, late)
                now = clock()
    except Stop:
        pass
    if stats_path:
        s = sorted(late_us)
        out = {
            "packets": packets,
            "bytes": nbytes,
            "max_queue": max_queue,
            "delay_ms": delay_s * 1e3,
            "late_us": {
                "median": round(s[len(s) // 2], 1) if s else None,
                "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))], 1) if s else None,
                "max": round(late_max, 1),
            },
        }
        with open(stats_path, "w", encoding="utf-8") as f:
            json.dump(out, f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.delayline", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--dev", required=True, help="the tun device to attach to (existing, up)")
    p.add_argument(
        "--delay-ms", type=float, required=True, help="one-way delay added to every packet"
    )
    p.add_argument("--ready", metavar="PATH", help="write this file (our pid) once attached")
    p.add_argument("--stats", metavar="PATH", help="write the counters here (JSON) on SIGTERM")
    args = p.parse_args(argv)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        libc.prctl(PR_SET_TIMERSLACK, TIMER_SLACK_NS)
    # the link is not the hosts' CPU: run at the default priority whatever
    # the caller's niceness (root only; a plain user keeps the inherited one)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    fd = attach(args.dev)
    if args.ready:
        with open(args.ready, "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))
    run(fd, args.delay_ms / 1e3, args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
