"""The evaluation's model zoo: small models trained on data that packages ship.

Besides the demo's digits MLP (``gateway.models.ensure_digits_model``) the
evaluation attacks three logistic regressions, each written to
``models.directory`` in the same three-file format (skops, signature, reference
sample) so a worker serves it by name once it is listed in ``models.serve``:

- ``digits_lr``: multinomial logistic regression on scikit-learn's digits
  (64 pixels, 0..16, scaled by the declared range as the MLP is);
- ``breast_cancer``: binary logistic regression on scikit-learn's breast
  cancer set (30 tabular features, standardised in a Pipeline);
- ``phishing``: binary logistic regression on River's Phishing set (9 numeric
  features, standardised in a Pipeline).

Every model is made only of types already in ``gateway.models.TRUSTED_TYPES``
(Pipeline, StandardScaler, MinMaxScaler, LogisticRegression), so the trusted
list does not grow. The signature format holds one value range per input
tensor, so a tabular model declares the smallest range that covers every
feature (from the data, with a 5% margin); it cannot say that one feature runs
0..1 and another 0..4000.

Imports numpy, scikit-learn, skops and (for Phishing) River; nothing from the
worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.models import (
    DIGITS,
    ModelSignature,
    TensorSpec,
    _has_version,
    build_lock,
    digits_split,
    ensure_digits_model,
    write_model_files,
)

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

DIGITS_LR = "digits_lr"
BREAST_CANCER = "breast_cancer"
PHISHING = "phishing"
SPLIT_SEED = 0
# Bump when a model's training changes, so cached copies are retrained.
ZOO_VERSION = "1"
# River's Phishing features, in the fixed order of the dense vector.
PHISHING_FEATURES: tuple[str, ...] = (
    "empty_server_form_handler",
    "popup_window",
    "https",
    "request_from_other_domain",
    "anchor_from_other_domain",
    "is_popular",
    "long_url",
    "age_of_domain",
    "ip_in_url",
)
# Share of the data's span added on each side of a declared value range.
RANGE_MARGIN = 0.05


@dataclass(frozen=True)
class Split:
    """A dataset split 50/50, stratified, with a fixed seed: the model trains on
    ``x_train``; the evaluation replays and measures on ``x_test``."""

    x_train: Array
    x_test: Array
    y_train: Array
    y_test: Array


def _split(x: Array, y: Array) -> Split:
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32),
        y.astype(np.int64),
        test_size=0.5,
        random_state=SPLIT_SEED,
        stratify=y,
    )
    return Split(x_train, x_test, y_train, y_test)


def breast_cancer_split() -> Split:
    """scikit-learn's breast cancer set (569 rows, 30 features), split 50/50."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return _split(np.asarray(data.data), np.asarray(data.target))


def phishing_split() -> Split:
    """River's Phishing set (1250 rows) as dense vectors in
    ``PHISHING_FEATURES`` order, labels 1 = phishing, split 50/50."""
    from river.datasets import Phishing

    rows, labels = [], []
    for features, label in Phishing():
        rows.append([float(features[name]) for name in PHISHING_FEATURES])
        labels.append(int(bool(label)))
    return _split(np.asarray(rows), np.asarray(labels))


def digits_as_split() -> Split:
    """The digits split the MLP and ``digits_lr`` share."""
    return Split(*digits_split())


def declared_range(x: Array) -> tuple[float, float]:
    """One (min, max) covering every feature of ``x`` with a 5% margin each
    side; the lower end stays at 0 when the data never goes below 0."""
    low, high = float(np.min(x)), float(np.max(x))
    span = high - low
    low = 0.0 if low >= 0 else low - RANGE_MARGIN * span
    return round(low, 6), round(high + RANGE_MARGIN * span, 6)


def _signature(
    name: str, input_name: str, n_features: int, value_range: tuple[float, float]
) -> ModelSignature:
    n_classes = 10 if name == DIGITS_LR else 2
    return ModelSignature(
        name=name,
        version=ZOO_VERSION,
        inputs=(TensorSpec(input_name, "FP32", (-1, n_features), *value_range),),
        outputs=(
            TensorSpec("probabilities", "FP32", (-1, n_classes)),
            TensorSpec("label", "INT64", (-1,)),
        ),
        classes=tuple(range(n_classes)),
    )


def ensure_digits_lr_model(directory: Path) -> Path:
    """Multinomial logistic regression on digits (about 96% held-out accuracy).

    Scaled by the declared pixel range (x / 16) for the reason given in
    ``ensure_digits_model``; the logits stay affine in the raw pixels, which is
    what equation solving relies on.
    """
    return _build_once(directory, DIGITS_LR, _train_digits_lr)


def _build_once(directory: Path, name: str, train: Callable[[Path], None]) -> Path:
    """``train`` writes ``name`` into ``directory`` unless its current version is
    there; under the model's build lock (``gateway.models.build_lock``), so two
    processes starting together build it once and neither reads a torn file."""
    base = directory / name
    if _has_version(base, ZOO_VERSION):
        return base
    with build_lock(directory, name):
        # Another process may have built it while this one waited.
        if not _has_version(base, ZOO_VERSION):
            train(directory)
    return base


def _train_digits_lr(directory: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler

    split = digits_as_split()
    scaler = MinMaxScaler().fit(np.array([[0.0] * 64, [16.0] * 64]))
    model = Pipeline(
        [("scale", scaler), ("lr", LogisticRegression(max_iter=2000, C=1.0))]
    )
    model.fit(split.x_train, split.y_train)
    sig = _signature(DIGITS_LR, "pixels", 64, (0.0, 16.0))
    write_model_files(directory, DIGITS_LR, model, split.x_train, sig)
    logger.info(
        "trained model",
        extra={"model": DIGITS_LR, "accuracy": model.score(split.x_test, split.y_test)},
    )


def _ensure_tabular(directory: Path, name: str, split: Callable[[], Split]) -> Path:
    return _build_once(directory, name, lambda d: _train_tabular(d, name, split()))


def _train_tabular(directory: Path, name: str, split: Split) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    model = Pipeline(
        [("scale", StandardScaler()), ("lr", LogisticRegression(max_iter=2000))]
    )
    model.fit(split.x_train, split.y_train)
    value_range = declared_range(np.concatenate([split.x_train, split.x_test]))
    sig = _signature(name, "features", split.x_train.shape[1], value_range)
    write_model_files(directory, name, model, split.x_train, sig)
    logger.info(
        "trained model",
        extra={"model": name, "accuracy": model.score(split.x_test, split.y_test)},
    )


def ensure_breast_cancer_model(directory: Path) -> Path:
    """Logistic regression on breast cancer (30 features, about 97% accuracy)."""
    return _ensure_tabular(directory, BREAST_CANCER, breast_cancer_split)


def ensure_phishing_model(directory: Path) -> Path:
    """Logistic regression on River's Phishing (9 features, about 89%)."""
    return _ensure_tabular(directory, PHISHING, phishing_split)


# Builder and split of every model the evaluation knows, by served name.
BUILDERS: dict[str, Callable[[Path], Path]] = {
    DIGITS: ensure_digits_model,
    DIGITS_LR: ensure_digits_lr_model,
    BREAST_CANCER: ensure_breast_cancer_model,
    PHISHING: ensure_phishing_model,
}
SPLITS: dict[str, Callable[[], Split]] = {
    DIGITS: digits_as_split,
    DIGITS_LR: digits_as_split,
    BREAST_CANCER: breast_cancer_split,
    PHISHING: phishing_split,
}


def ensure_model(directory: Path, name: str) -> Path:
    """Build ``name`` into ``directory`` unless the current version is there.

    Raises
    ------
    KeyError
        ``name`` is not a model of the zoo.
    """
    return BUILDERS[name](directory)
