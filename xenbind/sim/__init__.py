"""The simulated Xen host: the embedded default hypervisor (see docs/simulator.md).

Modules (one job each):
    host        the host process: creates, lists, destroys domains (one per DIR)
    worker      one domain's process: memory, workload, pause, output buffer
    client      SimHypervisor / SimDomain: the xenbind.hypervisor interface
    dirty       log-dirty: userfaultfd async write-protect + PAGEMAP_SCAN, or a bitmap
    workloads   seeded, resumable guest workloads and their registers
    ledger      the ledger guest's memory layout, its disk journal and its checker
    disk        disks: sizes, images, the block server's argv, the guest's NBD client
    outputs     the guest output buffer (the plug qdisc's barrier/release)
    layout      the host directory's files and the status page
    postmortem  digest / outputs / ledger-check / disk-check from DIR alone
    __main__    the command line
"""
