"""Compiled kernels: the one place ``detectors`` meets numba.

The per-query budget (20 µs of one core for every detector together, issue 3)
is below what chains of numpy calls reach on gateway-sized batches: each call
walks every row and allocates a temporary, and a detector needs dozens. A loop
compiled with numba does the same arithmetic in one pass without them.
Kernels live beside the detector that uses them, decorated with :func:`jit`;
this module only fixes how they are compiled and when their cache is stale.

Kernels are compiled on their first call and cached on disk beside the module
(``__pycache__``), so only the first process after an install or an edit pays
the compile. numba keys each cached kernel on its own source file only: a
kernel that calls a kernel of another module (``detectors._numpysum``) would
keep running a stale compiled copy of it after that module changed. So on
import this module compares a digest of every kernel module's source with the
one the cache was built from and, when they differ, drops the package's
cached kernels (:func:`drop_stale_kernels`). An edit of any kernel module thus
recompiles them all, once.

Where ``__pycache__`` is read-only (an installed image), nothing is dropped:
its files do not change after the build that compiled them. With
``NUMBA_CACHE_DIR`` set, numba caches elsewhere and this check does not reach
that cache. ``NUMBA_DISABLE_JIT=1`` runs kernels as plain Python, for a
debugger; that is far slower, never for service.

Imports numba and the standard library only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., Any])

_STAMP = "modelgate-kernels.digest"
"""File in ``__pycache__`` naming the sources the cached kernels came from."""

_MARK = b"@jit\n"
"""How a kernel module is recognised: it decorates a function with ``jit``."""


def kernel_digest(package: Path) -> str:
    """SHA-256 over the name and source of every kernel module in ``package``."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        source = path.read_bytes()
        if _MARK in source:
            digest.update(path.name.encode() + b"\0" + source + b"\0")
    return digest.hexdigest()


def drop_stale_kernels(package: Path) -> bool:
    """Delete numba's cached kernels in ``package/__pycache__`` unless they
    were built from the kernel sources there now; True when it deleted.

    Two processes starting together may both delete and both recompile;
    that costs time, never a stale kernel, since numba recompiles whatever
    it finds missing.
    """
    cache = package / "__pycache__"
    stamp = cache / _STAMP
    wanted = kernel_digest(package)
    try:
        if stamp.read_text() == wanted:
            return False
    except OSError:
        pass  # no stamp yet: whatever is cached may predate it
    try:
        cache.mkdir(exist_ok=True)
        for cached in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
            cached.unlink(missing_ok=True)
        partial = cache / f"{_STAMP}.{os.getpid()}"
        partial.write_text(wanted)
        partial.replace(stamp)
    except OSError:
        return False  # read-only: see the module docstring
    return True


def jit(function: F) -> F:
    """Compile ``function`` to machine code with numba's ``njit``.

    ``cache=True`` keeps the compiled code across processes (workers restart
    often, and a cold compile costs a second or more per kernel). ``nogil``
    lets the gateway run scoring off the event loop in a thread. No
    ``fastmath``: kernels must give the same floats as the numpy code they
    replace, so pinned scores and thresholds keep their meaning; and no
    ``parallel``: the budget is per core, and workers scale by process.
    """
    return cast(F, numba.njit(cache=True, nogil=True)(function))


drop_stale_kernels(Path(__file__).resolve().parent)
