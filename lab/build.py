"""Build everything the lab boots, from Debian packages, into lab/cache/.

    lab/cache/debs/              the .debs, fetched with `apt-get download`
    lab/cache/root/              all of them unpacked with `dpkg -x` (never
                                 installed: nothing goes to this machine's /boot)
    lab/cache/xen-4.17-amd64     Xen, unzipped: a multiboot ELF QEMU's -kernel loads
    lab/cache/vmlinuz            the Debian kernel, used for dom0 and for the guest
    lab/cache/dom0-initrd.gz     busybox, lab/dom0/init, the modules dom0 needs
    lab/cache/guest-initrd.gz    busybox, lab/guest/init, labguest (static C), xen-blkfront

Rules: every step is skipped when its output is newer than its inputs, so a
second run does no work and needs no network; nothing here needs root except
that `apt-get download` must be able to reach a mirror on the first run.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lab.initramfs import Entry, tree, write_initramfs

LAB = Path(__file__).resolve().parent
CACHE = LAB / "cache"
ROOT = CACHE / "root"
DEBS = CACHE / "debs"

#: Debian 12 packages the lab is made of. The kernel comes from whatever
#: linux-image-amd64 points at (resolved once, then cached).
XEN_PACKAGES = ["xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common", "xenstore-utils"]
KERNEL_META = "linux-image-amd64"
BUSYBOX = "/usr/bin/busybox"  # busybox-static: runs without any library
#: Modules dom0 loads from its initramfs (dependencies are added), in the
#: order given: 9p to reach the host, overlay for the root, Xen's devices.
DOM0_MODULES = [
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "xen_privcmd",
    "xen_evtchn",
    "xen_gntdev",
    "xen_gntalloc",
    "xenfs",
    # disks (docs/disk.md, "On Xen"): blkback serves guests' vbds; nbd gives
    # /dev/nbdN over the mirroring block server; loop is what Xen's block
    # hotplug script attaches a backup's image file with
    "xen_blkback",
    "nbd",
    "loop",
]
#: Modules the guest's initramfs loads: blkfront, for the disk step's /dev/xvda.
GUEST_MODULES = ["xen_blkfront"]
MODINFO_DEPENDS = re.compile(rb"\0depends=([^\0]*)\0")


def log(msg: str) -> None:
    print(f"lab-build: {msg}", flush=True)


def _fresh(output: Path, inputs: list[Path]) -> bool:
    if not output.exists():
        return False
    t = output.stat().st_mtime
    return all(p.stat().st_mtime <= t for p in inputs)


def _kernel_package() -> str:
    have = sorted(glob.glob(str(DEBS / "linux-image-*-amd64_*.deb")))
    if have:
        return os.path.basename(have[-1]).split("_")[0]
    out = subprocess.run(
        ["apt-cache", "depends", KERNEL_META], check=True, capture_output=True, text=True
    ).stdout
    m = re.search(r"Depends: (linux-image-\S+-amd64)\b", out)
    if not m:
        raise SystemExit(f"lab-build: cannot resolve {KERNEL_META} with apt-cache:\n{out}")
    return m.group(1)


def fetch() -> None:
    """Download and unpack the packages (once)."""
    DEBS.mkdir(parents=True, exist_ok=True)
    for pkg in [*XEN_PACKAGES, _kernel_package()]:
        debs = glob.glob(str(DEBS / f"{pkg}_*.deb"))
        if not debs:
            log(f"apt-get download {pkg}")
            subprocess.run(["apt-get", "download", "-q", pkg], cwd=DEBS, check=True)
            debs = glob.glob(str(DEBS / f"{pkg}_*.deb"))
        deb = Path(sorted(debs)[-1])
        stamp = ROOT / ".unpacked" / deb.name
        if not stamp.exists():
            log(f"dpkg -x {deb.name}")
            subprocess.run(["dpkg", "-x", str(deb), str(ROOT)], check=True)
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.touch()
    merge_usr()


def merge_usr() -> None:
    """Move /lib, /bin, /sbin of the unpacked tree under /usr and leave
    symlinks, as on the host (Debian 12 is merged-/usr): in dom0's overlay a
    real /lib here would hide the host's /lib -> usr/lib and with it libc."""
    for top in ("lib", "bin", "sbin"):
        src = ROOT / top
        if src.is_symlink() or not src.exists():
            continue
        for item in list(src.iterdir()):
            dest = ROOT / "usr" / top / item.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_dir() and item.is_dir() and not item.is_symlink():
                shutil.copytree(item, dest, symlinks=True, dirs_exist_ok=True)
                shutil.rmtree(item)
            else:
                os.replace(item, dest)
        src.rmdir()
        src.symlink_to(f"usr/{top}")


def kernel_version() -> str:
    vers = sorted(os.listdir(ROOT / "usr" / "lib" / "modules"))
    if not vers:
        raise SystemExit("lab-build: no kernel modules unpacked")
    return vers[-1]


def module_index(kver: str) -> dict[str, Path]:
    """Module name (dashes as underscores) -> its .ko file."""
    index = {}
    for ko in (ROOT / "usr" / "lib" / "modules" / kver / "kernel").rglob("*.ko"):
        index[ko.name[:-3].replace("-", "_")] = ko
    return index


def module_order(wanted: list[str], index: dict[str, Path]) -> list[str]:
    """``wanted`` and their dependencies (read from each .ko's .modinfo),
    each after everything it depends on."""
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in order:
            return
        if name in stack:
            raise SystemExit(f"lab-build: module dependency cycle {stack + (name,)}")
        if name not in index:
            raise SystemExit(f"lab-build: module {name} not in the kernel package")
        m = MODINFO_DEPENDS.search(index[name].read_bytes())
        deps = [d for d in (m.group(1).decode().split(",") if m else []) if d]
        for d in deps:
            visit(d, stack + (name,))
        order.append(name)

    for w in wanted:
        visit(w, ())
    return order


def build_xen_and_kernel() -> None:
    xen_gz = ROOT / "boot" / "xen-4.17-amd64.gz"
    xen = CACHE / "xen-4.17-amd64"
    if not _fresh(xen, [xen_gz]):
        log("unzip Xen")
        xen.write_bytes(gzip.decompress(xen_gz.read_bytes()))
    vmlinuz = CACHE / "vmlinuz"
    src = ROOT / "boot" / f"vmlinuz-{kernel_version()}"
    if not _fresh(vmlinuz, [src]):
        shutil.copyfile(src, vmlinuz)


def build_dom0_initrd() -> None:
    kver = kernel_version()
    index = module_index(kver)
    order = module_order(DOM0_MODULES, index)
    init = LAB / "dom0" / "init"
    out = CACHE / "dom0-initrd.gz"
    if _fresh(out, [init, Path(BUSYBOX), Path(__file__), *(index[m] for m in order)]):
        return
    log(f"dom0 initramfs with modules {' '.join(order)}")
    entries = tree(["bin", "dev", "proc", "sys", "modules"])
    entries += [
        Entry("dev/console", "chardev", 0o600, rdev=(5, 1)),
        Entry("bin/busybox", "file", 0o755, Path(BUSYBOX).read_bytes()),
        Entry("bin/sh", "symlink", data=b"busybox"),
        Entry("init", "file", 0o755, init.read_bytes()),
        Entry("modules/order", "file", 0o644, ("\n".join(order) + "\n").encode()),
    ]
    entries += [Entry(f"modules/{m}.ko", "file", 0o644, index[m].read_bytes()) for m in order]
    write_initramfs(str(out), entries)


def build_guest_initrd() -> None:
    src = LAB / "guest" / "labguest.c"
    binary = CACHE / "labguest"
    if not _fresh(binary, [src]):
        log("gcc -static labguest.c")
        subprocess.run(
            ["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(binary), str(src)], check=True
        )
    init = LAB / "guest" / "init"
    out = CACHE / "guest-initrd.gz"
    index = module_index(kernel_version())
    order = module_order(GUEST_MODULES, index)
    mods = [index[m] for m in order]
    if _fresh(out, [init, binary, Path(BUSYBOX), Path(__file__), *mods]):
        return
    log(f"guest initramfs with modules {' '.join(order)}")
    entries = tree(["bin", "dev", "proc", "sys", "modules"])
    entries += [Entry("modules/order", "file", 0o644, ("\n".join(order) + "\n").encode())]
    entries += [Entry(f"modules/{m}.ko", "file", 0o644, index[m].read_bytes()) for m in order]
    entries += [
        Entry("dev/console", "chardev", 0o600, rdev=(5, 1)),
        Entry("bin/busybox", "file", 0o755, Path(BUSYBOX).read_bytes()),
        Entry("bin/sh", "symlink", data=b"busybox"),
        Entry("bin/labguest", "file", 0o755, binary.read_bytes()),
        Entry("init", "file", 0o755, init.read_bytes()),
    ]
    write_initramfs(str(out), entries)


def build() -> None:
    for tool in ("apt-get", "dpkg", "gcc", BUSYBOX):
        if not shutil.which(tool):
            raise SystemExit(
                f"lab-build: {tool} is missing (run scripts/install-system-deps "
                "or apt-get install busybox-static gcc)"
            )
    fetch()
    build_xen_and_kernel()
    build_dom0_initrd()
    build_guest_initrd()


if __name__ == "__main__":
    build()
    sys.exit(0)
