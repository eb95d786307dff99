"""Compile every detector's kernels ahead of service: ``python -m detectors.warm``.

Kernels compile on their first call (:mod:`detectors._jit`) and numba caches
the result on disk. Without this step the first worker after an install or an
edit would compile them inside its first batches, seconds late, and so would
every worker started at the same moment before one of them had written the
cache. ``make demo`` and ``make test`` run it first; with a warm cache it
only loads the compiled code.

A gateway worker calls :func:`ensure_warm` before it consumes, however it
was started (``modelgate serve``, the image, a test): it warms up only when
the cache is stale or missing (:func:`detectors._jit.warm_needed`, about a
millisecond to decide), so a worker on a warm cache starts as fast as before.

It replays a little of the benchmark's traffic (:func:`detectors.bench.measure`),
which takes each detector through its usual paths: warm-up, repeated and
near-duplicate queries, several clients per batch. A path the replay never
takes compiles on first use instead.

Imports the detectors and their benchmark only; nothing from Kafka, Redis,
FastAPI or ``gateway``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

from detectors._jit import PACKAGE, mark_warm, warm_key, warm_needed
from detectors.bench import measure

logger = logging.getLogger(__name__)

# Set once this process has warmed up or found the cache warm: kernels are
# then compiled or loadable, and stay so for the process's life. The lock
# makes workers started together in one process (tests) warm up once.
_ready = False
_ready_lock = threading.Lock()


def warm(package: Path = PACKAGE) -> float:
    """Run every detector's kernels once, then record that the cache holds
    them (:func:`detectors._jit.mark_warm`); returns the seconds it took."""
    began = time.perf_counter()
    key = warm_key(package)
    measure(n_clients=6, n_queries=120, batch_size=120)
    mark_warm(package, key)
    return time.perf_counter() - began


def ensure_warm(package: Path = PACKAGE) -> float:
    """Warm up unless this process already did or the cache is warm; blocks,
    so call it off an event loop.

    Returns
    -------
    float
        Seconds spent warming up: 0 when nothing was needed.
    """
    global _ready
    with _ready_lock:
        if _ready:
            return 0.0
        began = time.perf_counter()
        if not warm_needed(package):
            _ready = True
            logger.debug(
                "detector kernels cached",
                extra={"check_s": round(time.perf_counter() - began, 4)},
            )
            return 0.0
        logger.info("detector kernel cache stale or missing: warming up")
        seconds = warm(package)
        _ready = True
        logger.info(
            "detector kernels warmed up in %.1f s",
            seconds,
            extra={"seconds": round(seconds, 3)},
        )
        return seconds


def main() -> None:
    # A script's one line of output; ``detectors`` never configures logging.
    print(f"[kernels] detector kernels ready in {warm():.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
