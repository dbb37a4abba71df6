"""remus-receiver's command line and configuration file.

Every option is a flag and a key of the TOML file (``/etc/remus/receiver.toml``
by default; keys are the long flag names, e.g. ``failover-timeout = 900``).
Precedence: built-in defaults < the file < flags (``daemonkit.config``).

Policies (what the receiver does when a session ends badly) are options too;
their meaning is in ``receiver/daemon.py`` and docs/protocol.md ("The receiver's
policies").
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field

from daemonkit import tls, witness
from daemonkit.config import add_daemon_arguments, parse_args_with_config
from daemonkit.transport import parse_hostport
from daemonkit.witness import WitnessConfig
from xenbind.compress import MAX_CACHE_PAGES
from xenbind.errors import ConfigError

from .rename import check_suffix

DEFAULT_CONFIG = "/etc/remus/receiver.toml"
DEFAULT_CONTROL = "/run/remus/receiver.sock"
#: where the backups' disk images and their epoch buffers live (docs/disk.md)
DEFAULT_DISK_DIR = "/var/lib/remus/disks"
#: under --sim-dir when no --disk-dir is given
SIM_DISK_SUBDIR = "backup-disks"

#: The failover timeout when none is configured, derived per session from the
#: HELLO: FAILOVER_FACTOR x max(interval, sender heartbeat) + FAILOVER_MARGIN_MS,
#: at least FAILOVER_MIN_MS. 200 ms interval -> 900 ms; 100 ms -> 600 ms.
FAILOVER_FACTOR = 3
FAILOVER_MARGIN_MS = 300
FAILOVER_MIN_MS = 500

#: plaintext senders: loopback only unless --insecure-allow says otherwise
DEFAULT_INSECURE_ALLOW = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
#: plaintext senders: the largest guest they may make the receiver allocate
DEFAULT_INSECURE_MAX_MB = 1024
#: connections still in the TLS handshake or the HELLO, at once (receiver.server)
DEFAULT_MAX_PENDING = 256

DESCRIPTION = """\
remus-receiver: the backup side of Remus high availability.

Listens for replication sessions from remusd (one per protected domain),
creates each backup domain paused, applies the initial copy, then stages every
checkpoint and commits it (pages and vCPU context together) only when it
arrived whole, and acknowledges it. When no checkpoint and no heartbeat has
arrived for the failover timeout, the backup domain is resumed from the last
committed checkpoint: it becomes the live copy of the guest, and later
sessions for it are refused (fenced).
"""

EPILOG = """\
policies:
  --on-link-loss failover|wait   the primary's connection closed or went
                                 silent after a commit (default failover: once
                                 the failover timeout has passed since the
                                 last sign of life, unless the primary
                                 reconnects first)
  --on-violation wait|failover   the stream broke a rule (default wait: a
                                 corrupt stream is no proof the primary died;
                                 keep the backup paused at its last commit and
                                 wait for the primary to reconnect, or for an
                                 operator's `failover` on the control socket)
  --on-unprotect destroy|keep    a clean end (LAST_CHECKPOINT then close, as
                                 `remusctl unprotect` does): destroy the paused
                                 backup (default) or keep it paused

replication link security:
  TLS 1.3 with mutual authentication is the default: --tls-cert, --tls-key,
  --tls-ca and at least one --allow-peer (or the keys of the same names in the
  config file). A sender is refused during the TLS handshake, before any byte
  of its session is read, when its certificate is missing, expired, not from
  the CA, or carries none of the allowed names; the log says which. The files
  are re-read when they change (checked at each new connection). Plaintext
  needs --insecure. See docs/operations.md, "Certificates".

control socket: JSON lines, {"cmd": "status"} | {"cmd": "failover", "domain": NAME|UUID};
  only root, the daemon's user and --control-group members (SO_PEERCRED)

example:
  remus-receiver --listen 0.0.0.0:7788 --tls-cert /etc/remus/tls/backup.crt \\
      --tls-key /etc/remus/tls/backup.key --tls-ca /etc/remus/tls/ca.crt \\
      --allow-peer primary.example.org

exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 when the hypervisor
cannot be opened (e.g. not a dom0), 2 on a configuration error.
"""


@dataclass(frozen=True)
class ReceiverConfig:
    host: str
    port: int
    control: str
    sim_dir: str | None
    insecure: bool
    failover_timeout_ms: int  # 0: derived per session from the HELLO
    heartbeat_ms: int
    handshake_timeout: float
    stall_timeout: float
    max_sessions: int
    max_pages: int
    max_staged_bytes: int
    max_compressed: int
    max_context: int  # bytes: the HVM context record of a checkpoint's tail
    max_device_model: int  # bytes: the device-model record of a tail
    max_cache_pages: int  # the largest codec cache a session may ask for (HELLO, CODEC chunk)
    on_link_loss: str
    on_violation: str
    on_unprotect: str
    log_level: str
    config_file: str | None
    tls: tls.TlsSettings | None = None  # None: plaintext (insecure)
    control_group: str | None = None
    #: test/lab only (receiver.rename): create the backup as NAME+SUFFIX with a
    #: derived UUID so it can run beside its primary on one host; None: the
    #: primary's name and UUID (the default, and the only production setting)
    backup_rename: str | None = None
    #: plaintext (--insecure) only: the networks a sender may connect from
    insecure_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=lambda: DEFAULT_INSECURE_ALLOW
    )
    #: plaintext only: the largest guest a session may protect, bytes
    insecure_max_bytes: int = DEFAULT_INSECURE_MAX_MB << 20
    #: unauthenticated connections (TLS handshake or HELLO not complete) at once
    max_pending: int = DEFAULT_MAX_PENDING
    #: the backups' disk images, one directory per domain UUID (docs/disk.md)
    disk_dir: str = DEFAULT_DISK_DIR
    #: disk epoch records held in memory per session before they spill to a file
    disk_buffer_bytes: int = 64 << 20
    #: the largest disk epoch (one checkpoint's disk writes) a session may send
    max_disk_epoch_bytes: int = 1 << 30
    #: take the wire compression a HELLO offers (--wire-compression on)
    wire_compression: bool = True
    #: Prometheus metrics address (daemonkit.metrics), None: off
    metrics: str | None = None
    #: the witness (docs/witness.md): fail over only after winning the owner key;
    #: None: no split-brain protection
    witness: WitnessConfig | None = None

    def insecure_allowed(self, host: str) -> bool:
        """Whether a plaintext peer at ``host`` (an IP address) may connect."""
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.insecure_allow)

    def failover_timeout_for(self, interval_ms: int, sender_heartbeat_ms: int) -> int:
        if self.failover_timeout_ms:
            return self.failover_timeout_ms
        base = max(interval_ms, sender_heartbeat_ms)
        return max(FAILOVER_MIN_MS, FAILOVER_FACTOR * base + FAILOVER_MARGIN_MS)


# --- converters: every error names what is wrong in the operator's words ---------
# (argparse prints "argument --heartbeat: MESSAGE"; a TOML key gets the same
# MESSAGE through daemonkit.config)


def _number(text: str, unit: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        article = "an" if unit[0] in "aeiou" else "a"
        whole = "whole " if kind is int else ""
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {article} {whole}number of {unit}"
        ) from None


def _ranged(unit: str, kind: type[int] | type[float], lo: float, hi: float | None = None):
    """A converter for a number of ``unit`` from ``lo`` (0: zero allowed, else
    positive) up to ``hi``."""

    def conv(text: str) -> int | float:
        value = _number(text, unit, kind)
        if lo > 0 and value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not a positive number of {unit}")
        if value < lo:
            raise argparse.ArgumentTypeError(f"{text} is negative: give a number of {unit}, or 0")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"{text} {unit} is more than the most allowed, {hi}")
        return value

    conv.__name__ = unit.replace(" ", "_")  # argparse's fallback text names the unit, not us
    return conv


MAX_MS = 3_600_000  # the session protocol's cap on a time in ms (an hour)

_ms = _ranged("milliseconds", int, 1, MAX_MS)
_ms_or_zero = _ranged("milliseconds", int, 0, MAX_MS)
_seconds = _ranged("seconds", float, 1e-9, 86400)
_count = _ranged("sessions", int, 1, 1 << 16)
_connections = _ranged("connections", int, 1, 1 << 20)
_pages = _ranged("pages", int, 1, 1 << 28)
_mib = _ranged("MiB", int, 1, 1 << 30)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """ADDR or ADDR/PREFIX (``--insecure-allow``)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address or ADDRESS/PREFIX (e.g. 10.0.0.2 or 10.0.0.0/24)"
        ) from None


def _cache_pages(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= MAX_CACHE_PAGES:
        raise argparse.ArgumentTypeError(
            f"{value} pages is outside 1..{MAX_CACHE_PAGES} (the codec cache's own limit)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remus-receiver",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on for remusd sessions (port 0: any free port; the "
        "log line 'listening on HOST:PORT' and `status` name it)",
    )
    add_daemon_arguments(
        p,
        config=DEFAULT_CONFIG,
        control=DEFAULT_CONTROL,
        insecure_help="accept plaintext TCP sessions instead of TLS (unauthenticated: anyone "
        "who reaches the port can write into backups; a warning is logged at "
        "every session)",
    )
    p.add_argument(
        "--failover-timeout",
        metavar="MS",
        type=_ms_or_zero,
        default=0,
        help="fail over this long after the last checkpoint or heartbeat (default 0: "
        f"per session, {FAILOVER_FACTOR} x max(interval, heartbeat) + "
        f"{FAILOVER_MARGIN_MS} ms, at least {FAILOVER_MIN_MS} ms; 900 ms at the "
        "200 ms interval)",
    )
    p.add_argument(
        "--heartbeat",
        metavar="MS",
        type=_ms,
        default=100,
        help="send a heartbeat to the sender at least this often (default 100)",
    )
    p.add_argument(
        "--handshake-timeout",
        metavar="S",
        type=_seconds,
        default=10.0,
        help="drop a connection that sends no complete HELLO within S seconds (default 10)",
    )
    p.add_argument(
        "--stall-timeout",
        metavar="S",
        type=_seconds,
        default=30.0,
        help="drop a session whose initial copy makes no progress for S seconds "
        "(default 30; after the first commit the failover timeout rules)",
    )
    p.add_argument(
        "--max-sessions",
        metavar="N",
        type=_count,
        default=64,
        help="sessions open at once (default 64)",
    )
    p.add_argument(
        "--max-pages",
        metavar="N",
        type=_pages,
        default=1 << 24,
        help="largest domain accepted, in 4 KiB pages (default 16777216 = 64 GiB)",
    )
    p.add_argument(
        "--max-staged-mb",
        metavar="MB",
        type=_mib,
        default=1024,
        help="largest checkpoint staged per session, MiB (default 1024)",
    )
    p.add_argument(
        "--max-compressed-mb",
        metavar="MB",
        type=_mib,
        default=64,
        help="largest COMPRESSED_DATA chunk accepted, MiB (default 64)",
    )
    p.add_argument(
        "--max-context-mb",
        metavar="MB",
        type=_mib,
        default=16,
        help="largest HVM context record in a checkpoint's tail, MiB (default 16)",
    )
    p.add_argument(
        "--max-device-model-mb",
        metavar="MB",
        type=_mib,
        default=64,
        help="largest device-model record in a checkpoint's tail, MiB (default 64)",
    )
    p.add_argument(
        "--max-cache-pages",
        metavar="N",
        type=_cache_pages,
        default=MAX_CACHE_PAGES,
        help="largest codec page cache a session may ask for, in 4 KiB pages "
        f"(default and at most {MAX_CACHE_PAGES} = 1 GiB); a HELLO asking for "
        "more, or for a sender buffer whose COMPRESSED_DATA chunks could exceed "
        "--max-compressed-mb, is refused `limit` at the handshake",
    )
    p.add_argument(
        "--max-pending",
        metavar="N",
        type=_connections,
        default=DEFAULT_MAX_PENDING,
        help="connections still in the TLS handshake or sending their HELLO, at once "
        f"(default {DEFAULT_MAX_PENDING}); past it the oldest such connection from the "
        "address holding the most is dropped, so a flood cannot keep a real sender out. "
        "They cost no thread: one thread serves them all, and each is dropped when "
        "silent for 2 s (or --handshake-timeout, if shorter)",
    )
    p.add_argument(
        "--insecure-allow",
        metavar="ADDR[/PREFIX]",
        type=_network,
        action="append",
        default=None,
        help="with --insecure: accept plaintext senders from this address or network "
        "(repeatable; default 127.0.0.0/8 and ::1, loopback only); anyone else is "
        "closed at once with a refusal naming the option",
    )
    p.add_argument(
        "--insecure-max-mb",
        metavar="MB",
        type=_mib,
        default=DEFAULT_INSECURE_MAX_MB,
        help="with --insecure: the largest guest a plaintext session may protect, MiB "
        f"(default {DEFAULT_INSECURE_MAX_MB}); a larger one is refused `limit` before "
        "its backup is created (an unauthenticated HELLO must not allocate gigabytes)",
    )
    p.add_argument(
        "--disk-dir",
        metavar="DIR",
        default=None,
        help="where the backups' disk images live, one directory per domain UUID, "
        "each image kept in step with the primary's disk at every committed "
        f"checkpoint (default {DEFAULT_DISK_DIR}; with --sim-dir, "
        f"SIM_DIR/{SIM_DISK_SUBDIR}). An image left by an earlier session is "
        "reused: only the blocks whose hashes differ are copied again",
    )
    p.add_argument(
        "--disk-buffer-mb",
        metavar="MB",
        type=_mib,
        default=64,
        help="disk writes of a session's uncommitted epochs held in memory, MiB "
        "(default 64); past it they spill to a staging file in the disk directory",
    )
    p.add_argument(
        "--max-disk-epoch-mb",
        metavar="MB",
        type=_mib,
        default=1024,
        help="largest disk epoch (the writes of one checkpoint interval) a session may "
        "send, MiB (default 1024); the sender knows it and checkpoints early, a "
        "larger epoch ends the session",
    )
    p.add_argument(
        "--wire-compression",
        choices=("on", "off"),
        default="on",
        help="take the second-stage compression a sender offers for its stream "
        '(zstd or lz4 over the legacy stream, docs/protocol.md "Wire compression"; '
        "default on). With off every ACCEPT picks none and senders send the raw "
        "stream: the backup's CPU spent decompressing is saved, the link carries more",
    )
    p.add_argument(
        "--on-link-loss",
        choices=("failover", "wait"),
        default="failover",
        help="after a commit, the link closed or went silent (default failover)",
    )
    p.add_argument(
        "--on-violation",
        choices=("wait", "failover"),
        default="wait",
        help="after a commit, the stream broke a rule (default wait)",
    )
    p.add_argument(
        "--on-unprotect",
        choices=("destroy", "keep"),
        default="destroy",
        help="a clean end of protection: the paused backup is destroyed or kept (default destroy)",
    )
    p.add_argument(
        "--backup-rename",
        metavar="SUFFIX",
        default=None,
        help="TEST/LAB ONLY: create each backup domain as NAME+SUFFIX with a UUID "
        "derived from the primary's (uuid5), so primary and backup can share "
        "one host (the Xen lab's single dom0). Sessions and the failover "
        "fence stay keyed on the primary's UUID. Never set this in "
        "production: after a failover the guest runs under another name and "
        "UUID (default: off)",
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log verbosity (default info)",
    )
    tls.add_arguments(p, role="receiver")
    witness.add_witness_flags(p)
    return p


def load_config(argv: list[str] | None = None) -> ReceiverConfig:
    parser = build_parser()
    args = parse_args_with_config(parser, argv, default_config=DEFAULT_CONFIG, tables=("witness",))
    wcfg = witness.load_witness_config(args.config, args)
    if not args.listen:
        raise ConfigError("--listen HOST:PORT is required (flag or `listen` in the config file)")
    host, port = parse_hostport(args.listen, what="--listen")
    if args.insecure_allow and not args.insecure:
        raise ConfigError(
            "insecure-allow only applies to plaintext sessions (--insecure); with TLS "
            "the senders are chosen by --allow-peer"
        )
    return ReceiverConfig(
        host=host,
        port=port,
        control=args.control,
        sim_dir=args.sim_dir,
        insecure=args.insecure,
        failover_timeout_ms=args.failover_timeout,
        heartbeat_ms=args.heartbeat,
        handshake_timeout=args.handshake_timeout,
        stall_timeout=args.stall_timeout,
        max_sessions=args.max_sessions,
        max_pages=args.max_pages,
        max_staged_bytes=args.max_staged_mb << 20,
        max_compressed=args.max_compressed_mb << 20,
        max_context=args.max_context_mb << 20,
        max_device_model=args.max_device_model_mb << 20,
        max_cache_pages=args.max_cache_pages,
        on_link_loss=args.on_link_loss,
        on_violation=args.on_violation,
        on_unprotect=args.on_unprotect,
        log_level=args.log_level,
        config_file=args.config,
        tls=tls.settings_from_args(args, role="receiver"),
        control_group=args.control_group,
        backup_rename=check_suffix(args.backup_rename) if args.backup_rename else None,
        insecure_allow=tuple(args.insecure_allow or DEFAULT_INSECURE_ALLOW),
        insecure_max_bytes=args.insecure_max_mb << 20,
        max_pending=args.max_pending,
        disk_dir=args.disk_dir
        or (os.path.join(args.sim_dir, SIM_DISK_SUBDIR) if args.sim_dir else DEFAULT_DISK_DIR),
        disk_buffer_bytes=args.disk_buffer_mb << 20,
        max_disk_epoch_bytes=args.max_disk_epoch_mb << 20,
        wire_compression=args.wire_compression == "on",
        metrics=args.metrics,
        witness=wcfg,
    )
