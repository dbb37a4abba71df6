"""TLS end to end with the real daemons: remusd -> remus-receiver over TLS 1.3.

* the good pair protects a ``ledger`` guest, the power is cut (kill -9 of the
  primary host and remusd), the backup takes over and ``ledger-check --acked``
  passes: the whole Remus guarantee with TLS as the link;
* remusd with a certificate the receiver does not allow: the receiver refuses
  it during the TLS handshake (no backup domain), remusd reports the guest
  unprotected and keeps retrying;
* remusd --insecure against the TLS receiver: refused with "requires TLS";
  remusd leaves the guest unprotected, not retrying (a permanent refusal),
  and its status says why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemonkit.control import ControlError, control_request
from tests.simhost import REPO
from tests.tls_certs import Pki

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

BIN = Path(sys.executable).parent


def wait_until(what: str, pred, timeout: float):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = pred()
        except (ControlError, OSError, KeyError, IndexError) as e:
            v, last = None, e
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last error: {last})")
        time.sleep(0.05)


class Proc:
    def __init__(self, name: str, workdir: Path, argv: list[str], control: str) -> None:
        self.name, self.control = name, control
        self.logpath = workdir / f"{name}.log"
        log = open(self.logpath, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=log,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, JOURNAL_STREAM=""),
        )
        log.close()
        wait_until(f"{name} to answer", self.status, 30)

    def status(self) -> dict:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.log()}")
        return control_request(self.control, "status", timeout=5)

    def log(self) -> str:
        return self.logpath.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def pki(tmp_path):
    ca = Pki(tmp_path / "pki", "remus-e2e-ca")
    return {
        "ca": ca.ca,
        "backup": ca.leaf("backup.test"),
        "primary": ca.leaf("primary.test"),
        "stranger": ca.leaf("stranger.test"),
    }


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()
    for p in started:
        print(f"----- {p.name} log -----\n{p.log()[-3000:]}")


def receiver(procs, workdir: Path, backup, pki) -> tuple[Proc, int]:
    b = pki["backup"]
    p = Proc(
        "receiver",
        workdir,
        [
            str(BIN / "remus-receiver"),
            "--listen",
            "127.0.0.1:0",
            "--sim-dir",
            backup.dir,
            "--control",
            str(workdir / "rx.sock"),
            "--config",
            "/dev/null",
            "--tls-cert",
            b.cert,
            "--tls-key",
            b.key,
            "--tls-ca",
            pki["ca"],
            "--allow-peer",
            "primary.test",
        ],
        str(workdir / "rx.sock"),
    )
    procs.append(p)
    m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)", p.log())
    assert m is not None, p.log()
    port = int(m.group(1))
    return p, port


def remusd(procs, workdir: Path, primary, *security: str, name: str = "remusd") -> Proc:
    ctl = str(workdir / f"{name}.sock")
    p = Proc(
        name,
        workdir,
        [
            str(BIN / "remusd"),
            "--sim-dir",
            primary.dir,
            "--control",
            ctl,
            "--config",
            "/dev/null",
            "--retry-min",
            "0.2",
            "--retry-max",
            "0.5",
            *security,
        ],
        ctl,
    )
    procs.append(p)
    return p


def tls_flags(pki, leaf: str) -> list[str]:
    c = pki[leaf]
    return ["--tls-cert", c.cert, "--tls-key", c.key, "--tls-ca", pki["ca"]]


def domain(d: Proc, name: str) -> dict:
    return [x for x in d.status()["domains"] if x["name"] == name][0]


def test_tls_end_to_end_failover_keeps_every_acked_transaction(
    sim_host_factory, procs, tmp_path, pki
):
    primary, backup = sim_host_factory(), sim_host_factory()
    primary.create("16M", "ledger", seed=3, rate=2000, name="ledger")
    rx, port = receiver(procs, tmp_path, backup, pki)
    d = remusd(procs, tmp_path, primary, *tls_flags(pki, "primary"))
    control_request(
        d.control, "protect", domain="ledger", target=f"127.0.0.1:{port}", interval_ms=50
    )
    wait_until(
        "20 acknowledged checkpoints over TLS",
        lambda: (
            domain(d, "ledger")["state"] == "protected"
            and (domain(d, "ledger")["acked"] or 0) >= 20
        ),
        60,
    )
    assert re.search(r"session \w+ over TLSv1\.3 .*peer primary\.test", rx.log())
    assert "plaintext" not in rx.log() + d.log()
    # power cut
    d.kill()
    primary.kill()
    wait_until(
        "the backup to take over",
        lambda: [
            s
            for s in rx.status()["sessions"]
            if s["domain"] == "ledger" and s["state"] == "failed-over"
        ],
        20,
    )
    acked = tmp_path / "acked.txt"
    # the outputs the primary released (to the outside world) before it died
    out = primary.cli("outputs", "ledger")
    acked.write_text(out.stdout)
    assert sum(1 for ln in out.stdout.splitlines() if ln.startswith("ack ")) > 0
    backup.cli("pause", "ledger")
    r = backup.cli("ledger-check", "ledger", "--acked", str(acked), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_remusd_with_a_name_not_allowed_is_refused(sim_host_factory, procs, tmp_path, pki):
    primary, backup = sim_host_factory(), sim_host_factory()
    primary.create("4M", "idle", seed=1, name="quiet")
    rx, port = receiver(procs, tmp_path, backup, pki)
    d = remusd(procs, tmp_path, primary, *tls_flags(pki, "stranger"))
    control_request(
        d.control, "protect", domain="quiet", target=f"127.0.0.1:{port}", interval_ms=50
    )
    wait_until(
        "two refusals",
        lambda: rx.log().count("refused before the session handshake: name not allowed") >= 2,
        30,
    )
    st = domain(d, "quiet")
    assert st["state"] in ("unprotected", "initial-copy"), st
    assert "quiet" not in {i.name for i in backup.hv.list()}
    assert rx.status()["sessions"] == []
    assert "certificate names stranger.test" in rx.log()


def test_insecure_remusd_against_tls_receiver_is_told_why(sim_host_factory, procs, tmp_path, pki):
    primary, backup = sim_host_factory(), sim_host_factory()
    primary.create("4M", "idle", seed=1, name="quiet")
    rx, port = receiver(procs, tmp_path, backup, pki)
    d = remusd(procs, tmp_path, primary, "--insecure")
    control_request(
        d.control, "protect", domain="quiet", target=f"127.0.0.1:{port}", interval_ms=50
    )
    st = wait_until(
        "remusd to give up",
        lambda: (lambda s: s if "not retrying" in (s["reason"] or "") else None)(
            domain(d, "quiet")
        ),
        30,
    )
    assert st["state"] == "unprotected" and "requires TLS" in st["reason"], st
    assert "plaintext TCP (--insecure)" in d.log()  # the per-session warning
    assert "refused before the session handshake: plaintext client" in rx.log()
    assert "quiet" not in {i.name for i in backup.hv.list()}
