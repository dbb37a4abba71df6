"""The witness wired in (issue 14): real remusd and remus-receiver on a simulated
pair, a real three-member etcd on loopback, TCP proxies the test controls.

* primary host killed: the receiver wins the owner key once the lease expires
  and fails over within TTL + failover timeout; ledger-check --acked holds;
* replication link cut, the primary still reaching etcd: no failover (the
  receiver's challenges are refused while the lease lives), the primary runs
  unprotected and re-protects when the link returns;
* the primary cut from the receiver and from etcd: it stops releasing and
  pauses its guest before the receiver can win the key; the backup resumes
  only after that, and the two copies' released outputs never overlap in time;
* one etcd member lost: no effect; quorum lost with the link healthy:
  protection goes on; quorum lost and the link cut: no failover, the primary
  pauses, and runs again once quorum is back.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemonkit.etcd_cluster import EtcdCluster, running_cluster
from xenbind.sim import postmortem

from .conftest import wait_until
from .test_failover import acked_outputs, ledger_check, power_cut

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TTL = 2
RENEW = 0.3  # 3 x 0.3 + 0.3 <= TTL - margin (1.5)
FAILOVER_MS = 600


class Proxy:
    """A TCP forwarder on 127.0.0.1 the test can cut (every connection closed,
    new ones closed at once) and restore."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.cut_now = False
        self.closed = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.cut_now:
                c.close()
                continue
            try:
                u = socket.create_connection(self.target, timeout=2)
            except OSError:
                c.close()
                continue
            u.settimeout(None)  # the 2 s were for the connect: a quiet peer is no reason to cut
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data or self.cut_now:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        self.cut_now = True
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.cut_now = False

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.sock.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with running_cluster(Path(tmp_path_factory.mktemp("etcd"))) as c:
        yield c


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    made: list[Proxy] = []
    yield made
    for p in made:
        p.close()


def witness_flags(endpoints: list[str], prefix: str) -> list[str]:
    out: list[str] = []
    for e in endpoints:
        out += ["--witness-endpoint", e]
    return out + [
        "--witness-ttl",
        str(TTL),
        "--witness-renew-period",
        str(RENEW),
        "--witness-request-timeout",
        "0.3",
        "--witness-prefix",
        prefix,
    ]


def receiver_config(workdir: Path, endpoints: list[str], prefix: str) -> str:
    """The receiver reads its witness from the documented [witness] table."""
    path = workdir / f"receiver-{uuid.uuid4().hex[:6]}.toml"
    eps = ", ".join(f'"{e}"' for e in endpoints)
    path.write_text(
        f"failover-timeout = {FAILOVER_MS}\n\n[witness]\nendpoints = [{eps}]\nttl = {TTL}\n"
        f'renew-period = {RENEW}\nrequest-timeout = 0.3\nprefix = "{prefix}"\n'
    )
    return str(path)


def start_pair(
    hosts,
    daemons,
    workdir,
    cluster,
    proxies,
    *,
    etcd_proxy: bool = False,
    rx_etcd: list | None = None,
):
    """The ledger guest protected through a link proxy; (remusd, rx, link proxy, etcd
    proxies of the primary or []). ``rx_etcd``: a list that gets proxies the
    receiver reaches etcd through (else it reaches the members directly)."""
    primary, backup = hosts
    primary.create("16M", "ledger", seed=31, rate=3000, name="ledger")
    prefix = f"/remus/t{uuid.uuid4().hex[:8]}"
    rx_eps = cluster.endpoints
    if rx_etcd is not None:
        rx_etcd += [Proxy(int(e.rsplit(":", 1)[1])) for e in cluster.endpoints]
        proxies += rx_etcd
        rx_eps = [f"http://127.0.0.1:{p.port}" for p in rx_etcd]
    rx = daemons.receiver(backup, "--config", receiver_config(workdir, rx_eps, prefix))
    eps = cluster.endpoints
    etcd_px: list[Proxy] = []
    if etcd_proxy:
        etcd_px = [Proxy(int(e.rsplit(":", 1)[1])) for e in eps]
        proxies += etcd_px
        eps = [f"http://127.0.0.1:{p.port}" for p in etcd_px]
    link = Proxy(rx.port)
    proxies.append(link)
    remusd = daemons.remusd(
        primary,
        "--ack-timeout",
        "0.5",
        "--retry-min",
        "0.2",
        "--retry-max",
        "0.5",
        *witness_flags(eps, prefix),
    )
    remusd.ctl("protect", "ledger", "--to", f"127.0.0.1:{link.port}", "--interval", "20")
    d = remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 5, "ledger", what="protection"
    )
    assert d["split_brain_protection"] is True
    assert d["witness"]["lease"] == "held" and d["witness"]["backup_has_witness"] is True
    rev = d["witness"]["fencing_revision"]
    assert isinstance(rev, int) and rev > 0
    st = rx.status()
    assert st["split_brain_protection"] is True and st["witness"]["prefix"] == prefix
    return remusd, rx, link, etcd_px


def released(host, name: str) -> int:
    """Records of ``name``'s released output on ``host`` (its .out file: the world)."""
    try:
        return postmortem.outputs(host.dir, name).count(b"\n")
    except Exception:
        return 0


def test_without_a_witness_the_status_says_so(hosts, daemons):
    primary, backup = hosts
    primary.create("16M", "ledger", seed=3, rate=1000, name="ledger")
    rx = daemons.receiver(backup)
    remusd = daemons.remusd(primary)
    for st in (rx.status(), remusd.status()):
        assert st["witness"] is None and st["split_brain_protection"] is False
    assert "NO split-brain protection" in remusd.log()
    remusd.ctl("protect", "ledger", "--to", rx.target, "--interval", "20")
    d = remusd.wait(lambda d: d["state"] == "protected", "ledger", what="protection")
    assert d["split_brain_protection"] is False and d["witness"] is None


def test_primary_host_killed_fails_over_under_the_key(hosts, daemons, workdir, cluster, proxies):
    primary, backup = hosts
    remusd, rx, _link, _ = start_pair(hosts, daemons, workdir, cluster, proxies)
    rev = remusd.domain("ledger")["witness"]["fencing_revision"]
    seen = remusd.domain("ledger")["acked"]
    t0 = time.monotonic()
    power_cut(primary, remusd)
    s = wait_until(
        "the backup to take over",
        lambda: (lambda s: s if s["state"] == "failed-over" else None)(rx.session("ledger")),
        TTL + FAILOVER_MS / 1000 + 5,
    )
    took = time.monotonic() - t0
    assert took <= TTL + FAILOVER_MS / 1000 + 1.5, took
    assert s["last_committed"] >= seen
    assert s["fencing_revision"] > rev
    assert f"fencing revision {s['fencing_revision']}" in rx.log()
    assert backup.lookup("ledger").info().state == "running"
    acked = workdir / "acked.txt"
    assert acked_outputs(primary, "ledger", acked) > 0
    ledger_check(backup, "ledger", acked)


def test_link_cut_primary_reaches_etcd_no_failover(hosts, daemons, workdir, cluster, proxies):
    primary, _backup = hosts
    remusd, rx, link, _ = start_pair(hosts, daemons, workdir, cluster, proxies)
    link.cut()
    remusd.wait(lambda d: d["state"] == "unprotected", "ledger", timeout=10, what="unprotected")
    n0 = released(primary, "ledger")
    # the receiver challenges and is refused while the primary's lease lives
    wait_until(
        "the receiver to wait for the witness",
        lambda: "held by primary" in (rx.session("ledger")["witness_wait"] or ""),
        10,
    )
    time.sleep(2 * TTL + FAILOVER_MS / 1000)
    s = rx.session("ledger")
    assert s["state"] == "link-lost" and s["fencing_revision"] is None, s
    assert "FAILOVER" not in rx.log()
    d = remusd.domain("ledger")
    assert d["state"] == "unprotected" and d["witness"]["lease"] == "held", d
    assert released(primary, "ledger") > n0  # it ran on, releasing its output
    link.restore()
    d = remusd.wait(
        lambda d: d["state"] == "protected" and d["sessions"] >= 2,
        "ledger",
        timeout=20,
        what="re-protection",
    )
    wait_until(
        "the receiver to take the new session",
        lambda: (
            rx.session("ledger")["state"] == "receiving"
            and rx.session("ledger")["witness_wait"] is None
        ),
        10,
    )
    assert "FAILOVER" not in rx.log()


def test_primary_cut_from_both_pauses_before_the_backup_resumes(
    hosts, daemons, workdir, cluster, proxies
):
    primary, backup = hosts
    remusd, rx, link, etcd_px = start_pair(
        hosts, daemons, workdir, cluster, proxies, etcd_proxy=True
    )
    samples: list[tuple[float, int, int, str]] = []
    for p in etcd_px:
        p.cut()
    link.cut()
    t0 = time.monotonic()
    deadline = t0 + TTL + FAILOVER_MS / 1000 + 6
    while time.monotonic() < deadline:
        b = released(backup, "ledger")
        samples.append((time.monotonic(), released(primary, "ledger"), b, ""))
        if b > 0 and len([s for s in samples if s[2] > 0]) > 25:
            break
        time.sleep(0.02)
    first_backup = next((i for i, s in enumerate(samples) if s[2] > 0), None)
    assert first_backup is not None, "the backup never took over"
    assert rx.session("ledger")["state"] == "failed-over"
    # the primary released nothing from a sample before the backup's first release on
    assert first_backup > 0
    frozen = samples[first_backup - 1][1]
    assert all(s[1] == frozen for s in samples[first_backup - 1 :]), samples[first_backup - 2 :]
    d = remusd.domain("ledger")
    assert d["state"] == "paused-no-witness", d
    assert "guest PAUSED to avoid split brain" in remusd.log()
    assert primary.lookup("ledger").info().state == "paused"
    # etcd back: the re-claim is refused (the backup won): fenced, never unpaused
    for p in etcd_px:
        p.restore()
    d = remusd.wait(lambda d: d["state"] == "fenced", "ledger", timeout=10, what="fenced")
    assert d["case"] == "fenced-backup-took-over"
    assert primary.lookup("ledger").info().state == "paused"
    assert released(primary, "ledger") == frozen


def test_etcd_member_and_quorum_loss(hosts, daemons, workdir, cluster, proxies):
    primary, _backup = hosts
    remusd, rx, link, _ = start_pair(hosts, daemons, workdir, cluster, proxies)
    try:
        cluster.stop_member(0)  # one member lost: nothing changes
        time.sleep(2 * TTL)
        d = remusd.domain("ledger")
        assert d["state"] == "protected" and d["witness"]["lease"] in ("held", "unconfirmed"), d
        assert d["sessions"] == 1
        cluster.stop_member(1)  # quorum lost, link healthy: protection goes on
        c0 = remusd.domain("ledger")["checkpoints"]
        n0 = released(primary, "ledger")
        time.sleep(2 * TTL)
        d = remusd.domain("ledger")
        assert d["state"] == "protected" and d["sessions"] == 1, d
        assert d["checkpoints"] > c0 + 20 and released(primary, "ledger") > n0
        assert d["witness"]["renew_failures"] > 0
        link.cut()  # and the link cut: no failover, the primary pauses
        remusd.wait(
            lambda d: d["state"] == "paused-no-witness", "ledger", timeout=10, what="the pause"
        )
        assert primary.lookup("ledger").info().state == "paused"
        wait_until(
            "the receiver to find etcd unreachable",
            lambda: "witness unreachable" in (rx.session("ledger")["witness_wait"] or ""),
            10,
        )
        time.sleep(1.0)
        assert rx.session("ledger")["state"] == "link-lost"
        assert "FAILOVER" not in rx.log()
    finally:
        cluster.start_member(0)
        cluster.start_member(1)
    # quorum back: the primary renews (or re-claims), runs again, re-protects
    link.restore()
    remusd.wait(
        lambda d: d["state"] == "protected" and d["sessions"] >= 2,
        "ledger",
        timeout=30,
        what="re-protection after quorum returned",
    )
    assert primary.lookup("ledger").info().state == "running"
    assert "FAILOVER" not in rx.log()


def test_switchover_under_the_key(hosts, daemons, workdir, cluster, proxies):
    """Failback's last step with a witness: the primary gives the owner key up
    on the last checkpoint's ACK; the receiver wins it, resumes the backup from
    that checkpoint and records the new fencing revision; the primary's copy is
    fenced, stopped, with every output it made released and none after."""
    primary, backup = hosts
    remusd, rx, _link, _ = start_pair(hosts, daemons, workdir, cluster, proxies)
    rev = remusd.domain("ledger")["witness"]["fencing_revision"]
    r = remusd.ctl("switchover", "ledger", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    d = remusd.domain("ledger")
    assert d["state"] == "fenced" and d["case"] == "fenced-backup-took-over"
    s = rx.session("ledger")
    assert s["state"] == "failed-over" and s["last_committed"] == d["acked"]
    assert s["fencing_revision"] > rev
    assert backup.lookup("ledger").info().state == "running"
    n = released(primary, "ledger")
    time.sleep(0.5)
    assert released(primary, "ledger") == n  # the stopped copy releases nothing more
    acked = workdir / "acked.txt"
    assert acked_outputs(primary, "ledger", acked) > 0
    ledger_check(backup, "ledger", acked)


def test_switchover_the_receiver_cannot_win_the_key(hosts, daemons, workdir, cluster, proxies):
    """The receiver cannot reach etcd: it does not resume the backup (no key),
    ends the protection and answers switchover-failed after the lease's TTL and
    a second; the primary runs its guest again, claims the key anew and is
    protected again once the receiver reaches etcd; nothing failed over."""
    primary, backup = hosts
    rx_etcd: list[Proxy] = []
    remusd, rx, _link, _ = start_pair(hosts, daemons, workdir, cluster, proxies, rx_etcd=rx_etcd)
    for p in rx_etcd:
        p.cut()
    t0 = time.monotonic()
    r = remusd.ctl("switchover", "ledger", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.monotonic() - t0 >= TTL  # it tried to win the key for the lease's TTL
    assert "switchover failed" in r.stdout and "witness" in r.stdout
    assert "SWITCHOVER FAILED" in rx.log() and "backup domain 1 destroyed" in rx.log()
    assert not any(i.name == "ledger" and i.state == "running" for i in backup.hv.list())
    n = released(primary, "ledger")
    wait_until("the guest to run on at the primary", lambda: released(primary, "ledger") > n, 10)
    for p in rx_etcd:
        p.restore()
    d = remusd.wait(
        lambda d: d["state"] == "protected" and d["checkpoints"] >= 5,
        "ledger",
        timeout=20,
        what="protected again",
    )
    assert d["witness"]["lease"] == "held"
    assert rx.session("ledger")["state"] != "failed-over"
