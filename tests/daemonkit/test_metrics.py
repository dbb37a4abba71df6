"""daemonkit.metrics: the exporter serves what the daemon's collect() builds,
histograms are cumulative with sub-millisecond buckets, and Prometheus's own
``promtool check metrics`` accepts a scrape."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from daemonkit.metrics import BUCKETS, Exporter, Histogram, histogram_family, parse_address
from xenbind.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def promtool() -> str:
    """Debian's promtool: on PATH, or unpacked by scripts/install-system-deps."""
    found = shutil.which("promtool")
    if found:
        return found
    unpacked = REPO / ".cache" / "prometheus" / "usr" / "bin" / "promtool"
    if unpacked.exists():
        return str(unpacked)
    pytest.fail("promtool is missing: run scripts/install-system-deps (as root)")


def check_metrics(text: str) -> None:
    """``promtool check metrics`` must pass on ``text`` (it lints names, units, help)."""
    r = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, f"promtool: {r.stdout}{r.stderr}\n{text}"


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        return resp.read().decode()


@pytest.mark.parametrize(
    "text, want",
    [
        ("9466", ("127.0.0.1", 9466)),
        ("0.0.0.0:9466", ("0.0.0.0", 9466)),
        ("[::1]:9466", ("::1", 9466)),
        (":9466", ("127.0.0.1", 9466)),
    ],
)
def test_parse_address(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["", "host", "host:", "1:70000", "x:-1"])
def test_parse_address_refuses(text):
    with pytest.raises(ConfigError, match="metrics address"):
        parse_address(text)


def test_histogram_is_cumulative_with_sub_millisecond_buckets():
    h = Histogram()
    assert BUCKETS[0] <= 0.0001 and sum(b < 0.001 for b in BUCKETS) >= 3
    for s in (0.00005, 0.0003, 0.0003, 0.002, 20.0):
        h.observe(s)
    buckets, total = h.snapshot()
    d = dict(buckets)
    assert d[repr(0.0001)] == 1 and d[repr(0.0005)] == 3 and d[repr(0.0025)] == 4
    assert d[repr(10.0)] == 4 and d["+Inf"] == 5 == h.count
    assert [le for le, _ in buckets][-1] == "+Inf"
    assert total == pytest.approx(20.00265)


def test_exporter_serves_collect_and_promtool_accepts_it():
    pauses = Histogram()
    for s in (0.0004, 0.0009, 0.0012):
        pauses.observe(s)
    calls = []

    def collect():
        calls.append(1)
        c = CounterMetricFamily(
            "remus_test_checkpoints", "Checkpoints acknowledged.", labels=["domain"]
        )
        c.add_metric(["ledger"], 42)
        g = GaugeMetricFamily("remus_test_last_ack_age_seconds", "Age of the last ack.")
        g.add_metric([], 0.025)
        return [
            c,
            g,
            histogram_family(
                "remus_test_pause_seconds",
                "Guest pause per checkpoint.",
                ["domain"],
                [(["ledger"], pauses)],
            ),
        ]

    ex = Exporter("127.0.0.1:0", collect)
    try:
        text = scrape(ex.address)
    finally:
        ex.close()
    assert calls  # built at the scrape, from the daemon's state then
    assert 'remus_test_checkpoints_total{domain="ledger"} 42.0' in text
    assert 'remus_test_pause_seconds_bucket{domain="ledger",le="0.0005"} 1.0' in text
    assert 'remus_test_pause_seconds_bucket{domain="ledger",le="+Inf"} 3.0' in text
    assert "remus_test_last_ack_age_seconds 0.025" in text
    check_metrics(text)


def test_promtool_is_a_real_check():
    # the check above could pass vacuously if promtool accepted anything
    r = subprocess.run(
        [promtool(), "check", "metrics"],
        input="# HELP remus_bad_ms A latency in milliseconds.\n# TYPE remus_bad_ms counter\n"
        "remus_bad_ms 3\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "remus_bad_ms" in (r.stdout + r.stderr)


def test_exporter_on_a_taken_port_is_a_config_error():
    ex = Exporter("127.0.0.1:0", list)
    try:
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            Exporter(ex.address, list)
    finally:
        ex.close()
