"""The ``ood`` detector's per-client state: the compiled loop that advances
its counters, what a loaded one must satisfy, and how a state of the
previous release is read.

A state comes back from Redis on rebalance and may have been written by
anyone who can write there, so :func:`check_state` refuses one whose
rings and counters disagree, or that would carry invented outliers into
an honest cohort's pool. :func:`client_counts` advances a batch's
counters row by row, in arrival order. A state saved by the release before
``lattice_block`` holds no ring of off-lattice bits;
:func:`with_off_lattice_ring` derives one from its counters. The layout
itself is the detector's (:meth:`detectors.ood.OutOfDistributionDetector._layout`).

Imports numpy, :mod:`detectors._jit` (numba), :mod:`detectors._state` and
``traffic``'s time bound only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._jit import jit
from detectors._state import check_counters, check_window
from detectors.traffic import MAX_TIME_S


@jit
def client_counts(
    slots: npt.NDArray[np.int64],
    raw: npt.NDArray[np.float64],
    synthetic: npt.NDArray[np.bool_],
    wide: npt.NDArray[np.bool_],
    arrival_s: npt.NDArray[np.float64],
    n_seen: npt.NDArray[np.int64],
    n_off_lattice: npt.NDArray[np.int64],
    n_wide: npt.NDArray[np.int64],
    ewma: npt.NDArray[np.float64],
    first_s: npt.NDArray[np.float64],
    alpha: float,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
]:
    """Advance each client's counters row by row, in arrival order.

    Per row, after it: its client's queries seen, off-lattice queries and
    counted wide queries so far, and the running mean anomaly score,
    ``e <- e + alpha * (x - e)`` from the stored mean, or ``x`` for the
    client's first query ever, whose arrival time goes to ``first_s``. The
    arena arrays (indexed by slot) are updated in place, so a batch ends
    where its rows sent one at a time would.
    """
    n = slots.shape[0]
    seen = np.empty(n, dtype=np.int64)
    off_so_far = np.empty(n, dtype=np.int64)
    wide_so_far = np.empty(n, dtype=np.int64)
    mean = np.empty(n)
    for i in range(n):
        slot = slots[i]
        x = raw[i]
        if n_seen[slot] == 0:
            ewma[slot] = x
            first_s[slot] = arrival_s[i]
        else:
            ewma[slot] = ewma[slot] + alpha * (x - ewma[slot])
        n_seen[slot] += 1
        n_off_lattice[slot] += synthetic[i]
        n_wide[slot] += wide[i]
        seen[i] = n_seen[slot]
        off_so_far[i] = n_off_lattice[slot]
        wide_so_far[i] = n_wide[slot]
        mean[i] = ewma[slot]
    return seen, off_so_far, wide_so_far, mean


def with_off_lattice_ring(
    old: Mapping[str, npt.NDArray[Any]],
) -> dict[str, npt.NDArray[Any]]:
    """A state of the release before lattice_block, with the ring of
    off-lattice bits it did not keep, derived conservatively.

    Which outliers of the window were off the lattice was not stored,
    only how many off-lattice queries the client ever sent. At least
    ``n_off_lattice - (n_seen - outlier_len)`` of them are still in the
    window (the rest of its queries have left it); that many bits are
    set, on the oldest outliers of the window. As the window slides the
    derived count is then never above the true one, so the migration
    never refuses a client the old release's history would not have;
    for a young key (its whole history in the window) it is exact. The
    cost: a client past its first window that had off-lattice queries
    in the window may reach ``lattice_block`` later than it would have,
    by at most those queries, and only during the ``window`` queries
    after the upgrade (after them the ring holds only new queries).
    """
    check_window(old, "outlier", "outlier_pos", "outlier_len")
    ring = old["outlier"]
    window = len(ring)
    pos, length = int(old["outlier_pos"]), int(old["outlier_len"])
    left_window = max(int(old["n_seen"]) - length, 0)
    in_window = max(int(old["n_off_lattice"]) - left_window, 0)
    off = np.zeros(window, dtype=np.uint8)
    if in_window:
        # The window's cells oldest first, and the outliers among them.
        cells = (pos - length + np.arange(length)) % window
        outliers = cells[ring[cells] != 0]
        if len(outliers) < in_window:
            raise ValueError(
                f"state counts {in_window} off-lattice queries in the "
                f"window but its window holds {len(outliers)} outliers"
            )
        off[outliers[:in_window]] = 1
    return {
        **old,
        "off_lattice": off,
        "off_lattice_pos": old["outlier_pos"],
        "off_lattice_len": old["outlier_len"],
    }


def check_state(values: Mapping[str, npt.NDArray[Any]], window: int) -> None:
    """Raise ValueError unless ``values`` is a state the detector could have
    saved with a window of ``window`` queries: rings and counters that
    agree, and nothing a forged state could carry into a cohort's pool or
    past ``lattice_block``."""
    check_window(values, "outlier", "outlier_pos", "outlier_len")
    check_window(values, "off_lattice", "off_lattice_pos", "off_lattice_len")
    check_counters(values, "n_seen")
    if not np.isfinite(values["ewma"]) or int(values["n_seen"]) < 0:
        raise ValueError("state field 'ewma' or 'n_seen' is invalid")
    for field in ("n_off_lattice", "n_wide"):
        if not 0 <= int(values[field]) <= int(values["n_seen"]):
            raise ValueError(f"state field {field!r} is invalid")
    seen = int(values["n_seen"])
    has_outlier = int(values["has_outlier"])
    # No previous outlier means nothing to be a repeat of: a stored row
    # there would be a forged one (the arena starts zeroed).
    stored = int(values["last_outlier"].astype(np.int64).sum())
    if (
        has_outlier not in (0, 1)
        or (has_outlier == 0 and stored != 0)
        or (seen == 0 and has_outlier != 0)
    ):
        raise ValueError("state field 'has_outlier' or 'last_outlier' is invalid")
    first = float(values["first_s"])
    if not abs(first) <= MAX_TIME_S or (seen == 0 and first != 0.0):
        raise ValueError("state field 'first_s' is invalid")
    # A young key's window holds every query it sent, and the cohort
    # test sums its bits as its outlier count: a forged young key whose
    # window claims more than it sent (or other than its counts imply)
    # would carry invented outliers into an honest cohort's pool.
    if seen <= window:
        ring = values["outlier"]
        length = int(values["outlier_len"])
        count = int(ring.sum())
        if (
            length != seen
            or int(values["outlier_pos"]) != seen % window
            or int(ring[length:].sum()) != 0
            or count < int(values["n_off_lattice"])
            or int(values["off_lattice"].sum()) != int(values["n_off_lattice"])
            or count < int(values["n_wide"])
            or count < has_outlier
        ):
            raise ValueError(
                "state fields 'outlier', 'outlier_pos' and 'outlier_len' "
                "do not match a young key's counts"
            )
    # The two rings advance together, and an off-lattice query is an
    # outlier: a forged ring of off-lattice bits alone would refuse (or,
    # emptied, spare) a key by lattice_block.
    if (
        int(values["off_lattice_pos"]) != int(values["outlier_pos"])
        or int(values["off_lattice_len"]) != int(values["outlier_len"])
        or bool((values["off_lattice"] > values["outlier"]).any())
    ):
        raise ValueError(
            "state field 'off_lattice' does not match the 'outlier' window"
        )
