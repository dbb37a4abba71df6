"""In-lab checks of remusd (and the receiver) on the real hypervisor.

Run in dom0 with the lab guest up: ``python -m lab.checks.remus_checks``.

    remus-protect    remusd (real Xen, no --sim-dir) protects the guest with
                     `remusctl protect labguest --to file:STREAM`: state
                     "protected" and checkpoints taken
    remus-capture    with the guest paused by us, remusd writes two more
                     checkpoints; after unprotect, `python -m xenbind.stream
                     inspect` accepts the capture
    remus-pages      `python -m xenbind.stream replay` of the capture equals,
                     page for page, what foreign mapping reads from the paused
                     guest (every RAM page), and holds the guest's pattern
    remus-failover   remus-receiver in the same dom0 (with --backup-rename,
                     test/lab only: the backup is labguest-backup with a
                     derived UUID, since the primary keeps its identity on this
                     one host) builds a backup domain from a TCP session,
                     remusd is killed, the receiver fails over: the backup
                     domain runs and its counter moves on from the last
                     checkpoint
    remus-switchover `remusctl switchover` (a new receiver and remusd): the
                     guest is left suspended at a last checkpoint, the backup
                     runs on from it (counter moving, pattern intact), remusd
                     reports fenced-backup-took-over; then resume-here runs
                     the primary again for the later checks

Files: the stream and the replayed image under /tmp (tmpfs in dom0);
daemon logs in $LAB_RESULTS (remusd*.log, receiver.log).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, cast

import numpy as np

from lab.checks import labdisk
from lab.checks.guestlog import PAGE_SIZE, counter_value, expected_pattern_page, read_layout
from lab.checks.report import emit, require, run_check
from xenbind.xenstore import XenStore

if TYPE_CHECKING:
    from xenbind.xenctrl import XenHypervisor

GUEST = os.environ.get("LAB_GUEST", "labguest")
RESULTS = os.environ.get("LAB_RESULTS", "/tmp")
PY = sys.executable
STREAM = "/tmp/labguest.stream"
IMAGE = "/tmp/labguest.img"
SOCK = "/run/remus/lab-remusd.sock"
RSOCK = "/run/remus/lab-receiver.sock"
INTERVAL_MS = 500  # TCG is slow: a calm interval
GUEST_RAM_PAGES = 128 * 256  # the lab guest's memory = 128 MiB
BATCH = 1024
BACKUP_SUFFIX = "-backup"
SHARED_INFO_BELOW = 256  # PFNs below 1 MiB: where a PVH Linux puts Xen's shared-info page
# the disk step (docs/lab.md, "remus-disk")
DISK_GUEST = "labdisk"
DISK_MIB = 16
DISK_IMAGE = "/tmp/labdisk.img"  # tmpfs in dom0
DISK_CTL = "/run/remus/labdisk.ctl"
DISK_NBD = "/run/remus/labdisk.nbd"
DISK_CFG = "/tmp/labdisk.cfg"
DISK_BACKUP_DIR = "/tmp/remus-backup-disks"
NBD_DEV = "/dev/nbd0"
# the lab's vbd hotplug script, for the primary's and (REMUS_XEN_BLOCK_SCRIPT,
# xenbind.xendisks) the backup's disks: libxl's own timed out under TCG
BLOCK_SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dom0", "block-fast"
)
# long enough to compare the backup's image with its memory before it runs
DISK_FAILOVER_MS = 30000


def wait_for(cond, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


class Daemon:
    """A daemon process with its log in $LAB_RESULTS, stopped on close()."""

    def __init__(self, args: list[str], log: str) -> None:
        self.logpath = os.path.join(RESULTS, log)
        self.log = open(self.logpath, "ab")
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def tail(self, n: int = 3) -> str:
        try:
            with open(self.logpath, errors="replace") as f:
                return " | ".join(f.read().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def ctl(sock: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "remusd.ctl", "--control", sock, "--timeout", "60", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def domain_status(sock: str, name: str = GUEST) -> dict | None:
    out = ctl(sock, "status", "--json")
    if out.returncode != 0:
        return None
    doms = [d for d in json.loads(out.stdout).get("domains", []) if d.get("name") == name]
    return doms[0] if doms else None


def read_pages(dom, pfns) -> np.ndarray:
    out = np.zeros((len(pfns), PAGE_SIZE), dtype=np.uint8)
    dom.gather(np.asarray(pfns, dtype=np.uint64), out)
    return out


def state_of(hv, domid: int) -> str | None:
    return next((i.state for i in hv.list() if i.domid == domid), None)


class DiskLab:
    """The disk step's primary side in this dom0 (docs/disk.md, "On Xen"):
    an image on tmpfs, the mirroring block server (host's nbdkit, its Python
    plugin, xenbind/nbdmirror.py) on a Unix socket, nbd-client attaching it
    as /dev/nbd0, the domain's disks file for remusd, and the guest labdisk
    (the lab guest's config plus disk = phy:/dev/nbd0,xvda,w)."""

    def __init__(self) -> None:
        self.nbdkit: Daemon | None = None
        self.attached = False
        self.console = f"/var/log/xen/console/guest-{DISK_GUEST}.log"

    def start(self):
        from xenbind.nbdmirror import command
        from xenbind.xendisks import disks_file

        for p in (DISK_IMAGE, DISK_CTL, DISK_NBD):
            if os.path.exists(p):
                os.unlink(p)
        with open(DISK_IMAGE, "wb") as f:
            f.truncate(DISK_MIB << 20)
        os.makedirs(os.path.dirname(DISK_CTL), exist_ok=True)
        self.nbdkit = Daemon(command([DISK_IMAGE], DISK_NBD, DISK_CTL), "nbdkit-disk.log")
        wait_for(
            lambda: os.path.exists(DISK_CTL) or self.nbdkit.proc.poll() is not None,
            120,
            "the block server's control socket",
        )
        require(self.nbdkit.proc.poll() is None, f"nbdkit exited: {self.nbdkit.tail(5)}")
        # Debian 12's nbd-client 3.24: -u SOCKET (the host is a Unix socket);
        # netlink by default, the ioctl interface (-L) if that fails
        tries = []
        for extra in ([], ["-L"]):
            cmd = ["nbd-client", "-u", DISK_NBD, NBD_DEV, "-b", "4096", "-t", "600", *extra]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            tries.append(f"{' '.join(cmd)}: rc {out.returncode} {out.stderr.strip()[-200:]}")
            if out.returncode == 0:
                break
        with open(os.path.join(RESULTS, "nbd-client.log"), "w") as f:
            f.write("\n".join(tries) + "\n")
        require(out.returncode == 0, f"nbd-client: {' | '.join(tries)}")
        self.attached = True
        dev = os.path.basename(NBD_DEV)
        wait_for(
            lambda: int(open(f"/sys/block/{dev}/size").read()) * 512 == DISK_MIB << 20,
            60,
            f"{NBD_DEV} to have the image's size",
        )
        path = disks_file(DISK_GUEST)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            disk = {"path": DISK_IMAGE, "control": DISK_CTL, "nbd": DISK_NBD, "vdev": "xvda"}
            json.dump({"disks": [disk]}, f)
        with open(f"/tmp/{GUEST}.cfg") as f:
            cfg = f.read().replace(f'name = "{GUEST}"', f'name = "{DISK_GUEST}"')
        cfg += (
            f"disk = [ 'format=raw, vdev=xvda, access=rw, backendtype=phy, "
            f"script={BLOCK_SCRIPT}, target={NBD_DEV}' ]\n"
        )
        with open(DISK_CFG, "w") as f:
            f.write(cfg)
        os.environ["REMUS_XEN_BLOCK_SCRIPT"] = BLOCK_SCRIPT  # the receiver's backup
        out = subprocess.run(
            ["xl", "-vvv", "create", DISK_CFG], capture_output=True, text=True, timeout=180
        )
        with open(os.path.join(RESULTS, "xl-create-disk.log"), "w") as f:
            f.write(out.stdout + out.stderr)
        require(out.returncode == 0, f"xl create {DISK_GUEST}: {out.stderr.strip()[-400:]}")
        from lab.checks.guestlog import read_layout

        wait_for(
            lambda: "LABGUEST DISK " in self._console() and "LABGUEST READY" in self._console(),
            300,
            f"{DISK_GUEST} to report its disk (console: {self.console_tail(DISK_GUEST)})",
        )
        from xenbind.factory import open_hypervisor

        hv = open_hypervisor(None)
        dom = hv.lookup(DISK_GUEST)
        self.layout = read_layout(self.console)
        wait_for(lambda: self.seq(dom)[0] > 10, 120, f"{DISK_GUEST}'s first disk writes")
        return dom, self.layout

    def _console(self, name: str = DISK_GUEST) -> str:
        try:
            with open(f"/var/log/xen/console/guest-{name}.log", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def console_tail(self, name: str) -> str:
        return " | ".join(self._console(name).splitlines()[-4:])[-400:]

    def seq(self, dom) -> tuple[int, int]:
        """(last completed disk write, disk blocks) from ``dom``'s memory."""
        return labdisk.disk_state(read_pages(dom, [self.layout.counter_pfn])[0])

    def backup_image(self) -> str:
        imgs = glob.glob(os.path.join(DISK_BACKUP_DIR, "*", "disk0.img"))
        require(len(imgs) == 1, f"backup images {imgs}")
        return imgs[0]

    def close(self, hv) -> None:
        from xenbind.xendisks import disks_file

        for name in (DISK_GUEST + BACKUP_SUFFIX, DISK_GUEST):
            subprocess.run(["xl", "destroy", name], capture_output=True, timeout=60)
        for src in ("/var/log/xen/xen-hotplug.log", "/var/log/xen/xl-disk.log"):
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(RESULTS, os.path.basename(src)))
        for name in (DISK_GUEST, DISK_GUEST + BACKUP_SUFFIX):
            src = f"/var/log/xen/console/guest-{name}.log"
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(RESULTS, f"guest-{name}-console.log"))
        if self.attached:
            subprocess.run(["nbd-client", "-d", NBD_DEV], capture_output=True, timeout=60)
        if self.nbdkit is not None:
            self.nbdkit.stop()
        for p in (disks_file(DISK_GUEST), DISK_IMAGE):
            if os.path.exists(p):
                os.unlink(p)
        shutil.rmtree(DISK_BACKUP_DIR, ignore_errors=True)


class Checks:
    def __init__(self) -> None:
        from xenbind.factory import open_hypervisor

        self.layout = read_layout()
        self.hv = cast("XenHypervisor", open_hypervisor(None))  # real Xen, in dom0
        self.dom = self.hv.lookup(GUEST)
        self.paused_by_us = False
        self.inspect: dict = {}

    def start_remusd(self, log: str, *extra: str) -> Daemon:
        os.makedirs(os.path.dirname(SOCK), exist_ok=True)
        if os.path.exists(SOCK):
            os.unlink(SOCK)  # a killed remusd's of an earlier step: wait for this one's
        d = Daemon(
            [
                PY,
                "-m",
                "remusd.cli",
                "--control",
                SOCK,
                "--interval",
                str(INTERVAL_MS),
                "--log-level",
                "info",
                *extra,
            ],
            log,
        )
        wait_for(lambda: os.path.exists(SOCK) or d.proc.poll() is not None, 120, "remusd socket")
        require(d.proc.poll() is None, f"remusd exited with {d.proc.returncode}: {d.tail()}")
        return d

    # -- step 4: capture to a file --------------------------------------------
    def protect(self) -> str:
        for p in (STREAM, IMAGE):
            if os.path.exists(p):
                os.unlink(p)
        self.remusd = self.start_remusd("remusd-file.log")
        out = ctl(SOCK, "protect", GUEST, "--to", f"file:{STREAM}")
        require(
            out.returncode == 0, f"remusctl protect: {out.stderr.strip() or out.stdout.strip()}"
        )
        st = wait_for(
            lambda: (
                (s := domain_status(SOCK))
                and s["state"] != "initial-copy"
                and (s["checkpoints"] >= 3 or s["state"] != "protected")
                and s
            ),
            300,
            "protected with 3 checkpoints",
        )
        require(
            st["state"] == "protected",
            f"state {st['state']}: {st.get('reason')}; remusd: {self.remusd.tail()}",
        )
        return (
            f"state=protected checkpoints={st['checkpoints']} last_pause_ms="
            f"{st['last_pause_ms']} dirty_pages={st['dirty_pages']} bytes={st['bytes_sent']} "
            f"codec={st['codec']}"
        )

    def capture(self) -> str:
        try:
            self._pause_between_checkpoints()
            out = ctl(SOCK, "unprotect", GUEST)
            require(out.returncode == 0, f"remusctl unprotect: {out.stderr.strip()}")
            wait_for(
                lambda: (s := domain_status(SOCK)) is None or s["state"] == "stopped",
                60,
                "unprotect",
            )
        finally:
            self.remusd.stop()
        require(os.path.getsize(STREAM) > 0, "empty stream file")
        out = subprocess.run(
            [PY, "-m", "xenbind.stream", "inspect", "--json", STREAM],
            capture_output=True,
            text=True,
            timeout=600,
        )
        require(out.returncode == 0, f"inspect exit {out.returncode}: {out.stderr.strip()[-300:]}")
        self.inspect = info = json.loads(out.stdout)
        keys = ("p2m_size", "codec", "checkpoints", "checkpoints_whole", "pages", "ratio")
        summary = {k: info[k] for k in keys if k in info}
        return f"{os.path.getsize(STREAM)} bytes; inspect: {json.dumps(summary)[:300]}"

    def _pause_between_checkpoints(self, attempts: int = 4) -> None:
        """Pause the guest and see remusd checkpoint it twice, paused.

        A pause that lands inside remusd's suspend handshake (the guest has
        acknowledged control/shutdown=suspend and is on its way to suspend)
        stops it half way: remusd waits for a suspend that cannot come until
        the guest runs (up to SUSPEND_TIMEOUT, 20 s, then it stops
        protection). So wait a shorter while, and if nothing came, unpause,
        let that checkpoint finish, and pause again."""
        for attempt in range(1, attempts + 1):
            st0 = domain_status(SOCK)
            require(st0 and st0["state"] == "protected", f"not protected: {st0}")
            self.dom.pause()
            self.paused_by_us = True
            try:
                wait_for(
                    lambda st0=st0: (
                        (s := domain_status(SOCK)) and s["checkpoints"] >= st0["checkpoints"] + 2
                    ),
                    15,
                    "two checkpoints of the paused guest",
                )
                return
            except AssertionError:
                if attempt == attempts:
                    raise
            self.dom.unpause()
            self.paused_by_us = False
            st1 = domain_status(SOCK)
            require(st1 and st1["state"] == "protected", f"not protected: {st1}")
            wait_for(
                lambda st1=st1: (
                    (s := domain_status(SOCK)) and s["checkpoints"] >= st1["checkpoints"] + 1
                ),
                60,
                "a checkpoint of the running guest",
            )

    def pages(self) -> str:
        require(self.paused_by_us, "the guest is not paused by this check")
        out = subprocess.run(
            [PY, "-m", "xenbind.stream", "replay", "-o", IMAGE, STREAM],
            capture_output=True,
            text=True,
            timeout=600,
        )
        require(out.returncode == 0, f"replay exit {out.returncode}: {out.stderr.strip()[-300:]}")
        image = np.memmap(IMAGE, dtype=np.uint8, mode="r").reshape(-1, PAGE_SIZE)
        compared = unmapped = 0
        differ: list[int] = []
        for start in range(0, min(GUEST_RAM_PAGES, len(image)), BATCH):
            pfns = list(range(start, min(start + BATCH, GUEST_RAM_PAGES, len(image))))
            try:
                live = read_pages(self.dom, pfns)
            except Exception:  # noqa: BLE001 - a hole in the batch: page by page
                live = np.zeros((len(pfns), PAGE_SIZE), dtype=np.uint8)
                ok = np.zeros(len(pfns), dtype=bool)
                for j, p in enumerate(pfns):
                    try:
                        live[j] = read_pages(self.dom, [p])[0]
                        ok[j] = True
                    except Exception:  # noqa: BLE001
                        unmapped += 1
                pfns = [p for j, p in enumerate(pfns) if ok[j]]
                live = live[ok]
            eq = np.all(image[pfns] == live, axis=1)
            compared += len(pfns)
            differ += [p for p, e in zip(pfns, eq, strict=True) if not e]
        require(compared > GUEST_RAM_PAGES // 2, f"only {compared} pages mapped")
        # Linux on PVH maps Xen's shared-info page at the first free frame from
        # 4 KiB up (arch/x86/xen/enlighten_hvm.c, reserve_shared_info; in
        # practice PFN 16, 64 KiB): a Xen page, written by Xen (event-channel
        # pending bits, time) without log-dirty, so it may differ. One such page
        # below 1 MiB and none of labguest's own is tolerated, and named.
        own = set(self.layout.pattern_pfns) | {self.layout.counter_pfn}
        shinfo = [p for p in differ if p < SHARED_INFO_BELOW and p not in own]
        require(
            len(differ) - len(shinfo) == 0 and len(shinfo) <= 1,
            f"{len(differ)}/{compared} pages differ between capture and guest, "
            f"first PFNs {differ[:8]}",
        )
        lay = self.layout
        bad = [
            i
            for i, p in enumerate(lay.pattern_pfns)
            if not np.array_equal(image[p], expected_pattern_page(i))
        ]
        require(not bad, f"{len(bad)} pattern pages wrong in the replayed image")
        counter = counter_value(image[lay.counter_pfn])
        note = f"; PFN {shinfo[0]} (Xen's shared-info page) differs" if shinfo else ""
        return (
            f"{compared - len(shinfo)} RAM pages of the paused guest equal the replayed "
            f"capture ({unmapped} unmappable skipped){note}; pattern intact; counter at "
            f"capture {counter}"
        )

    def release(self) -> None:
        if self.paused_by_us:
            self.dom.unpause()
            self.paused_by_us = False
        # remusd killed between checkpoint_stop and checkpoint_go (the failover
        # check) leaves a PV/PVH guest suspended, or about to suspend (a
        # control/shutdown=suspend it had not answered yet when we paused it):
        # the later checks need it running, so wait until the request is
        # answered and resume the guest cancelled if it suspended.
        domid = self.dom.domid
        xs = XenStore.connect()
        try:
            deadline = time.monotonic() + 30
            quiet_since = None  # no request pending since (the guest acks, then suspends)
            while time.monotonic() < deadline:
                if self.hv.is_suspended(domid):
                    self.dom.resume_cancelled()
                    break
                if xs.read(f"/local/domain/{domid}/control/shutdown"):
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 2:
                    break
                time.sleep(0.2)
        finally:
            xs.close()

    # -- step 5: a backup domain and a failover ---------------------------------
    def start_receiver(
        self, port: int, log: str = "receiver.log", failover_ms: int = 5000, *extra: str
    ) -> Daemon:
        """remus-receiver in this dom0, its backups renamed (see the module docstring)."""
        if os.path.exists(RSOCK):
            os.unlink(RSOCK)  # a receiver's of an earlier step: wait for this one's
        recv = Daemon(
            [
                PY,
                "-m",
                "receiver.cli",
                "--listen",
                f"127.0.0.1:{port}",
                "--control",
                RSOCK,
                "--insecure",
                # a PVH guest's p2m reaches its special pages near 4 GiB: 128 MiB
                # of memory counts as ~4 GiB of pages against the plaintext cap
                "--insecure-max-mb",
                "8192",
                "--log-level",
                "info",
                "--failover-timeout",
                str(failover_ms),
                "--stall-timeout",
                "300",
                "--handshake-timeout",
                "60",
                f"--backup-rename={BACKUP_SUFFIX}",
                *extra,
            ],
            log,
        )
        wait_for(
            lambda: os.path.exists(RSOCK) or recv.proc.poll() is not None,
            120,
            "receiver socket",
        )
        require(recv.proc.poll() is None, f"receiver exited: {recv.tail()}")
        return recv

    def protect_tcp(self, port: int, recv: Daemon, log: str, name: str = GUEST) -> Daemon:
        """remusd protects ``name`` to the receiver on ``port``: 3 checkpoints."""
        # xl create of the backup takes 30-60 s under TCG: the handshake waits for it
        remusd = self.start_remusd(
            log, "--insecure", "--connect-timeout", "300", "--ack-timeout", "120"
        )
        adopted = domain_status(SOCK, name)
        if adopted is not None and adopted["state"] != "stopped":
            # the remusd an earlier step killed left its record: this one adopted
            # the guest (reconnecting to that step's receiver); end it cleanly
            out = ctl(SOCK, "unprotect", name)
            require(out.returncode == 0, f"remusctl unprotect (adopted): {out.stderr.strip()}")
        out = ctl(SOCK, "protect", name, "--to", f"127.0.0.1:{port}")
        require(out.returncode == 0, f"remusctl protect: {out.stderr.strip()}")
        st = wait_for(
            lambda: (
                (s := domain_status(SOCK, name))
                and s["state"] != "initial-copy"
                and (s["checkpoints"] >= 3 or s["state"] != "protected")
                and s
            ),
            400,
            "protected over TCP with 3 checkpoints",
        )
        require(
            st["state"] == "protected",
            f"state {st['state']}: {st.get('reason')}; "
            f"remusd: {remusd.tail()}; receiver: {recv.tail()}",
        )
        return remusd

    def backup_runs_on(self, bname: str, timeout: float, when: str) -> tuple:
        """The backup ``bname`` runs (within ``timeout``), its counter moves on
        and the guest's pattern pages are intact in it: (domain, counter first
        read, counter moved to)."""
        backup_ids = wait_for(
            lambda: (
                [d.domid for d in self.hv.list() if d.name == bname and d.state == "running"]
                or None
            ),
            timeout,
            f"{bname} running {when}",
        )
        backup = self.hv.lookup(backup_ids[0])
        c0 = counter_value(read_pages(backup, [self.layout.counter_pfn])[0])
        c1 = wait_for(
            lambda: (
                (c := counter_value(read_pages(backup, [self.layout.counter_pfn])[0])) != c0 and c
            ),
            60,
            f"the backup's counter to move from {c0}",
        )
        got = read_pages(backup, self.layout.pattern_pfns)
        bad = [
            i
            for i in range(len(self.layout.pattern_pfns))
            if not np.array_equal(got[i], expected_pattern_page(i))
        ]
        require(not bad, f"{len(bad)} of labguest's pattern pages wrong on the backup")
        return backup, c0, c1

    def failover(self) -> str:
        port = 7788
        recv = self.start_receiver(port)
        remusd = None
        try:
            remusd = self.protect_tcp(port, recv, "remusd-tcp.log")
            bname = GUEST + BACKUP_SUFFIX
            paused = [d for d in self.hv.list() if d.name == bname]
            require(
                paused and paused[0].state == "paused",
                f"backup {bname} not found paused: {[(d.name, d.state) for d in paused]}",
            )
            # the primary dies: remusd killed, the guest paused (a dead host runs nothing)
            self.dom.pause()
            self.paused_by_us = True
            counter_primary = counter_value(read_pages(self.dom, [self.layout.counter_pfn])[0])
            remusd.stop(signal.SIGKILL)
            remusd = None
            backup, c0, c1 = self.backup_runs_on(bname, 120, f"after failover ({recv.tail()})")
            lay = self.layout
            return (
                f"backup {bname} (domid {backup.domid}) runs after failover: counter "
                f"{c0} -> {c1} (primary stopped at {counter_primary}); the "
                f"{len(lay.pattern_pfns)} pattern pages intact on the backup"
            )
        finally:
            if remusd is not None:
                remusd.stop()
            recv.stop()

    # -- step 6: a planned switchover ------------------------------------------
    def switchover(self) -> str:
        """remusctl switchover on real Xen: the guest is stopped (suspended) at a
        last checkpoint, the receiver resumes its backup from it; remusd's copy
        is fenced, stopped. Then resume-here runs the primary again (the later
        checks need it) and the backup is destroyed."""
        bname = GUEST + BACKUP_SUFFIX
        for d in self.hv.list():  # the failover step's backup, which runs on
            if d.name == bname:
                self.hv.lookup(d.domid).destroy()
        wait_for(lambda: not any(d.name == bname for d in self.hv.list()), 60, f"{bname} destroyed")
        port = 7789
        recv = self.start_receiver(port, "receiver-switchover.log")
        remusd = None
        try:
            remusd = self.protect_tcp(port, recv, "remusd-switchover.log")
            counter_before = counter_value(read_pages(self.dom, [self.layout.counter_pfn])[0])
            t0 = time.monotonic()
            out = ctl(SOCK, "switchover", GUEST, timeout=200)
            took = time.monotonic() - t0
            require(
                out.returncode == 0,
                f"remusctl switchover: rc {out.returncode}: {out.stdout.strip()} "
                f"{out.stderr.strip()}; remusd: {remusd.tail()}; receiver: {recv.tail()}",
            )
            st = domain_status(SOCK)
            require(
                st is not None
                and st["state"] == "fenced"
                and st["case"] == "fenced-backup-took-over",
                f"remusd after the switchover: {st and (st['state'], st['case'], st['reason'])}",
            )
            held = self.dom.checkpoint_held()
            require(held is not None, "the old primary runs after the switchover")
            backup, c0, c1 = self.backup_runs_on(bname, 60, f"after the switchover ({recv.tail()})")
            stopped_at = counter_value(read_pages(self.dom, [self.layout.counter_pfn])[0])
            # the lab goes on with the primary: run it again, drop the backup
            out = ctl(SOCK, "resume-here", GUEST)
            require(out.returncode == 0, f"remusctl resume-here: {out.stderr.strip()}")
            backup.destroy()
            wait_for(
                lambda: (
                    counter_value(read_pages(self.dom, [self.layout.counter_pfn])[0]) != stopped_at
                ),
                60,
                "the primary's counter to move after resume-here",
            )
            return (
                f"switchover in {took:.1f} s: {GUEST} stopped ({held}) at counter {stopped_at} "
                f"(was {counter_before} at the request); {bname} (domid {backup.domid}) runs on "
                f"from it: counter {c0} -> {c1}, pattern intact; remusd fenced "
                "(fenced-backup-took-over); the primary resumed here afterwards"
            )
        finally:
            if remusd is not None:
                remusd.stop()
            recv.stop()

    # -- step 7: a guest with a disk, protected, failed over -----------------
    def disk(self) -> str:
        """docs/lab.md, "remus-disk": labdisk (the lab guest plus /dev/xvda,
        served by the mirroring block server through /dev/nbd0) is protected
        with its disk, the primary dies, the backup's image is the primary's
        disk at the last committed checkpoint, and the guest writes on."""
        d = DiskLab()
        self.dom.pause()  # labguest idles meanwhile: two guests under TCG are slow
        self.paused_by_us = True
        remusd = recv = None
        try:
            dom, layout = d.start()
            port = 7790
            recv = self.start_receiver(
                port,
                "receiver-disk.log",
                DISK_FAILOVER_MS,
                "--disk-dir",
                DISK_BACKUP_DIR,
            )
            remusd = self.protect_tcp(port, recv, "remusd-disk.log", DISK_GUEST)
            # a few epochs of writes after the initial sync
            st0 = domain_status(SOCK, DISK_GUEST)
            require(st0 is not None, "no status of the disk guest")
            cp0 = st0["checkpoints"] if st0 else 0
            seq0 = d.seq(dom)[0]
            wait_for(
                lambda: (
                    (s := domain_status(SOCK, DISK_GUEST))
                    and s["state"] == "protected"
                    and s["checkpoints"] >= cp0 + 3
                    and d.seq(dom)[0] > seq0 + 20
                ),
                300,
                "3 more checkpoints and 20 more disk writes",
            )
            st = domain_status(SOCK, DISK_GUEST) or {}
            require(st.get("state") == "protected", f"state {st.get('state')}: {st.get('reason')}")
            mirrored = json.dumps(st.get("disks"))[:300]
            bname = DISK_GUEST + BACKUP_SUFFIX
            backup_id = [i.domid for i in self.hv.list() if i.name == bname]
            require(backup_id, f"no backup domain {bname}")
            backup = self.hv.lookup(backup_id[0])
            # the primary dies: paused (a dead host runs nothing), remusd killed
            dom.pause()
            primary_seq = d.seq(dom)[0]
            remusd.stop(signal.SIGKILL)
            remusd = None
            t_kill = time.monotonic()
            time.sleep(3)  # a commit in flight when the link went finishes
            # before the failover the backup is paused at the last committed
            # checkpoint: its memory says which writes had completed then
            require(
                state_of(self.hv, backup.domid) == "paused",
                "the backup runs already: the failover came before the comparison",
            )
            c_seq, blocks = d.seq(backup)
            img = d.backup_image()
            snap = np.fromfile(img, dtype=np.uint8)
            c_seq2 = d.seq(backup)[0]
            require(c_seq == c_seq2, f"the backup's memory changed while read: {c_seq} {c_seq2}")
            require(
                time.monotonic() - t_kill < DISK_FAILOVER_MS / 1000 - 1,
                "the comparison took longer than the failover timeout",
            )
            prim = np.fromfile(DISK_IMAGE, dtype=np.uint8)
            sc = labdisk.scan(snap, blocks)
            # a write in flight at the checkpoint's pause may be on either side
            prefix = sc.top
            require(
                prefix in (c_seq, c_seq + 1),
                f"the backup's image holds writes up to {prefix}, its memory at the last "
                f"committed checkpoint says {c_seq} completed (primary at {primary_seq})",
            )
            errs = labdisk.prefix_errors(sc, prefix, blocks)
            require(not errs, f"the backup's image is not writes 1..{prefix}: {errs}")
            ps = labdisk.scan(prim, blocks)
            require(
                not ps.malformed, f"the primary's image has malformed blocks {ps.malformed[:4]}"
            )
            unchanged = [b for b in range(blocks) if int(ps.seqs[b]) <= prefix]
            differ = labdisk.same_blocks(snap, prim, blocks, unchanged)
            require(
                not differ,
                f"{len(differ)} blocks the primary has not written since write {prefix} "
                f"differ on the backup: {differ[:4]}",
            )
            # the failover: the backup runs, and goes on writing to its disk
            wait_for(
                lambda: state_of(self.hv, backup.domid) == "running",
                DISK_FAILOVER_MS / 1000 + 120,
                f"{bname} running after the failover ({recv.tail()})",
            )
            t_run = time.monotonic()
            after = wait_for(
                lambda: (s := d.seq(backup)[0]) > prefix + 20 and s,
                240,
                f"the backup's guest to write on past {prefix} (console: {d.console_tail(bname)})",
            )
            took = time.monotonic() - t_run
            backup.pause()
            try:
                time.sleep(1)
                done = d.seq(backup)[0]
                now = np.fromfile(img, dtype=np.uint8)
            finally:
                backup.unpause()
            sn = labdisk.scan(now, blocks)
            require(
                sn.top in (done, done + 1),
                f"after the failover the image holds writes up to {sn.top}, the guest says {done}",
            )
            errs = labdisk.prefix_errors(sn, sn.top, blocks)
            require(not errs, f"after the failover the image is not writes 1..{sn.top}: {errs}")
            return (
                f"{DISK_GUEST} ({blocks} blocks of 4 KiB via /dev/nbd0) protected with its disk "
                f"(disks: {mirrored}); primary stopped at write {primary_seq}; the backup's "
                f"image at the last committed checkpoint = writes 1..{prefix} (its memory: "
                f"{c_seq} completed), {len(unchanged)} of its blocks byte-equal to the "
                f"primary's; after the failover {bname} wrote on to {done} ({after} "
                f"{took:.0f} s after it ran), image = writes 1..{sn.top}"
            )
        finally:
            if remusd is not None:
                remusd.stop()
            if recv is not None:
                recv.stop()
            d.close(self.hv)
            self.dom.unpause()
            self.paused_by_us = False


def main(argv: list[str]) -> int:
    """``file``: remus-protect, remus-capture, remus-pages; ``failover``;
    ``switchover``; ``disk``."""
    part = argv[0] if argv else "file"
    try:
        c = Checks()
    except Exception as e:  # noqa: BLE001 - reported as this module's FAIL
        first = {
            "failover": "remus-failover",
            "switchover": "remus-switchover",
            "disk": "remus-disk",
        }
        emit("FAIL", first.get(part, "remus-protect"), f"setup: {type(e).__name__}: {e}")
        return 1
    if part == "failover":
        run_check("remus-failover", c.failover)
        c.release()
        return 0
    if part == "switchover":
        run_check("remus-switchover", c.switchover)
        c.release()
        return 0
    if part == "disk":
        run_check("remus-disk", c.disk)
        c.release()
        return 0
    ok = run_check("remus-protect", c.protect)
    if ok:
        ok = run_check("remus-capture", c.capture)
    else:
        emit("FAIL", "remus-capture", "skipped: not protected")
    if getattr(c, "remusd", None) is not None:
        c.remusd.stop()
    if ok:
        run_check("remus-pages", c.pages)
    else:
        emit("FAIL", "remus-pages", "skipped: no capture")
    c.release()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
