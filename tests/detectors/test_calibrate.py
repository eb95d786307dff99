"""Thresholds from benign replay hit the target false-positive rate."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.linear_model import LogisticRegression

from detectors.calibrate import benign_replay, threshold_for, thresholds
from detectors.registry import build_detectors
from tests.detectors.conftest import Digits


def test_threshold_for_leaves_target_share_at_or_above() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(10_000)
    for fpr in (0.001, 0.01, 0.1):
        value = threshold_for(scores, fpr)
        assert value is not None
        assert np.mean(scores >= value) <= fpr
        assert np.mean(scores >= value) > fpr * 0.9
    # Honest scores all 0: any positive threshold flags nobody.
    assert threshold_for(np.zeros(50), 0.01) == pytest.approx(1e-3)
    assert threshold_for(np.array([]), 0.01) is None
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_for(scores, 0.0)


def test_calibrated_thresholds_hold_on_fresh_honest_clients(digits: Digits) -> None:
    model = LogisticRegression(max_iter=2000).fit(digits.train, digits.y_train)

    def answers(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(model.predict_proba(rows), dtype=np.float64)

    names = ("coverage", "margin", "traffic")

    def fresh() -> dict[str, object]:
        built = build_detectors({}, seed=0)
        chosen = {n: built[n] for n in names}
        for detector in chosen.values():
            detector.learn_baseline(digits.train)
            detector.learn_output_baseline(digits.train, answers(digits.train))
        return chosen  # type: ignore[return-value]

    target = 0.05
    first = fresh()
    replay = benign_replay(
        first, digits.test, answers, n_clients=12, n_queries=150, seed=1
    )  # type: ignore[arg-type]
    found = thresholds(first, replay, target)  # type: ignore[arg-type]
    assert set(found) == set(names)
    for name in names:
        assert np.mean(replay.scores[name] >= found[name]) <= target

    again = fresh()
    check = benign_replay(
        again, digits.test, answers, n_clients=12, n_queries=150, seed=2
    )  # type: ignore[arg-type]
    for name in names:
        rate = float(np.mean(check.scores[name] >= found[name]))
        # Per-client scores are correlated over time, so a fresh sample of 12
        # clients varies; within four times the target is what it guarantees.
        assert rate <= 4 * target, (name, rate, found[name])


def test_a_detector_silent_on_honest_traffic_keeps_its_threshold() -> None:
    """All honest scores 0: the floor threshold would flag any score, so no
    threshold is suggested for it."""
    from detectors.calibrate import Replay, silent
    from detectors.registry import build_detectors

    detectors = build_detectors({}, seed=0)
    scores = {name: np.zeros(200) for name in detectors}
    scores["traffic"] = np.linspace(0.0, 0.5, 200)
    replay = Replay(scores=scores, n_clients=2, n_queries=100)
    assert "traffic" not in silent(replay, 0.01)
    assert set(silent(replay, 0.01)) == set(detectors) - {"traffic"}
    assert set(thresholds(detectors, replay, 0.01)) == {"traffic"}
