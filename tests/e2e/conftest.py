"""End-to-end fixtures: real remusd / remus-receiver processes over loopback.

    remusd = remusd_factory(primary_host)         # a running remusd on that sim host
    remusd.ctl("protect", "ledger", "--to", ...)  # remusctl, checked
    remusd.status()                               # the status object (control socket)
    remusd.wait(lambda d: d["state"] == "protected", domain="ledger")
    rx = receiver_factory(backup_host)            # a running remus-receiver
    rx.kill(); rx.start()                         # same port again

Every process is killed at the end of the test; each daemon's log is
DIR/<name>.log, printed when a test fails (pytest shows captured output).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import pytest

from daemonkit.control import ControlError, control_request
from tests.simhost import REPO, SimHost, sim_dir

BIN = Path(sys.executable).parent
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, pred: Callable[[], object], timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
        except (ControlError, OSError, KeyError, IndexError, TypeError) as e:
            v, last_exc = None, e
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}"
                + (f" (last error: {last_exc})" if last_exc else "")
            )
        time.sleep(every)


def entries(status: dict) -> list[dict]:
    for key in ("domains", "sessions", "protections"):
        if isinstance(status.get(key), list):
            return status[key]
    return []


class Daemon:
    """One daemon process with a control socket."""

    name = "daemon"

    def __init__(
        self, workdir: Path, argv: list[str], control: str, env: dict | None = None
    ) -> None:
        self.env = dict(ENV, **(env or {}))
        self.workdir = workdir
        self.argv = argv
        self.control = control
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{self.name}.log"

    def start(self, timeout: float = 30) -> Self:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=log, env=self.env, cwd=REPO, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            return control_request(self.control, "status", timeout=2)

        wait_until(f"{self.name} to answer on {self.control}", up, timeout)
        return self

    def status(self) -> dict:
        return control_request(self.control, "status", timeout=10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [str(BIN / "remusctl"), "--control", self.control, *args],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"remusctl {' '.join(args)}: rc {r.returncode}: {r.stderr}")
        return r


class Remusd(Daemon):
    name = "remusd"

    def __init__(self, workdir: Path, host: SimHost, *extra: str, env: dict | None = None) -> None:
        control = str(workdir / "remusd.sock")
        argv = [
            str(BIN / "remusd"),
            "--sim-dir",
            host.dir,
            "--control",
            control,
            "--insecure",
            "--config",
            "/dev/null",
            "--log-level",
            "debug",
            *extra,
        ]
        super().__init__(workdir, argv, control, env)
        self.host = host

    def domain(self, name: str) -> dict:
        for d in self.status()["domains"]:
            if d["name"] == name or str(d["domid"]) == name:
                return d
        raise KeyError(name)

    def wait(
        self,
        pred: Callable[[dict], bool],
        domain: str,
        timeout: float = 30,
        what: str = "a condition",
    ) -> dict:
        return wait_until(
            f"{what} on domain {domain}",
            lambda: (lambda d: d if pred(d) else None)(self.domain(domain)),
            timeout,
        )


class Receiver(Daemon):
    name = "receiver"

    def __init__(self, workdir: Path, host: SimHost, port: int, *extra: str) -> None:
        control = str(workdir / "receiver.sock")
        argv = [
            str(BIN / "remus-receiver"),
            "--listen",
            f"127.0.0.1:{port}",
            "--sim-dir",
            host.dir,
            "--control",
            control,
            "--insecure",
            "--config",
            "/dev/null",
            *extra,
        ]
        super().__init__(workdir, argv, control)
        self.port = port
        self.host = host

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def session(self, name: str) -> dict | None:
        found = [
            s for s in entries(self.status()) if s.get("domain") == name or s.get("name") == name
        ]
        return found[-1] if found else None


@pytest.fixture
def workdir():
    d = Path(sim_dir("remus-e2e-"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def hosts(sim_host_factory):
    """(primary, backup): two running simulated hosts."""
    return sim_host_factory(), sim_host_factory()


@pytest.fixture
def daemons(workdir):
    started: list[Daemon] = []

    class Factory:
        def remusd(self, host: SimHost, *extra: str, env: dict | None = None) -> Remusd:
            d = Remusd(workdir, host, *extra, env=env)
            started.append(d)
            return d.start()

        def receiver(self, host: SimHost, *extra: str, port: int | None = None) -> Receiver:
            d = Receiver(workdir, host, port or free_port(), *extra)
            started.append(d)
            return d.start()

    yield Factory()
    for d in started:
        with contextlib.suppress(Exception):
            d.kill()
    for d in started:
        log = d.log()
        if log:
            print(f"----- {d.name} log (last 4000 chars) -----\n{log[-4000:]}")
