"""Control sockets: only root, the daemon's uid, or the control group (SO_PEERCRED).

Clients run as ``nobody`` (uid/gid 65534) in a subprocess that drops its
privileges before connecting (the system python3, since the project's venv is
under a directory nobody may not read; the client is a few lines of socket
code). The file mode is the first gate; to reach the second, some tests widen
the socket to 0666 as a misconfigured directory or mode would, and check that
SO_PEERCRED still refuses the stranger with a one-line error and a log line.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from daemonkit.control import ControlServer, control_request, peer_credentials
from tests.simhost import SimHost, sim_dir
from xenbind.errors import ConfigError

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users"),
]

REPO = str(Path(__file__).resolve().parents[2])
SYSTEM_PY = "/usr/bin/python3"
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name

#: the client a stranger runs: one request, print the one-line answer (or the error)
CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_error": e.errno}))
    raise SystemExit(0)
try:
    s.sendall(b'{"cmd": "status"}\n')
except OSError:
    pass
buf = b""
while b"\n" not in buf:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(buf.decode().strip() or json.dumps({"closed": True}))
"""


def as_user(uid: int, gid: int, groups: list[int] | None = None):
    def drop() -> None:
        os.setgroups(groups or [])
        os.setgid(gid)
        os.setuid(uid)

    return drop


def ask(
    path: str, uid: int = NOBODY.pw_uid, gid: int = NOBODY.pw_gid, groups: list[int] | None = None
) -> dict:
    r = subprocess.run(
        [SYSTEM_PY, "-c", CLIENT, path],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=as_user(uid, gid, groups),
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # one line, whatever the answer
    return json.loads(lines[0])


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="ctl-auth-")
    os.chmod(d, 0o755)  # nobody may reach the socket's directory
    yield Path(d)
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _server(path: Path, **kw) -> ControlServer:
    return ControlServer(str(path), lambda req: {"cmd": req["cmd"], "answered": True}, **kw).start()


def test_stranger_refused_by_peer_credentials(sockdir, caplog):
    path = sockdir / "c.sock"
    srv = _server(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # the file mode keeps nobody out at connect()
        assert ask(str(path)) == {"connect_error": 13}  # EACCES
        # widened by mistake: SO_PEERCRED still refuses, with one line
        os.chmod(path, 0o666)
        with caplog.at_level(logging.WARNING, logger="daemonkit.control"):
            got = ask(str(path))
            assert got["ok"] is False
            assert re.match(
                r"permission denied: uid 65534 \(nobody\) is not root, the "
                r"daemon's user",
                got["error"],
            ), got
            deadline = time.monotonic() + 5
            while srv.refused < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert srv.refused == 1
        assert any("refused pid" in r.message and "uid 65534" in r.message for r in caplog.records)
        # root is served
        assert control_request(str(path), "status") == {"cmd": "status", "answered": True}
        assert ask(str(path), uid=0, gid=0)["ok"] is True
    finally:
        srv.close()


def test_group_member_accepted_others_refused(sockdir):
    path = sockdir / "g.sock"
    srv = _server(path, group=NOGROUP)
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY.pw_gid
        # nobody's primary group is the control group: accepted
        assert ask(str(path))["result"] == {"cmd": "status", "answered": True}
        # uid 1 (daemon) is not in the group: widened socket, still refused
        daemon = pwd.getpwnam("daemon")
        os.chmod(path, 0o666)
        got = ask(str(path), uid=daemon.pw_uid, gid=daemon.pw_gid)
        assert got["ok"] is False and f"group {NOGROUP}" in got["error"]
        # the process's gid is the group, or one of its supplementary groups: accepted
        assert ask(str(path), uid=daemon.pw_uid, gid=NOBODY.pw_gid)["ok"] is True
        assert (
            ask(str(path), uid=daemon.pw_uid, gid=daemon.pw_gid, groups=[NOBODY.pw_gid])["ok"]
            is True
        )
        assert srv.refused == 1
    finally:
        srv.close()


def test_allowed_rule_and_credentials():
    srv = ControlServer("/nonexistent/x.sock", lambda r: None)
    srv.uid = 1234  # as if the daemon ran as uid 1234
    assert srv.allowed(0, 0) and srv.allowed(1234, 99)
    assert not srv.allowed(4321, 99)
    srv.gid = 777
    assert srv.allowed(4321, 777) and not srv.allowed(4321, 778)
    with pytest.raises(ConfigError, match="does not exist"):
        ControlServer("/nonexistent/x.sock", lambda r: None, group="no-such-group-xyz")
    import socket

    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.geteuid(), os.getegid())


def test_receiver_control_group_end_to_end(tmp_path):
    """The real remus-receiver: --control-group makes the socket 0660 for the
    group; nobody (in it) gets status; without the group nobody is refused even
    when the socket is world-writable, and the daemon logs it."""
    backup = SimHost(sim_dir("ctl-auth-")).start()
    d = Path(tempfile.mkdtemp(prefix="ctl-auth-rx-"))
    os.chmod(d, 0o755)
    exe = os.path.join(os.path.dirname(sys.executable), "remus-receiver")
    procs = []
    try:
        for name, extra in (("grp", ["--control-group", NOGROUP]), ("solo", [])):
            ctl = d / f"{name}.sock"
            log = open(d / f"{name}.log", "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [
                        exe,
                        "--listen",
                        "127.0.0.1:0",
                        "--insecure",
                        "--sim-dir",
                        backup.dir,
                        "--control",
                        str(ctl),
                        "--config",
                        "/dev/null",
                        *extra,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
            )
            log.close()
        deadline = time.monotonic() + 20
        while not ((d / "grp.sock").exists() and (d / "solo.sock").exists()):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        time.sleep(0.2)
        st = os.stat(d / "grp.sock")
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY.pw_gid
        got = ask(str(d / "grp.sock"))
        assert got["ok"] is True and got["result"]["role"] == "receiver"
        assert stat.S_IMODE(os.stat(d / "solo.sock").st_mode) == 0o600
        os.chmod(d / "solo.sock", 0o666)
        got = ask(str(d / "solo.sock"))
        assert got["ok"] is False and "permission denied" in got["error"]
        deadline = time.monotonic() + 5
        while "control socket: refused" not in (d / "solo.log").read_text():
            assert time.monotonic() < deadline, (d / "solo.log").read_text()
            time.sleep(0.05)
        assert control_request(str(d / "solo.sock"), "ping") == "pong"  # root still served
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            assert p.wait(15) == 0
        backup.cleanup()
        import shutil

        shutil.rmtree(d, ignore_errors=True)
