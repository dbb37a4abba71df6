"""The OCF resource agent ocf/remus against a simulated pair of hosts.

Each node of the pair runs both daemons, as in a Pacemaker cluster (a
receiver and a remusd, each on its own control socket); node A's remusd
protects a ledger guest to node B's receiver. ``ocf-tester`` (Debian's
resource-agents) then runs the whole OCF life cycle of the agent on node B
(start, monitor, demote, promote, stop, ...), and the direct tests call the
agent's actions with OCF_ROOT and OCF_RESKEY_* set and check the exit codes
and what the daemons report afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, ENV, Receiver, Remusd, free_port, wait_until
from tests.simhost import REPO, SimHost, host_pair, sim_dir

AGENT = os.path.join(REPO, "ocf", "remus")
OCF_ROOT = "/usr/lib/ocf"
OCF_TESTER = shutil.which("ocf-tester") or (
    "/usr/sbin/ocf-tester" if os.path.exists("/usr/sbin/ocf-tester") else None
)
SHELLFUNCS = os.path.join(OCF_ROOT, "lib", "heartbeat", "ocf-shellfuncs")

pytestmark = pytest.mark.skipif(
    OCF_TESTER is None or not os.path.exists(SHELLFUNCS),
    reason="ocf-tester / OCF shell functions missing: apt-get install resource-agents libxml2-utils",
)

# OCF exit codes
SUCCESS, ERR_GENERIC, ERR_CONFIGURED, NOT_RUNNING, RUNNING_MASTER, FAILED_MASTER = 0, 1, 6, 7, 8, 9


@dataclass
class Node:
    name: str
    host: SimHost
    rx: Receiver
    rd: Remusd
    rsctmp: Path
    peer: str = ""

    def params(self) -> dict[str, str]:
        return {
            "domain": "ledger",
            "peer": self.peer,
            "remusctl": str(BIN / "remusctl"),
            "remusd_control": self.rd.control,
            "receiver_control": self.rx.control,
            "sim_dir": self.host.dir,
            "protect_wait": "20",
            "failover_wait": "20",
        }

    def env(self, **params: str) -> dict[str, str]:
        p = dict(self.params(), **params)
        env = dict(ENV, OCF_ROOT=OCF_ROOT, HA_RSCTMP=str(self.rsctmp))
        for k in [k for k in env if k.startswith("OCF_RESKEY_")]:
            del env[k]
        env.update({f"OCF_RESKEY_{k}": v for k, v in p.items()})
        return env

    def agent(self, action: str, interval_ms: int = 10000, **params: str) -> int:
        env = dict(
            self.env(**params),
            OCF_RESOURCE_INSTANCE="remus-ledger",
            OCF_RESKEY_CRM_meta_interval=str(interval_ms),
            __OCF_ACTION=action,
        )
        r = subprocess.run(
            [AGENT, action], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
        )
        print(f"[{self.name}] {action} -> {r.returncode}\n{r.stdout}{r.stderr}")
        return r.returncode

    def runs(self, name: str = "ledger") -> bool:
        """The guest runs here. A protected guest is paused for a moment at
        every checkpoint, so one look may see it paused: look a few times."""
        return any(self.sim_state(name) == "running" for _ in range(5))

    def sim_state(self, name: str = "ledger") -> str | None:
        for line in self.host.cli("list").stdout.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 5 and cols[1] == name:
                return cols[4]
        return None


@dataclass
class Pair:
    a: Node  # the primary: remusd protects ledger to b's receiver
    b: Node  # the backup


@pytest.fixture
def pair() -> Iterator[Pair]:
    work = Path(sim_dir("remus-ocf-"))
    daemons: list[Remusd | Receiver] = []
    try:
        with host_pair("remus-ocf") as (ha, hb):
            nodes = []
            for name, host in (("A", ha), ("B", hb)):
                wd = work / name
                wd.mkdir()
                rx = Receiver(wd, host, free_port())
                daemons.append(rx)
                rx.start()
                rd = Remusd(wd, host, "--state-dir", str(wd / "state"))
                daemons.append(rd)
                rd.start()
                (wd / "rsctmp").mkdir()
                nodes.append(Node(name, host, rx, rd, wd / "rsctmp"))
            a, b = nodes
            a.peer, b.peer = b.rx.target, a.rx.target
            ha.create(memory="16M", workload="ledger", seed=1, rate=200, name="ledger")
            a.rd.ctl("protect", "ledger", "--to", b.rx.target, "--interval", "100", "--wait=30")
            wait_until(
                "committed checkpoints on B",
                lambda: (b.rx.session("ledger") or {}).get("last_committed", 0) >= 3,
                30,
            )
            yield Pair(a, b)
    finally:
        for d in daemons:
            with contextlib.suppress(Exception):
                d.kill()
        for d in daemons:
            print(f"----- {d.workdir.name}/{d.name} log (last 3000 chars) -----\n{d.log()[-3000:]}")
        shutil.rmtree(work, ignore_errors=True)


def test_ocf_tester_passes_on_the_backup_node(pair: Pair) -> None:
    b = pair.b
    argv = [str(OCF_TESTER), "-n", "remus-ledger"]
    # its demote/promote cycle runs on this one node: demote must leave the
    # guest here (switchover=false); the planned move has its own test below
    for k, v in dict(b.params(), switchover="false").items():
        argv += ["-o", f"{k}={v}"]
    r = subprocess.run(
        [*argv, AGENT],
        env=dict(ENV, OCF_ROOT=OCF_ROOT, HA_RSCTMP=str(b.rsctmp)),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{AGENT} passed all tests" in r.stdout
    assert "rc=" not in r.stdout  # no failed assertion of ocf-tester
    # The promotes were real: B's receiver failed the guest over and B runs it;
    # A's stale copy was fenced by its remusd.
    assert (b.rx.session("ledger") or {}).get("state") == "failed-over"
    assert b.runs()
    assert pair.a.rd.domain("ledger")["state"] == "fenced"
    # Stopped (ocf-tester's last action): the agent reports not running.
    assert b.agent("monitor") == NOT_RUNNING


def test_monitor_maps_the_daemons_states(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert a.agent("monitor") == RUNNING_MASTER  # remusd here: protected
    assert a.agent("monitor", interval_ms=0) == RUNNING_MASTER  # the probe too
    assert b.agent("monitor") == NOT_RUNNING  # not started
    assert b.agent("start") == SUCCESS
    assert b.agent("monitor") == SUCCESS  # started, receiver answers
    assert b.agent("start") == SUCCESS  # idempotent
    b.rx.kill()
    assert b.agent("monitor") == NOT_RUNNING  # the daemon down
    assert b.agent("start") == ERR_GENERIC  # start checks the receiver answers
    assert b.agent("stop") == SUCCESS
    assert b.agent("monitor") == NOT_RUNNING


def test_validate_all_without_domain_is_not_configured(pair: Pair) -> None:
    b = pair.b
    assert b.agent("validate-all") == SUCCESS
    assert b.agent("validate-all", domain="") == ERR_CONFIGURED
    assert b.agent("start", domain="") == ERR_CONFIGURED
    assert b.agent("validate-all", peer="no-port") == ERR_CONFIGURED
    assert b.agent("validate-all", interval="fast") == ERR_CONFIGURED
    # A probe of an unconfigured node is "not running", not an error.
    assert b.agent("monitor", interval_ms=0, domain="") == NOT_RUNNING


def test_promote_on_the_backup_runs_the_guest_there(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert b.sim_state() == "paused"  # the receiver's backup copy
    assert b.agent("start") == SUCCESS
    # What A's guest released so far was acknowledged: it must survive on B.
    acked = a.rsctmp / "acked.txt"
    acked.write_text(a.host.cli("outputs", "ledger").stdout)
    assert "ack " in acked.read_text(), "the guest acknowledged nothing on A"
    assert b.agent("promote") == SUCCESS
    assert b.runs()
    assert (b.rx.session("ledger") or {}).get("state") == "failed-over"
    # B's remusd now owns the guest and protects it back to A's receiver.
    row = b.rd.wait(lambda d: d["state"] == "protected", domain="ledger", what="protected")
    assert row["target"] == a.rx.target
    assert b.agent("monitor") == RUNNING_MASTER
    assert b.agent("promote") == SUCCESS  # promoting a promoted instance
    # The old primary: fenced by the failover, so a failed promoted instance.
    a.rd.wait(lambda d: d["state"] == "fenced", domain="ledger", what="fenced")
    assert a.agent("monitor") == FAILED_MASTER
    # Demoting it destroys the stale copy (the backup took over: nothing lost).
    assert a.agent("demote") == SUCCESS
    assert a.rd.domain("ledger")["state"] == "stopped"
    assert a.agent("monitor") == SUCCESS  # demoted: unpromoted, receiver answers
    # Every transaction the guest acknowledged on A survived on B.
    b.host.cli("pause", "ledger")
    r = b.host.cli("ledger-check", "--acked", str(acked), "ledger", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_demote_switches_over_and_the_peer_promotes(pair: Pair) -> None:
    """A planned move of the promoted role, as Pacemaker makes it: demote on
    the primary (switchover: the peer's receiver resumes the guest from a
    last checkpoint, the stopped copy here is destroyed), then promote on the
    peer (the guest runs there: it is protected back). Every transaction the
    guest acknowledged before the move is on the new primary."""
    a, b = pair.a, pair.b
    assert a.agent("start") == SUCCESS and b.agent("start") == SUCCESS
    assert a.agent("monitor") == RUNNING_MASTER
    acked = a.rsctmp / "acked.txt"  # (the destroyed copy's outputs cannot be read after)
    acked.write_text(a.host.cli("outputs", "ledger").stdout)
    assert "ack " in acked.read_text(), "the guest acknowledged nothing on A"
    assert a.agent("demote") == SUCCESS
    assert a.rd.domain("ledger")["case"] == "destroyed-stale"
    assert a.sim_state() is None  # the stopped copy is gone
    assert (b.rx.session("ledger") or {}).get("state") == "failed-over" and b.runs()
    assert b.agent("promote") == SUCCESS
    row = b.rd.wait(lambda d: d["state"] == "protected", domain="ledger", what="protected")
    assert row["target"] == a.rx.target
    assert b.agent("monitor") == RUNNING_MASTER and a.agent("monitor") == SUCCESS
    b.host.cli("pause", "ledger")
    r = b.host.cli("ledger-check", "--acked", str(acked), "ledger", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
