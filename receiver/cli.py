"""remus-receiver: the backup daemon's entry point.

    remus-receiver --listen HOST:PORT [--config FILE] [--control PATH]
                   [--sim-dir DIR] [--insecure] [options; see --help]

Start-up, in order (each step fails fast with one clear line and exit status):
    configuration (flags over /etc/remus/receiver.toml)        exit 2 on error
    the transport: TLS (cert, key, CA loaded now; allow-peer
      required) or, with --insecure, plaintext; neither given:
      the daemon refuses to start rather than listen on an
      unauthenticated link                                     exit 2
    the hypervisor: --sim-dir DIR, or Xen (off a dom0: the
      message names what is missing)                           exit 1
    file descriptors: the soft RLIMIT_NOFILE raised to the hard
      limit (pending connections each hold one; logged)
    listen (bound), the control socket (bound), metrics
      (--metrics: GET /metrics, receiver.metrics), the failover
      timer, the accept loop; then the log line "listening on
      HOST:PORT" (the real port when 0 was asked); then the
      control socket starts answering; READY=1 to systemd,
      watchdog pings
Readiness, either way it is looked at: once the "listening on" line is
written the control socket exists (a request waits, at most READY_WAIT_S,
for its answer), and a request that gets an answer finds the line already
written (a request that arrives earlier is held until then).
Runs until SIGTERM or SIGINT, then closes every session (ERROR shutdown) and
exits 0. Backups are left as they are on exit.
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
import threading

from daemonkit.control import ControlServer
from daemonkit.logs import setup_logging
from daemonkit.metrics import Exporter
from daemonkit.systemd import Watchdog, sd_notify
from daemonkit.tls import TlsServer, require_link_security
from xenbind.errors import ConfigError, RemusError
from xenbind.factory import open_hypervisor
from xenbind.session import HELLO_MAGIC

from .config import load_config
from .daemon import ReceiverDaemon
from .metrics import ReceiverCollector
from .server import Listener

log = logging.getLogger("receiver")

#: How long a control request that arrives during start-up waits for the
#: daemon to be ready before it is answered anyway.
READY_WAIT_S = 10.0


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every pending connection holds
    a descriptor (receiver.server), and a flood must hit max-pending, not
    EMFILE. Logged either way."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        log.info("file descriptors: limit %s", "unlimited" if soft < 0 else soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("file descriptors: cannot raise the limit from %d to %d: %s", soft, hard, e)
        return
    log.info("file descriptors: soft limit raised from %d to the hard limit %d", soft, hard)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"remus-receiver: {e}", file=sys.stderr)
        return 2
    try:
        setup_logging(cfg.log_level)
    except ConfigError as e:
        print(f"remus-receiver: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    # a stop asked for during start-up is honoured once the daemon is up
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        require_link_security(cfg.tls, cfg.insecure)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    tls_server: TlsServer | None = None
    if cfg.tls is not None:
        try:
            tls_server = TlsServer(cfg.tls, plaintext_magic=HELLO_MAGIC)
        except ConfigError as e:
            log.error("TLS: %s", e)
            return 2
    try:
        hv = open_hypervisor(cfg.sim_dir)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except RemusError as e:
        log.error("cannot open the hypervisor: %s", e)
        return 1
    except ImportError as e:  # a build without the Xen binding
        log.error(
            "cannot open the hypervisor: Xen support is not available in this build "
            "(%s); use --sim-dir DIR for the simulated host",
            e,
        )
        return 1
    raise_fd_limit()
    daemon = ReceiverDaemon(cfg, hv)
    daemon.tls = tls_server
    try:
        daemon.recover_disks()
    except (OSError, RemusError) as e:
        log.error("cannot recover the backup disks in %s: %s", cfg.disk_dir, e)
        return 1
    try:
        listener = Listener(daemon, cfg.host, cfg.port)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    daemon.listen_address = listener.address
    ready = threading.Event()

    def control_handler(req: dict):
        ready.wait(READY_WAIT_S)  # answers only once start-up is logged
        return daemon.control(req)

    try:
        control = ControlServer(cfg.control, control_handler, group=cfg.control_group).start()
    except ConfigError as e:
        log.error("%s", e)
        listener.close()
        return 2
    exporter: Exporter | None = None
    if cfg.metrics:
        try:
            exporter = Exporter(cfg.metrics, ReceiverCollector(daemon).collect)
        except ConfigError as e:
            log.error("%s", e)
            listener.close()
            control.close()
            return 2
        log.info("metrics on http://%s/metrics", exporter.address)
    daemon.start_monitor()
    listener.start()
    where = f"simulated host {cfg.sim_dir}" if cfg.sim_dir else "Xen"
    if tls_server is not None and cfg.tls is not None:
        mode = "TLS"
        log.info(
            "TLS: certificate %s, CA %s, senders allowed: %s",
            cfg.tls.cert,
            cfg.tls.ca,
            ", ".join(cfg.tls.allow_peers),
        )
    else:
        mode = "plaintext, --insecure"
    log.info(
        "listening on %s (%s) for replication sessions; backups on %s; control socket %s",
        listener.address,
        mode,
        where,
        cfg.control,
    )
    if tls_server is None:
        log.warning(
            "the replication link is plaintext (--insecure): use it only on a trusted network"
        )
    ready.set()

    watchdog = Watchdog(lambda: daemon.monitor_alive() and listener.alive()).start()
    sd_notify(f"READY=1\nSTATUS=listening on {listener.address}")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        sd_notify("STOPPING=1")
        watchdog.stop()
        daemon.shutdown()
        listener.close()
        control.close()
        if exporter is not None:
            exporter.close()
        hv.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
