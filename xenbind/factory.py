"""Which hypervisor a daemon talks to: the simulated host, or real Xen.

Kept apart from the interface (``xenbind.hypervisor``) so that neither
implementation imports the module that imports it: ``sim.client`` and
``xenctrl`` import ``hypervisor``; only this module imports them.
"""

from __future__ import annotations

import os

from .errors import ConfigError
from .hypervisor import Hypervisor


def open_hypervisor(sim_dir: str | os.PathLike | None = None) -> Hypervisor:
    """The simulated host whose directory is ``sim_dir``, or real Xen.

    Real Xen raises ``HypervisorUnavailable`` off a dom0, with a message
    naming what is missing.
    """
    if sim_dir is not None:
        from .sim.client import SimHypervisor

        if not os.path.isdir(sim_dir):
            raise ConfigError(f"simulated host directory {sim_dir} does not exist")
        return SimHypervisor(sim_dir)
    from .xenctrl import XenHypervisor

    return XenHypervisor()
