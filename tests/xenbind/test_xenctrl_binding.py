"""xenbind.xenctrl off a dom0: the binding compiles, loads, binds every symbol
the module calls, refuses to open with a clear error, and validates arguments
before any hypercall. (On a dom0, tests/xenbind/test_xenctrl_dom0.py runs instead.)"""

from __future__ import annotations

import ast
import errno
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import cast

import numpy as np
import pytest

from xenbind import PAGE_SIZE, xenctrl
from xenbind.errors import DomainError, HypervisorUnavailable

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEADERS = all(os.path.exists(f"/usr/include/{h}") for h in ("xenctrl.h", "xenforeignmemory.h"))
IN_CI = os.environ.get("CI", "").lower() == "true"
ON_DOM0 = os.path.exists(xenctrl.PRIVCMD_DEVICE)


def _need_binding():
    if not xenctrl.binding_available():
        if HEADERS or IN_CI:
            pytest.fail(f"xenbind._xenctrl did not load: {xenctrl.binding_import_error()}")
        pytest.skip("libxen-dev headers absent: binding not built")


def test_binding_compiles_and_loads():
    if not (HEADERS or IN_CI):
        pytest.skip("libxen-dev headers absent (/usr/include/xenctrl.h): binding not built")
    import xenbind._xenctrl as mod  # must not fail where the headers exist (or in CI)

    assert mod.lib.XC_PAGE_SHIFT == 12
    assert xenctrl.binding_available()


def test_every_symbol_the_module_needs_is_bound():
    _need_binding()
    lib = xenctrl._lib
    missing = [
        s for s in xenctrl.REQUIRED_SYMBOLS + xenctrl.REQUIRED_CONSTANTS if not hasattr(lib, s)
    ]
    assert not missing, f"not bound in xenbind._xenctrl: {missing}"


def test_symbol_list_covers_every_lib_use_in_the_module():
    """Every ``_lib.NAME`` (and getattr(_lib, "HVM_PARAM_...")) in xenctrl.py
    is in REQUIRED_SYMBOLS/CONSTANTS, so the test above cannot go stale."""
    tree = ast.parse((ROOT / "xenbind" / "xenctrl.py").read_text())
    used = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "_lib"
        ):
            used.add(node.attr)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("HVM_PARAM_")
        ):
            used.add(node.value)
    listed = set(xenctrl.REQUIRED_SYMBOLS) | set(xenctrl.REQUIRED_CONSTANTS)
    assert used - listed == set(), f"used but not listed: {sorted(used - listed)}"


def test_c_types_match_what_the_module_assumes():
    _need_binding()
    ffi = xenctrl._ffi
    assert ffi.sizeof("xen_pfn_t") == 8  # PFN arrays are passed as uint64 buffers
    assert ffi.sizeof("int") == np.dtype(np.intc).itemsize  # err[] buffer
    assert ffi.sizeof("xc_domaininfo_t") >= 100  # the real struct, not our subset
    assert ffi.sizeof("vcpu_guest_context_any_t") > 1000
    lib = xenctrl._lib
    assert lib.XEN_DOMCTL_SHADOW_OP_CLEAN == 11 and lib.XEN_DOMCTL_SHADOW_OP_PEEK == 12
    assert (lib.HVM_PARAM_IOREQ_PFN, lib.HVM_PARAM_BUFIOREQ_PFN, lib.HVM_PARAM_STORE_PFN) == (
        5,
        6,
        1,
    )


def test_dirty_helper_sizes_and_refusals():
    _need_binding()
    lib, ffi = xenctrl._lib, xenctrl._ffi
    # whole unsigned longs, as Xen writes the bitmap
    assert [lib.remus_dirty_bitmap_bytes(n) for n in (1, 64, 65, 262144)] == [8, 8, 16, 32768]
    # zero pages is refused before the handle is touched (NULL handle here)
    assert lib.remus_dirty_new(ffi.NULL, 0) == ffi.NULL
    assert ffi.errno == errno.EINVAL


@pytest.mark.skipif(ON_DOM0, reason="this machine is a dom0")
def test_open_off_dom0_names_the_missing_device():
    _need_binding()
    with pytest.raises(HypervisorUnavailable) as ei:
        xenctrl.XenHypervisor()
    assert "/dev/xen/privcmd" in str(ei.value) and "not a Xen dom0" in str(ei.value)
    from xenbind.factory import open_hypervisor

    with pytest.raises(HypervisorUnavailable):
        open_hypervisor(None)


@pytest.mark.skipif(ON_DOM0, reason="this machine is a dom0")
def test_xc_interface_open_itself_fails_cleanly_off_dom0(capfd):
    """The real library call (not our pre-check): NULL + ENOENT -> clear error."""
    _need_binding()
    with pytest.raises(HypervisorUnavailable) as ei:
        xenctrl.open_xc()
    msg = str(ei.value)
    assert "xc_interface_open" in msg and "ENOENT" in msg and "not a Xen dom0" in msg
    capfd.readouterr()  # libxencall's own complaint on stderr


def test_import_without_the_compiled_module_then_opening_says_so():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "xenbind._xenctrl":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        from xenbind import xenctrl
        from xenbind.errors import HypervisorUnavailable
        assert not xenctrl.binding_available()
        try:
            xenctrl.XenHypervisor()
        except HypervisorUnavailable as e:
            print(e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "was not built" in out.stdout and "libxen-dev" in out.stdout


def _xen_bitmap(pages: int, pfns: list[int]) -> np.ndarray:
    """A bitmap laid out the way Xen writes it: unsigned longs, bit p = PFN p."""
    words = np.zeros((pages + 63) // 64, dtype=np.uint64)
    for p in pfns:
        words[p // 64] |= np.uint64(1) << np.uint64(p % 64)
    return words.view(np.uint8)


def test_dirty_bitmap_decoding():
    pages = 1000
    want = [0, 1, 7, 8, 63, 64, 65, 511, 998, 999]
    got = xenctrl.dirty_bitmap_to_pfns(_xen_bitmap(pages, want), pages)
    assert got.dtype == np.uint64 and got.tolist() == want
    # bits past the domain's last page (bitmap padding) are ignored
    bm = _xen_bitmap(1024, [999, 1000, 1023])
    assert xenctrl.dirty_bitmap_to_pfns(bm, 1000).tolist() == [999]
    assert xenctrl.dirty_bitmap_to_pfns(np.zeros(16, np.uint8), 128).size == 0
    with pytest.raises(ValueError):
        xenctrl.dirty_bitmap_to_pfns(np.zeros(8, np.uint8), 65)


def test_check_pfns_refuses_before_any_hypercall():
    ok = xenctrl.check_pfns(3, "gather", np.array([0, 5, 15], dtype=np.uint64), 16)
    assert ok.dtype == np.uint64 and ok.flags.c_contiguous
    assert xenctrl.check_pfns(3, "gather", np.array([], dtype=np.uint64), 16).size == 0
    cases = [
        (np.array([1, 16], dtype=np.uint64), "past the domain's last page"),
        (np.array([-1], dtype=np.int64), "negative PFN"),
        (np.array([[1]], dtype=np.uint64), "1-D"),
        (np.array([1.0]), "integers"),
    ]
    for pfns, text in cases:
        with pytest.raises(DomainError) as ei:
            xenctrl.check_pfns(3, "gather", pfns, 16)
        assert text in str(ei.value) and "domain 3" in str(ei.value)


def _offline_domain(pages: int) -> xenctrl.XenDomain:
    """A XenDomain whose handles are NULL: any call that reached libxc would
    crash, so a DomainError proves validation ran first."""
    _need_binding()

    class NoHandles:
        xch = xenctrl._ffi.NULL
        fmem = xenctrl._ffi.NULL

    d = xenctrl.XenDomain.__new__(xenctrl.XenDomain)
    d._hv, d.domid, d.pages = cast(xenctrl.XenHypervisor, NoHandles()), 9, pages
    d._dirty, d._dirty_buf, d._netbuf = xenctrl._ffi.NULL, None, None
    return d


def test_gather_scatter_validate_pfns_and_buffers_first():
    d = _offline_domain(pages=8)
    out = np.zeros((2, PAGE_SIZE), dtype=np.uint8)
    with pytest.raises(DomainError, match="past the domain's last page"):
        d.gather(np.array([1, 8], dtype=np.uint64), out)
    with pytest.raises(DomainError, match="past the domain's last page"):
        d.scatter(np.array([9], dtype=np.uint64), out)
    with pytest.raises(DomainError, match="holds 2 pages, 3 PFNs"):
        d.gather(np.array([1, 2, 3], dtype=np.uint64), out)
    with pytest.raises(DomainError, match="uint8 of shape"):
        d.gather(np.array([1], dtype=np.uint64), np.zeros((1, 100), dtype=np.uint8))
    ro = np.zeros((1, PAGE_SIZE), dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(DomainError, match="read-only"):
        d.gather(np.array([1], dtype=np.uint64), ro)
    d.gather(np.array([], dtype=np.uint64), out)  # nothing to map: no call at all
    with pytest.raises(DomainError, match="log-dirty mode is not enabled"):
        d.read_and_clear_dirty()


def test_format_uuid():
    h = bytes(range(16))
    assert xenctrl.format_uuid(h) == "00010203-0405-0607-0809-0a0b0c0d0e0f"


def test_suspend_ack_timeout_from_the_environment(monkeypatch):
    """REMUS_XEN_SUSPEND_ACK_S overrides the 10 s a guest has to acknowledge a
    checkpoint's suspend; a value that is not a sane number of seconds is
    refused with a message naming the variable (read without a hypercall)."""
    dom = cast(xenctrl.XenDomain, object.__new__(xenctrl.XenDomain))
    dom.domid = 7
    monkeypatch.delenv(xenctrl.SUSPEND_ACK_ENV, raising=False)
    assert dom._suspend_ack_timeout() == xenctrl.SUSPEND_ACK_TIMEOUT == 10.0
    monkeypatch.setenv(xenctrl.SUSPEND_ACK_ENV, "30")
    assert dom._suspend_ack_timeout() == 30.0
    for bad in ("", "soon", "0", "-5", "nan", "1e9"):
        monkeypatch.setenv(xenctrl.SUSPEND_ACK_ENV, bad)
        with pytest.raises(DomainError, match="REMUS_XEN_SUSPEND_ACK_S"):
            dom._suspend_ack_timeout()
