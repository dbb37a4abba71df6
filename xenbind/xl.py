"""Creating the backup domain with Xen's own toolstack, ``xl``, when no libvirt
URI is configured.

Building a domain through libxc alone (createdomain, max vCPUs, memory
populate, HVM params, xenstore introduction, console...) is what libxl does in
thousands of lines; the receiver asks libxl to do it instead:

    xl create -p <generated config>     create the domain paused
    xl domid <name>                      its domid

The generated config (``xl_config``):

    name = "<name>"          uuid = "<uuid>"
    type = "hvm" | "pvh" | "pv"     (DomainConfig.hvm; extra["type"] overrides)
    memory = <MiB>   maxmem = <MiB>   (pages * 4 KiB, rounded up to a MiB)
    vcpus = <n>
    kernel / ramdisk / cmdline  from extra["kernel"|"ramdisk"|"cmdline"]
                               (required for pv and pvh: they boot no firmware)
    on_poweroff/on_reboot/on_crash = "destroy"   (a backup never restarts itself)

Rules: every string that lands in the config is checked (no quotes, newlines
or backslashes) so a peer's DomainConfig cannot inject xl directives; every
command has a timeout; failures are DomainError with xl's own message.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

from . import PAGE_SIZE
from .errors import ConfigError, DomainError
from .hypervisor import DomainConfig

#: Seconds ``xl create`` may take (it builds the domain and runs hotplug scripts).
CREATE_TIMEOUT = 120.0
QUERY_TIMEOUT = 10.0
_SAFE = re.compile(r"^[A-Za-z0-9_.:/@+=, -]*$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _q(key: str, value: str) -> str:
    if not _SAFE.match(value):
        raise ConfigError(f"{key} {value!r} has characters not allowed in an xl config")
    return f'{key} = "{value}"'


def xl_config(config: DomainConfig) -> str:
    """The xl domain configuration text for a backup of ``config``."""
    if not _NAME.match(config.name):
        raise ConfigError(f"domain name {config.name!r} is not a valid xl name")
    if config.uuid and not _UUID.match(config.uuid):
        raise ConfigError(f"uuid {config.uuid!r} is not a UUID")
    if config.pages <= 0 or config.vcpus <= 0:
        raise ConfigError("pages and vcpus must be positive")
    mib = -(-config.pages * PAGE_SIZE // (1 << 20))
    kind = str(config.extra.get("type", "hvm" if config.hvm else "pv"))
    if kind not in ("hvm", "pvh", "pv"):
        raise ConfigError(f"domain type {kind!r} is not hvm, pvh or pv")
    lines = [_q("name", config.name)]
    if config.uuid:
        lines.append(_q("uuid", config.uuid.lower()))
    lines += [
        _q("type", kind),
        f"memory = {mib}",
        f"maxmem = {mib}",
        f"vcpus = {int(config.vcpus)}",
    ]
    for key in ("kernel", "ramdisk", "cmdline"):
        if key in config.extra:
            lines.append(_q(key, str(config.extra[key])))
    if kind in ("pv", "pvh") and "kernel" not in config.extra:
        raise ConfigError(f"a {kind} backup needs extra['kernel'] (it boots no firmware)")
    lines += ['on_poweroff = "destroy"', 'on_reboot = "destroy"', 'on_crash = "destroy"']
    return "\n".join(lines) + "\n"


def _xl(args: list[str], timeout: float, op: str, who: str) -> str:
    try:
        res = subprocess.run(
            ["xl", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise DomainError(who, op, "xl not found (install xen-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise DomainError(who, op, f"xl did not finish within {timeout}s") from exc
    if res.returncode != 0:
        raise DomainError(who, op, (res.stderr or res.stdout).strip() or f"exit {res.returncode}")
    return res.stdout


def create_paused(config: DomainConfig) -> int:
    """``xl create -p`` the backup; return its domid."""
    text = xl_config(config)
    fd, path = tempfile.mkstemp(prefix="remus-backup-", suffix=".cfg")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _xl(["create", "-p", path], CREATE_TIMEOUT, "xl create -p", config.name)
    finally:
        os.unlink(path)
    out = _xl(["domid", config.name], QUERY_TIMEOUT, "xl domid", config.name).strip()
    if not out.isdigit():
        raise DomainError(config.name, "xl domid", f"unexpected answer {out!r}")
    return int(out)
