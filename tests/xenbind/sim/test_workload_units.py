"""Unit tests of the simulator's pieces that need no host process."""

from __future__ import annotations

import os

import numpy as np
import pytest

from xenbind import PAGE_SIZE
from xenbind.sim import dirty
from xenbind.sim.guest import make_workload
from xenbind.sim.ledger import check_ledger, parse_acks
from xenbind.sim.outputs import OutputBuffer
from xenbind.sim.workloads import (
    Registers,
    RegistersError,
    h64,
    h64v,
    new_registers,
)

PAGES = 512
USABLE = PAGES - 3


def _mem() -> np.ndarray:
    return np.zeros(PAGES * PAGE_SIZE // 8, dtype=np.uint64)


def test_counter_hash_scalar_and_vector_agree():
    steps = np.array([0, 1, 2, 12345, 2**63 + 5], dtype=np.uint64)
    for lane in (0, 1, 7):
        assert h64v(99, steps, lane).tolist() == [h64(99, int(s), lane) for s in steps]
    assert h64(1, 0, 0) != h64(2, 0, 0) != h64(1, 1, 0)


def test_registers_round_trip_and_validation():
    r = new_registers("hotset", 5, 123.5)
    r.step, r.outputs = 42, 7
    blob = r.pack()
    assert len(blob) == 64 and Registers.unpack(blob) == r
    r.check_device_model(r.device_model())
    with pytest.raises(RegistersError):
        Registers.unpack(blob[:63])
    with pytest.raises(RegistersError):
        Registers.unpack(b"X" + blob[1:])
    other = Registers.unpack(blob)
    other.step += 1
    with pytest.raises(RegistersError, match="does not match"):
        other.check_device_model(r.device_model())
    with pytest.raises(RegistersError):
        new_registers("nosuch", 1, None)


@pytest.mark.parametrize("kind", ["random", "hotset", "scan", "ledger"])
def test_result_does_not_depend_on_batching(kind):
    a, b = _mem(), _mem()
    wa = make_workload(new_registers(kind, 3, 100.0), USABLE)
    wb = make_workload(new_registers(kind, 3, 100.0), USABLE)
    wa.init_memory(a)
    wb.init_memory(b)
    outa = wa.run(a, 1000, None)
    outb = []
    for n in (1, 2, 61, 300, 636):
        outb += wb.run(b, n, None)
    assert wa.regs == wb.regs and wa.regs.step == 1000
    assert np.array_equal(a, b) and outa == outb
    assert not a.reshape(PAGES, -1)[USABLE:].any(), "a workload wrote a magic page"


def test_scan_dirties_exactly_n_distinct_pages_and_hotset_stays_in_its_set():
    w = make_workload(new_registers("scan", 1, 1.0), USABLE)
    assert len(set(w.pages_for(10, 110).tolist())) == 100
    h = make_workload(new_registers("hotset", 1, 1.0, a=64, b=1.2), USABLE)
    pages = h.pages_for(0, 20000)
    assert len(set(pages.tolist())) <= 64
    counts = np.bincount(pages, minlength=USABLE)
    top = np.sort(counts)[::-1]
    assert top[0] > 5 * top[30], "no Zipf skew"


def test_bitmap_mode_marks_written_pages():
    mem = _mem()
    buf = bytearray(2 * PAGES)
    bm = dirty.SharedBitmap(buf, PAGES)
    w = make_workload(new_registers("random", 4, 1.0), USABLE)
    w.run(mem, 50, bm.mark)
    assert bm.snapshot_and_clear() == len(set(w.pages_for(0, 50).tolist()))
    assert set(bm.snapshot_pfns().tolist()) == set(w.pages_for(0, 50).tolist())
    assert not bm.live.any()


def test_ledger_checker_accepts_a_good_ledger_and_names_violations():
    mem = _mem()
    w = make_workload(new_registers("ledger", 9, 1.0, a=50), USABLE)
    w.init_memory(mem)
    acks = parse_acks(b"".join(w.run(mem, 400, None)).decode().splitlines())
    u8 = mem.view(np.uint8)
    problems, summary = check_ledger(u8, USABLE, acks)
    assert problems == [] and summary["transactions"] == 400 and summary["acknowledged"] == 400
    bad = u8.copy()
    bad.view(np.int64)[PAGE_SIZE // 8 + 3] += 5  # account 3 gains money from nowhere
    problems, _ = check_ledger(bad, USABLE)
    assert any("total broken" in p for p in problems)
    problems, _ = check_ledger(u8, USABLE, acks + [(400, 1, 2, 3)])
    assert any("acknowledged transaction 400 is missing" in p for p in problems)
    problems, _ = check_ledger(u8, USABLE, [(5, 1, 2, 3)])
    assert any("differs from the log" in p for p in problems)
    torn = u8.copy()
    torn[w.layout.log_off + 400 * 32] = 1
    assert any("torn" in p for p in check_ledger(torn, USABLE)[0])
    moved = u8.copy()  # money moved without a log entry: total intact, replay disagrees
    moved.view(np.int64)[PAGE_SIZE // 8 + 1] -= 1
    moved.view(np.int64)[PAGE_SIZE // 8 + 2] += 1
    assert any("disagree with the log" in p for p in check_ledger(moved, USABLE)[0])
    assert "no ledger" in check_ledger(np.zeros_like(u8), USABLE)[0][0]
    with pytest.raises(ValueError, match="line 2"):
        parse_acks(["ack 1 2 3 4", "nack 1"])


def test_output_buffer_is_a_plug_qdisc(tmp_path):
    path = str(tmp_path / "out")
    ob = OutputBuffer(path)

    def released() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    ob.emit([b"a"])
    assert released() == b"a", "unplugged output is released at once"
    ob.barrier()
    ob.emit([b"b", b"c"])
    ob.barrier()
    ob.emit([b"d"])
    assert released() == b"a" and ob.buffered == 3
    assert ob.release() == 0 and released() == b"a"  # nothing before the first barrier
    assert ob.release() == 2 and released() == b"abc"
    assert ob.release() == 0 and released() == b"abc"  # no barrier left: d stays
    ob.barrier()
    ob.emit([b"e"])
    assert ob.unplug() == 2 and released() == b"abcde"
    ob.emit([b"f"])
    assert released() == b"abcdef"
    ob.close()


def test_expand_ranges():
    first = np.array([1, 5, 9], dtype=np.uint64)
    last = np.array([2, 8, 10], dtype=np.uint64)
    assert dirty._expand_ranges(first, last).tolist() == [1, 5, 6, 7, 9]
    assert dirty._expand_ranges(first, first + np.uint64(1)).tolist() == [1, 5, 9]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs tmpfs")
def test_probe_reports_a_mode():
    mode, why = dirty.probe("/dev/shm")
    assert mode in (dirty.MODE_UFFD, dirty.MODE_BITMAP) and why
