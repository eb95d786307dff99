"""Compiled sums add in numpy's pairwise order, so kernels that use them
(``prada``'s Shapiro-Wilk statistic, ``traffic``'s window measures) give the
floats the numpy code they replaced gave."""

from __future__ import annotations

import numpy as np

from detectors._numpysum import pairwise_sum


def test_pairwise_sum_adds_in_numpys_order() -> None:
    # Magnitudes over 16 decades make every change of order show; lengths
    # cover the plain loop, the 8 accumulators and the halving above 128.
    rng = np.random.default_rng(0)
    for n in [*range(0, 300), 511, 512, 513, 1000, 1023, 1024, 4096, 4099]:
        values = rng.exponential(1.0, n) * 10 ** rng.uniform(-8, 8, n)
        assert 0.0 + pairwise_sum(values, 0, n) == np.add.reduce(values), n
        if n > 10:
            inner = values[3 : n - 4]
            assert pairwise_sum(values, 3, n - 7) == np.add.reduce(inner), n
