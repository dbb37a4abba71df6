"""cffi builder (API mode, out of line) for ``xenbind._xenctrl``.

Compiled against Debian's libxen-dev 4.17 headers ``<xenctrl.h>`` and
``<xenforeignmemory.h>``; linked with libxenctrl and libxenforeignmemory.
API mode means the C compiler checks every declaration below against the real
headers: a signature that drifted in a later Xen fails the build, not a
hypercall at run time.

What is bound (and why) -- the xenbind.xenctrl docstring has the full table:

    xc_interface_open / _close            the privcmd handle (NULL + ENOENT off dom0)
    xenforeignmemory_open / _close        the foreign-mapping handle
    xc_domain_getinfolist                 domain info (4.17 has no getinfo_single)
    xc_domain_pause / _unpause / _destroy
    xc_domain_resume                      end a cooperative suspend (fast=1: the
                                          guest's suspend hypercall returns 1,
                                          "cancelled", and it runs on)
    xc_domain_maximum_gpfn                highest PFN -> p2m_size = max + 1
    xc_shadow_control                     log-dirty on (ENABLE_LOGDIRTY) and OFF
    remus_dirty_new / _op / _free         our helper: CLEAN / PEEK through
                                          xc_logdirty_control (see below)
    xenforeignmemory_map / _unmap         bulk mapping of a PFN list, err[] per page
    xc_domain_hvm_getcontext / _setcontext
    xc_vcpu_getcontext                    PV vCPU context (read only)
    xc_hvm_param_get / _set               the magic PFNs (store, ioreq, bufioreq)
    xc_domain_populate_physmap_exact      give a backup domain a page it lacks

The log-dirty helper: in 4.17 ``xc_shadow_control`` takes no bitmap; the
bitmap goes through ``xc_logdirty_control(xch, domid, sop, xc_hypercall_buffer_t
*bitmap, pages, mode, stats)``, and a hypercall buffer can only be allocated
through the header's macros (DECLARE_HYPERCALL_BUFFER_SHADOW +
xc_hypercall_buffer_alloc_pages), which Python cannot expand. So the C below
keeps one hypercall buffer per domain (allocated once, sized for ``pages``
bits), runs the CLEAN or PEEK operation into it and copies the bitmap out to a
caller's buffer -- the way libxc's own save code keeps ``dirty_bitmap_hbuf``.
"""

from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    r"""
typedef ... xc_interface;
typedef ... xentoollog_logger;
typedef ... xenforeignmemory_handle;
typedef int... xen_pfn_t;
typedef int... domid_t;

/* xen_domctl_getdomaininfo (xc_domaininfo_t), the fields we read. */
typedef struct {
    domid_t  domain;
    uint32_t flags;
    uint64_t tot_pages;
    uint64_t max_pages;
    uint64_t shared_info_frame;
    uint64_t cpu_time;
    uint32_t nr_online_vcpus;
    uint32_t max_vcpu_id;
    uint8_t  handle[16];
    uint32_t cpupool;
    ...;
} xc_domaininfo_t;

typedef union { ...; } vcpu_guest_context_any_t;

#define XEN_DOMINF_dying ...
#define XEN_DOMINF_hvm_guest ...
#define XEN_DOMINF_shutdown ...
#define XEN_DOMINF_paused ...
#define XEN_DOMINF_blocked ...
#define XEN_DOMINF_running ...
#define XEN_DOMINF_shutdownmask ...
#define XEN_DOMINF_shutdownshift ...

#define XEN_DOMCTL_SHADOW_OP_OFF ...
#define XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY ...
#define XEN_DOMCTL_SHADOW_OP_CLEAN ...
#define XEN_DOMCTL_SHADOW_OP_PEEK ...

#define HVM_PARAM_STORE_PFN ...
#define HVM_PARAM_IOREQ_PFN ...
#define HVM_PARAM_BUFIOREQ_PFN ...

#define SHUTDOWN_poweroff ...
#define SHUTDOWN_reboot ...
#define SHUTDOWN_suspend ...
#define SHUTDOWN_crash ...

#define PROT_READ ...
#define PROT_WRITE ...
#define XC_PAGE_SHIFT ...

xc_interface *xc_interface_open(xentoollog_logger *logger,
                                xentoollog_logger *dombuild_logger,
                                unsigned open_flags);
int xc_interface_close(xc_interface *xch);

int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain,
                          unsigned int max_domains, xc_domaininfo_t *info);
int xc_domain_pause(xc_interface *xch, uint32_t domid);
int xc_domain_unpause(xc_interface *xch, uint32_t domid);
int xc_domain_destroy(xc_interface *xch, uint32_t domid);
int xc_domain_resume(xc_interface *xch, uint32_t domid, int fast);
int xc_domain_maximum_gpfn(xc_interface *xch, uint32_t domid, xen_pfn_t *gpfns);

int xc_shadow_control(xc_interface *xch, uint32_t domid, unsigned int sop,
                      unsigned int *mb, unsigned int mode);

int xc_domain_hvm_getcontext(xc_interface *xch, uint32_t domid,
                             uint8_t *ctxt_buf, uint32_t size);
int xc_domain_hvm_setcontext(xc_interface *xch, uint32_t domid,
                             uint8_t *hvm_ctxt, uint32_t size);
int xc_vcpu_getcontext(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                       vcpu_guest_context_any_t *ctxt);
int xc_hvm_param_get(xc_interface *handle, uint32_t dom, uint32_t param,
                     uint64_t *value);
int xc_hvm_param_set(xc_interface *handle, uint32_t dom, uint32_t param,
                     uint64_t value);
int xc_domain_populate_physmap_exact(xc_interface *xch, uint32_t domid,
                                     unsigned long nr_extents,
                                     unsigned int extent_order,
                                     unsigned int mem_flags,
                                     xen_pfn_t *extent_start);

xenforeignmemory_handle *xenforeignmemory_open(xentoollog_logger *logger,
                                               unsigned open_flags);
int xenforeignmemory_close(xenforeignmemory_handle *fmem);
void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom,
                           int prot, size_t pages,
                           const xen_pfn_t arr[], int err[]);
int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr,
                           size_t pages);

/* Our helper around xc_logdirty_control (see the module docstring). */
struct remus_dirty;
struct remus_dirty *remus_dirty_new(xc_interface *xch, unsigned long pages);
long long remus_dirty_op(xc_interface *xch, struct remus_dirty *d,
                         uint32_t domid, unsigned int sop,
                         uint8_t *out, size_t out_len,
                         uint32_t *dirty_count);
void remus_dirty_free(xc_interface *xch, struct remus_dirty *d);
size_t remus_dirty_bitmap_bytes(unsigned long pages);
"""
)

_SOURCE = r"""
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <xenctrl.h>
#include <xenforeignmemory.h>
#include <xenguest.h>   /* xc_domain_resume */

/* One log-dirty bitmap per domain, living in hypercall-safe memory.
 * Bit p of the bitmap (LSB-first within each unsigned long, so LSB-first
 * within each byte on little-endian x86) is PFN p. */
struct remus_dirty {
    xc_hypercall_buffer_t hbuf;  /* the hypercall buffer libxc tracks */
    unsigned long pages;         /* bits in the bitmap = the domain's p2m_size */
    int nr_buf_pages;            /* hypercall-buffer size in 4 KiB pages */
};

size_t remus_dirty_bitmap_bytes(unsigned long pages)
{
    /* whole unsigned longs, as Xen writes them */
    size_t bits_per_long = 8 * sizeof(unsigned long);
    return ((pages + bits_per_long - 1) / bits_per_long) * sizeof(unsigned long);
}

struct remus_dirty *remus_dirty_new(xc_interface *xch, unsigned long pages)
{
    struct remus_dirty *d;
    size_t bytes;

    if ( pages == 0 )
    {
        errno = EINVAL;
        return NULL;
    }
    d = calloc(1, sizeof(*d));
    if ( !d )
        return NULL;
    d->hbuf.hbuf = NULL;
    d->hbuf.param_shadow = NULL;
    d->hbuf.dir = 0;
    d->hbuf.sz = 0;
    d->hbuf.ubuf = (void *)-1;
    d->pages = pages;
    bytes = remus_dirty_bitmap_bytes(pages);
    d->nr_buf_pages = (int)((bytes + XC_PAGE_SIZE - 1) >> XC_PAGE_SHIFT);
    {
        DECLARE_HYPERCALL_BUFFER_SHADOW(unsigned long, bitmap, &d->hbuf);
        bitmap = xc_hypercall_buffer_alloc_pages(xch, bitmap, d->nr_buf_pages);
        if ( !bitmap )
        {
            int saved = errno;
            free(d);
            errno = saved ? saved : ENOMEM;
            return NULL;
        }
        memset(bitmap, 0, (size_t)d->nr_buf_pages << XC_PAGE_SHIFT);
    }
    return d;
}

/* Run XEN_DOMCTL_SHADOW_OP_CLEAN or _PEEK into the hypercall buffer, copy the
 * bitmap to out (out_len must hold remus_dirty_bitmap_bytes(pages)).
 * Returns what xc_logdirty_control returned (pages processed, or -1 + errno). */
long long remus_dirty_op(xc_interface *xch, struct remus_dirty *d,
                         uint32_t domid, unsigned int sop,
                         uint8_t *out, size_t out_len,
                         uint32_t *dirty_count)
{
    xc_shadow_op_stats_t stats;
    long long rc;
    size_t bytes = remus_dirty_bitmap_bytes(d->pages);

    if ( (sop != XEN_DOMCTL_SHADOW_OP_CLEAN && sop != XEN_DOMCTL_SHADOW_OP_PEEK) ||
         out_len < bytes )
    {
        errno = EINVAL;
        return -1;
    }
    memset(&stats, 0, sizeof(stats));
    rc = xc_logdirty_control(xch, domid, sop, &d->hbuf, d->pages, 0, &stats);
    if ( rc < 0 )
        return rc;
    memcpy(out, d->hbuf.hbuf, bytes);
    if ( dirty_count )
        *dirty_count = stats.dirty_count;
    return rc;
}

void remus_dirty_free(xc_interface *xch, struct remus_dirty *d)
{
    if ( !d )
        return;
    {
        DECLARE_HYPERCALL_BUFFER_SHADOW(unsigned long, bitmap, &d->hbuf);
        xc_hypercall_buffer_free_pages(xch, bitmap, d->nr_buf_pages);
    }
    free(d);
}
"""

ffibuilder.set_source(
    "xenbind._xenctrl",
    _SOURCE,
    libraries=["xenctrl", "xenguest", "xenforeignmemory", "xentoollog"],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-variable"],
)

if __name__ == "__main__":  # pragma: no cover - manual build
    ffibuilder.compile(verbose=True)
