"""receiver pieces that need no process: the staging area's bounds, the
configuration (defaults < TOML < flags) and the failover timeout rule."""

from __future__ import annotations

import numpy as np
import pytest

from receiver.config import load_config
from receiver.staging import Staging, StagingFull
from xenbind import PAGE_SIZE
from xenbind.errors import ConfigError, RemusError


def _pages(n: int) -> np.ndarray:
    return np.zeros((n, PAGE_SIZE), dtype=np.uint8)


def test_staging_cap_is_checked_before_keeping():
    st = Staging(p2m_size=100, max_bytes=10 * PAGE_SIZE)
    st.add(np.arange(6, dtype=np.uint64), _pages(6))
    with pytest.raises(StagingFull, match="staging cap"):
        st.add(np.arange(6, 11, dtype=np.uint64), _pages(5))
    assert st.pages == 6  # the refused batch was not kept
    st.add(np.arange(6, 10, dtype=np.uint64), _pages(4))
    assert st.bytes == 10 * PAGE_SIZE
    st.discard()
    assert st.pages == 0


def test_staging_refuses_pfns_past_the_end_and_bad_shapes():
    st = Staging(p2m_size=8, max_bytes=1 << 20)
    with pytest.raises(RemusError, match="past the last page"):
        st.add(np.array([3, 8], dtype=np.uint64), _pages(2))
    with pytest.raises(RemusError, match="shape"):
        st.add(np.array([1], dtype=np.uint64), _pages(2))
    assert st.pages == 0


def _cfg(tmp_path, *flags, toml=""):
    path = tmp_path / "r.toml"
    path.write_text(toml)
    return load_config(["--config", str(path), *flags])


def test_failover_timeout_default_rule(tmp_path):
    cfg = _cfg(tmp_path, "--listen", "127.0.0.1:7000")
    assert cfg.failover_timeout_for(200, 200) == 900  # the default interval: under 1 s
    assert cfg.failover_timeout_for(100, 100) == 600
    assert cfg.failover_timeout_for(10, 10) == 500
    assert cfg.failover_timeout_for(100, 400) == 1500  # a slow heartbeat stretches it
    cfg = _cfg(tmp_path, "--listen", "127.0.0.1:7000", "--failover-timeout", "250")
    assert cfg.failover_timeout_for(200, 200) == 250


def test_config_precedence_and_errors(tmp_path):
    cfg = _cfg(
        tmp_path,
        "--max-staged-mb",
        "8",
        toml='listen = "[::1]:7001"\nmax-staged-mb = 4\non_violation = "failover"\n',
    )
    assert (cfg.host, cfg.port) == ("::1", 7001)
    assert cfg.max_staged_bytes == 8 << 20  # the flag wins over the file
    assert cfg.on_violation == "failover" and cfg.on_link_loss == "failover"
    assert cfg.on_unprotect == "destroy" and not cfg.insecure
    with pytest.raises(ConfigError, match="not one of"):
        _cfg(tmp_path, toml='listen = "h:1"\non-violation = "panic"\n')
    with pytest.raises(ConfigError, match="HOST:PORT"):
        _cfg(tmp_path, "--listen", "nohost")
    with pytest.raises(ConfigError, match="--listen"):
        _cfg(tmp_path)
