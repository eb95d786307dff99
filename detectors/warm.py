"""Compile every detector's kernels ahead of service: ``python -m detectors.warm``.

Kernels compile on their first call (:mod:`detectors._jit`) and numba caches
the result on disk. Without this step the first worker after an install or an
edit would compile them inside its first batches, seconds late, and so would
every worker started at the same moment before one of them had written the
cache. ``make demo`` and ``make test`` run it first; with a warm cache it
only loads the compiled code.

It replays a little of the benchmark's traffic (:func:`detectors.bench.measure`),
which takes each detector through its usual paths: warm-up, repeated and
near-duplicate queries, several clients per batch. A path the replay never
takes compiles on first use instead.

Imports the detectors and their benchmark only; nothing from Kafka, Redis,
FastAPI or ``gateway``.
"""

from __future__ import annotations

import sys
import time

from detectors.bench import measure


def warm() -> float:
    """Run every detector's kernels once; returns the seconds it took."""
    began = time.perf_counter()
    measure(n_clients=6, n_queries=120, batch_size=120)
    return time.perf_counter() - began


def main() -> None:
    # A script's one line of output; ``detectors`` never configures logging.
    print(f"[kernels] detector kernels ready in {warm():.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
