"""Each query's nearest earlier query and previous query of its client, and
windows of bits pushed together, for ``structure``.

:func:`nearest_and_push` gives what ``detectors._history.neighbours_and_push``
gives with ``k = 1`` (the same nearest query, ties going to the same stored
entry), without the sorted distances ``structure`` does not read.
:func:`push_windows` is :func:`detectors._state.push_window` for several
windows that always move together.

Imports numpy only; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._history import chunk_distances, fill_nearest, previous_and_push
from detectors._state import Groups, group_rows, push_window

IntArray = npt.NDArray[np.int64]

# Rows handled per step, as in detectors._history (the chunks must be the
# same for ties to go the same way).
_CHUNK_ROWS = 512


def nearest_and_push(
    arrays: dict[str, npt.NDArray[Any]],
    groups: Groups,
    stored: npt.NDArray[np.uint8],
) -> tuple[
    npt.NDArray[np.bool_],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    npt.NDArray[np.bool_],
]:
    """Per row (sorted order): whether it has an earlier query, the nearest
    one (L2, 0..255 units), the client's previous query and whether there is
    one; then store the rows in the ring (``detectors._history.ring_fields``).

    Parameters
    ----------
    arrays
        Arena arrays holding the ring; updated in place.
    groups
        The batch grouped by client.
    stored
        Rows quantised to uint8, in batch (unsorted) order.
    """
    n_features = arrays["hist"].shape[2]
    n = len(groups.order)
    has_nearest = np.zeros(n, dtype=bool)
    nearest = np.zeros((n, n_features), dtype=np.float32)
    previous = np.zeros((n, n_features), dtype=np.float32)
    has_previous = np.zeros(n, dtype=bool)
    sorted_rows = stored[groups.order]
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        chunk = groups if n <= _CHUNK_ROWS else group_rows(groups.slot[start:stop])
        _chunk(
            arrays,
            chunk,
            sorted_rows[start:stop],
            (
                has_nearest[start:stop],
                nearest[start:stop],
                previous[start:stop],
                has_previous[start:stop],
            ),
        )
    return has_nearest, nearest, previous, has_previous


def _chunk(
    arrays: dict[str, npt.NDArray[Any]],
    groups: Groups,
    rows: npt.NDArray[np.uint8],
    out: tuple[
        npt.NDArray[np.bool_],
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        npt.NDArray[np.bool_],
    ],
) -> None:
    """One chunk of rows sorted by slot; fills ``out`` and pushes the rows.

    In 8-bit units every product and sum is an integer below 2**24 for up to
    258 features, so float32 distances are exact and ties are real ties; the
    nearest is the first minimum over the ring (by physical index) then the
    earlier rows of the chunk (nearest first), the order of
    ``detectors._history``.
    """
    has_nearest, nearest, previous, has_previous = out
    view = chunk_distances(arrays, groups, rows)
    best = fill_nearest(view, nearest)
    has_nearest[:] = np.isfinite(view.distances[np.arange(len(best)), best])
    previous_and_push(arrays, groups, rows, view, (previous, has_previous))


def push_windows(
    windows: list[tuple[npt.NDArray[np.uint8], IntArray, IntArray]],
    groups: Groups,
    sorted_bits: list[npt.NDArray[np.bool_]],
) -> tuple[list[IntArray], IntArray]:
    """:func:`detectors._state.push_window` for several windows of equal size
    that are pushed the same rows, sharing the index arithmetic.

    Parameters
    ----------
    windows
        Per window its arena arrays (ring, next position, length); updated
        in place.
    groups
        The batch grouped by client.
    sorted_bits
        Per window, the bit of each row in sorted order.

    Returns
    -------
    tuple
        Per window the count of set bits just after each row, and the
        windows' length after each row (sorted order).

    Notes
    -----
    Windows pushed together have equal positions and lengths, but a loaded
    state may not (each window is checked on its own); then each window is
    pushed by ``push_window``, which gives the same answer.
    """
    ring0, pos0, len0 = windows[0]
    window = ring0.shape[1]
    unique = groups.unique
    old_len = len0[unique]
    old_pos = pos0[unique]
    if any(
        ring.shape[1] != window
        or not np.array_equal(pos[unique], old_pos)
        or not np.array_equal(length[unique], old_len)
        for ring, pos, length in windows[1:]
    ):
        pushed = [
            push_window(ring, pos, length, groups, bits)
            for (ring, pos, length), bits in zip(windows, sorted_bits, strict=True)
        ]
        return [counts for counts, _ in pushed], pushed[0][1]

    t = groups.position
    g = groups.group
    columns = np.arange(window)
    ring_index = (old_pos[:, None] - old_len[:, None] + columns[None, :]) % window
    unfilled = columns[None, :] >= old_len[:, None]
    keep_old = np.clip(window - (t + 1), 0, old_len[g])
    row_old_len = old_len[g]
    long_rows = np.flatnonzero(t >= window)
    last = t >= groups.size[g] - window
    write_slot = groups.slot[last]
    write_index = (old_pos[g[last]] + t[last]) % window
    new_pos = (old_pos + groups.size) % window
    new_len = np.minimum(old_len + groups.size, window)

    counts_out: list[IntArray] = []
    for (ring, pos, length), flags in zip(windows, sorted_bits, strict=True):
        bits = flags.astype(np.int64)
        # Old bits oldest first, summed by prefix; new bits by running sums
        # within each group, as push_window does.
        old_bits = ring[unique[:, None], ring_index].astype(np.int64)
        old_bits[unfilled] = 0
        old_prefix = np.zeros((len(unique), window + 1), dtype=np.int64)
        np.cumsum(old_bits, axis=1, out=old_prefix[:, 1:])
        running = np.cumsum(bits)
        before_group = running[groups.start] - bits[groups.start]
        through_row = running - before_group[g]
        new_sum = through_row.copy()
        new_sum[long_rows] -= through_row[long_rows - window]
        old_sum = old_prefix[g, row_old_len] - old_prefix[g, row_old_len - keep_old]
        counts_out.append(new_sum + old_sum)
        ring[write_slot, write_index] = bits[last]
        pos[unique] = new_pos
        length[unique] = new_len
    return counts_out, np.minimum(row_old_len + t + 1, window)
