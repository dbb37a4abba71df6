"""daemonkit (config, logs, systemd, control): config precedence, logging format, sd_notify, control socket."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import stat
import threading

import pytest

from daemonkit.config import parse_args_with_config
from daemonkit.control import ControlError, ControlServer, control_request
from daemonkit.logs import setup_logging
from daemonkit.systemd import Watchdog, sd_notify, watchdog_interval
from daemonkit.transport import PlainTransport, parse_hostport
from xenbind.errors import ConfigError, RemusError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--control", default="/run/x.sock")
    p.add_argument("--interval", type=int, default=200)
    p.add_argument("--timeout", type=float, default=1.5)
    p.add_argument("--codec", choices=["seed", "xen", "none"], default="seed")
    p.add_argument("--insecure", action="store_true")
    return p


def test_config_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('control = "/tmp/from-file"\ninterval = 50\ninsecure = true\ncodec = "xen"\n')
    args = parse_args_with_config(_parser(), ["--config", str(cfg), "--interval", "30"])
    assert args.control == "/tmp/from-file"  # file beats default
    assert args.interval == 30  # explicit flag beats file
    assert args.insecure is True
    assert args.codec == "xen"
    assert args.timeout == 1.5  # default kept
    assert args.config == str(cfg)


def test_config_flag_equal_to_default_still_wins(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("interval = 50\n")
    args = parse_args_with_config(_parser(), ["--config", str(cfg), "--interval", "200"])
    assert args.interval == 200


def test_default_config_may_be_absent_named_must_exist(tmp_path):
    args = parse_args_with_config(_parser(), [], default_config=str(tmp_path / "nope.toml"))
    assert args.interval == 200 and args.config is None
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args_with_config(_parser(), ["--config", str(tmp_path / "nope.toml")])


def test_default_config_is_read(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text("timeout = 3\n")
    args = parse_args_with_config(_parser(), [], default_config=str(cfg))
    assert args.timeout == 3.0 and isinstance(args.timeout, float)


@pytest.mark.parametrize(
    "text, match",
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ('interval = "fast"\n', "key 'interval'"),
        ("interval = 1.5\n", "key 'interval'"),
        ('interval = "100"\n', "key 'interval': expected a number, got the string '100'"),
        ('timeout = "1.5"\n', "key 'timeout': expected a number"),
        ('insecure = "yes"\n', "true or false"),
        ('codec = "zip"\n', "not one of"),
        ("interval = [1]\n", "single value"),
        ("this is not toml", "c.toml"),
    ],
)
def test_config_errors(tmp_path, text, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_args_with_config(_parser(), ["--config", str(cfg)])


def test_a_string_is_not_a_number_for_a_validating_type(tmp_path):
    # the daemons' own converters (receiver.config._positive(int) and the
    # like) accept the text "100" from a command line; from TOML it is a typo
    def positive(text: str) -> int:
        n = int(text)
        if n <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return n

    p = _parser()
    p.add_argument("--pages", type=positive, default=1)
    p.add_argument("--name", type=str, default="x")
    cfg = tmp_path / "c.toml"
    cfg.write_text('pages = "100"\n')
    with pytest.raises(ConfigError, match="'pages': expected a number"):
        parse_args_with_config(p, ["--config", str(cfg)])
    cfg.write_text('pages = 100\nname = "100"\n')  # a string option keeps its string
    args = parse_args_with_config(p, ["--config", str(cfg)])
    assert (args.pages, args.name) == (100, "100")
    assert parse_args_with_config(p, ["--pages", "7"]).pages == 7  # the command line is text


def test_dash_and_underscore_keys(tmp_path):
    p = _parser()
    p.add_argument("--failover-timeout", type=float, default=1.0)
    cfg = tmp_path / "c.toml"
    cfg.write_text("failover-timeout = 2.5\n")
    assert parse_args_with_config(p, ["--config", str(cfg)]).failover_timeout == 2.5
    cfg.write_text("failover_timeout = 3.5\n")
    assert parse_args_with_config(p, ["--config", str(cfg)]).failover_timeout == 3.5


def test_logging_plain_and_journal(tmp_path, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    logging.getLogger("t").warning("hello")
    logging.getLogger("t").debug("hidden")
    line = buf.getvalue().strip()
    assert line.endswith("WARNING t: hello") and line[:4].isdigit()
    assert "hidden" not in buf.getvalue()

    f = open(tmp_path / "j", "w")  # noqa: SIM115 - stands in for the journal stream
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    setup_logging("debug", stream=f)
    logging.getLogger("t").error("bad\nsecond line")
    logging.getLogger("t").info("fine")
    f.close()
    lines = (tmp_path / "j").read_text().splitlines()
    assert lines == ["<3>t: bad", "<3>second line", "<6>t: fine"]
    setup_logging("warning")


def test_logging_bad_level():
    with pytest.raises(ConfigError):
        setup_logging("loud", stream=io.StringIO())


def test_sd_notify_and_watchdog(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify("READY=1\nSTATUS=ok") is True
    assert srv.recv(100) == b"READY=1\nSTATUS=ok"

    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == pytest.approx(0.05)
    healthy = threading.Event()
    healthy.set()
    wd = Watchdog(healthy.is_set).start()
    try:
        assert srv.recv(100) == b"WATCHDOG=1"
    finally:
        wd.stop()
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None
    srv.close()


def test_sd_notify_abstract(monkeypatch):
    name = f"remus-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind("\0" + name)
    srv.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert sd_notify("STATUS=x")
    assert srv.recv(100) == b"STATUS=x"
    srv.close()


def _handler(req):
    if req["cmd"] == "echo":
        return {"args": req.get("x")}
    if req["cmd"] == "fail":
        raise RemusError("no such domain: 7")
    if req["cmd"] == "crash":
        raise KeyError("boom")
    raise RemusError(f"unknown command {req['cmd']!r}")


def test_control_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "sub" / "ctl.sock")
    srv = ControlServer(path, _handler, max_request=1024).start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert control_request(path, "echo", x=[1, 2]) == {"args": [1, 2]}
        with pytest.raises(ControlError, match="no such domain: 7"):
            control_request(path, "fail")
        with pytest.raises(ControlError, match="internal error"):
            control_request(path, "crash")
        # several requests on one connection, then malformed and oversized input
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b'{"cmd":"echo","x":1}\n{"cmd":"echo","x":2}\n')
            f = s.makefile("rb")
            assert json.loads(f.readline())["result"] == {"args": 1}
            assert json.loads(f.readline())["result"] == {"args": 2}
            s.sendall(b"[1,2]\n")
            assert 'string "cmd"' in json.loads(f.readline())["error"]
            assert f.readline() == b""  # closed after a malformed request
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"x" * 5000)
            resp = json.loads(s.makefile("rb").readline())
            assert resp["ok"] is False and "longer than 1024" in resp["error"]
        # a second server on a live socket is refused
        with pytest.raises(ConfigError, match="in use"):
            ControlServer(path, _handler).start()
    finally:
        srv.close()
    assert not os.path.exists(path)
    with pytest.raises(ControlError, match="does not exist"):
        control_request(path, "echo")


def test_control_stale_socket_replaced(tmp_path):
    path = str(tmp_path / "ctl.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    srv = ControlServer(path, _handler).start()
    try:
        assert control_request(path, "echo", x=3) == {"args": 3}
    finally:
        srv.close()
    (tmp_path / "plain").write_text("")
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(str(tmp_path / "plain"), _handler).start()


def test_parse_hostport():
    assert parse_hostport("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_hostport("[::1]:9") == ("::1", 9)
    for bad in ("nohost", ":80", "h:", "h:99999", "h:x"):
        with pytest.raises(ConfigError):
            parse_hostport(bad)


def test_transport_send_buffers_large():
    import numpy as np

    a, b = socket.socketpair()
    ta, tb = PlainTransport(a), PlainTransport(b)
    bufs = [np.arange(300_000, dtype=np.uint32), b"x" * 7, memoryview(b"tail")] + [b"z"] * 2000
    expected = b"".join(bytes(memoryview(x).cast("B")) for x in bufs)
    got = bytearray()

    def reader():
        while len(got) < len(expected):
            chunk = tb.recv(1 << 16)
            if not chunk:
                break
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    assert ta.send_buffers(bufs) == len(expected)
    t.join(10)
    assert bytes(got) == expected
    ta.close()
    tb.close()
