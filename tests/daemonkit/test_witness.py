"""daemonkit.witness: the owner key under a lease, against a real three-member etcd.

The pure part (configuration, LeaseClock, the release rule) is tested with
numbers for time; the etcd part with the ``cluster`` fixture
(``running_cluster`` of tests/daemonkit/etcd_cluster.py): claim, renew, release; a second claimant
refused while the first holds; a challenger that cannot win while the lease
lives and wins once the holder stops renewing, with a larger fencing
revision; one member lost (the leader) without effect; quorum lost: renewals
fail loudly and "may release" turns false before the server could expire the
lease; quorum back: renewals work again.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemonkit.witness import (
    ClaimRefused,
    LeaseClock,
    LeaseLost,
    OwnerKey,
    Timings,
    WitnessConfig,
    WitnessUnreachable,
    add_witness_flags,
    load_witness_config,
    parse_witness_table,
    pause_deadline,
    promise_until,
    release_allowed,
    witness_config,
)
from tests.daemonkit.etcd_cluster import EtcdCluster, etcd_binary, free_ports, running_cluster
from tests.tls_certs import Pki
from xenbind.errors import ConfigError

TTL = 4  # seconds: small for the tests, large enough for a loaded 2-core machine

# -- configuration --------------------------------------------------------


def test_table_defaults_and_keys() -> None:
    cfg = parse_witness_table({"endpoints": ["http://127.0.0.1:2379", "http://[::1]:2379/"]})
    assert cfg.endpoints == ("http://127.0.0.1:2379", "http://[::1]:2379")
    assert cfg.timings.ttl == 5 and cfg.timings.renew_period == 1.0 and cfg.timings.margin == 0.5
    assert cfg.prefix == "/remus/default"
    u = "6F9619FF-8B86-D011-B42D-00C04FC964FF"
    assert cfg.owner_key(u) == "/remus/default/domains/6f9619ff-8b86-d011-b42d-00c04fc964ff/owner"
    assert cfg.epoch_key(u).endswith("/epoch")
    with pytest.raises(ConfigError, match="not a domain UUID"):
        cfg.owner_key("../../x")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "endpoints must be a non-empty list"),
        ({"endpoints": "http://a:1"}, "endpoints must be a non-empty list"),
        ({"endpoints": ["a:2379"]}, "must be http\\(s\\)://host:port"),
        ({"endpoints": ["http://a"]}, "must be http\\(s\\)://host:port"),
        ({"endpoints": ["http://a:1/v3"]}, "nothing more"),
        ({"endpoints": ["http://a:1", "https://b:1"]}, "mix http and https"),
        ({"endpoints": ["http://a:1", "http://a:1"]}, "same member twice"),
        ({"endpoints": ["http://a:1"], "ttl": 1}, "ttl must be a whole number of seconds >= 2"),
        ({"endpoints": ["http://a:1"], "ttl": 2.5}, "ttl must be a whole number"),
        ({"endpoints": ["http://a:1"], "ttl": "5"}, "ttl must be a whole number"),
        (
            {"endpoints": ["http://a:1"], "ttl": 5, "renew-period": 2},
            "renew-period 2.0 s is too long",
        ),
        ({"endpoints": ["http://a:1"], "ttl": 4, "margin": 2}, "below half the ttl"),
        ({"endpoints": ["http://a:1"], "margin": -1}, "margin must be > 0"),
        ({"endpoints": ["http://a:1"], "prefix": "remus"}, "prefix must look like"),
        ({"endpoints": ["http://a:1"], "prefix": "/remus/"}, "prefix must look like"),
        ({"endpoints": ["http://a:1"], "colour": 1}, "unknown key 'colour'"),
    ],
)
def test_table_errors_are_one_line(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        parse_witness_table(table, where="x.toml: [witness]")
    assert "\n" not in str(e.value) and str(e.value).startswith("x.toml: [witness]: ")


def test_tls_options(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "k.pem"))
    for f in (ca, cert, key):
        f.write_text("x")
    base = {"endpoints": ["https://e1:2379", "https://e2:2379"]}
    cfg = parse_witness_table({**base, "ca": str(ca), "cert": str(cert), "key": str(key)})
    assert (cfg.ca, cfg.cert, cfg.key) == (str(ca), str(cert), str(key))
    assert cfg.describe()["tls"] is True
    with pytest.raises(ConfigError, match="cert and key go together"):
        parse_witness_table({**base, "cert": str(cert)})
    with pytest.raises(ConfigError, match="does not exist"):
        parse_witness_table({**base, "ca": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="use https://"):
        parse_witness_table({"endpoints": ["http://e1:2379"], "ca": str(ca)})


def test_file_and_flags(tmp_path: Path) -> None:
    conf = tmp_path / "remusd.toml"
    conf.write_text(
        'interval = 100\n[witness]\nendpoints = ["http://127.0.0.1:1", "http://127.0.0.1:2"]\n'
        'ttl = 6\nprefix = "/remus/pair1"\n'
    )
    parser = argparse.ArgumentParser()
    add_witness_flags(parser)
    cfg = load_witness_config(str(conf), parser.parse_args([]))
    assert cfg is not None and cfg.timings.ttl == 6 and cfg.prefix == "/remus/pair1"
    assert len(cfg.endpoints) == 2
    # a flag overrides its key; --witness-endpoint replaces the whole list
    cfg = load_witness_config(
        str(conf), parser.parse_args(["--witness-ttl", "8", "--witness-endpoint", "http://h:3"])
    )
    assert cfg is not None and cfg.timings.ttl == 8 and cfg.endpoints == ("http://h:3",)
    # no table and no flags: no witness; options without endpoints: an error
    bare = tmp_path / "bare.toml"
    bare.write_text("interval = 100\n")
    assert load_witness_config(str(bare), parser.parse_args([])) is None
    assert load_witness_config(None, None) is None
    with pytest.raises(ConfigError, match="no endpoints"):
        witness_config(None, parser.parse_args(["--witness-ttl", "8"]))
    bad = tmp_path / "bad.toml"
    bad.write_text("witness = 3\n")
    with pytest.raises(ConfigError, match="must be a table"):
        load_witness_config(str(bad))


# -- the decisions --------------------------------------------------------


def timings() -> Timings:
    return Timings.for_ttl(TTL, renew_period=0.8, margin=0.5, request_timeout=1.0, retry_period=0.5)


def test_lease_clock_is_conservative() -> None:
    c = LeaseClock(timings())
    assert not c.valid(0.0) and c.next_renew_at(0.0) is None and c.phase(0.0) == "none"
    c.granted(sent_at=100.0, server_ttl=TTL, revision=7, lease_id=1)
    assert c.valid_until == 100.0 + TTL - 0.5
    assert c.valid(103.4) and not c.valid(103.5)
    assert c.next_renew_at(100.1) == pytest.approx(100.8)
    # a renewal counts from its send time, and never from more TTL than etcd granted
    c.renewed(sent_at=101.0, server_ttl=2)
    assert c.valid_until == 100.0 + TTL - 0.5  # 101 + 2 - 0.5 is earlier: kept the later
    c.renewed(sent_at=102.0, server_ttl=TTL)
    assert c.valid_until == 102.0 + TTL - 0.5
    # no answer: validity unchanged, retried sooner, the phase says so
    c.renew_failed(102.9, "witness unreachable: x")
    assert c.valid_until == 105.5 and c.phase(103.0) == "unconfirmed"
    assert c.next_renew_at(102.9) == pytest.approx(102.9 + 0.2)
    assert c.phase(105.5) == "expired" and not c.valid(105.5)
    # lost is final: no renewal revives it
    c.lost("expired on the server")
    assert not c.valid(102.5) and c.status(102.5)["lease"] == "lost"
    with pytest.raises(Exception, match="renewal of a lease in state lost"):
        c.renewed(sent_at=103.0, server_ttl=TTL)


def test_release_rule() -> None:
    p = promise_until(sent_at=10.0, failover_timeout=1.0, margin=0.25)
    assert p == 10.75
    assert release_allowed(10.5, None, p) and not release_allowed(10.75, None, p)
    assert release_allowed(12.0, 12.5, p) and not release_allowed(12.5, 12.5, p)
    assert not release_allowed(0.0, None, None)
    assert pause_deadline(12.5, p) == 12.5 and pause_deadline(None, p) == p
    assert pause_deadline(None, None) is None


# -- against etcd ---------------------------------------------------------


def config_for(cluster: EtcdCluster) -> WitnessConfig:
    return parse_witness_table(
        {
            "endpoints": cluster.endpoints,
            "ttl": TTL,
            "renew-period": 0.8,
            "margin": 0.5,
            "request-timeout": 1.0,
            "retry-period": 0.5,
            "prefix": "/remus/test",
        }
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    with running_cluster(tmp_path) as c:
        yield c


@pytest.fixture
def domain() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def keys(cluster: EtcdCluster) -> Iterator[list[OwnerKey]]:
    made: list[OwnerKey] = []
    yield made
    for k in made:
        k.close()


def owner(
    cluster: EtcdCluster, domain: str, made: list[OwnerKey], role: str, session: str
) -> OwnerKey:
    k = OwnerKey(config_for(cluster), domain, role=role, session=session, host=f"host-{session}")
    made.append(k)
    return k


def test_claim_renew_release(cluster: EtcdCluster, domain: str, keys: list[OwnerKey]) -> None:
    a = owner(cluster, domain, keys, "primary", "s1")
    before = time.monotonic()
    rev = a.claim()
    assert rev > 0 and a.revision == rev
    v0 = a.valid_until
    assert v0 is not None and before + TTL - 0.5 <= v0 <= time.monotonic() + TTL - 0.5
    assert a.may_release()
    holder, epoch = a.holder()
    assert holder is not None and holder.session == "s1" and holder.role == "primary"
    assert holder.revision == rev and epoch == rev
    time.sleep(0.3)
    v1 = a.renew()
    assert v1 > v0 and a.status()["lease"] == "held"
    a.release()
    assert not a.may_release() and a.status()["lease"] == "released"
    holder, epoch = a.holder()
    assert holder is None and epoch == rev  # the epoch key outlives the lease


def test_second_claimant_refused(cluster: EtcdCluster, domain: str, keys: list[OwnerKey]) -> None:
    a = owner(cluster, domain, keys, "primary", "s1")
    b = owner(cluster, domain, keys, "primary", "s2")
    rev = a.claim()
    with pytest.raises(ClaimRefused, match="held by primary host-s1 session s1") as e:
        b.claim()
    assert e.value.holder is not None and e.value.holder.revision == rev
    assert not b.may_release() and a.may_release()
    a.renew()  # the refused claim did not disturb the holder


def test_challenger_waits_for_the_lease(
    cluster: EtcdCluster,
    domain: str,
    keys: list[OwnerKey],
) -> None:
    primary = owner(cluster, domain, keys, "primary", "p")
    backup = owner(cluster, domain, keys, "backup", "r")
    rev1 = primary.claim()
    stop = threading.Event()
    renewer = threading.Thread(target=primary.run_renewals, args=(stop,), daemon=True)
    renewer.start()
    try:
        # while the primary renews, for longer than a TTL, the challenger never wins
        end = time.monotonic() + TTL + 1.5
        tries = 0
        while time.monotonic() < end:
            with pytest.raises(ClaimRefused):
                backup.claim()
            tries += 1
            assert primary.may_release()
            time.sleep(0.5)
        assert tries >= 5
    finally:
        stop.set()
        renewer.join(timeout=10)
    assert not renewer.is_alive()
    # the primary stops renewing (as if its host died): the challenger wins
    # once etcd expires the lease, within TTL of the last renewal plus a bound
    last_ok = primary.lease.last_ok
    assert last_ok is not None
    won_at = None
    deadline = last_ok + TTL + 6.0  # etcd checks expiries every 500 ms; a loaded machine
    while time.monotonic() < deadline:
        try:
            rev2 = backup.claim()
        except ClaimRefused:
            assert time.monotonic() < last_ok + TTL + 6.0
            time.sleep(0.25)
            continue
        won_at = time.monotonic()
        break
    assert won_at is not None, "the challenger never won after the holder stopped renewing"
    # never before the holder's own conservative end of validity
    assert primary.lease.valid_until is not None and won_at >= primary.lease.valid_until
    assert won_at >= last_ok + TTL - 0.5
    assert rev2 > rev1 and backup.revision == rev2
    holder, epoch = backup.holder()
    assert holder is not None and holder.role == "backup" and epoch == rev2
    # the old primary learns it has lost, and cannot take the key back
    with pytest.raises(LeaseLost):
        primary.renew()
    assert not primary.may_release()
    with pytest.raises(ClaimRefused):
        primary.claim(expect_epoch=rev1)
    # even once the winner lets go, the epoch shows someone claimed since rev1
    backup.release()
    with pytest.raises(ClaimRefused, match="epoch moved"):
        primary.claim(expect_epoch=rev1)
    assert primary.claim(expect_epoch=rev2) > rev2  # the revision names the latest claim


def test_one_member_lost_changes_nothing(
    cluster: EtcdCluster,
    domain: str,
    keys: list[OwnerKey],
) -> None:
    primary = owner(cluster, domain, keys, "primary", "p")
    backup = owner(cluster, domain, keys, "backup", "r")
    primary.claim()
    stop = threading.Event()
    renewer = threading.Thread(target=primary.run_renewals, args=(stop,), daemon=True)
    renewer.start()
    try:
        leader = cluster.leader()
        victim = leader if leader is not None else 0
        cluster.stop_member(victim)  # the leader: an election on top of the loss
        end = time.monotonic() + 2 * TTL
        while time.monotonic() < end:
            assert primary.may_release(), primary.status()
            time.sleep(0.1)
        with pytest.raises(ClaimRefused):
            backup.claim()
        assert primary.status()["lease"] in ("held", "unconfirmed")
        assert primary.lease.failures == 0 or primary.may_release()
    finally:
        stop.set()
        renewer.join(timeout=10)


def test_quorum_lost_then_back(
    cluster: EtcdCluster,
    domain: str,
    keys: list[OwnerKey],
) -> None:
    primary = owner(cluster, domain, keys, "primary", "p")
    backup = owner(cluster, domain, keys, "backup", "r")
    primary.claim()
    primary.renew()
    cluster.stop_member(1)
    cluster.stop_member(2)
    last_ok = primary.lease.last_ok
    assert last_ok is not None
    # renewals fail loudly: no silent "valid". The keepalive itself may still
    # be answered by a leader that has not yet noticed it is alone (etcd renews
    # leases on the leader only); the quorum read that follows it cannot be
    with pytest.raises(WitnessUnreachable, match="witness unreachable: (keepalive|check) "):
        primary.renew()
    assert primary.lease.last_ok == last_ok and primary.lease.failures == 1
    # nor a silent win
    with pytest.raises(WitnessUnreachable):
        backup.claim()
    # a renewal blocked on the dead quorum never blocks the release check
    stuck = threading.Thread(target=lambda: pytest.raises(WitnessUnreachable, primary.renew))
    stuck.start()
    time.sleep(0.2)
    t = time.monotonic()
    primary.may_release()
    primary.status()
    assert time.monotonic() - t < 0.5
    stuck.join(timeout=30)
    assert not stuck.is_alive()
    # "may release" turns false on its own, before the server could expire the
    # lease (the server counts its TTL from when it handled the renewal, after last_ok)
    while primary.may_release():
        assert time.monotonic() < last_ok + TTL
        time.sleep(0.05)
    turned_false = time.monotonic()
    assert turned_false < last_ok + TTL
    assert primary.status()["lease"] == "expired"
    # quorum back: etcd's new leader extends every lease, so the same lease renews
    cluster.start_member(1, wait=False)
    cluster.start_member(2, wait=False)
    cluster.wait_healthy([0, 1, 2], 60)
    deadline = time.monotonic() + 20
    while True:
        try:
            primary.renew()
            break
        except WitnessUnreachable:
            assert time.monotonic() < deadline, primary.status()
            time.sleep(0.2)
    assert primary.may_release() and primary.status()["lease"] == "held"
    with pytest.raises(ClaimRefused):
        backup.claim()


def test_claim_over_tls_with_a_client_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS to etcd ([witness] ca, cert, key) against a real etcd that serves
    https and requires a client certificate: the claim goes through with the
    certificate, and without one it is WitnessUnreachable (the handshake is
    refused), never a claim. The configured CA is the one used, whatever the
    environment says (requests would take REQUESTS_CA_BUNDLE over it, and
    fail to verify etcd's certificate)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary (apt-get install etcd-server)")
    pki = Pki(tmp_path / "pki")
    server = pki.leaf("etcd", sans=["127.0.0.1"])
    client = pki.leaf("remusd-a")
    client_port, peer_port = free_ports(2)
    url, peer = f"https://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    argv = [binary, "--name", "tls", "--data-dir", str(tmp_path / "data")]
    argv += ["--listen-client-urls", url, "--advertise-client-urls", url]
    argv += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]
    argv += ["--initial-cluster", f"tls={peer}", "--client-cert-auth"]
    argv += ["--cert-file", server.cert, "--key-file", server.key, "--trusted-ca-file", pki.ca]
    log = (tmp_path / "etcd.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    base = {"endpoints": [url], "ttl": TTL, "request-timeout": 1.0, "prefix": "/remus/tls"}
    domain = str(uuid.uuid4())
    try:
        cfg = parse_witness_table({**base, "ca": pki.ca, "cert": client.cert, "key": client.key})
        key = OwnerKey(cfg, domain, role="primary", session="s1", host="host-a")
        deadline = time.monotonic() + 30
        while True:  # until etcd serves (its first election)
            try:
                rev = key.claim()
                break
            except WitnessUnreachable:
                assert proc.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert rev > 0 and key.may_release()
        holder, _ = key.holder()
        assert holder is not None and holder.session == "s1"
        key.release()
        key.close()
        anon = OwnerKey(
            parse_witness_table({**base, "ca": pki.ca}), domain, role="backup", session="s2"
        )
        with pytest.raises(WitnessUnreachable):
            anon.claim()
        anon.close()
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
