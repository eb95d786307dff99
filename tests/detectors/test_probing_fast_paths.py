"""The shortcuts behind the cheaper probing detectors give what the plain
computation gives, including where they must fall back to it: distances
shared between ``similarity`` and ``knn`` only when their histories agree,
and windows pushed together only when their counters agree."""

from __future__ import annotations

import numpy as np

from detectors._probehist import push_windows
from detectors._state import group_rows, push_window
from detectors.knn import KnnDistanceDetector, KnnParams
from detectors.similarity import QuerySimilarityDetector


def _probe_stream(seed: int, n: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.random((4, 16))
    which = rng.integers(0, 4, n)
    X = np.clip(centres[which] + rng.normal(0.0, 0.02, (n, 16)), 0.0, 1.0)
    return [f"c{w}" for w in which.tolist()], X


def _knn_alone(ids: list[str], X: np.ndarray, parts: list[slice]) -> list[float]:
    knn = KnnDistanceDetector(KnnParams(knn_threshold=0.05))
    return [s.score for part in parts for s in knn.score_batch(ids[part], X[part])]


def test_knn_with_a_diverged_similarity_scores_as_alone() -> None:
    """similarity saw an extra batch first, so its histories differ from
    knn's: knn must not take its distances."""
    ids, X = _probe_stream(0, 400)
    parts = [slice(i, i + 50) for i in range(0, 400, 50)]
    want = _knn_alone(ids, X, parts)

    similarity = QuerySimilarityDetector()
    knn = KnnDistanceDetector(KnnParams(knn_threshold=0.05))
    extra_ids, extra = _probe_stream(1, 30)
    similarity.score_batch(extra_ids, extra)
    got = []
    for part in parts:
        similarity.score_batch(ids[part], X[part])
        got += [s.score for s in knn.score_batch(ids[part], X[part])]
    assert got == want


def test_knn_after_similarity_forgot_a_client_scores_as_alone() -> None:
    ids, X = _probe_stream(2, 300)
    parts = [slice(i, i + 60) for i in range(0, 300, 60)]
    want = _knn_alone(ids, X, parts)

    similarity = QuerySimilarityDetector()
    knn = KnnDistanceDetector(KnnParams(knn_threshold=0.05))
    got = []
    for i, part in enumerate(parts):
        if i == 2:
            similarity.forget("c1")
        similarity.score_batch(ids[part], X[part])
        got += [s.score for s in knn.score_batch(ids[part], X[part])]
    assert got == want


def test_push_windows_matches_push_window_also_when_counters_differ() -> None:
    rng = np.random.default_rng(3)
    window, slots_n = 7, 5
    for same in (True, False):
        rings = [rng.integers(0, 2, (slots_n, window)).astype(np.uint8) for _ in "ab"]
        pos = [rng.integers(0, window, slots_n) for _ in "ab"]
        length = [np.full(slots_n, window, dtype=np.int64) for _ in "ab"]
        if same:
            pos[1] = pos[0].copy()
        slots = rng.integers(0, slots_n, 40)
        groups = group_rows(slots)
        bits = [rng.random(40) < 0.5 for _ in "ab"]
        ref = [
            (r.copy(), p.copy(), n.copy())
            for r, p, n in zip(rings, pos, length, strict=True)
        ]
        want = [push_window(*ref[i], groups, bits[i]) for i in range(2)]
        counts, lengths = push_windows(
            list(zip(rings, pos, length, strict=True)), groups, bits
        )
        for i in range(2):
            assert np.array_equal(counts[i], want[i][0])
            assert np.array_equal(lengths, want[i][1])
            assert np.array_equal(rings[i], ref[i][0])
            assert np.array_equal(pos[i], ref[i][1])
