"""The ledger guest on a running simulated host: invariants, output buffering, ledger-check."""

from __future__ import annotations

import os
import time

import numpy as np

from xenbind import PAGE_SIZE
from xenbind.sim import postmortem


def _lines(host, dom) -> list[str]:
    return postmortem.outputs(host.dir, dom.domid).decode().splitlines()


def _check(host, dom, acked=None):
    return postmortem.ledger_check(host.dir, dom.domid, acked)


def test_invariants_hold_under_a_pause_unpause_storm(sim_host):
    dom = sim_host.create("16M", "ledger", seed=5, rate=20000)
    checks = 0
    for i in range(300):
        dom.pause()
        if i % 30 == 0:
            problems, summary = _check(sim_host, dom)
            assert problems == [], problems
            assert summary["transactions"] == dom.step
            checks += 1
        dom.unpause()
        time.sleep(0.002 if i % 3 == 0 else 0.0002)
    dom.wait_step(dom.step + 100)  # it still runs after the storm
    dom.pause()
    acked = os.path.join(sim_host.dir, "acked.txt")
    with open(acked, "wb") as f:
        f.write(postmortem.outputs(sim_host.dir, dom.domid))
    problems, summary = _check(sim_host, dom, acked)
    assert problems == [] and summary["acknowledged"] == dom.step == summary["transactions"]
    assert checks == 10


def test_outputs_are_withheld_until_released(sim_host):
    dom = sim_host.create("16M", "ledger", seed=2, rate=5000, paused=True)
    _run(dom, 10)
    assert len(_lines(sim_host, dom)) == 10, "unprotected: released at once"
    dom.output_barrier()  # checkpoint 1 (while paused): plugs the buffer
    _run(dom, 25)
    assert len(_lines(sim_host, dom)) == 10, "plugged output reached the outside world"
    assert dom.status()["outputs_buffered"] == 25
    dom.output_barrier()  # checkpoint 2
    _run(dom, 5)
    dom.output_release()  # ack of checkpoint 1: nothing was produced before it
    assert len(_lines(sim_host, dom)) == 10
    dom.output_release()  # ack of checkpoint 2: the 25 of epoch 2
    lines = _lines(sim_host, dom)
    assert len(lines) == 35 and lines[-1].startswith("ack 34 ")
    dom.output_release()  # no barrier left: the last 5 stay
    assert len(_lines(sim_host, dom)) == 35
    dom.output_unplug()
    assert len(_lines(sim_host, dom)) == 40
    _run(dom, 3)
    assert len(_lines(sim_host, dom)) == 43, "unplugged again: released at once"
    assert [int(line.split()[1]) for line in _lines(sim_host, dom)] == list(range(43))


def _run(dom, n):
    target = dom.step + n
    dom.stop_at(target)
    dom.unpause()
    dom.wait_step(target)
    dom.pause()
    dom.stop_at(None)


def test_buffered_output_dies_with_the_host(sim_host):
    dom = sim_host.create("16M", "ledger", seed=3, rate=5000, paused=True)
    _run(dom, 20)
    dom.output_barrier()
    _run(dom, 30)
    sim_host.kill()
    lines = postmortem.outputs(sim_host.dir, dom.domid).decode().splitlines()
    assert len(lines) == 20
    problems, summary = _check(sim_host, dom)
    assert problems == [] and summary["transactions"] == 50


def test_ledger_check_cli_detects_corruption(sim_host):
    dom = sim_host.create("16M", "ledger", seed=4, rate=5000)
    time.sleep(0.1)
    sim_host.cli("pause", dom.name)
    out = sim_host.cli("ledger-check", dom.name)
    assert "OK" in out.stdout
    acked = os.path.join(sim_host.dir, "acked.txt")
    with open(acked, "w") as f:
        f.write(sim_host.cli("outputs", str(dom.domid)).stdout)
        f.write("ack 999999 1 2 3\n")  # acknowledged, never logged
    r = sim_host.cli("ledger-check", str(dom.domid), "--acked", acked, check=False)
    assert r.returncode == 1 and "acknowledged transaction 999999 is missing" in r.stderr
    # corrupt the total: give account 0 one unit out of nowhere, in the memory file
    mem = os.path.join(sim_host.dir, f"dom-{dom.domid}.mem")
    with open(mem, "r+b") as f:
        f.seek(PAGE_SIZE)
        bal = np.frombuffer(f.read(8), dtype="<i8")[0]
        f.seek(PAGE_SIZE)
        f.write(np.array([bal + 1], dtype="<i8").tobytes())
    r = sim_host.cli("ledger-check", str(dom.domid), check=False)
    assert r.returncode == 1 and "total broken" in r.stderr and "FAILED" in r.stderr


def test_ledger_check_of_a_running_guest_takes_a_still_view(sim_host):
    # a guest writing 20,000 transactions a second: a check that read balances
    # and log while they moved reported FAILED, or died of a BufferError
    dom = sim_host.create("16M", "ledger", seed=8, rate=20000)
    dom.wait_step(200)
    for _ in range(5):
        r = sim_host.cli("ledger-check", dom.name, check=False)
        assert r.returncode == 0 and "OK" in r.stdout, r.stderr
        assert "Traceback" not in r.stderr
    step = dom.step
    dom.wait_step(step + 100)  # the pause was undone: it still runs
    assert dom.info().extra["pause_count"] == 0


def test_backup_without_a_checkpoint_does_not_run(sim_host):
    from xenbind.types import DomainConfig

    cfg = DomainConfig(
        "b",
        "00000000-0000-0000-0000-000000000001",
        4096,
        1,
        True,
        {"workload": "ledger", "seed": 1, "rate": 1000},
    )
    dom = sim_host.hv.create_backup(cfg)
    assert dom.info().state == "paused"
    dom.unpause()
    time.sleep(0.05)
    info = dom.info()
    assert info.state == "shutdown" and info.extra["crashed"] and dom.step == 0
    with open(os.path.join(sim_host.dir, f"dom-{dom.domid}.mem"), "rb") as f:
        assert not any(f.read()), "a backup without a checkpoint wrote to its memory"


def test_backup_accepts_context_before_memory(sim_host):
    """The receiver may set the context before or after writing the pages."""
    from xenbind.types import DomainConfig

    primary = sim_host.create("16M", "ledger", seed=8, rate=5000, paused=True)
    _run(primary, 200)
    info = primary.info()
    cfg = DomainConfig("bk", info.uuid, info.pages, 1, True, dict(info.extra))
    backup = sim_host.hv.create_backup(cfg)
    pfns = np.arange(info.pages, dtype=np.uint64)
    pages = np.empty((info.pages, PAGE_SIZE), np.uint8)
    primary.gather(pfns, pages)
    backup.set_context(primary.get_context())
    backup.scatter(pfns, pages)
    _run(backup, 100)
    _run(primary, 100)
    assert backup.info().state == "paused" and not backup.info().extra.get("crashed")
    assert backup.digest() == primary.digest()
    assert _check(sim_host, backup)[0] == []
