"""Hostile but accepted inputs must not break the compiled detector kernels.

Found by fuzzing every detector under ``NUMBA_BOUNDSCHECK=1`` (numba checks
no index otherwise): arrival times and loaded states that pass validation
but hold values no honest stream produces. What a batch must never do is
raise (the worker answers INTERNAL for every request of that batch) or
leave a shared baseline that makes every later batch raise.
"""

from __future__ import annotations

import numpy as np
import pytest

from detectors._state import StateBlob, decode_blob, encode_blob
from detectors.traffic import TrafficDetector


def _steady_times(n: int, start_s: float = 1.7e9) -> np.ndarray:
    return start_s + np.arange(n) * 0.25


def test_traffic_huge_arrival_times_do_not_poison_the_baseline() -> None:
    """Times far apart (finite, so ``score_batch`` takes them) once made a
    window's burstiness the largest float; learned into the shared baseline,
    every later judgement of every client became NaN (ArithmeticError)."""
    detector = TrafficDetector()
    n = 2000
    X = np.zeros((n, 2))
    rng = np.random.default_rng(0)
    wild = rng.choice([-1e300, 1e300, 0.0, 1e-300, 1.7e9], n)
    detector.score_batch(["hostile"] * n, X, arrival_s=wild)
    ids = [f"honest-{i % 4}" for i in range(n)]
    scores = detector.score_batch(ids, X, arrival_s=_steady_times(n))
    assert all(np.isfinite(s.score) for s in scores)
    means, stds = zip(*detector.baseline().values(), strict=True)
    assert np.isfinite(means).all() and np.isfinite(stds).all()


@pytest.mark.parametrize("value", [1e300, -1e300, np.nan, np.inf])
def test_traffic_refuses_a_state_with_absurd_times(value: float) -> None:
    """A stored ring of times no clock gives (the checks read only its
    counters) made the next judged window's features infinite."""
    detector = TrafficDetector()
    n = 64
    detector.score_batch(["c"] * n, np.zeros((n, 2)), arrival_s=_steady_times(n))
    blob = decode_blob(detector.dump_state("c") or b"")
    times = np.frombuffer(blob.fields["times"], dtype="<f8").copy()
    times[::2] = value
    fields = {**blob.fields, "times": times.tobytes()}
    hostile = encode_blob(
        StateBlob(blob.format, blob.detector, blob.n_features, blob.layout, fields)
    )
    with pytest.raises(ValueError, match="times"):
        detector.load_state("c", hostile)


def test_traffic_state_with_kafka_extreme_times_still_loads() -> None:
    """Kafka's largest record time (2**63 - 1 ms) stays a loadable state."""
    detector = TrafficDetector()
    n = 40
    top_s = (2**63 - 1) / 1000.0
    times = top_s - np.arange(n)[::-1] * 0.001
    detector.score_batch(["c"] * n, np.zeros((n, 2)), arrival_s=times)
    detector.load_state("c", detector.dump_state("c") or b"")
