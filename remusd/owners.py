"""Who owns a domain: one lock and one record per protected domain, under remusd's state directory.

A domain has exactly one owner. Two trackers of one domain's dirty log each
read and clear part of the other's, and both backups go silently wrong; so
``remusd`` refuses a second ``protect`` of a domain, from any process::

    STATE_DIR/UUID.lock   flock(LOCK_EX | LOCK_NB), held by the owning remusd
                          for as long as it protects the domain; the kernel
                          drops it when that process dies (kill -9 included)
    STATE_DIR/UUID.json   the record of the protection (written atomically:
                          a temporary file, fsync, rename), for the operator,
                          for a refused second owner (who owns it: pid,
                          session, target) and for a restarted remusd (what
                          its dead predecessor left: an *orphan*)

STATE_DIR is ``--state-dir`` (default ``/run/remus/domains``; with
``--sim-dir DIR``, ``DIR/remusd``: the simulated host's own runtime
directory). It is on a tmpfs on purpose: a record means "a remusd of this
boot protected this domain", and a host reboot ends every guest anyway.

The lock says whether someone owns the domain now; the record says who did
last. A record whose lock nobody holds is an orphan: its remusd died
without ending the protection (a clean end removes the record). The other
half of the rule, for trackers that do not use this directory (another
remusd with another --state-dir, a live migration), is the domain's
log-dirty state (``remusd.control``): a domain with log-dirty on is not
protected again.

Rules:
- The record is written while holding the lock, only by the owner; a reader
  never needs the lock.
- Nothing here blocks: LOCK_NB, small files, no network.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: the record's format version
RECORD_VERSION = 1
_UUID = re.compile(r"^[0-9A-Za-z-]{1,64}$")


class OwnedElsewhere(Exception):
    """The domain's lock is held by another process; ``record`` is its record (or None)."""

    def __init__(self, uuid: str, record: dict[str, Any] | None) -> None:
        super().__init__(uuid)
        self.uuid = uuid
        self.record = record


def describe_owner(record: dict[str, Any] | None) -> str:
    """ "remusd pid 4242 (session 3f0c9a12, to 10.0.0.2:7788)" from a record."""
    if not record:
        return "another process (no record of it)"
    sid = record.get("session") or "no session yet"
    return (
        f"remusd pid {record.get('pid', '?')} (session {str(sid)[:8]}, "
        f"to {record.get('target', '?')}, state {record.get('state', '?')})"
    )


@dataclass
class Ownership:
    """The lock of one domain, held, and its record."""

    store: Store
    uuid: str
    fd: int

    def write(self, record: dict[str, Any]) -> None:
        """Replace the record atomically (the caller owns the domain)."""
        if self.fd < 0:
            return
        self.store.write_record(self.uuid, record)

    def release(self, *, remove_record: bool) -> None:
        """Give the domain up; ``remove_record``: the protection ended cleanly."""
        if self.fd < 0:
            return
        if remove_record:
            self.store.remove_record(self.uuid)
        os.close(self.fd)  # the kernel drops the flock with the last descriptor
        self.fd = -1

    @property
    def held(self) -> bool:
        return self.fd >= 0


class Store:
    """The locks and records under one state directory."""

    def __init__(self, directory: str) -> None:
        self.dir = os.path.abspath(directory)

    def ensure(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def _path(self, uuid: str, ext: str) -> str:
        if not _UUID.match(uuid):
            raise ValueError(f"not a domain UUID: {uuid!r}")
        return os.path.join(self.dir, f"{uuid}.{ext}")

    def acquire(self, uuid: str) -> Ownership:
        """Take the domain's lock; OwnedElsewhere if another process holds it."""
        self.ensure()
        path = self._path(uuid, "lock")
        for _ in range(8):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OwnedElsewhere(uuid, self.read_record(uuid)) from None
                raise
            # an owner that just ended removed the file it held: our lock is on
            # that unlinked inode, not the one the next process will open
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return Ownership(self, uuid, fd)
            os.close(fd)
        raise OSError(errno.EAGAIN, f"the lock file {path} keeps being replaced")

    def read_record(self, uuid: str) -> dict[str, Any] | None:
        try:
            with open(self._path(uuid, "json"), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_record(self, uuid: str, record: dict[str, Any]) -> None:
        path = self._path(uuid, "json")
        tmp = f"{path}.{os.getpid()}.tmp"
        data = json.dumps({"version": RECORD_VERSION, **record}, sort_keys=True).encode()
        try:
            self.ensure()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.error("cannot write the record of domain %s in %s: %s", uuid, self.dir, e)

    def remove_record(self, uuid: str) -> None:
        for ext in ("json", "lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(uuid, ext))

    def records(self) -> list[tuple[str, dict[str, Any] | None]]:
        """(uuid, record) for every record in the directory."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        out: list[tuple[str, dict[str, Any] | None]] = []
        for name in names:
            if name.endswith(".json") and _UUID.match(name[:-5]):
                out.append((name[:-5], self.read_record(name[:-5])))
        return out
