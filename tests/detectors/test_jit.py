"""Kernels call kernels of their own module only.

numba's on-disk cache of a kernel is keyed on its own source file, so a kernel
that called a kernel imported from another module would keep running a stale
compiled copy of it after that module was edited (seen once while building
the probing kernels: a ten times slower copy ran on)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import numba

import detectors


def _kernel_modules() -> list[str]:
    names = []
    for info in pkgutil.iter_modules(detectors.__path__, "detectors."):
        module = importlib.import_module(info.name)
        if any(
            isinstance(v, numba.core.registry.CPUDispatcher)
            for v in vars(module).values()
        ):
            names.append(info.name)
    return names


def test_some_modules_hold_kernels() -> None:
    assert len(_kernel_modules()) >= 5


def test_no_kernel_calls_a_kernel_of_another_module() -> None:
    for name in _kernel_modules():
        module = importlib.import_module(name)
        foreign = {
            attr
            for attr, value in vars(module).items()
            if isinstance(value, numba.core.registry.CPUDispatcher)
            and value.py_func.__module__ != name
        }
        tree = ast.parse(Path(module.__file__ or "").read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            decorators = {ast.unparse(d) for d in node.decorator_list}
            if "jit" not in decorators:
                continue
            called = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not called & foreign, (name, node.name, called & foreign)
