"""The simulated guest's disks: their files, their block server, the guest's NBD client.

A domain created with disks (``create --disk SIZE``, docs/disk.md) has, in
the host's directory::

    dom-N-disk0.img ...   the images, sparse, made by the host (or the
                          ``disk_files`` given at create, used as they are
                          and never deleted by the host: a backup's images
                          belong to its receiver)
    dom-N.nbd             the block server's NBD socket: export "0" (and the
                          default export "") is disk 0, "1" disk 1, ...
    dom-N.dctl            the block server's control socket (the daemons'
                          side, xenbind.mirrorclient); nothing listens there
                          while the stock ``file`` plugin stands in
    dom-N.disklog         the block server's stderr

Who does what:
    host     starts ONE block server per domain (``server_command``, nbdkit
             with --exit-with-parent: a killed host takes it down) before the
             worker, waits until its sockets exist, kills it at destroy and at
             host shutdown, and records the disks in the meta:
             ``disks: [{"path", "size", "nbd", "control", "owned"}]``
    worker   connects to disk i's export with libnbd (``GuestDisk``) after
             start; every disk write of the workload is a synchronous
             ``pwrite`` that has completed (the server acknowledged it) before
             the workload goes on, so when the single-threaded worker answers
             a pause no write is in flight. A broken connection is a
             ``DiskError``: the guest crashes, as one whose disk vanished.

Rules: sizes are whole 512-byte sectors, ``MIN_DISK`` to ``MAX_DISK``;
errors name the disk and what was wrong. libnbd is Debian's python3-libnbd
(built for the system's 3.11): ``nbd_module`` appends its directory to
``sys.path`` when the venv lacks it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
from types import ModuleType
from typing import Any

SECTOR = 512
MIN_DISK = 1 << 20  # 1 MiB
MAX_DISK = 64 << 30  # 64 GiB
MAX_DISKS = 8
#: Debian's python3-libnbd lives here (same 3.11 ABI as the venv's Python)
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
#: the longest path a Unix socket address holds (sun_path, with its NUL)
MAX_SOCKET_PATH = 107
CONNECT_TIMEOUT_S = 5.0


class DiskError(Exception):
    """A disk that cannot be made, served or written; the message says which."""


def check_size(size: object, what: str = "disk") -> int:
    """``size`` as an int if it is a valid disk size; DiskError otherwise."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise DiskError(f"{what} size must be a number of bytes, got {size!r}")
    if size % SECTOR:
        raise DiskError(f"{what} size {size} is not a whole number of {SECTOR}-byte sectors")
    if not MIN_DISK <= size <= MAX_DISK:
        raise DiskError(
            f"{what} size {size} is out of bounds ({MIN_DISK >> 20} MiB to {MAX_DISK >> 30} GiB)"
        )
    return size


def image_path(sim_dir: str, domid: int, index: int) -> str:
    return os.path.join(sim_dir, f"dom-{domid}-disk{index}.img")


def server_command(paths: list[str], nbd_sock: str, control: str) -> tuple[list[str], list[str]]:
    """The block server's argv for ``paths``, and the sockets it makes (the
    host waits for them). The one place that says which server it is:
    xenbind.nbdmirror (``_stock_command`` is nbdkit's file plugin, which
    speaks the same NBD to the guest but neither mirrors nor seals)."""
    return _mirror_command(paths, nbd_sock, control)


def _nbdkit() -> str:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise DiskError("nbdkit is not installed (scripts/install-system-deps installs it)")
    return nbdkit


def _mirror_command(paths: list[str], nbd_sock: str, control: str) -> tuple[list[str], list[str]]:
    """The mirroring plugin (xenbind.nbdmirror): its control socket appears
    only once both sockets listen, so it is the one to wait for. A tree
    without the plugin (it is being written beside this) gets the stock one."""
    try:
        from ..nbdmirror import command
    except ImportError:
        return _stock_command(paths, nbd_sock)

    argv = command(list(paths), nbd_sock, control)
    return [_nbdkit(), *argv[1:]], [control]


def _stock_command(paths: list[str], nbd_sock: str) -> tuple[list[str], list[str]]:
    """nbdkit's stock ``file`` plugin: the same NBD to the guest, no mirror,
    no control socket; one disk (it has one export)."""
    if len(paths) != 1:
        raise DiskError(
            f"{len(paths)} disks need the mirroring plugin (xenbind.nbdmirror); "
            "nbdkit's file plugin serves one"
        )
    return [_nbdkit(), "--exit-with-parent", "-f", "--unix", nbd_sock, "file", paths[0]], [nbd_sock]


def nbd_module() -> ModuleType:
    """libnbd's Python binding (``nbd``); DiskError if it is not installed."""
    try:
        return importlib.import_module("nbd")
    except ImportError:
        if DIST_PACKAGES not in sys.path and os.path.isdir(DIST_PACKAGES):
            sys.path.append(DIST_PACKAGES)
            try:
                return importlib.import_module("nbd")
            except ImportError:
                pass
    raise DiskError("libnbd's Python binding is not installed (apt install python3-libnbd)")


class GuestDisk:
    """The guest's NBD connection to one disk: synchronous reads and writes.

    Every failure (connection lost, server error, short read) is a
    DiskError naming the disk; the handle is unusable after one."""

    def __init__(self, index: int, nbd_sock: str, size: int, path: str = "") -> None:
        self.index = index
        self.sock = nbd_sock
        self.size = size
        self.path = path
        self.broken: str | None = None
        nbd = nbd_module()
        self._error: type[Exception] = nbd.Error
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:  # the server made its socket: it listens at once or very soon
            h: Any = nbd.NBD()
            try:
                h.set_export_name(str(index))
                h.connect_unix(nbd_sock)
                break
            except nbd.Error as e:
                h.close()
                if time.monotonic() > deadline:
                    raise DiskError(f"{self}: cannot connect to {nbd_sock}: {e}") from None
                time.sleep(0.02)
        self._h = h
        served = int(h.get_size())
        if served != size:
            self.close()
            raise DiskError(f"{self}: the server serves {served} bytes, the meta says {size}")

    def __str__(self) -> str:
        return f"disk {self.index}" + (f" ({self.path})" if self.path else "")

    def _fail(self, op: str, offset: int, e: Exception) -> DiskError:
        self.broken = f"{self}: {op} at byte {offset} failed: {e}"
        return DiskError(self.broken)

    def _check(self, offset: int, length: int, op: str) -> None:
        if self.broken:
            raise DiskError(self.broken)
        if offset < 0 or offset + length > self.size:
            raise DiskError(f"{self}: {op} of {length} bytes at {offset} is past its end")

    def pwrite(self, data: bytes, offset: int) -> None:
        """Write ``data`` at ``offset``; returns once the server acknowledged it."""
        self._check(offset, len(data), "write")
        try:
            self._h.pwrite(data, offset)
        except self._error as e:
            raise self._fail("write", offset, e) from None

    def pread(self, length: int, offset: int) -> bytes:
        self._check(offset, length, "read")
        try:
            return bytes(self._h.pread(length, offset))
        except self._error as e:
            raise self._fail("read", offset, e) from None

    def close(self) -> None:
        h, self._h = getattr(self, "_h", None), None
        if h is not None:
            try:
                h.shutdown()
            except self._error:
                pass
            h.close()
