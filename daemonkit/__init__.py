"""daemonkit: the plumbing both daemons share that does not speak Xen.

Modules (one job each):
    config     command-line flags, a TOML file over them, the flags both daemons have
    logs       logging to stderr, journald priorities under systemd
    systemd    sd_notify and the watchdog
    control    the control socket (JSON lines, SO_PEERCRED) and its client
    transport  the replication link's byte pipe: plain TCP or TLS
    tls        TLS 1.3 with mutual authentication, certificate reloads, peer names
    pki        a small CA with the openssl command (the demo's throwaway CA)
    metrics    the Prometheus endpoint and latency histograms
    witness    the etcd witness: a lease-held owner key per domain (docs/witness.md)

daemonkit imports only ``xenbind.errors`` of the project (the exception
types), never remusd or receiver; xenbind never imports daemonkit.
"""
