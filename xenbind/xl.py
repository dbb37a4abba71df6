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
    memory = <MiB>   maxmem = <MiB>   extra["memory_mib"] / extra["maxmem_mib"]
                                      when given (the primary's RAM), else
                                      pages * 4 KiB rounded up to a MiB (pages
                                      is p2m_size: for HVM/PVH it reaches the
                                      special pages near 4 GiB, so a primary
                                      on Xen always sends memory_mib)
    vcpus = <n>
    kernel / ramdisk / cmdline  from extra["kernel"|"ramdisk"|"cmdline"]
                               (required for pv and pvh: they boot no firmware)
    tsc_mode = "<mode>"        from extra["tsc_mode"]
    cpuid = [ "<leaf[,subleaf]>:eax=<32 chars>,..." ... ]   from extra["cpuid"]
                               (a list: libxl's xend-style CPUID policy)
    disk = [ "format=raw, vdev=<v>, access=rw, backendtype=phy, target=<image>" ... ]
                               the backup's images, when the receiver keeps disks
                               for it (xenbind.xendisks.backup_disk_specs: the
                               vdevs from extra["disk_vdevs"], attached by
                               libxl's block script through a loop device)
    on_poweroff/on_reboot/on_crash = "destroy"   (a backup never restarts itself)

On the primary, ``build_info(domid)`` reads those extra keys from libxl's own
record of the running domain (``xl list -l <domid>``: JSON, ``c_info.type``,
``b_info.target_memkb/max_memkb/kernel/ramdisk/cmdline/tsc_mode/cpuid``), so
the backup is built like the primary (PVH needs the same kernel; under QEMU's
TCG the lab's guest also needs its tsc_mode and cpuid).

Rules: every string that lands in the config is checked (no quotes, newlines
or backslashes) so a peer's DomainConfig cannot inject xl directives; every
command has a timeout; failures are DomainError with xl's own message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence

from . import PAGE_SIZE
from .errors import ConfigError, DomainError
from .types import DomainConfig
from .xendisks import backup_disk_specs

#: Seconds ``xl create`` may take (it builds the domain and runs hotplug scripts).
CREATE_TIMEOUT = 120.0
QUERY_TIMEOUT = 10.0
_SAFE = re.compile(r"^[A-Za-z0-9_.:/@+=, -]*$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


_CPUID = re.compile(r"^0x[0-9a-f]{1,8}(,0x[0-9a-f]{1,8})?:(e[abcd]x=[01xks]{32},?){1,4}$")
#: tsc_mode values of libxl's JSON (libxl_tsc_mode) that xl's config accepts.
_TSC_MODES = ("default", "always_emulate", "native", "native_paravirt")


def _mib(extra: dict, key: str, default: int) -> int:
    if key not in extra:
        return default
    v = extra[key]
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 24:
        raise ConfigError(f"{key} {v!r} is not a size in MiB")
    return v


def _q(key: str, value: str) -> str:
    if not _SAFE.match(value):
        raise ConfigError(f"{key} {value!r} has characters not allowed in an xl config")
    return f'{key} = "{value}"'


def xl_config(config: DomainConfig, disks: Sequence[str] = ()) -> str:
    """The xl domain configuration text for a backup of ``config``; ``disks``:
    the backup's disk images, one per ``config.disks``."""
    if not _NAME.match(config.name):
        raise ConfigError(f"domain name {config.name!r} is not a valid xl name")
    if config.uuid and not _UUID.match(config.uuid):
        raise ConfigError(f"uuid {config.uuid!r} is not a UUID")
    if config.pages <= 0 or config.vcpus <= 0:
        raise ConfigError("pages and vcpus must be positive")
    mib = _mib(config.extra, "memory_mib", -(-config.pages * PAGE_SIZE // (1 << 20)))
    maxmib = max(mib, _mib(config.extra, "maxmem_mib", mib))
    kind = str(config.extra.get("type", "hvm" if config.hvm else "pv"))
    if kind not in ("hvm", "pvh", "pv"):
        raise ConfigError(f"domain type {kind!r} is not hvm, pvh or pv")
    lines = [_q("name", config.name)]
    if config.uuid:
        lines.append(_q("uuid", config.uuid.lower()))
    lines += [
        _q("type", kind),
        f"memory = {mib}",
        f"maxmem = {maxmib}",
        f"vcpus = {int(config.vcpus)}",
    ]
    for key in ("kernel", "ramdisk", "cmdline", "tsc_mode"):
        if key in config.extra:
            lines.append(_q(key, str(config.extra[key])))
    cpuid = config.extra.get("cpuid")
    if cpuid is not None:
        if not isinstance(cpuid, list) or not all(
            isinstance(c, str) and _CPUID.match(c) for c in cpuid
        ):
            raise ConfigError(f"cpuid {cpuid!r} is not a list of xend-style CPUID strings")
        if cpuid:
            lines.append("cpuid = [ " + ", ".join(f'"{c}"' for c in cpuid) + " ]")
    if kind in ("pv", "pvh") and "kernel" not in config.extra:
        raise ConfigError(f"a {kind} backup needs extra['kernel'] (it boots no firmware)")
    if disks:
        if config.disks and len(config.disks) != len(disks):
            raise ConfigError(f"{len(disks)} disk images for {len(config.disks)} disks")
        specs = backup_disk_specs(list(disks), config.extra.get("disk_vdevs"))
        lines.append("disk = [ " + ", ".join(f'"{d}"' for d in specs) + " ]")
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


def create_paused(config: DomainConfig, disks: Sequence[str] = ()) -> int:
    """``xl create -p`` the backup (with ``disks``, its images); return its domid."""
    text = xl_config(config, disks)
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


def cpuid_to_xend(policy) -> list[str]:
    """libxl's JSON CPUID policy (a list of {"leaf", "subleaf"?, "eax".."edx"})
    as xl's xend-style list: ``"0x80000001:edx=xxxx0xxx..."``. Entries or
    registers of another shape are left out."""
    out: list[str] = []
    if not isinstance(policy, list):
        return out
    for e in policy:
        if not isinstance(e, dict) or not isinstance(e.get("leaf"), int):
            continue
        head = f"{e['leaf']:#x}"
        sub = e.get("subleaf")
        if isinstance(sub, int) and 0 <= sub < 0xFFFFFFFF:
            head += f",{sub:#x}"
        regs = [
            f"{r}={e[r]}"
            for r in ("eax", "ebx", "ecx", "edx")
            if isinstance(e.get(r), str) and re.match(r"^[01xks]{32}$", e[r])
        ]
        if regs:
            out.append(f"{head}:{','.join(regs)}")
    return out


def build_info_from_json(text: str) -> dict:
    """The DomainConfig.extra keys of the module docstring, from ``xl list -l``'s
    JSON for one domain (a list of one {"domid", "config": {...}})."""
    data = json.loads(text)
    if isinstance(data, list):
        data = data[0] if data else {}
    cfg = data.get("config", data) if isinstance(data, dict) else {}
    c_info = cfg.get("c_info") or {}
    b_info = cfg.get("b_info") or {}
    out: dict = {}
    if c_info.get("type") in ("hvm", "pvh", "pv"):
        out["type"] = c_info["type"]
    for key, src in (("memory_mib", "target_memkb"), ("maxmem_mib", "max_memkb")):
        v = b_info.get(src)
        if isinstance(v, int) and v > 0:
            out[key] = -(-v // 1024)
    for key in ("kernel", "ramdisk", "cmdline"):
        v = b_info.get(key)
        if v is None and isinstance(b_info.get("type.pv"), dict):  # older layouts
            v = b_info["type.pv"].get(key)
        if isinstance(v, str) and v:
            out[key] = v
    if b_info.get("tsc_mode") in _TSC_MODES and b_info["tsc_mode"] != "default":
        out["tsc_mode"] = b_info["tsc_mode"]
    cpuid = cpuid_to_xend(b_info.get("cpuid"))
    if cpuid:
        out["cpuid"] = cpuid
    return out


def build_info(domid: int) -> dict:
    """``build_info_from_json`` of ``xl list -l <domid>``; DomainError if xl fails."""
    text = _xl(["list", "-l", str(int(domid))], QUERY_TIMEOUT, "xl list -l", str(domid))
    try:
        return build_info_from_json(text)
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DomainError(domid, "xl list -l", f"unreadable JSON: {exc}") from exc
