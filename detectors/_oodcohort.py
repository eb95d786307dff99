"""The ``ood`` detector's cohort test: outlier counts pooled over young keys.

Spread over many keys, equation solving gives each key a few queries,
too few for a key's own count to be judged. Young keys whose first
queries came within ``cohort_window_s`` of each other and that keep one
pace form a cohort; :func:`cohort_evidence` pools their outlier counts
and judges the pooled count by its binomial tail at the honest rate. The
detector (:mod:`detectors.ood`, whose docstring says what the test
catches and misses, with its measurements) decides which keys ask and
scores them by the pooled share.

Imports numpy, :mod:`detectors._binomial`, :mod:`detectors._cohort`,
:mod:`detectors._cohortindex`, :mod:`detectors._jit` (numba),
:mod:`detectors._oodparams` and :mod:`detectors._state` only; nothing
from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._binomial import upper_tail
from detectors._cohort import Pooled, candidates, pool
from detectors._cohortindex import CohortIndex
from detectors._jit import jit
from detectors._oodparams import OodParams
from detectors._state import SlotArena

logger = logging.getLogger(__name__)


def cohort_evidence(
    arrays: Mapping[str, npt.NDArray[Any]],
    slots: npt.NDArray[np.int64],
    ask: npt.NDArray[np.bool_],
    rate: float,
    p: OodParams,
    index: tuple[CohortIndex, SlotArena] | None = None,
) -> CohortEvidence:
    """Per row: the pooled outlier share of its key's cohort (0 unless
    ``ask``, and the key's cohort has ``cohort_min_keys`` keys and a
    pooled count whose binomial tail at ``rate`` is at most
    ``cohort_significance``), with the counts behind it.

    ``ask`` is per row, as of the row: its key is young and has evidence
    of its own (``cohort_min_own``, ``cohort_member_tail``). The cohort is
    every young key (at most ``window`` queries, the window then holding
    all of them) whose first query came within ``cohort_window_s`` of
    this key's and whose query count is within ``cohort_pace_share`` (at
    least 2) of its own; membership depends on time and pace only, never
    on outliers, so an honest cohort's pooled share is as honest as one
    key's. The counts are read after the whole batch, so every row of a
    key in one batch gets one cohort verdict. Each asking key's cohort is
    found by binary searches in ``index`` (the detector's
    :class:`detectors._cohortindex.CohortIndex` and its arena), which
    keeps the young keys' query and outlier counts across batches and
    re-reads only the batch's keys. Without it, the young keys that
    started near the asking ones are sorted and their windows summed once
    per batch (:func:`detectors._cohort.pool`): the same result, kept as
    the reference the index is tested and measured against, at a cost
    that grows with those keys (with 20,000 young honest keys a batch of
    256 new thief keys took the detector 1.2 ms, against 0.6 ms with the
    cohort test off; one row over 50,000 keys started in one instant,
    4.4 ms).
    """
    n = len(slots)
    found = CohortEvidence.empty(n)
    if p.cohort_window_s <= 0.0:
        if index is not None:
            # Not kept while off: rebuilt when the test is back on.
            index[0].stale()
        return found
    n_seen = arrays["n_seen"]
    asking = np.unique(slots[ask])
    if index is not None:
        kept, arena = index
        window = arena.arrays["outlier"]

        def values(some: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
            out = np.empty((len(some), 2), dtype=np.int64)
            young_counts(
                np.ascontiguousarray(some, dtype=np.int64), n_seen, window, out
            )
            return out

        kept.update(arena, slots, p.window, values)
        sums = kept.pool(asking, p.cohort_pace_share, p.cohort_window_s, values)
        pooled = Pooled(sums[0], sums[1], sums[2])
    else:
        first = arrays["first_s"]
        # Only the outlier counts of young keys that may be members are
        # read (a young key's window holds every query it sent).
        young = candidates(asking, n_seen, first, p.window, p.cohort_window_s)
        outliers = np.zeros(len(n_seen), dtype=np.int64)
        if len(asking):
            outliers[young] = arrays["outlier"][young].sum(axis=1)
        pooled = pool(
            asking,
            n_seen,
            first,
            n_seen,
            outliers,
            p.window,
            p.cohort_pace_share,
            p.cohort_window_s,
            young,
        )
    tail = upper_tail(pooled.total_b, pooled.total_a, rate)
    counted = (pooled.keys >= p.cohort_min_keys) & (tail <= p.cohort_significance)
    if not counted.any():
        return found
    # Each asking row of a counted key, and which of them it is (asking
    # is sorted).
    at = np.minimum(np.searchsorted(asking, slots), len(asking) - 1)
    rows = ask & (asking[at] == slots) & counted[at]
    at = at[rows]
    found.share[rows] = pooled.total_b[at] / pooled.total_a[at]
    found.tail[rows] = tail[at]
    found.keys[rows] = pooled.keys[at]
    found.rows[rows] = pooled.total_a[at]
    found.outliers[rows] = pooled.total_b[at]
    logger.debug(
        "ood cohort test: %d of %d asking keys in a counted cohort",
        int(counted.sum()),
        len(asking),
        extra={"detector": "ood"},
    )
    return found


@dataclass(slots=True)
class CohortEvidence:
    """The cohort test's result per row of a batch (see
    :func:`cohort_evidence`)."""

    share: npt.NDArray[np.float64]
    tail: npt.NDArray[np.float64]
    keys: npt.NDArray[np.int64]
    rows: npt.NDArray[np.int64]
    outliers: npt.NDArray[np.int64]

    @classmethod
    def empty(cls, n: int) -> CohortEvidence:
        return cls(
            np.zeros(n),
            np.ones(n),
            *(np.zeros(n, dtype=np.int64) for _ in range(3)),
        )


@jit
def young_counts(
    slots: npt.NDArray[np.int64],
    n_seen: npt.NDArray[np.int64],
    outlier: npt.NDArray[np.uint8],
    out: npt.NDArray[np.int64],
) -> None:
    """Per slot, its query count and its outlier count (its window's sum: a
    young key's window holds every query it sent) into ``out``; compiled,
    where a gather of the windows and a numpy sum cost the index's update
    as much again."""
    for j in range(len(slots)):
        slot = slots[j]
        total = 0
        for i in range(outlier.shape[1]):
            total += outlier[slot, i]
        out[j, 0] = n_seen[slot]
        out[j, 1] = total
