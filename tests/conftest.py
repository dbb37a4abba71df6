"""Project-wide fixtures (keep small; rooms add their own conftest.py in subfolders).

``sim_host``: a running simulated host in a fresh /dev/shm directory, stopped
and removed after the test. ``sim_host_factory``: make several (primary,
backup). See tests/simhost.py for the helper itself.
"""

from __future__ import annotations

import pytest

from tests.simhost import SimHost, sim_dir


@pytest.fixture
def sim_host_factory():
    hosts: list[SimHost] = []

    def make(start: bool = True) -> SimHost:
        h = SimHost(sim_dir())
        hosts.append(h)
        return h.start() if start else h

    yield make
    for h in hosts:
        h.cleanup()


@pytest.fixture
def sim_host(sim_host_factory) -> SimHost:
    return sim_host_factory()
