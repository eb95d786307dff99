"""The compiled measures of ``traffic`` equal numpy's to the bit.

Its sums must add in numpy's pairwise order, or a judged window's rate and
burstiness (and, through the baseline, later scores) drift in the last bits
from the numpy code they replaced. The reference below is that numpy code.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from detectors._traffickernels import window_features


def _numpy_features(
    times: npt.NDArray[np.float64], tolerance: float
) -> npt.NDArray[np.float64]:
    """Log rate, burstiness and regularity per window, as numpy computed them
    before the loop was compiled."""
    gaps = np.diff(times, axis=1)
    valid = np.isfinite(gaps) & (gaps > 0)
    count = valid.sum(axis=1)
    safe = np.where(valid, gaps, np.nan)
    span = np.nansum(safe, axis=1)
    rate = np.log10(np.maximum(count, 1) / np.maximum(span, 1e-3))
    filled = np.maximum(count, 1)
    mean = np.where(count > 0, span / filled, 0.0)
    deviation = np.where(valid, gaps - mean[:, None], 0.0)
    std = np.sqrt((deviation * deviation).sum(axis=1) / filled)
    cv = np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), 0.0)
    ordered = np.sort(safe, axis=1)
    rows = np.arange(len(gaps))
    median = np.where(
        count > 0,
        (ordered[rows, (filled - 1) // 2] + ordered[rows, filled // 2]) / 2.0,
        0.0,
    )
    with np.errstate(invalid="ignore"):
        near = np.abs(safe - median[:, None]) <= tolerance * median[:, None]
    regular = np.where(count > 0, (near & valid).sum(axis=1) / filled, 0.0)
    return np.stack([rate, np.nan_to_num(cv), regular], axis=1)


@pytest.mark.parametrize("width", [8, 9, 32, 33, 130, 300, 1024])
def test_features_equal_numpys_to_the_bit(width: int) -> None:
    rng = np.random.default_rng(width)
    scale = 10 ** rng.uniform(-3, 3, (50, 1))
    times = 1.7e9 + np.cumsum(rng.exponential(1.0, (50, width)) * scale, axis=1)
    times[:, 5] = times[:, 4]  # rows of one request share a time
    times[rng.random((50, width)) < 0.05] = np.nan
    for i in range(0, 50, 3):  # clients with fewer than W requests
        times[i, : rng.integers(0, width + 1)] = np.nan
    times[1, 1::2] = times[1, 0:-1:2]  # every other gap zero
    times[2] = 1.7e9 + np.arange(width) * 0.5  # a metronome
    got = window_features(times, 0.05)
    want = _numpy_features(times, 0.05)
    assert np.array_equal(got, want), np.abs(got - want).max()
