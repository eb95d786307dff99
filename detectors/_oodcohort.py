"""The ``ood`` detector's cohort test: outlier counts pooled over young keys.

Spread over many keys, equation solving gives each key a few queries,
too few for a key's own count to be judged. Young keys whose first
queries came within ``cohort_window_s`` of each other and that keep one
pace form a cohort; :func:`cohort_evidence` pools their outlier counts
and judges the pooled count by its binomial tail at the honest rate. The
detector (:mod:`detectors.ood`, whose docstring says what the test
catches and misses, with its measurements) decides which keys ask and
scores them by the pooled share.

Imports numpy, :mod:`detectors._binomial`, :mod:`detectors._cohort` and
:mod:`detectors._oodparams` only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._binomial import upper_tail
from detectors._cohort import candidates, pool
from detectors._oodparams import OodParams

logger = logging.getLogger(__name__)


def cohort_evidence(
    arrays: Mapping[str, npt.NDArray[Any]],
    slots: npt.NDArray[np.int64],
    ask: npt.NDArray[np.bool_],
    rate: float,
    p: OodParams,
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
    key in one batch gets one cohort verdict. The young keys that
    started near the asking ones are sorted once per batch and each
    asking key's cohort found by binary searches
    (:func:`detectors._cohort.pool`): with 20,000 young honest keys,
    a batch of 256 new thief keys took the detector 1.2 ms, against
    0.6 ms with the cohort test off (median of 18 batches, measured
    once by hand on a shared 2-core machine; the look-up itself about
    0.5 ms).
    """
    n = len(slots)
    found = CohortEvidence.empty(n)
    if p.cohort_window_s <= 0.0:
        return found
    n_seen = arrays["n_seen"]
    asking = np.unique(slots[ask])
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
