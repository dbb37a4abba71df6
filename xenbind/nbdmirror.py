"""The mirroring block server: an nbdkit Python plugin that serves disk images
over NBD and appends every write, in order, to the disk mirror stream.

    nbdkit --exit-with-parent -f --unix NBD_SOCKET --filter=blocksize \\
        python xenbind/nbdmirror.py disk=PATH [disk=PATH ...] control=SOCKET \\
        [stall=SECONDS] [queue=BYTES] minblock=512 maxdata=1M

(``command()`` below builds exactly that argv; ``xenbind.mirrorclient`` starts
it and speaks its control protocol.) docs/disk.md says why the guest's disk is
served this way. This file runs in two interpreters: nbdkit's embedded Debian
Python runs it as ``__main__`` (the plugin), and the daemons import it as
``xenbind.nbdmirror`` (only for ``command()``). So it imports the standard
library and ``xenbind.diskstream`` (which imports ``xenbind.errors``) and
nothing else; under nbdkit those two are loaded from this file's directory
without running ``xenbind/__init__`` (a bare package is registered first), so
nothing of the venv is ever imported there.

EXPORTS
    Disk i (the i-th ``disk=``) is export ``"i"``; the default export ``""`` is
    disk 0. ``list_exports`` lists them (description: the path). Each disk's
    size is its file's (or block device's) size, which must be a whole number
    of 512-byte sectors (refused at start otherwise).

I/O (thread model SERIALIZE_ALL_REQUESTS: one request at a time)
    pread   local, never mirrored.
    pwrite  os.pwrite to the image (FUA: then fdatasync), then, if mirroring,
            WRITE record(s) (at most MAX_RECORD bytes of data each) put in the
            mirror queue, all before returning, so before nbdkit acknowledges
            the write. The data is copied with its head into one buffer:
            nbdkit's buffer (a read-only memoryview) is reused for its next
            request once pwrite returns (seen: a view kept past the call reads
            a later write's bytes).
    zero / trim
            the range is made to read as zeros (a hole punched or a zero range
            allocated when the file system can, else zeros written), then one
            ZERO record queued.
    flush   fdatasync.
    Offsets and lengths must be multiples of SECTOR (else EINVAL): nbdkit's
    blocksize filter in front (``minblock=512``) turns a client's unaligned
    request into aligned read-modify-writes, so the stream only ever holds
    whole sectors.

CONTROL (the Unix stream socket ``control=``; one JSON object per line each
way, one reply line per request: ``{"ok": true, ...}`` or ``{"ok": false,
"error": "..."}``; a request line is at most MAX_REQUEST_LINE bytes)
    {"op": "info"}
        -> {"ok": true, "disks": [{"path": P, "size": S}, ...], "sector_shift": 9,
            "mirroring": bool, "epoch": N | null (the open epoch the next SEAL
            closes), "sent": bytes of the current mirror stream (queued or
            sent: the offset the next record starts at) | null, "unsent": of
            those, still in the queue | null, "stall": seconds, "queue": the
            queue's bound in bytes, "max_record": bytes, "last_drop": why the
            last mirror ended | null, "seal_time": {"seals", "median_us", "p99_us",
            "max_us"} of the last SEAL_STATS seals in the server (lock wait and
            queueing) | null, "python": nbdkit's Python version}
    {"op": "mirror", "first_epoch": N}
        -> {"ok": true}, and from then on THIS connection carries only the
        disk stream (server -> client): the header (first_epoch N, the disks'
        sizes), then records. A previous mirror is closed first (its reader
        sees EOF). Nothing more is read from this connection.
    {"op": "seal"}
        -> {"ok": true, "epoch": N, "end": E}: SEAL(N) of the open epoch was
        queued; E is the number of stream bytes of the mirror connection up
        to the end of that SEAL, header included (the queue's offset: the
        reader has every byte up to E once it has read E bytes). Error if not
        mirroring (or if the mirror was dropped queueing it).
    {"op": "sync", "runs": [[disk, offset, length], ...]}
        -> {"ok": true, "bytes": B}: each run (rounded out to sectors, clipped
        to its disk's end) was read and queued as WRITE records with
        FLAG_SYNC, MAX_RECORD bytes at most each (a chunk of zeros as a ZERO
        record instead); B is the bytes covered. Every run is checked before
        anything is appended (a bad disk index, a negative offset or length,
        an offset at or past the disk's end: an error naming the run).
    {"op": "stop"}
        -> {"ok": true, "was_mirroring": bool}: the mirror ends: what is
        queued is still sent (within ``stall``), then the connection closes.

MIRROR QUEUE (``Mirror``)
    Records are put, under the write lock, in an in-memory queue bounded by
    ``queue=`` bytes (a number, or with K, M or G; default DEFAULT_QUEUE,
    at least MIN_QUEUE); a sender thread drains it in
    order: it computes the stream's CRC-32 over every item it takes, packs
    each SEAL with it, and sends a batch at a time (one sendmsg; consecutive
    small records joined into one buffer, so one crc32 call, which lets the
    GIL go, covers them). Small
    records linger up to SEND_LINGER_S so one wake-up carries many; a SEAL,
    or SEND_NOW_BYTES queued, is sent at once. The interpreter's switch
    interval is SWITCH_INTERVAL, so that a seal or a write waits little for
    the GIL while the sender and the control thread run.

RULES (kept here)
    * One lock (``Server.lock``) covers every change to an image together with
      its record's append to the queue: a write's pwrite and its WRITE, a
      zero's and its ZERO, each sync chunk's read and its append, the header
      and each SEAL. The queue is sent in its order, and the CRC is computed
      in that order by its one sender. So the stream's order is the images'
      order, a write the guest saw complete is before the SEAL placed after
      it, and a sync chunk can never undo a guest write (it is read and
      appended in one step). A SEAL's ``end`` is the queue's offset.
    * Guest requests and seals go first: a sync releases the lock between
      chunks and waits while one of them is waiting for it, and it waits
      (before taking the lock) while the queue is over half full.
    * Memory is bounded: the queue holds at most ``queue=`` bytes (one record
      larger than that goes into an empty queue); a writer that finds it full
      waits (the guest slows).
    * The guest never waits long for a dead or slow consumer: a writer that
      waits for room longer than ``stall`` seconds (default DEFAULT_STALL), a
      send that makes no progress for ``stall`` seconds, or a send that fails
      drops the mirror (the queue is dropped, the connection closed, the
      reason logged on stderr and kept for ``info``) and requests complete
      locally. Nothing is dropped silently: the reader sees the stream end,
      torn, wherever the sender was. Writes with no mirror are local only; the
      consumer resyncs by hashes on its next mirror.
    * A sync belongs to the mirror it started on: if that mirror ends, the
      sync stops with an error (a new mirror starts with its own sync).
    * The control socket appears (renamed into place) only once it listens,
      after nbdkit has bound the NBD socket: when ``control=`` exists, both
      accept connections.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import json
import os
import select
import socket
import stat
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

if not __package__:  # nbdkit's embedded interpreter: this file is __main__
    _pkg = types.ModuleType("xenbind")
    _pkg.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules.setdefault("xenbind", _pkg)

from xenbind import diskstream  # noqa: E402

try:
    import nbdkit  # only inside nbdkit
except ImportError:  # imported by the daemons, for command()
    nbdkit = None

API_VERSION = 2

SECTOR_SHIFT = 9
SECTOR = 1 << SECTOR_SHIFT
#: Data bytes in one WRITE record (guest writes are split, sync chunks are
#: this size); the blocksize filter hands the plugin no more than this anyway.
MAX_RECORD = 1 << 20
#: Seconds an append may block before the mirror is dropped.
DEFAULT_STALL = 10.0
#: The mirror queue's default bound, bytes (``queue=``), and its least.
DEFAULT_QUEUE = 64 << 20
MIN_QUEUE = 64 << 10
#: Consecutive queued items smaller than this are joined by the sender into
#: one buffer (one CRC call, one iovec).
JOIN_BELOW = 64 << 10
#: Queue items the sender takes (CRCs, sends in one sendmsg) at a time.
SEND_BATCH = 256
#: The sender sends small records after lingering this long, seconds (one
#: wake-up of the sender and of the consumer for many 4 KiB writes, not one
#: each); at once a SEAL, or SEND_NOW_BYTES queued (a 1 MiB write).
SEND_LINGER_S = 0.001
SEND_NOW_BYTES = 256 << 10
#: The interpreter's switch interval in the plugin, seconds (Python's default
#: is 5 ms): a thread that wants the GIL (a seal's, a write's) waits at most
#: about this long for the sender or the control thread to let it go.
SWITCH_INTERVAL = 0.0005
#: At exit, how long the queue may take to go out (at most ``stall``), seconds.
EXIT_FLUSH_S = 2.0
#: Seals whose time in the server ``info`` summarises (the last ones).
SEAL_STATS = 1024
#: The mirror connection's send buffer, bytes: a few records' worth, so that
#: the sender hands a batch to the kernel without waiting for the consumer to
#: read the one before (SO_SNDBUFFORCE as root; else SO_SNDBUF, capped by
#: net.core.wmem_max).
MIRROR_SNDBUF = 8 << 20
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
#: Longest control request line (a sync's run list), bytes.
MAX_REQUEST_LINE = 16 << 20
#: How long a sync sleeps between looks while a guest request or a seal waits
#: for the lock, seconds.
SYNC_YIELD_S = 20e-6

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZEROS = bytes(MAX_RECORD)
RECORD_HEAD = diskstream.RECORD_HEAD
RECORD_HEAD_SIZE = diskstream.RECORD_HEAD_SIZE


class ControlError(Exception):
    """A control request that cannot be done; its text goes back to the client."""


def _log(msg: str) -> None:
    if nbdkit is not None:
        nbdkit.debug(f"nbdmirror: {msg}")
    sys.stderr.write(f"nbdmirror: {msg}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------- disks


class Disk:
    """One served image: its fd, size, and whether fallocate works on it."""

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise RuntimeError(f"disk={path}: cannot open it: {e.strerror}") from e
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        if self.size < SECTOR or self.size % SECTOR:
            os.close(self.fd)
            raise RuntimeError(
                f"disk={path}: size {self.size} is not a positive multiple of {SECTOR} bytes"
            )
        self.fallocate_ok = stat.S_ISREG(os.fstat(self.fd).st_mode)

    def pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        n = data.nbytes
        while done < n:
            done += os.pwrite(self.fd, data[done:], offset + done)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        done = 0
        n = buf.nbytes
        while done < n:
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"{self.path}: short read at {offset + done}")
            done += got

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"{self.path}: short read of {length} bytes at {offset}")
        return data

    def zero(self, offset: int, length: int, may_trim: bool) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros."""
        if self.fallocate_ok:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if may_trim else FALLOC_FL_ZERO_RANGE
            if _fallocate(self.fd, mode, offset, length) == 0:
                return
            if mode == FALLOC_FL_ZERO_RANGE:  # e.g. tmpfs: a hole reads as zeros too
                if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
                    self.fallocate_ok = False
                else:
                    return
            else:
                self.fallocate_ok = False
        end = offset + length
        while offset < end:
            n = min(MAX_RECORD, end - offset)
            self.pwrite(memoryview(_ZEROS)[:n], offset)
            offset += n


_libc: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2): 0, or the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def parse_size(text: str) -> int:
    """``queue=`` bytes: a whole number, optionally with K, M or G (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t[-1:] in ("K", "M", "G"):
        mult = 1 << (10 * ("KMG".index(t[-1]) + 1))
        t = t[:-1]
    if not t.isdigit():
        raise RuntimeError(f"queue={text}: not a size (bytes, or a number with K, M or G)")
    return int(t) * mult


def _aligned(offset: int, length: int) -> bool:
    return offset >= 0 and length > 0 and not offset % SECTOR and not length % SECTOR


# ------------------------------------------------------------------ mirror


_BUSY, _IDLE, _LINGER = 0, 1, 2


def _crc_joined(items: list[Any], crc: int, bufs: list[Any]) -> int:
    """Append ``items`` to ``bufs`` as one buffer; the CRC continued over
    them. One CRC call over the joined bytes: under zlib (diskstream.crc32's
    fallback) only a call past 5 KiB lets the GIL go, so one call per 4 KiB
    record would hold it all along and the writers' callbacks wait for it;
    under ISA-L every call lets it go, and one call costs less than many."""
    data = items[0] if len(items) == 1 else b"".join(items)
    bufs.append(data)
    return diskstream.crc32(data, crc)


class _SealMark:
    """A SEAL in the queue: the sender packs it with the CRC it has computed."""

    __slots__ = ("epoch", "records")

    def __init__(self, epoch: int, records: int) -> None:
        self.epoch = epoch
        self.records = records


class Mirror:
    """One mirror connection: its bounded queue and the sender thread that
    drains it (module docstring, MIRROR QUEUE).

    Writers (``Server.lock`` held) append with ``put``; the sender computes the
    CRC of every byte it takes, in queue order, packs each SEAL with it and
    sends. ``appended``: stream bytes put (header included, the reply line
    not), the offset the next record starts at; ``sent``: of those, sent;
    ``queued``: put and not yet sent (what the bound limits); ``error``: None
    while the mirror lives, else why it failed (the sender's send, or a
    writer's wait for room); the server drops a failed mirror when it next
    touches it."""

    def __init__(
        self,
        sock: socket.socket,
        encoder: diskstream.Encoder,
        generation: int,
        max_queue: int,
        stall: float,
    ) -> None:
        self.sock = sock
        self.generation = generation
        self.max_queue = max_queue
        self.stall = stall
        self.epoch = encoder.epoch  # the open epoch (the next SEAL closes it)
        self.records = 0  # WRITE/ZERO records put in the open epoch
        self._sizes = encoder.disk_sizes
        self._header = encoder.header()
        self.appended = 0
        self.sent = 0
        self.queued = 0
        self.error: str | None = None
        self._closing = False  # stop: send what is queued, then close
        self._queue: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._has_data = threading.Condition(self._lock)
        self._has_room = threading.Condition(self._lock)
        self._waits = _BUSY  # the sender: _BUSY, _IDLE (queue empty) or _LINGER
        self._urgent = False  # a SEAL is queued: send without lingering
        self._since = 0.0  # when the oldest queued item was put
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, MIRROR_SNDBUF)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MIRROR_SNDBUF)
            except OSError:
                pass  # the default buffer: the sender waits for the consumer sooner
        self._thread: threading.Thread | None = None

    def start(self, reply: bytes) -> None:
        """Send the reply line (blocking, at most ``stall`` seconds), queue the
        header, start the sender. OSError / TimeoutError if the reply fails."""
        self.sock.settimeout(self.stall)
        self.sock.sendall(reply, socket.MSG_NOSIGNAL)
        self.sock.setblocking(False)
        self._put([self._header], len(self._header), None)
        self._thread = threading.Thread(target=self._run, name="nbdmirror-sender", daemon=True)
        self._thread.start()

    # ------------------------------------------------- the writers' side

    def _put(
        self, bufs: list[Any], nbytes: int, timeout: float | None, urgent: bool = False
    ) -> bool:
        """Queue ``bufs`` (``nbytes`` in all) once there is room; False (and
        ``error`` set) if the mirror failed or the queue stayed full
        ``timeout`` seconds. A record larger than the bound goes into an empty
        queue. ``urgent`` (a SEAL): the sender sends at once, not after
        SEND_LINGER_S."""
        with self._lock:
            if self.error is None and self.queued and self.queued + nbytes > self.max_queue:
                deadline = time.monotonic() + (timeout or 0.0)
                while self.error is None and self.queued and self.queued + nbytes > self.max_queue:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._fail_locked(
                            f"the queue stayed full ({self.queued} of {self.max_queue} bytes) "
                            f"for {timeout:g} s: the consumer read too little"
                        )
                        break
                    self._has_room.wait(left)
            if self.error is not None:
                return False
            if not self._queue:
                self._since = time.monotonic()
            self._queue.extend(bufs)
            self.queued += nbytes
            self.appended += nbytes
            if urgent:
                self._urgent = True
            w = self._waits
            if w == _IDLE or (w == _LINGER and (urgent or self.queued >= SEND_NOW_BYTES)):
                self._has_data.notify()
            return True

    def write(self, disk: int, offset: int, data: Any, *, sync: bool = False, copy: bool) -> bool:
        """Queue a WRITE of ``data``: copied with its head into one buffer
        (``copy``: nbdkit's buffer, which it reuses once pwrite returns), or
        queued as it is (bytes nobody changes: a sync's read)."""
        n = len(data)
        flags = diskstream.FLAG_SYNC if sync else 0
        head = RECORD_HEAD.pack(diskstream.WRITE, disk, flags, offset, n, 0)
        bufs = [head + data] if copy else [head, data]
        if not self._put(bufs, RECORD_HEAD_SIZE + n, self.stall):
            return False
        self.records += 1
        return True

    def zero(self, disk: int, offset: int, length: int) -> bool:
        head = RECORD_HEAD.pack(diskstream.ZERO, disk, 0, offset, length, 0)
        if not self._put([head], RECORD_HEAD_SIZE, self.stall):
            return False
        self.records += 1
        return True

    def seal(self) -> int | None:
        """Queue SEAL(epoch); the stream offset of its end, or None if the
        mirror failed."""
        mark = _SealMark(self.epoch, self.records)
        if not self._put([mark], RECORD_HEAD_SIZE, self.stall, urgent=True):
            return None
        self.epoch += 1
        self.records = 0
        return self.appended

    def wait_room(self, nbytes: int, below: int, timeout: float) -> None:
        """Wait (no lock of the server's held) until ``nbytes`` more would
        leave the queue at most ``below`` bytes, the mirror fails, or
        ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.error is None and self.queued and self.queued + nbytes > below:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._has_room.wait(left)

    # -------------------------------------------------- the sender's side

    def _fail_locked(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self._queue.clear()
        self.queued = 0
        self._has_data.notify_all()
        self._has_room.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the sender's poll; it closes
        except OSError:
            pass

    def _run(self) -> None:
        crc = 0
        pack = RECORD_HEAD.pack
        try:
            while True:
                with self._lock:
                    while True:
                        if self.error is not None:
                            return
                        if self._queue:
                            if self._urgent or self._closing or self.queued >= SEND_NOW_BYTES:
                                break
                            left = self._since + SEND_LINGER_S - time.monotonic()
                            if left <= 0:
                                break
                            self._waits = _LINGER
                        elif self._closing:
                            return  # everything sent
                        else:
                            left = None
                            self._waits = _IDLE
                        self._has_data.wait(left)
                        self._waits = _BUSY
                    self._urgent = False
                    items: list[Any] = []
                    q = self._queue
                    while q and len(items) < SEND_BATCH:
                        items.append(q.popleft())
                bufs: list[Any] = []
                small: list[Any] = []  # consecutive small items: joined, one CRC
                for it in items:
                    if type(it) is not _SealMark and len(it) < JOIN_BELOW:
                        small.append(it)
                        continue
                    if small:
                        crc = _crc_joined(small, crc, bufs)
                        small = []
                    if type(it) is _SealMark:
                        bufs.append(pack(diskstream.SEAL, 0, 0, it.epoch, it.records, crc))
                        crc = 0
                    else:
                        crc = diskstream.crc32(it, crc)
                        bufs.append(it)
                if small:
                    crc = _crc_joined(small, crc, bufs)
                n = self._send_all(bufs)
                with self._lock:
                    if self.error is not None:
                        return
                    self.sent += n
                    self.queued -= n
                    self._has_room.notify_all()
        except (OSError, TimeoutError) as e:
            with self._lock:
                self._fail_locked(str(e) if isinstance(e, TimeoutError) else f"send failed: {e}")
            _log(f"mirror failed after {self.sent} stream bytes sent: {self.error}")
        finally:
            self._close_socket()

    def _send_all(self, bufs: list[Any]) -> int:
        """Send every byte of ``bufs``; TimeoutError if nothing could be sent
        for ``stall`` seconds, OSError if the connection fails."""
        views = [memoryview(b) for b in bufs]
        total = sum(v.nbytes for v in views)
        left = total
        sock = self.sock
        deadline = 0.0
        while views:
            try:
                n = sock.sendmsg(views, [], socket.MSG_NOSIGNAL)
            except BlockingIOError:
                n = 0
            if n:
                deadline = 0.0
                left -= n
                while n:
                    if n >= views[0].nbytes:
                        n -= views.pop(0).nbytes
                    else:
                        views[0] = views[0][n:]
                        n = 0
                continue
            if self.error is not None:
                raise OSError(errno.ECONNABORTED, self.error)
            now = time.monotonic()
            if not deadline:
                deadline = now + self.stall
            elif now >= deadline:
                raise TimeoutError(
                    f"the consumer read nothing for {self.stall:g} s "
                    f"({self.queued} bytes queued, {left} of them in the send at hand)"
                )
            p = select.poll()
            p.register(sock, select.POLLOUT)
            p.poll(max(1, int((deadline - now) * 1000)))
        return total

    def _close_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # ------------------------------------------------------------ the end

    def abort(self, reason: str) -> None:
        """Fail now: the queue is dropped, the connection closed (its reader
        sees the stream end wherever the sender was)."""
        with self._lock:
            self._fail_locked(reason)
        if self._thread is None:
            self._close_socket()

    def finish(self, timeout: float | None = None) -> None:
        """Close after the queue is sent (within ``stall``, else it fails);
        ``timeout``: wait that long for the sender to be done."""
        with self._lock:
            self._closing = True
            self._has_data.notify_all()
        if self._thread is None:
            self._close_socket()
        elif timeout is not None:
            self._thread.join(timeout)


# ------------------------------------------------------------------ server


class PriorityLock:
    """The write lock. ``with lock:`` takes it with priority (guest requests,
    seals, mirror changes); ``with lock.after_others():`` (a sync chunk) first
    waits until no one is waiting for it. A plain Lock would not do: a sync
    releasing and retaking it between chunks would get it back every time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._waiting = 0

    def __enter__(self) -> None:
        with self._count_lock:
            self._waiting += 1
        self._lock.acquire()
        with self._count_lock:
            self._waiting -= 1

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def after_others(self) -> Iterator[None]:
        while True:
            while self._waiting:
                time.sleep(SYNC_YIELD_S)
            self._lock.acquire()
            if not self._waiting:
                break
            self._lock.release()  # someone came first: let them
        try:
            yield
        finally:
            self._lock.release()


class Server:
    """The plugin's state: disks, the mirror, the control socket."""

    def __init__(self) -> None:
        self.disk_paths: list[str] = []
        self.disks: list[Disk] = []
        self.control_path = ""
        self.stall = DEFAULT_STALL
        self.max_queue = DEFAULT_QUEUE
        self.lock = PriorityLock()
        self.mirror: Mirror | None = None
        self.generation = 0
        self.last_drop: str | None = None
        self._listener: socket.socket | None = None
        self.seal_ns: collections.deque[int] = collections.deque(maxlen=SEAL_STATS)

    # ---------------------------------------------------------- config

    def config(self, key: str, value: str) -> None:
        if key == "disk":
            self.disk_paths.append(value)
        elif key == "control":
            self.control_path = value
        elif key == "stall":
            try:
                self.stall = float(value)
            except ValueError:
                raise RuntimeError(f"stall={value}: not a number of seconds") from None
            if not self.stall > 0:
                raise RuntimeError(f"stall={value}: must be positive")
        elif key == "queue":
            self.max_queue = parse_size(value)
            if self.max_queue < MIN_QUEUE:
                raise RuntimeError(f"queue={value}: at least {MIN_QUEUE} bytes")
        else:
            raise RuntimeError(f"unknown parameter {key}={value} (disk=, control=, stall=, queue=)")

    def config_complete(self) -> None:
        if not self.disk_paths:
            raise RuntimeError("no disk=PATH given")
        if len(self.disk_paths) > diskstream.MAX_DISKS:
            raise RuntimeError(f"{len(self.disk_paths)} disks: at most {diskstream.MAX_DISKS}")
        if not self.control_path:
            raise RuntimeError("no control=SOCKET given")
        self.disks = [Disk(i, p) for i, p in enumerate(self.disk_paths)]
        sys.setswitchinterval(SWITCH_INTERVAL)

    # --------------------------------------------------------- mirror

    def _drop(self, reason: str, *, flush: bool = False) -> Mirror | None:
        """Lock held: end the mirror, say why. ``flush``: its queue is sent
        first (stop, replace, exit); else it is dropped at once (a failure).
        Returns the mirror ended, if any."""
        m = self.mirror
        if m is None:
            return None
        self.mirror = None
        if m.error is not None:
            reason = m.error
        self.last_drop = reason
        if flush:
            m.finish()
        else:
            m.abort(reason)
        _log(f"mirror dropped after {m.appended} stream bytes ({m.sent} sent): {reason}")
        return m

    def _live(self) -> Mirror | None:
        """Lock held: the mirror, dropped first if its sender failed."""
        m = self.mirror
        if m is not None and m.error is not None:
            self._drop(m.error)
            return None
        return m

    # ------------------------------------------------------ guest I/O

    def pwrite(self, disk: Disk, buf: memoryview, offset: int, fua: bool) -> None:
        n = buf.nbytes
        if not _aligned(offset, n):
            raise _Errno(errno.EINVAL, f"unaligned write of {n} bytes at {offset}")
        if offset + n > disk.size:
            raise _Errno(errno.ENOSPC, f"write of {n} bytes at {offset} past the disk's end")
        with self.lock:
            disk.pwrite(buf, offset)
            if fua:
                os.fdatasync(disk.fd)
            m = self._live()
            if m is not None:
                for at in range(0, n, MAX_RECORD):
                    if not m.write(disk.index, offset + at, buf[at : at + MAX_RECORD], copy=True):
                        self._drop(m.error or "the mirror failed")
                        break

    def zero(self, disk: Disk, length: int, offset: int, may_trim: bool, fua: bool) -> None:
        if not _aligned(offset, length):
            raise _Errno(errno.EINVAL, f"unaligned zero of {length} bytes at {offset}")
        if offset + length > disk.size:
            raise _Errno(errno.ENOSPC, f"zero of {length} bytes at {offset} past the disk's end")
        with self.lock:
            disk.zero(offset, length, may_trim)
            if fua:
                os.fdatasync(disk.fd)
            m = self._live()
            if m is not None and not m.zero(disk.index, offset, length):
                self._drop(m.error or "the mirror failed")

    # --------------------------------------------------------- control

    def op_info(self, req: dict[str, Any]) -> dict[str, Any]:
        m = self.mirror
        live = m is not None and m.error is None
        return {
            "ok": True,
            "disks": [{"path": d.path, "size": d.size} for d in self.disks],
            "sector_shift": SECTOR_SHIFT,
            "mirroring": live,
            "epoch": m.epoch if m is not None and live else None,
            "sent": m.appended if m is not None and live else None,
            "unsent": m.queued if m is not None and live else None,
            "stall": self.stall,
            "queue": self.max_queue,
            "max_record": MAX_RECORD,
            "last_drop": m.error if m is not None and not live else self.last_drop,
            "seal_time": self.seal_stats(),
            "python": sys.version.split()[0],
        }

    def op_mirror(self, req: dict[str, Any], conn: socket.socket) -> None:
        first = req.get("first_epoch")
        if not isinstance(first, int) or isinstance(first, bool) or not 0 <= first < 1 << 63:
            raise ControlError(f"mirror: first_epoch must be an integer >= 0, not {first!r}")
        enc = diskstream.Encoder(
            [d.size for d in self.disks], sector_shift=SECTOR_SHIFT, first_epoch=first
        )
        with self.lock:
            if self.mirror is not None:
                self._drop("replaced by a new mirror", flush=True)
            self.generation += 1
            m = Mirror(conn, enc, self.generation, self.max_queue, self.stall)
            try:
                m.start((json.dumps({"ok": True}) + "\n").encode())
            except (OSError, TimeoutError) as e:
                m.abort(str(e))
                self.last_drop = f"the new mirror failed at its start: {e}"
                _log(self.last_drop)
                return
            self.mirror = m
            self.last_drop = None
        _log(f"mirroring from epoch {first}")

    def op_seal(self, req: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter_ns()
        with self.lock:
            m = self._live()
            if m is None:
                raise ControlError(f"seal: not mirroring (last drop: {self.last_drop})")
            epoch = m.epoch
            end = m.seal()
            if end is None:
                self._drop(m.error or "the mirror failed")
                raise ControlError(f"seal of epoch {epoch}: the mirror dropped: {self.last_drop}")
        self.seal_ns.append(time.perf_counter_ns() - t0)
        return {"ok": True, "epoch": epoch, "end": end}

    def seal_stats(self) -> dict[str, float] | None:
        """The last SEAL_STATS seals' time in the server (lock wait + queueing), us."""
        ns = sorted(self.seal_ns)
        if not ns:
            return None
        return {
            "seals": len(ns),
            "median_us": ns[len(ns) // 2] / 1e3,
            "p99_us": ns[min(len(ns) - 1, len(ns) * 99 // 100)] / 1e3,
            "max_us": ns[-1] / 1e3,
        }

    def _check_runs(self, runs: object) -> list[tuple[Disk, int, int]]:
        if not isinstance(runs, list):
            raise ControlError(f"sync: runs must be a list of [disk, offset, length], not {runs!r}")
        out = []
        for i, run in enumerate(runs):
            if not (isinstance(run, list) and len(run) == 3 and all(map(_is_int, run))):
                raise ControlError(f"sync: run {i} {run!r} is not [disk, offset, length]")
            d, off, n = run
            if not 0 <= d < len(self.disks):
                raise ControlError(f"sync: run {i} {run!r}: no disk {d} ({len(self.disks)} disks)")
            size = self.disks[d].size
            if off < 0 or n <= 0 or off >= size:
                raise ControlError(
                    f"sync: run {i} {run!r}: outside disk {d} ({size} bytes; "
                    f"offset must be in [0, size), length > 0)"
                )
            start = off - off % SECTOR
            end = min(-(-(off + n) // SECTOR) * SECTOR, size)
            out.append((self.disks[d], start, end - start))
        return out

    def op_sync(self, req: dict[str, Any]) -> dict[str, Any]:
        runs = self._check_runs(req.get("runs"))
        with self.lock:
            m = self._live()
        if m is None:
            raise ControlError(f"sync: not mirroring (last drop: {self.last_drop})")
        gen = m.generation
        total = 0
        for disk, start, length in runs:
            at, end = start, start + length
            while at < end:
                n = min(MAX_RECORD, end - at)
                # room for the guest's writes: a sync fills at most half the queue
                m.wait_room(RECORD_HEAD_SIZE + n, m.max_queue // 2, self.stall)
                with self.lock.after_others():
                    m = self._live()
                    if m is None or m.generation != gen:
                        raise ControlError(
                            f"sync: the mirror it was feeding ended after {total} bytes: "
                            f"{self.last_drop}"
                        )
                    data = disk.read(at, n)
                    if data == (_ZEROS if n == MAX_RECORD else bytes(n)):
                        ok = m.zero(disk.index, at, n)
                    else:
                        ok = m.write(disk.index, at, data, sync=True, copy=False)
                    if not ok:
                        self._drop(m.error or "the mirror failed")
                        raise ControlError(
                            f"sync: the mirror dropped at disk {disk.index} offset {at}: "
                            f"{self.last_drop}"
                        )
                at += n
                total += n
        return {"ok": True, "bytes": total}

    def op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            was = self._live() is not None
            self._drop("stopped by the control socket", flush=True)
        return {"ok": True, "was_mirroring": was}

    # ---------------------------------------------------- control socket

    def start_control(self) -> None:
        """Bind and listen (then rename into place), then serve in a thread."""
        path = self.control_path
        _remove_stale_socket(path)
        tmp = f"{path}.{os.getpid()}.tmp"
        _remove_stale_socket(tmp)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(tmp)
        os.chmod(tmp, 0o600)
        ls.listen(16)
        os.rename(tmp, path)
        self._listener = ls
        threading.Thread(target=self._accept_loop, name="nbdmirror-control", daemon=True).start()

    def stop_control(self) -> None:
        with self.lock:
            m = self._drop("nbdkit is exiting", flush=True)
        if m is not None:
            m.finish(timeout=min(self.stall, EXIT_FLUSH_S))  # a consumer still reading gets it
        ls, self._listener = self._listener, None
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
            try:
                os.unlink(self.control_path)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while True:
            ls = self._listener
            if ls is None:
                return
            try:
                conn, _ = ls.accept()
            except OSError:
                if self._listener is None:
                    return
                time.sleep(0.01)
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="nbdmirror-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        handed_over = False
        try:
            rfile = conn.makefile("rb")
            while True:
                line = rfile.readline(MAX_REQUEST_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST_LINE:
                    _reply(conn, _error(f"request line longer than {MAX_REQUEST_LINE} bytes"))
                    return
                reply = self._request(line, conn)
                if reply is None:  # the connection is the mirror's now
                    handed_over = True
                    return
                _reply(conn, reply)
        except OSError:
            return
        finally:
            if not handed_over:
                conn.close()

    def _request(self, line: bytes, conn: socket.socket) -> dict[str, Any] | None:
        try:
            req = json.loads(line)
        except ValueError as e:
            return _error(f"request is not JSON: {e}")
        if not isinstance(req, dict):
            return _error(f"request is not a JSON object: {line[:80]!r}")
        op = req.get("op")
        try:
            if op == "mirror":
                self.op_mirror(req, conn)
                return None
            handler: Callable[[dict[str, Any]], dict[str, Any]] | None = {
                "info": self.op_info,
                "seal": self.op_seal,
                "sync": self.op_sync,
                "stop": self.op_stop,
            }.get(op if isinstance(op, str) else "")
            if handler is None:
                return _error(f"unknown op {op!r} (info, mirror, seal, sync, stop)")
            return handler(req)
        except ControlError as e:
            return _error(str(e))
        except Exception as e:  # an I/O error: say it, keep serving
            return _error(f"{op}: {type(e).__name__}: {e}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}


def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    conn.sendall((json.dumps(reply) + "\n").encode(), socket.MSG_NOSIGNAL)


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"control={path}: exists and is not a socket")
    os.unlink(path)


class _Errno(Exception):
    """An I/O error with the errno nbdkit should send the client."""

    def __init__(self, err: int, text: str) -> None:
        super().__init__(text)
        self.errno = err


# ------------------------------------------------------------ the argv


def command(
    disks: list[str],
    nbd_socket: str,
    control: str,
    *,
    stall: float | None = None,
    queue: int | None = None,
) -> list[str]:
    """The argv that starts this plugin on ``disks``, serving NBD on the Unix
    socket ``nbd_socket`` and its control protocol on ``control``.

    nbdkit stays in the foreground (``-f``: the Popen's pid is nbdkit's, the
    caller waits on it) and exits with its parent (``--exit-with-parent``: the
    parent *thread* that forked it, Linux's PR_SET_PDEATHSIG). Ready when the
    control socket exists (it appears only once both sockets listen; no
    pidfile needed). The blocksize filter makes every request the plugin sees
    sector-aligned and at most MAX_RECORD bytes of data. ``stall`` and
    ``queue`` (bytes) are the plugin's parameters (None: its defaults)."""
    if not disks:
        raise ValueError("command: no disks")
    argv = [
        "nbdkit",
        "--exit-with-parent",
        "-f",
        "--unix",
        nbd_socket,
        "--filter=blocksize",
        "python",
        os.path.abspath(__file__),
        *(f"disk={os.path.abspath(d)}" for d in disks),
        f"control={os.path.abspath(control)}",
        f"minblock={SECTOR}",
        f"maxdata={MAX_RECORD}",
    ]
    if stall is not None:
        if not stall > 0:
            raise ValueError(f"command: stall {stall} must be positive")
        argv.append(f"stall={stall:g}")
    if queue is not None:
        if queue < MIN_QUEUE:
            raise ValueError(f"command: queue {queue} is below {MIN_QUEUE} bytes")
        argv.append(f"queue={int(queue)}")
    return argv


# ---------------------------------------------------- nbdkit's callbacks

_server = Server()


def _check(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map _Errno to nbdkit.set_error before nbdkit sees the exception."""

    def wrapped(*args: Any) -> Any:
        try:
            return fn(*args)
        except _Errno as e:
            nbdkit.set_error(e.errno)
            raise
        except OSError as e:
            if e.errno:
                nbdkit.set_error(e.errno)
            raise

    wrapped.__name__ = fn.__name__
    return wrapped


def config(key: str, value: str) -> None:
    _server.config(key, value)


def config_complete() -> None:
    _server.config_complete()


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS)


def after_fork() -> None:
    # after nbdkit has forked (or not, with -f): threads started before a fork
    # would not exist in the child that serves
    _server.start_control()


def cleanup() -> None:
    _server.stop_control()


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    return [(str(d.index), d.path) for d in _server.disks]


def default_export(readonly: bool, is_tls: bool) -> str:
    return "0"


def open(readonly: bool) -> Disk:
    name = nbdkit.export_name() or "0"
    if not name.isdigit() or int(name) >= len(_server.disks):
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no export {name!r}: exports are 0..{len(_server.disks) - 1}")
    return _server.disks[int(name)]


def export_description(h: Disk) -> str:
    return h.path


def get_size(h: Disk) -> int:
    return h.size


def block_size(h: Disk) -> tuple[int, int, int]:
    return (SECTOR, 4096, MAX_RECORD)


def can_write(h: Disk) -> bool:
    return True


def can_flush(h: Disk) -> bool:
    return True


def can_trim(h: Disk) -> bool:
    return True


def can_zero(h: Disk) -> bool:
    return True


def can_fast_zero(h: Disk) -> bool:
    return False


def can_fua(h: Disk) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: Disk) -> bool:
    return True  # one process, one fd per disk: a flush on any connection syncs all


def is_rotational(h: Disk) -> bool:
    return False


@_check
def pread(h: Disk, buf: memoryview, offset: int, flags: int) -> None:
    n = len(buf)
    if not _aligned(offset, n):
        raise _Errno(errno.EINVAL, f"unaligned read of {n} bytes at {offset}")
    h.pread_into(memoryview(buf).cast("B"), offset)


@_check
def pwrite(h: Disk, buf: memoryview, offset: int, flags: int) -> None:
    _server.pwrite(h, memoryview(buf).cast("B"), offset, bool(flags & nbdkit.FLAG_FUA))


@_check
def flush(h: Disk, flags: int) -> None:
    os.fdatasync(h.fd)


@_check
def zero(h: Disk, count: int, offset: int, flags: int) -> None:
    _server.zero(
        h, count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM), bool(flags & nbdkit.FLAG_FUA)
    )


@_check
def trim(h: Disk, count: int, offset: int, flags: int) -> None:
    _server.zero(h, count, offset, True, bool(flags & nbdkit.FLAG_FUA))
