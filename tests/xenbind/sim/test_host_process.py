"""The simulated host as a process: lifecycle, host death, the CLI."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.simhost import SimHost
from xenbind.errors import DomainError
from xenbind.factory import open_hypervisor


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is dead too (its parent, the host, died; init reaps it)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.02)
    return alive


def test_kill_9_of_the_host_kills_its_domains_and_post_mortem_works(sim_host):
    led = sim_host.create("16M", "ledger", seed=1, rate=3000, name="bank")
    sim_host.create("16M", "random", seed=2, rate=3000, name="noise")
    pids = sim_host.domain_pids()
    assert len(pids) == 2
    time.sleep(0.1)
    sim_host.kill()
    assert _wait_gone(pids) == [], "domain processes outlived their host"
    r = sim_host.cli("list", check=False)
    assert r.returncode == 1 and sim_host.dir in r.stderr and "not running" in r.stderr
    with pytest.raises(DomainError, match="pause"):
        led.pause()
    d1 = sim_host.cli("digest", "bank").stdout.strip()
    assert len(d1) == 64 and sim_host.cli("digest", str(led.domid)).stdout.strip() == d1
    acked = os.path.join(sim_host.dir, "acked.txt")
    with open(acked, "w") as f:
        f.write(sim_host.cli("outputs", "bank").stdout)
    r = sim_host.cli("ledger-check", "bank", "--acked", acked)
    assert "OK" in r.stdout and "acknowledged" in r.stdout


def test_clean_stop_kills_domains_and_keeps_files(sim_host):
    dom = sim_host.create("16M", "scan", seed=1, rate=1000)
    pids = sim_host.domain_pids()
    assert sim_host.stop() == 0
    assert _wait_gone(pids) == []
    assert not os.path.exists(os.path.join(sim_host.dir, "host.sock"))
    assert os.path.exists(os.path.join(sim_host.dir, f"dom-{dom.domid}.mem"))
    assert "stopped" in sim_host.log()


def test_one_host_per_directory_and_hosts_side_by_side(sim_host_factory):
    a = sim_host_factory()
    b = sim_host_factory()
    da = a.create("16M", "idle", name="same")
    db = b.create("16M", "idle", name="same")
    assert da.domid == db.domid == 1 and a.hv.ping()["pid"] != b.hv.ping()["pid"]
    second = SimHost(a.dir, start_timeout=5)
    with pytest.raises(RuntimeError, match="another simulated host"):
        second.start()
    assert a.running()


def test_a_worker_that_dies_is_reported(sim_host):
    dom = sim_host.create("16M", "random", seed=1, rate=1000)
    os.kill(dom.status()["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while dom.info().state != "shutdown":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    meta = json.loads(sim_host.cli("list", "--json").stdout)[0]
    assert meta["state"] == "shutdown"
    with pytest.raises(DomainError, match="pause"):
        dom.pause()
    sim_host.cli("destroy", str(dom.domid))
    assert json.loads(sim_host.cli("list", "--json").stdout) == []


def test_cli_create_list_pause_digest_destroy(sim_host):
    domid = sim_host.cli(
        "create",
        "--memory",
        "16M",
        "--workload",
        "hotset",
        "--seed",
        "3",
        "--rate",
        "5000",
        "--wss",
        "100",
        "--name",
        "hot",
    ).stdout.strip()
    assert domid == "1"
    rows = json.loads(sim_host.cli("list", "--json").stdout)
    assert rows[0]["name"] == "hot" and rows[0]["pages"] == 4096 and rows[0]["workload"] == "hotset"
    assert rows[0]["state"] == "running" and rows[0]["wss"] == 100
    assert rows[0]["dirty_mode"] in ("uffd-wp", "bitmap")
    assert "hot" in sim_host.cli("list").stdout
    sim_host.cli("pause", "hot")
    d1 = sim_host.cli("digest", "hot").stdout
    time.sleep(0.05)
    assert sim_host.cli("digest", "1").stdout == d1
    assert json.loads(sim_host.cli("list", "--json").stdout)[0]["state"] == "paused"
    sim_host.cli("unpause", "hot")
    r = sim_host.cli("unpause", "hot", check=False)
    assert r.returncode == 1 and "not paused" in r.stderr
    r = sim_host.cli("create", "--name", "hot", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = sim_host.cli("create", "--memory", "12345", check=False)
    assert r.returncode == 2 and "4 KiB pages" in r.stderr
    r = sim_host.cli(
        "create", "--memory", "16M", "--workload", "ledger", "--accounts", "100000000", check=False
    )
    assert r.returncode == 1 and "accounts" in r.stderr
    sim_host.cli("destroy", "hot")
    assert not os.path.exists(os.path.join(sim_host.dir, "dom-1.mem"))
    r = sim_host.cli("digest", "hot", check=False)
    assert r.returncode == 1 and "no such domain" in r.stderr


def test_cli_help_and_open_hypervisor(sim_host):
    out = sim_host.cli("--help").stdout
    for word in ("host", "create", "ledger-check", "workloads", "tmpfs", "exit status"):
        assert word in out
    assert "--acked" in sim_host.cli("ledger-check", "--help").stdout
    hv = open_hypervisor(sim_host.dir)
    assert hv.kind == "sim" and hv.list() == []


def test_scatter_of_runs_and_of_scattered_pages_lands_every_page(sim_host):
    """SimDomain.scatter writes long runs of consecutive PFNs with pwritev and
    scattered PFNs through its mapping: both put each page exactly where its
    PFN says, a later copy of a PFN wins, and a non-contiguous page array
    (the mapping path) works too."""
    import numpy as np

    from xenbind import PAGE_SIZE

    dom = sim_host.create(memory="4M", workload="idle", paused=True, backup=True)
    pages = dom.pages
    rng = np.random.default_rng(5)

    def fill(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)

    expect = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)
    # two long runs (pwritev), with PFN 40 at the end of the first run repeated at the start
    runs = np.concatenate([np.arange(10, 41), np.arange(40, 90), np.arange(200, 264)]).astype(
        np.uint64
    )
    data = fill(len(runs))
    dom.scatter(runs, data)
    for pfn, page in zip(runs.tolist(), data, strict=True):
        expect[pfn] = page
    # scattered PFNs (the mapping)
    few = np.array([3, 500, 7, 801], dtype=np.uint64)
    data = fill(len(few))
    dom.scatter(few, data)
    expect[few.astype(np.intp)] = data
    # a run from a non-contiguous array (every other row of a bigger one)
    wide = fill(2 * 40)[::2]
    run = np.arange(600, 640, dtype=np.uint64)
    dom.scatter(run, wide)
    expect[600:640] = wide
    got = np.empty((pages, PAGE_SIZE), dtype=np.uint8)
    dom.gather(np.arange(pages, dtype=np.uint64), got)
    assert np.array_equal(got, expect)
    with pytest.raises(DomainError, match="past the last page"):
        dom.scatter(np.arange(pages - 20, pages + 20, dtype=np.uint64), fill(40))
    dom.destroy()


def test_checkpoint_stop_and_go_take_one_round_trip_each_and_keep_the_semantics(sim_host):
    """checkpoint_stop pauses and brings the context back (get_context answers
    from it, equal to what another handle reads from the worker while the stop
    lasts); output_barrier asked during the stop travels with checkpoint_go;
    the pause count and the barrier count move exactly as pause/barrier/unpause
    would move them."""
    dom = sim_host.create(memory="4M", workload="ledger", rate=2000)
    other = sim_host.lookup(dom.domid)
    dom.checkpoint_stop()
    try:
        assert dom.info().extra["pause_count"] == 1
        before = dom.status()["barriers"]
        ctx = dom.get_context()
        assert ctx == other.get_context()  # a round trip by a handle with no stop
        dom.output_barrier()
        assert dom.status()["barriers"] == before  # not sent yet: the guest is stopped
    finally:
        dom.checkpoint_go()
    assert dom.info().extra["pause_count"] == 0
    assert dom.status()["barriers"] == before + 1
    # a stop without a barrier adds none; the context is read afresh after the go
    dom.checkpoint_stop()
    step = dom.get_context()
    dom.checkpoint_go()
    assert dom.status()["barriers"] == before + 1
    dom.wait_step(ledger_step(step) + 5)
    assert dom.get_context() != step
    # leaving a stop by unpause still sends the barrier asked during it
    dom.checkpoint_stop()
    dom.output_barrier()
    dom.unpause()
    assert dom.status()["barriers"] == before + 2
    with pytest.raises(DomainError, match="not paused"):
        dom.checkpoint_go()
    dom.destroy()


def ledger_step(ctx) -> int:
    from xenbind.sim.workloads import Registers

    return Registers.unpack(bytes(ctx.hvm_context)).step
