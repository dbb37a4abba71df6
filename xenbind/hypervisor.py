"""The domain interface both daemons program against.

Two hypervisors stand behind it: the simulated one (``xenbind.sim``), the
embedded default, and real Xen (``xenbind.xenctrl``); ``xenbind.factory``
picks one. The value types (``DomainInfo``, ``DomainConfig``, ``Context``)
live in ``xenbind.types``. The sender and the
receiver need exactly what is here and nothing more:

    look up          Hypervisor.lookup(domid | name | uuid) -> Domain
    list             Hypervisor.list() -> [DomainInfo]
    create backup    Hypervisor.create_backup(DomainConfig) -> Domain (paused)
    pause/unpause    Domain.pause() / Domain.unpause()  (counted, as Xen counts)
    checkpoint stop  Domain.checkpoint_stop() / checkpoint_go(): how an epoch
                     stops and restarts the guest; default pause/unpause. On
                     Xen a PV/PVH guest is suspended cooperatively instead
                     (xenstore control/shutdown, then a cancelled resume), as
                     Remus did: only a guest that went through its own suspend
                     path can resume in another domain.
    log-dirty        Domain.enable_logdirty() / disable_logdirty()
                     Domain.read_and_clear_dirty() -> sorted uint64 PFNs
    pages            Domain.gather(pfns, out) / Domain.scatter(pfns, pages)
    physmap          Domain.populated_pfns() -> sorted uint64 PFNs with memory
                     behind them; Domain.populate(pfns) gives a (backup)
                     domain memory there. Both have defaults for a domain
                     without holes (the simulator's): every PFN, nothing to do.
    context          Domain.get_context() / Domain.set_context(ctx)
    save records     Domain.set_save_records(SaveRecords): what Xen's sender
                     writes beside pages and the tail (HVM parameters,
                     VCPU_INFO, TOOLSTACK), applied with a checkpoint's
                     commit; default: nothing to do
    output buffer    Domain.output_barrier() / output_release() / output_unplug()
                     (the two operations of Linux's ``plug`` qdisc that Remus
                     drove on a real dom0, plus "release everything")
    destroy          Domain.destroy()

Rules this interface keeps (every implementation enforces them):
- Errors are ``DomainError`` (or a subclass) naming the domain and operation.
- ``gather``/``scatter`` take a whole batch in one call (vectorised); a PFN at
  or past ``pages`` is refused before anything is read or written.
- ``pages`` is p2m_size (highest PFN + 1), not the memory size: an HVM/PVH
  p2m has holes (Xen's special pages sit near 4 GiB), and ``gather`` of a
  hole fails. A full copy lists ``populated_pfns()``; the holes travel as
  XTAB entries (stream-format.md).
- Pauses are counted: a domain paused twice runs again only after two
  unpauses. ``pause`` returns only once the guest has stopped writing.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from .types import Context, DiskInfo, DomainConfig, DomainInfo, PageArray, PfnArray, SaveRecords

__all__ = ["Domain", "Hypervisor"]


class Domain(abc.ABC):
    """One domain on one hypervisor."""

    domid: int

    @abc.abstractmethod
    def info(self) -> DomainInfo: ...

    @abc.abstractmethod
    def pause(self) -> None: ...

    @abc.abstractmethod
    def unpause(self) -> None: ...

    @abc.abstractmethod
    def enable_logdirty(self) -> None: ...

    @abc.abstractmethod
    def disable_logdirty(self) -> None: ...

    @abc.abstractmethod
    def read_and_clear_dirty(self) -> PfnArray:
        """The PFNs written since the last call (or since enable), sorted,
        and clear the bitmap, in one step."""

    @abc.abstractmethod
    def gather(self, pfns: PfnArray, out: PageArray) -> None:
        """Copy pages ``pfns`` into ``out[:len(pfns)]`` (uint8, (n, 4096))."""

    @abc.abstractmethod
    def scatter(self, pfns: PfnArray, pages: PageArray) -> None:
        """Write ``pages[i]`` to page ``pfns[i]`` for every i."""

    def checkpoint_stop(self) -> None:
        """Stop the guest for an epoch's copy. Default: ``pause()``."""
        self.pause()

    def checkpoint_go(self) -> None:
        """Undo ``checkpoint_stop()``. Default: ``unpause()``."""
        self.unpause()

    def populated_pfns(self) -> PfnArray:
        """The PFNs below ``pages`` that have memory behind them, sorted uint64.

        Default: every PFN (a domain without holes, as the simulator's)."""
        return np.arange(self.info().pages, dtype=np.uint64)

    def populate(self, pfns: PfnArray) -> None:  # noqa: B027 - optional hook
        """Give the domain memory at ``pfns`` (building a backup whose physmap
        lacks PFNs the stream carries). Default: nothing to do."""

    @abc.abstractmethod
    def get_context(self) -> Context: ...

    @abc.abstractmethod
    def set_context(self, ctx: Context) -> None: ...

    def set_save_records(self, records: SaveRecords) -> None:  # noqa: B027 - optional hook
        """Apply what a checkpoint's save records say, with its commit (the
        receiver calls it before the checkpoint's pages and context, under
        the same lock). Default: nothing (a domain with no such state: the
        simulator's). On Xen, as xc_domain_restore.c does: each HVM
        parameter through xc_hvm_param_set (IOREQ_SERVER_PFN and
        NR_IOREQ_SERVER_PAGES only as a pair, ACPI_IOPORTS_LOCATION only when
        1, VM_GENERATION_ID_ADDR recorded for the toolstack); VCPU_INFO
        says which VCPUs to bring up at failover; the toolstack record goes
        to the toolstack."""

    @abc.abstractmethod
    def output_barrier(self) -> None:
        """Insert a barrier in the guest's output buffer (at a checkpoint,
        while paused): output produced before it belongs to that checkpoint."""

    @abc.abstractmethod
    def output_release(self) -> None:
        """Release to the outside world all output up to the oldest barrier,
        and drop that barrier (after the backup acknowledged the checkpoint)."""

    @abc.abstractmethod
    def output_unplug(self) -> None:
        """Release everything buffered and stop buffering (unprotected)."""

    @abc.abstractmethod
    def destroy(self) -> None: ...

    def memory_rows(self) -> PageArray | None:
        """The whole memory as one (pages, 4096) array the caller may read in
        place (the receiver's fused delta decode reads its bases there), or
        None (the default, Xen): read it through ``gather``."""
        return None

    def disks(self) -> list[DiskInfo]:
        """The domain's replicated disks, each served by a mirroring block
        server (docs/disk.md), in the disk stream's order. Default: none."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Drop local resources (mappings, sockets); the domain lives on."""


class Hypervisor(abc.ABC):
    """One host's hypervisor."""

    kind: str  # "sim" or "xen"

    @abc.abstractmethod
    def lookup(self, ref: int | str) -> Domain:
        """A domain by domid, name or UUID; DomainError if there is none."""

    @abc.abstractmethod
    def list(self) -> list[DomainInfo]: ...

    @abc.abstractmethod
    def create_backup(self, config: DomainConfig, disks: Sequence[str] = ()) -> Domain:
        """Create a paused domain ready to receive a checkpoint stream.

        ``disks``: the backup's disk images, one per ``config.disks``, kept
        in step by the receiver (receiver.diskbuffer) and given to the
        domain as its disks."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
