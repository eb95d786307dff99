"""Per-client rings of the last ``W`` values, with every row's window at once.

:func:`push_ring` is :func:`detectors._state.push_window` for values rather
than bits: it returns, for each row of a batch, the client's last ``W``
values just after that row, so a detector can compute any statistic over a
sliding window vectorised, and the result equals feeding the rows one at a
time.

Imports numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

# check_ring_counters lives with the other state checks; importable here too.
from detectors._state import Groups

IntArray = npt.NDArray[np.int64]


def push_ring(
    ring: npt.NDArray[Any],
    pos: IntArray,
    length: IntArray,
    groups: Groups,
    sorted_values: npt.NDArray[Any],
    fill: float,
    rows: IntArray | None = None,
) -> tuple[npt.NDArray[Any], IntArray]:
    """Append one value per row to each client's ring and return its windows.

    Parameters
    ----------
    ring, pos, length
        Arena arrays: ``ring[slot]`` holds ``W`` values, ``pos[slot]`` the next
        index to write, ``length[slot]`` how many are filled. Updated in place.
    groups
        The batch grouped by client.
    sorted_values
        The value of each row, in ``groups`` (sorted) order.
    fill
        Written in window cells before the client's first value.
    rows
        Sorted-order indices of the rows whose windows are wanted (all when
        None); building windows is most of the cost, so a caller that needs
        only each client's last one says so.

    Returns
    -------
    tuple of arrays
        For each wanted row: its client's window just after the row, shape
        (m, W), oldest first and the row's own value last (``fill`` on the
        left while the client has fewer than ``W`` values), and how many cells
        are filled.
    """
    width = ring.shape[1]
    n = len(sorted_values)
    g = groups.group
    t = groups.position
    old_len = length[groups.unique]
    old_pos = pos[groups.unique]
    columns = np.arange(width)
    ring_index = (old_pos[:, None] - old_len[:, None] + columns[None, :]) % width
    old = ring[groups.unique[:, None], ring_index]  # oldest first

    wanted = np.arange(n) if rows is None else rows
    g_w = g[wanted]
    row_old_len = old_len[g_w]
    total = row_old_len + t[wanted] + 1
    k = total[:, None] - width + columns[None, :]  # index into old ++ new
    from_old = k < row_old_len[:, None]
    old_vals = old[g_w[:, None], np.clip(k, 0, width - 1)]
    new_index = groups.start[g_w][:, None] + (k - row_old_len[:, None])
    new_vals = sorted_values[np.clip(new_index, 0, max(n - 1, 0))]
    windows = np.where(from_old, old_vals, new_vals)
    windows[k < 0] = fill

    last = t >= groups.size[g] - width
    ring[groups.slot[last], (old_pos[g[last]] + t[last]) % width] = sorted_values[last]
    pos[groups.unique] = (old_pos + groups.size) % width
    length[groups.unique] = np.minimum(old_len + groups.size, width)
    return windows, np.minimum(total, width)


def unsort(groups: Groups) -> IntArray:
    """The permutation taking sorted-order arrays back to row order."""
    inverse = np.empty(len(groups.order), dtype=np.int64)
    inverse[groups.order] = np.arange(len(groups.order))
    return inverse
