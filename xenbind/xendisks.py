"""How remusd learns a Xen domain's replicated disks, and how a Xen backup is
given its images (docs/disk.md, "On Xen").

The primary: the domain's disks file
------------------------------------
Whoever starts a domain's mirroring block server (``xenbind/nbdmirror.py``
under nbdkit, attached as ``/dev/nbdN`` with ``nbd-client -unix``; the guest's
config has ``disk = ['phy:/dev/nbdN,xvda,w']``) writes, beside it::

    $REMUS_XEN_DISKS_DIR/<domain name>.json     (default /run/remus/xen-disks)

    {"disks": [{"path": "/srv/vm/web.img",          the image the server writes
                "control": "/run/remus/web.ctl",    the server's control socket
                "nbd": "/run/remus/web.nbd",        its NBD socket (informative)
                "vdev": "xvda",                     the guest's device for it
                "size": 17179869184}]}              optional: else the file's size

one entry per disk, in the order the block server's ``disk=`` arguments give
them (the disk stream's order). ``XenDomain.disks()`` reads it each time it is
asked; no file means no replicated disks, as before. Why a file and not
xenstore: it lives in dom0's own root-owned directory, which no guest can
write (a guest can write parts of its own xenstore tree), it needs no
toolstack change, and remusd reads it without a xenstore round trip.

The backup: its images given to ``xl create -p``
-------------------------------------------------
The receiver keeps the backup's images (``--disk-dir``, receiver.backupdisks)
and passes them to ``create_backup``. Each becomes ``format=raw, vdev=V,
access=rw, backendtype=phy, target=IMAGE`` in the backup's xl config, V being
the primary's vdev for that disk (DomainConfig.extra ``disk_vdevs``, which the
primary sends from its disks file): libxl's phy backend accepts a regular
file on Linux and its ``block`` hotplug script attaches it to a loop device
(``losetup``; detached again when the domain goes; ``$REMUS_XEN_BLOCK_SCRIPT`` names another hotplug script,
``script=`` in the spec). A buffered loop device
reads and writes through the image's page cache, the same one the receiver's
``pwrite``/``fdatasync`` go through, and nothing else writes it: the backup
domain stays paused (its blkfront never connects) until the failover, when
the receiver has stopped writing and the guest resumes on that disk.

Rules: every path must be absolute and free of the characters xl's disk
syntax gives a meaning to (``,`` ``=`` quotes, whitespace); a vdev is
``xvd`` + 1-3 letters; a size is a positive multiple of 512. A file that
breaks them is a ConfigError naming the file and the entry.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .errors import ConfigError
from .types import DiskInfo

DISKS_DIR_ENV = "REMUS_XEN_DISKS_DIR"
#: A vbd hotplug script for the backup's disks instead of libxl's ``block``
#: (the lab's, whose sharing checks ran past libxl's timeout under TCG).
BLOCK_SCRIPT_ENV = "REMUS_XEN_BLOCK_SCRIPT"
DISKS_DIR = "/run/remus/xen-disks"
SECTOR = 512
MAX_DISKS = 26
_PATH = re.compile(r"^/[A-Za-z0-9_./@+:-]*$")
_VDEV = re.compile(r"^xvd[a-z]{1,3}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def disks_dir() -> str:
    return os.environ.get(DISKS_DIR_ENV) or DISKS_DIR


def disks_file(name: str) -> str:
    """The disks file of the domain called ``name``."""
    if not _NAME.match(name):
        raise ConfigError(f"domain name {name!r} cannot name a disks file")
    return os.path.join(disks_dir(), f"{name}.json")


def default_vdev(index: int) -> str:
    return "xvd" + chr(ord("a") + index)


def _path(where: str, key: str, v: Any) -> str:
    if not isinstance(v, str) or not _PATH.match(v):
        raise ConfigError(f"{where}: {key} {v!r} is not an absolute path of plain characters")
    return v


def parse_disks(text: str, where: str = "disks file") -> list[tuple[DiskInfo, str]]:
    """(DiskInfo, vdev) per disk of a disks file's text (module docstring)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{where}: not JSON: {e}") from None
    disks = data.get("disks") if isinstance(data, dict) else None
    if not isinstance(disks, list) or not 1 <= len(disks) <= MAX_DISKS:
        raise ConfigError(f"{where}: needs 'disks', a list of 1 to {MAX_DISKS} entries")
    out: list[tuple[DiskInfo, str]] = []
    for i, d in enumerate(disks):
        w = f"{where}, disk {i}"
        if not isinstance(d, dict):
            raise ConfigError(f"{w}: not an object")
        unknown = set(d) - {"path", "control", "nbd", "vdev", "size"}
        if unknown:
            raise ConfigError(f"{w}: unknown keys {sorted(unknown)}")
        path = _path(w, "path", d.get("path"))
        control = _path(w, "control", d.get("control"))
        nbd = _path(w, "nbd", d["nbd"]) if d.get("nbd") is not None else ""
        vdev = d.get("vdev", default_vdev(i))
        if not isinstance(vdev, str) or not _VDEV.match(vdev):
            raise ConfigError(f"{w}: vdev {vdev!r} is not xvd + 1-3 letters")
        size = d.get("size")
        if size is None:
            try:
                size = os.path.getsize(path)
            except OSError as e:
                raise ConfigError(f"{w}: no size given and {path}: {e.strerror}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % SECTOR:
            raise ConfigError(f"{w}: size {size!r} is not a positive multiple of {SECTOR}")
        out.append((DiskInfo(path=path, size=size, control=control, nbd=nbd), vdev))
    vdevs = [v for _, v in out]
    if len(set(vdevs)) != len(vdevs):
        raise ConfigError(f"{where}: a vdev is given twice: {vdevs}")
    return out


def read_disks(name: str) -> list[tuple[DiskInfo, str]]:
    """The domain's disks from its disks file; [] when it has none."""
    path = disks_file(name)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 16)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return parse_disks(text, path)


def backup_disk_specs(images: list[str] | tuple[str, ...], vdevs: Any) -> list[str]:
    """The xl ``disk`` entries of a backup whose images are ``images``, the
    i-th on the primary's i-th vdev (``vdevs``: DomainConfig.extra's
    ``disk_vdevs``, from the peer: checked; missing means xvda, xvdb, ...)."""
    if len(images) > MAX_DISKS:
        raise ConfigError(f"{len(images)} disks: at most {MAX_DISKS}")
    if vdevs is None:
        vdevs = [default_vdev(i) for i in range(len(images))]
    if not isinstance(vdevs, list) or len(vdevs) != len(images):
        raise ConfigError(f"disk_vdevs {vdevs!r} does not name one vdev per disk")
    if not all(isinstance(v, str) and _VDEV.match(v) for v in vdevs) or len(set(vdevs)) != len(
        vdevs
    ):
        raise ConfigError(f"disk_vdevs {vdevs!r}: each must be xvd + 1-3 letters, none twice")
    script = os.environ.get(BLOCK_SCRIPT_ENV)
    opt = f"script={_path('backup disks', BLOCK_SCRIPT_ENV, script)}, " if script else ""
    specs = []
    for i, (img, vdev) in enumerate(zip(images, vdevs, strict=True)):
        img = _path(f"backup disk {i}", "image", os.path.abspath(img))
        specs.append(f"format=raw, vdev={vdev}, access=rw, backendtype=phy, {opt}target={img}")
    return specs
