"""Start, stop and drive a simulated host process from a test.

    host = SimHost(tmpdir).start()        # python -m xenbind.sim host --dir tmpdir
    dom = host.create(memory="16M", workload="ledger", seed=1, rate=500)   # SimDomain
    host.cli("pause", str(dom.domid))     # CompletedProcess; check=True by default
    host.stop()                           # SIGTERM, wait (clean stop)
    host.kill()                           # SIGKILL: a host failure

``SimHost`` is also a context manager (stops on exit). The directory should
be on tmpfs (``/dev/shm``) so the host uses uffd-wp dirty tracking;
``sim_dir()`` makes a fresh one. The host's log is ``DIR/host.log``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from xenbind.sim.client import SimDomain, SimHypervisor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def sim_dir(prefix: str = "simhost-") -> str:
    """A fresh, empty directory on tmpfs (falls back to the default tempdir)."""
    return tempfile.mkdtemp(prefix=prefix, dir=SHM)


def parse_memory(memory: str | int) -> int:
    if isinstance(memory, int):
        return memory
    from xenbind.sim.__main__ import parse_size

    return parse_size(memory)


class SimHost:
    def __init__(self, directory: str | None = None, *, start_timeout: float = 20.0) -> None:
        self.dir = os.path.abspath(directory or sim_dir())
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.hv = SimHypervisor(self.dir)
        self._env = dict(
            os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
        )

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> SimHost:
        os.makedirs(self.dir, exist_ok=True)
        log = open(os.path.join(self.dir, "host.log"), "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xenbind.sim", "host", "--dir", self.dir],
                stdout=log,
                stderr=log,
                env=self._env,
                cwd=REPO,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sim host exited with {self.proc.returncode}: {self.log()[-2000:]}"
                )
            try:
                if self.hv.ping()["pid"] == self.proc.pid:
                    return self
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"sim host did not start in {self.start_timeout}s: {self.log()[-2000:]}"
                )
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (clean stop) and wait; SIGKILL if it does not stop in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the host, as a host failure; its domains die with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        """Stop (if running) and remove the directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SimHost:
        return self.start() if not self.running() else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- domains -----------------------------------------------------------------------

    def create(
        self,
        memory: str | int = "16M",
        workload: str = "idle",
        seed: int = 1,
        rate: float | None = None,
        name: str | None = None,
        **kw,
    ) -> SimDomain:
        """Create a domain; keyword arguments as SimHypervisor.create (paused, wss, ...)."""
        return self.hv.create(parse_memory(memory), workload, seed, rate, name, **kw)

    def lookup(self, ref: int | str) -> SimDomain:
        return self.hv.lookup(ref)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess:
        """Run ``python -m xenbind.sim --dir DIR ARGS...``; text output captured."""
        return subprocess.run(
            [sys.executable, "-m", "xenbind.sim", "--dir", self.dir, *args],
            capture_output=True,
            text=True,
            env=self._env,
            cwd=REPO,
            check=check,
            timeout=timeout,
        )

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "host.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def domain_pids(self) -> list[int]:
        """Pids of the host's live worker processes (children of the host)."""
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


@contextlib.contextmanager
def host_pair(prefix: str) -> Iterator[tuple[SimHost, SimHost]]:
    """A primary and a backup host on fresh tmpfs directories ``PREFIX-primary-*``
    and ``PREFIX-backup-*``, cleaned up on exit (the tests' ``hosts`` fixtures)."""
    primary = SimHost(sim_dir(f"{prefix}-primary-")).start()
    try:
        backup = SimHost(sim_dir(f"{prefix}-backup-")).start()
        try:
            yield primary, backup
        finally:
            backup.cleanup()
    finally:
        primary.cleanup()
