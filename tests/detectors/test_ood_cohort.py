"""Known answers for ``ood``'s cohort test: young keys that started together
at one pace pool their outlier counts.

Equation solving spread over ten keys gives each key about three queries, too
few for a key to be judged alone (three counted wide queries, or five
queries); its keys start within a fraction of a second at one pace. Every
test here that flags a key through its cohort fails on the detector without
the cohort test (no key is warm)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from detectors import OodParams, OutOfDistributionDetector
from detectors._binomial import upper_tail
from detectors._cohort import pool
from detectors.base import DetectorScore
from tests.detectors.test_ood import continuous_reference, wide_queries

T0 = 1.7e9


def ready(**params: Any) -> OutOfDistributionDetector:
    detector = OutOfDistributionDetector(OodParams(**params))
    detector.learn_baseline(continuous_reference())
    return detector


def honest_rows(n: int, seed: int = 1) -> npt.NDArray[np.float64]:
    return continuous_reference(seed=seed)[:n]


def send(
    detector: OutOfDistributionDetector,
    keys: list[str],
    X: npt.NDArray[np.float64],
    times: npt.NDArray[np.float64] | list[float],
) -> list[DetectorScore]:
    # Not learned: the honest rate stays the prior's (0.02) in the evidence.
    return detector.score_batch(
        keys, X, learn=[False] * len(keys), arrival_s=np.asarray(times)
    )


def test_ten_keys_of_one_wide_query_each_are_flagged_together() -> None:
    # One wide query on each of ten keys started within 90 ms: alone, no key
    # is warm (1 counted wide query of range_early 3, 1 query of 5).
    keys = [f"k{k}" for k in range(10)]
    times = T0 + np.arange(10) * 0.01
    scores = send(ready(), keys, wide_queries(10, seed=2), times)
    assert all(s.warm and s.flagged for s in scores)
    assert [s.score for s in scores] == [1.0] * 10
    assert scores[0].evidence.startswith(
        "10 of the 10 queries of 10 keys whose first query came within 0.25 s "
        "of its own, at its pace, look unlike normal traffic (chance 1.0e-17 "
        "for honest keys at an outlier rate of 0.020); its own 1 of 1"
    )
    # The same queries from keys started a second apart: each on its own.
    apart = send(ready(), keys, wide_queries(10, seed=2), T0 + np.arange(10))
    assert not any(s.warm for s in apart)
    # And with the cohort test off.
    off = send(ready(cohort_window_s=0.0), keys, wide_queries(10, seed=2), times)
    assert not any(s.warm for s in off)


def test_the_score_is_the_pooled_share_and_an_ordinary_cohort_stays_below() -> None:
    # Three keys of three queries, two wide each: 6 of 9 (tail 1.2e-8), a
    # share of 0.67, past the block level (1.5 x 0.3). The same keys with one
    # wide query between them: 1 of 9 (tail 0.17) is not counted.
    detector = ready()
    keys = ["a", "b", "c"] * 3
    rows = honest_rows(9).copy()
    rows[3:9] = wide_queries(6, seed=3)
    times = T0 + np.repeat(np.arange(3) * 0.25, 3) + np.tile([0.0, 0.01, 0.02], 3)
    scores = send(detector, keys, rows, times)
    assert [s.score for s in scores[-3:]] == pytest.approx([6 / 9] * 3)
    assert all(s.score >= 1.5 * detector.params.threshold for s in scores[-3:])
    # Rows before a key's own first wide query are not scored by the cohort.
    assert not any(s.warm for s in scores[:3])

    ordinary = ready()
    rows = honest_rows(9).copy()
    rows[8] = wide_queries(1, seed=3)[0]
    scores = send(ordinary, keys, rows, times)
    assert upper_tail(np.array([1]), np.array([9]), 0.02)[0] > 0.1
    assert not any(s.warm for s in scores)


def test_a_key_needs_evidence_of_its_own_and_company_at_its_pace() -> None:
    detector = ready()
    # Three thieves with one wide query each, and an honest key started with
    # them whose one query is ordinary: it pools (4 keys, 3 of 4) but has no
    # evidence of its own, so it is not scored.
    keys = ["t0", "t1", "t2", "honest"]
    X = np.vstack([wide_queries(3, seed=4), honest_rows(1)])
    scores = send(detector, keys, X, T0 + np.arange(4) * 0.01)
    assert [s.flagged for s in scores] == [True, True, True, False]
    assert scores[0].score == pytest.approx(3 / 4)
    assert "3 of the 4 queries of 4 keys" in scores[0].evidence

    # Two keys are not a cohort (cohort_min_keys 3).
    pair = send(ready(), ["t0", "t1"], wide_queries(2, seed=4), [T0, T0 + 0.01])
    assert not any(s.warm for s in pair)

    # A third key that has sent ten ordinary queries is not at their pace
    # (counts 1 and 11 are more than 2 apart), so the two stay alone.
    paced = ready()
    send(paced, ["busy"] * 10, honest_rows(10), T0 + np.arange(10) * 0.001)
    keys = ["t0", "t1", "busy"]
    scores = send(
        paced, keys, wide_queries(3, seed=4), T0 + np.array([0.0, 0.01, 0.02])
    )
    assert not any(s.flagged for s in scores)


def test_only_young_keys_pool() -> None:
    # Keys past their first `window` queries are neither scored through a
    # cohort nor counted in one.
    detector = ready(window=10)
    keys = [f"old{k}" for k in range(3)]
    send(detector, keys * 10, honest_rows(30), T0 + np.repeat(np.arange(10) * 0.01, 3))
    scores = send(detector, keys, wide_queries(3, seed=5), [T0 + 0.2] * 3)
    assert not any("keys whose first query" in s.evidence for s in scores)


def test_cohort_parameters_change_live_and_counting_goes_on_while_off() -> None:
    keys = [f"k{k}" for k in range(5)]
    times = T0 + np.arange(5) * 0.01
    detector = ready(cohort_window_s=0.0)
    assert not any(s.warm for s in send(detector, keys, wide_queries(5, 6), times))
    # Turned on: the first times were recorded while off.
    detector.set_params(cohort_window_s=0.25)
    later = send(detector, keys, wide_queries(5, 7), times + 0.25)
    assert all(s.flagged for s in later)
    assert "10 of the 10 queries of 5 keys" in later[0].evidence

    detector.set_params(cohort_min_keys=6)
    assert not any(
        "keys whose first" in s.evidence
        for s in send(detector, keys, honest_rows(5), times + 0.5)
    )
    detector.set_params(cohort_min_keys=3, cohort_min_own=3)
    assert not any(
        "keys whose first" in s.evidence
        for s in send(detector, keys, honest_rows(5), times + 0.75)
    )
    detector.set_params(cohort_min_own=2, cohort_significance=1e-30)
    assert not any(
        "keys whose first" in s.evidence
        for s in send(detector, keys, honest_rows(5), times + 1.0)
    )
    detector.set_params(cohort_significance=1e-4, cohort_member_tail=1e-6)
    assert not any(
        "keys whose first" in s.evidence
        for s in send(detector, keys, honest_rows(5), times + 1.1)
    )
    detector.set_params(cohort_member_tail=0.05, cohort_pace_share=0.5)
    assert all(
        "keys whose first" in s.evidence
        for s in send(detector, keys, honest_rows(5), times + 1.25)
    )
    for bad in (
        {"cohort_window_s": -0.1},
        {"cohort_window_s": 4000.0},
        {"cohort_pace_share": -0.1},
        {"cohort_min_keys": 1},
        {"cohort_min_own": 0},
        {"cohort_member_tail": 0.0},
        {"cohort_significance": 0.0},
        {"cohort_significance": 1.5},
    ):
        with pytest.raises(ValueError, match="cohort"):
            detector.set_params(**bad)
        with pytest.raises(ValueError):
            OodParams(**bad)
    assert detector.params.cohort_pace_share == 0.5


def test_first_query_time_is_handed_over() -> None:
    # Four keys of one cohort handed over to another worker after one
    # ordinary query each: there, their second queries (wide) are judged
    # with the cohort (4 of 8, tail 1.1e-5) as if no hand-over had happened.
    keys = ["k0", "k1", "k2", "k3"]
    times = T0 + np.arange(4) * 0.01
    before = ready()
    send(before, keys, honest_rows(4), times)
    blobs = {key: before.dump_state(key) for key in keys}
    after = ready()
    for key, blob in blobs.items():
        assert blob is not None
        after.load_state(key, blob)
    assert after._arena is not None and before._arena is not None
    for key in keys:
        a, b = after._arena.get(key), before._arena.get(key)
        assert after._arena.arrays["first_s"][a] == before._arena.arrays["first_s"][b]
    X = wide_queries(4, seed=8)
    expected = send(before, keys, X, times + 0.25)
    got = send(after, keys, X, times + 0.25)
    assert got == expected
    assert all("keys whose first query" in s.evidence for s in got)


def test_without_arrival_times_the_call_dates_a_key() -> None:
    # Rows scored without times (a caller that has none) take the time of
    # the call, as traffic does: ten keys in one call started together.
    detector = ready()
    before = time.time()
    scores = detector.score_batch(
        [f"k{k}" for k in range(10)], wide_queries(10, seed=2), learn=[False] * 10
    )
    assert all(s.flagged for s in scores)
    assert detector._arena is not None
    first = detector._arena.arrays["first_s"][detector._arena.get("k0")]
    assert first >= before


def _scan(
    asking: npt.NDArray[np.int64],
    seen: npt.NDArray[np.int64],
    first: npt.NDArray[np.float64],
    a: npt.NDArray[np.int64],
    b: npt.NDArray[np.int64],
    window: int,
    pace_share: float,
    window_s: float,
) -> list[tuple[int, int, int]]:
    """The look-up as a scan of every slot per asking key."""
    out = []
    young = (seen > 0) & (seen <= window)
    for slot in asking.tolist():
        pace = max(2.0, pace_share * float(seen[slot]))
        members = (
            young
            & (np.abs(seen - seen[slot]) <= pace)
            & (np.abs(first - first[slot]) <= window_s)
        )
        out.append((int(members.sum()), int(a[members].sum()), int(b[members].sum())))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_pool_finds_what_a_scan_finds(seed: int) -> None:
    # Ties in time and count, boundaries at exactly window_s, old keys,
    # fresh slots: the sorted look-up takes exactly the scan's members.
    rng = np.random.default_rng(seed)
    n, window = 3000, 50
    seen = rng.integers(0, 70, n)
    first = np.where(seen > 0, T0 + np.round(rng.uniform(0, 3.0, n), 2), 0.0)
    a = seen.copy()
    b = rng.integers(0, 5, n)
    asking = np.unique(rng.choice(np.flatnonzero((seen > 0) & (seen <= window)), 300))
    got = pool(asking, seen, first, a, b, window, 0.2, 0.25)
    expected = _scan(asking, seen, first, a, b, window, 0.2, 0.25)
    assert (
        list(
            zip(
                got.keys.tolist(),
                got.total_a.tolist(),
                got.total_b.tolist(),
                strict=True,
            )
        )
        == expected
    )
    empty = pool(np.zeros(0, dtype=np.int64), seen, first, a, b, window, 0.2, 0.25)
    assert len(empty.keys) == 0


@pytest.mark.parametrize("origin", [0.0, -5e15, 9.9e15])
def test_the_time_filter_keeps_every_member_at_any_clock(origin: float) -> None:
    # candidates() narrows the young keys to the asking keys' span before
    # sorting; near 1e16 s a float's spacing is 2 s, and the kernel's
    # rounded test must still find exactly the scan's members.
    rng = np.random.default_rng(7)
    n, window = 2000, 50
    seen = rng.integers(1, 8, n)
    first = origin + np.round(rng.uniform(0.0, 40.0, n), 1)
    a, b = seen.copy(), rng.integers(0, 3, n)
    asking = np.unique(rng.choice(n, 50))
    for window_s in (0.25, 2.0, 3.0):
        got = pool(asking, seen, first, a, b, window, 0.2, window_s)
        expected = _scan(asking, seen, first, a, b, window, 0.2, window_s)
        assert (
            list(
                zip(
                    got.keys.tolist(),
                    got.total_a.tolist(),
                    got.total_b.tolist(),
                    strict=True,
                )
            )
            == expected
        )
