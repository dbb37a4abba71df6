"""The simulated host: one process per host directory, like a hypervisor.

``python -m xenbind.sim host --dir DIR`` runs this in the foreground until
SIGTERM or SIGINT. It creates domains (forks one worker process per domain,
see ``worker.py``), lists, looks up and destroys them, and reaps workers that
die. Killing the host, even with SIGKILL, kills every domain (each worker
has PR_SET_PDEATHSIG=SIGKILL), as a host failure would; the files in DIR
stay for the post-mortem.

Control socket ``DIR/host.sock`` (SOCK_STREAM): one JSON object per line in,
one JSON object per line out, then the host closes the connection::

    {"op": "ping"}                                -> {"ok": true, "pid", "dir", "dirty_mode"}
    {"op": "create", "pages", "workload", "seed", "rate", "a", "b", "name"?,
     "uuid"?, "vcpus"?, "paused"?, "backup"?, "dirty_mode"?, "write_marks"?,
     "disks"?: [bytes, ...], "disk_files"?: [path, ...], "disk_every"?}
                                                  -> {"ok": true, "meta": {...}}
    {"op": "list"}                                -> {"ok": true, "domains": [meta, ...]}
    {"op": "lookup", "ref": domid|name|uuid}      -> {"ok": true, "meta": {...}}
    {"op": "destroy", "ref": domid|name|uuid}     -> {"ok": true}
    any error                                     -> {"ok": false, "error": "..."}

A meta object is the ``dom-N.json`` content plus ``"alive"`` (the worker
runs) and, for a domain whose worker died, ``"exit"`` (how it ended).

Rules: the host is single-threaded (so forking a worker is safe); it is the
only writer of ``dom-N.json`` and the only process that creates or removes
domain files; requests are served one at a time, each bounded by a timeout.

Disks (xenbind.sim.disk): ``disks`` gives their sizes (sparse images
``dom-N-diskI.img`` made here, removed at destroy), or ``disk_files`` gives
existing images (absolute paths, used as they are and never removed: a
backup's, whose sizes ``disks`` then must match). For a domain with disks the
host starts its block server (nbdkit, --exit-with-parent) before the worker,
waits until its sockets exist, and kills it after the worker at destroy and
shutdown; the meta says ``disks: [{"path", "size", "nbd", "control",
"owned"}]`` and ``disk_server_pid``. ``disk_every`` (random, hotset): every
how many steps the guest writes a disk block (default 16 with a disk).

A slow toolstack (``--create-delay S``, as a large ``xl create`` takes
seconds): a create is carried out at once (the domain is listed, paused or
running) but its reply is held back S seconds, while the host goes on serving
other requests; a reply whose client has gone is dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import selectors
import signal
import socket
import stat
import sys
import time
import traceback
import uuid as uuidlib
from typing import Any

from .. import PAGE_SIZE
from . import disk as D
from . import layout as L
from .dirty import MODE_BITMAP, MODE_UFFD, probe
from .workloads import DISK_KINDS, KINDS, MAGIC_PAGES, RegistersError, new_registers

REQUEST_TIMEOUT_S = 5.0
WORKER_START_TIMEOUT_S = 30.0
MIN_PAGES = 16
MAX_PAGES = 1 << 24  # 64 GiB of guest memory
MAX_REQUEST = 1 << 16
DISK_SERVER_START_TIMEOUT_S = 15.0
DISK_SERVER_STOP_TIMEOUT_S = 5.0
#: a page workload with a disk writes a block every this many steps, unless told
DEFAULT_DISK_EVERY = 16
#: the files of a domain besides its disk images (removed at destroy)
DOMAIN_FILES = (
    "json",
    "mem",
    "ctl",
    "dirty",
    "marks",
    "out",
    "log",
    "sock",
    "nbd",
    "dctl",
    "disklog",
)


class HostError(Exception):
    """A request the host refuses; the message goes back to the client."""


def log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} sim-host: {msg}\n")
    sys.stderr.flush()


class Host:
    def __init__(self, sim_dir: str, create_delay: float = 0.0) -> None:
        self.dir = os.path.abspath(sim_dir)
        self.create_delay = create_delay
        #: create replies held back (--create-delay): (due, connection, reply)
        self._deferred: list[tuple[float, socket.socket, bytes]] = []
        os.makedirs(self.dir, exist_ok=True)
        self.lock_fd = os.open(
            L.host_path(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_text(L.host_path(self.dir, "pid")).strip() or "?"
            raise HostError(f"another simulated host (pid {other}) runs on {self.dir}") from None
        self.pid = os.getpid()
        self.dirty_mode, why = probe(self.dir)
        log(f"host pid {self.pid} on {self.dir}: dirty tracking {self.dirty_mode} ({why})")
        self.domains: dict[int, dict] = {}  # domid -> {"pid", "meta", "exit"}
        self.next_domid = max(L.all_domids(self.dir), default=0) + 1
        self.stopping = False
        sock_path = L.host_path(self.dir, "sock")
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(sock_path)
        self.listener.listen(64)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        with open(L.host_path(self.dir, "pid"), "w") as f:
            f.write(f"{self.pid}\n")

    # --- lifecycle -------------------------------------------------------------------

    def run(self) -> None:
        def stop(signum, frame):
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log("ready" + (f" (create delay {self.create_delay:g} s)" if self.create_delay else ""))
        while not self.stopping:
            wait = 0.2
            if self._deferred:
                wait = max(0.0, min(wait, min(d[0] for d in self._deferred) - time.monotonic()))
            for _ in self.sel.select(wait):
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    continue
                self._serve(conn)
            self._send_deferred()
            self._reap()
        self.shutdown()

    def _send_deferred(self, force: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for due, conn, reply in self._deferred:
            if due > now and not force:
                keep.append((due, conn, reply))
                continue
            try:
                conn.sendall(reply)
            except OSError as e:
                log(f"client connection: {e}")
            conn.close()
        self._deferred = keep

    def shutdown(self) -> None:
        log(
            f"stopping: {sum(1 for d in self.domains.values() if d['pid'])} domains die with the host"
        )
        self._send_deferred(force=True)
        for domid in list(self.domains):
            self._kill(domid)
        for p in (L.host_path(self.dir, "sock"), L.host_path(self.dir, "pid")):
            _unlink(p)
        self.sel.close()
        self.listener.close()
        os.close(self.lock_fd)
        log("stopped")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for domid, d in self.domains.items():
                if d["pid"] == pid:
                    d["pid"] = 0
                    d["exit"] = _describe_exit(status)
                    _unlink(L.path(self.dir, domid, "sock"))
                    log(f"domain {domid} died: {d['exit']}")
                elif d.get("disk_pid") == pid:
                    d["disk_pid"] = 0
                    log(
                        f"block server of domain {domid} died: {_describe_exit(status)} "
                        f"(see dom-{domid}.disklog); its guest loses its disks"
                    )

    def _kill(self, domid: int) -> None:
        d = self.domains[domid]
        if d["pid"]:
            try:
                os.kill(d["pid"], signal.SIGKILL)
                os.waitpid(d["pid"], 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            d["pid"] = 0
            d["exit"] = "destroyed"
        _unlink(L.path(self.dir, domid, "sock"))
        if d.get("disk_pid"):
            _stop_server(d["disk_pid"])
            d["disk_pid"] = 0
        for ext in ("nbd", "dctl"):
            _unlink(L.path(self.dir, domid, ext))

    # --- requests --------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        self._conn = conn  # closed in forked workers
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(conn.close)
                buf = b""
                while b"\n" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > MAX_REQUEST:
                        raise HostError("request too long")
                req: dict[str, Any] | None = None
                try:
                    req = json.loads(buf.split(b"\n", 1)[0])
                    if not isinstance(req, dict):
                        raise HostError("request is not a JSON object")
                    reply = self._dispatch(req)
                except (HostError, RegistersError, ValueError, TypeError, KeyError) as e:
                    reply = {"ok": False, "error": str(e) or type(e).__name__}
                except Exception as e:  # keep the host up; say what broke
                    log(traceback.format_exc())
                    reply = {"ok": False, "error": f"internal error: {e}"}
                data = json.dumps(reply).encode() + b"\n"
                if self.create_delay > 0 and reply["ok"] and req and req["op"] == "create":
                    due = time.monotonic() + self.create_delay
                    self._deferred.append((due, conn, data))
                    stack.pop_all()  # kept open for the reply
                    return
                conn.sendall(data)
        except OSError as e:
            log(f"client connection: {e}")

    def _dispatch(self, req: dict) -> dict:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": self.pid, "dir": self.dir, "dirty_mode": self.dirty_mode}
        if op == "create":
            return {"ok": True, "meta": self._create(req)}
        if op == "list":
            return {"ok": True, "domains": [self._meta(d) for d in sorted(self.domains)]}
        if op == "lookup":
            return {"ok": True, "meta": self._meta(self._find(req.get("ref")))}
        if op == "destroy":
            domid = self._find(req.get("ref"))
            self._kill(domid)
            meta = self.domains.pop(domid)["meta"]
            _remove_files(self.dir, domid, meta.get("disks", ()))
            log(f"domain {domid} destroyed")
            return {"ok": True}
        raise HostError(f"unknown request {op!r}")

    def _meta(self, domid: int) -> dict:
        d = self.domains[domid]
        m = dict(d["meta"])
        m["alive"] = bool(d["pid"])
        if d.get("exit"):
            m["exit"] = d["exit"]
        return m

    def _find(self, ref) -> int:
        if ref is None:
            raise HostError("no domain given")
        s = str(ref)
        if s.isdigit() and int(s) in self.domains:
            return int(s)
        for domid, d in self.domains.items():
            if s in (d["meta"]["name"], d["meta"]["uuid"]):
                return domid
        raise HostError(f"no domain {s!r} on this host")

    def _create(self, req: dict) -> dict:
        workload = req.get("workload", "idle")
        if workload not in KINDS:
            raise HostError(f"unknown workload {workload!r} (one of {', '.join(KINDS)})")
        pages = int(req.get("pages", 0))
        if not MIN_PAGES <= pages <= MAX_PAGES:
            raise HostError(f"a domain has {MIN_PAGES} to {MAX_PAGES} pages, not {pages}")
        seed = int(req.get("seed", 0))
        if not 0 <= seed < 1 << 64:
            raise HostError("seed must fit in 64 bits")
        rate = req.get("rate")
        a, b = int(req.get("a", 0)), float(req.get("b", 0.0))
        disk_sizes, disk_files = _disk_request(req)
        every = req.get("disk_every")
        if every is None:
            every = DEFAULT_DISK_EVERY if disk_sizes and workload in DISK_KINDS else 0
        every = int(every)
        if every and not disk_sizes:
            raise HostError(f"disk_every {every} needs a disk (create with disks)")
        regs = new_registers(workload, seed, None if rate is None else float(rate), a, b, every)
        if workload == "ledger":  # check the ledger fits before making files
            from .ledger import Layout

            Layout(regs.a, pages - MAGIC_PAGES)
        mode = req.get("dirty_mode", "auto")
        if mode not in ("auto", MODE_UFFD, MODE_BITMAP):
            raise HostError(f"dirty mode must be auto, {MODE_UFFD} or {MODE_BITMAP}")
        domid = self.next_domid
        name = str(req.get("name") or f"sim{domid}")
        if any(d["meta"]["name"] == name for d in self.domains.values()):
            raise HostError(f"a domain named {name!r} already exists")
        uuid = str(req.get("uuid") or uuidlib.uuid4())
        meta = {
            "domid": domid,
            "name": name,
            "uuid": uuid,
            "pages": pages,
            "vcpus": int(req.get("vcpus", 1)),
            "workload": workload,
            "seed": seed,
            "rate": regs.rate,
            "a": regs.a,
            "b": regs.b,
            "paused": bool(req.get("paused")),
            "backup": bool(req.get("backup")),
            "dirty_mode": mode,
            # uffd-wp mode: the vCPU marks its writes (xenbind.sim.dirty); off:
            # every read of the log walks the guest (the reference for bench.scale)
            "write_marks": bool(req.get("write_marks", True)),
            "created": time.time(),
            "host_pid": self.pid,
        }
        if disk_sizes:
            meta["disks"] = self._disk_meta(domid, disk_sizes, disk_files)
            meta["disk_every"] = every
        self.next_domid += 1
        mem = L.path(self.dir, domid, "mem")
        try:
            # the memory is allocated now, as Xen does at domain creation: a
            # full filesystem fails the create with ENOSPC here, instead of
            # SIGBUS in whoever first writes a page of a sparse mapping later
            fd = os.open(mem, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.posix_fallocate(fd, 0, pages * PAGE_SIZE)
                _scrub(fd, pages * PAGE_SIZE)
            finally:
                os.close(fd)
            _unlink(L.path(self.dir, domid, "out"))
            L.write_meta(self.dir, meta)
        except OSError as e:
            for ext in ("json", "mem"):
                _unlink(L.path(self.dir, domid, ext))
            raise HostError(
                f"cannot allocate {pages * PAGE_SIZE >> 20} MiB of memory for "
                f"domain {name} in {self.dir}: {e.strerror or e}"
            ) from None
        self.domains[domid] = {"pid": 0, "meta": meta, "exit": None, "disk_pid": 0}
        try:
            if disk_sizes:
                self._make_images(meta["disks"])
                self.domains[domid]["disk_pid"] = self._start_disk_server(domid, meta["disks"])
                meta["disk_server_pid"] = self.domains[domid]["disk_pid"]
                L.write_meta(self.dir, meta)
        except (HostError, OSError) as e:
            self._kill(domid)
            del self.domains[domid]
            _remove_files(self.dir, domid, meta.get("disks", ()), keep_log=True)
            if isinstance(e, HostError):
                raise
            raise HostError(f"cannot make the disks of domain {name}: {e}") from None
        self.domains[domid]["pid"] = self._spawn(domid)
        started = _read_line_timeout(self._ready_fd, WORKER_START_TIMEOUT_S)
        os.close(self._ready_fd)
        if not started.startswith("ok "):
            self._kill(domid)
            del self.domains[domid]
            _remove_files(self.dir, domid, meta.get("disks", ()), keep_log=True)
            raise HostError(
                f"domain did not start: {started[4:] or 'worker exited'} (see dom-{domid}.log)"
            )
        meta["dirty_mode_in_use"] = started.split()[1]
        L.write_meta(self.dir, meta)
        log(
            f"created domain {domid} ({name}): {pages} pages, {workload}, {meta['dirty_mode_in_use']}"
            + "".join(f", disk {d['path']} ({d['size']} bytes)" for d in meta.get("disks", ()))
        )
        return self._meta(domid)

    # --- disks -----------------------------------------------------------------------

    def _disk_meta(self, domid: int, sizes: list[int], files: list[str]) -> list[dict]:
        nbd, control = L.path(self.dir, domid, "nbd"), L.path(self.dir, domid, "dctl")
        for sock in (nbd, control):
            if len(sock.encode()) > D.MAX_SOCKET_PATH:
                raise HostError(
                    f"socket path {sock} is too long for a Unix socket: use a shorter DIR"
                )
        return [
            {
                "path": files[i] if files else D.image_path(self.dir, domid, i),
                "size": size,
                "nbd": nbd,
                "control": control,
                "owned": not files,
            }
            for i, size in enumerate(sizes)
        ]

    def _make_images(self, disks: list[dict]) -> None:
        """Sparse images for the disks the host owns (given files are used as they are)."""
        for d in disks:
            if not d["owned"]:
                continue
            fd = os.open(d["path"], os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, d["size"])
            finally:
                os.close(fd)

    def _start_disk_server(self, domid: int, disks: list[dict]) -> int:
        """Start the domain's block server; its pid once its sockets exist."""
        nbd, control = disks[0]["nbd"], disks[0]["control"]
        for sock in (nbd, control):
            _unlink(sock)
        try:
            argv, sockets = D.server_command([d["path"] for d in disks], nbd, control)
        except D.DiskError as e:
            raise HostError(str(e)) from None
        logp = L.path(self.dir, domid, "disklog")
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, logp, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
                setsigdef=(signal.SIGPIPE, signal.SIGINT, signal.SIGTERM),
            )
        except OSError as e:
            raise HostError(f"cannot start the block server {argv[0]}: {e}") from None
        deadline = time.monotonic() + DISK_SERVER_START_TIMEOUT_S
        while not all(os.path.exists(p) for p in sockets):
            done, status = os.waitpid(pid, os.WNOHANG)
            why = None
            if done:
                why = f"it {_describe_exit(status)}"
            elif time.monotonic() > deadline:
                why = f"its sockets did not appear in {DISK_SERVER_START_TIMEOUT_S:g} s"
                _stop_server(pid)
            if why:
                tail = _read_text(logp)[-1500:].strip() or "(nothing)"
                raise HostError(
                    f"the block server of domain {domid} did not start: {why}; its log "
                    f"(dom-{domid}.disklog) says: {tail}"
                )
            time.sleep(0.01)
        log(f"block server of domain {domid}: pid {pid}, {' '.join(argv)}")
        return pid

    def _spawn(self, domid: int) -> int:
        r, w = os.pipe()
        logf = os.open(
            L.path(self.dir, domid, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
        pid = os.fork()
        if pid == 0:  # the domain's worker
            code = 1
            try:
                os.close(r)
                self.sel.close()
                self.listener.close()
                self._conn.close()
                for _, deferred, _ in self._deferred:
                    deferred.close()
                os.close(self.lock_fd)
                os.dup2(logf, 2)
                os.dup2(logf, 1)
                os.close(logf)
                from .worker import run_worker

                run_worker(self.dir, domid, w, self.pid)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        os.close(w)
        os.close(logf)
        self._ready_fd = r
        return pid


def _read_line_timeout(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return "err timed out"
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    finally:
        sel.close()
    return buf.decode(errors="replace").strip() or "err worker exited"


def _disk_request(req: dict) -> tuple[list[int], list[str]]:
    """The create request's disk sizes and given image files, checked."""
    sizes, files = req.get("disks") or [], req.get("disk_files") or []
    if not isinstance(sizes, list) or not isinstance(files, list):
        raise HostError("disks and disk_files must be lists")
    if len(sizes) > D.MAX_DISKS or len(files) > D.MAX_DISKS:
        raise HostError(f"a domain has at most {D.MAX_DISKS} disks")
    try:
        sizes = [D.check_size(s, f"disk {i}") for i, s in enumerate(sizes)]
    except D.DiskError as e:
        raise HostError(str(e)) from None
    if files and sizes and len(files) != len(sizes):
        raise HostError(f"{len(files)} disk files given for {len(sizes)} disks")
    found = []
    for i, f in enumerate(files):
        if not isinstance(f, str) or not os.path.isabs(f):
            raise HostError(f"disk file {i} must be an absolute path, got {f!r}")
        try:
            st = os.stat(f)
        except OSError as e:
            raise HostError(f"disk file {f}: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise HostError(f"disk file {f} is not a regular file")
        try:
            found.append(D.check_size(st.st_size, f"disk file {f}"))
        except D.DiskError as e:
            raise HostError(str(e)) from None
        if sizes and st.st_size != sizes[i]:
            raise HostError(f"disk file {f} is {st.st_size} bytes, disk {i} is {sizes[i]}")
    return sizes or found, files


def _stop_server(pid: int) -> None:
    """SIGTERM a block server, SIGKILL if it lingers; reaped either way."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DISK_SERVER_STOP_TIMEOUT_S
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.005)
    except (ProcessLookupError, ChildProcessError):
        pass


def _remove_files(sim_dir: str, domid: int, disks, keep_log: bool = False) -> None:
    """A domain's files, and the disk images the host made (never given ones)."""
    for ext in DOMAIN_FILES:
        if not (keep_log and ext in ("log", "disklog")):
            _unlink(L.path(sim_dir, domid, ext))
    for d in disks:
        if d.get("owned"):
            _unlink(d["path"])


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _read_text(p: str) -> str:
    try:
        with open(p) as f:
            return f.read()
    except OSError:
        return ""


#: madvise(2) MADV_POPULATE_WRITE (Linux 5.14): fault a range in, writable
MADV_POPULATE_WRITE = 23


def _scrub(fd: int, length: int) -> None:
    """Fault every page of a new domain's memory in, zeroed, as Xen hands a
    new domain scrubbed pages: fallocate alone reserves tmpfs pages but zeroes
    each at its first touch, which charged a new backup's allocation to the
    receiver's initial copy (on a VM whose host reclaims free memory, 0.6 to
    over 2 s per GiB). A kernel without MADV_POPULATE_WRITE keeps the lazy way."""
    mm = mmap.mmap(fd, length, mmap.MAP_SHARED)
    try:
        mm.madvise(MADV_POPULATE_WRITE)
    except OSError:
        pass
    finally:
        mm.close()


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def main(sim_dir: str, create_delay: float = 0.0) -> int:
    try:
        host = Host(sim_dir, create_delay)
    except HostError as e:
        log(str(e))
        return 1
    host.run()
    return 0
