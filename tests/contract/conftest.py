"""The ``harness`` fixture the domain-interface contract suite runs against.

The suite (test_domain_contract.py) only uses ``harness.hypervisor`` (the
xenbind.hypervisor interface) plus the few guest-side hooks below, which any
hypervisor can offer: on a real dom0 a harness would start a test guest
with a known writer (a small program in the guest), take digests through a
second path (e.g. ``xl dump-core``), and drive the guest by steps through its
console. Only the simulator is wired here; its params run the suite once per
log-dirty mode.

Harness hooks:
    hypervisor                      the Hypervisor under test
    new_guest(kind, seed)           a running guest; kind "writer" (writes known pages) or "ledger"
    digest(dom)                     SHA-256 of the guest's memory, not via gather()
    step(dom)                       steps the guest has completed
    run_exactly(dom, n)             paused guest: run exactly n more steps, pause again
    written_pages(dom, a, b)        set of PFNs steps a..b-1 write (None if unknowable)
    released_outputs(dom)           bytes the guest released to the outside world
"""

from __future__ import annotations

import pytest

from tests.simhost import SimHost, sim_dir
from xenbind.sim import postmortem
from xenbind.sim.client import SimDomain
from xenbind.sim.guest import make_workload
from xenbind.sim.workloads import MAGIC_PAGES, Registers

GUEST_MEMORY = 16 << 20


class SimHarness:
    def __init__(self, host: SimHost, dirty_mode: str) -> None:
        self.host = host
        self.hypervisor = host.hv
        self.dirty_mode = dirty_mode
        self.domains: list[SimDomain] = []

    def new_guest(self, kind: str = "writer", seed: int = 1, memory: int = GUEST_MEMORY):
        workload = {"writer": "random", "ledger": "ledger", "hotset": "hotset", "idle": "idle"}[
            kind
        ]
        rate = {"random": 20000, "ledger": 2000, "hotset": 20000, "idle": 0}[workload]
        dom = self.hypervisor.create(memory, workload, seed, rate, dirty_mode=self.dirty_mode)
        self.domains.append(dom)
        return dom

    def track(self, dom):
        self.domains.append(dom)
        return dom

    def digest(self, dom) -> str:
        return postmortem.digest(self.host.dir, dom.domid)

    def step(self, dom) -> int:
        return dom.step

    def run_exactly(self, dom, n: int) -> None:
        target = dom.step + n
        dom.stop_at(target)
        dom.unpause()
        dom.wait_step(target, timeout=20)
        dom.pause()
        dom.stop_at(None)
        assert dom.step == target

    def written_pages(self, dom, start: int, stop: int) -> set[int] | None:
        regs = Registers.unpack(dom.get_context().hvm_context)
        if regs.kind_name == "ledger":
            return None
        return set(make_workload(regs, dom.pages - MAGIC_PAGES).pages_for(start, stop).tolist())

    def released_outputs(self, dom) -> bytes:
        return postmortem.outputs(self.host.dir, dom.domid)

    def cleanup(self) -> None:
        for d in self.domains:
            try:
                d.destroy()
            except Exception:
                pass


@pytest.fixture(scope="module", params=["sim-uffd", "sim-bitmap"])
def _sim_host(request):
    host = SimHost(sim_dir("contract-")).start()
    host.dirty_mode = "uffd-wp" if request.param == "sim-uffd" else "bitmap"
    if host.dirty_mode == "uffd-wp" and host.hv.ping()["dirty_mode"] != "uffd-wp":
        host.cleanup()
        pytest.skip("this kernel lacks userfaultfd async write-protect / PAGEMAP_SCAN")
    yield host
    host.cleanup()


@pytest.fixture
def harness(_sim_host):
    h = SimHarness(_sim_host, _sim_host.dirty_mode)
    yield h
    h.cleanup()
