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
     "uuid"?, "vcpus"?, "paused"?, "backup"?, "dirty_mode"?}
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
import sys
import time
import traceback
import uuid as uuidlib
from typing import Any

from .. import PAGE_SIZE
from . import layout as L
from .dirty import MODE_BITMAP, MODE_UFFD, probe
from .workloads import KINDS, MAGIC_PAGES, RegistersError, new_registers

REQUEST_TIMEOUT_S = 5.0
WORKER_START_TIMEOUT_S = 30.0
MIN_PAGES = 16
MAX_PAGES = 1 << 24  # 64 GiB of guest memory
MAX_REQUEST = 1 << 16


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
            del self.domains[domid]
            for ext in ("json", "mem", "ctl", "dirty", "out", "log", "sock"):
                _unlink(L.path(self.dir, domid, ext))
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
        regs = new_registers(workload, seed, None if rate is None else float(rate), a, b)
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
            "created": time.time(),
            "host_pid": self.pid,
        }
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
        pid = self._spawn(domid)
        self.domains[domid] = {"pid": pid, "meta": meta, "exit": None}
        started = _read_line_timeout(self._ready_fd, WORKER_START_TIMEOUT_S)
        os.close(self._ready_fd)
        if not started.startswith("ok "):
            self._kill(domid)
            del self.domains[domid]
            for ext in ("json", "mem", "ctl", "dirty", "out", "sock"):
                _unlink(L.path(self.dir, domid, ext))
            raise HostError(
                f"domain did not start: {started[4:] or 'worker exited'} (see dom-{domid}.log)"
            )
        meta["dirty_mode_in_use"] = started.split()[1]
        L.write_meta(self.dir, meta)
        log(
            f"created domain {domid} ({name}): {pages} pages, {workload}, {meta['dirty_mode_in_use']}"
        )
        return self._meta(domid)

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
