"""A ring of each client's recent queries and distances to it, for detectors
that compare a query with the same client's earlier ones (kNN, structure).

Queries are stored quantised to 8 bits per feature, as in
:mod:`detectors.similarity`, and compared with exact integer arithmetic by
the compiled ``detectors._probehist.scan_ring``. Rows of one batch are taken
sorted by client in chunks of 512; each row is compared with its client's
ring as the chunk found it and with the client's earlier rows of the chunk,
which are appended once the client's rows of the chunk are done. Distances
are what feeding the rows one at a time gives; only which of two equally
near queries counts as *the* nearest depends on the chunks (see
:func:`neighbours_and_push`).

Imports numpy and the kernels of ``detectors._probehist`` only; nothing from
Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# LEVELS and quantise are re-exported: the detectors import them from here.
from detectors._probehist import LEVELS, quantise, scan_ring
from detectors._state import FieldSpec, Groups, window_fields

__all__ = [
    "LEVELS",
    "Neighbours",
    "check_ring",
    "neighbours_and_push",
    "quantise",
    "ring_fields",
]


def ring_fields(capacity: int, n_features: int) -> dict[str, FieldSpec]:
    """The arena fields of a ring of ``capacity`` queries."""
    return window_fields("hist", capacity, "u1", (n_features,))


def check_ring(values: Mapping[str, npt.NDArray[Any]]) -> None:
    """Raise ``ValueError`` unless a loaded ring's counters are consistent."""
    capacity = values["hist"].shape[0]
    length = int(values["hist_len"])
    position = int(values["hist_pos"])
    if not 0 <= position < capacity or not 0 <= length <= capacity:
        raise ValueError("state field 'hist_pos' or 'hist_len' is out of range")
    if length < capacity and position != length:
        raise ValueError("state field 'hist_pos' disagrees with 'hist_len'")


@dataclass(frozen=True, slots=True)
class Neighbours:
    """What each row (in the batch's sorted order) found among its client's
    earlier queries.

    Attributes
    ----------
    k_dist
        Per-feature RMS distances to the ``k`` nearest earlier queries,
        ascending, ``inf`` where fewer exist; shape (n, k).
    nearest
        The nearest earlier query (float32 in 0..255 units); meaningless where
        ``k_dist[:, 0]`` is ``inf``.
    previous
        The client's immediately preceding query (0..255 units); meaningless
        where ``has_previous`` is false.
    has_previous
        Whether the client had sent anything before this row.
    """

    k_dist: npt.NDArray[np.float64]
    nearest: npt.NDArray[np.float32]
    previous: npt.NDArray[np.float32]
    has_previous: npt.NDArray[np.bool_]


def neighbours_and_push(
    arrays: Mapping[str, npt.NDArray[Any]],
    groups: Groups,
    stored: npt.NDArray[np.uint8],
    k: int,
) -> Neighbours:
    """Distances of each row to its client's earlier queries, then store it.

    Parameters
    ----------
    arrays
        Arena arrays holding :func:`ring_fields`; updated in place.
    groups
        The batch grouped by client.
    stored
        Rows quantised (:func:`quantise`), in batch (unsorted) order.
    k
        Nearest distances wanted per row.

    Notes
    -----
    The nearest query is the first of the equally nearest in this order:
    the ring as the row's chunk found it, by physical index, then the
    client's earlier rows of the chunk, latest first.
    """
    hist = arrays["hist"]
    n_features = hist.shape[2]
    n = len(groups.order)
    k_sq = np.empty((n, k), dtype=np.float64)
    nearest = np.empty((n, n_features), dtype=np.float32)
    previous = np.empty((n, n_features), dtype=np.float32)
    has_previous = np.empty(n, dtype=np.bool_)
    scan_ring(
        (hist, arrays["hist_pos"], arrays["hist_len"]),
        groups.slot,
        stored[groups.order],
        (k_sq, nearest, previous, has_previous),
    )
    k_dist = np.sqrt(k_sq / float(LEVELS * LEVELS * n_features))
    return Neighbours(k_dist, nearest, previous, has_previous)
