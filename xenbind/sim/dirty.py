"""Log-dirty tracking for simulated domains, the way Xen does it: write protection.

Two modes; each domain reports the one in use (``DomainInfo.extra["dirty_mode"]``,
``list --json``, the worker's log):

``uffd-wp``  (kernel >= 6.7)
    The guest process (the domain worker, which owns the mapping its workload
    writes through) creates a userfaultfd with ``UFFD_FEATURE_WP_ASYNC`` (+
    ``WP_UNPOPULATED``, ``WP_HUGETLBFS_SHMEM`` when offered), registers its
    guest mapping in ``UFFDIO_REGISTER_MODE_WP`` and write-protects it. In
    async mode a write to a protected page is resolved inside the kernel (no
    fault message): the PTE is unprotected, which ``PAGEMAP_SCAN`` reports as
    ``PAGE_IS_WRITTEN``. Any process allowed to ptrace the guest process (the
    daemons run as root) opens ``/proc/<pid>/pagemap`` and issues
    ``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`` and
    ``category_mask = return_mask = PAGE_IS_WRITTEN``: the kernel returns the
    written pages and write-protects them again, in one step per PTE (no write
    is lost between the read and the re-protect). Whoever writes the page
    through that mapping is seen; writes through *other* mappings of the file
    (a daemon's scatter) are not, as Xen does not log foreign-mapping writes.

``bitmap``  (fallback)
    The workload marks a byte per page in a shared bitmap file on every
    write; the worker snapshots and clears it in its single thread (so the
    snapshot is atomic with respect to the guest's writes).

The vCPU's write marks (``uffd-wp`` mode, ``WriteMarks``, ``dom-N.marks``)
    ``PAGEMAP_SCAN`` walks every PTE of the range it is given, written or
    not: a read of the whole log costs ~1.7 ns a guest page on a quiet
    machine (0.44 ms for 1 GiB, ~3.5 ms for 8 GiB; several times that on a
    loaded one) whatever was dirtied, where Xen's log-dirty read is a copy
    of its bitmap. So the guest's vCPU (the workload's write path in the
    domain worker, the one writer of the guest's memory through the mapping
    uffd-wp watches: the bitmap mode's ``mark`` hook) also marks what it
    wrote, *after* writing it, in one of two mark sets: one byte per page
    and one per region of ``MARK_REGION_PAGES`` pages (256 KiB), page byte
    first. A set the vCPU is not writing is *quiescent*; taking one (the
    marked regions, the marked pages in them, both cleared) costs in marked
    regions, not in guest size. A read while the guest is **paused** takes
    both sets (nothing writes). A read while it **runs** first asks the
    worker to swap sets (worker request ``M``: one round trip, answered
    between two batches, like any request) and takes the set it left:
    every write before the swap is in it or in a set taken before, every
    write after it lands in the other. So each read returns every page
    written since the previous read, without a walk; the reader's mapping
    is the file's, the worker's thread is the only writer of marks.
    The kernel stays the judge: every Nth running read (the first one
    included) also walks the log with ``PAGEMAP_SCAN`` and swaps once more
    after the walk (the batch running during it has marked its pages by
    then); a page the walk reports (written since the previous walk and not
    re-protected since) that no read since that walk returned is a miss. It
    is returned all the same, the reader warns and from then on walks on
    every read (SimDomain in client.py). Between walks the PTEs of written
    pages stay unprotected, so the guest's next writes to them do not
    fault: it pays the marks (a few numpy stores per batch) instead of a
    write-protect fault per page and epoch. Marks are reset when log-dirty
    is enabled and written only while it is on.

Kernel ABI used here (x86_64; the installed headers predate it, so the values
are computed from the kernel's definitions, include/uapi/linux/userfaultfd.h
and include/uapi/linux/fs.h):

    userfaultfd(2)             syscall 323 on x86_64 (or ioctl USERFAULTFD_IOC_NEW on
                               /dev/userfaultfd), flags O_CLOEXEC|O_NONBLOCK
    struct uffdio_api          { u64 api = 0xAA; u64 features; u64 ioctls; }    24 bytes
    UFFDIO_API                 _IOWR(0xAA, 0x3F, struct uffdio_api)
    struct uffdio_register     { u64 start; u64 len; u64 mode; u64 ioctls; }    32 bytes
    UFFDIO_REGISTER            _IOWR(0xAA, 0x00, struct uffdio_register)
    struct uffdio_writeprotect { u64 start; u64 len; u64 mode; }               24 bytes
    UFFDIO_WRITEPROTECT        _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
    struct pm_scan_arg         { u64 size, flags, start, end, walk_end, vec, vec_len,
                                 max_pages, category_inverted, category_mask,
                                 category_anyof_mask, return_mask; }          96 bytes
    struct page_region         { u64 start, end, categories; }  (end exclusive) 24 bytes
    PAGEMAP_SCAN               _IOWR('f', 16, struct pm_scan_arg)

Rules: the scanner never raises anything but ``DirtyTrackingError``; a scan
that stops early (vector full) is resumed from ``walk_end`` until the whole
range is covered, so one call always covers the whole guest.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import TYPE_CHECKING

import numpy as np

from .. import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    import mmap

MODE_UFFD = "uffd-wp"
MODE_BITMAP = "bitmap"

# --- ioctl encoding (asm-generic/ioctl.h): dir<<30 | size<<16 | type<<8 | nr ---
_IOC_WRITE = 1
_IOC_READ = 2


def _iowr(typ: int, nr: int, size: int) -> int:
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (typ << 8) | nr


#: userfaultfd(2) syscall numbers by machine; elsewhere /dev/userfaultfd is used
SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "ppc64le": 364, "s390x": 355}
USERFAULTFD_IOC_NEW = 0xAA << 8  # _IO(0xAA, 0x00) on /dev/userfaultfd
UFFD_API = 0xAA
UFFDIO_API = _iowr(0xAA, 0x3F, 24)
UFFDIO_REGISTER = _iowr(0xAA, 0x00, 32)
UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, 24)
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12  # uffd-wp on shmem/hugetlbfs
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # protect never-touched PTEs too
UFFD_FEATURE_WP_ASYNC = 1 << 15  # resolve WP faults in the kernel, no messages

PAGEMAP_SCAN = _iowr(ord("f"), 16, 96)
PM_SCAN_WP_MATCHING = 1 << 0  # write-protect the pages reported
PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail if a page lacks async uffd-wp
PAGE_IS_WRITTEN = 1 << 1  # written since last write-protected

PM_SCAN_ARG_SIZE = 96
#: page_region entries per ioctl call; a scan needing more resumes at walk_end
SCAN_VEC_LEN = 1 << 15

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class DirtyTrackingError(OSError):
    """uffd-wp / PAGEMAP_SCAN could not be set up or used."""


def _ioctl(fd: int, req: int, arg: ctypes.Array, what: str) -> int:
    r = _libc.ioctl(fd, req, ctypes.addressof(arg))
    if r < 0:
        err = ctypes.get_errno()
        raise DirtyTrackingError(err, f"{what}: {os.strerror(err)}")
    return r


def _new_userfaultfd() -> int:
    """A userfaultfd (O_CLOEXEC|O_NONBLOCK): the syscall, else /dev/userfaultfd."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    nr = SYS_USERFAULTFD.get(platform.machine())
    err = 0
    if nr is not None:
        fd = _libc.syscall(nr, flags)
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        why = os.strerror(err) if err else "no syscall number for this machine"
        raise DirtyTrackingError(
            e.errno or 0, f"userfaultfd(2): {why}; /dev/userfaultfd: {e.strerror}"
        ) from e
    try:
        fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(flags))
        if fd < 0:
            e2 = ctypes.get_errno()
            raise DirtyTrackingError(e2, f"USERFAULTFD_IOC_NEW: {os.strerror(e2)}")
        return int(fd)
    finally:
        os.close(dev)


class UffdWriteProtect:
    """The guest side: userfaultfd in async write-protect mode over a mapping.

    Must be created in the process whose writes are to be tracked.
    """

    def __init__(self, addr: int, length: int) -> None:
        if addr % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise DirtyTrackingError(0, "guest mapping must be page aligned")
        self.addr = addr
        self.length = length
        self.fd = _new_userfaultfd()
        try:
            wanted = (
                UFFD_FEATURE_WP_ASYNC
                | UFFD_FEATURE_WP_UNPOPULATED
                | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
            )
            api = (ctypes.c_uint64 * 3)(UFFD_API, wanted, 0)
            try:
                _ioctl(self.fd, UFFDIO_API, api, "UFFDIO_API(WP_ASYNC|WP_UNPOPULATED)")
            except DirtyTrackingError:
                # Older kernels refuse unknown features as a whole; the API
                # handshake can only be done once per fd, so start again.
                os.close(self.fd)
                self.fd = _new_userfaultfd()
                api = (ctypes.c_uint64 * 3)(
                    UFFD_API, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM, 0
                )
                _ioctl(self.fd, UFFDIO_API, api, "UFFDIO_API(WP_ASYNC)")
            self.features = int(api[1])
            if not self.features & UFFD_FEATURE_WP_ASYNC:
                raise DirtyTrackingError(0, "kernel lacks UFFD_FEATURE_WP_ASYNC")
            reg = (ctypes.c_uint64 * 4)(addr, length, UFFDIO_REGISTER_MODE_WP, 0)
            _ioctl(self.fd, UFFDIO_REGISTER, reg, "UFFDIO_REGISTER(MODE_WP)")
            self.protect_all()
        except BaseException:
            os.close(self.fd)
            raise

    def protect_all(self) -> None:
        """Write-protect the whole range (start of a log-dirty period)."""
        wp = (ctypes.c_uint64 * 3)(self.addr, self.length, UFFDIO_WRITEPROTECT_MODE_WP)
        _ioctl(self.fd, UFFDIO_WRITEPROTECT, wp, "UFFDIO_WRITEPROTECT")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PagemapScanner:
    """The reader side: read-and-reprotect the written pages of a guest mapping.

    ``pid`` is the process that owns the mapping (``"self"`` for the caller),
    ``addr``/``length`` the mapping in that process's address space.
    """

    def __init__(self, pid: int | str, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length
        self.pages = length >> PAGE_SHIFT
        try:
            self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DirtyTrackingError(e.errno or 0, f"open /proc/{pid}/pagemap: {e.strerror}") from e
        self._vec = (ctypes.c_uint64 * (3 * SCAN_VEC_LEN))()
        # numpy's frombuffer stub leaves out ctypes arrays (buffers all the same)
        vec = np.frombuffer(self._vec, dtype=np.uint64)  # type: ignore[call-overload]
        self._vec_np = vec.reshape(SCAN_VEC_LEN, 3)
        self._arg = (ctypes.c_uint64 * 12)()

    def scan(self, reprotect: bool = True) -> np.ndarray:
        """Sorted uint64 PFNs written since the last reprotecting scan."""
        flags = PM_SCAN_CHECK_WPASYNC | (PM_SCAN_WP_MATCHING if reprotect else 0)
        end = self.addr + self.length
        start = self.addr
        parts: list[np.ndarray] = []
        arg = self._arg
        while start < end:
            arg[:] = [
                PM_SCAN_ARG_SIZE,
                flags,
                start,
                end,
                0,
                ctypes.addressof(self._vec),
                SCAN_VEC_LEN,
                0,
                0,
                PAGE_IS_WRITTEN,
                0,
                PAGE_IS_WRITTEN,
            ]
            n = _ioctl(self.fd, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
            if n:
                regions = self._vec_np[:n]
                first = (regions[:, 0] - np.uint64(self.addr)) >> np.uint64(PAGE_SHIFT)
                last = (regions[:, 1] - np.uint64(self.addr)) >> np.uint64(PAGE_SHIFT)
                parts.append(_expand_ranges(first, last))
            walk_end = int(arg[4])
            if walk_end <= start:
                raise DirtyTrackingError(0, "PAGEMAP_SCAN made no progress")
            start = walk_end
        if not parts:
            return np.empty(0, dtype=np.uint64)
        pfns = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # The interface promises sorted, unique PFNs. Under concurrent writes a
        # scan resumed at walk_end was seen to report a page twice (remusd
        # logged it); enforce the promise here, at the source, in O(n).
        if len(pfns) > 1 and not bool((pfns[1:] > pfns[:-1]).all()):
            pfns = np.unique(pfns)
        return pfns

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _expand_ranges(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """[first[i], last[i]) ranges (sorted, disjoint) -> one sorted uint64 array."""
    lengths = (last - first).astype(np.int64)
    total = int(lengths.sum())
    if len(first) == total:  # every region is a single page: the common case
        return first.astype(np.uint64, copy=True)
    offsets = np.repeat(
        first.astype(np.int64) - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths
    )
    return (np.arange(total, dtype=np.int64) + offsets).astype(np.uint64)


#: pages per region of the write marks (256 KiB): a take looks at one byte
#: per region and at the page bytes of the marked regions only (64 per
#: dirty page at most; 8 GiB: 32,768 region bytes)
MARK_REGION_SHIFT = 6
MARK_REGION_PAGES = 1 << MARK_REGION_SHIFT
#: mark sets in the file: the vCPU writes one while a reader takes the other
MARK_SETS = 2


def marks_file_size(pages: int) -> int:
    """Bytes of a ``.marks`` file for ``pages`` pages: MARK_SETS sets."""
    return MARK_SETS * WriteMarks.set_size(pages)


class WriteMarks:
    """One set of the vCPU's marks of what it wrote: a byte per page, a byte per region.

    Layout of the ``.marks`` file (``marks_file_size(pages)`` bytes): set 0
    then set 1, each ``set_size(pages)`` bytes: ``regions *
    MARK_REGION_PAGES`` bytes of page marks (PFN p at offset p; the last
    region padded), then ``regions`` bytes of region marks (region r covers
    PFNs r*64 .. r*64+63). 1 = written since the set was last taken.
    The worker sets them (``mark``, after the write; page byte first) in the
    set it writes; a reader takes a quiescent set (``take``). The module
    docstring says why no write is lost between the two.
    """

    def __init__(self, buf: memoryview | bytearray | mmap.mmap, pages: int, which: int = 0) -> None:
        if not 0 <= which < MARK_SETS:
            raise ValueError(f"mark set {which} (there are {MARK_SETS})")
        self.pages = pages
        self.regions = -(-pages // MARK_REGION_PAGES)
        span = self.regions * MARK_REGION_PAGES
        arr = np.frombuffer(
            buf, dtype=np.uint8, count=span + self.regions, offset=which * self.set_size(pages)
        )
        self.page = arr[:span]
        self.page2d = self.page.reshape(self.regions, MARK_REGION_PAGES)
        self.region = arr[span:]

    @staticmethod
    def set_size(pages: int) -> int:
        regions = -(-pages // MARK_REGION_PAGES)
        return regions * MARK_REGION_PAGES + regions

    def mark(self, pfns: np.ndarray) -> None:
        """The worker, after writing ``pfns`` (int64): page bytes, then regions."""
        self.page[pfns] = 1
        self.region[pfns >> MARK_REGION_SHIFT] = 1

    def reset(self) -> None:
        """Everything unmarked (the worker, enabling log-dirty: nothing runs)."""
        self.page.fill(0)
        self.region.fill(0)

    def take(self) -> np.ndarray:
        """The marked pages (sorted uint64 PFNs), cleared. The set must be
        quiescent (a mark set between the read and the clear would be lost)."""
        regs = np.flatnonzero(self.region)
        if not len(regs):
            return np.empty(0, dtype=np.uint64)
        rows, cols = np.nonzero(self.page2d[regs])
        pfns = (regs[rows].astype(np.uint64) << np.uint64(MARK_REGION_SHIFT)) | cols.astype(
            np.uint64
        )
        self.region[regs] = 0
        self.page2d[regs] = 0
        return pfns


class SharedBitmap:
    """The fallback: one byte per page, live + snapshot halves in one file.

    Layout of the ``.dirty`` file: ``pages`` bytes live bitmap (the workload
    sets 1 on each write), then ``pages`` bytes snapshot (the worker copies
    the live half there and clears it on request; readers take the PFNs from
    the snapshot).
    """

    def __init__(self, buf: memoryview | bytearray | mmap.mmap, pages: int) -> None:
        arr = np.frombuffer(buf, dtype=np.uint8, count=2 * pages)
        self.live = arr[:pages]
        self.snap = arr[pages:]

    def mark(self, pfns: np.ndarray | int) -> None:
        self.live[pfns] = 1

    def snapshot_and_clear(self) -> int:
        np.copyto(self.snap, self.live)
        self.live.fill(0)
        return int(np.count_nonzero(self.snap))

    def snapshot_pfns(self) -> np.ndarray:
        return np.flatnonzero(self.snap).astype(np.uint64)


def probe(directory: str) -> tuple[str, str]:
    """Which dirty mode works for memory files in ``directory``: (mode, why)."""
    import mmap
    import tempfile

    try:
        fd, path = tempfile.mkstemp(prefix=".probe-", suffix=".mem", dir=directory)
    except OSError as e:
        return MODE_BITMAP, f"cannot create a probe file in {directory}: {e.strerror}"
    try:
        os.ftruncate(fd, 4 * PAGE_SIZE)
        mm = mmap.mmap(fd, 4 * PAGE_SIZE, mmap.MAP_SHARED)
        arr = np.frombuffer(mm, dtype=np.uint8)
        try:
            uffd = UffdWriteProtect(arr.ctypes.data, 4 * PAGE_SIZE)
            scanner = PagemapScanner("self", arr.ctypes.data, 4 * PAGE_SIZE)
            try:
                scanner.scan()
                arr[2 * PAGE_SIZE] = 1
                seen = scanner.scan().tolist()
            finally:
                scanner.close()
                uffd.close()
            if seen != [2]:
                return MODE_BITMAP, f"PAGEMAP_SCAN returned {seen} for a write to page 2"
            return MODE_UFFD, "userfaultfd async write-protect + PAGEMAP_SCAN"
        except DirtyTrackingError as e:
            return MODE_BITMAP, f"uffd-wp unavailable: {e.strerror or e}"
        finally:
            del arr
            mm.close()
    finally:
        os.close(fd)
        os.unlink(path)
