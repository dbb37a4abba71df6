"""xenbind.xenctrl on a real dom0 (the Xen lab runs these; elsewhere they
skip with the reason).

    REMUS_XEN_GUEST=<name|domid>   a running guest the guest checks may pause,
                                   log-dirty and read (never modified: the only
                                   write puts back the bytes just read)

Run in the lab's dom0: ``REMUS_XEN_GUEST=labguest .venv/bin/pytest -q
tests/xenbind/test_xenctrl_dom0.py tests/xenbind/test_xenstore.py``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from tests.e2e.conftest import wait_until
from xenbind import PAGE_SIZE, xenctrl

pytestmark = pytest.mark.skipif(
    not (xenctrl.binding_available() and os.path.exists(xenctrl.PRIVCMD_DEVICE)),
    reason=f"not a Xen dom0 ({xenctrl.PRIVCMD_DEVICE} missing) or binding not built",
)
GUEST = os.environ.get("REMUS_XEN_GUEST")
needs_guest = pytest.mark.skipif(not GUEST, reason="set REMUS_XEN_GUEST to a running guest")


@pytest.fixture(scope="module")
def hv():
    h = xenctrl.XenHypervisor()
    yield h
    h.close()


@pytest.fixture
def guest(hv):
    dom = hv.lookup(GUEST)
    yield dom
    dom.close()


def test_list_and_dom0(hv):
    infos = {i.domid: i for i in hv.list()}
    assert 0 in infos and infos[0].state == "running"
    d0 = hv.lookup(0).info()
    assert d0.pages > 0 and d0.vcpus >= 1
    assert d0.name in ("Domain-0", "")  # "" only when xenstored is not up


@needs_guest
def test_guest_info_and_lookup_by_name_and_uuid(hv, guest):
    info = guest.info()
    assert info.domid == guest.domid and info.pages == guest.pages > 0
    assert info.state == "running"
    assert hv.resolve(info.uuid) == guest.domid
    if info.name:
        assert hv.resolve(info.name) == guest.domid


@needs_guest
def test_pause_is_counted(guest):
    guest.pause()
    guest.pause()
    try:
        guest.unpause()
        assert guest.info().state == "paused"
    finally:
        guest.unpause()
    assert guest.info().state == "running"


#: how long the tests wait for the running lab guest to write a page (its
#: counter writes every few ms; under QEMU TCG it can get no CPU for seconds)
GUEST_WRITE_WAIT = 20.0


def wait_dirty(guest, what: str) -> None:
    """Wait up to GUEST_WRITE_WAIT for the guest to dirty a page (peeked, not cleared)."""
    wait_until(what, lambda: guest.peek_dirty().size, GUEST_WRITE_WAIT, every=0.1)


@needs_guest
def test_paused_guest_dirties_nothing_and_reads_are_stable(guest):
    guest.enable_logdirty()
    try:
        # under full emulation the guest may get no CPU for a while: wait for
        # its first write (up to GUEST_WRITE_WAIT), not a fixed sleep
        wait_dirty(guest, "a running guest's first page write")
        guest.pause()
        try:
            written = guest.read_and_clear_dirty()
            assert written.size > 0, "the pages seen dirty are gone from the log"
            assert np.all(written < guest.pages) and np.all(np.diff(written.astype(np.int64)) > 0)
            time.sleep(0.5)
            assert guest.peek_dirty().size == 0, "pages dirtied while paused"
            pfns = written[:256]
            a = np.zeros((pfns.size, PAGE_SIZE), np.uint8)
            b = np.zeros_like(a)
            guest.gather(pfns, a)
            guest.gather(pfns, b)
            assert np.array_equal(a, b)
            guest.scatter(pfns[:1], a[:1])  # put back the same bytes: write mapping works
            guest.gather(pfns[:1], b[:1])
            assert np.array_equal(a[:1], b[:1])
        finally:
            guest.unpause()
        wait_dirty(guest, "a page dirtied after unpause")
    finally:
        guest.disable_logdirty()


@needs_guest
def test_context(guest):
    ctx = guest.get_context()
    assert len(ctx.hvm_context) > 0
    if guest.info().hvm:
        import struct

        code, _inst, _len = struct.unpack_from("<HHI", ctx.hvm_context, 0)
        magic = struct.unpack_from("<I", ctx.hvm_context, 8)[0]
        assert code == 1 and magic == 0x54381286  # HVM_SAVE_CODE(HEADER), HVM_FILE_MAGIC


@needs_guest
def test_pfn_past_the_end_is_refused(guest):
    out = np.zeros((1, PAGE_SIZE), np.uint8)
    with pytest.raises(xenctrl.DomainError, match="past the domain's last page"):
        guest.gather(np.array([guest.pages], np.uint64), out)


@needs_guest
def test_present_pfns_cover_the_guests_ram_and_can_be_read(guest):
    present = guest.present_pfns()
    info = guest.info()
    assert 0 < present.size <= guest.pages
    assert present.size >= info.extra["tot_pages"] * 9 // 10  # the RAM it has, minus a little
    out = np.zeros((min(present.size, 1024), PAGE_SIZE), np.uint8)
    guest.gather(present[-out.shape[0] :], out)  # the highest present pages map
