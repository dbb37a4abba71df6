"""In-lab checks of xenbind.xenstore (pyxs) against the real xenstored.

Run in dom0: ``python -m lab.checks.xenstore_checks names|lifecycle``.

names (the guest keeps running):
    xs-connect       XenStore.connect() reaches dom0's xenstored
    xs-names         name -> domid and domid -> name for dom0 and the guest,
                     agreeing with `xl domid`; the guest's UUID from its /vm
                     path agrees with xenctrl's domain info
lifecycle (ends the guest; run last), on domid $LAB_GUEST_DOMID:
    xs-suspend       the suspend handshake through control/shutdown: the
                     guest's kernel acknowledges and the domain shuts down with
                     reason SHUTDOWN_suspend
    xs-watch-destroy a watch on @releaseDomain fires when the guest is
                     destroyed (`xl destroy`), and its /local/domain node goes
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, cast

from lab.checks.report import emit, require, run_check

if TYPE_CHECKING:
    from xenbind.xenctrl import XenHypervisor
    from xenbind.xenstore import XenStore

GUEST = os.environ.get("LAB_GUEST", "labguest")
RELEASE_DOMAIN = "@releaseDomain"


def xl(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=timeout)
    require(out.returncode == 0, f"xl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


class Checks:
    def __init__(self) -> None:
        self._xs: XenStore | None = None

    @property
    def xs(self) -> XenStore:
        """The connection connect() (the first check) made; main() skips the
        other checks without it."""
        if self._xs is None:
            raise AssertionError("no xenstore connection")
        return self._xs

    def connect(self) -> str:
        from xenbind.xenstore import XenStore

        self._xs = XenStore.connect()
        top = self.xs.list("/local/domain")
        return f"connected; /local/domain lists {sorted(top)}"

    def names(self) -> str:
        domid = int(xl("domid", GUEST).strip())
        require(self.xs.domid_of(GUEST) == domid, f"domid_of({GUEST!r}) != xl's {domid}")
        require(self.xs.name_of(domid) == GUEST, f"name_of({domid}) = {self.xs.name_of(domid)!r}")
        require(self.xs.name_of(0) == "Domain-0", f"name_of(0) = {self.xs.name_of(0)!r}")
        require(self.xs.domid_of("Domain-0") == 0, "domid_of('Domain-0') != 0")
        uuid = self.xs.uuid_of(domid)
        from xenbind.factory import open_hypervisor

        info = open_hypervisor(None).lookup(domid).info()
        require(
            uuid is not None and uuid.lower() == info.uuid.lower(),
            f"xenstore uuid {uuid} != xenctrl uuid {info.uuid}",
        )
        missing = "no-such-domain-xyz"
        try:
            self.xs.domid_of(missing)
            raise AssertionError(f"domid_of({missing!r}) did not fail")
        except Exception as e:  # noqa: BLE001 - must be the project's DomainError
            require(type(e).__name__ == "DomainError", f"unknown name raised {type(e).__name__}")
        return f"{GUEST} <-> {domid}, Domain-0 <-> 0, uuid {uuid} agrees with xenctrl"

    def suspend(self) -> str:
        from xenbind.factory import open_hypervisor

        domid = int(os.environ["LAB_GUEST_DOMID"])
        hv = cast("XenHypervisor", open_hypervisor(None))  # real Xen, in dom0
        t0 = time.monotonic()
        self.xs.suspend(domid, lambda: hv.is_suspended(domid), ack_timeout=60, suspend_timeout=120)
        reason = hv.shutdown_reason(domid)
        state = xl("list", str(domid)).splitlines()[-1].split()[4]
        require(reason == 2, f"shutdown reason {reason}, not SHUTDOWN_suspend (2)")
        took = time.monotonic() - t0
        # the remus failover check comes after this one and needs the guest
        # running: resume it cancelled, as remusd does after a checkpoint
        hv.lookup(domid).resume_cancelled()
        deadline = time.monotonic() + 30
        while hv.is_suspended(domid) and time.monotonic() < deadline:
            time.sleep(0.2)
        require(not hv.is_suspended(domid), "guest still suspended 30 s after resume_cancelled")
        return (
            f"guest acknowledged control/shutdown=suspend and suspended in "
            f"{took:.1f}s (shutdown reason 2, xl state {state}); resumed cancelled"
        )

    def watch_destroy(self) -> str:
        domid = int(os.environ["LAB_GUEST_DOMID"])
        path = f"/local/domain/{domid}"
        require(self.xs.exists(path), f"{path} missing before destroy")
        with self.xs.watch(RELEASE_DOMAIN) as w:
            # xenstored fires every new watch once at registration: drain it
            while w.wait(1.0) is not None:
                pass
            t0 = time.monotonic()
            xl("destroy", str(domid))
            fired = w.wait(60.0)
            dt = time.monotonic() - t0
        require(
            fired == RELEASE_DOMAIN, f"watch event {fired!r} within 60s, wanted {RELEASE_DOMAIN}"
        )
        self.xs.wait_released(domid, timeout=60)
        require(not self.xs.exists(path), f"{path} still exists")
        return f"@releaseDomain fired {dt:.2f}s after xl destroy; {path} removed"


def main(argv: list[str]) -> int:
    part = argv[0] if argv else "names"
    c = Checks()
    connected = run_check(
        {"names": "xs-connect", "suspend": "xs-connect-suspend"}.get(part, "xs-connect-lifecycle"),
        c.connect,
    )
    steps = {
        "names": [("xs-names", c.names)],
        "suspend": [("xs-suspend", c.suspend)],
        "lifecycle": [("xs-watch-destroy", c.watch_destroy)],
    }[part]
    for name, fn in steps:
        if connected:
            run_check(name, fn)
        else:
            emit("FAIL", name, "skipped: no xenstore connection")
    if c._xs is not None:
        c._xs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
