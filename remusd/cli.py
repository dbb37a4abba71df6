"""``remusd``: the primary-host daemon (see ``remusd --help``).

Start-up order: configuration (defaults < TOML < flags), logging, the
hypervisor (off a dom0 without --sim-dir: exit 1 at once with the reason),
the control socket, the orphans a dead remusd left in the state directory
(adopted at once: their HELLO must reach the receiver within its failover
timeout, so nothing slow comes before), the start-up ``protect`` entries,
the metrics endpoint (--metrics), then READY=1 to systemd and watchdog pings. SIGTERM/SIGINT end every session cleanly (LAST_CHECKPOINT:
the backups do not fail over; the guests run on unprotected) and exit 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

from daemonkit import tls, witness
from daemonkit.config import parse_args_with_config
from daemonkit.control import ControlServer
from daemonkit.logs import setup_logging
from daemonkit.metrics import Exporter
from daemonkit.systemd import Watchdog, sd_notify
from xenbind.errors import ConfigError, RemusError
from xenbind.factory import open_hypervisor

from .config import DEFAULT_CONFIG, build_parser, validate
from .control import Daemon
from .metrics import collect
from .protector import Connector

log = logging.getLogger("remusd")

#: How often the main loop refreshes systemd's STATUS= line (seconds).
STATUS_EVERY = 2.0


#: Exit statuses (the same as remus-receiver's).
EXIT_HYPERVISOR = 1  # the hypervisor cannot be opened (not a dom0, no --sim-dir)
EXIT_CONFIG = 2  # bad configuration or command line (argparse uses 2 too)


def _fail(msg: str, status: int = EXIT_CONFIG) -> int:
    log.error("%s", msg)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args_with_config(
            parser, argv, default_config=DEFAULT_CONFIG, tables=("witness",)
        )
        setup_logging(args.log_level)
        # docs/witness.md: None means no witness (no split-brain protection)
        args.witness_config = witness.load_witness_config(args.config, args)
        startup = validate(args)
        tls_settings = tls.settings_from_args(args, role="sender")
        if any(r.target.kind == "tcp" for r in startup):
            tls.require_link_security(
                tls_settings, args.insecure, what="protect entries with a network target refused"
            )
        # how protectors connect
        connect: Connector | None = None  # file: targets only
        if tls_settings is not None:
            connect = tls.TlsClient(tls_settings).connect  # loads the files now
        elif args.insecure:
            connect = tls.plaintext_connect
    except ConfigError as e:
        setup_logging("info")
        return _fail(f"configuration: {e}")
    try:
        hv = open_hypervisor(args.sim_dir)
    except ImportError as e:
        return _fail(
            f"cannot use Xen: this build has no Xen support ({e}); "
            "use --sim-dir DIR for the simulator",
            EXIT_HYPERVISOR,
        )
    except RemusError as e:
        return _fail(f"cannot open the hypervisor: {e}", EXIT_HYPERVISOR)
    log.info(
        "remusd starting (%s hypervisor%s, control %s, config %s)",
        hv.kind,
        f" at {args.sim_dir}" if args.sim_dir else "",
        args.control,
        args.config or "none",
    )
    if tls_settings is not None:
        log.info(
            "replication link: TLS (certificate %s, CA %s; a receiver must be named %s)",
            tls_settings.cert,
            tls_settings.ca,
            " or ".join(tls_settings.allow_peers) or "as its target's HOST",
        )
    elif args.insecure:
        log.warning("replication link: plaintext (--insecure): use it only on a trusted network")
    else:
        log.info("no TLS files and no --insecure: only file: targets can be protected")

    wcfg = args.witness_config
    if wcfg is None:
        log.warning(
            "no witness configured ([witness]): this pair has NO split-brain protection "
            "(a partition of the replication link gives two running copies; docs/witness.md)"
        )
    else:
        log.info(
            "witness: etcd %s, prefix %s, ttl %d s: output is released only while the "
            "domain's owner key is held or the backup's promise holds",
            ", ".join(wcfg.endpoints),
            wcfg.prefix,
            wcfg.timings.ttl,
        )
    daemon = Daemon(hv, args, connect)
    if tls_settings is not None:
        try:  # read once here: a status or a scrape never runs openssl
            daemon.cert_not_after = tls.cert_not_after(tls_settings.cert)
        except ConfigError as e:
            log.warning("%s", e)
    try:
        server = ControlServer(args.control, daemon.handle, group=args.control_group).start()
    except ConfigError as e:
        return _fail(str(e))

    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("%s received: ending every session cleanly", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        adopted = daemon.adopt_orphans()
    except OSError as e:
        return _fail(f"state directory {args.state_dir}: {e}")
    if adopted:
        log.warning("%d orphan(s) of a dead remusd adopted (see remusctl status)", adopted)

    for req in startup:
        if daemon.is_protected(req.domain):
            log.info("protect entry %s: already protected (adopted at start-up)", req.domain)
            continue
        try:
            daemon.protect(req)
        except RemusError as e:
            log.error("cannot protect %s: %s", req.domain, e)

    exporter = None
    if args.metrics:
        try:
            exporter = Exporter(args.metrics, lambda: collect(daemon))
        except ConfigError as e:
            daemon.stop_all(timeout=args.ack_timeout + 10)
            server.close()
            return _fail(str(e))
        log.info("metrics at http://%s/metrics", exporter.address)

    beat = [time.monotonic()]
    watchdog = Watchdog(lambda: time.monotonic() - beat[0] < 4 * STATUS_EVERY + 10).start()
    sd_notify("READY=1\nSTATUS=running")
    log.info("remusd ready")
    try:
        while not stop.wait(STATUS_EVERY):
            beat[0] = time.monotonic()
            counts = daemon.counts()
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no domains"
            sd_notify(f"STATUS={summary}")
    finally:
        sd_notify("STOPPING=1")
        daemon.stop_all(timeout=args.ack_timeout + 10)
        watchdog.stop()
        if exporter is not None:
            exporter.close()
        server.close()
        hv.close()
    log.info("remusd stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
