"""remusd's configuration, remusctl's parsing and rendering, the CLI contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemonkit.config import parse_args_with_config
from remusd import ctl
from remusd.config import (
    MIN_INTERVAL_MS,
    ProtectRequest,
    Target,
    build_parser,
    check_interval,
    validate,
)
from xenbind.errors import ConfigError


def _args(argv=(), cfg=None):
    return parse_args_with_config(build_parser(), list(argv), default_config=cfg)


def test_codecs_are_the_one_definition():
    """remusd offers exactly the codecs xenbind.compress defines (no copy of the list)."""
    from remusd import config
    from xenbind.compress import CODECS

    assert config.CODECS is CODECS
    assert build_parser().parse_args(["--codec", "none"]).codec == "none"
    for codec in CODECS:
        assert (
            ProtectRequest.from_json(
                {"domain": "d", "target": "file:/x", "codec": codec}, _args()
            ).codec
            == codec
        )
    with pytest.raises(ConfigError, match="unknown"):
        ProtectRequest.from_json({"domain": "d", "target": "file:/x", "codec": "zstd"}, _args())


def test_target_parse():
    assert Target.parse("10.0.0.2:7788") == Target("tcp", host="10.0.0.2", port=7788)
    assert str(Target.parse("[::1]:7788")) == "[::1]:7788"
    assert Target.parse("file:/tmp/x") == Target("file", path="/tmp/x")
    for bad in ("file:", "host", "host:0", "host:70000", ":1"):
        with pytest.raises(ConfigError):
            Target.parse(bad)


def test_interval_bounds():
    assert check_interval(MIN_INTERVAL_MS) == MIN_INTERVAL_MS
    assert check_interval(10) == 10
    for bad in (MIN_INTERVAL_MS - 1, 0, -5, 60_001, 1.5, True):
        with pytest.raises(ConfigError):
            check_interval(bad)


def test_defaults_and_toml(tmp_path):
    a = _args()
    assert (a.interval, a.codec, a.control, a.insecure) == (
        200,
        "xen",
        "/run/remus/remusd.sock",
        False,
    )
    cfg = tmp_path / "remusd.toml"
    cfg.write_text(
        'interval = 50\ncodec = "seed"\nack-timeout = 0.5\ninsecure = true\n'
        'protect = ["ledger=127.0.0.1:7788", "3=file:/tmp/s"]\n'
    )
    a = _args(["--interval", "30"], cfg=str(cfg))
    assert a.interval == 30 and a.codec == "seed" and a.ack_timeout == 0.5 and a.insecure
    reqs = validate(a)
    assert reqs[0] == ProtectRequest("ledger", Target("tcp", "127.0.0.1", 7788), 30, "seed")
    assert reqs[1].target.kind == "file" and reqs[1].domain == "3"
    cfg.write_text(f"interval = {MIN_INTERVAL_MS - 1}\n")
    with pytest.raises(ConfigError, match="out of range"):
        validate(_args(cfg=str(cfg)))
    cfg.write_text('protect = ["nodomain"]\n')
    with pytest.raises(ConfigError, match="DOMAIN="):
        validate(_args(cfg=str(cfg)))
    cfg.write_text("retry-min = 5\nretry-max = 1\n")
    with pytest.raises(ConfigError, match="retry-max"):
        validate(_args(cfg=str(cfg)))


def test_protect_request_from_json():
    d = _args(["--interval", "100", "--codec", "none"])
    r = ProtectRequest.from_json({"domain": 3, "target": "h:1"}, d)
    assert (r.domain, r.interval_ms, r.codec, r.verify) == ("3", 100, "none", False)
    r = ProtectRequest.from_json(
        {"domain": "x", "target": "file:/f", "interval_ms": 20, "codec": "seed", "verify": True}, d
    )
    assert (r.interval_ms, r.codec, r.verify) == (20, "seed", True)
    for bad in (
        {"target": "h:1"},
        {"domain": "x"},
        {"domain": "x", "target": "h:1", "codec": "zip"},
        {"domain": "x", "target": "h:1", "verify": "yes"},
        {"domain": "x", "target": "h:1", "interval_ms": "fast"},
        {"domain": True, "target": "h:1"},
    ):
        with pytest.raises(ConfigError):
            ProtectRequest.from_json(bad, d)


def test_remusctl_parsing(tmp_path, monkeypatch):
    p = ctl.build_parser()
    monkeypatch.chdir(tmp_path)
    a = p.parse_args(["protect", "ledger", "--to", "file:rel.stream", "--interval", "50"])
    assert a.to == f"file:{tmp_path}/rel.stream" and a.interval == 50 and a.verify is None
    with pytest.raises(SystemExit):
        p.parse_args(["protect", "ledger", "--to", "nohostport"])
    with pytest.raises(SystemExit):
        p.parse_args(["protect", "ledger", "--to", "h:1", "--interval", str(MIN_INTERVAL_MS - 1)])
    with pytest.raises(SystemExit):
        p.parse_args(["status", "--bogus"])


def _dom(**kw):
    d = {
        "domid": 3,
        "name": "ledger",
        "state": "protected",
        "reason": None,
        "since": 0.0,
        "target": "127.0.0.1:7788",
        "codec": "seed",
        "interval_ms": 100,
        "verify": False,
        "checkpoints": 42,
        "acked": 41,
        "last_pause_ms": 0.731,
        "dirty_pages": 120,
        "bytes_sent": 12_345_678,
        "compression_ratio": 7.5,
        "session": "ab" * 16,
        "sessions": 1,
        "retries": 0,
        "verify_mismatches": 0,
    }
    d.update(kw)
    return d


def test_render_status_remusd():
    st = {
        "daemon": "remusd",
        "version": "0.1.0",
        "pid": 1,
        "hypervisor": "sim",
        "uptime_s": 3.0,
        "domains": [
            _dom(),
            _dom(
                domid=4,
                name="web",
                state="unprotected",
                reason="backup lost: refused",
                acked=None,
                compression_ratio=None,
                last_pause_ms=None,
            ),
        ],
    }
    out = ctl.render_status(st)
    lines = out.splitlines()
    assert lines[1].split()[:3] == ["DOMAIN", "STATE", "CHECKPOINTS"]
    assert "ledger (3)" in lines[2] and "protected" in lines[2] and "7.5:1" in lines[2]
    assert "12.3 MB" in lines[2] and "0.73" in lines[2]
    assert "web (4)" in lines[3] and "unprotected" in lines[3]
    assert "web: backup lost: refused" in out
    assert "no protected domains" in ctl.render_status(dict(st, domains=[]))


def test_render_status_other_daemon():
    st = {
        "daemon": "remus-receiver",
        "version": "0.1.0",
        "listen": "127.0.0.1:7788",
        "sessions": [{"domain": "ledger", "state": "committed", "committed": 12}],
    }
    out = ctl.render_status(st)
    assert "remus-receiver" in out and "127.0.0.1:7788" in out
    assert "DOMAIN" in out and "committed" in out and "12" in out


def test_remusctl_unreachable(tmp_path, capsys):
    rc = ctl.main(["--control", str(tmp_path / "none.sock"), "status"])
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("mod", ["remusd.cli", "remusd.ctl"])
def test_help_is_a_manual(mod):
    r = subprocess.run(
        [sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    for section in ("examples:", "exit status:", "files:"):
        assert section in r.stdout, section


def test_remusd_exits_at_once_without_xen(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "remusd.cli",
            "--control",
            str(tmp_path / "c.sock"),
            "--config",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "Xen" in r.stderr or "hypervisor" in r.stderr
    assert not (tmp_path / "c.sock").exists()


def test_remusd_bad_config_exits_2(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("nonsense = 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "remusd.cli", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "unknown key 'nonsense'" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "remusd.cli",
            "--config",
            "/dev/null",
            "--protect",
            "x=127.0.0.1:9",
            "--sim-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--insecure" in r.stderr


def test_merge_sorted_is_the_sorted_union():
    """capture() merges the pre-scan's PFNs with the paused scan's: the union,
    sorted, each PFN once, whatever the overlap (an empty side included)."""
    import numpy as np
    from hypothesis import given
    from hypothesis import strategies as st

    from remusd.epoch import merge_sorted

    pfn_sets = st.sets(st.integers(0, 2**20), max_size=300)

    @given(pfn_sets, pfn_sets)
    def check(a: set, b: set) -> None:
        got = merge_sorted(
            np.array(sorted(a), dtype=np.uint64), np.array(sorted(b), dtype=np.uint64)
        )
        assert got.dtype == np.uint64
        assert got.tolist() == sorted(a | b)

    check()


def test_prescan_is_on_by_default_and_off_by_flag_or_toml(tmp_path):
    assert _args().prescan is True
    assert _args(["--no-prescan"]).prescan is False
    cfg = tmp_path / "remusd.toml"
    cfg.write_text("prescan = false\n")
    assert _args(cfg=str(cfg)).prescan is False
    cfg.write_text('prescan = "no"\n')
    with pytest.raises(ConfigError, match="expected true or false"):
        _args(cfg=str(cfg))
