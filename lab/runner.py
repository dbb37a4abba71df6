"""`make lab`: build the lab, boot Xen 4.17 under QEMU, report the in-lab checks.

The machine QEMU emulates (TCG: /dev/kvm on these hosts cannot run Xen):

    -cpu qemu64,+svm,+npt + SSSE3/SSE4.1/SSE4.2/POPCNT/CX16 (x86-64-v2): Xen
                        needs SVM (+NPT for HVM/PVH guests); the host's numpy
                        wheels need x86-64-v2 in dom0 ("Illegal instruction"
                        on plain qemu64). Not "-cpu max": with it (and smap=0,
                        or dom0 crashes) dom0 processes crashed at random
                        (segfault, "malloc(): corrupted top size", a failed
                        import) - QEMU 7.2's new TCG AVX2 is the suspect.
    -kernel  lab/cache/xen-4.17-amd64   (multiboot ELF)
    -initrd  "vmlinuz <dom0 cmdline>,dom0-initrd.gz"   (multiboot modules)
    virtio-9p  hostroot = /  (read-only), xenroot = lab/cache/root (read-only),
               results  = lab/cache/run/results (writable)
    -serial file:lab/cache/run/serial.log;  -no-reboot: dom0's reboot at the
                        end makes Xen reset the machine, and QEMU exits.

Rules: every wait has a deadline. QEMU runs under timeout(1) with a hard
limit, the runner also stops it when dom0 reported LAB-DONE and QEMU did not
exit within a grace period, and when dom0 did not reach its initramfs within
the boot deadline. The summary is one line per check, then a total line; the
exit status is 0 only if the run finished and every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab import results as R
from lab.build import CACHE, LAB, ROOT, build

REPO = LAB.parent
RUN = CACHE / "run"
XEN_CMDLINE = "dom0_mem=1024M console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all"
CPU = "qemu64,+svm,+npt,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16"
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen quiet"
QEMU = "qemu-system-x86_64"
BOOT_DEADLINE = 240.0  # QEMU start -> dom0's initramfs says LAB-STAGE (seconds)
DONE_GRACE = 30.0  # LAB-DONE -> QEMU exits on its own


def qemu_command(args: argparse.Namespace) -> list[str]:
    dom0 = f"{DOM0_CMDLINE} lab.repo={REPO} lab.guest={args.guest}"
    if args.overcommit:
        dom0 += " lab.overcommit=1"
    if args.only:
        dom0 += f" lab.only={args.only.replace(',', '+')}"  # no commas: see -initrd
    results = RUN / "results"
    return [
        "timeout",
        "--kill-after=15",
        str(int(args.timeout)),
        QEMU,
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        args.cpu,
        "-m",
        str(args.memory),
        "-smp",
        "2",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{RUN / 'serial.log'}",
        "-kernel",
        str(CACHE / "xen-4.17-amd64"),
        "-append",
        XEN_CMDLINE + (" smap=0" if args.cpu.startswith("max") else ""),
        # QEMU splits -initrd at commas: no comma may appear in the cmdline
        "-initrd",
        f"{CACHE / 'vmlinuz'} {dom0},{CACHE / 'dom0-initrd.gz'}",
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={ROOT},mount_tag=xenroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={results},mount_tag=results,security_model=none",
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def boot(args: argparse.Namespace) -> tuple[str, list[R.Result], float]:
    """Run QEMU to the end; return the serial log, host-side failures, seconds."""
    if RUN.exists():
        shutil.rmtree(RUN)
    (RUN / "results").mkdir(parents=True)
    cmd = qemu_command(args)
    (RUN / "qemu-command.txt").write_text(" ".join(cmd) + "\n")
    serial = RUN / "serial.log"
    host_fail: list[R.Result] = []
    t0 = time.monotonic()
    with open(RUN / "qemu.stderr", "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    shown = 0
    done_at: float | None = None
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            text = _read(serial)
            lines = text.splitlines()
            for line in lines[shown:]:
                if "LAB-STAGE" in line or "LAB-RESULT" in line:
                    print(f"  [{time.monotonic() - t0:6.1f}s] {line.strip()}", flush=True)
            shown = len(lines)
            now = time.monotonic() - t0
            if done_at is None and R.finished(text):
                done_at = now
            if done_at is not None and now - done_at > DONE_GRACE:
                host_fail.append(
                    R.Result("FAIL", "qemu-exit", "dom0 finished but QEMU did not exit; stopped")
                )
                break
            if not R.stages(text) and now > BOOT_DEADLINE:
                host_fail.append(
                    R.Result(
                        "FAIL",
                        "boot",
                        f"dom0 did not reach its initramfs within {BOOT_DEADLINE:.0f}s",
                    )
                )
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = time.monotonic() - t0
    text = _read(serial)
    if proc.returncode == 124 and not R.finished(text):
        host_fail.append(
            R.Result(
                "FAIL",
                "timeout",
                f"QEMU killed after {args.timeout:.0f}s; last stage: "
                f"{(R.stages(text) or ['none'])[-1]}",
            )
        )
    elif proc.returncode not in (0, 124, -signal.SIGTERM) and not R.finished(text):
        host_fail.append(
            R.Result(
                "FAIL",
                "qemu",
                f"QEMU exited with {proc.returncode}: {_read(RUN / 'qemu.stderr').strip()[-300:]}",
            )
        )
    return text, host_fail, elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab/run", description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=1500.0, help="hard limit for QEMU, seconds")
    p.add_argument("--guest", choices=["pvh", "pv"], default="pvh", help="lab guest type")
    p.add_argument(
        "--only",
        default="",
        help="run only these Python check steps (comma list of modules "
        "or module:part, e.g. xenctrl_checks,remus_checks:file); 'none' for the shell "
        "checks only",
    )
    p.add_argument(
        "--cpu",
        default=CPU,
        help=f"QEMU CPU model (default {CPU}; 'max' needs smap=0, added automatically)",
    )
    p.add_argument(
        "--overcommit",
        action="store_true",
        help="exploration: vm.overcommit_memory=1 in dom0 (docs/lab.md)",
    )
    p.add_argument("--memory", type=int, default=2560, help="QEMU memory, MiB")
    args = p.parse_args(argv)
    if not shutil.which(QEMU):
        print(f"lab: {QEMU} is missing: apt-get install qemu-system-x86", file=sys.stderr)
        return 2
    t_build = time.monotonic()
    build()
    t_build = time.monotonic() - t_build
    print(
        f"lab: built in {t_build:.1f}s; booting Xen under QEMU (TCG, limit {args.timeout:.0f}s)",
        flush=True,
    )
    serial, host_fail, elapsed = boot(args)
    file_results = R.parse_results_file(_read(RUN / "results" / "results.txt"))
    results = R.merge(R.merge(file_results, R.parse_serial(serial)), host_fail)
    done = R.finished(serial)
    if not done and not host_fail:
        results.append(R.Result("FAIL", "finished", "dom0 never reported LAB-DONE"))
    ok = R.verdict(results, done)
    print("lab results:")
    for r in results:
        print(r.line())
    notes = R.notes(serial)  # steps run again after the guest crashed under emulation
    for n in notes:
        print(f"NOTE {n}")
    npass = sum(r.passed for r in results)
    print(
        f"lab: {npass} passed, {len(results) - npass} failed"
        f"{f', {len(notes)} guest-crash note(s)' if notes else ''}; build {t_build:.1f}s, "
        f"QEMU {elapsed:.1f}s; logs in {RUN.relative_to(REPO)}/"
    )
    (RUN / "summary.json").write_text(
        json.dumps(
            {
                "passed": ok,
                "build_seconds": round(t_build, 1),
                "qemu_seconds": round(elapsed, 1),
                "guest": args.guest,
                "overcommit": args.overcommit,
                "notes": notes,
                "results": [r.__dict__ for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
