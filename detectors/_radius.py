"""Each query's nearest earlier query of its client and how many earlier
queries lie within a radius, for detectors that count concentration
(``similarity``, ``knn``).

Queries are stored quantised to 8 bits per feature (``round(x * 255)``), as
Blacklight quantises inputs before comparing them. Distances are computed in
those units with integer arithmetic, so they are exact, and a batch scores
exactly as its rows one at a time: the compiled kernel
(``detectors._probehist.scan_history``) takes the rows in arrival order,
compares each with its client's history and appends it.

The history's arena fields are :func:`history_fields`; unlike
``detectors._history`` it keeps each stored query's squared norm (float32,
as ``np.einsum`` gives it), part of the stored state.

Imports numpy and the kernels of ``detectors._probehist`` only; nothing from
Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

# LEVELS and quantise are re-exported: the detectors import them from here.
from detectors._probehist import LEVELS, quantise, scan_history
from detectors._state import FieldSpec, Groups

__all__ = [
    "LEVELS",
    "check_history",
    "history_fields",
    "nearest_and_count",
    "quantise",
]


def history_fields(capacity: int, n_features: int) -> dict[str, FieldSpec]:
    """The arena fields of a history of ``capacity`` queries."""
    return {
        "hist": FieldSpec((capacity, n_features), "u1"),
        "hist_sq": FieldSpec((capacity,), "<f4"),
        "hist_pos": FieldSpec((), "<i8"),
        "hist_len": FieldSpec((), "<i8"),
    }


def check_history(values: Mapping[str, npt.NDArray[Any]]) -> None:
    """Raise ``ValueError`` unless a loaded history is consistent."""
    capacity = values["hist"].shape[0]
    length = int(values["hist_len"])
    position = int(values["hist_pos"])
    if not 0 <= position < capacity or not 0 <= length <= capacity:
        raise ValueError("state field 'hist_pos' or 'hist_len' is out of range")
    if length < capacity and position != length:
        raise ValueError("state field 'hist_pos' disagrees with 'hist_len'")
    history = values["hist"].astype(np.float32)
    if not np.array_equal(values["hist_sq"], np.einsum("ij,ij->i", history, history)):
        raise ValueError("state field 'hist_sq' disagrees with 'hist'")


def nearest_and_count(
    arrays: Mapping[str, npt.NDArray[Any]],
    slots: npt.NDArray[np.int64],
    stored: npt.NDArray[np.uint8],
    radius: float,
    groups: Groups | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Per row (batch order): the per-feature RMS distance to the client's
    nearest earlier query (``inf`` for a first query) and the number of
    earlier queries closer than ``radius`` but not identical; then store the
    rows in the history.

    Parameters
    ----------
    arrays
        Arena arrays holding :func:`history_fields`; updated in place.
    slots
        Each row's client slot.
    stored
        Rows quantised (:func:`quantise`), in batch order.
    radius
        Per-feature RMS distance (in [0, 1]).
    groups
        Accepted for callers that have ``group_rows(slots)``; the kernel takes
        the rows in arrival order and does not need it.
    """
    del groups
    hist = arrays["hist"]
    n_features = hist.shape[2]
    # The radius in the quantised units of squared distances, rounded to
    # float32 as the distances were compared before they were integers.
    scale = float(LEVELS * LEVELS * n_features)
    radius_sq = float(np.float32(radius**2 * scale))
    rows = np.ascontiguousarray(stored, dtype=np.uint8)
    # Stored norms as np.einsum gives them: check_history compares with it.
    widened = rows.astype(np.float32)
    row_sq = np.einsum("ij,ij->i", widened, widened)
    nearest = np.empty(len(slots), dtype=np.float64)
    count = np.empty(len(slots), dtype=np.int64)
    scan_history(
        (hist, arrays["hist_sq"], arrays["hist_pos"], arrays["hist_len"]),
        np.ascontiguousarray(slots, dtype=np.int64),
        rows,
        row_sq,
        radius_sq,
        scale,
        (nearest, count),
    )
    return nearest, count
