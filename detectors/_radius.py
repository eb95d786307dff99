"""Each query's nearest earlier query of its client and how many earlier
queries lie within a radius, for detectors that count concentration
(``similarity``, ``knn``).

Queries are stored quantised to 8 bits per feature (``round(x * 255)``), as
Blacklight quantises inputs before comparing them: in those units every
product and sum is an integer below 2**24 for up to 258 features, so float32
arithmetic is exact and a batch scores exactly as its rows one at a time.
Rows of a batch are compared with the stored history and with the client's
earlier rows of the same batch, then appended.

The history's arena fields are :func:`history_fields`; unlike
``detectors._history`` it keeps each stored query's squared norm, which
saves recomputing it per batch.

Imports numpy only; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._state import FieldSpec, Groups, group_rows

LEVELS = 255
"""Quantisation of stored features: ``round(x * 255)`` as uint8."""

# Rows handled per step: bounds the temporary matrices (at worst 512 clients'
# histories of 128 queries of 64 features, 16 MB of float32). A whole batch of
# 500 in one step gathers each client's history once instead of once per
# chunk: measured 7.2 -> 5.5 µs per query against 256 (similarity).
_CHUNK_ROWS = 512

# A client with at least this many rows in a chunk is scored on its own, with
# one matrix product of its rows against its history; clients with fewer are
# scored together in one stacked product, which avoids ~15 numpy calls per
# client. Measured on digits with batches of 500 (CPU µs per query, one BLAS
# thread): 13 rows per client per chunk cost 5.7 together vs 6.0 alone; 51
# rows cost 8.2 together vs 4.3 alone.
_BIG_GROUP = 32


def quantise(X: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """Rows scaled to [0, 1] as stored: clipped, times 255, rounded."""
    out: npt.NDArray[np.uint8] = np.rint(np.clip(X, 0.0, 1.0) * LEVELS).astype(np.uint8)
    return out


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
        ``group_rows(slots)`` when the caller has it (saves grouping again
        when the batch is one chunk).
    """
    n = len(slots)
    if n <= _CHUNK_ROWS:
        return _chunk(arrays, slots, stored, radius, groups)
    nearest = np.empty(n, dtype=np.float64)
    count = np.empty(n, dtype=np.int64)
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        nearest[start:stop], count[start:stop] = _chunk(
            arrays, slots[start:stop], stored[start:stop], radius
        )
    return nearest, count


def _chunk(
    arrays: Mapping[str, npt.NDArray[Any]],
    slots: npt.NDArray[np.int64],
    stored: npt.NDArray[np.uint8],
    radius: float,
    groups: Groups | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Per-feature RMS distance of each row to its client's nearest earlier
    query (``inf`` for a first query) and the number of earlier queries
    within ``radius`` but not identical, then store the rows as history.

    ``stored`` holds the rows quantised as they will be stored, so a row is
    compared with earlier rows of its batch exactly as with history.
    """
    hist = arrays["hist"]
    capacity, n_features = hist.shape[1], hist.shape[2]

    if groups is None:
        groups = group_rows(slots)
    q = stored[groups.order].astype(np.float32)
    q_sq = np.einsum("ij,ij->i", q, q)
    old_len = arrays["hist_len"][groups.unique]
    old_pos = arrays["hist_pos"][groups.unique]
    # Every client's history gathered once (uint8): what the distances
    # depend on, so also what a shared result is checked against.
    snapshot = hist[groups.unique]

    # The radius in the quantised units of squared distances, float32 like them.
    scale = float(LEVELS * LEVELS * n_features)
    radius_sq = np.float32(radius**2 * scale)
    found = _SHARED.find(slots, stored, snapshot, old_len, old_pos)
    if found is None:
        found = _distances(arrays, groups, (q, q_sq, old_len, old_pos), snapshot)
        _SHARED.put(slots, stored, snapshot, old_len, old_pos, found)
    best_sq, within = found.reduce(radius_sq)

    # Append the rows to each client's ring; only a group's last `capacity`
    # rows survive, and writing just those keeps ring indices distinct.
    row_size = groups.size[groups.group]
    keep = groups.position >= row_size - capacity
    ring_index = (old_pos[groups.group[keep]] + groups.position[keep]) % capacity
    hist[groups.slot[keep], ring_index] = stored[groups.order[keep]]
    arrays["hist_sq"][groups.slot[keep], ring_index] = q_sq[keep]
    arrays["hist_pos"][groups.unique] = (old_pos + groups.size) % capacity
    arrays["hist_len"][groups.unique] = np.minimum(old_len + groups.size, capacity)

    distance = np.sqrt(np.maximum(best_sq.astype(np.float64), 0.0) / scale)
    out = np.empty(len(q), dtype=np.float64)
    out[groups.order] = distance
    count = np.empty(len(q), dtype=np.int64)
    count[groups.order] = within
    return out, count


class _Distances:
    """Squared distances (quantised units, float32) of a chunk's rows (sorted
    order) to their clients' earlier queries, as blocks of rows: one matrix
    per block, ``inf`` where an earlier query is not visible to the row.
    Independent of any radius, so one result serves every radius."""

    __slots__ = ("_best_sq", "_blocks", "_copies")

    def __init__(
        self,
        n: int,
        blocks: list[tuple[npt.NDArray[np.int64] | slice, npt.NDArray[np.float32]]],
    ) -> None:
        # When every row is in the two blocks of _small, in order, they are
        # joined once so each radius costs one comparison and one count.
        if (
            len(blocks) == 2
            and isinstance(blocks[0][0], np.ndarray)
            and len(blocks[0][0]) == n
        ):
            joined = np.concatenate([blocks[0][1], blocks[1][1]], axis=1)
            blocks = [(slice(0, n), joined)]
        self._blocks = blocks
        best = np.full(n, np.inf, dtype=np.float32)
        # Exact copies (distance 0; never negative, the arithmetic is exact)
        # are counted once here and taken off every radius's count.
        copies = np.zeros(n, dtype=np.int64)
        for rows, d_sq in blocks:
            if d_sq.shape[1]:
                best[rows] = np.minimum(best[rows], d_sq.min(axis=1))
                copies[rows] += np.count_nonzero(d_sq == 0.0, axis=1)
        self._best_sq = best
        self._copies = copies

    def reduce(
        self, radius_sq: np.float32
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Each row's nearest squared distance and its count of earlier
        queries closer than ``radius_sq`` but not identical."""
        if not radius_sq > 0.0:
            return self._best_sq, np.zeros(len(self._best_sq), dtype=np.int64)
        within = -self._copies
        for rows, d_sq in self._blocks:
            within[rows] += np.count_nonzero(d_sq < radius_sq, axis=1)
        return self._best_sq, within


class _SharedResult(threading.local):
    """The distances of the last few chunks, for the next detector that
    scores the same rows against the same histories.

    ``similarity`` and ``knn`` keep equal histories of a client (same
    capacity, same quantisation, the same stream) and the worker scores them
    on the same batch one after the other, so the second reuses the first's
    distances (measured: the product and masks are nine tenths of its cost).
    A result is reused only when the rows, their slots and the clients'
    gathered histories, lengths and positions are equal, which is all the
    distances depend on: a detector whose state differs (restored apart,
    another model, a client forgotten by one of them) computes its own.
    Per thread, since a detector is called from one thread at a time.
    """

    def __init__(self) -> None:
        self.entries: list[
            tuple[
                npt.NDArray[np.int64],
                npt.NDArray[np.uint8],
                npt.NDArray[np.uint8],
                npt.NDArray[np.int64],
                npt.NDArray[np.int64],
                _Distances,
            ]
        ] = []

    def find(
        self,
        slots: npt.NDArray[np.int64],
        stored: npt.NDArray[np.uint8],
        snapshot: npt.NDArray[np.uint8],
        old_len: npt.NDArray[np.int64],
        old_pos: npt.NDArray[np.int64],
    ) -> _Distances | None:
        for e_slots, e_stored, e_snap, e_len, e_pos, found in self.entries:
            if (
                e_snap.shape == snapshot.shape
                and np.array_equal(e_slots, slots)
                and np.array_equal(e_stored, stored)
                and np.array_equal(e_len, old_len)
                and np.array_equal(e_pos, old_pos)
                and np.array_equal(e_snap, snapshot)
            ):
                return found
        return None

    def put(
        self,
        slots: npt.NDArray[np.int64],
        stored: npt.NDArray[np.uint8],
        snapshot: npt.NDArray[np.uint8],
        old_len: npt.NDArray[np.int64],
        old_pos: npt.NDArray[np.int64],
        found: _Distances,
    ) -> None:
        # Copies of the inputs: the caller's arrays change once it stores.
        entry = (slots.copy(), stored.copy(), snapshot, old_len, old_pos, found)
        self.entries = [entry, *self.entries[: _SHARED_CHUNKS - 1]]


# Chunks remembered: a batch of up to 4 chunks (2048 rows) is shared whole.
# Each holds a chunk's histories (512 x 64 x 64 bytes at worst, 2 MB) and
# distances.
_SHARED_CHUNKS = 4

_SHARED = _SharedResult()


def _distances(
    arrays: Mapping[str, npt.NDArray[Any]],
    groups: Groups,
    rows_in: tuple[
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
    ],
    snapshot: npt.NDArray[np.uint8],
) -> _Distances:
    """The chunk's distances: small groups together, big ones one by one."""
    q, q_sq, old_len, old_pos = rows_in
    blocks: list[tuple[npt.NDArray[np.int64] | slice, npt.NDArray[np.float32]]] = []
    small_groups = np.flatnonzero(groups.size < _BIG_GROUP)
    if small_groups.size:
        blocks += _small(arrays, groups, small_groups, rows_in, snapshot)
    for g in np.flatnonzero(groups.size >= _BIG_GROUP).tolist():
        rows = slice(groups.start[g], groups.start[g] + groups.size[g])
        blocks += _big(
            arrays,
            (int(groups.unique[g]), snapshot[g]),
            q[rows],
            q_sq[rows],
            (old_len[g], old_pos[g]),
            rows,
        )
    return _Distances(len(q), blocks)


def _small(
    arrays: Mapping[str, npt.NDArray[Any]],
    groups: Groups,
    small_groups: npt.NDArray[np.int64],
    rows_in: tuple[
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
    ],
    snapshot: npt.NDArray[np.uint8],
) -> list[tuple[npt.NDArray[np.int64] | slice, npt.NDArray[np.float32]]]:
    """Squared distances for clients with few rows in the chunk, vectorised
    across clients: a block against the histories and one against the
    client's earlier rows of the chunk (sorted-order rows). ``rows_in`` holds
    the rows, their squared norms and each group's ring length and position;
    ``snapshot`` every group's history."""
    q, q_sq, old_len, old_pos = rows_in
    capacity = arrays["hist"].shape[1]
    slot = groups.unique[small_groups]
    size = groups.size[small_groups]
    start = groups.start[small_groups]

    # Each client's history and rows stacked (rows padded to the largest
    # small group), then one product of every row with its client's history
    # and rows, widened once.
    k = len(small_groups)
    width = int(size.max())
    member = np.arange(width)[None, :] < size[:, None]
    which, t = np.nonzero(member)
    rows = start[which] + t
    stacked = np.zeros((k, capacity + width, q.shape[1]), dtype=np.float32)
    stacked[:, :capacity] = snapshot[small_groups]
    stacked[which, capacity + t] = q[rows]
    products = np.matmul(stacked, stacked[:, capacity:].transpose(0, 2, 1))
    per_row = products.transpose(0, 2, 1)[which, t]  # (rows, capacity + width)
    dots_per_row = per_row[:, :capacity]

    # ||q - h||^2 = ||q||^2 + ||h||^2 - 2 q.h, over filled entries: a ring
    # not yet full fills indices 0..length-1.
    d_sq = q_sq[rows, None] + arrays["hist_sq"][slot[which]] - 2.0 * dots_per_row
    length = old_len[small_groups][which]
    d_sq[np.arange(capacity)[None, :] >= length[:, None]] = np.inf

    # A full ring has lost its t oldest entries to the client's t earlier
    # rows in this chunk (ring age 0 is the oldest). Rare, so fixed up
    # only where it happens.
    evicted = np.maximum(length + t - capacity, 0)
    late = np.flatnonzero(evicted)
    if late.size:
        oldest = (old_pos[small_groups] - old_len[small_groups])[which[late]]
        age = (np.arange(capacity)[None, :] - oldest[:, None]) % capacity
        gone = d_sq[late]
        gone[age < evicted[late, None]] = np.inf
        d_sq[late] = gone

    # Against the client's earlier rows in this chunk (column j: the
    # client's row j of the chunk), while still among the last `capacity`
    # stored.
    padded_sq = np.zeros((k, width), dtype=np.float32)
    padded_sq[which, t] = q_sq[rows]
    d_lag = q_sq[rows, None] + padded_sq[which] - 2.0 * per_row[:, capacity:]
    back = t[:, None] - np.arange(width)[None, :]
    d_lag[(back < 1) | (back > capacity)] = np.inf
    return [(rows, d_sq.astype(np.float32, copy=False)), (rows, d_lag)]


def _big(
    arrays: Mapping[str, npt.NDArray[Any]],
    client: tuple[int, npt.NDArray[np.uint8]],
    q: npt.NDArray[np.float32],
    q_sq: npt.NDArray[np.float32],
    ring: tuple[np.int64, np.int64],
    rows: slice,
) -> list[tuple[npt.NDArray[np.int64] | slice, npt.NDArray[np.float32]]]:
    """Squared distances for one client's many rows (sorted-order ``rows``):
    one matrix product against its history and one among the rows
    themselves. ``client`` is its slot and gathered history, ``ring`` the
    history's length and position."""
    slot, stored_history = client
    old_len, old_pos = ring
    capacity = arrays["hist"].shape[1]
    t = np.arange(len(q))

    history = stored_history.astype(np.float32)
    h_sq = arrays["hist_sq"][slot]
    d_hist = q_sq[:, None] + h_sq[None, :] - 2.0 * (q @ history.T)
    age = (np.arange(capacity) - (old_pos - old_len)) % capacity
    evicted = np.maximum(old_len + t - capacity, 0)
    present = (age[None, :] < old_len) & (age[None, :] >= evicted[:, None])
    d_hist = np.where(present, d_hist, np.float32(np.inf))

    # Row i sees earlier row j while it is among the last `capacity` stored.
    d_rows = q_sq[:, None] + q_sq[None, :] - 2.0 * (q @ q.T)
    lag = t[:, None] - t[None, :]
    seen = (lag >= 1) & (lag <= capacity)
    d_rows = np.where(seen, d_rows, np.float32(np.inf))
    return [
        (rows, d_hist.astype(np.float32, copy=False)),
        (rows, d_rows.astype(np.float32, copy=False)),
    ]
