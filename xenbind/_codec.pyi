# Type stub for xenbind._codec, the codecs' C kernel (a cffi API-mode module
# built by xenbind/_codec_build.py from xenbind/compress/kernel.h/.c).
#
# cffi modules carry no types; this stub gives the kernel's entry points and
# structs real signatures for the type checker, at no runtime cost (the
# compress modules call ``lib`` directly, as before). It must follow
# kernel.h: tests/xenbind/compress/test_kernel_stub.py compares the two.
#
# C types map as: integer types -> int; pointers -> CData (a cffi pointer:
# ``ffi.from_buffer`` (a CArray), ``ffi.new`` or ``ffi.NULL``).

from typing import Any, Literal, final, overload

import numpy as np
from typing_extensions import Buffer

class CData:
    """A cffi pointer (opaque to Python)."""

@final
class CArray(CData):
    """A cffi array over a Python buffer (``ffi.from_buffer``)."""

    def __len__(self) -> int: ...

@final
class XbCache(CData):
    """``xb_cache *``: the LRU cache's storage and counters (kernel.h)."""

    data: CData
    pfn: CData
    prev: CData
    next: CData
    table: CData
    cap: int
    used: int
    head: int
    tail: int
    tmask: int
    hits: int
    misses: int
    evictions: int
    zero_base: int

@final
class XbError(CData):
    """``xb_error *``: where and why a decode failed (kernel.h)."""

    code: int
    offset: int
    page: int
    detail: int

@final
class CType:
    """What ``ffi.typeof`` answers (only what the tests read)."""

    cname: str
    kind: str
    args: tuple[CType, ...]  # a function's
    result: CType  # a function's
    fields: list[tuple[str, CField]]  # a struct's

@final
class CField:
    type: CType
    offset: int

@final
class _FFI:
    NULL: CData
    def typeof(self, cdecl: object, /) -> CType: ...  # a C type name, CData or lib function
    @overload
    def new(self, cdecl: Literal["xb_cache *"]) -> XbCache: ...
    @overload
    def new(self, cdecl: Literal["xb_error *"]) -> XbError: ...
    @overload
    def new(self, cdecl: str, init: Any, /) -> CData: ...  # an array, initialised
    def from_buffer(
        self,
        cdecl: str,
        python_buffer: Buffer | np.ndarray[Any, Any],
        require_writable: bool = ...,
    ) -> CArray: ...

@final
class _Lib:
    def xb_max_encoded(self, codec: int, /) -> int: ...
    def xb_cache_slot(self, c: XbCache, pfn: int, /) -> int: ...
    def xb_encode(
        self,
        c: XbCache,
        codec: int,
        pfns: CData,
        pages: CData,
        pt: CData,
        n: int,
        out: CData,
        zknown: CData,
        zbits: int,
        /,
    ) -> int: ...
    def xb_note_raw(
        self, zknown: CData, zbits: int, pfns: CData, pages: CData, n: int, /
    ) -> int: ...
    def xb_scan(
        self,
        codec: int,
        in_: CData,
        len: int,
        npfns: int,
        max_pages: int,
        starts: CData,
        delta: CData,
        e: XbError,
        /,
    ) -> int: ...
    def xb_apply(
        self,
        codec: int,
        in_: CData,
        len: int,
        starts: CData,
        delta: CData,
        k: int,
        out: CData,
        rows: int,
        e: XbError,
        /,
    ) -> int: ...
    def xb_decode_from(
        self,
        codec: int,
        in_: CData,
        len: int,
        npfns: int,
        max_pages: int,
        srcs: CData,
        src_rows: CData,
        nsrc: int,
        pfns: CData,
        seg: CData,
        row: CData,
        out: CData,
        rows: int,
        delta: CData,
        e: XbError,
        /,
    ) -> int: ...
    def xb_gather(self, src: CData, rows: int, idx: CData, n: int, out: CData, /) -> int: ...

ffi: _FFI
lib: _Lib
