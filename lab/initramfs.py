"""Write a Linux initramfs: a gzip-compressed cpio archive in "newc" format.

Layout of one newc entry (all numbers 8 ASCII hex digits, no NULs between):

    "070701"  ino mode uid gid nlink mtime filesize devmajor devminor
              rdevmajor rdevminor namesize check
    name + NUL, padded with NULs to a multiple of 4 (counting the 110-byte header)
    file data (regular file: the bytes; symlink: the target), padded to 4

The archive ends with an entry named "TRAILER!!!". Directories must appear
before their contents. Rules this module keeps: entries are written in the
order given (the caller lists parents first), every entry is owned by root,
mtimes are 0 so the same inputs give the same archive byte for byte.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
NEWC_HEADER_LEN = 110
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member: ``kind`` is "dir", "file", "symlink" or "chardev"."""

    path: str  # inside the archive, no leading slash ("bin/busybox")
    kind: str
    mode: int = 0o755
    data: bytes = b""  # file contents, or the symlink's target
    rdev: tuple[int, int] = (0, 0)  # chardev: (major, minor)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _entry(
    ino: int, name: str, mode: int, data: bytes, nlink: int, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    bname = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(bname), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    assert len(header) == NEWC_HEADER_LEN
    out = header + bname + _pad4(NEWC_HEADER_LEN + len(bname))
    return out + data + _pad4(len(data))


def build_cpio(entries: list[Entry]) -> bytes:
    """The uncompressed newc archive holding ``entries`` in order."""
    parts = []
    for ino, e in enumerate(entries, start=1):
        if e.kind == "dir":
            parts.append(_entry(ino, e.path, stat.S_IFDIR | e.mode, b"", 2))
        elif e.kind == "file":
            parts.append(_entry(ino, e.path, stat.S_IFREG | e.mode, e.data, 1))
        elif e.kind == "symlink":
            parts.append(_entry(ino, e.path, stat.S_IFLNK | 0o777, e.data, 1))
        elif e.kind == "chardev":
            parts.append(_entry(ino, e.path, stat.S_IFCHR | e.mode, b"", 1, e.rdev))
        else:
            raise ValueError(f"unknown entry kind {e.kind!r} for {e.path}")
    parts.append(_entry(0, TRAILER, 0, b"", 1))
    return b"".join(parts)


def write_initramfs(path: str, entries: list[Entry]) -> None:
    """Write ``entries`` as a gzip-compressed newc archive at ``path``."""
    with open(path, "wb") as f:
        f.write(gzip.compress(build_cpio(entries), compresslevel=6, mtime=0))


def tree(dirs: list[str]) -> list[Entry]:
    """Directory entries for ``dirs`` and all their parents, parents first."""
    seen: list[str] = []
    for d in dirs:
        parts = d.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in seen:
                seen.append(p)
    return [Entry(p, "dir") for p in seen]
