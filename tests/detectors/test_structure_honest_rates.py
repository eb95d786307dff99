"""``structure`` on correlated tabular data: chance repeats of honest steps.

Honest breast-cancer clients were flagged by the repeat share: the size
features move together, so steps between unrelated patients often point the
same way, and 3 chance repeats in a client's first 10 queries reached the
share threshold. The detector now measures the honest rates on its reference
and judges a share only when its count is unlikely at them.
"""

from __future__ import annotations

import re

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_breast_cancer

from detectors import ChangeStructureDetector, StructureParams
from detectors.structure import honest_rates


def _split() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Reference and held-out rows, scaled to [0, 1] by the reference's range
    (as the worker scales a tabular model's inputs)."""
    X = np.asarray(load_breast_cancer().data, dtype=np.float64)
    reference, pool = X[::2], X[1::2]
    low, high = reference.min(axis=0), reference.max(axis=0)
    return (reference - low) / (high - low), np.clip((pool - low) / (high - low), 0, 1)


def _chance_repeats(pool: npt.NDArray[np.float64], at: tuple[int, ...]) -> list[int]:
    """Indices of 12 distinct held-out rows in which the steps into the rows
    at 1-based positions ``at`` are nearly parallel to the step before them,
    as an honest client meets by chance once in a few hundred clients; the
    other rows are taken in a seeded random order."""
    rng = np.random.default_rng(3)
    order = [int(i) for i in rng.permutation(len(pool))]
    chosen = order[:2]
    rest = order[2:]
    while len(chosen) < 12:
        if len(chosen) + 1 in at:
            last = pool[chosen[-1]] - pool[chosen[-2]]
            steps = pool[rest] - pool[chosen[-1]]
            cos = np.abs(steps @ last) / (
                np.linalg.norm(steps, axis=1) * np.linalg.norm(last)
            )
            pick = int(np.argmax(cos))
        else:
            pick = 0
        chosen.append(rest.pop(pick))
    return chosen


def _repeats(evidence: str) -> int:
    found = re.search(r"and (\d+) repeated a recent step", evidence)
    assert found is not None, evidence
    return int(found.group(1))


def test_chance_repeats_of_correlated_honest_rows_do_not_flag() -> None:
    reference, pool = _split()
    rows = pool[_chance_repeats(pool, (4, 7, 10))]
    # The mechanism as it was: without the count test, 3 repeats of 10 are
    # a share of 0.3 and flag at query 10.
    unchecked = ChangeStructureDetector(StructureParams(significance=1.0))
    unchecked.learn_baseline(reference)
    before = unchecked.score_batch(["h"] * 12, rows)
    assert _repeats(before[9].evidence) >= 3
    assert before[9].flagged
    detector = ChangeStructureDetector()
    detector.learn_baseline(reference)
    _, repeat_rate = detector.honest_rates
    # Measured on the reference: about 5% of honest steps repeat.
    assert 0.02 < repeat_rate < 0.1
    scores = detector.score_batch(["h"] * 12, rows)
    assert _repeats(scores[9].evidence) >= 3
    assert not any(s.flagged for s in scores), scores[9].evidence


def test_a_line_search_on_correlated_data_is_still_flagged_two_queries_later() -> None:
    reference, pool = _split()
    rng = np.random.default_rng(5)
    a, b = pool[0], pool[1]
    out = []
    while len(out) < 30:
        lo, hi = 0.0, 1.0
        for _ in range(10):
            mid = (lo + hi) / 2
            out.append(a + mid * (b - a))
            lo, hi = (mid, hi) if rng.random() < 0.5 else (lo, mid)
        b = np.clip(b + rng.normal(0.0, 0.05, b.shape), 0.0, 1.0)
    firsts = []
    for significance in (1.0, 1e-4):
        detector = ChangeStructureDetector(StructureParams(significance=significance))
        detector.learn_baseline(reference)
        scores = detector.score_batch(["line"] * 30, np.asarray(out))
        firsts.append(next(i + 1 for i, s in enumerate(scores) if s.flagged))
    # Without the count test at min_queries (4 repeats of 10); with it, once
    # the count is unlikely at the reference's 5% (6 of 12: chance 1.5e-5).
    assert firsts == [10, 12], firsts
    assert "chance 1.5e-05" in scores[11].evidence


def test_rates_default_to_the_floor_and_count_as_the_kernel() -> None:
    detector = ChangeStructureDetector(StructureParams(honest_rate=0.02))
    assert detector.honest_rates == (0.02, 0.02)
    # Three rows on one line, each changing all 5 features (not sparse): the
    # second step repeats the first exactly.
    line = np.array([[0] * 5, [10, 20, 30, 40, 50], [20, 40, 60, 80, 100]], np.uint8)
    assert honest_rates(line, 32, 8, 5.1, 3, 0.95) == pytest.approx((0.0, 0.5))
    with pytest.raises(ValueError):
        StructureParams(significance=0.0)
