"""libvirt helpers: resolve a domain to a domid, define and start the backup.

Used when a libvirt URI is configured (``xen:///system`` on a dom0 run by
libvirt's libxl driver; ``test:///default`` in the tests, libvirt's in-process
test driver, which accepts ``type='xen'`` domains). Bindings: libvirt-python
9.0.0, built against Debian 12's libvirt-dev 9.0.

The backup's domain XML (``domain_xml``):

    <domain type='xen'>
      <name>NAME</name> <uuid>UUID</uuid>
      <memory unit='KiB'>pages*4</memory> <currentMemory unit='KiB'>pages*4</currentMemory>
      <vcpu>VCPUS</vcpu>
      <os><type>hvm|linux</type> [<kernel>..</kernel> <initrd>..</initrd> <cmdline>..</cmdline>]</os>
      <on_poweroff>destroy</on_poweroff> <on_reboot>destroy</on_reboot> <on_crash>destroy</on_crash>
    </domain>

(``linux`` is libvirt's name for a Xen PV guest.) The XML is built with
ElementTree, so names and paths are escaped, never spliced.

Rules: every libvirt failure becomes DomainError (an unknown name or UUID:
"no such domain"); libvirt's default handler that prints errors on stderr is
replaced by one that drops them (the exception carries the message).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from .errors import ConfigError, DomainError
from .types import DomainConfig

try:
    import libvirt as _libvirt
except ImportError:  # pragma: no cover - libvirt-python is optional
    _libvirt = None

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
KIB_PER_PAGE = 4


def _quiet(_ctx, _err) -> None:  # libvirt error callback: the exception says it all
    return None


def domain_xml(config: DomainConfig) -> str:
    """libvirt domain XML (type='xen') for a backup of ``config``."""
    if not config.name or config.pages <= 0 or config.vcpus <= 0:
        raise ConfigError("a backup domain needs a name, pages > 0 and vcpus > 0")
    if config.uuid and not _UUID_RE.match(config.uuid):
        raise ConfigError(f"uuid {config.uuid!r} is not a UUID")
    root = ET.Element("domain", type="xen")
    ET.SubElement(root, "name").text = config.name
    if config.uuid:
        ET.SubElement(root, "uuid").text = config.uuid.lower()
    kib = str(config.pages * KIB_PER_PAGE)
    ET.SubElement(root, "memory", unit="KiB").text = kib
    ET.SubElement(root, "currentMemory", unit="KiB").text = kib
    ET.SubElement(root, "vcpu").text = str(int(config.vcpus))
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type").text = "hvm" if config.hvm else "linux"
    for key, tag in (("kernel", "kernel"), ("ramdisk", "initrd"), ("cmdline", "cmdline")):
        if key in config.extra:
            ET.SubElement(os_el, tag).text = str(config.extra[key])
    if not config.hvm and "kernel" not in config.extra:
        raise ConfigError("a PV backup needs extra['kernel']")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(root, event).text = "destroy"
    return ET.tostring(root, encoding="unicode")


class Virt:
    """One libvirt connection."""

    def __init__(self, uri: str) -> None:
        if _libvirt is None:
            raise ConfigError(
                f"libvirt URI {uri!r} configured but libvirt-python is not installed "
                "(pip install libvirt-python==9.0.0; needs libvirt-dev)"
            )
        _libvirt.registerErrorHandler(_quiet, None)
        self.uri = uri
        try:
            self.conn = _libvirt.open(uri)
        except _libvirt.libvirtError as exc:
            raise DomainError(None, f"libvirt open {uri}", str(exc)) from exc

    def __enter__(self) -> Virt:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def _err(self, ref, op: str, exc) -> DomainError:
        if exc.get_error_code() == _libvirt.VIR_ERR_NO_DOMAIN:
            return DomainError(ref, op, f"no such domain on {self.uri}")
        return DomainError(ref, op, str(exc))

    def lookup(self, ref: int | str):
        """The virDomain for a domid, a UUID or a name."""
        text = str(ref).strip()
        try:
            if isinstance(ref, int) or text.isdigit():
                return self.conn.lookupByID(int(text))
            if _UUID_RE.match(text):
                return self.conn.lookupByUUIDString(text.lower())
            return self.conn.lookupByName(text)
        except _libvirt.libvirtError as exc:
            raise self._err(text, "libvirt lookup", exc) from exc

    def resolve_domid(self, ref: int | str) -> int:
        """The Xen domid of a running domain named or identified by ``ref``."""
        dom = self.lookup(ref)
        domid = dom.ID()
        if domid < 0:
            raise DomainError(ref, "libvirt lookup", "domain is defined but not running (no domid)")
        return domid

    def define_backup(self, config: DomainConfig, start_paused: bool = True) -> int:
        """Define the backup domain (and start it paused); return its domid.

        A domain of that name already running is refused. Drivers that lack
        VIR_DOMAIN_START_PAUSED (the test driver) are started and suspended.
        """
        xml = domain_xml(config)
        try:
            existing = self.conn.lookupByName(config.name)
        except _libvirt.libvirtError:
            existing = None
        if existing is not None and existing.isActive():
            raise DomainError(config.name, "libvirt define", "a domain of that name is running")
        try:
            dom = self.conn.defineXML(xml)
        except _libvirt.libvirtError as exc:
            raise DomainError(config.name, "libvirt defineXML", str(exc)) from exc
        if not start_paused:
            return -1
        try:
            try:
                dom.createWithFlags(_libvirt.VIR_DOMAIN_START_PAUSED)
            except _libvirt.libvirtError as exc:
                if exc.get_error_code() != _libvirt.VIR_ERR_INVALID_ARG:
                    raise
                dom.create()  # driver without START_PAUSED: start, then pause
                dom.suspend()
        except _libvirt.libvirtError as exc:
            raise DomainError(config.name, "libvirt start paused", str(exc)) from exc
        return dom.ID()

    def undefine(self, ref: int | str) -> None:
        """Destroy (if running) and undefine a domain."""
        dom = self.lookup(ref)
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except _libvirt.libvirtError as exc:
            raise self._err(ref, "libvirt undefine", exc) from exc
