"""The remusd process on a simulated host: systemd readiness and watchdog, the
control socket's mode, protect/unprotect errors, SIGTERM ends sessions cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemonkit.control import ControlError, control_request

pytestmark = pytest.mark.timeout(90)

BIN = Path(sys.executable).parent


def _wait(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except (ControlError, OSError, KeyError, IndexError):
            v = None
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def notify(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    yield path, s
    s.close()


def _start(sim_host, tmp_path, env=None, *extra):
    ctl = str(tmp_path / "remusd.sock")
    log = open(tmp_path / "remusd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(BIN / "remusd"),
            "--sim-dir",
            sim_host.dir,
            "--control",
            ctl,
            "--config",
            "/dev/null",
            *extra,
        ],
        stdout=log,
        stderr=log,
        env=dict(os.environ, **(env or {})),
    )
    log.close()
    return proc, ctl


def test_notify_ready_watchdog_and_sigterm(sim_host, tmp_path, notify):
    path, s = notify
    dom = sim_host.create("16M", "ledger", seed=2, rate=1000, name="ledger")
    proc, ctl = _start(
        sim_host, tmp_path, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "JOURNAL_STREAM": ""}
    )
    try:
        got: list[bytes] = []

        def seen(msg: bytes):
            try:
                got.append(s.recv(4096))
            except TimeoutError:
                pass
            return any(msg in g for g in got)

        _wait(lambda: seen(b"READY=1"), what="READY=1")
        # READY comes after the control socket listens, owner-only
        assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
        assert control_request(ctl, "status")["domains"] == []
        _wait(lambda: seen(b"WATCHDOG=1"), what="WATCHDOG=1")
        stream = tmp_path / "s.stream"
        control_request(
            ctl, "protect", domain=str(dom.domid), target=f"file:{stream}", interval_ms=20
        )
        _wait(
            lambda: control_request(ctl, "status")["domains"][0]["checkpoints"] >= 5,
            what="checkpoints",
        )
        _wait(lambda: seen(b"STATUS=1 protected"), what="STATUS line")
        # errors a caller gets back
        with pytest.raises(ControlError, match="already protected"):
            control_request(ctl, "protect", domain="ledger", target=f"file:{stream}.2")
        with pytest.raises(ControlError, match="--insecure"):
            control_request(ctl, "protect", domain="ledger", target="127.0.0.1:9")
        with pytest.raises(ControlError, match="nosuch"):
            control_request(ctl, "protect", domain="nosuch", target=f"file:{stream}.3")
        with pytest.raises(ControlError, match="not protected"):
            control_request(ctl, "unprotect", domain="nosuch")
        with pytest.raises(ControlError, match="unknown command"):
            control_request(ctl, "reboot")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        _wait(lambda: seen(b"STOPPING=1"), what="STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "remusd.log").read_text()
    assert "session ended cleanly" in log
    # the stream ends with LAST_CHECKPOINT: a whole, clean stream
    r = subprocess.run(
        [sys.executable, "-m", "xenbind.stream", "inspect", "--json", str(stream)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["last_checkpoint"] is True and summary["torn"] is None
    assert summary["checkpoints"] >= 6 and summary["heartbeats"] == 0
    assert not os.path.exists(ctl)  # the control socket is removed on a clean stop


def test_second_remusd_on_same_socket_refused(sim_host, tmp_path):
    proc, ctl = _start(sim_host, tmp_path)
    try:
        _wait(lambda: control_request(ctl, "status"), what="remusd")
        r = subprocess.run(
            [
                str(BIN / "remusd"),
                "--sim-dir",
                sim_host.dir,
                "--control",
                ctl,
                "--config",
                "/dev/null",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2 and "in use" in r.stderr
    finally:
        proc.terminate()
        proc.wait(30)


def test_protect_entries_from_config(sim_host, tmp_path):
    sim_host.create("16M", "idle", seed=1, name="quiet")
    stream = tmp_path / "quiet.stream"
    cfg = tmp_path / "remusd.toml"
    cfg.write_text(
        f'interval = 25\ncodec = "xen"\nprotect = ["quiet=file:{stream}"]\n'
        f'control = "{tmp_path / "c.sock"}"\n'
    )
    proc = subprocess.Popen(
        [str(BIN / "remusd"), "--sim-dir", sim_host.dir, "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ctl = str(tmp_path / "c.sock")
        d = _wait(
            lambda: [d for d in control_request(ctl, "status")["domains"] if d["checkpoints"] >= 3],
            what="protection from the config file",
        )[0]
        assert (d["name"], d["codec"], d["interval_ms"]) == ("quiet", "xen", 25)
        assert d["target"] == f"file:{stream}"
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
