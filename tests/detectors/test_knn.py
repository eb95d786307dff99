"""kNN distance: calibration from benign streams meets its target rate."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.knn import KnnDistanceDetector, KnnParams, calibrate
from tests.detectors.conftest import Digits


def _streams(rows: np.ndarray, length: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[order[i : i + length]] for i in range(0, len(rows), length)]


@pytest.mark.parametrize("target", [0.02, 0.05, 0.1])
def test_realised_false_positive_rate_is_near_the_target(
    digits: Digits, target: float
) -> None:
    # Calibrate on the training half replayed as clients, then measure on
    # fresh held-out clients the detector never saw.
    threshold = calibrate(_streams(digits.train, 100, seed=0), target)
    detector = KnnDistanceDetector(KnnParams(knn_threshold=threshold, window=100))
    streams = _streams(digits.test, 100, seed=1)
    close = 0
    judged = 0
    for i, stream in enumerate(streams):
        scores = detector.score_batch([f"b{i}"] * len(stream), stream)
        # The window is longer than a stream, so score x length counts the
        # close queries so far; the last score counts them all.
        last = scores[-1]
        close += round(last.score * len(stream))
        judged += max(len(stream) - detector.params.k, 0)
    realised = close / judged
    assert target / 2.5 <= realised <= target * 2.5, (target, realised)


def test_learn_baseline_calibrates_and_flags_a_walk(digits: Digits) -> None:
    detector = KnnDistanceDetector()
    assert detector.knn_threshold is None
    cold = detector.score_batch(["a"] * 3, digits.test[:3])
    assert not any(s.warm for s in cold)
    detector = KnnDistanceDetector()
    detector.learn_baseline(digits.train)
    assert detector.knn_threshold is not None and 0 < detector.knn_threshold < 1
    rng = np.random.default_rng(2)
    walk = np.clip(digits.test[0] + rng.normal(0, 0.02, (40, 64)), 0, 1)
    assert detector.score_batch(["w"] * 40, walk)[-1].flagged


def test_calibrate_refuses_what_it_cannot_use(digits: Digits) -> None:
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate([digits.test[:50]], 1.5)
    with pytest.raises(ValueError, match="earlier"):
        calibrate([digits.test[:3]], 0.05, k=5)
    with pytest.raises(ValueError, match="k=40 needs"):
        KnnDistanceDetector(KnnParams(k=40)).score_batch(["a"], digits.test[:1])


def test_replaying_identical_rows_is_not_close(digits: Digits) -> None:
    # An honest client cycling through 20 inputs resends exact copies; many
    # small changes of one of them (a search) are still close.
    detector = KnnDistanceDetector()
    detector.learn_baseline(digits.train)
    replay = np.vstack([digits.test[:20]] * 5)
    scores = detector.score_batch(["a"] * len(replay), replay)
    assert max(s.score for s in scores) == 0.0
    rng = np.random.default_rng(0)
    nudged = np.clip(replay[0] + rng.normal(0.0, 0.01, replay.shape), 0.0, 1.0)
    mixed = np.empty((2 * len(replay), replay.shape[1]))
    mixed[0::2], mixed[1::2] = replay, nudged
    scores = detector.score_batch(["b"] * len(mixed), mixed)
    assert scores[-1].flagged
