"""Compiled kernels: the one place ``detectors`` meets numba.

The per-query budget (20 µs of one core for every detector together, issue 3)
is below what chains of numpy calls reach on gateway-sized batches: each call
walks every row and allocates a temporary, and a detector needs dozens. A loop
compiled with numba does the same arithmetic in one pass without them.
Kernels live beside the detector that uses them, decorated with :func:`jit`;
this module only fixes how they are compiled.

Kernels are compiled on their first call and cached on disk beside the module
(``__pycache__``, or numba's user cache where that is read-only), so only the
first process after an install or an edit pays the compile. numba keys that
cache on the kernel's own source file only, so a kernel calls kernels of its
own module and no other: one calling into another file would keep running a
stale compiled copy after that file changed
(``tests/detectors/test_jit.py`` checks this). ``NUMBA_DISABLE_JIT=1``
runs them as plain Python, for a debugger; that is far slower, never for service.

Imports numba and typing only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., Any])


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
