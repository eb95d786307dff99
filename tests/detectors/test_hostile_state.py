"""Hostile but accepted inputs must not break the compiled detector kernels.

Found by fuzzing every detector under ``NUMBA_BOUNDSCHECK=1`` (numba checks
no index otherwise): arrival times and loaded states that pass validation
but hold values no honest stream produces. What a batch must never do is
raise (the worker answers INTERNAL for every request of that batch) or
leave a shared baseline that makes every later batch raise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detectors import Detector, build_detectors
from detectors._state import StateBlob, decode_blob, encode_blob
from detectors.margin import MarginDetector
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


# Per detector, the per-client counters a stored state holds.
_COUNTERS = {
    "similarity": ("n_seen",),
    "knn": ("n_seen",),
    "structure": ("n_seen",),
    "prada": ("n_seen", "n_tests", "tested_at", "tested_n", "gs_count"),
    "fingerprint": ("n_seen",),
    "ood": ("n_seen",),
    "coverage": ("n_seen", "n_answers"),
    "margin": ("n_answers",),
    "traffic": ("n_seen",),
}


@pytest.fixture(scope="module")
def warm_states() -> dict[str, tuple[Detector[Any], StateBlob]]:
    """Each detector with a baseline, and the state of a client that sent
    sixty queries and had them answered."""
    rng = np.random.default_rng(0)
    reference = np.rint(rng.random((300, 8)) * 16) / 16
    proba = rng.dirichlet(np.ones(4), 300)
    out: dict[str, tuple[Detector[Any], StateBlob]] = {}
    for name, detector in build_detectors({}, seed=0).items():
        detector.learn_baseline(reference)
        detector.learn_output_baseline(reference, proba)
        ids = ["c"] * 60
        detector.score_batch(ids, reference[:60], arrival_s=_steady_times(60))
        detector.observe_outputs(ids, reference[:60], proba[:60])
        out[name] = (detector, decode_blob(detector.dump_state("c") or b""))
    return out


@pytest.mark.parametrize(
    ("name", "field"),
    [(name, field) for name, fields in _COUNTERS.items() for field in fields],
)
def test_a_counter_that_would_wrap_is_refused(
    warm_states: dict[str, tuple[Detector[Any], StateBlob]], name: str, field: str
) -> None:
    """A counter at int64's largest value passed every check, then wrapped to
    negative on the next query: the client turned cold for good and its next
    dump was refused on hand-over."""
    detector, blob = warm_states[name]
    top = np.array(np.iinfo(np.int64).max, dtype="<i8").tobytes()
    fields = {**blob.fields, field: top}
    hostile = encode_blob(
        StateBlob(blob.format, blob.detector, blob.n_features, blob.layout, fields)
    )
    with pytest.raises(ValueError, match=r"state counter '\w+' is out of range"):
        detector.load_state("other", hostile)
    # The unmodified state still loads.
    detector.load_state("other", encode_blob(blob))


def test_margin_refuses_an_opening_statistic_no_window_gives() -> None:
    """Mann-Kendall S of at most ``window`` answers is at most
    ``window * (window - 1) / 2``; larger ones passed the check (only
    finiteness was), and the pooled S of a cohort holding +1.7e308 and
    -1.7e308 summed to NaN: every batch with a member raised."""
    detector = MarginDetector()
    rng = np.random.default_rng(0)
    X = rng.random((20, 4))
    ids = ["young"] * 20
    detector.score_batch(ids, X, arrival_s=np.full(20, 1000.0))
    detector.observe_outputs(ids, X, rng.dirichlet(np.ones(3), 20))
    blob = decode_blob(detector.dump_state("young") or b"")
    loaded = 0
    for i, s in enumerate([1.7e308, -1.7e308] * 8):
        fields = {**blob.fields, "open_s": np.array(s).tobytes()}
        hostile = encode_blob(
            StateBlob(blob.format, blob.detector, blob.n_features, blob.layout, fields)
        )
        try:
            detector.load_state(f"k{i}", hostile)
            loaded += 1
        except ValueError as exc:
            assert "open_s" in str(exc)
    scores = detector.score_batch(
        ["young", "k0", "k1"], X[:3], arrival_s=np.full(3, 1000.0)
    )
    assert all(np.isfinite(s.score) for s in scores)
    assert loaded == 0


_EDGE_ROWS = {
    "zeros": np.zeros((40, 8)),
    "ones": np.ones((40, 8)),
    "negative zero": np.full((40, 8), -0.0),
    "subnormal": np.full((40, 8), 5e-324),
    "just outside": np.resize([-1e-12, 1.0 + 1e-12], (40, 8)),
    # A model declaring no range gets its rows unscaled, up to float32's top.
    "float32 top": np.resize([3.4e38, -3.4e38, 0.5], (40, 8)),
    "1e300": np.resize([1e300, -1e300], (40, 8)),
}


@pytest.mark.parametrize("rows", list(_EDGE_ROWS), ids=list(_EDGE_ROWS))
def test_every_detector_scores_edge_values(rows: str) -> None:
    """Values at and beyond the edges of [0, 1], from one client and from
    one client per row, with arrival times equal or going back: every
    detector gives finite scores and a state it loads again. Under
    ``NUMBA_BOUNDSCHECK=1`` this also checks every index the kernels use."""
    rng = np.random.default_rng(1)
    reference = np.rint(rng.random((300, 8)) * 16) / 16
    X = _EDGE_ROWS[rows]
    proba = np.resize([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], (len(X), 3))
    for detector in build_detectors({}, seed=0).values():
        detector.learn_baseline(reference)
        detector.learn_output_baseline(reference, rng.dirichlet(np.ones(3), 300))
        for ids, times in [
            (["one"] * len(X), np.full(len(X), 1.7e9)),
            ([f"c{i}" for i in range(len(X))], 1.7e9 - np.arange(len(X))),
        ]:
            scores = detector.score_batch(ids, X, arrival_s=times)
            assert all(np.isfinite(s.score) for s in scores), detector.name
            detector.observe_outputs(ids, X, proba)
            detector.observe_outcomes(ids, [True] * len(X), [False] * len(X))
        for client in ("one", "c0"):
            detector.load_state(client, detector.dump_state(client) or b"")
