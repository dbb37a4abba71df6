"""The xl path of create_backup (no libvirt URI): the generated config, and the
refusal of anything a peer could use to inject xl directives."""

from __future__ import annotations

import pytest

from xenbind.errors import ConfigError
from xenbind.types import DomainConfig
from xenbind.xl import xl_config

UUID = "6d0e1e71-9acf-4c15-beca-9df84c5bb34d"


def _parse(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" = ")
        out[key] = value.strip('"')
    return out


def test_hvm_backup_config():
    cfg = xl_config(DomainConfig(name="web1-backup", uuid=UUID.upper(), pages=32768 + 1, vcpus=2))
    kv = _parse(cfg)
    assert kv["name"] == "web1-backup" and kv["uuid"] == UUID
    assert kv["type"] == "hvm"
    assert kv["memory"] == kv["maxmem"] == "129"  # 128 MiB + one page, rounded up
    assert kv["vcpus"] == "2"
    assert kv["on_reboot"] == kv["on_crash"] == kv["on_poweroff"] == "destroy"


def test_pv_and_pvh_need_a_kernel():
    with pytest.raises(ConfigError, match="kernel"):
        xl_config(DomainConfig(name="g", uuid="", pages=256, vcpus=1, hvm=False))
    with pytest.raises(ConfigError, match="kernel"):
        xl_config(DomainConfig(name="g", uuid="", pages=256, vcpus=1, extra={"type": "pvh"}))
    kv = _parse(
        xl_config(
            DomainConfig(
                name="g",
                uuid="",
                pages=256,
                vcpus=1,
                extra={"type": "pvh", "kernel": "/k", "cmdline": "console=hvc0"},
            )
        )
    )
    assert kv["type"] == "pvh" and kv["kernel"] == "/k" and kv["cmdline"] == "console=hvc0"
    assert "uuid" not in kv


@pytest.mark.parametrize(
    "cfg",
    [
        DomainConfig(name='x"\nkernel="/evil', uuid="", pages=1, vcpus=1),
        DomainConfig(name="x", uuid='"; evil', pages=1, vcpus=1),
        DomainConfig(
            name="x", uuid="", pages=1, vcpus=1, extra={"type": "pvh", "kernel": '/k"\nx="'}
        ),
        DomainConfig(name="x", uuid="", pages=1, vcpus=1, extra={"type": "qemu"}),
        DomainConfig(name="x", uuid="", pages=0, vcpus=1),
        DomainConfig(name="", uuid="", pages=1, vcpus=1),
    ],
)
def test_injection_and_nonsense_refused(cfg):
    with pytest.raises(ConfigError):
        xl_config(cfg)
