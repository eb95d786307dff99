"""Binomial tests of counts: the upper tail, shared by the detectors that
judge a share only when the count behind it is unlikely for an honest client
(``ood``, ``structure``), and the normal approximation's z, which
``traffic``'s solo and cohort tests take.

Imports numpy and scipy only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.special import betainc


def upper_tail(
    counts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    rate: npt.NDArray[np.float64] | float,
) -> npt.NDArray[np.float64]:
    """``P(X >= count)`` for ``X ~ Binomial(length, rate)``, per row; 1 for a
    count of 0.

    Through the regularised incomplete beta function,
    ``P(X >= k) = I_rate(k, n - k + 1)`` for ``k >= 1``: exact, vectorised,
    and without summing the probability mass.

    Examples
    --------
    >>> upper_tail(np.array([0, 2, 3]), np.array([5, 5, 5]), 0.5).round(4).tolist()
    [1.0, 0.8125, 0.5]
    """
    counts = np.asarray(counts)
    lengths = np.asarray(lengths)
    tail: npt.NDArray[np.float64] = np.where(
        counts > 0,
        betainc(np.maximum(counts, 1), lengths - counts + 1, rate),
        1.0,
    )
    return tail


def binomial_z(
    hits: npt.NDArray[np.int64], trials: npt.NDArray[np.int64], rate: float
) -> npt.NDArray[np.float64]:
    """``(hits - trials * rate) / sqrt(trials * rate * (1 - rate))``, 0 where
    there are no trials."""
    trials_f = trials.astype(np.float64)
    spread = np.sqrt(np.maximum(trials_f, 1.0) * rate * (1.0 - rate))
    return np.where(trials > 0, (hits - trials_f * rate) / spread, 0.0)
