"""Which of the backup's PFNs have memory behind them, and populating the rest.

A backup built by the toolstack (``xl create -p``, libvirt) gets the toolstack's
usual physmap for its memory size, not necessarily every PFN the primary had
populated. On Xen, writing (``scatter``) into a PFN without memory fails; so
before any write the receiver populates the PFNs the stream carries data for
and the backup lacks (``Domain.populate``, on Xen
``xc_domain_populate_physmap_exact``), as libxc's restore allocated pages for
every data-carrying PFN entry. Entries of type XTAB (holes on the primary)
carry no data and are never populated.

    Physmap(domain, pages)     probes domain.populated_pfns() once
    ensure(pfns)               populate those of ``pfns`` not yet backed;
                               returns how many were populated

Rules kept here:
- One probe per backup (a bool per PFN: 1 MiB for a 4 GiB p2m); after that
  the map is kept up to date by ``ensure`` itself.
- PFNs at or past ``pages`` are never populated (the decoder and the staging
  area refuse them first; checked again here).
- A domain without holes (the simulator's) costs one vectorised lookup per
  batch and no hypervisor call.
"""

from __future__ import annotations

import logging

import numpy as np

from xenbind.errors import DomainError
from xenbind.hypervisor import Domain

log = logging.getLogger("receiver")


class Physmap:
    def __init__(self, domain: Domain, pages: int) -> None:
        self.domain = domain
        self.pages = pages
        self.backed = np.zeros(pages, dtype=bool)
        have = np.asarray(domain.populated_pfns(), dtype=np.uint64)
        self.backed[have[have < pages].astype(np.intp)] = True
        self.initially_backed = int(self.backed.sum())
        self.populated = 0  # PFNs this map populated

    def ensure(self, pfns: np.ndarray) -> int:
        """Populate every PFN of ``pfns`` the backup has no memory at."""
        p = np.asarray(pfns, dtype=np.uint64)
        if p.size == 0:
            return 0
        if int(p.max()) >= self.pages:
            raise DomainError(
                self.domain.domid,
                "populate",
                f"PFN {int(p.max()):#x} is past the last page {self.pages - 1:#x}",
            )
        idx = p.astype(np.intp)
        missing = p[~self.backed[idx]]
        if missing.size == 0:
            return 0
        missing = np.unique(missing)
        self.domain.populate(missing)
        self.backed[missing.astype(np.intp)] = True
        self.populated += int(missing.size)
        log.debug(
            "backup domain %s: populated %d PFNs (first %#x)",
            self.domain.domid,
            missing.size,
            int(missing[0]),
        )
        return int(missing.size)
