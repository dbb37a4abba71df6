"""Xen disks without a dom0 (docs/disk.md, "On Xen"): the disks file remusd
reads a domain's block server from (xenbind.xendisks), and the backup's xl
config that attaches the receiver's images."""

from __future__ import annotations

import json

import pytest

from xenbind.errors import ConfigError
from xenbind.types import DiskInfo, DomainConfig
from xenbind.xendisks import backup_disk_specs, disks_file, parse_disks, read_disks
from xenbind.xl import xl_config

PVH = {"type": "pvh", "memory_mib": 128, "kernel": "/boot/vmlinuz"}


def test_disks_file_read_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("REMUS_XEN_DISKS_DIR", str(tmp_path))
    assert read_disks("labdisk") == []  # no file: no disks
    img = tmp_path / "labdisk.img"
    img.write_bytes(b"\0" * 8192)
    doc = {"disks": [{"path": str(img), "control": "/run/remus/d.ctl", "nbd": "/run/remus/d.nbd"}]}
    (tmp_path / "labdisk.json").write_text(json.dumps(doc))
    assert disks_file("labdisk") == str(tmp_path / "labdisk.json")
    assert read_disks("labdisk") == [
        (DiskInfo(str(img), 8192, "/run/remus/d.ctl", "/run/remus/d.nbd"), "xvda")
    ]


def test_disks_file_sizes_and_vdevs():
    text = json.dumps(
        {
            "disks": [
                {"path": "/dev/vg/a", "control": "/run/c", "size": 1 << 30, "vdev": "xvdc"},
                {"path": "/dev/vg/b", "control": "/run/c", "size": 512},  # vdev: xvdb (index 1)
            ]
        }
    )
    got = parse_disks(text)
    assert [(d.path, d.size, d.nbd, v) for d, v in got] == [
        ("/dev/vg/a", 1 << 30, "", "xvdc"),
        ("/dev/vg/b", 512, "", "xvdb"),
    ]


@pytest.mark.parametrize(
    "disk",
    [
        {"path": "relative.img", "control": "/run/c", "size": 512},
        {"path": "/a,b.img", "control": "/run/c", "size": 512},  # xl's separator
        {"path": "/a.img", "control": "/run/c", "size": 1000},  # not sectors
        {"path": "/a.img", "control": "/run/c", "size": True},
        {"path": "/a.img", "control": "/run/c", "size": 512, "vdev": "hda"},
        {"path": "/a.img", "control": "/run/c", "size": 512, "extra": 1},
        {"path": "/nonexistent.img", "control": "/run/c"},  # no size, no file
        {"control": "/run/c", "size": 512},
    ],
)
def test_disks_file_is_checked(disk):
    with pytest.raises(ConfigError):
        parse_disks(json.dumps({"disks": [disk]}))


def test_disks_file_shape_is_checked():
    for text in ("not json", "[]", '{"disks": []}', '{"disks": [1]}'):
        with pytest.raises(ConfigError):
            parse_disks(text)
    two = {"path": "/a.img", "control": "/run/c", "size": 512, "vdev": "xvda"}
    with pytest.raises(ConfigError, match="twice"):
        parse_disks(json.dumps({"disks": [two, two]}))


def test_backup_config_attaches_the_images_on_the_primarys_vdevs():
    cfg = DomainConfig(
        name="labdisk-backup",
        uuid="",
        pages=32768,
        vcpus=1,
        extra={**PVH, "disk_vdevs": ["xvdb"]},
        disks=(16 << 20,),
    )
    text = xl_config(cfg, ["/var/lib/remus/disks/0f8fad5b-d9cb-469f-a165-70867728950e/disk0.img"])
    disk = [line for line in text.splitlines() if line.startswith("disk = ")]
    assert disk == [
        'disk = [ "format=raw, vdev=xvdb, access=rw, backendtype=phy, '
        'target=/var/lib/remus/disks/0f8fad5b-d9cb-469f-a165-70867728950e/disk0.img" ]'
    ]
    assert "\ndisk = " not in xl_config(cfg)  # no images: no disks


def test_backup_disk_specs_are_checked():
    assert backup_disk_specs(["/i/a.img", "/i/b.img"], None)[1].startswith("format=raw, vdev=xvdb,")
    for vdevs in (["xvda"], ["xvda", "xvda"], ["xvda", 'x"'], "xvda,xvdb"):
        with pytest.raises(ConfigError):
            backup_disk_specs(["/i/a.img", "/i/b.img"], vdevs)
    with pytest.raises(ConfigError):
        backup_disk_specs(["/i/a,b.img"], None)
    cfg = DomainConfig(name="g", uuid="", pages=256, vcpus=1, extra=PVH, disks=(512, 512))
    with pytest.raises(ConfigError, match="2 disks"):
        xl_config(cfg, ["/i/a.img"])
