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

Whether a process would compile anything is decided here too, cheaply
(:func:`warm_needed`): :mod:`detectors.warm` leaves a second stamp once it
has run every kernel, naming everything numba keys a cached kernel on (the
kernel sources' digest, size and modification time, numba's and Python's
versions, the CPU). While that stamp matches, the cache holds the kernels
and a worker skips the warm-up; otherwise it warms up before it consumes.

Where ``__pycache__`` is read-only (an installed image), nothing is dropped:
its files do not change after the build that compiled them. numba will not
use a cache it cannot write, though, and with no writable place at all (a
package and home directory the process may not write, as in the container
image, which therefore sets ``NUMBA_CACHE_DIR``) :func:`jit` compiles without
a cache rather than let numba fail the import: every process then compiles
its kernels on first use. With
``NUMBA_CACHE_DIR`` set, numba caches elsewhere and this check does not reach
that cache. ``NUMBA_DISABLE_JIT=1`` runs kernels as plain Python, for a
debugger; that is far slower, never for service.

Imports numba (and its llvmlite, for the CPU name) and the standard library
only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numba
from llvmlite import binding as llvm  # type: ignore[import-untyped]  # no stubs

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger(__name__)

_uncached: set[str] = set()
"""Source files whose kernels found no writable cache (warned once each)."""

_STAMP = "modelgate-kernels.digest"
"""File in ``__pycache__`` naming the sources the cached kernels came from."""

_MARK = b"@jit\n"
"""How a kernel module is recognised: it decorates a function with ``jit``."""

_WARM_STAMP = "modelgate-kernels.warm"
"""File in ``__pycache__`` naming what the last complete warm-up compiled for."""

PACKAGE = Path(__file__).resolve().parent
"""The ``detectors`` package directory, whose ``__pycache__`` holds the kernels."""


def kernel_digest(package: Path) -> str:
    """SHA-256 over the name and source of every kernel module in ``package``."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        source = path.read_bytes()
        if _MARK in source:
            digest.update(path.name.encode() + b"\0" + source + b"\0")
    return digest.hexdigest()


def warm_key(package: Path) -> str:
    """What numba's cached kernels in ``package`` are valid for, as one line
    per fact.

    numba recompiles a cached kernel when its module's size or modification
    time differs from the cache index's, when its own version differs, and
    for another CPU, and finds nothing in another cache directory; the
    digest covers the calls between kernel modules (see the module
    docstring). A cache directory emptied under the same name (a tmpfs) is
    not noticed: its first process compiles on first use. Reading it costs
    one ``stat`` and one read per module of ``package`` (about a millisecond
    for ``detectors``).
    """
    lines = [
        f"digest {kernel_digest(package)}",
        f"numba {numba.__version__}",
        f"python {sys.version.split()[0]} {sys.implementation.cache_tag}",
        f"cpu {platform.machine()} {llvm.get_host_cpu_name()}",
        # Where numba keeps them (NUMBA_CACHE_DIR, empty for beside the
        # sources): a stamp written for one cache says nothing of another.
        f"cache {getattr(numba.config, 'CACHE_DIR', '')}",
    ]
    for path in sorted(package.glob("*.py")):
        if _MARK in path.read_bytes():
            st = path.stat()
            lines.append(f"{path.name} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(lines) + "\n"


def warm_needed(package: Path = PACKAGE) -> bool:
    """True unless a complete warm-up already compiled ``package``'s kernels
    for exactly these sources, numba, Python and CPU (:func:`mark_warm`).

    False means a process finds every kernel the warm-up ran in numba's cache
    and only loads it on first call; a kernel path the warm-up never takes
    still compiles on first use.
    """
    try:
        # Bytes, not text: a stamp that does not decode (a torn write, junk)
        # is only stale, never an error that fails a worker's start.
        stamp = (package / "__pycache__" / _WARM_STAMP).read_bytes()
    except OSError:
        return True  # never warmed, or the stamp is unreadable
    return stamp != warm_key(package).encode()


def mark_warm(package: Path = PACKAGE, key: str | None = None) -> bool:
    """Record that every kernel of ``package`` has just run (so is cached);
    False when ``__pycache__`` is read-only and nothing was recorded.

    ``key`` is :func:`warm_key` as read before the kernels ran (default: now),
    so a source edited during the warm-up leaves a stamp that no longer
    matches it.
    """
    cache = package / "__pycache__"
    partial = cache / f"{_WARM_STAMP}.{os.getpid()}"
    try:
        cache.mkdir(exist_ok=True)
        partial.write_text(warm_key(package) if key is None else key)
        partial.replace(cache / _WARM_STAMP)
    except OSError:
        # E.g. the stamp's name taken by a directory: no file left behind
        # per process that tried.
        with contextlib.suppress(OSError):  # read-only: nothing was written
            partial.unlink(missing_ok=True)
        return False
    return True


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
        # Bytes: a stamp that is not text must not fail the package import.
        if stamp.read_bytes() == wanted.encode():
            return False
    except OSError:
        pass  # no stamp yet: whatever is cached may predate it
    try:
        cache.mkdir(exist_ok=True)
        # The warm stamp first: a crash part way leaves a cache that a
        # worker warms up again rather than trusts.
        (cache / _WARM_STAMP).unlink(missing_ok=True)
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
    try:
        return cast(F, numba.njit(cache=True, nogil=True)(function))
    except RuntimeError as exc:
        # numba looks for a cache directory it can write when the kernel is
        # decorated, and without one refuses the import outright.
        if "no locator available" not in str(exc):
            raise
    source = function.__code__.co_filename
    if source not in _uncached:
        _uncached.add(source)
        logger.warning(
            "no writable numba cache for %s: its kernels compile in every "
            "process (set NUMBA_CACHE_DIR to a directory this user may write)",
            source,
            extra={"source": source},
        )
    return cast(F, numba.njit(nogil=True)(function))


drop_stale_kernels(PACKAGE)
