"""remusd's Prometheus metrics, built at each scrape from the daemon's status.

``remusd --metrics ADDRESS`` serves them (daemonkit.metrics.Exporter); this
module is the collector: at each scrape it reads every protector's status
(and the latency Histograms its remusd.stats.DomainStats holds) and turns
them into metric families. No counter is kept here: nothing can drift from
``remusctl status``. Per domain (label ``domain``, the domain's name):

    remusd_checkpoints_total                counter  checkpoints acknowledged, all sessions
    remusd_sent_bytes_total                 counter  stream bytes sent
    remusd_retries_total                    counter  reconnection attempts
    remusd_failovers_seen_total             counter  times the receiver said its backup took over
    remusd_pause_seconds                    histogram  the guest's pause per checkpoint
    remusd_ack_seconds                      histogram  checkpoint sent -> acknowledged
    remusd_dirty_pages                      histogram  pages copied per checkpoint
    remusd_compression_ratio                gauge    page bytes / stream bytes (Format B)
    remusd_wire_ratio                       gauge    stream bytes / wire bytes, this session
    remusd_wire_compressing                 gauge    1 while sends are wire-compressed
    remusd_last_ack_age_seconds             gauge    since the last acknowledgement
    remusd_checkpoint_rate                  gauge    checkpoints acknowledged per second (10 s)
    remusd_failover_timeout_seconds         gauge    the receiver's, from the ACCEPT
    remusd_peer_certificate_expiry_timestamp_seconds  gauge  the receiver's certificate (TLS)
    remusd_domain_state{state}              gauge    1 for the domain's state, 0 for the others
    remusd_domain_case{case}                gauge    1 for the domain's case, 0 for the others

and for the daemon: ``remusd_orphans_found_total``, ``remusd_owner_refusals_total``,
``remusd_domains``, ``remusd_certificate_expiry_timestamp_seconds`` (its own
TLS certificate, read at start). Rules: names as daemonkit.metrics says (base units,
``_total`` on counters; promtool passes); a gauge whose value is unknown
(no ACK yet, no TLS) is left out for that domain rather than exported as 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from daemonkit.metrics import histogram_family

from .policy import Case, State

if TYPE_CHECKING:
    from .control import Daemon

L = ["domain"]


def collect(daemon: Daemon) -> Iterable[Metric]:
    """The metric families of ``daemon`` now (see the module docstring)."""
    views = [p.metrics_view() for p in daemon.protectors_now()]
    doms: list[tuple[str, dict[str, Any]]] = [(st["name"], st) for st, _ in views]

    def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
        fam = CounterMetricFamily(name, doc, labels=L)
        for n, st in doms:
            fam.add_metric([n], float(st[key]))
        return fam

    def gauge(name: str, doc: str, key: str, scale: float = 1.0) -> GaugeMetricFamily:
        fam = GaugeMetricFamily(name, doc, labels=L)
        for n, st in doms:
            if st.get(key) is not None:
                fam.add_metric([n], float(st[key]) * scale)
        return fam

    yield counter(
        "remusd_checkpoints", "Checkpoints acknowledged by the backup, all sessions", "checkpoints"
    )
    yield counter(
        "remusd_sent_bytes", "Stream bytes sent to the backup, all sessions", "bytes_sent"
    )
    yield counter("remusd_retries", "Reconnection attempts after losing the backup", "retries")
    yield counter(
        "remusd_failovers_seen",
        "Times the receiver said its backup took over the domain",
        "failovers_seen",
    )
    yield histogram_family(
        "remusd_pause_seconds",
        "The guest's pause per checkpoint",
        L,
        [([st["name"]], s.pause_hist) for st, s in views],
    )
    yield histogram_family(
        "remusd_ack_seconds",
        "Checkpoint sent to acknowledged by the backup",
        L,
        [([st["name"]], s.ack_hist) for st, s in views],
    )
    yield histogram_family(
        "remusd_dirty_pages",
        "Pages copied per checkpoint",
        L,
        [([st["name"]], s.dirty_hist) for st, s in views],
    )
    yield gauge(
        "remusd_compression_ratio",
        "Page bytes per stream byte over the compressed checkpoints",
        "compression_ratio",
    )
    wire_ratio = GaugeMetricFamily(
        "remusd_wire_ratio",
        "Stream bytes per byte on the wire in the current session (wire compression)",
        labels=L,
    )
    wire_on = GaugeMetricFamily(
        "remusd_wire_compressing",
        "1 while the session compresses what it sends (auto: the network is the limit)",
        labels=L,
    )
    for n, st in doms:
        w = st.get("wire")
        if w:
            wire_ratio.add_metric([n], float(w["ratio"]))
            wire_on.add_metric([n], 1.0 if w["compressing"] else 0.0)
    yield wire_ratio
    yield wire_on
    yield gauge(
        "remusd_last_ack_age_seconds", "Seconds since the last acknowledgement", "last_ack_age_s"
    )
    yield gauge(
        "remusd_checkpoint_rate",
        "Checkpoints acknowledged per second over the last 10 s",
        "checkpoint_rate",
    )
    yield gauge(
        "remusd_failover_timeout_seconds",
        "The receiver's failover timeout for this session",
        "failover_timeout_ms",
        1e-3,
    )
    yield gauge(
        "remusd_peer_certificate_expiry_timestamp_seconds",
        "When the receiver's certificate expires (unix time)",
        "peer_not_after",
    )
    state = GaugeMetricFamily(
        "remusd_domain_state", "1 for the domain's state, 0 for the others", labels=[*L, "state"]
    )
    case = GaugeMetricFamily(
        "remusd_domain_case",
        "1 for the domain's case (what an operator is looking at), 0 for the others",
        labels=[*L, "case"],
    )
    for n, st in doms:
        for s in State:
            state.add_metric([n, s.value], 1.0 if st["state"] == s.value else 0.0)
        for c in Case:
            case.add_metric([n, c.value], 1.0 if st["case"] == c.value else 0.0)
    yield state
    yield case
    yield CounterMetricFamily(
        "remusd_orphans_found",
        "Protections adopted at start-up from a remusd that died",
        value=float(daemon.orphans_found),
    )
    yield CounterMetricFamily(
        "remusd_owner_refusals",
        "Protects refused because another process owns the domain",
        value=float(daemon.owner_refusals),
    )
    yield GaugeMetricFamily("remusd_domains", "Domains in the status", value=float(len(doms)))
    if daemon.cert_not_after is not None:
        yield GaugeMetricFamily(
            "remusd_certificate_expiry_timestamp_seconds",
            "When this remusd's own TLS certificate expires (unix time, read at start)",
            value=float(daemon.cert_not_after),
        )
