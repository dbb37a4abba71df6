"""Build hook: everything is in pyproject.toml except the cffi extensions.

- xenbind/_codec_build.py (if present): the codec's small C kernel; always built.
- xenbind/_xenctrl_build.py: the binding to libxenctrl/libxenforeignmemory
  (API mode, compiled against the real headers). Built only where Debian's
  libxen-dev is installed; without it the install still succeeds and the
  simulator serves.
"""

import os

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
modules = []
if os.path.exists(os.path.join(here, "xenbind", "_codec_build.py")):
    modules.append("xenbind/_codec_build.py:ffibuilder")
if all(
    os.path.exists(f"/usr/include/{h}") for h in ("xenctrl.h", "xenforeignmemory.h")
) and os.path.exists(os.path.join(here, "xenbind", "_xenctrl_build.py")):
    modules.append("xenbind/_xenctrl_build.py:ffibuilder")

setup(cffi_modules=modules)
