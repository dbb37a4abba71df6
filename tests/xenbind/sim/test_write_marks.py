"""Reading the log from the vCPU's write marks (xenbind.sim.dirty.WriteMarks).

Reads take the marks instead of walking the guest; these tests check that
they still find every written page: while the guest writes through the
sets' swap, paused and running reads alike, in regions no mark covered a
moment before; that a domain made without marks walks; and, when a mark is
missing, that the check against a walk finds the page, returns it and
stops trusting the marks.
"""

from __future__ import annotations

import mmap
import os
import time

import numpy as np
import pytest

from xenbind.sim import layout as L
from xenbind.sim.dirty import MARK_REGION_PAGES, MARK_SETS, WriteMarks, marks_file_size
from xenbind.sim.guest import make_workload
from xenbind.sim.workloads import MAGIC_PAGES, Registers

MEMORY = 64 << 20  # 16,384 pages: 256 regions of 64


def _written(dom, start: int, stop: int) -> set[int]:
    regs = Registers.unpack(dom.get_context().hvm_context)
    return set(make_workload(regs, dom.pages - MAGIC_PAGES).pages_for(start, stop).tolist())


def _uffd_host(sim_host):
    if sim_host.hv.ping()["dirty_mode"] != "uffd-wp":
        pytest.skip("this kernel lacks userfaultfd async write-protect / PAGEMAP_SCAN")
    return sim_host


def _marks_mm(dom) -> mmap.mmap:
    """A second mapping of the domain's write marks (as a careless writer would hold)."""
    fd = os.open(L.path(dom.dir, dom.domid, "marks"), os.O_RDWR)
    try:
        return mmap.mmap(fd, marks_file_size(dom.pages))
    finally:
        os.close(fd)


def test_marks_unit_take_is_exact_sorted_and_clears_and_the_sets_are_apart():
    pages = 3 * MARK_REGION_PAGES + 7  # a padded last region
    buf = bytearray(marks_file_size(pages))
    sets = [WriteMarks(buf, pages, i) for i in range(MARK_SETS)]
    m = sets[0]
    assert m.regions == 4 and len(buf) == MARK_SETS * (4 * MARK_REGION_PAGES + 4)
    w = np.array([pages - 1, 5, 65, 5, 128, 0], dtype=np.int64)
    m.mark(w)
    assert m.region.tolist() == [1, 1, 1, 1] and not sets[1].page.any()
    got = m.take()
    assert got.dtype == np.uint64 and got.tolist() == sorted(set(w.tolist()))
    assert not m.page.any() and not m.region.any() and len(m.take()) == 0
    sets[1].mark(np.array([70], dtype=np.int64))
    assert len(m.take()) == 0 and sets[1].take().tolist() == [70]
    with pytest.raises(ValueError):
        WriteMarks(buf, pages, MARK_SETS)


def test_reads_from_the_marks_find_every_page_running_and_paused(sim_host, monkeypatch):
    """Reads while the guest writes (swap, take), then paused ones: every
    written page is found once the reads are joined, each running read's
    check against a walk agrees, and nothing is found twice when nothing
    was written."""
    monkeypatch.setenv("XENBIND_SIM_MARKS_CHECK", "1")
    host = _uffd_host(sim_host)
    dom = host.create(MEMORY, "random", 5, 20000.0, "m", paused=True)
    dom.enable_logdirty()
    assert len(dom.read_and_clear_dirty()) == 0
    assert int(dom._status()[L.W_MARKS]) == MARK_REGION_PAGES
    start = dom.step
    dom.unpause()
    seen: set[int] = set()
    for _ in range(25):
        time.sleep(0.005)
        running = dom.read_and_clear_dirty()  # swap + take, checked against a walk
        dom.pause()
        paused = dom.read_and_clear_dirty()  # both sets
        for got in (running, paused):
            assert got.dtype == np.uint64 and np.all(np.diff(got.astype(np.int64)) > 0)
            seen.update(got.tolist())
        assert dom.marks_trusted and dom.marks_misses == 0
        dom.unpause()
    dom.pause()
    seen.update(dom.read_and_clear_dirty().tolist())
    assert dom.marks_checks == 25
    assert seen == _written(dom, start, dom.step)
    assert len(dom.read_and_clear_dirty()) == 0, "a paused read did not clear the marks"


def test_a_domain_without_marks_walks(sim_host):
    host = _uffd_host(sim_host)
    dom = host.create(MEMORY, "scan", 1, 1e6, "w", paused=True, write_marks=False)
    assert dom.dirty_mode == "uffd-wp" and int(dom._status()[L.W_MARKS]) == 0
    assert not os.path.exists(L.path(dom.dir, dom.domid, "marks"))
    dom.enable_logdirty()
    start = dom.step
    dom.stop_at(start + 500)
    dom.unpause()
    dom.wait_step(start + 500, timeout=20)
    dom.pause()
    assert set(dom.read_and_clear_dirty().tolist()) == _written(dom, start, start + 500)
    assert dom.marks_checks == 0


def test_a_write_the_marks_do_not_show_is_found_by_the_check(sim_host, monkeypatch):
    """A page written in a region the marks skip (its marks erased here, as
    a workload that forgot to mark would leave them) is still returned: the
    running read's check walks the log and finds it, and the marks are not
    trusted again (every later read walks)."""
    monkeypatch.setenv("XENBIND_SIM_MARKS_CHECK", "1")
    host = _uffd_host(sim_host)
    dom = host.create(MEMORY, "scan", 1, 1e6, "s", paused=True)
    dom.enable_logdirty()  # the baseline: every page later written is owed
    start = dom.step
    dom.stop_at(start + 3000)  # scan: pages start .. start+2999
    dom.unpause()
    dom.wait_step(start + 3000, timeout=20)  # now idle, not paused: reads are running reads
    want = _written(dom, start, start + 3000)
    victim = max(want) // MARK_REGION_PAGES
    mm = _marks_mm(dom)
    for i in range(MARK_SETS):  # erase the victim region's marks: the marks skip it
        marks = WriteMarks(mm, dom.pages, i)
        marks.region[victim] = 0
        marks.page2d[victim] = 0
    got = set(dom.read_and_clear_dirty().tolist())
    assert got == want, "a page the marks lost is missing from the read"
    assert dom.marks_misses > 0 and not dom.marks_trusted
    # from now on reads walk: a new write is found without looking at marks
    dom.stop_at(start + 3010)
    dom.wait_step(start + 3010, timeout=20)
    dom.pause()
    assert set(dom.read_and_clear_dirty().tolist()) == _written(dom, start + 3000, start + 3010)
    del marks
    mm.close()
