"""A ring of each client's recent queries and distances to it, for detectors
that compare a query with the same client's earlier ones (kNN, structure).

Queries are stored quantised to 8 bits per feature, as in
:mod:`detectors.similarity`. Rows of one batch are compared with the stored
ring and with the client's earlier rows of the same batch, so a batch scores
exactly as its rows one at a time.

Imports numpy only; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._state import FieldSpec, Groups

LEVELS = 255
"""Quantisation of stored features: ``round(x * 255)`` as uint8."""


def quantise(X: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """Rows scaled to [0, 1] as stored: clipped, times 255, rounded."""
    out: npt.NDArray[np.uint8] = np.rint(np.clip(X, 0.0, 1.0) * LEVELS).astype(np.uint8)
    return out


def ring_fields(capacity: int, n_features: int) -> dict[str, FieldSpec]:
    """The arena fields of a ring of ``capacity`` queries."""
    return {
        "hist": FieldSpec((capacity, n_features), "u1"),
        "hist_pos": FieldSpec((), "<i8"),
        "hist_len": FieldSpec((), "<i8"),
    }


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
    arrays: dict[str, npt.NDArray[Any]],
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
    One matrix product per client in the batch: rows against the client's
    ring followed by its rows. With about 5 rows per client per batch of 500
    this costs a few µs per row, dominated by numpy call overhead.
    """
    hist = arrays["hist"]
    capacity, n_features = hist.shape[1], hist.shape[2]
    q_all = stored[groups.order].astype(np.float32)
    n = len(q_all)
    k_dist = np.full((n, k), np.inf, dtype=np.float64)
    nearest = np.zeros((n, n_features), dtype=np.float32)
    previous = np.zeros((n, n_features), dtype=np.float32)
    has_previous = np.zeros(n, dtype=bool)
    scale = float(LEVELS * LEVELS * n_features)

    starts = groups.start.tolist()
    sizes = groups.size.tolist()
    slots = groups.unique.tolist()
    old_lens = arrays["hist_len"][groups.unique].tolist()
    old_poss = arrays["hist_pos"][groups.unique].tolist()
    for start, size, slot, old_len, old_pos in zip(
        starts, sizes, slots, old_lens, old_poss, strict=True
    ):
        rows = slice(start, start + size)
        q = q_all[rows]
        # The client's ring oldest first, then its rows of this batch.
        order = (old_pos - old_len + np.arange(old_len)) % capacity
        cand = np.concatenate([hist[slot, order].astype(np.float32), q])
        c_sq = np.einsum("ij,ij->i", cand, cand)
        d_sq = c_sq[old_len:, None] + c_sq[None, :] - 2.0 * (q @ cand.T)
        # Row t sees candidates j with old_len + t - capacity <= j < old_len + t.
        t = np.arange(size)[:, None]
        j = np.arange(old_len + size)[None, :]
        visible = (j < old_len + t) & (j >= old_len + t - capacity)
        d_sq = np.where(visible, np.maximum(d_sq, 0.0), np.inf)
        width = d_sq.shape[1]
        part = np.partition(d_sq, k - 1, axis=1)[:, :k] if width > k else d_sq
        part = np.sort(part, axis=1)
        k_dist[rows, : part.shape[1]] = np.sqrt(part / scale)
        nearest[rows] = cand[np.argmin(d_sq, axis=1)]
        last = old_len + np.arange(size) - 1
        has = last >= 0
        has_previous[rows] = has
        previous[start : start + size][has] = cand[last[has]]

        # Append: only the last `capacity` rows survive.
        keep = min(size, capacity)
        index = (old_pos + np.arange(size - keep, size)) % capacity
        hist[slot, index] = stored[groups.order[start + size - keep : start + size]]
    arrays["hist_pos"][groups.unique] = (
        arrays["hist_pos"][groups.unique] + groups.size
    ) % capacity
    arrays["hist_len"][groups.unique] = np.minimum(
        arrays["hist_len"][groups.unique] + groups.size, capacity
    )
    return Neighbours(k_dist, nearest, previous, has_previous)
