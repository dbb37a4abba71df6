"""A real etcd cluster of three members on loopback ports, for the witness tests.

``EtcdCluster(tmp_path).start()`` runs three ``etcd`` processes (Debian's
etcd-server, 3.4) on free 127.0.0.1 ports, each with its data directory and
log file under ``tmp_path``, waits (bounded) until every member reports
healthy, and ``close()`` kills them all. ``stop_member(i)`` / ``start_member(i)``
stop and restart one member on its same ports and data directory: stop one
for "one member lost", two for "quorum lost"; ``leader()`` says which one
leads. ``start_cluster(root)`` retries on fresh ports if a port picked was
taken meanwhile. The ``etcd_cluster`` fixture (import it into a conftest) and
the ``running_cluster(root)`` context manager (for a fixture of your own) give
a started cluster and tear it down; both skip the test only when the etcd
binary is missing (looked for as ``$ETCD_BINARY``, ``etcd`` on PATH,
/usr/bin/etcd, then .cache/etcd/usr/bin/etcd).

Rules kept here:
- Traffic stays on 127.0.0.1; every wait is bounded; every process started is
  ended by ``close()`` (the fixture calls it even when the test fails).
- A member's log is kept (``member_log(i)``) and quoted when a start fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0  # a loaded 2-core machine: the first election can be slow
STOP_TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parents[2]
# $ETCD_BINARY, then Debian's etcd-server installed (/usr/bin/etcd), then the
# same package unpacked with dpkg -x into .cache/etcd (no service, no user)
ETCD_BINARY_CANDIDATES: tuple[str, ...] = (
    *((os.environ["ETCD_BINARY"],) if os.environ.get("ETCD_BINARY") else ()),
    "etcd",
    "/usr/bin/etcd",
    str(REPO / ".cache" / "etcd" / "usr" / "bin" / "etcd"),
)


def etcd_binary() -> str | None:
    """The etcd server binary (see ETCD_BINARY_CANDIDATES), or None."""
    for name in ETCD_BINARY_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (bound, read, closed)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    """Three etcd members on loopback; see the module docstring."""

    root: Path
    size: int = 3
    token: str = field(default_factory=lambda: f"remus-test-{os.getpid()}-{time.monotonic_ns()}")
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (Debian package etcd-server)")
        self.binary = binary
        ports = free_ports(2 * self.size)
        for i in range(self.size):
            name = f"m{i}"
            self.members.append(
                Member(
                    name=name,
                    client_port=ports[2 * i],
                    peer_port=ports[2 * i + 1],
                    data_dir=self.root / f"etcd-{name}",
                    log_path=self.root / f"etcd-{name}.log",
                )
            )

    # -- addresses -------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """The client URLs of all members (what ``[witness] endpoints`` lists)."""
        return [m.client_url for m in self.members]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def _argv(self, m: Member) -> list[str]:
        return [
            self.binary,
            "--name",
            m.name,
            "--data-dir",
            str(m.data_dir),
            "--listen-client-urls",
            m.client_url,
            "--advertise-client-urls",
            m.client_url,
            "--listen-peer-urls",
            m.peer_url,
            "--initial-advertise-peer-urls",
            m.peer_url,
            "--initial-cluster",
            self._initial_cluster(),
            "--initial-cluster-state",
            "new",  # ignored on a restart: the data directory holds the cluster
            "--initial-cluster-token",
            self.token,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            "--metrics",
            "basic",
        ]

    # -- life cycle ------------------------------------------------------

    def start(self) -> EtcdCluster:
        """Start every member and wait until all are healthy (bounded)."""
        for i in range(self.size):
            self._spawn(i)
        self.wait_healthy(range(self.size), START_TIMEOUT_S)
        return self

    def _spawn(self, i: int) -> None:
        m = self.members[i]
        if m.running():
            raise RuntimeError(f"etcd member {m.name} is already running")
        m.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(m.log_path, "ab")  # handed to the child, closed below
        try:
            m.proc = subprocess.Popen(
                self._argv(m),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: killed as one
            )
        finally:
            log.close()

    def stop_member(self, i: int) -> None:
        """Stop member ``i`` (SIGKILL: a host that dies does not say goodbye)."""
        m = self.members[i]
        if m.proc is None:
            return
        if m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(timeout=STOP_TIMEOUT_S)
        m.proc = None

    def start_member(self, i: int, *, wait: bool = True, timeout: float = START_TIMEOUT_S) -> None:
        """Restart member ``i`` on its ports and data directory.

        With ``wait``, until it reports healthy, which needs a quorum: restart
        the second of two stopped members with ``wait=False``, then
        ``wait_healthy`` on both.
        """
        self._spawn(i)
        if wait:
            self.wait_healthy([i], timeout)

    def close(self) -> None:
        for i in range(self.size):
            try:
                self.stop_member(i)
            except (OSError, subprocess.TimeoutExpired):
                pass

    # -- health ----------------------------------------------------------

    def healthy(self, i: int, timeout: float = 2.0) -> bool:
        """Member ``i`` answers /health with "true" (it sees a leader and a quorum)."""
        m = self.members[i]
        if not m.running():
            return False
        try:
            with urllib.request.urlopen(f"{m.client_url}/health", timeout=timeout) as r:
                body = json.loads(r.read())
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return bool(body.get("health") == "true")

    def wait_healthy(self, members: Iterator[int] | range | list[int], timeout: float) -> None:
        wanted = list(members)
        deadline = time.monotonic() + timeout
        while True:
            for i in wanted:
                m = self.members[i]
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd member {m.name} exited with {m.proc.returncode}:\n"
                        + self.member_log(i)[-3000:]
                    )
            if all(self.healthy(i) for i in wanted):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {self.members[i].name}\n{self.member_log(i)[-1500:]}" for i in wanted
                )
                raise RuntimeError(
                    f"etcd members {wanted} not healthy after {timeout:.0f} s:\n{logs}"
                )
            time.sleep(0.1)

    def status(self, i: int, timeout: float = 2.0) -> dict[str, object] | None:
        """Member ``i``'s /v3/maintenance/status (its id, the leader's id), or None."""
        m = self.members[i]
        if not m.running():
            return None
        req = urllib.request.Request(
            f"{m.client_url}/v3/maintenance/status",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body: dict[str, object] = json.loads(r.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return body

    def leader(self) -> int | None:
        """The index of the member that leads now (None: no live member knows one)."""
        ids: dict[str, int] = {}
        leader_id = None
        for i in range(self.size):
            st = self.status(i)
            if st is None:
                continue
            header = st.get("header")
            if isinstance(header, dict):
                ids[str(header.get("member_id"))] = i
            leader_id = leader_id or str(st.get("leader", "")) or None
        return ids.get(leader_id) if leader_id else None

    def member_log(self, i: int) -> str:
        try:
            return self.members[i].log_path.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[EtcdCluster]:
    """A started cluster under ``root``, closed on exit; skips the test without etcd."""
    if etcd_binary() is None:
        pytest.skip(
            "etcd is not installed: apt-get install etcd-server (scripts/install-system-deps)"
        )
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A started three-member cluster, closed after the test; skips without etcd.

    Import it into a test module or a conftest (``from tests.daemonkit.etcd_cluster
    import etcd_cluster``), or use ``running_cluster`` in a fixture of your own.
    """
    with running_cluster(tmp_path) as cluster:
        yield cluster


def start_cluster(root: Path, tries: int = 3) -> EtcdCluster:
    """A started cluster under ``root``; new ports on a failed start (a port taken meanwhile)."""
    for attempt in range(tries):
        cluster = EtcdCluster(root / f"try{attempt}")
        try:
            return cluster.start()
        except RuntimeError:
            cluster.close()
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")
