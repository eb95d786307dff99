"""Shared data for the detector tests: scikit-learn digits, split once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


@dataclass(frozen=True)
class Digits:
    """Digits scaled to [0, 1] (X / 16), 70/30 stratified split, seed 0."""

    train: npt.NDArray[np.float64]
    test: npt.NDArray[np.float64]
    y_train: npt.NDArray[np.int64]
    y_test: npt.NDArray[np.int64]


@pytest.fixture(scope="session")
def digits() -> Digits:
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X / 16.0, y, test_size=0.3, stratify=y, random_state=0
    )
    return Digits(
        train=np.asarray(X_train, dtype=np.float64),
        test=np.asarray(X_test, dtype=np.float64),
        y_train=np.asarray(y_train, dtype=np.int64),
        y_test=np.asarray(y_test, dtype=np.int64),
    )
