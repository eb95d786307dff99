"""A model with fewer features than ``fingerprint``'s window still gets every
detector: the window narrows to the model's features instead of the worker
failing at start."""

from __future__ import annotations

import numpy as np
import pytest

from detectors import build_detectors
from gateway.scoring import fit_to_features


def test_small_models_get_windows_as_wide_as_their_rows() -> None:
    assert fit_to_features({}, 4, "m") == {"fingerprint": {"width": 4}}
    operator = {"fingerprint": {"width": 5, "k": 8}, "ood": {"threshold": 0.9}}
    fitted = fit_to_features(operator, 3, "m")
    assert fitted == {"fingerprint": {"width": 3, "k": 8}, "ood": {"threshold": 0.9}}
    assert operator["fingerprint"]["width"] == 5  # not changed in place


def test_wide_enough_models_keep_the_overrides_as_they_are() -> None:
    assert fit_to_features({}, 64, "m") == {}
    operator = {"fingerprint": {"width": 4}}
    assert fit_to_features(operator, 4, "m") == operator


@pytest.mark.parametrize("n_features", [1, 2, 4])
def test_every_detector_learns_and_scores_rows_of_a_small_model(
    n_features: int,
) -> None:
    rng = np.random.default_rng(n_features)
    reference = rng.random((400, n_features))
    with pytest.raises(ValueError, match="fewer than width"):
        build_detectors({}, seed=0)["fingerprint"].learn_baseline(reference)
    detectors = build_detectors(fit_to_features({}, n_features, "m"), seed=0)
    rows = rng.random((50, n_features))
    for detector in detectors.values():
        detector.learn_baseline(reference)
        scores = detector.score_batch([f"c{i % 5}" for i in range(50)], rows)
        assert len(scores) == 50
        assert all(np.isfinite(s.score) for s in scores)
