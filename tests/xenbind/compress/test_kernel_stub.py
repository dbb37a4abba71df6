"""xenbind/_codec.pyi (the type stub of the cffi kernel) follows kernel.h.

The stub is what the type checker believes of xenbind._codec; the compiled
module is what runs. Same functions with the same number of arguments, same
struct fields: a kernel.h change that forgets the stub fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import xenbind
from xenbind._codec import ffi, lib

STUB = Path(xenbind.__file__).with_name("_codec.pyi")


def _classes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _methods(cls: ast.ClassDef) -> dict[str, int]:
    """Method name -> positional arguments after self."""
    return {
        f.name: len(f.args.posonlyargs) + len(f.args.args) - 1
        for f in cls.body
        if isinstance(f, ast.FunctionDef)
    }


def _fields(cls: ast.ClassDef) -> list[str]:
    return [
        node.target.id
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    ]


def test_stub_declares_every_kernel_function_with_its_arity() -> None:
    stub = _methods(_classes()["_Lib"])
    real = {name: len(ffi.typeof(getattr(lib, name)).args) for name in dir(lib)}
    assert stub == real


def test_stub_structs_have_the_kernel_fields() -> None:
    classes = _classes()
    for cname, pyname in (("xb_cache", "XbCache"), ("xb_error", "XbError")):
        real = [name for name, _ in ffi.typeof(cname).fields]
        assert _fields(classes[pyname]) == real, cname
