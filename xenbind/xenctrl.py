"""Real Xen behind the Domain interface: libxenctrl + libxenforeignmemory.

The compiled binding is ``xenbind._xenctrl`` (cffi API mode, built by
``xenbind/_xenctrl_build.py`` against Debian's libxen-dev 4.17). This module
maps the Domain interface onto it:

    interface                     libxc / libxenforeignmemory 4.17
    ----------------------------  -----------------------------------------------
    XenHypervisor()               xc_interface_open(NULL, NULL, 0),
                                  xenforeignmemory_open(NULL, 0)
    list / lookup(domid)          xc_domain_getinfolist(xch, first, max, info[])
    DomainInfo.pages              xc_domain_maximum_gpfn(xch, domid, &max) + 1
    pause / unpause               xc_domain_pause / xc_domain_unpause (Xen counts)
    enable_logdirty               xc_shadow_control(.., SHADOW_OP_ENABLE_LOGDIRTY,
                                  NULL, 0); EINVAL (Xen's paging_log_dirty_enable:
                                  log-dirty already on, or a passed-through PCI
                                  device) is refused, never answered with OFF and
                                  ENABLE again as libxc's save did: OFF would wipe
                                  another tracker's log (a second remusd, a live
                                  migration), and both would go silently wrong
    logdirty_enabled              the same ENABLE as a probe: success means it was
                                  off (then OFF at once, leaving it as found);
                                  EINVAL means it is on (or cannot be: passthrough)
    read_and_clear_dirty          remus_dirty_op(.., SHADOW_OP_CLEAN) -> our C helper
                                  around xc_logdirty_control with a hypercall buffer
    peek_dirty                    remus_dirty_op(.., SHADOW_OP_PEEK)
    disable_logdirty              xc_shadow_control(.., SHADOW_OP_OFF, NULL, 0)
    gather / scatter              xenforeignmemory_map(fmem, domid, PROT_READ
                                  [|PROT_WRITE], n, pfns[], err[]) + one numpy
                                  copy + xenforeignmemory_unmap
    get_context (HVM, PVH)        xc_domain_hvm_getcontext (size query, then
                                  fetch) + xc_hvm_param_get(IOREQ, BUFIOREQ, STORE)
    get_context (PV)              xc_vcpu_getcontext for vCPUs 0..max_vcpu_id
    set_context (HVM, PVH)        xc_domain_hvm_setcontext + xc_hvm_param_set
    destroy                       xc_domain_destroy
    create_backup                 libvirt (``REMUS_LIBVIRT_URI``) or ``xl create -p``;
                                  with disks (xl only): the receiver's images as phy
                                  disks on the primary's vdevs (xenbind.xendisks)
    disks                         the domain's disks file (xenbind.xendisks:
                                  $REMUS_XEN_DISKS_DIR/<name>.json); none without one
    output_*                      Linux ``plug`` qdisc over rtnetlink (xenbind.netbuf)

Rules this module keeps:
- Importing it never fails: without the compiled binding (no libxen-dev at
  install time) opening raises HypervisorUnavailable saying so.
- Off a dom0 (no /dev/xen/privcmd) opening raises HypervisorUnavailable naming
  the missing device; nothing is called that could crash.
- Every failed libxc call becomes DomainError(domid, operation, errno text).
- PFN lists are checked (1-D, integral, < pages) before any hypercall; a page
  the map refuses (err[i] != 0) fails the whole batch, naming the PFN.
- Bitmap bit p (LSB first in each byte) is PFN p; PFNs come back sorted uint64.

What it does not do (docs/xen.md): QEMU device-model state (the
``device_model`` field stays empty), PV set_context (needs page-table MFN
translation), populating a backup's missing PFNs beyond the explicit
``populate()`` call.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import re
import weakref
from collections.abc import Sequence

import numpy as np

from . import PAGE_SIZE
from .errors import ConfigError, DomainError, HypervisorUnavailable
from .hypervisor import Domain, Hypervisor
from .types import Context, DiskInfo, DomainConfig, DomainInfo, SaveRecords
from .xendisks import read_disks

try:  # the compiled binding exists only where libxen-dev was installed
    from ._xenctrl import ffi as _ffi
    from ._xenctrl import lib as _lib

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - depends on the build machine
    _ffi = _lib = None
    _IMPORT_ERROR = exc

#: The device libxencall opens; its absence means "not a Xen dom0".
PRIVCMD_DEVICE = "/dev/xen/privcmd"
#: Environment variable naming a libvirt URI (e.g. xen:///system): when set,
#: names/UUIDs resolve and backups are created through libvirt.
LIBVIRT_URI_ENV = "REMUS_LIBVIRT_URI"
#: At most this many pages are mapped at once (64 MiB of address space).
MAX_MAP_PAGES = 16384
#: Domains fetched per xc_domain_getinfolist call.
GETINFO_BATCH = 256
#: How an epoch stops a guest (``XenDomain.checkpoint_stop``): "auto" suspends
#: PV/PVH guests cooperatively and pauses HVM ones; "pause" or "suspend" force one.
CHECKPOINT_MODE_ENV = "REMUS_XEN_CHECKPOINT"
#: Seconds a guest has to acknowledge control/shutdown=suspend, then to suspend.
SUSPEND_ACK_TIMEOUT = 10.0
#: Overrides SUSPEND_ACK_TIMEOUT (seconds): a guest on a slow or overloaded
#: host (the lab's emulated one: docs/lab.md) may take longer to answer.
SUSPEND_ACK_ENV = "REMUS_XEN_SUSPEND_ACK_S"
SUSPEND_TIMEOUT = 20.0
#: Highest domid Xen hands to ordinary domains (DOMID_FIRST_RESERVED - 1).
MAX_DOMID = 0x7FEF

#: Every C symbol this module calls on ``lib`` (a test asserts each is bound).
REQUIRED_SYMBOLS = (
    "xc_interface_open",
    "xc_interface_close",
    "xc_domain_getinfolist",
    "xc_domain_pause",
    "xc_domain_unpause",
    "xc_domain_destroy",
    "xc_domain_resume",
    "xc_domain_maximum_gpfn",
    "xc_shadow_control",
    "xc_domain_hvm_getcontext",
    "xc_domain_hvm_setcontext",
    "xc_vcpu_getcontext",
    "xc_hvm_param_get",
    "xc_hvm_param_set",
    "xc_domain_populate_physmap_exact",
    "xenforeignmemory_open",
    "xenforeignmemory_close",
    "xenforeignmemory_map",
    "xenforeignmemory_unmap",
    "remus_dirty_new",
    "remus_dirty_op",
    "remus_dirty_free",
    "remus_dirty_bitmap_bytes",
)
#: Constants from the headers this module reads on ``lib``.
REQUIRED_CONSTANTS = (
    "XEN_DOMINF_dying",
    "XEN_DOMINF_hvm_guest",
    "XEN_DOMINF_shutdown",
    "XEN_DOMINF_paused",
    "XEN_DOMINF_shutdownmask",
    "XEN_DOMINF_shutdownshift",
    "XEN_DOMCTL_SHADOW_OP_OFF",
    "XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY",
    "XEN_DOMCTL_SHADOW_OP_CLEAN",
    "XEN_DOMCTL_SHADOW_OP_PEEK",
    "HVM_PARAM_STORE_PFN",
    "HVM_PARAM_IOREQ_PFN",
    "HVM_PARAM_BUFIOREQ_PFN",
    "SHUTDOWN_suspend",
    "PROT_READ",
    "PROT_WRITE",
)

#: HVM_PARAM_* indices set_save_records treats specially (xen/hvm/params.h)
HVM_PARAM_CONSOLE_PFN = 17
HVM_PARAM_ACPI_IOPORTS_LOCATION = 19
HVM_PARAM_IOREQ_SERVER_PFN = 32
HVM_PARAM_NR_IOREQ_SERVER_PAGES = 33

log = logging.getLogger(__name__)

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def binding_available() -> bool:
    """True when the compiled ``xenbind._xenctrl`` module loaded."""
    return _lib is not None


def binding_import_error() -> Exception | None:
    """Why the compiled binding did not load (None when it did)."""
    return _IMPORT_ERROR


def _errtext(err: int | None = None) -> str:
    e = _ffi.errno if err is None else err
    if not e:
        return "failed (no errno)"
    return f"{os.strerror(e)} (errno {e} {_errno.errorcode.get(e, '?')})"


def format_uuid(handle: bytes) -> str:
    """Xen's 16-byte domain handle as the usual 8-4-4-4-12 UUID text."""
    h = bytes(handle).hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def dirty_bitmap_to_pfns(bitmap: np.ndarray, pages: int) -> np.ndarray:
    """PFNs whose bit is set in Xen's log-dirty bitmap, sorted, uint64.

    ``bitmap`` is the raw bytes (uint8) Xen wrote: unsigned longs with bit p
    of the whole map meaning PFN p, LSB first; on little-endian x86 that is LSB
    first within each byte. Bits at or past ``pages`` are ignored.
    """
    if bitmap.dtype != np.uint8 or bitmap.ndim != 1:
        raise ValueError("bitmap must be a 1-D uint8 array")
    if bitmap.size * 8 < pages:
        raise ValueError(f"bitmap of {bitmap.size} bytes cannot hold {pages} bits")
    bits = np.unpackbits(bitmap, bitorder="little", count=pages)
    return np.flatnonzero(bits).astype(np.uint64)


def check_pfns(domain: int, op: str, pfns: np.ndarray, pages: int) -> np.ndarray:
    """Validate a PFN batch before any hypercall; return it as contiguous uint64.

    Refuses non-1-D arrays, non-integral or negative values and any PFN at or
    past ``pages`` (the domain's p2m_size), with DomainError naming the PFN.
    """
    arr = np.asarray(pfns)
    if arr.ndim != 1:
        raise DomainError(domain, op, f"PFN list must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    if arr.dtype.kind not in "iu":
        raise DomainError(domain, op, f"PFN list must be integers, got {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise DomainError(domain, op, f"negative PFN {int(arr.min())}")
    top = int(arr.max())
    if top >= pages:
        raise DomainError(domain, op, f"PFN {top:#x} is past the domain's last page {pages - 1:#x}")
    return np.ascontiguousarray(arr, dtype=np.uint64)


def _check_page_array(domain: int, op: str, a: np.ndarray, n: int, writable: bool) -> None:
    if (
        not isinstance(a, np.ndarray)
        or a.dtype != np.uint8
        or a.ndim != 2
        or a.shape[1] != PAGE_SIZE
    ):
        raise DomainError(domain, op, f"page buffer must be uint8 of shape (n, {PAGE_SIZE})")
    if a.shape[0] < n:
        raise DomainError(domain, op, f"page buffer holds {a.shape[0]} pages, {n} PFNs given")
    if writable and not a.flags.writeable:
        raise DomainError(domain, op, "page buffer is read-only")


def _require_binding() -> None:
    if _lib is None:
        raise HypervisorUnavailable(
            "the libxenctrl binding (xenbind._xenctrl) was not built: install Debian's "
            "libxen-dev (xenctrl.h, xenforeignmemory.h) and reinstall the project "
            f"(pip install -e .); import error: {_IMPORT_ERROR}"
        )


def open_xc():
    """xc_interface_open + xenforeignmemory_open, or HypervisorUnavailable.

    Returns ``(xch, fmem)`` cdata handles; the caller closes them.
    """
    _require_binding()
    xch = _lib.xc_interface_open(_ffi.NULL, _ffi.NULL, 0)
    if xch == _ffi.NULL:
        err = _ffi.errno
        hint = ""
        if err == _errno.ENOENT:
            hint = f" ({PRIVCMD_DEVICE} missing: not a Xen dom0)"
        elif err in (_errno.EACCES, _errno.EPERM):
            hint = " (must run as root in dom0)"
        raise HypervisorUnavailable(f"xc_interface_open: {_errtext(err)}{hint}")
    fmem = _lib.xenforeignmemory_open(_ffi.NULL, 0)
    if fmem == _ffi.NULL:
        err = _ffi.errno
        _lib.xc_interface_close(xch)
        raise HypervisorUnavailable(f"xenforeignmemory_open: {_errtext(err)}")
    return xch, fmem


class XenDomain(Domain):
    """One domain on the local Xen host (see the module docstring's table)."""

    def __init__(self, hv: XenHypervisor, domid: int) -> None:
        self._hv = hv
        self.domid = domid
        self._dirty = _ffi.NULL  # struct remus_dirty *, while log-dirty is on
        self._dirty_buf: np.ndarray | None = None
        self._netbuf = None
        self._build: dict | None = None
        self.pages = self._max_gpfn() + 1

    # -- helpers -------------------------------------------------------------
    def _fail(self, op: str, err: int | None = None) -> DomainError:
        return DomainError(self.domid, op, _errtext(err))

    def _max_gpfn(self) -> int:
        out = _ffi.new("xen_pfn_t *")
        if _lib.xc_domain_maximum_gpfn(self._hv.xch, self.domid, out) < 0:
            raise self._fail("xc_domain_maximum_gpfn")
        return int(out[0])

    def _raw_info(self):
        return self._hv._getinfo(self.domid)

    # -- Domain interface ----------------------------------------------------
    def info(self) -> DomainInfo:
        info = self._hv._to_info(self._raw_info(), self.pages)
        if self.domid != 0:
            info.extra.update(self._build_info())
            try:
                vdevs = [v for _, v in read_disks(info.name)] if info.name else []
            except ConfigError:
                vdevs = []  # disks() says what is wrong with the file
            if vdevs:
                info.extra["disk_vdevs"] = vdevs  # the backup's disks go on the same ones
        return info

    def disks(self) -> list[DiskInfo]:
        """The disks named by the domain's disks file (xenbind.xendisks:
        ``$REMUS_XEN_DISKS_DIR/<name>.json``, written by whoever started its
        mirroring block server); none without one."""
        if self.domid == 0:
            return []
        name = self._hv._name_of(self.domid)
        return [d for d, _ in read_disks(name)] if name else []

    def _build_info(self) -> dict:
        """How libxl built this domain (``xenbind.xl.build_info``: type, memory,
        kernel, tsc_mode, cpuid), read once: what a backup needs to be built
        alike. Without xl's record (a domain not made by xl), the memory size
        from Xen's max_pages only."""
        if self._build is None:
            from .xl import build_info

            try:
                self._build = build_info(self.domid)
            except DomainError as e:
                log.info(
                    "domain %s: no libxl record (%s); the backup gets max_pages of memory",
                    self.domid,
                    e,
                )
                max_pages = int(self._raw_info().max_pages)
                self._build = {"memory_mib": max(1, -(-max_pages * PAGE_SIZE // (1 << 20)))}
        return dict(self._build)

    def set_save_records(self, records: SaveRecords) -> None:
        """Apply a committed checkpoint's save records as xc_domain_restore.c
        does: the HVM parameters with xc_hvm_param_set (CONSOLE_PFN is only
        reported by restore, ACPI_IOPORTS_LOCATION set only for the new
        layout, the ioreq-server pair count first); the VCPU map and the
        toolstack record are kept for the failover's toolstack."""
        self.save_records = records
        if not records.hvm_params or not self.is_hvm():
            return
        params = dict(records.hvm_params)  # HVM_PARAM_* index -> value
        params.pop(HVM_PARAM_CONSOLE_PFN, None)
        if params.get(HVM_PARAM_ACPI_IOPORTS_LOCATION, 0) != 1:
            params.pop(HVM_PARAM_ACPI_IOPORTS_LOCATION, None)
        pfn = params.pop(HVM_PARAM_IOREQ_SERVER_PFN, 0)
        nr = params.pop(HVM_PARAM_NR_IOREQ_SERVER_PAGES, 0)
        if pfn and nr:  # only as a pair, the count first
            params = {HVM_PARAM_NR_IOREQ_SERVER_PAGES: nr, HVM_PARAM_IOREQ_SERVER_PFN: pfn} | params
        for index, value in params.items():
            if value and _lib.xc_hvm_param_set(self._hv.xch, self.domid, index, value) < 0:
                raise self._fail(f"xc_hvm_param_set({index})")

    def is_hvm(self) -> bool:
        return bool(self._raw_info().flags & _lib.XEN_DOMINF_hvm_guest)

    def pause(self) -> None:
        if _lib.xc_domain_pause(self._hv.xch, self.domid) < 0:
            raise self._fail("xc_domain_pause")

    def unpause(self) -> None:
        if _lib.xc_domain_unpause(self._hv.xch, self.domid) < 0:
            raise self._fail("xc_domain_unpause")

    def _checkpoint_mode(self) -> str:
        mode = os.environ.get(CHECKPOINT_MODE_ENV, "auto")
        if mode not in ("auto", "pause", "suspend"):
            raise DomainError(
                self.domid,
                "checkpoint",
                f"{CHECKPOINT_MODE_ENV}={mode!r}: expected auto, pause or suspend",
            )
        if mode == "auto":
            return "suspend" if self._build_info().get("type") in ("pv", "pvh") else "pause"
        return mode

    def _suspend_ack_timeout(self) -> float:
        raw = os.environ.get(SUSPEND_ACK_ENV)
        if raw is None:
            return SUSPEND_ACK_TIMEOUT
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        if not 0 < value <= 3600:
            raise DomainError(
                self.domid,
                "checkpoint",
                f"{SUSPEND_ACK_ENV}={raw!r}: expected seconds, more than 0 and at most 3600",
            )
        return value

    def checkpoint_stop(self) -> None:
        """Stop the guest for a checkpoint, as Remus did on Xen.

        A PV/PVH guest keeps Xen state no HVM context carries (its shared-info
        mapping, vcpu_info, event-channel bindings): it can resume in another
        domain (the backup) only from its own suspend path, which re-creates
        them. So it is asked to suspend (xenstore ``control/shutdown``, the
        guest acknowledges and shuts down with SHUTDOWN_suspend) and
        ``checkpoint_go`` resumes it cancelled (``xc_domain_resume(fast=1)``:
        its suspend hypercall returns 1 and it runs on here). The context
        captured meanwhile has the hypercall returning 0: on the backup the
        guest resumes as after a migration. A guest paused by someone else
        cannot answer: it is paused (counted) instead, as an HVM guest is.
        """
        self._stopped_by = "pause"
        if (
            self._checkpoint_mode() == "suspend"
            and not int(self._raw_info().flags) & _lib.XEN_DOMINF_paused
        ):
            self._hv._xenstore().suspend(
                self.domid,
                lambda: self._hv.is_suspended(self.domid),
                ack_timeout=self._suspend_ack_timeout(),
                suspend_timeout=SUSPEND_TIMEOUT,
            )
            self._stopped_by = "suspend"
            return
        self.pause()

    def checkpoint_go(self) -> None:
        if getattr(self, "_stopped_by", "pause") == "suspend":
            self._stopped_by = "pause"
            self.resume_cancelled()
            return
        self.unpause()

    def resume_cancelled(self) -> None:
        """Run a guest that shut down with reason suspend again, as if its
        suspend had been cancelled (``xc_domain_resume(fast=1)``). Also what
        an operator needs when a sender died between checkpoint_stop and
        checkpoint_go and left the guest suspended."""
        if _lib.xc_domain_resume(self._hv.xch, self.domid, 1) < 0:
            raise self._fail("xc_domain_resume(fast)")

    def _enable_logdirty_op(self) -> int:
        """SHADOW_OP_ENABLE_LOGDIRTY once: 0, or the errno."""
        op = _lib.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY
        if _lib.xc_shadow_control(self._hv.xch, self.domid, op, _ffi.NULL, 0) < 0:
            return int(_ffi.errno) or _errno.EIO
        return 0

    def checkpoint_held(self) -> str | None:
        """How the guest is stopped, for a sender adopting it after its
        predecessor died between checkpoint_stop and checkpoint_go:
        "suspended" (shut down with reason suspend: ``resume_cancelled``
        runs it again), "paused" (``unpause``) or None (it runs)."""
        if self._hv.is_suspended(self.domid):
            return "suspended"
        if int(self._raw_info().flags) & _lib.XEN_DOMINF_paused:
            return "paused"
        return None

    def enable_logdirty(self) -> None:
        """Log-dirty on. Refused (DomainError) when it is on already: Xen
        answers EINVAL then, and turning it off and on again (libxc's save
        did) would wipe the log of whoever else tracks the domain."""
        err = self._enable_logdirty_op()
        if err == _errno.EINVAL:
            raise DomainError(
                self.domid,
                "xc_shadow_control(ENABLE_LOGDIRTY)",
                "log-dirty mode is already on (another process tracks this domain's "
                "memory: a remusd, a live migration, xl remus; or one that died "
                "without turning it off), or the domain has a passed-through PCI "
                "device; refusing to turn it off and on again",
            )
        if err:
            raise DomainError(self.domid, "xc_shadow_control(ENABLE_LOGDIRTY)", _errtext(err))
        if self._dirty == _ffi.NULL:
            d = _lib.remus_dirty_new(self._hv.xch, self.pages)
            if d == _ffi.NULL:
                raise self._fail("allocate log-dirty hypercall buffer")
            self._dirty = d
            nbytes = int(_lib.remus_dirty_bitmap_bytes(self.pages))
            self._dirty_buf = np.zeros(nbytes, dtype=np.uint8)
        # the output buffer (pyroute2, the vifs) is built now, while the guest
        # runs: the first barrier comes inside a pause and must not pay for it
        self._output()

    def logdirty_enabled(self) -> bool:
        """Whether log-dirty mode is on for the domain, by anyone. Xen has no
        query for it: ENABLE is the probe (EINVAL: on, or impossible because
        of PCI passthrough; both mean "do not protect"); when it succeeds the
        mode was off and is turned OFF again at once, leaving it as found."""
        if self._dirty != _ffi.NULL:
            return True  # this process turned it on
        err = self._enable_logdirty_op()
        if err == _errno.EINVAL:
            return True
        if err:
            raise DomainError(self.domid, "xc_shadow_control(ENABLE_LOGDIRTY probe)", _errtext(err))
        off = _lib.XEN_DOMCTL_SHADOW_OP_OFF
        if _lib.xc_shadow_control(self._hv.xch, self.domid, off, _ffi.NULL, 0) < 0:
            raise self._fail("xc_shadow_control(OFF after the probe)")
        return False

    def disable_logdirty(self) -> None:
        rc = _lib.xc_shadow_control(
            self._hv.xch, self.domid, _lib.XEN_DOMCTL_SHADOW_OP_OFF, _ffi.NULL, 0
        )
        err = _ffi.errno
        self._free_dirty()
        if rc < 0:
            raise self._fail("xc_shadow_control(OFF)", err)

    def _dirty_op(self, sop: int, name: str) -> np.ndarray:
        if self._dirty == _ffi.NULL:
            raise DomainError(self.domid, name, "log-dirty mode is not enabled")
        buf = self._dirty_buf
        assert buf is not None  # allocated with self._dirty (enable_logdirty)
        count = _ffi.new("uint32_t *")
        rc = _lib.remus_dirty_op(
            self._hv.xch, self._dirty, self.domid, sop, _ffi.from_buffer(buf), buf.size, count
        )
        if rc < 0:
            raise self._fail(f"xc_logdirty_control({name})")
        if rc != self.pages:
            # libxc's save treats a short count as failure too.
            raise DomainError(
                self.domid,
                f"xc_logdirty_control({name})",
                f"processed {rc} of {self.pages} pages",
            )
        return dirty_bitmap_to_pfns(buf, self.pages)

    def read_and_clear_dirty(self) -> np.ndarray:
        return self._dirty_op(_lib.XEN_DOMCTL_SHADOW_OP_CLEAN, "CLEAN")

    def peek_dirty(self) -> np.ndarray:
        """The dirty PFNs without clearing the bitmap (SHADOW_OP_PEEK)."""
        return self._dirty_op(_lib.XEN_DOMCTL_SHADOW_OP_PEEK, "PEEK")

    def _map_batches(self, op: str, pfns: np.ndarray, prot: int):
        """Yield (start, view) for each mapped batch of ``pfns``; unmaps after."""
        fmem = self._hv.fmem
        for start in range(0, pfns.size, MAX_MAP_PAGES):
            chunk = pfns[start : start + MAX_MAP_PAGES]
            n = chunk.size
            arr = _ffi.from_buffer("xen_pfn_t[]", chunk)
            err = np.zeros(n, dtype=np.intc)
            addr = _lib.xenforeignmemory_map(
                fmem, self.domid, prot, n, arr, _ffi.from_buffer("int[]", err)
            )
            if addr == _ffi.NULL:
                raise self._fail(f"xenforeignmemory_map({op}, {n} pages)")
            try:
                bad = np.flatnonzero(err)
                if bad.size:
                    i = int(bad[0])
                    raise DomainError(
                        self.domid,
                        f"xenforeignmemory_map({op})",
                        f"{bad.size} of {n} pages refused; first PFN {int(chunk[i]):#x}: "
                        f"{_errtext(abs(int(err[i])))}",
                    )
                view = np.frombuffer(_ffi.buffer(addr, n * PAGE_SIZE), dtype=np.uint8)
                yield start, view.reshape(n, PAGE_SIZE)
            finally:
                _lib.xenforeignmemory_unmap(fmem, addr, n)

    def gather(self, pfns: np.ndarray, out: np.ndarray) -> None:
        p = check_pfns(self.domid, "gather", pfns, self.pages)
        _check_page_array(self.domid, "gather", out, p.size, writable=True)
        for start, view in self._map_batches("gather", p, _lib.PROT_READ):
            out[start : start + view.shape[0]] = view

    def scatter(self, pfns: np.ndarray, pages: np.ndarray) -> None:
        p = check_pfns(self.domid, "scatter", pfns, self.pages)
        _check_page_array(self.domid, "scatter", pages, p.size, writable=False)
        prot = _lib.PROT_READ | _lib.PROT_WRITE
        for start, view in self._map_batches("scatter", p, prot):
            view[:] = pages[start : start + view.shape[0]]

    def present_pfns(self) -> np.ndarray:
        """The PFNs below ``pages`` that have memory behind them, sorted uint64.

        An HVM/PVH p2m has holes (a 128 MiB PVH guest has ``pages`` near 4 GiB
        because of its special pages below 0xFF000000): ``gather`` of a hole
        fails, so a full copy must list only these. Probed the way libxc's save
        did, by mapping every PFN read-only in batches and keeping the ones
        whose err[] entry is 0.
        """
        fmem = self._hv.fmem
        keep = []
        for start in range(0, self.pages, MAX_MAP_PAGES):
            chunk = np.arange(start, min(start + MAX_MAP_PAGES, self.pages), dtype=np.uint64)
            n = chunk.size
            err = np.zeros(n, dtype=np.intc)
            addr = _lib.xenforeignmemory_map(
                fmem,
                self.domid,
                _lib.PROT_READ,
                n,
                _ffi.from_buffer("xen_pfn_t[]", chunk),
                _ffi.from_buffer("int[]", err),
            )
            if addr == _ffi.NULL:
                raise self._fail(f"xenforeignmemory_map(probe PFNs {start:#x}+{n})")
            _lib.xenforeignmemory_unmap(fmem, addr, n)
            keep.append(chunk[err == 0])
        return np.concatenate(keep) if keep else np.empty(0, dtype=np.uint64)

    def populated_pfns(self) -> np.ndarray:
        """The Domain interface's name for ``present_pfns()``."""
        return self.present_pfns()

    def populate(self, pfns: np.ndarray) -> None:
        """Give the domain 4 KiB pages at ``pfns`` (backup building)."""
        p = np.ascontiguousarray(np.asarray(pfns), dtype=np.uint64)
        if p.ndim != 1 or p.size == 0:
            return
        arr = _ffi.from_buffer("xen_pfn_t[]", p)
        if _lib.xc_domain_populate_physmap_exact(self._hv.xch, self.domid, p.size, 0, 0, arr) < 0:
            raise self._fail(f"xc_domain_populate_physmap_exact({p.size} pages)")
        self.pages = max(self.pages, int(p.max()) + 1)

    def _magic_pfns(self) -> tuple[int, int, int]:
        val = _ffi.new("uint64_t *")
        out = []
        for name in ("HVM_PARAM_IOREQ_PFN", "HVM_PARAM_BUFIOREQ_PFN", "HVM_PARAM_STORE_PFN"):
            if _lib.xc_hvm_param_get(self._hv.xch, self.domid, getattr(_lib, name), val) < 0:
                raise self._fail(f"xc_hvm_param_get({name})")
            out.append(int(val[0]))
        return out[0], out[1], out[2]

    def hvm_context(self) -> bytes:
        xch = self._hv.xch
        size = _lib.xc_domain_hvm_getcontext(xch, self.domid, _ffi.NULL, 0)
        if size <= 0:
            raise self._fail("xc_domain_hvm_getcontext(size)")
        buf = _ffi.new("uint8_t[]", size)
        got = _lib.xc_domain_hvm_getcontext(xch, self.domid, buf, size)
        if got < 0:
            raise self._fail("xc_domain_hvm_getcontext")
        return bytes(_ffi.buffer(buf, got))

    def vcpu_contexts(self) -> list[bytes]:
        """Raw ``vcpu_guest_context_any_t`` of each vCPU (PV guests)."""
        raw = self._raw_info()
        out = []
        ctx = _ffi.new("vcpu_guest_context_any_t *")
        for vcpu in range(int(raw.max_vcpu_id) + 1):
            if _lib.xc_vcpu_getcontext(self._hv.xch, self.domid, vcpu, ctx) < 0:
                raise self._fail(f"xc_vcpu_getcontext(vcpu {vcpu})")
            out.append(bytes(_ffi.buffer(ctx)))
        return out

    def get_context(self) -> Context:
        if self.is_hvm():
            return Context(self._magic_pfns(), self.hvm_context(), b"")
        return Context((0, 0, 0), b"".join(self.vcpu_contexts()), b"")

    def set_context(self, ctx: Context) -> None:
        if not self.is_hvm():
            raise DomainError(
                self.domid,
                "set_context",
                "PV vCPU context restore needs page-table (MFN) translation; not implemented",
            )
        blob = bytes(ctx.hvm_context)
        if not blob:
            raise DomainError(self.domid, "set_context", "empty HVM context")
        buf = _ffi.new("uint8_t[]", blob)
        if _lib.xc_domain_hvm_setcontext(self._hv.xch, self.domid, buf, len(blob)) < 0:
            raise self._fail("xc_domain_hvm_setcontext")
        names = ("HVM_PARAM_IOREQ_PFN", "HVM_PARAM_BUFIOREQ_PFN", "HVM_PARAM_STORE_PFN")
        for name, pfn in zip(names, ctx.magic_pfns, strict=True):
            if (
                pfn
                and _lib.xc_hvm_param_set(self._hv.xch, self.domid, getattr(_lib, name), pfn) < 0
            ):
                raise self._fail(f"xc_hvm_param_set({name})")

    def _output(self):
        if self._netbuf is None:
            from .netbuf import OutputBuffer

            self._netbuf = OutputBuffer.for_domain(self.domid)
        return self._netbuf

    def output_barrier(self) -> None:
        self._output().barrier()

    def output_release(self) -> None:
        self._output().release()

    def output_unplug(self) -> None:
        if self._netbuf is not None:
            self._netbuf.unplug()

    def destroy(self) -> None:
        self.close()
        if _lib.xc_domain_destroy(self._hv.xch, self.domid) < 0:
            raise self._fail("xc_domain_destroy")

    def _free_dirty(self) -> None:
        if self._dirty != _ffi.NULL:
            _lib.remus_dirty_free(self._hv.xch, self._dirty)
            self._dirty = _ffi.NULL
            self._dirty_buf = None

    def close(self) -> None:
        self._free_dirty()
        if self._netbuf is not None:
            try:
                self._netbuf.unplug()
            finally:
                self._netbuf = None


class XenHypervisor(Hypervisor):
    """The local Xen host, from a dom0.

    ``libvirt_uri`` (default: $REMUS_LIBVIRT_URI) makes name/UUID lookups and
    create_backup go through libvirt; without it names resolve through
    xenstore and backups are created with ``xl create -p``.
    """

    kind = "xen"

    def __init__(self, libvirt_uri: str | None = None) -> None:
        _require_binding()
        if not os.path.exists(PRIVCMD_DEVICE):
            raise HypervisorUnavailable(
                f"{PRIVCMD_DEVICE} is missing: this is not a Xen dom0 (in dom0, load the "
                "xen-privcmd module and mount xenfs on /proc/xen)"
            )
        self.xch, self.fmem = open_xc()
        self.libvirt_uri = (
            libvirt_uri if libvirt_uri is not None else os.environ.get(LIBVIRT_URI_ENV)
        )
        self._xs = None
        self._domains: weakref.WeakSet[XenDomain] = weakref.WeakSet()

    # -- raw information -----------------------------------------------------
    def _getinfo(self, domid: int):
        info = _ffi.new("xc_domaininfo_t *")
        n = _lib.xc_domain_getinfolist(self.xch, domid, 1, info)
        if n < 0:
            raise DomainError(domid, "xc_domain_getinfolist", _errtext())
        if n == 0 or int(info.domain) != domid:
            raise DomainError(domid, "lookup", "no such domain")
        return info

    def _all_raw(self) -> list:
        out = []
        first = 0
        while first <= MAX_DOMID:
            infos = _ffi.new("xc_domaininfo_t[]", GETINFO_BATCH)
            n = _lib.xc_domain_getinfolist(self.xch, first, GETINFO_BATCH, infos)
            if n < 0:
                raise DomainError(None, "xc_domain_getinfolist", _errtext())
            for i in range(n):
                copy = _ffi.new("xc_domaininfo_t *")
                copy[0] = infos[i]
                out.append(copy)
            if n < GETINFO_BATCH:
                break
            first = int(infos[n - 1].domain) + 1
        return out

    def _xenstore(self):
        if self._xs is None:
            from .xenstore import XenStore

            self._xs = XenStore.connect()
        return self._xs

    def _name_of(self, domid: int) -> str:
        try:
            return self._xenstore().name_of(domid) or ""
        except DomainError:
            return ""

    def _to_info(self, raw, pages: int | None) -> DomainInfo:
        flags = int(raw.flags)
        domid = int(raw.domain)
        if flags & _lib.XEN_DOMINF_dying:
            state = "dying"
        elif flags & _lib.XEN_DOMINF_shutdown:
            state = "shutdown"
        elif flags & _lib.XEN_DOMINF_paused:
            state = "paused"
        else:
            state = "running"
        if pages is None:
            gp = _ffi.new("xen_pfn_t *")
            pages = int(gp[0]) + 1 if _lib.xc_domain_maximum_gpfn(self.xch, domid, gp) >= 0 else 0
        extra = {
            "tot_pages": int(raw.tot_pages),
            "max_pages": int(raw.max_pages),
            "cpu_time_ns": int(raw.cpu_time),
        }
        if flags & _lib.XEN_DOMINF_shutdown:
            extra["shutdown_reason"] = (
                flags >> _lib.XEN_DOMINF_shutdownshift
            ) & _lib.XEN_DOMINF_shutdownmask
        return DomainInfo(
            domid=domid,
            name=self._name_of(domid),
            uuid=format_uuid(bytes(raw.handle)),
            pages=pages,
            vcpus=int(raw.nr_online_vcpus),
            state=state,
            hvm=bool(flags & _lib.XEN_DOMINF_hvm_guest),
            extra=extra,
        )

    def shutdown_reason(self, domid: int) -> int | None:
        """Xen's SHUTDOWN_* code if the domain has shut down, else None."""
        flags = int(self._getinfo(domid).flags)
        if not flags & _lib.XEN_DOMINF_shutdown:
            return None
        return (flags >> _lib.XEN_DOMINF_shutdownshift) & _lib.XEN_DOMINF_shutdownmask

    def is_suspended(self, domid: int) -> bool:
        """True once the domain shut down with reason SHUTDOWN_suspend."""
        return self.shutdown_reason(domid) == _lib.SHUTDOWN_suspend

    # -- Hypervisor interface --------------------------------------------------
    def list(self) -> list[DomainInfo]:
        return [self._to_info(raw, None) for raw in self._all_raw()]

    def resolve(self, ref: int | str) -> int:
        """domid for a domid, a name or a UUID."""
        if isinstance(ref, int):
            return ref
        text = str(ref).strip()
        if text.isdigit():
            return int(text)
        if self.libvirt_uri:
            from .virt import Virt

            with Virt(self.libvirt_uri) as v:
                return v.resolve_domid(text)
        if _UUID_RE.match(text):
            want = text.lower()
            for raw in self._all_raw():
                if format_uuid(bytes(raw.handle)) == want:
                    return int(raw.domain)
            raise DomainError(text, "lookup", "no domain with this UUID")
        return self._xenstore().domid_of(text)

    def lookup(self, ref: int | str) -> XenDomain:
        domid = self.resolve(ref)
        if not 0 <= domid <= MAX_DOMID:
            raise DomainError(domid, "lookup", f"domid out of range 0..{MAX_DOMID}")
        self._getinfo(domid)  # DomainError if it does not exist
        dom = XenDomain(self, domid)
        self._domains.add(dom)
        return dom

    def create_backup(self, config: DomainConfig, disks: Sequence[str] = ()) -> XenDomain:
        """``disks``: the receiver's images of the backup's disks, given to
        the domain as phy disks (libxl's block script attaches each through a
        loop device) on the primary's vdevs (xenbind.xendisks)."""
        if self.libvirt_uri:
            if disks:
                raise DomainError(
                    config.name,
                    "create_backup",
                    "replicated disks on a Xen backup made through libvirt are not "
                    "supported by this release (docs/disk.md, 'On Xen'): use xl (no "
                    "libvirt URI) or protect the domain without its disks",
                )
            from .virt import Virt

            with Virt(self.libvirt_uri) as v:
                domid = v.define_backup(config, start_paused=True)
        else:
            from .xl import create_paused

            domid = create_paused(config, disks)
        return self.lookup(domid)

    def close(self) -> None:
        for d in list(self._domains):
            d.close()
        self._domains.clear()
        if self._xs is not None:
            self._xs.close()
            self._xs = None
        if self.fmem is not None and self.fmem != _ffi.NULL:
            _lib.xenforeignmemory_close(self.fmem)
            self.fmem = None
        if self.xch is not None and self.xch != _ffi.NULL:
            _lib.xc_interface_close(self.xch)
            self.xch = None
