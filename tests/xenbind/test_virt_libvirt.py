"""xenbind.virt against libvirt's own in-process test driver (test:///default,
which accepts type='xen' domains): resolve by name/UUID/domid, define and start
a paused backup, clear errors. Runs here: no libvirtd needed."""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET

import pytest

from xenbind.errors import ConfigError, DomainError
from xenbind.types import DomainConfig

try:
    import libvirt
except ImportError:  # CI installs libvirt-python==9.0.0 (pyproject): there it must load
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip("libvirt-python not installed", allow_module_level=True)

from xenbind.virt import Virt, domain_xml  # noqa: E402

URI = "test:///default"  # each open of test:///default is a fresh private host


@pytest.fixture
def virt():
    v = Virt(URI)
    yield v
    v.close()


def test_resolve_the_test_drivers_domain_by_name_uuid_and_domid(virt):
    dom = virt.conn.lookupByName("test")  # the driver's built-in running domain
    want = dom.ID()
    assert want > 0
    assert virt.resolve_domid("test") == want
    assert virt.resolve_domid(dom.UUIDString()) == want
    assert virt.resolve_domid(dom.UUIDString().upper()) == want
    assert virt.resolve_domid(str(want)) == want
    assert virt.resolve_domid(want) == want


def test_unknown_name_uuid_and_domid_are_clear_errors(virt):
    for ref in ("no-such-guest", str(uuid.uuid4()), 4242):
        with pytest.raises(DomainError) as ei:
            virt.resolve_domid(ref)
        assert "no such domain" in str(ei.value) and str(ref) in str(ei.value)


def test_define_and_start_a_paused_backup(virt):
    cfg = DomainConfig(name="guest-backup", uuid=str(uuid.uuid4()), pages=16384, vcpus=2, hvm=True)
    domid = virt.define_backup(cfg, start_paused=True)
    assert domid > 0
    dom = virt.conn.lookupByName("guest-backup")
    assert dom.ID() == domid and dom.UUIDString() == cfg.uuid
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    info = dom.info()
    assert info[1] == 16384 * 4 and info[3] == 2  # max memory KiB, vCPUs
    xml = ET.fromstring(dom.XMLDesc())
    assert xml.get("type") == "xen" and xml.find("os/type").text == "hvm"
    assert xml.find("on_reboot").text == "destroy"
    # resolvable like any other domain, by name and UUID
    assert virt.resolve_domid("guest-backup") == domid == virt.resolve_domid(cfg.uuid)
    # a second backup of the same name while it runs is refused
    with pytest.raises(DomainError, match="running"):
        virt.define_backup(cfg)
    virt.undefine("guest-backup")
    with pytest.raises(DomainError, match="no such domain"):
        virt.resolve_domid("guest-backup")


def test_defined_but_not_started_has_no_domid(virt):
    cfg = DomainConfig(
        name="pv-backup",
        uuid="",
        pages=4096,
        vcpus=1,
        hvm=False,
        extra={"kernel": "/boot/vmlinuz-guest", "cmdline": "console=hvc0"},
    )
    assert virt.define_backup(cfg, start_paused=False) == -1
    xml = ET.fromstring(virt.conn.lookupByName("pv-backup").XMLDesc())
    assert (
        xml.find("os/type").text == "linux" and xml.find("os/kernel").text == "/boot/vmlinuz-guest"
    )
    with pytest.raises(DomainError, match="not running"):
        virt.resolve_domid("pv-backup")


def test_domain_xml_escapes_and_validates():
    cfg = DomainConfig(name="a<b>&'c", uuid="", pages=1, vcpus=1, hvm=True)
    root = ET.fromstring(domain_xml(cfg))  # parses: the name was escaped
    assert root.find("name").text == "a<b>&'c"
    with pytest.raises(ConfigError):
        domain_xml(DomainConfig(name="x", uuid="not-a-uuid", pages=1, vcpus=1))
    with pytest.raises(ConfigError):
        domain_xml(DomainConfig(name="x", uuid="", pages=0, vcpus=1))
    with pytest.raises(ConfigError, match="kernel"):
        domain_xml(DomainConfig(name="x", uuid="", pages=1, vcpus=1, hvm=False))


def test_bad_uri_is_a_domain_error():
    with pytest.raises(DomainError, match="libvirt open"):
        Virt("test:///nonexistent/file.xml")
