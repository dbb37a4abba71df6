"""cffi build script (API mode) for xenbind._codec, the codecs' C kernel.

setup.py builds it on every install (`ffibuilder` below). The C source lives
in xenbind/compress/kernel.c, where its layout and rules are written down;
its declarations are in xenbind/compress/kernel.h, read here as the cdef;
this file only compiles it with -O2.
"""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNEL = os.path.join(_HERE, "compress", "kernel.c")

#: The declarations Python calls, shared with kernel.c (one copy).
with open(os.path.join(_HERE, "compress", "kernel.h"), encoding="utf-8") as _h:
    CDEF = _h.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
with open(_KERNEL, encoding="utf-8") as _f:
    ffibuilder.set_source(
        "xenbind._codec",
        _f.read(),
        include_dirs=[os.path.dirname(_KERNEL)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    )

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
