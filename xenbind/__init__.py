"""xenbind: everything in this project that speaks Xen, and nothing else.

Modules (one job each):
    errors      the project's exception types
    stream      the legacy libxc chunk stream: encoder and decoder, sans-IO
    compress    checkpoint compression: the page cache and the codecs
    hypervisor  the Domain interface the daemons program against
    sim         the simulated hypervisor (the embedded default)
    xenctrl     cffi binding to libxenctrl + libxenforeignmemory (real Xen)
    xenstore    pyxs helpers (paths, watches, the suspend handshake)

xenbind never imports remusd or receiver.
"""

PAGE_SIZE = 4096
PAGE_SHIFT = 12
