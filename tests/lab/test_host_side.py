"""Unit tests of the lab's host-side pieces (no QEMU here): the result parser,
the initramfs writer, module dependency order, the guest console parser."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from lab import results as R
from lab.build import module_order
from lab.checks.guestlog import (
    COUNTER_MAGIC,
    counter_value,
    expected_pattern_page,
    parse_console,
)
from lab.initramfs import Entry, build_cpio, tree, write_initramfs

# -- results ------------------------------------------------------------------

SERIAL = """\
(XEN) Freed 656kB init memory
LAB-STAGE initramfs
[    3.1] random kernel line
LAB-RESULT PASS dom0-devices: /dev/xen/{privcmd,evtchn} present
LAB-RESULT FAIL xc-pause: counter moved while paused: 5 -> 9 (2.0s)
garbage LAB-RESULT PASS guest-running: ok after 10s\r
LAB-RESULT PASS xc-pause: retried fine
LAB-DONE
"""


def test_serial_results_latest_wins_and_prefix_tolerated():
    res = R.parse_serial(SERIAL)
    by = {r.name: r for r in res}
    assert set(by) == {"dom0-devices", "xc-pause", "guest-running"}
    assert by["xc-pause"].status == "PASS" and by["xc-pause"].detail == "retried fine"
    assert by["guest-running"].detail == "ok after 10s"
    assert by["dom0-devices"].detail == "/dev/xen/{privcmd,evtchn} present"
    assert R.stages(SERIAL) == ["initramfs"]
    assert R.finished(SERIAL)


def test_results_file_needs_status_at_line_start():
    text = "PASS a: one\nnoise FAIL b: not a result\nFAIL c: two\n"
    res = R.parse_results_file(text)
    assert [(r.status, r.name, r.detail) for r in res] == [
        ("PASS", "a", "one"),
        ("FAIL", "c", "two"),
    ]


def test_serial_ignores_unprefixed_lines():
    assert R.parse_serial("PASS x: no prefix\n") == []


@pytest.mark.parametrize(
    ("lines", "done", "ok"),
    [
        (["PASS a: x", "PASS b: y"], True, True),
        (["PASS a: x", "FAIL b: y"], True, False),
        (["PASS a: x"], False, False),  # never finished
        ([], True, False),  # finished but reported nothing
    ],
)
def test_verdict(lines, done, ok):
    assert R.verdict(R.parse_results_file("\n".join(lines)), done) is ok


def test_merge_keeps_primary_and_adds_missing():
    a = R.parse_results_file("PASS x: file\n")
    b = R.parse_serial("LAB-RESULT FAIL x: serial\nLAB-RESULT FAIL y: only serial\n")
    merged = R.merge(a, b)
    assert [(r.name, r.status) for r in merged] == [("x", "PASS"), ("y", "FAIL")]


def test_notes_read_from_the_serial_log_only_when_marked():
    serial = (
        "[  12.3s] LAB-NOTE remus_checks:failover: the guest crashed while it ran; retry 1 of 2\n"
        "LAB-RESULT PASS remus-failover: ok\n"
        "a NOTE that dom0.sh did not write\n"
    )
    assert R.notes(serial) == [
        "remus_checks:failover: the guest crashed while it ran; retry 1 of 2"
    ]
    assert R.notes("LAB-RESULT PASS x: y\n") == []


def test_not_finished_without_marker():
    assert not R.finished("LAB-STAGE chroot\nLAB-DONEX\n")


# -- initramfs ------------------------------------------------------------------


def read_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """A small independent newc reader: (name, mode, data, rdev) per entry."""
    out: list[tuple[str, int, bytes, tuple[int, int]]] = []
    off = 0
    while True:
        assert data[off : off + 6] == b"070701", f"bad magic at {off}"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        assert data[off + 110 + namesize - 1] == 0
        off += 110 + namesize
        off += (4 - off % 4) % 4
        body = data[off : off + filesize]
        off += filesize
        off += (4 - off % 4) % 4
        if name == "TRAILER!!!":
            assert off == len(data)
            return out
        out.append((name, f[1], body, (f[9], f[10])))


def test_newc_round_trip(tmp_path):
    entries = tree(["bin", "a/b/c"]) + [
        Entry("bin/busybox", "file", 0o755, b"\x7fELF" + bytes(range(7))),
        Entry("bin/sh", "symlink", data=b"busybox"),
        Entry("dev/console", "chardev", 0o600, rdev=(5, 1)),
        Entry("init", "file", 0o755, b"#!/bin/sh\n"),
    ]
    got = read_newc(build_cpio(entries))
    names = [g[0] for g in got]
    assert names[:4] == ["bin", "a", "a/b", "a/b/c"]
    by = {g[0]: g for g in got}
    assert by["bin"][1] == 0o040755
    assert by["bin/busybox"][1] == 0o100755 and by["bin/busybox"][2] == b"\x7fELF" + bytes(range(7))
    assert by["bin/sh"][1] == 0o120777 and by["bin/sh"][2] == b"busybox"
    assert by["dev/console"][1] == 0o020600 and by["dev/console"][3] == (5, 1)
    path = tmp_path / "initrd.gz"
    write_initramfs(str(path), entries)
    assert gzip.decompress(path.read_bytes()) == build_cpio(entries)
    # same inputs, same bytes (mtime 0 everywhere)
    write_initramfs(str(tmp_path / "again.gz"), entries)
    assert (tmp_path / "again.gz").read_bytes() == path.read_bytes()


def test_newc_refuses_unknown_kind():
    with pytest.raises(ValueError, match="unknown entry kind"):
        build_cpio([Entry("x", "fifo")])


# -- module order ------------------------------------------------------------


def fake_ko(tmp_path, name: str, depends: str):
    p = tmp_path / f"{name}.ko"
    p.write_bytes(
        b"\x7fELF junk\0license=GPL\0depends="
        + depends.encode()
        + b"\0name="
        + name.encode()
        + b"\0"
    )
    return p


def test_module_order_puts_dependencies_first(tmp_path):
    index = {
        "9p": fake_ko(tmp_path, "9p", "9pnet,fscache,netfs"),
        "9pnet": fake_ko(tmp_path, "9pnet", ""),
        "fscache": fake_ko(tmp_path, "fscache", "netfs"),
        "netfs": fake_ko(tmp_path, "netfs", ""),
        "xenfs": fake_ko(tmp_path, "xenfs", "xen-privcmd"),
        "xen_privcmd": fake_ko(tmp_path, "xen_privcmd", ""),
    }
    order = module_order(["9p", "xenfs"], index)
    assert sorted(order) == sorted(index)
    for mod, deps in [
        ("9p", ["9pnet", "fscache", "netfs"]),
        ("fscache", ["netfs"]),
        ("xenfs", ["xen_privcmd"]),
    ]:
        for d in deps:
            assert order.index(d) < order.index(mod)


def test_module_order_missing_and_cycle(tmp_path):
    with pytest.raises(SystemExit, match="not in the kernel package"):
        module_order(["a"], {"a": fake_ko(tmp_path, "a", "b")})
    idx = {"a": fake_ko(tmp_path, "a", "b"), "b": fake_ko(tmp_path, "b", "a")}
    with pytest.raises(SystemExit, match="cycle"):
        module_order(["a"], idx)


# -- guest console ------------------------------------------------------------

CONSOLE = """\
[    4.6] ACPI Error: whatever
LABGUEST BOOTED kernel=6.1.0-56-amd64
LABGUEST PATTERN 10 11 12
LABGUEST COUNTER 20
LABGUEST DIRTY 30 31
LABGUEST READY
LABGUEST TICK 1000
LABGUEST PATTERN 10 11 13
LABGUEST TICK 2000
LABGUEST TICK 30x0
"""


def test_parse_console_latest_report():
    lay = parse_console(CONSOLE)
    assert lay.pattern_pfns == [10, 11, 13]
    assert lay.counter_pfn == 20 and lay.dirty_pfns == [30, 31] and lay.last_tick == 2000


def test_parse_console_incomplete():
    with pytest.raises(ValueError, match="no complete"):
        parse_console("LABGUEST PATTERN 1 2\nLABGUEST READY\n")


def test_expected_pattern_matches_the_c_formula():
    # labguest.c: magic, uint64 i, then byte k = (i*131 + k*7 + 0x5a) & 0xff
    for i in (0, 1, 63):
        page = expected_pattern_page(i)
        assert page.dtype == np.uint8 and page.shape == (4096,)
        assert page[:8].tobytes() == b"LABPATRN"
        assert struct.unpack("<Q", page[8:16].tobytes())[0] == i
        assert all(page[k] == (i * 131 + k * 7 + 0x5A) & 0xFF for k in (16, 17, 255, 4095))


def test_counter_value():
    page = np.zeros(4096, dtype=np.uint8)
    page[:16] = np.frombuffer(COUNTER_MAGIC + struct.pack("<Q", 12345), dtype=np.uint8)
    assert counter_value(page) == 12345
    page[0] = 0
    with pytest.raises(ValueError, match="magic"):
        counter_value(page)


# -- QEMU command ---------------------------------------------------------------


def test_qemu_command_keeps_commas_out_of_the_dom0_cmdline():
    import argparse

    from lab.runner import CPU, qemu_command

    args = argparse.Namespace(
        guest="pvh",
        only="xenctrl_checks,remus_checks:file",
        overcommit=True,
        timeout=600.0,
        memory=2560,
        cpu=CPU,
    )
    cmd = qemu_command(args)
    assert cmd[:3] == ["timeout", "--kill-after=15", "600"]
    initrd = cmd[cmd.index("-initrd") + 1]
    kernel_and_cmdline, dom0_initrd = initrd.split(",")  # QEMU splits modules at commas
    assert dom0_initrd.endswith("dom0-initrd.gz")
    assert "lab.only=xenctrl_checks+remus_checks:file" in kernel_and_cmdline
    assert "lab.overcommit=1" in kernel_and_cmdline
    assert "smap=0" not in cmd[cmd.index("-append") + 1]
    args.cpu = "max"
    assert "smap=0" in qemu_command(args)[cmd.index("-append") + 1]
    assert "-no-reboot" in cmd
