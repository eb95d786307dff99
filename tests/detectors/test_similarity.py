"""Known answers for the query-similarity detector on digits and probing streams."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import numpy.typing as npt
import pytest

from detectors import QuerySimilarityDetector, SimilarityParams
from tests.detectors.conftest import Digits


def first_flag(detector: QuerySimilarityDetector, X: npt.NDArray[np.float64]) -> int:
    """1-based index of the first flagged query of one client, 0 if none."""
    scores = detector.score_batch(["attacker"] * len(X), X)
    return next((i + 1 for i, s in enumerate(scores) if s.flagged), 0)


def nearest_centroid(digits: Digits) -> npt.NDArray[np.float64]:
    return np.stack([digits.train[digits.y_train == c].mean(0) for c in range(10)])


def classify(centroids: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> int:
    return int(np.argmin(((centroids - x) ** 2).sum(1)))


def boundary_probe(
    digits: Digits, source: int, target: int, n: int, seed: int
) -> npt.NDArray[np.float64]:
    """A decision-based attack's queries against a nearest-centroid model.

    As HopSkipJump does: query the original and a starting adversarial image
    of another class, binary-search the segment between them for the decision
    boundary (tolerance 1e-3), probe around the boundary point with small
    random steps to estimate the gradient, and search again.
    """
    rng = np.random.default_rng(seed)
    centroids = nearest_centroid(digits)
    x, start = digits.test[source], digits.test[target]
    label = classify(centroids, x)
    queries = [x, start]
    adversarial = start
    while len(queries) < n:
        low, high = 0.0, 1.0
        while high - low > 1e-3 and len(queries) < n:
            middle = (low + high) / 2
            point = (1 - middle) * x + middle * adversarial
            queries.append(point)
            if classify(centroids, point) == label:
                low = middle
            else:
                high = middle
        boundary = (1 - high) * x + high * adversarial
        for _ in range(20):
            step = rng.normal(0, 1, x.shape)
            step *= 0.01 * np.sqrt(x.size) / np.linalg.norm(step)
            queries.append(np.clip(boundary + step, 0, 1))
        adversarial = boundary
    return np.array(queries[:n])


def test_benign_digit_streams_stay_far_below_threshold(digits: Digits) -> None:
    rng = np.random.default_rng(0)
    detector = QuerySimilarityDetector()
    worst = 0.0
    for client in range(40):
        picks = rng.choice(
            len(digits.test), size=int(rng.integers(20, 129)), replace=False
        )
        scores = detector.score_batch([f"c{client}"] * len(picks), digits.test[picks])
        assert not any(s.flagged for s in scores)
        worst = max(worst, max(s.score for s in scores))
    # Measured 0.0: no two distinct held-out digits lie within 0.076.
    assert worst <= 0.1


@pytest.mark.parametrize("seed", range(8))
def test_boundary_search_is_flagged_within_30_queries(
    digits: Digits, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    source = int(rng.integers(len(digits.test)))
    others = np.flatnonzero(digits.y_test != digits.y_test[source])
    target = int(rng.choice(others))
    X = boundary_probe(digits, source, target, n=60, seed=seed)
    flagged_at = first_flag(QuerySimilarityDetector(), X)
    assert 0 < flagged_at <= 30


@pytest.mark.parametrize("sigma", [0.005, 0.01, 0.02])
def test_small_random_perturbations_are_flagged(digits: Digits, sigma: float) -> None:
    rng = np.random.default_rng(1)
    image = digits.test[7]
    X = np.clip(image + rng.normal(0, sigma, (60, image.size)), 0, 1)
    flagged_at = first_flag(QuerySimilarityDetector(), X)
    assert 0 < flagged_at <= 15


def test_probing_hidden_among_benign_clients_is_still_flagged(digits: Digits) -> None:
    rng = np.random.default_rng(2)
    probe = boundary_probe(digits, 3, 40, n=60, seed=2)
    benign = digits.test[rng.choice(len(digits.test), size=300, replace=False)]
    ids = ["attacker"] * len(probe) + [f"b{i % 10}" for i in range(len(benign))]
    X = np.vstack([probe, benign])
    order = rng.permutation(len(ids))
    scores = QuerySimilarityDetector().score_batch([ids[i] for i in order], X[order])
    flags = {ids[i] for i, s in zip(order, scores, strict=True) if s.flagged}
    assert flags == {"attacker"}


def test_evidence_names_the_count_and_distance(digits: Digits) -> None:
    detector = QuerySimilarityDetector()
    nudged = np.clip(digits.test[:1] + 0.01, 0, 1)
    first, copy, near = detector.score_batch(
        ["a", "a", "a"], np.vstack([digits.test[[0, 0]], nudged])
    )
    assert first.evidence.endswith("this one has 0 (the first query)")
    # An exact copy is not a near-duplicate (no probe resends its input as is).
    assert copy.evidence == (
        "0 of the last 2 queries have at least 8 earlier queries within 0.05; "
        "this one has 0, the nearest 0.000 away"
    )
    assert near.evidence.startswith(
        "0 of the last 3 queries have at least 8 earlier queries within 0.05; "
        "this one has 2, the nearest 0.010 away"
    )


def reference_scores(
    params: SimilarityParams, ids: list[str], X: npt.NDArray[np.float64]
) -> list[float]:
    """Row-by-row reference: deques of stored rows and of concentrated bits."""
    history: dict[str, deque[npt.NDArray[np.float64]]] = {}
    bits: dict[str, deque[bool]] = {}
    out = []
    for client, row in zip(ids, X, strict=True):
        stored = np.rint(np.clip(row, 0, 1) * 255) / 255
        past = history.setdefault(client, deque(maxlen=params.history))
        window = bits.setdefault(client, deque(maxlen=params.window))
        distances = [np.sqrt(((stored - h) ** 2).mean()) for h in past]
        within = sum(0 < d < params.eps for d in distances)
        window.append(within >= params.min_neighbours)
        past.append(stored)
        out.append(sum(window) / len(window))
    return out


@pytest.mark.parametrize("history", [8, 20])
@pytest.mark.parametrize("seed", range(3))
def test_matches_row_by_row_reference_including_eviction(
    history: int, seed: int
) -> None:
    # A pool of 12 far-apart vectors, sent as exact copies or nudged within
    # eps, and a short history: how many earlier queries are near depends
    # exactly on which entries the ring still holds. Random cuts and a skewed
    # client mix give groups of every size on both code paths.
    rng = np.random.default_rng(seed)
    pool = rng.random((12, 16))
    n = 1200
    ids = [f"c{c}" for c in rng.choice(5, n, p=[0.6, 0.1, 0.1, 0.1, 0.1]).tolist()]
    X = pool[rng.integers(0, len(pool), n)]
    nudged = rng.random(n) < 0.5
    X[nudged] = np.clip(X[nudged] + rng.normal(0.0, 0.02, (nudged.sum(), 16)), 0, 1)
    params = SimilarityParams(history=history, window=6, min_neighbours=2)
    detector = QuerySimilarityDetector(params)
    cuts = sorted({0, n, *rng.integers(1, n, 25).tolist()})
    got: list[float] = []
    for a, b in itertools.pairwise(cuts):
        got += [s.score for s in detector.score_batch(ids[a:b], X[a:b])]
    expected = reference_scores(params, ids, X)
    assert got == expected
    assert 0 < sum(v > 0 for v in expected) < n  # both outcomes occur


def test_wide_inputs_keep_fewer_queries_within_budget() -> None:
    detector = QuerySimilarityDetector()
    assert detector.capacity(64) == 64
    assert detector.capacity(1000) == (32_768 - 50 - 40) // 1004
    rng = np.random.default_rng(0)
    detector.score_batch(["w"] * 40, rng.random((40, 1000)))
    blob = detector.dump_state("w")
    assert blob is not None and len(blob) <= 32_768
    with pytest.raises(ValueError, match="max_state_bytes"):
        QuerySimilarityDetector().score_batch(["w"], rng.random((1, 5000)))


def test_mutable_eps_applies_to_the_next_query(digits: Digits) -> None:
    detector = QuerySimilarityDetector(SimilarityParams(min_neighbours=1))
    detector.score_batch(["a"], digits.test[:1])
    nudged = np.clip(digits.test[:1] + 0.07, 0, 1)
    assert detector.score_batch(["a"], nudged)[0].score == 0.0
    detector.set_params(eps=0.2)
    further = np.clip(digits.test[:1] + 0.09, 0, 1)
    assert detector.score_batch(["a"], further)[0].score == pytest.approx(1 / 3)


def test_replaying_identical_rows_is_not_probing(digits: Digits) -> None:
    # An honest client cycling through its data resends exact copies; a probe
    # that changes its input a little is still counted.
    rows = digits.test[:20]
    replay = np.vstack([rows] * 5)
    scores = QuerySimilarityDetector().score_batch(["a"] * len(replay), replay)
    assert max(s.score for s in scores) == 0.0
    # A search around one of them, interleaved with the same exact copies.
    rng = np.random.default_rng(0)
    probe = np.clip(rows[0] + rng.normal(0.0, 0.01, replay.shape), 0, 1)
    interleaved = np.empty((2 * len(replay), replay.shape[1]))
    interleaved[0::2], interleaved[1::2] = replay, probe
    scores = QuerySimilarityDetector().score_batch(
        ["b"] * len(interleaved), interleaved
    )
    assert scores[-1].flagged
