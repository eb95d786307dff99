"""The Scorer adapts its detectors to each model: per-feature scales for
tabular inputs, calibrated parameters, operator overrides kept."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.backends import ModelBackend
from gateway.config import load_settings
from gateway.metrics import WorkerMetrics
from gateway.models import load_model
from gateway.scoring import Scorer
from gateway.validation import scale_to_unit
from gateway.zoo import BREAST_CANCER, PHISHING, ensure_model


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelBackend]:
    directory = tmp_path_factory.mktemp("zoo")
    for name in (BREAST_CANCER, PHISHING):
        ensure_model(directory, name)
    return {name: load_model(directory, name) for name in (BREAST_CANCER, PHISHING)}


def test_each_model_gets_its_scale_and_calibration(
    tabular: dict[str, ModelBackend],
) -> None:
    scorer = Scorer(load_settings(), tabular, WorkerMetrics())
    cancer = tabular[BREAST_CANCER]
    # Breast cancer: per-feature scales, so a narrow feature spreads over
    # [0, 1] instead of collapsing near 0 under the declared 0..4466.7.
    scaled = scorer._scales[BREAST_CANCER].apply(cancer.reference)
    declared = scale_to_unit(cancer.reference, cancer.signature)
    assert scorer._scales[BREAST_CANCER].source == "reference"
    assert np.ptp(scaled, axis=0).min() > 0.8
    assert np.ptp(declared, axis=0).min() < 0.001
    # Phishing fills its declared range: kept.
    assert scorer._scales[PHISHING].source == "declared"
    # Calibrated parameters reach the running detectors of that model only.
    similarity = scorer._detectors[BREAST_CANCER]["similarity"]
    assert similarity.params.eps < 0.05
    assert scorer._detectors[PHISHING]["similarity"].params.eps == 0.05
    prada = scorer._detectors[PHISHING]["prada"]
    assert prada.params.threshold == scorer.calibrations[PHISHING].params.get(
        "prada", {}
    ).get("threshold", 0.10)


def test_operator_overrides_win_over_calibration(
    tabular: dict[str, ModelBackend],
) -> None:
    settings = load_settings().model_copy(
        update={"detectors": {"similarity": {"eps": 0.04}}}
    )
    scorer = Scorer(settings, tabular, WorkerMetrics())
    for name in tabular:
        assert scorer._detectors[name]["similarity"].params.eps == 0.04
