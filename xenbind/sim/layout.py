"""The simulated host's directory: what lives where, and the domain metadata.

``DIR`` belongs to one host process. It should be on tmpfs (``/dev/shm``):
memory files are then shared memory, as guest RAM is, and uffd-wp log-dirty
works on them (the host probes this at start and says which dirty mode is in
use). Files::

    host.lock        flock()ed by the running host: one host per DIR
    host.pid         the host's pid (removed on clean stop)
    host.sock        the host's control socket (create, list, lookup, destroy;
                     one JSON request line, one JSON reply line per connection)
    host.log         the host's log when started by tests/simhost.py
    dom-N.json       domain N's metadata (written once by the host at create)
    dom-N.mem        domain N's memory: pages * 4096 bytes, PFN p at offset p*4096
    dom-N.ctl        domain N's status page (written by its worker only)
    dom-N.sock       domain N's control socket (SOCK_SEQPACKET, served by its worker)
    dom-N.dirty      bitmap-mode dirty bitmap (live + snapshot, 1 byte per page)
    dom-N.marks      uffd-wp mode: the vCPU's write marks, two sets (each 1 byte
                     per page, then 1 per 256 KiB region; xenbind.sim.dirty.WriteMarks)
    dom-N.out        released output of domain N (the outside world)
    dom-N.log        the worker's log
    dom-N-diskI.img  disk I of domain N, when the host made it (sparse; disks
                     given as files live where they are: the meta says)
    dom-N.nbd        domain N's block server: NBD socket (export "I": disk I)
    dom-N.dctl       domain N's block server: control socket (the daemons')
    dom-N.disklog    domain N's block server's log (xenbind.sim.disk)

Memory, metadata, output and disk files stay after the host dies
(post-mortem: ``digest``, ``outputs``, ``ledger-check`` and ``disk-check``
read them); ``destroy`` removes the domain's files, and the disk images the
host made (never given ones).

Status page (``dom-N.ctl``, 4096 bytes, little-endian int64 words, written
by the worker; word 0 is written last at start so readers see a complete page)::

    0 magic (CTL_MAGIC)   1 worker pid      2 guest mapping address in the worker
    3 mapping length      4 pause count     5 step (registers' step counter)
    6 log-dirty enabled   7 dirty mode (1 uffd-wp, 2 bitmap)
    8 state (1 running, 2 paused, 3 crashed, 4 idle: blocked at its stop step or log full)
    9 stop step (-1: none)  10 outputs released  11 outputs buffered  12 barriers pending
   13 write marks: pages per region of dom-N.marks (0: no marks, read the log by walking)
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

CTL_MAGIC = 0x31304C5443534D53  # b"SMSCTL01" little-endian
CTL_WORDS = 16
(
    W_MAGIC,
    W_PID,
    W_ADDR,
    W_LEN,
    W_PAUSE,
    W_STEP,
    W_LOGDIRTY,
    W_MODE,
    W_STATE,
    W_STOP,
    W_RELEASED,
    W_BUFFERED,
    W_BARRIERS,
    W_MARKS,
) = range(14)
MODE_CODES = {1: "uffd-wp", 2: "bitmap"}
ST_RUNNING, ST_PAUSED, ST_CRASHED, ST_IDLE = 1, 2, 3, 4

_DOM_RE = re.compile(r"^dom-(\d+)\.json$")


def path(d: str, domid: int, ext: str) -> str:
    return os.path.join(d, f"dom-{domid}.{ext}")


def host_path(d: str, name: str) -> str:
    return os.path.join(d, f"host.{name}")


def write_meta(d: str, meta: dict) -> None:
    p = path(d, meta["domid"], "json")
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, p)


def read_meta(d: str, domid: int) -> dict:
    with open(path(d, domid, "json")) as f:
        return json.load(f)


def all_domids(d: str) -> list[int]:
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _DOM_RE.match(n)))


def resolve(d: str, ref: int | str) -> int | None:
    """A domid from a domid, name or UUID, from the files alone (newest wins)."""
    ids = all_domids(d)
    s = str(ref)
    if s.isdigit() and int(s) in ids:
        return int(s)
    for domid in reversed(ids):
        try:
            meta = read_meta(d, domid)
        except (OSError, ValueError):
            continue
        if s in (meta.get("name"), meta.get("uuid")):
            return domid
    return None


def ctl_view(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype="<i8", count=CTL_WORDS)
