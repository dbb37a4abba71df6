"""remusd's configuration: the command line, the TOML keys, a protect request.

Every option is a flag and a TOML key of /etc/remus/remusd.toml (the flag's
long name, ``-`` or ``_``); precedence: built-in default < TOML < flag (see
``daemonkit.config.parse_args_with_config``). The daemon-wide defaults for a
protected domain (``interval``, ``codec``...) apply when ``remusctl protect``
does not say otherwise. ``protect`` entries in the TOML (or repeated
``--protect`` flags) are protected when the daemon starts::

    protect = ["ledger=backup.example:7788", "web=file:/var/lib/remus/web.stream"]

Rules:
- Intervals are whole milliseconds, ``MIN_INTERVAL_MS`` (4) or more: on
  2 cores the pair keeps up with 4 ms epochs of ~200 pages (248.5 of 250
  checkpoints/s), not with 3 ms (285 of 333) or 2 ms, where checkpoints run
  back to back (bench.scale, docs/performance.md "Scale").
- Timeouts are seconds, positive; every network wait takes one of them.
- A target is ``HOST:PORT`` (the receiver) or ``file:PATH`` (a stream file).
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from dataclasses import asdict, dataclass

from daemonkit import tls, witness
from daemonkit.config import add_daemon_arguments
from daemonkit.transport import parse_hostport
from xenbind.compress.formats import CODECS
from xenbind.errors import ConfigError

from .wire import MODES_HELP as WIRE_MODES_HELP
from .wire import WireMode
from .wire import parse_mode as parse_wire_mode

#: seconds remusd waits for the receiver's answer to its HELLO (--accept-timeout)
DEFAULT_ACCEPT_TIMEOUT = 120.0

#: The default codec: xen, from bench/e2e's figures (docs/performance.md): a
#: better wire ratio than seed on every workload and cache size measured, the
#: same CPU, and with the default cache a stream in Xen's own format.
DEFAULT_CODEC = "xen"
DEFAULT_CONFIG = "/etc/remus/remusd.toml"
DEFAULT_CONTROL = "/run/remus/remusd.sock"
DEFAULT_INTERVAL_MS = 200  # like `xl remus`
#: below it the pair no longer keeps the interval (checkpoints ~3-4 ms each on 2 cores)
MIN_INTERVAL_MS = 4
MAX_INTERVAL_MS = 60_000
#: The sender's page buffer: pages compressed into one COMPRESSED_DATA chunk (Xen: 8192).
DEFAULT_BUFFER_PAGES = 8192
#: The LRU page cache of the compressing codecs (Xen: 8192).
DEFAULT_CACHE_PAGES = 8192
#: where the domains' locks and records live (remusd.owners); with --sim-dir,
#: SIM_DIR/remusd instead (the simulated host's runtime directory)
DEFAULT_STATE_DIR = "/run/remus/domains"
#: seconds a stopped protection stays in the status
DEFAULT_KEEP_STOPPED = 600.0
#: --wire-compression: auto, zstd level 1 (docs/performance.md, "A thin link")
DEFAULT_WIRE = WireMode("zstd", 1, auto=True)


@dataclass(frozen=True)
class Target:
    """Where a session's stream goes."""

    kind: str  # "tcp" or "file"
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Target:
        if text.startswith("file:"):
            path = text[5:]
            if not path:
                raise ConfigError("target file: needs a path (file:PATH)")
            return cls("file", path=path)
        host, port = parse_hostport(text, what="target")
        if port == 0:
            raise ConfigError(f"target {text!r}: port 0 is not a receiver's port")
        return cls("tcp", host=host, port=port)

    def __str__(self) -> str:
        if self.kind == "file":
            return f"file:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def check_interval(ms: int) -> int:
    if not isinstance(ms, int) or isinstance(ms, bool):
        raise ConfigError(f"interval {ms!r} is not a whole number of milliseconds")
    if not MIN_INTERVAL_MS <= ms <= MAX_INTERVAL_MS:
        raise ConfigError(
            f"interval {ms} ms out of range ({MIN_INTERVAL_MS}..{MAX_INTERVAL_MS} ms)"
        )
    return ms


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ConfigError(f"codec {codec!r} unknown (one of {', '.join(CODECS)})")
    return codec


@dataclass(frozen=True)
class ProtectRequest:
    """One domain to protect, as remusctl or the config file asks."""

    domain: str  # domid or name, as given
    target: Target
    interval_ms: int = DEFAULT_INTERVAL_MS
    codec: str = DEFAULT_CODEC
    verify: bool = False

    def as_json(self) -> dict:
        d = asdict(self)
        d["target"] = str(self.target)
        return d

    @classmethod
    def from_json(cls, req: dict, defaults: argparse.Namespace) -> ProtectRequest:
        """From a control request; missing fields take the daemon's defaults."""
        domain = req.get("domain")
        if not isinstance(domain, str | int) or isinstance(domain, bool) or str(domain) == "":
            raise ConfigError("protect: 'domain' (a domid or a name) is required")
        target = req.get("target")
        if not isinstance(target, str):
            raise ConfigError("protect: 'target' (HOST:PORT or file:PATH) is required")
        interval = req.get("interval_ms")
        interval = defaults.interval if interval is None else interval
        codec = req.get("codec") or defaults.codec
        verify = req.get("verify")
        verify = defaults.verify if verify is None else verify
        if not isinstance(verify, bool):
            raise ConfigError("protect: 'verify' must be true or false")
        if not isinstance(codec, str):
            raise ConfigError("protect: 'codec' must be a string")
        return cls(
            str(domain), Target.parse(target), check_interval(interval), check_codec(codec), verify
        )

    @classmethod
    def parse_spec(cls, spec: str, defaults: argparse.Namespace) -> ProtectRequest:
        """``DOMAIN=TARGET`` (the ``protect`` config key)."""
        domain, sep, target = spec.partition("=")
        if not sep or not domain or not target:
            raise ConfigError(f"protect entry {spec!r} is not DOMAIN=HOST:PORT or DOMAIN=file:PATH")
        return cls.from_json({"domain": domain, "target": target}, defaults)


def _positive(kind, unit: str):
    """A converter for a positive ``kind`` (int or float) counted in ``unit``:
    its errors say what is wrong in the operator's words ("'1.5' is not a
    whole number of pages"), never a Python type name."""
    what = f"a whole number of {unit}" if kind is int else f"a number of {unit}"

    def conv(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 {unit}")
        return v

    conv.__name__ = f"{kind.__name__}-{unit}"
    return conv


def _whole(unit: str, lo: int, hi: int):
    """A converter for a whole number of ``unit`` from ``lo`` to ``hi``."""

    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {unit}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} {unit} is out of range ({lo} to {hi} {unit})")
        return v

    conv.__name__ = f"whole-{unit}"
    return conv


interval_ms = _whole("ms", MIN_INTERVAL_MS, MAX_INTERVAL_MS)


DESCRIPTION = textwrap.dedent("""\
    remusd is the primary-host daemon of Remus high availability. For each
    protected domain it copies the running guest to a backup host (the
    remus-receiver daemon there), then checkpoints it every INTERVAL: it
    pauses the guest, copies the pages dirtied since the last checkpoint,
    resumes it, and while the guest runs sends those pages compressed to the
    backup. Output the guest produced (its network packets; the simulator's
    released outputs) is held back until the backup acknowledged the
    checkpoint holding it. If the backup stops acknowledging, the guest keeps
    running unprotected and remusd retries; when the primary dies, the backup
    resumes the guest from the last acknowledged checkpoint.

    remusd is driven with remusctl(1) over its control socket. It runs in the
    foreground, logs to stderr (journald-friendly under systemd) and supports
    systemd's Type=notify readiness and watchdog.""")

EPILOG = textwrap.dedent("""\
    configuration:
      Every option above is also a key of the TOML file (--config), named like
      the long flag without the dashes: control = "/run/remus/remusd.sock",
      interval = 100, ack-timeout = 2.0, protect = ["ledger=backup:7788"].
      Flags given on the command line override the file.

    replication link security:
      TLS 1.3 with mutual authentication is the default for HOST:PORT
      targets: --tls-cert, --tls-key, --tls-ca (or the keys of the same names).
      The receiver's certificate must chain to the CA, be valid, and carry the
      target's HOST (or one of the --allow-peer names). Without TLS files,
      HOST:PORT targets need --insecure (plaintext; a warning at every
      session); file: targets need neither. Certificates are re-read when
      their files change. See docs/operations.md, "Certificates".

    examples:
      remusd --tls-cert /etc/remus/tls/primary.crt --tls-key /etc/remus/tls/primary.key \\
             --tls-ca /etc/remus/tls/ca.crt
          run with TLS (usually these three keys are in /etc/remus/remusd.toml)
      remusd --insecure
          run with /etc/remus/remusd.toml, plaintext replication link
      remusd --sim-dir /dev/shm/primary --control /tmp/remusd.sock --insecure
          run against a simulated host (see python -m xenbind.sim --help)
      remusd --insecure --protect ledger=10.0.0.2:7788 --interval 100
          protect the domain "ledger" as soon as the daemon is up

    exit status:
      0  stopped by SIGTERM or SIGINT (protected guests keep running,
         unprotected, and each backup was told the session ended cleanly)
      1  the hypervisor cannot be opened (not a Xen dom0 and no --sim-dir)
      2  bad command line or configuration (the message names the key),
         or the control socket cannot be created or is in use

    files:
      /etc/remus/remusd.toml   configuration (optional)
      /run/remus/remusd.sock   control socket (mode 0600; 0660 with --control-group);
                               only root, remusd's user and the group's members
                               are served (checked with SO_PEERCRED)

    see also: remusctl(1), remus-receiver(8), docs/operations.md""")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remusd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_daemon_arguments(
        p,
        config=DEFAULT_CONFIG,
        control=DEFAULT_CONTROL,
        insecure_help="use a plaintext (unauthenticated, unencrypted) replication link instead "
        "of TLS; a warning is logged at every session",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default info)",
    )
    g = p.add_argument_group("defaults for protected domains (remusctl protect may override)")
    g.add_argument(
        "--interval",
        metavar="MS",
        type=interval_ms,
        default=DEFAULT_INTERVAL_MS,
        help=f"checkpoint interval in ms (default {DEFAULT_INTERVAL_MS}, "
        f"minimum {MIN_INTERVAL_MS})",
    )
    g.add_argument(
        "--codec",
        choices=list(CODECS),
        default=DEFAULT_CODEC,
        help="checkpoint compression: xen (Xen 4.2-4.5's format, the default), "
        "seed (delta words) or none (uncompressed Format A)",
    )
    g.add_argument(
        "--verify",
        action="store_true",
        help="add a digest of the whole guest memory to each checkpoint "
        "(debugging; lengthens the pause)",
    )
    g.add_argument(
        "--protect",
        metavar="DOMAIN=TARGET",
        action="append",
        default=[],
        help="protect DOMAIN at start-up, TARGET being HOST:PORT or file:PATH (repeatable)",
    )
    t = p.add_argument_group("timeouts and tuning")
    t.add_argument(
        "--ack-timeout",
        metavar="SEC",
        type=_positive(float, "seconds"),
        default=2.0,
        help="declare the backup gone when a checkpoint is not acknowledged within "
        "SEC seconds (default 2.0); the guest then runs unprotected",
    )
    t.add_argument(
        "--connect-timeout",
        metavar="SEC",
        type=_positive(float, "seconds"),
        default=5.0,
        help="TCP connect timeout, and the longest silence of the receiver during "
        "the handshake (default 5.0)",
    )
    t.add_argument(
        "--accept-timeout",
        metavar="SEC",
        type=_positive(float, "seconds"),
        default=DEFAULT_ACCEPT_TIMEOUT,
        help="how long to wait for the receiver to accept a session: it builds the "
        "backup domain (allocating all its memory) before it answers, which "
        f"takes seconds for a large guest (default {DEFAULT_ACCEPT_TIMEOUT:g})",
    )
    t.add_argument(
        "--retry-min",
        metavar="SEC",
        type=_positive(float, "seconds"),
        default=0.5,
        help="first delay before reconnecting to a lost backup (default 0.5); "
        "doubles on each failure",
    )
    t.add_argument(
        "--retry-max",
        metavar="SEC",
        type=_positive(float, "seconds"),
        default=30.0,
        help="longest delay between reconnection attempts (default 30)",
    )
    t.add_argument(
        "--precopy-rounds",
        metavar="N",
        type=_positive(int, "rounds"),
        default=5,
        help="at most N live pre-copy rounds in the initial copy before the final "
        "paused round (default 5)",
    )
    t.add_argument(
        "--precopy-threshold",
        metavar="PAGES",
        type=_positive(int, "pages"),
        default=256,
        help="stop pre-copying once a round has fewer dirty pages (default 256)",
    )
    t.add_argument(
        "--no-prescan",
        dest="prescan",
        action="store_false",
        help="read the dirty log only while the guest is paused (TOML: prescan = "
        "false). By default it is also read just before each pause, which "
        "shortens the pause (1,000 scattered dirty pages: 2.1 -> 1.3 ms in the "
        "simulator) for more dom0 CPU, most on guests that write without pause",
    )
    t.add_argument(
        "--wire-compression",
        metavar="MODE",
        type=parse_wire_mode,
        default=DEFAULT_WIRE,
        help="second-stage compression of the stream on the network (TOML: "
        f'wire-compression = "MODE"): {WIRE_MODES_HELP}. zstd and lz4 compress every '
        "send; auto (default, zstd level 1) negotiates the codec and compresses only "
        "while TCP says the network, not the receiver, was what held the data back "
        "for a quarter of the last second, and stops once the raw stream would need "
        "less than a tenth (remusd/wire.py). A receiver that does not take it gets "
        "the raw stream; a file target is always the raw legacy stream. Costs sender "
        "and receiver CPU; pays on links slower than ~1 Gbit/s (docs/performance.md, "
        '"A thin link")',
    )
    t.add_argument(
        "--buffer-pages",
        metavar="N",
        type=_positive(int, "pages"),
        default=DEFAULT_BUFFER_PAGES,
        help=f"sender page buffer per COMPRESSED_DATA chunk (default "
        f"{DEFAULT_BUFFER_PAGES}, as Xen)",
    )
    t.add_argument(
        "--cache-pages",
        metavar="N",
        type=_positive(int, "pages"),
        default=DEFAULT_CACHE_PAGES,
        help=f"page cache of the compressing codecs (default {DEFAULT_CACHE_PAGES})",
    )
    t.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where remusd keeps one lock and one record per protected domain, so a "
        "domain has one owner and a restarted remusd finds what a dead one protected "
        f"(default {DEFAULT_STATE_DIR}; with --sim-dir, SIM_DIR/remusd); a tmpfs",
    )
    t.add_argument(
        "--keep-stopped",
        metavar="SEC",
        type=_positive(float, "seconds"),
        default=DEFAULT_KEEP_STOPPED,
        help="drop a stopped protection from the status this long after it stopped "
        f"(default {DEFAULT_KEEP_STOPPED:g}); protecting the domain again replaces it at once",
    )
    tls.add_arguments(p, role="sender")
    witness.add_witness_flags(p)
    return p


def validate(args: argparse.Namespace) -> list[ProtectRequest]:
    """Check cross-option rules; the start-up protect requests."""
    check_interval(args.interval)
    check_codec(args.codec)
    if not getattr(args, "state_dir", None):
        sim = getattr(args, "sim_dir", None)
        args.state_dir = os.path.join(sim, "remusd") if sim else DEFAULT_STATE_DIR
    if args.retry_max < args.retry_min:
        raise ConfigError(f"retry-max ({args.retry_max}) is below retry-min ({args.retry_min})")
    return [ProtectRequest.parse_spec(s, args) for s in args.protect]
