"""The output buffer's timestamps (and its timing log) and the max-rate mode.

Correctness only: which rows, in which order, with which stamps relative to
each other; no figure about how fast anything is.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import pytest

from xenbind.sim import postmortem
from xenbind.sim.outputs import TIMING_DTYPE, OutputBuffer
from xenbind.sim.workloads import (
    FLAG_MAX_RATE,
    REGS_FORMAT,
    REGS_MAGIC,
    Registers,
    RegistersError,
    new_registers,
)


def _rows(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=TIMING_DTYPE)


def _recs(first: int, n: int) -> list[bytes]:
    return [b"r%d\n" % i for i in range(first, first + n)]


def test_timing_rows_follow_the_bursts_through_barriers_releases_and_unplug(tmp_path):
    out, log = str(tmp_path / "out"), str(tmp_path / "timing")
    buf = OutputBuffer(out)
    buf.log_timing(log)
    buf.emit(_recs(0, 3), 100, 200)  # unplugged: out at once, no barrier
    buf.barrier()  # checkpoint 1 (no output of its own)
    buf.emit(_recs(3, 4), 300, 400)
    buf.emit(_recs(7, 2), 500, 600)
    buf.barrier()  # checkpoint 2: the two bursts above
    buf.emit(_recs(9, 5), 700, 800)
    assert buf.release() == 0  # checkpoint 1's ack: nothing
    assert buf.release() == 6  # checkpoint 2's ack
    assert buf.unplug() == 5  # after the last barrier: goes out unstamped by one
    buf.emit(_recs(14, 1), 900, 1000)
    buf.close()

    with open(out, "rb") as f:
        assert f.read() == b"".join(_recs(0, 15)), "the output itself is unchanged"
    rows = _rows(log)
    assert rows["n"].tolist() == [3, 4, 2, 5, 1]
    assert rows["first_ns"].tolist() == [100, 300, 500, 700, 900]
    assert rows["last_ns"].tolist() == [200, 400, 600, 800, 1000]
    b = rows["barrier_ns"]
    assert b[0] == 0 and b[3] == 0 and b[4] == 0, "unplugged bursts have no barrier"
    assert b[1] == b[2] > 0, "both bursts of checkpoint 2 carry its barrier"
    # the release is stamped after the barrier, and releases come in order
    assert rows["released_ns"][1] == rows["released_ns"][2] >= b[1]
    assert np.all(np.diff(rows["released_ns"][1:]) >= 0)
    assert rows["n"].sum() == buf.released == 15


def test_unplug_stamps_what_sat_under_each_barrier_with_that_barrier(tmp_path):
    buf = OutputBuffer(str(tmp_path / "out"))
    log = str(tmp_path / "timing")
    buf.log_timing(log)
    buf.barrier()
    buf.emit(_recs(0, 2), 10, 20)
    buf.barrier()
    buf.emit(_recs(2, 3), 30, 40)
    buf.barrier()
    buf.emit(_recs(5, 1), 50, 60)
    assert buf.unplug() == 6
    buf.log_timing(None)  # stops and flushes
    rows = _rows(log)
    assert rows["n"].tolist() == [2, 3, 1]
    assert 0 < rows["barrier_ns"][0] <= rows["barrier_ns"][1]
    assert rows["barrier_ns"][2] == 0
    assert not buf.bursts and not buf.barrier_ns and not buf.plugged
    buf.close()


def test_without_a_log_nothing_is_written_and_no_stamp_is_kept_past_its_release(tmp_path):
    buf = OutputBuffer(str(tmp_path / "out"))
    buf.emit(_recs(0, 2))  # stamps default to now
    buf.barrier()
    buf.emit(_recs(2, 2))
    assert len(buf.bursts) == 1 and buf.bursts[0][1] <= buf.bursts[0][2]
    buf.barrier()
    buf.release()
    buf.release()
    assert not buf.bursts and not buf.barrier_ns and buf.released == 4
    assert sorted(os.listdir(tmp_path)) == ["out"]
    buf.close()


def test_a_log_flushes_unplugged_bursts_in_batches(tmp_path):
    from xenbind.sim.outputs import TIMING_FLUSH

    buf = OutputBuffer(str(tmp_path / "out"))
    log = str(tmp_path / "timing")
    buf.log_timing(log)
    for i in range(TIMING_FLUSH + 3):
        buf.emit([b"x\n"], i + 1, i + 2)
    assert len(_rows(log)) == TIMING_FLUSH, "one write per TIMING_FLUSH rows"
    buf.close()  # the rest on close
    assert len(_rows(log)) == TIMING_FLUSH + 3


# --- the max-rate mode: registers ---------------------------------------------------------


def test_a_set_rate_register_set_packs_as_it_always_did():
    r = new_registers("ledger", 9, 1234.0)
    old = struct.pack(REGS_FORMAT, REGS_MAGIC, r.kind, 0, 9, 0, 1234.0, r.a, 0.0, 0)
    assert r.pack() == old and not r.max_rate


def test_max_rate_is_a_flag_bit_that_keeps_the_rate_field_and_travels():
    r = new_registers("ledger", 9, 1234.0)
    r.set_rate(math.inf)
    assert r.max_rate and r.rate == 1234.0 and r.flags == FLAG_MAX_RATE
    back = Registers.unpack(r.pack())
    assert back.max_rate and back.rate == 1234.0
    back.check_device_model(r.device_model())
    r.set_rate(50.0)
    assert not r.max_rate and r.rate == 50.0 and r.flags == 0
    h = new_registers("hotset", 1, 10.0, disk_every=16)
    h.set_rate(math.inf)
    assert h.disk_every == 16 and h.max_rate
    h.set_rate(10.0)
    assert h.disk_every == 16 and not h.max_rate
    for bad in (-1.0, math.nan, -math.inf):
        with pytest.raises(RegistersError):
            r.set_rate(bad)


# --- on a running simulated host ------------------------------------------------------------


def test_max_rate_ledger_runs_uncapped_and_its_timing_log_covers_every_output(sim_host):
    dom = sim_host.create("16M", "ledger", seed=4, rate=1, paused=True)  # 1 tx/s
    log = os.path.join(sim_host.dir, "timing")
    dom._request("output_timing", b"L", log.encode())
    dom.set_rate(math.inf)
    dom.unpause()
    dom.wait_step(3000, timeout=60)  # 50 minutes' work at the set rate
    dom.pause()
    regs = Registers.unpack(dom.get_context().hvm_context)
    assert regs.max_rate and regs.rate == 1.0
    # plugged: a checkpoint's worth, then its release
    dom.output_barrier()
    dom.stop_at(dom.step + 500)
    dom.unpause()
    dom.wait_step(dom.step + 500)
    dom.pause()
    dom.output_barrier()
    dom.output_release()  # the first barrier's (empty: the guest was paused)
    dom.output_release()  # the 500
    dom.output_unplug()
    dom._request("output_timing", b"L", b"")  # stop: flushes
    rows = _rows(log)
    total = dom.step
    assert (
        int(rows["n"].sum())
        == total
        == len(postmortem.outputs(sim_host.dir, dom.domid).splitlines())
    )
    assert np.all(rows["first_ns"] <= rows["last_ns"])
    assert np.all(rows["last_ns"] <= rows["released_ns"])
    plugged = rows[rows["barrier_ns"] > 0]
    assert int(plugged["n"].sum()) == 500
    assert np.all(plugged["last_ns"] <= plugged["barrier_ns"])
    assert np.all(plugged["barrier_ns"] <= plugged["released_ns"])
    problems, _ = postmortem.ledger_check(sim_host.dir, dom.domid)
    assert problems == []
    dom.set_rate(5.0)  # a rate again: the flag goes
    assert not Registers.unpack(dom.get_context().hvm_context).max_rate


def test_a_waiting_request_ends_a_ledger_batch_at_a_slice_boundary():
    from xenbind import PAGE_SIZE
    from xenbind.sim.ledger import LedgerWorkload, check_ledger

    usable = 64
    mem = np.zeros(usable * PAGE_SIZE // 8, dtype=np.uint64)
    w = LedgerWorkload(new_registers("ledger", 3, None), usable)
    w.init_memory(mem)
    asked: list[int] = []
    w.interrupted = lambda: asked.append(w.regs.step) or len(asked) >= 2
    out = w.run(mem, 64, None)
    assert len(out) == w.regs.step == 2 * LedgerWorkload.SLICE, "ends after the 2nd ask"
    assert len(asked) == 2
    w.interrupted = None
    w.run(mem, 64, None)
    assert w.regs.step == 2 * LedgerWorkload.SLICE + 64
    problems, summary = check_ledger(mem.view(np.uint8), usable)
    assert problems == [] and summary["transactions"] == w.regs.step
