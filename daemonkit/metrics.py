"""Prometheus metrics for a daemon: an HTTP endpoint and latency histograms.

    --metrics ADDRESS   (TOML ``metrics``) where to serve ``GET /metrics``:
                        ``PORT`` (on 127.0.0.1), ``HOST:PORT`` or ``[V6]:PORT``;
                        port 0 takes a free one (the log says which).
                        Off unless set.

``Exporter(address, collect)`` serves, with ``prometheus-client``, whatever
``collect()`` returns at each scrape: the daemon builds its metric families
from its own status at that moment (a ``prometheus_client.Collector``), so no
second copy of its counters is kept here and nothing can drift.

``Histogram`` is the one piece of state a scrape cannot rebuild from a
status: a distribution of latencies (pause, ack), observed where they happen
and exported as a Prometheus histogram with sub-millisecond buckets
(``BUCKETS``). It is plain data: the daemon cores hold it without knowing of
Prometheus.

Rules:
- Names follow Prometheus conventions: a unit suffix (``_seconds``,
  ``_bytes``), ``_total`` on counters (prometheus-client adds it), base units
  (seconds, not milliseconds); ``promtool check metrics`` passes on a scrape
  (tests/daemonkit/test_metrics.py).
- A scrape never waits on I/O of the daemon: ``collect()`` reads status under
  the daemon's own short locks only.
- ``Histogram.observe`` and a scrape may run in different threads: the counts
  and the sum change together under one lock held for no I/O.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from xenbind.errors import ConfigError

#: Upper bounds (seconds) of the latency buckets: 100 us to 10 s, finest
#: below a millisecond, where a checkpoint's pause lives.
BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

DEFAULT_HOST = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ConfigError if not."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = DEFAULT_HOST, text
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(
            f"metrics address {text!r}: expected PORT, HOST:PORT or [V6]:PORT "
            "with a port from 0 (any free one) to 65535"
        )
    return host, int(port)


class Histogram:
    """A latency distribution over ``BUCKETS`` (seconds)."""

    def __init__(self, buckets: Sequence[float] = BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """(cumulative buckets as (le, count) with +Inf last, sum)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out: list[tuple[str, float]] = []
        acc = 0
        for le, n in zip((*map(repr, self.buckets), "+Inf"), counts, strict=True):
            acc += n
            out.append((le, float(acc)))
        return out, total

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)


def histogram_family(
    name: str, doc: str, labels: Sequence[str], series: Iterable[tuple[Sequence[str], Histogram]]
) -> HistogramMetricFamily:
    """One Prometheus histogram family with a series per label values."""
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    for values, hist in series:
        buckets, total = hist.snapshot()
        fam.add_metric(list(values), buckets, total)
    return fam


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())


class Exporter:
    """``GET /metrics`` on ``address``, answered from ``collect()`` at each scrape."""

    def __init__(self, address: str, collect: Callable[[], Iterable[Metric]]) -> None:
        host, port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Callback(collect))
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {address}: {e.strerror or e}") from None
        self._server: WSGIServer = server
        self._thread = thread
        bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
        #: where it listens, as HOST:PORT (the port chosen when 0 was asked)
        self.address = (
            f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
