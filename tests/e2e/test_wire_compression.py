"""Wire compression end to end (issue 16, "A thin link"): the real daemons
over TCP with the stream zstd- or lz4-compressed on the wire, every
checkpoint verified on the backup and a power cut failing over to exactly
the acknowledged state; auto on loopback; a receiver that declines it."""

from __future__ import annotations

import pytest

from .conftest import wait_until
from .test_failover import acked_outputs, ledger_check, power_cut

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.mark.parametrize("mode", ["zstd", "lz4"])
def test_compressed_stream_verifies_and_fails_over(hosts, daemons, workdir, mode):
    primary, backup = hosts
    primary.create("32M", "ledger", seed=21, rate=3000, name="ledger")
    primary.create("16M", "hotset", seed=22, rate=20000, name="hot")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary, "--wire-compression", mode)
    for name in ("ledger", "hot"):
        remusd.ctl("protect", name, "--to", rx.target, "--interval", "25", "--verify")
    for name in ("ledger", "hot"):
        remusd.wait(
            lambda d: d["state"] == "protected" and d["checkpoints"] >= 15,
            name,
            what="15 verified checkpoints",
        )
    for name in ("ledger", "hot"):
        w = remusd.domain(name)["wire"]
        assert w["codec"] == mode and w["compressing"] and w["mode"].startswith(mode)
        # the initial copy (mostly zero pages) and the deltas shrink well
        assert w["ratio"] > 3, w
        s = rx.session(name)
        assert s["wire"]["codec"] == mode and s["wire"]["compressed_segments"] > 0
        assert s["wire"]["stream_bytes"] > s["bytes"]  # more stream than wire bytes
        assert s["verified"] >= 15 and s["mismatches"] == 0, s
    seen = remusd.domain("ledger")["acked"]
    power_cut(primary, remusd)
    s = wait_until(
        "the backup to take over",
        lambda: (lambda s: s if s["state"] == "failed-over" else None)(rx.session("ledger")),
        20,
    )
    assert s["last_committed"] >= seen
    acked = workdir / "acked.txt"
    assert acked_outputs(primary, "ledger", acked) > 0
    ledger_check(backup, "ledger", acked)


def test_auto_is_the_default_and_negotiates_zstd(hosts, daemons):
    """The default mode offers zstd and sends under ``auto``'s rule: on
    loopback the network is never what holds the data back, so the segments
    stay raw; the backup's memory is verified at every checkpoint either way."""
    primary, backup = hosts
    primary.create("16M", "hotset", seed=23, rate=20000, name="hot")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary)
    remusd.ctl("protect", "hot", "--to", rx.target, "--interval", "25", "--verify")
    d = remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 15, "hot", what="checkpoints"
    )
    assert d["wire_compression"] == "auto:zstd:1"
    assert d["wire"]["mode"] == "auto:zstd:1" and d["wire"]["codec"] == "zstd"
    s = rx.session("hot")
    assert s["wire"]["codec"] == "zstd" and s["verified"] >= 15 and s["mismatches"] == 0


def test_a_receiver_that_declines_gets_the_raw_stream(hosts, daemons):
    primary, backup = hosts
    primary.create("16M", "ledger", seed=24, rate=3000, name="ledger")
    rx = daemons.receiver(backup, "--wire-compression", "off")
    remusd = daemons.remusd(primary, "--wire-compression", "zstd:3")
    remusd.ctl("protect", "ledger", "--to", rx.target, "--interval", "25", "--verify")
    d = remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 10, "ledger", what="checkpoints"
    )
    assert d["wire_compression"] == "zstd:3" and d["wire"] is None
    s = rx.session("ledger")
    assert s["wire"] is None and s["verified"] >= 10 and s["mismatches"] == 0
    assert "takes no wire compression" in remusd.log()
