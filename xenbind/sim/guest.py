"""Which workload object runs a simulated guest, by its registers' kind.

Apart from ``workloads`` (the page workloads and the registers) and
``ledger`` (the bank guest, built on the registers): the one module that
knows both, so that neither imports the other back.
"""

from __future__ import annotations

from .disk import GuestDisk
from .ledger import LedgerWorkload
from .workloads import PageWorkload, Registers


def make_workload(
    regs: Registers, usable: int, disk: GuestDisk | None = None
) -> PageWorkload | LedgerWorkload:
    """The workload object for ``regs`` over ``usable`` guest pages, writing
    ``disk`` (the guest's disk 0) if it has one."""
    if regs.kind_name == "ledger":
        return LedgerWorkload(regs, usable, disk)
    return PageWorkload(regs, usable, disk)
