"""The backup's identity when it must differ from the primary's (test/lab only).

By default the backup domain is created with the primary's name and UUID, as
Remus did: after a failover it *is* the guest. On a host that also runs the
primary (the Xen lab's single dom0, a test bed) that identity is taken, and
the receiver's fence (a domain with this UUID already runs here) refuses the
session. ``--backup-rename SUFFIX`` (TOML ``backup-rename``) creates the
backup as

    name   <primary's name><SUFFIX>            e.g. labguest-backup
    uuid   uuid5(BACKUP_RENAME_NAMESPACE, "<primary's uuid>/<SUFFIX>")

deterministic, so a rerun finds (and fences against, or clears) its own
earlier backup. Everything the receiver keys on stays the primary's UUID
(sessions, generations, the failed-over fence); only the domain the
hypervisor creates is renamed.

Rules: never the default; SUFFIX is 1-32 characters of [A-Za-z0-9_.-] and the
derived name must still be a valid domain name (at most 64 characters).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace

from xenbind.errors import ConfigError
from xenbind.types import DomainConfig

#: uuid5 namespace of derived backup UUIDs (uuid5(NAMESPACE_URL, "remus-ha:backup-rename")).
BACKUP_RENAME_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "remus-ha:backup-rename")
_SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
MAX_NAME = 64


def check_suffix(suffix: str) -> str:
    if not _SUFFIX.match(suffix):
        raise ConfigError(f"backup-rename {suffix!r}: 1-32 characters of A-Z a-z 0-9 _ . -")
    return suffix


def derived_uuid(original: str, suffix: str) -> str:
    return str(uuid.uuid5(BACKUP_RENAME_NAMESPACE, f"{original.lower()}/{suffix}"))


def backup_config(config: DomainConfig, suffix: str | None) -> DomainConfig:
    """The DomainConfig the backup is created with: ``config`` itself without
    a suffix, else renamed as the module docstring says."""
    if not suffix:
        return config
    name = config.name + suffix
    if len(name) > MAX_NAME:
        raise ConfigError(f"backup name {name!r} is longer than {MAX_NAME} characters")
    return replace(config, name=name, uuid=derived_uuid(config.uuid, suffix))
