"""The domain interface's contract (xenbind.hypervisor), as any hypervisor must keep it.

Written against the ``harness`` fixture only (see conftest.py), so the same
tests would run against real Xen on a dom0.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import numpy as np
import pytest

from xenbind import PAGE_SIZE
from xenbind.errors import DomainError
from xenbind.types import DomainConfig


def _all_pages(dom) -> np.ndarray:
    out = np.empty((dom.info().pages, PAGE_SIZE), dtype=np.uint8)
    dom.gather(np.arange(len(out), dtype=np.uint64), out)
    return out


def _config(info) -> DomainConfig:
    return DomainConfig(
        info.name + "-backup", info.uuid, info.pages, info.vcpus, info.hvm, dict(info.extra)
    )


def test_lookup_by_domid_name_and_uuid(harness):
    dom = harness.new_guest("writer")
    info = dom.info()
    hv = harness.hypervisor
    for ref in (info.domid, str(info.domid), info.name, info.uuid):
        assert hv.lookup(ref).info().domid == info.domid
    assert info.domid in [i.domid for i in hv.list()]
    assert info.pages == 16 << 8 and info.state == "running"
    with pytest.raises(DomainError, match="lookup"):
        hv.lookup("no-such-domain")


def test_pause_stops_writes_and_pauses_are_counted(harness):
    dom = harness.new_guest("writer")
    dom.pause()
    assert dom.info().state == "paused"
    d0, s0 = harness.digest(dom), harness.step(dom)
    time.sleep(0.05)
    assert harness.digest(dom) == d0 and harness.step(dom) == s0
    dom.pause()  # a second pauser (the operator beside the sender)
    dom.unpause()
    time.sleep(0.05)
    assert harness.digest(dom) == d0, "ran after one of two unpauses"
    dom.unpause()
    deadline = time.monotonic() + 5
    while harness.digest(dom) == d0:
        assert time.monotonic() < deadline, "guest did not run after the last unpause"
        time.sleep(0.01)
    with pytest.raises(DomainError, match="unpause"):
        dom.unpause()


def test_dirty_bitmap_sees_exactly_the_written_pages(harness):
    dom = harness.new_guest("writer", seed=7)
    dom.pause()
    with pytest.raises(DomainError, match="read_and_clear_dirty"):
        dom.read_and_clear_dirty()
    dom.enable_logdirty()
    assert len(dom.read_and_clear_dirty()) == 0, "pages dirty while paused since enable"
    for n in (1, 300, 3000):
        before = _all_pages(dom)
        start = harness.step(dom)
        harness.run_exactly(dom, n)
        dirty = dom.read_and_clear_dirty()
        assert dirty.dtype == np.uint64 and np.all(np.diff(dirty.astype(np.int64)) > 0)
        changed = np.flatnonzero((_all_pages(dom) != before).any(axis=1))
        assert set(changed.tolist()) <= set(dirty.tolist()), (
            "a changed page is not in the dirty set"
        )
        expected = harness.written_pages(dom, start, start + n)
        if expected is not None:
            assert set(dirty.tolist()) == expected
        assert len(dom.read_and_clear_dirty()) == 0, "read did not clear"
    dom.disable_logdirty()


def test_dirty_tracking_while_running(harness):
    """Pages written while the reader scans are reported once, never lost."""
    dom = harness.new_guest("writer", seed=3)
    dom.pause()
    dom.enable_logdirty()
    dom.read_and_clear_dirty()
    start = harness.step(dom)
    seen: set[int] = set()
    dom.unpause()
    for _ in range(20):
        seen.update(dom.read_and_clear_dirty().tolist())
        time.sleep(0.002)
    dom.pause()
    seen.update(dom.read_and_clear_dirty().tolist())
    expected = harness.written_pages(dom, start, harness.step(dom))
    if expected is not None:
        assert seen == expected


def test_gather_after_pause_equals_digest(harness):
    dom = harness.new_guest("writer")
    time.sleep(0.02)
    dom.pause()
    assert hashlib.sha256(_all_pages(dom)).hexdigest() == harness.digest(dom)
    # a batch in arbitrary order, into a larger buffer
    pfns = np.array([5, 0, 4000, 17, 5], dtype=np.uint64)
    out = np.zeros((8, PAGE_SIZE), dtype=np.uint8)
    dom.gather(pfns, out)
    full = _all_pages(dom)
    assert np.array_equal(out[:5], full[pfns.astype(np.int64)]) and not out[5:].any()


def test_gather_scatter_refuse_pfns_past_the_end(harness):
    dom = harness.new_guest("writer")
    dom.pause()
    pages = dom.info().pages
    d0 = harness.digest(dom)
    buf = np.full((2, PAGE_SIZE), 0xAB, dtype=np.uint8)
    with pytest.raises(DomainError, match="scatter"):
        dom.scatter(np.array([1, pages], dtype=np.uint64), buf)
    with pytest.raises(DomainError, match="gather"):
        dom.gather(np.array([pages + 10], dtype=np.uint64), buf)
    with pytest.raises(DomainError, match="gather"):
        dom.gather(np.array([1, 2, 3], dtype=np.uint64), buf)  # buffer too small
    assert harness.digest(dom) == d0, "a refused scatter wrote something"
    dom.scatter(np.array([1, 2], dtype=np.uint64), buf)
    assert harness.digest(dom) != d0


@pytest.mark.parametrize("kind", ["writer", "ledger", "hotset"])
def test_backup_resumes_exactly_where_the_checkpoint_left_it(harness, kind):
    hv = harness.hypervisor
    primary = harness.new_guest(kind, seed=11)
    time.sleep(0.05)
    primary.pause()
    ctx = primary.get_context()
    pages = _all_pages(primary)
    backup = harness.track(hv.create_backup(_config(primary.info())))
    assert backup.info().state == "paused"
    backup.scatter(np.arange(len(pages), dtype=np.uint64), pages)
    backup.set_context(ctx)
    assert harness.digest(backup) == harness.digest(primary)
    assert backup.get_context() == ctx
    harness.run_exactly(primary, 500)
    harness.run_exactly(backup, 500)
    assert harness.step(backup) == harness.step(primary)
    assert harness.digest(backup) == harness.digest(primary)
    assert backup.get_context().hvm_context == primary.get_context().hvm_context


def test_set_context_refuses_foreign_state(harness):
    hv = harness.hypervisor
    primary = harness.new_guest("writer")
    primary.pause()
    ctx = primary.get_context()
    backup = harness.track(hv.create_backup(_config(primary.info())))
    with pytest.raises(DomainError, match="set_context"):
        backup.set_context(replace(ctx, magic_pfns=(1, 2, 3)))
    with pytest.raises(DomainError, match="set_context"):
        backup.set_context(replace(ctx, hvm_context=ctx.hvm_context[:10]))
    with pytest.raises(DomainError, match="set_context"):
        backup.set_context(replace(ctx, device_model=b"x" * len(ctx.device_model)))


def test_destroyed_domain_is_gone(harness):
    dom = harness.new_guest("idle")
    domid = dom.info().domid
    harness.hypervisor.lookup(domid).destroy()
    with pytest.raises(DomainError):
        harness.hypervisor.lookup(domid)
    with pytest.raises(DomainError, match="pause"):
        dom.pause()
