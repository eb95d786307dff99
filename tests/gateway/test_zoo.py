"""The evaluation's models: built into a directory, loaded with the trusted-type
check, served by name, with honest signatures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.models import TRUSTED_TYPES, load_model
from gateway.zoo import (
    BREAST_CANCER,
    DIGITS_LR,
    PHISHING,
    PHISHING_FEATURES,
    SPLITS,
    declared_range,
    ensure_model,
)


@pytest.mark.parametrize(
    ("name", "features", "classes", "accuracy"),
    [(DIGITS_LR, 64, 10, 0.93), (BREAST_CANCER, 30, 2, 0.93), (PHISHING, 9, 2, 0.85)],
)
def test_zoo_model_is_built_loaded_and_accurate(
    tmp_path: Path, name: str, features: int, classes: int, accuracy: float
) -> None:
    ensure_model(tmp_path, name)
    model = load_model(tmp_path, name)
    split = SPLITS[name]()

    spec = model.signature.inputs[0]
    assert spec.shape == (-1, features)
    assert model.signature.classes == tuple(range(classes))
    assert model.reference.shape[1] == features
    # Every held-out value lies inside the declared range, so honest replay
    # passes validation.
    assert spec.min is not None and spec.max is not None
    assert spec.min <= split.x_test.min() and split.x_test.max() <= spec.max
    predicted = model.predict_proba(split.x_test).argmax(axis=1)
    assert np.mean(predicted == split.y_test) >= accuracy


def test_zoo_models_use_only_the_trusted_types(tmp_path: Path) -> None:
    import skops.io as sio

    for name in (DIGITS_LR, BREAST_CANCER, PHISHING):
        ensure_model(tmp_path, name)
        found = sio.get_untrusted_types(file=tmp_path / f"{name}.skops")
        assert set(found) <= set(TRUSTED_TYPES), name


def test_a_current_model_is_not_rebuilt(tmp_path: Path) -> None:
    path = ensure_model(tmp_path, PHISHING).with_suffix(".skops")
    before = path.stat().st_mtime_ns
    ensure_model(tmp_path, PHISHING)
    assert path.stat().st_mtime_ns == before
    signature = json.loads((tmp_path / f"{PHISHING}.signature.json").read_text())
    assert signature["inputs"][0]["name"] == "features"


def test_phishing_vectors_follow_the_fixed_feature_order() -> None:
    split = SPLITS[PHISHING]()
    assert split.x_train.shape[1] == len(PHISHING_FEATURES) == 9
    assert len(split.x_train) + len(split.x_test) == 1250


def test_declared_range_adds_a_margin_and_keeps_a_non_negative_floor() -> None:
    assert declared_range(np.array([[0.0, 10.0], [2.0, 4.0]])) == (0.0, 10.5)
    assert declared_range(np.array([[-1.0, 1.0]])) == (-1.1, 1.1)


def test_a_worker_backend_builds_a_zoo_model_on_first_use(tmp_path: Path) -> None:
    from gateway.backends import load_backend
    from gateway.config import BackendConfig

    backend = load_backend(tmp_path, PHISHING, BackendConfig())
    try:
        assert backend.signature.name == PHISHING
        assert (tmp_path / f"{PHISHING}.skops").exists()
    finally:
        backend.close()
