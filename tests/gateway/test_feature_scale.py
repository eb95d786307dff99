"""Per-feature scaling of queries for the detectors (gateway.validation)."""

from __future__ import annotations

import numpy as np

from gateway.models import ModelSignature, TensorSpec
from gateway.validation import feature_scale, scale_to_unit


def _signature(n: int, low: float | None, high: float | None) -> ModelSignature:
    return ModelSignature(
        name="m",
        version="1",
        inputs=(TensorSpec("features", "FP32", (-1, n), low, high),),
        outputs=(TensorSpec("probabilities", "FP32", (-1, 2)),),
        classes=(0, 1),
    )


def test_features_filling_the_declared_range_keep_it() -> None:
    # Digits-like: most features span the declared range, so the detectors see
    # exactly what the single declared range gave them before.
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 17, size=(200, 8)).astype(np.float32)
    reference[:, 0] = 0.0  # an always-blank pixel does not change the rule
    sig = _signature(8, 0.0, 16.0)
    scale = feature_scale(sig, reference)
    assert scale.source == "declared"
    rows = rng.uniform(0, 16, size=(5, 8))
    assert np.array_equal(scale.apply(rows), scale_to_unit(rows, sig))


def test_wide_and_narrow_features_each_fill_the_unit_interval() -> None:
    # Breast-cancer-like: one feature 0..4000 wide, one 0.05..0.1 wide, under a
    # single declared range 0..4200.
    rng = np.random.default_rng(1)
    reference = np.column_stack(
        [rng.uniform(100, 4000, 300), rng.uniform(0.05, 0.1, 300)]
    )
    scale = feature_scale(_signature(2, 0.0, 4200.0), reference)
    assert scale.source == "reference"
    x = scale.apply(reference)
    # Each feature spreads over most of [0, 1] (5% margin each side) ...
    assert np.all(np.ptp(x, axis=0) > 0.85)
    # ... where the declared range left the narrow one in 1e-5 of it.
    declared = scale_to_unit(reference, _signature(2, 0.0, 4200.0))
    assert np.ptp(declared[:, 1]) < 1e-4
    # Values beyond the reference clip to the ends, never outside [0, 1].
    far = scale.apply(np.array([[4200.0, 0.0], [0.0, 4200.0]]))
    assert far.min() >= 0.0 and far.max() <= 1.0
    assert far[0, 1] == 0.0 and far[1, 1] == 1.0


def test_a_constant_feature_falls_back_to_the_declared_span() -> None:
    rng = np.random.default_rng(2)
    reference = np.column_stack(
        [rng.uniform(0, 10, 100), rng.uniform(0, 0.1, 100), np.full(100, 3.0)]
    )
    scale = feature_scale(_signature(3, 0.0, 1000.0), reference)
    assert scale.source == "reference"
    assert np.all(scale.span > 0)
    assert scale.span[2] == 1000.0
    # The constant value maps to 0; a change of it moves by its share of the
    # declared range, not to a full-range jump.
    x = scale.apply(np.array([[5.0, 0.05, 3.0], [5.0, 0.05, 13.0]]))
    assert x[0, 2] == 0.0 and abs(x[1, 2] - 0.01) < 1e-12
    assert np.all(np.isfinite(x))


def test_without_a_usable_reference_or_range() -> None:
    rows = np.array([[1.0, 2.0]])
    # No declared range: rows pass through.
    assert feature_scale(_signature(2, None, None), rows).source == "none"
    assert np.array_equal(
        feature_scale(_signature(2, None, None), None).apply(rows), rows
    )
    # No reference, or the wrong width: the declared range.
    assert feature_scale(_signature(2, 0.0, 4.0), None).source == "declared"
    wrong = np.zeros((10, 3))
    assert feature_scale(_signature(2, 0.0, 4.0), wrong).source == "declared"
