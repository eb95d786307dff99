"""Cost of each detector: µs of one core per query and bytes of state per client.

``modelgate bench detectors`` calls :func:`measure`. Traffic is replayed
scikit-learn digits (the demo model's data), interleaved across clients and cut
into gateway-sized batches, so the numbers reflect what a worker pays.

Imports numpy, scikit-learn (for the digits only), threadpoolctl (a
scikit-learn dependency) and the detectors; nothing from Kafka, Redis, FastAPI
or ``gateway``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from detectors.base import MAX_STATE_BYTES, Detector
from detectors.registry import build_detectors


def _digits() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Reference (70%) and traffic (30%) halves of digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    X = np.asarray(load_digits().data, dtype=np.float64) / 16.0
    order = np.random.default_rng(0).permutation(len(X))
    cut = int(0.7 * len(X))
    return X[order[:cut]], X[order[cut:]]


def measure(
    n_clients: int = 100,
    n_queries: int = 200,
    *,
    batch_size: int = 500,
    seed: int = 0,
    runs: int = 1,
) -> dict[str, Any]:
    """Time every registered detector on the same interleaved traffic.

    Parameters
    ----------
    n_clients
        Clients sending queries at once.
    n_queries
        Queries each client sends; the total is ``n_clients * n_queries``.
    batch_size
        Rows per ``score_batch`` call, as a worker's poll would gather them.
    seed
        Seed of the traffic and of the detectors.
    runs
        Times the whole replay is timed, each with fresh detectors; the
        figures are medians over runs (the machine is shared and loaded).

    Returns
    -------
    dict
        ``n_clients``, ``n_queries``, ``batch_size``, ``runs``,
        ``total_us_per_query`` (sum over detectors), ``total_state_bytes``
        (sum over detectors of their largest per-client state: what one
        client costs the whole suite at most) and per detector:
        ``us_per_query`` (median over runs of the CPU time of ``score_batch``
        over all batches divided by the queries, with one BLAS thread;
        evidence sentences are formatted only when read, so are not in it),
        ``runs_us_per_query`` (every run), ``wall_us_per_query`` (the same in
        wall time, which includes waiting for a busy machine),
        ``state_bytes_per_client`` (largest ``state_nbytes``),
        ``dump_bytes_per_client`` (largest serialised state) and
        ``within_budget`` (both at most 32 KB).

    Examples
    --------
    >>> result = measure(n_clients=2, n_queries=5)
    >>> len(result["detectors"])
    9
    """
    if n_clients < 1 or n_queries < 1 or batch_size < 1 or runs < 1:
        raise ValueError("n_clients, n_queries, batch_size and runs must be positive")
    rng = np.random.default_rng(seed)
    reference, traffic = _digits()

    # Each client replays held-out digits; clients interleave at random, as
    # one partition's poll mixes them.
    client_of_row = rng.permutation(np.repeat(np.arange(n_clients), n_queries))
    rows = traffic[rng.integers(0, len(traffic), len(client_of_row))]
    ids = [f"client-{c}" for c in client_of_row.tolist()]
    # Arrival times (seconds) for the timing detector: the interleaved rows
    # arrive 1 ms apart on average.
    arrival_s = 1.7e9 + np.cumsum(rng.exponential(0.001, len(ids)))
    # A stand-in model's answers for the detectors that read them: a fixed
    # random linear map with a softmax over 10 classes.
    logits = (rows - 0.3) @ rng.normal(0.0, 1.0, (rows.shape[1], 10))
    proba = np.exp(logits - logits.max(axis=1, keepdims=True))
    proba /= proba.sum(axis=1, keepdims=True)

    report: dict[str, Any] = {
        "n_clients": n_clients,
        "n_queries": n_queries,
        "batch_size": batch_size,
        "runs": runs,
        "detectors": {},
    }
    cpu: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    # One BLAS thread: the budget is per core, and on a busy machine OpenBLAS
    # threads spinning on small products cost up to 40x (measured: a 256 x 64
    # product took 10 ms threaded under load, 0.23 ms on one thread).
    with threadpool_limits(limits=1):
        # One untimed pass over the first batches with throwaway detectors: a
        # kernel not yet in numba's on-disk cache compiles on its first call,
        # seconds that service never pays per query (workers warm up first).
        warm = min(len(ids), 2 * batch_size)
        _time_batches(
            _fresh(reference, seed),
            ids[:warm],
            rows[:warm],
            batch_size,
            arrival_s[:warm],
            proba[:warm],
        )
        for _ in range(runs):
            detectors = _fresh(reference, seed)
            timed = _time_batches(detectors, ids, rows, batch_size, arrival_s, proba)
            for name, (cpu_s, wall_s) in timed.items():
                cpu.setdefault(name, []).append(cpu_s / len(ids) * 1e6)
                wall.setdefault(name, []).append(wall_s / len(ids) * 1e6)
    for name in detectors:
        report["detectors"][name] = {
            "us_per_query": float(np.median(cpu[name])),
            "runs_us_per_query": cpu[name],
            "wall_us_per_query": float(np.median(wall[name])),
        }
    for name, detector in detectors.items():
        clients = detector.clients()
        state = max(detector.state_nbytes(c) for c in clients)
        dump = max(len(detector.dump_state(c) or b"") for c in clients)
        report["detectors"][name] |= {
            "state_bytes_per_client": state,
            "dump_bytes_per_client": dump,
            "within_budget": state <= MAX_STATE_BYTES and dump <= MAX_STATE_BYTES,
        }
    report["total_us_per_query"] = sum(
        entry["us_per_query"] for entry in report["detectors"].values()
    )
    report["total_state_bytes"] = sum(
        entry["state_bytes_per_client"] for entry in report["detectors"].values()
    )
    return report


def _fresh(reference: npt.NDArray[np.float64], seed: int) -> dict[str, Detector[Any]]:
    """Every detector, new, with its baselines learned from ``reference``."""
    detectors = build_detectors({}, seed=seed)
    for detector in detectors.values():
        detector.learn_baseline(reference)
        if detector.observes_outputs:
            ref_logits = (reference - 0.3) @ np.ones((reference.shape[1], 10))
            detector.learn_output_baseline(reference, _softmax(ref_logits))
    return detectors


def _softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _time_batches(
    detectors: dict[str, Detector[Any]],
    ids: list[str],
    rows: npt.NDArray[np.float64],
    batch_size: int,
    arrival_s: npt.NDArray[np.float64],
    proba: npt.NDArray[np.float64],
) -> dict[str, tuple[float, float]]:
    """Per detector, CPU seconds and wall seconds spent in ``score_batch``
    and, for the detectors that use them, in ``observe_outputs`` and
    ``observe_outcomes``.

    Batch by batch, every detector in registry order, as the worker calls
    them (``gateway.scoring``), so caches and memory are as warm or cold as
    in service.
    """
    spent = dict.fromkeys(detectors, (0.0, 0.0))
    for start in range(0, len(ids), batch_size):
        batch_ids = ids[start : start + batch_size]
        batch = rows[start : start + batch_size]
        for name, detector in detectors.items():
            cpu_began = time.process_time()
            wall_began = time.perf_counter()
            detector.score_batch(
                batch_ids, batch, arrival_s=arrival_s[start : start + batch_size]
            )
            if detector.observes_outputs:
                detector.observe_outputs(
                    batch_ids, batch, proba[start : start + batch_size]
                )
            if detector.observes_outcomes:
                ok = np.zeros(len(batch_ids), dtype=bool)
                detector.observe_outcomes(batch_ids, ok, ok)
            cpu_s, wall_s = spent[name]
            spent[name] = (
                cpu_s + time.process_time() - cpu_began,
                wall_s + time.perf_counter() - wall_began,
            )
    return spent


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
