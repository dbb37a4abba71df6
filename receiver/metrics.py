"""The receiver's Prometheus metrics, built at each scrape from its own state.

``ReceiverCollector(daemon).collect()`` is given to ``daemonkit.metrics.Exporter``
(``--metrics ADDRESS``). Nothing is counted here: every value is read from
the daemon's registry (each Protection's figures, its commit-latency
``Histogram``), its failover counts and the listener's pending connections,
so the metrics cannot drift from ``status``.

Per domain (labels ``domain``, ``uuid``; one series per protected domain the
receiver holds, as ``status`` lists them):

    remus_receiver_checkpoints_committed_total   counter: checkpoints committed (the
                                                 initial copy included), this protection
    remus_receiver_received_bytes_total          counter: stream bytes received
    remus_receiver_commit_seconds                histogram: time of each commit
                                                 (pages + context, verify digest included)
    remus_receiver_checkpoint_pages              gauge: pages of the last checkpoint
    remus_receiver_state                         gauge 0/1, label ``state``: one series
                                                 per state of receiver.policy
    remus_receiver_last_life_age_seconds         gauge: since the last sign of life
    remus_receiver_failover_timeout_seconds      gauge: the timeout negotiated at HELLO
    remus_receiver_failovers_total               counter: failovers since the daemon started
    remus_receiver_peer_certificate_expiry_timestamp_seconds
                                                 gauge (TLS): the sender's certificate notAfter

Daemon-wide:

    remus_receiver_pending_connections           gauge: in the TLS handshake or before HELLO
    remus_receiver_pending_dropped_total         counter: pending connections dropped
                                                 (silent too long, or evicted for room)
    remus_receiver_tls_refused_total             counter: refused by the TLS handshake or
                                                 the name check
    remus_receiver_insecure_refused_total        counter: plaintext peers outside
                                                 insecure-allow
    remus_receiver_sessions_open                 gauge: sessions with an open connection
    remus_receiver_certificate_expiry_timestamp_seconds
                                                 gauge (TLS): this receiver's certificate

Rules kept here:
- A scrape takes the daemon's registry lock only to copy the list of
  Protections, never a Protection's lock (a long commit does not delay it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from daemonkit.metrics import histogram_family

from . import policy

if TYPE_CHECKING:
    from .daemon import ReceiverDaemon

P = "remus_receiver_"
LABELS = ("domain", "uuid")


class ReceiverCollector:
    def __init__(self, daemon: ReceiverDaemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterable[Metric]:
        d = self.daemon
        with d.lock:
            prots = sorted(d.protections.values(), key=lambda p: p.name)
            failovers = dict(d.failovers)
        now = time.monotonic()
        committed = CounterMetricFamily(
            P + "checkpoints_committed",
            "Checkpoints committed into the backup, the initial copy included",
            labels=LABELS,
        )
        received = CounterMetricFamily(
            P + "received_bytes",
            "Bytes received from the primary on the wire (the stream, or its wire-compressed segments)",
            labels=LABELS,
        )
        stream = CounterMetricFamily(
            P + "stream_bytes",
            "Stream bytes received from the primary, after wire decompression when the session uses it",
            labels=LABELS,
        )
        pages = GaugeMetricFamily(
            P + "checkpoint_pages", "Pages written by the last committed checkpoint", labels=LABELS
        )
        state = GaugeMetricFamily(
            P + "state",
            "1 for the state the domain's protection is in, 0 for the others",
            labels=(*LABELS, "state"),
        )
        life = GaugeMetricFamily(
            P + "last_life_age_seconds",
            "Seconds since the primary's last sign of life (any byte, a chunk, a heartbeat)",
            labels=LABELS,
        )
        timeout = GaugeMetricFamily(
            P + "failover_timeout_seconds",
            "The failover timeout negotiated for the session at HELLO",
            labels=LABELS,
        )
        peer_expiry = GaugeMetricFamily(
            P + "peer_certificate_expiry_timestamp_seconds",
            "When the sender's TLS certificate expires (unix time)",
            labels=LABELS,
        )
        fo = CounterMetricFamily(
            P + "failovers", "Failovers of the domain since the receiver started", labels=LABELS
        )
        hists = []
        for p in prots:
            lv = [p.name, p.uuid]
            committed.add_metric(lv, p.checkpoints)
            received.add_metric(lv, p.bytes_in)
            stream.add_metric(lv, p.bytes_in if p.wire is None else p.wire.raw_bytes)
            pages.add_metric(lv, p.last_checkpoint_pages)
            for s in policy.STATES:
                state.add_metric([*lv, s], 1.0 if p.state == s else 0.0)
            life.add_metric(lv, max(0.0, now - p.last_life))
            timeout.add_metric(lv, p.failover_timeout)
            if p.peer_cert_not_after is not None:
                peer_expiry.add_metric(lv, p.peer_cert_not_after)
            hists.append((lv, p.commit_seconds))
        for (name, uuid), n in sorted(failovers.items()):
            fo.add_metric([name, uuid], n)
        yield from (committed, received, stream, pages, state, life, timeout, peer_expiry, fo)
        yield histogram_family(
            P + "commit_seconds", "Time to commit one checkpoint into the backup", LABELS, hists
        )
        yield GaugeMetricFamily(
            P + "pending_connections",
            "Connections in the TLS handshake or not yet through their HELLO",
            value=d.pending_connections(),
        )
        yield CounterMetricFamily(
            P + "pending_dropped",
            "Pending connections dropped: silent too long, or evicted past max-pending",
            value=d.pending_dropped,
        )
        yield CounterMetricFamily(
            P + "tls_refused",
            "Connections refused by the TLS handshake or the certificate name check",
            value=d.tls_refused,
        )
        yield CounterMetricFamily(
            P + "insecure_refused",
            "Plaintext connections refused: address outside insecure-allow",
            value=d.insecure_refused,
        )
        yield GaugeMetricFamily(
            P + "sessions_open",
            "Sessions with an open connection",
            value=sum(1 for p in prots if p.connection is not None),
        )
        expiry = d.certificate_not_after()
        own = GaugeMetricFamily(
            P + "certificate_expiry_timestamp_seconds",
            "When this receiver's own TLS certificate expires (unix time)",
        )
        if expiry is not None:
            own.add_metric([], expiry)
        yield own
