"""The shortcuts behind the cheaper probing detectors give what the plain
computation gives: ``knn`` scores the same whatever ``similarity`` saw
before it (each computes its own distances), windows pushed row by row
count as ``push_window`` does, also with counters a loaded state may hold,
and rows quantise and steps round to float16 as numpy does."""

from __future__ import annotations

import numpy as np
import pytest

from detectors._history import neighbours_and_push, ring_fields
from detectors._probehist import _from_half, _to_half, push_bits, quantise
from detectors._state import SlotArena, group_rows, push_window
from detectors.knn import KnnDistanceDetector, KnnParams
from detectors.similarity import QuerySimilarityDetector, SimilarityParams


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


def test_push_bits_matches_push_window_also_with_a_misplaced_window() -> None:
    """Row by row in arrival order gives push_window's counts, lengths and
    ring, for full windows at any position and for short windows whose
    entries do not start at index 0 (a loaded state's counters are only
    range-checked)."""
    rng = np.random.default_rng(3)
    window, n_slots, n = 7, 6, 60
    ring = rng.integers(0, 2, (n_slots, window)).astype(np.uint8)
    pos = rng.integers(0, window, n_slots)
    length = np.array([window, window, 0, 3, 5, 1], dtype=np.int64)
    slots = rng.integers(0, n_slots, n)
    bits = rng.random(n) < 0.5
    groups = group_rows(slots)
    ref = (ring.copy(), pos.copy(), length.copy())
    want_counts, want_lengths = push_window(*ref, groups, bits[groups.order])

    arrays = {
        "w": ring,
        "w_pos": pos,
        "w_len": length,
        "n_seen": np.full(n_slots, 10, dtype=np.int64),
    }
    counts, lengths, seen = push_bits(arrays, "w", slots, bits)
    assert np.array_equal(counts[groups.order], want_counts)
    assert np.array_equal(lengths[groups.order], want_lengths)
    for array, want in zip((ring, pos, length), ref, strict=True):
        assert np.array_equal(array, want)
    assert np.array_equal(seen[groups.order], 10 + groups.position + 1)
    assert np.array_equal(arrays["n_seen"], 10 + np.bincount(slots, minlength=n_slots))


def test_steps_round_to_float16_as_numpy_does() -> None:
    """Every finite float16 reads back as numpy widens it, and float64
    values (ties, subnormals, carries into the exponent, both signs) round
    to the bits ``astype(np.float16)`` gives."""
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    finite = patterns[np.isfinite(patterns.view(np.float16))]
    values = np.empty(len(finite))
    _from_half(finite, values)
    want = finite.view(np.float16).astype(np.float64)
    assert np.array_equal(values.view(np.int64), want.view(np.int64))  # signed 0

    rng = np.random.default_rng(5)
    exact = want[np.abs(want) <= 2.0]
    ties = (exact[:-1] + exact[1:]) / 2.0  # halfway between neighbours
    x = np.concatenate(
        [
            rng.uniform(-1.0, 1.0, 20_000),
            rng.uniform(-1.0, 1.0, 20_000) * 2.0**-14,  # subnormal results
            np.ldexp(rng.uniform(0.5, 1.0, 2_000), rng.integers(-40, 2, 2_000)),
            ties,
            np.nextafter(ties, 0.0),
            np.nextafter(ties, 3.0),
            exact,
            [0.0, -0.0, 1.0, -1.0, 2.0**-25, 2.0**-26, 65504.0, 65520.0],
        ]
    )
    bits = np.empty(len(x), dtype=np.uint16)
    _to_half(x, bits)
    with np.errstate(over="ignore"):  # 65520 rounds to infinity, as meant
        want_bits = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(bits, want_bits)


def test_quantise_matches_the_numpy_formula() -> None:
    """Clipped, times 255, rounded half to even: also exactly halfway
    between two levels and outside [0, 1]."""
    rng = np.random.default_rng(6)
    halfway = (np.arange(255) + 0.5) / 255.0
    X = np.concatenate(
        [rng.uniform(-0.5, 1.5, 4096), halfway, np.nextafter(halfway, 2.0)]
    ).reshape(-1, 2)
    want = np.rint(np.clip(X, 0.0, 1.0) * 255).astype(np.uint8)
    assert np.array_equal(quantise(X), want)


def test_similarity_refuses_rows_too_wide_to_sum_exactly() -> None:
    detector = QuerySimilarityDetector(SimilarityParams(max_state_bytes=1 << 20))
    assert detector.capacity(33_025) >= 8
    with pytest.raises(ValueError, match="33025 whose distances"):
        detector.capacity(33_026)


def _nearest_after(ring: list[list[int]], batch: list[list[int]]) -> np.ndarray:
    """The nearest earlier query ``neighbours_and_push`` gives the last row
    of ``batch`` (one client) after ``ring`` was pushed as its own batches."""
    arena = SlotArena(ring_fields(4, 4), initial_slots=1)
    for row in ring:
        stored = np.asarray([row], dtype=np.uint8)
        neighbours_and_push(arena.arrays, group_rows(np.zeros(1, np.int64)), stored, 1)
    slots = np.zeros(len(batch), dtype=np.int64)
    stored = np.asarray(batch, dtype=np.uint8)
    found = neighbours_and_push(arena.arrays, group_rows(slots), stored, 3)
    assert found.k_dist[-1, 0] == np.sqrt(4 / (255 * 255 * 4))  # every tie: 2**2
    return found.nearest[-1]


def test_equally_near_queries_resolve_in_the_documented_order() -> None:
    """Ties go to the ring as the chunk found it, by physical index, before
    the client's earlier rows of the chunk, latest first (what structure's
    pinned scores were recorded with)."""
    q, a, b = [10, 10, 10, 10], [12, 10, 10, 10], [10, 12, 10, 10]
    c, d = [10, 10, 8, 10], [10, 10, 10, 8]
    assert list(_nearest_after([a, b], [q])) == a
    assert list(_nearest_after([b], [c, q])) == b
    assert list(_nearest_after([], [c, d, q])) == d
