"""Per-model calibration of the detectors from a reference sample
(detectors.calibration), on the evaluation's tabular data and on digits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from detectors import Detector, build_detectors
from detectors.calibration import calibrate, stream_maxima
from gateway.models import ModelSignature, TensorSpec, digits_split
from gateway.validation import feature_scale
from gateway.zoo import breast_cancer_split, declared_range, phishing_split

Array = np.ndarray[Any, Any]


def build(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Detector[Any]]:
    return build_detectors(overrides, seed=0)


def scaled(name: str) -> tuple[Array, Array]:
    """(reference, held-out) rows of a zoo dataset on the detectors' scale,
    as the worker scales them."""
    split = {"breast_cancer": breast_cancer_split, "phishing": phishing_split}[name]()
    low, high = declared_range(np.concatenate([split.x_train, split.x_test]))
    n = split.x_train.shape[1]
    sig = ModelSignature(
        name=name,
        version="1",
        inputs=(TensorSpec("features", "FP32", (-1, n), low, high),),
        outputs=(TensorSpec("probabilities", "FP32", (-1, 2)),),
        classes=(0, 1),
    )
    scale = feature_scale(sig, split.x_train)
    return scale.apply(split.x_train), scale.apply(split.x_test)


def flagged_share(
    params: Mapping[str, Mapping[str, Any]], reference: Array, held_out: Array
) -> float:
    """Share of 40 fresh honest streams (held-out rows, each in its own random
    order, cycled to 240 queries) flagged by any detector at any query."""
    rng = np.random.default_rng(123)
    streams = [
        held_out[np.resize(rng.permutation(len(held_out)), 240)] for _ in range(40)
    ]
    # Only the detectors calibration calibrates: those scoring the model's
    # answers or arrival times see neither in a simulated stream.
    detectors = {
        name: d
        for name, d in build(params).items()
        if not (d.observes_outputs or d.observes_outcomes)
    }
    for detector in detectors.values():
        detector.learn_baseline(reference)
    maxima = stream_maxima(detectors, streams)
    hit = np.zeros(len(streams), dtype=bool)
    for name, detector in detectors.items():
        hit |= maxima[name] >= detector.params.threshold
    return float(hit.mean())


@pytest.mark.parametrize("name", ["breast_cancer", "phishing"])
def test_calibrated_detectors_meet_the_target_on_fresh_honest_streams(
    name: str,
) -> None:
    reference, held_out = scaled(name)
    result = calibrate(build, {}, reference, target_fpr=0.01)
    # Defaults flagged 20% or more of these streams when calibration was
    # written; since ood and structure judge counts against honest rates and
    # prada chooses its scale from the reference, 12.5% (breast cancer) and
    # 0% (phishing). Calibrated, the held-out streams stay within the 1%
    # target plus a tolerance of one stream in 40 (six detectors, each
    # calibrated at 1%).
    assert flagged_share(result.params, reference, held_out) <= 0.01 + 1 / 40


def test_digits_keep_their_measured_defaults() -> None:
    # The defaults were measured on digits: calibration must leave them.
    x_train, _, _, _ = digits_split()
    result = calibrate(build, {}, x_train / 16.0)
    assert result.params == {}


def test_operator_overrides_are_never_changed_and_thresholds_only_rise() -> None:
    reference, _ = scaled("breast_cancer")
    overrides = {"prada": {"threshold": 0.05, "eps": 0.05}}
    result = calibrate(build, overrides, reference)
    assert "threshold" not in result.params.get("prada", {})
    assert "eps" not in result.params.get("prada", {})
    defaults = build({})
    for detector, changes in result.params.items():
        if "threshold" in changes:
            assert changes["threshold"] > defaults[detector].params.threshold
        if "eps" in changes:
            assert changes["eps"] < defaults[detector].params.eps


def test_eps_is_lowered_below_the_references_distinct_distances() -> None:
    # Breast cancer's rows lie closer to each other (per feature) than digits:
    # the near-duplicate radius follows, so two distinct honest rows are not
    # near-duplicates.
    reference, _ = scaled("breast_cancer")
    result = calibrate(build, {}, reference)
    assert 0.0 < result.params["similarity"]["eps"] < 0.05
    assert result.params["prada"]["eps"] == result.params["similarity"]["eps"]
