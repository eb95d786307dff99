"""Clean labelled data the poisoning guard calibrates on.

A model of the zoo (``gateway.zoo``) ships its held-out half (rows it never
trained on); the guard calibrates on one stratified half of it (seed
``CALIBRATION_SEED``) and leaves the other half for measurement and demos
(``evaluation.poisoning_measure``, the tests). Any other model names a
``.npz`` file with arrays ``x`` (n, d) and ``y`` (n,) of class values, loaded
without pickle.

Imports numpy, scikit-learn and the zoo; nothing from Kafka or Redis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import ConfigError
from gateway.zoo import SPLITS

Array = np.ndarray[Any, Any]
CALIBRATION_SEED = 1


def calibration_rows(
    model: str, path: Path | None = None
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """``((x_cal, y_cal), (x_held, y_held))``: clean rows to calibrate on and
    clean rows kept out of calibration (empty when read from ``path``).

    Raises
    ------
    ConfigError
        ``path`` is unset and ``model`` is not a zoo model, or the file is
        missing or malformed.
    """
    if path is not None:
        try:
            with np.load(path, allow_pickle=False) as data:
                x = np.asarray(data["x"], dtype=np.float32)
                y = np.asarray(data["y"], dtype=np.int64)
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"feedback calibration file {path}: {exc}") from exc
        if x.ndim != 2 or y.shape != (len(x),):
            raise ConfigError(
                f"feedback calibration file {path}: x must be (n, d), y (n,)"
            )
        empty = (x[:0], y[:0])
        return (x, y), empty
    split = SPLITS.get(model)
    if split is None:
        raise ConfigError(
            f"model {model!r} is not in the zoo: set feedback.calibration_files "
            "to a .npz of clean labelled rows (x, y)"
        )
    from sklearn.model_selection import train_test_split

    data = split()
    x_cal, x_held, y_cal, y_held = train_test_split(
        data.x_test,
        data.y_test,
        test_size=0.5,
        random_state=CALIBRATION_SEED,
        stratify=data.y_test,
    )
    return (x_cal, y_cal), (x_held, y_held)
