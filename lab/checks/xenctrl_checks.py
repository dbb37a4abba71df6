"""In-lab checks of xenbind.xenctrl (the libxenctrl binding) on real Xen.

Run in dom0 with the lab guest up: ``python -m lab.checks.xenctrl_checks``.
Each check goes through the project's Domain interface (xenbind.hypervisor),
as the daemons do, and compares what it sees with what the guest itself
reported on its console (lab/checks/guestlog.py):

    xc-open          open_hypervisor() gives the real Xen hypervisor
    xc-dominfo       dom0 and the guest: domid, pages, vCPUs, state, HVM flag
    xc-pause         paused: the guest's counter (read by foreign mapping)
                     stays still; unpaused: it moves again
    xc-logdirty      log-dirty on; between two read-and-clears the bitmap holds
                     every page the guest rewrites, and none of the pattern
                     pages it wrote only once
    xc-foreign-map   gather() of the reported PFNs returns the guest's pattern
    xc-context       get_context(): an HVM save image starting with Xen's
                     HEADER record (magic 0x54381286) and ending with END,
                     holding a CPU record
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING, cast

import numpy as np

from lab.checks.guestlog import PAGE_SIZE, counter_value, expected_pattern_page, read_layout
from lab.checks.report import emit, require, run_check

if TYPE_CHECKING:
    from xenbind.xenctrl import XenDomain, XenHypervisor

GUEST = os.environ.get("LAB_GUEST", "labguest")
HVM_SAVE_MAGIC = 0x54381286  # struct hvm_save_header.magic
HVM_CODE_END, HVM_CODE_HEADER, HVM_CODE_CPU = 0, 1, 2  # HVM_SAVE_CODE(END/HEADER/CPU)
HVM_DESC = struct.Struct("<HHI")  # struct hvm_save_descriptor: typecode, instance, length


def guest_domid() -> int:
    out = subprocess.run(["xl", "domid", GUEST], capture_output=True, text=True, timeout=30)
    require(out.returncode == 0, f"xl domid {GUEST}: {out.stderr.strip()}")
    return int(out.stdout.strip())


def read_pages(dom, pfns: list[int]) -> np.ndarray:
    out = np.zeros((len(pfns), PAGE_SIZE), dtype=np.uint8)
    dom.gather(np.asarray(pfns, dtype=np.uint64), out)
    return out


def hvm_records(blob: bytes) -> list[tuple[int, int, int]]:
    """(typecode, instance, length) of each record in an HVM save image."""
    recs, off = [], 0
    while off + HVM_DESC.size <= len(blob):
        code, inst, length = HVM_DESC.unpack_from(blob, off)
        recs.append((code, inst, length))
        off += HVM_DESC.size + length
        if code == HVM_CODE_END:
            break
    require(off <= len(blob), f"HVM record at {off} runs past the blob's {len(blob)} bytes")
    return recs


class Checks:
    # opened by open(), the first check
    hv: XenHypervisor
    dom: XenDomain

    def __init__(self) -> None:
        self.layout = read_layout()

    def open(self) -> str:
        from xenbind.factory import open_hypervisor

        self.hv = cast("XenHypervisor", open_hypervisor(None))  # checked just below
        require(getattr(self.hv, "kind", None) == "xen", f"hypervisor kind {self.hv.kind!r}")
        self.domid = guest_domid()
        self.dom = self.hv.lookup(self.domid)
        return f"{type(self.hv).__module__}.{type(self.hv).__name__}, guest {GUEST} is domid {self.domid}"

    def dominfo(self) -> str:
        d0 = self.hv.lookup(0).info()
        g = self.dom.info()
        require(d0.domid == 0 and d0.pages > 0, f"dom0 info {d0}")
        require(g.domid == self.domid, f"guest info has domid {g.domid}, xl says {self.domid}")
        # 128 MiB guest: p2m_size covers at least its RAM
        require(g.pages >= 128 * 256 * 9 // 10, f"guest pages {g.pages} < ~128 MiB")
        require(g.vcpus == 1, f"guest vcpus {g.vcpus}")
        require(g.state == "running", f"guest state {g.state!r}")
        want_hvm = os.environ.get("LAB_GUEST_TYPE", "pvh") != "pv"
        require(g.hvm == want_hvm, f"guest hvm={g.hvm}, expected {want_hvm}")
        by_name: int | str
        try:
            by_name = self.hv.lookup(GUEST).domid
        except Exception as e:  # noqa: BLE001 - reported in the detail
            by_name = f"lookup by name failed: {e}"
        return (
            f"dom0 pages={d0.pages} vcpus={d0.vcpus} state={d0.state}; guest domid={g.domid} "
            f"name={g.name!r} pages={g.pages} vcpus={g.vcpus} state={g.state} hvm={g.hvm}; "
            f"lookup({GUEST!r})->{by_name}"
        )

    def counter(self) -> int:
        return counter_value(read_pages(self.dom, [self.layout.counter_pfn])[0])

    def wait_counter_moves(self, since: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.counter()
            if c != since:
                return c
            time.sleep(0.2)
        raise AssertionError(f"counter stayed at {since} for {timeout}s")

    def pause(self) -> str:
        c0 = self.counter()
        c1 = self.wait_counter_moves(c0, 20.0)
        self.dom.pause()
        try:
            p0 = self.counter()
            time.sleep(2.0)
            p1 = self.counter()
            state = self.dom.info().state
        finally:
            self.dom.unpause()
        require(p0 == p1, f"counter moved while paused: {p0} -> {p1}")
        require(state == "paused", f"info().state while paused is {state!r}")
        c2 = self.wait_counter_moves(p1, 20.0)
        return f"running {c0}->{c1}; paused {p0}=={p1} for 2s (state={state}); unpaused -> {c2}"

    def logdirty(self) -> str:
        lay = self.layout
        self.dom.enable_logdirty()
        try:
            self.dom.read_and_clear_dirty()  # everything since enable
            c0 = self.counter()
            time.sleep(2.0)
            dirty = self.dom.read_and_clear_dirty()
            c1 = self.counter()
        finally:
            self.dom.disable_logdirty()
        got = {int(p) for p in dirty}
        want = set(lay.dirty_pfns) | {lay.counter_pfn}
        missing = sorted(want - got)
        require(c1 != c0, f"guest counter did not move ({c0}) during the dirty window")
        require(not missing, f"{len(missing)} rewritten pages not reported dirty: {missing[:8]}")
        clean = sorted(set(lay.pattern_pfns) & got)
        require(not clean, f"{len(clean)} pattern pages (written once) reported dirty: {clean[:8]}")
        require(list(dirty) == sorted(dirty), "dirty PFNs are not sorted")
        return (
            f"{len(got)} dirty PFNs in 2s (counter {c0}->{c1}) include all {len(want)} "
            f"rewritten pages and none of {len(lay.pattern_pfns)} pattern pages"
        )

    def foreign_map(self) -> str:
        pfns = self.layout.pattern_pfns
        pages = read_pages(self.dom, pfns)
        bad = [
            i for i in range(len(pfns)) if not np.array_equal(pages[i], expected_pattern_page(i))
        ]
        if bad:
            first = bad[0]
            require(
                False,
                f"{len(bad)}/{len(pfns)} pattern pages differ; page {first} (pfn "
                f"{pfns[first]}) starts {pages[first][:16].tobytes()!r}",
            )
        return f"all {len(pfns)} pattern pages read at the guest-reported PFNs match byte for byte"

    def context(self) -> str:
        ctx = self.dom.get_context()
        blob = bytes(ctx.hvm_context)
        require(len(blob) > 64, f"HVM context is {len(blob)} bytes")
        recs = hvm_records(blob)
        codes = [r[0] for r in recs]
        require(codes[0] == HVM_CODE_HEADER, f"first record type {codes[0]}, not HEADER")
        magic = struct.unpack_from("<I", blob, HVM_DESC.size)[0]
        require(magic == HVM_SAVE_MAGIC, f"header magic {magic:#x}")
        require(codes[-1] == HVM_CODE_END, f"last record type {codes[-1]}, not END")
        require(HVM_CODE_CPU in codes, "no CPU record")
        return (
            f"{len(blob)} bytes, {len(recs)} records (types {sorted(set(codes))}), "
            f"magic_pfns={tuple(ctx.magic_pfns)}, device_model {len(ctx.device_model)} bytes"
        )


def main() -> int:
    try:
        c = Checks()
    except Exception as e:  # noqa: BLE001 - reported as this module's FAIL
        emit("FAIL", "xc-open", f"cannot read the guest's PFN report: {e}")
        return 1
    opened = run_check("xc-open", c.open)
    steps = [
        ("xc-dominfo", c.dominfo),
        ("xc-pause", c.pause),
        ("xc-logdirty", c.logdirty),
        ("xc-foreign-map", c.foreign_map),
        ("xc-context", c.context),
    ]
    for name, fn in steps:
        if opened:
            run_check(name, fn)
        else:
            emit("FAIL", name, "skipped: xenbind.xenctrl did not open")
    return 0


if __name__ == "__main__":
    sys.exit(main())
