"""``margin``'s cohort look-ups: the same members as a scan of every key, at
a cost that no longer multiplies the looking keys by all keys.

Each young key whose own trend z reaches ``member_z``, or whose own rank z
reaches ``rank_member_z``, looks for its cohort once per batch, and an
attacker makes every key of every batch look. The look-ups scanned every
slot per looking key: a 256-row batch over 50,000 keys that started in one
instant took 373 ms (110 ms over 20,000, 13 ms over 1,000; traffic's
look-up 1.9 ms over 50,000). They now binary-search the keys that started
near the looking ones, sorted once per batch
(:func:`detectors._cohort.float_pool`): 3.9 ms over 50,000 (measured by
hand on the shared 2-core machine); since, they are kept in order of first
time across batches (:mod:`detectors._startorder`, the same sums bit for
bit: ``tests/detectors/test_start_order.py``). These tests pin that the look-ups find
what the scan found, boundaries, ties and large cohorts included, and bound
the cost of the attack's batch far above the new cost and below the old."""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt
import pytest

from detectors._cohort import DIRECT_MAX
from detectors.margin import MarginDetector, MarginParams

T0 = 1.7e9


def _members(detector: MarginDetector, slot: int) -> npt.NDArray[np.bool_]:
    """The cohort as first written: a scan of every slot."""
    assert detector._arena is not None
    arrays = detector._arena.arrays
    p = detector.params
    first, done = arrays["first_s"], arrays["n_answers"]
    pace = max(2.0, p.cohort_pace_share * float(done[slot]))
    found: npt.NDArray[np.bool_] = (
        (first > 0)
        & (np.abs(first - first[slot]) <= p.cohort_window_s)
        & (np.abs(done - done[slot]) <= pace)
    )
    return found


def _scan_openings(
    detector: MarginDetector, slots: npt.NDArray[np.int64]
) -> dict[int, tuple[float, int]]:
    assert detector._arena is not None
    arrays = detector._arena.arrays
    p = detector.params
    out = {}
    answers = arrays["n_answers"][slots]
    var = arrays["young_v"][slots]
    young = (answers >= p.opening_min) & (answers <= p.window) & (var > 0)
    z = np.zeros(len(slots))
    z[young] = arrays["young_s"][slots[young]] / np.sqrt(var[young])
    for slot in np.unique(slots[young & (z >= p.member_z)]).tolist():
        members = (arrays["young_v"] > 0) & _members(detector, slot)
        count = int(np.count_nonzero(members))
        if count < p.cohort_min_keys:
            continue
        total = float(arrays["young_v"][members].sum())
        out[slot] = (float(arrays["young_s"][members].sum()) / np.sqrt(total), count)
    return out


def _scan_ranks(
    detector: MarginDetector, slots: npt.NDArray[np.int64], var: float
) -> dict[int, tuple[float, float, int]]:
    assert detector._arena is not None
    arrays = detector._arena.arrays
    p = detector.params
    w, w2, wu = arrays["rank_w"], arrays["rank_w2"], arrays["rank_wu"]
    some = w2[slots] > 0
    effective = np.divide(
        w[slots] ** 2, w2[slots], out=np.zeros(len(slots)), where=some
    )
    mean = np.divide(wu[slots], w[slots], out=np.full(len(slots), 0.5), where=some)
    own_z = detector._rank_z(mean, effective, var)
    ask = some & (arrays["n_answers"][slots] <= p.window) & (own_z >= p.rank_member_z)
    out = {}
    for slot in np.unique(slots[ask]).tolist():
        members = _members(detector, slot) & (w2 > 0)
        count = int(np.count_nonzero(members))
        if count < p.cohort_min_keys:
            continue
        total_w = float(w[members].sum())
        pooled_n = total_w * total_w / float(w2[members].sum())
        if pooled_n < p.rank_min_answers:
            continue
        pooled_mean = float(wu[members].sum()) / total_w
        z = float(
            detector._rank_z(np.array([pooled_mean]), np.array([pooled_n]), var)[0]
        )
        out[slot] = (pooled_mean, z, count)
    return out


def _random_state(
    rng: np.random.Generator, n_keys: int, params: MarginParams
) -> tuple[MarginDetector, npt.NDArray[np.int64]]:
    """Keys with random but valid sums, first times bunched on and one float
    step either side of another key's ``first +- cohort_window_s``, and one
    crowd of 150 keys at one time and count (a cohort past ``DIRECT_MAX``,
    pooled by running sums)."""
    detector = MarginDetector(params)
    ids = [f"k{i}" for i in range(n_keys)]
    detector.score_batch(ids, np.zeros((n_keys, 2)), arrival_s=np.full(n_keys, T0))
    assert detector._arena is not None
    arrays = detector._arena.arrays
    slots = detector._arena.slots(ids)
    w_s = params.cohort_window_s
    anchors = T0 + rng.integers(0, 8, n_keys) * w_s * rng.choice([0.5, 1.0, 1.5])
    first = anchors + rng.choice([0.0, w_s, -w_s], n_keys)
    first = np.nextafter(first, first + rng.integers(-1, 2, n_keys))
    spread = rng.random(n_keys) < 0.3
    first[spread] = T0 + rng.uniform(-2.0, 2.0, int(spread.sum()))
    first[rng.random(n_keys) < 0.03] = 0.0  # never scored
    done = rng.integers(1, params.window + 20, n_keys)
    crowd = slice(0, 150)
    first[crowd] = T0 + 100.0
    done[crowd] = 20
    arrays["first_s"][slots] = first
    arrays["n_answers"][slots] = done
    n = np.minimum(done, params.young_answers).astype(np.float64)
    full = n * (n - 1.0) * (2.0 * n + 5.0) / 18.0
    arrays["young_v"][slots] = np.where(rng.random(n_keys) < 0.9, full, 0.0)
    climb = rng.random(n_keys) < 0.5
    top = n * (n - 1.0) / 2.0
    arrays["young_s"][slots] = np.where(
        arrays["young_v"][slots] > 0,
        np.rint(np.where(climb, 0.6, rng.uniform(-0.3, 0.3, n_keys)) * top),
        0.0,
    )
    weight = np.minimum(done, 40).astype(np.float64) * rng.uniform(0.5, 1.0, n_keys)
    weight[rng.random(n_keys) < 0.05] = 0.0
    arrays["rank_w"][slots] = weight
    arrays["rank_w2"][slots] = weight * rng.uniform(0.3, 1.0, n_keys)
    low = rng.random(n_keys) < 0.5
    arrays["rank_wu"][slots] = weight * np.where(
        low, 0.1, rng.uniform(0.3, 0.7, n_keys)
    )
    return detector, slots


PARAMS = [
    MarginParams(),
    MarginParams(cohort_window_s=0.001, cohort_pace_share=0.0),
    MarginParams(cohort_window_s=3600.0, cohort_pace_share=10.0),
    MarginParams(cohort_min_keys=2, member_z=0.0, rank_member_z=0.0),
    MarginParams(cohort_window_s=0.1, cohort_pace_share=0.05, rank_min_answers=8),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("params", PARAMS, ids=range(len(PARAMS)))
def test_the_look_ups_find_what_a_scan_of_every_key_found(
    seed: int, params: MarginParams
) -> None:
    rng = np.random.default_rng(seed)
    detector, all_slots = _random_state(rng, 500, params)
    batch = np.concatenate([all_slots[:40], rng.choice(all_slots, 300)])
    expected = _scan_openings(detector, batch)
    _, _, pooled, size = detector._opening_evidence(batch)
    got = {
        int(slot): (float(pooled[i]), int(size[i]))
        for i, slot in enumerate(batch.tolist())
        if pooled[i] != 0.0
    }
    assert got.keys() == expected.keys()
    assert len(expected) > 0, "the state must give some pooled openings"
    for slot, (z, count) in expected.items():
        assert got[slot][1] == count
        assert got[slot][0] == pytest.approx(z, rel=1e-9)
    assert max(count for _, count in expected.values()) > DIRECT_MAX

    var = 1.0 / 12.0
    detector._rank_baseline = lambda: (np.linspace(0.0, 1.0, 256), var)  # type: ignore[method-assign]  # a ready live baseline
    detector._base_live = 4096
    expected_ranks = _scan_ranks(detector, batch, var)
    ranks = detector._rank_evidence(batch)
    got_ranks = {
        int(slot): (
            float(ranks.pooled_mean[i]),
            float(ranks.pooled_z[i]),
            int(ranks.keys[i]),
        )
        for i, slot in enumerate(batch.tolist())
        if ranks.pooled_z[i] != 0.0
    }
    assert got_ranks.keys() == expected_ranks.keys()
    assert len(expected_ranks) > 0, "the state must give some pooled ranks"
    for slot, (mean, z, count) in expected_ranks.items():
        assert got_ranks[slot][2] == count
        assert got_ranks[slot][0] == pytest.approx(mean, rel=1e-9)
        assert got_ranks[slot][1] == pytest.approx(z, rel=1e-9, abs=1e-9)


def _crowd(n_keys: int) -> tuple[MarginDetector, list[str]]:
    """``n_keys`` keys started in one instant, 12 answers each whose
    confidence climbs and stays under honest answers': every key looks for
    both cohorts on every batch."""
    detector = MarginDetector(MarginParams())
    rng = np.random.default_rng(0)
    x = rng.random((600, 4))
    detector.learn_baseline(x)
    honest = np.where(rng.random(600) < 0.15, rng.random(600) * 0.5, 0.95)
    proba = np.column_stack([(1.0 + honest) / 2.0, (1.0 - honest) / 2.0])
    detector.learn_output_baseline(x, proba)
    detector.score_batch([f"h{i}" for i in range(600)], x, arrival_s=np.full(600, T0))
    detector.observe_outputs([f"h{i}" for i in range(600)], x, proba)
    ids = [f"k{i}" for i in range(n_keys)]
    quiet = [False] * n_keys
    for step in range(12):
        rows = rng.random((n_keys, 4))
        at = np.full(n_keys, T0 + 100.0 + 0.25 * step)
        detector.score_batch(ids, rows, learn=quiet, arrival_s=at)
        m = np.full(n_keys, 0.01 + 0.08 * step)
        answers = np.column_stack([(1.0 + m) / 2.0, (1.0 - m) / 2.0])
        detector.observe_outputs(ids, rows, answers, learn=quiet)
    return detector, ids


def test_a_crowd_of_looking_keys_costs_a_batch_little() -> None:
    """20,000 keys of one start and pace, every one of them looking: a
    256-row batch took 72 ms of CPU time (110 ms wall) with a scan per
    looking key, about 1.5 ms with the look-up; 20 ms is far from both
    (the best of three batches)."""
    detector, ids = _crowd(20_000)
    rng = np.random.default_rng(1)
    spent = []
    for _ in range(3):
        pick = [ids[i] for i in rng.choice(len(ids), 256, replace=False)]
        began = time.process_time()
        scores = detector.score_batch(
            pick,
            rng.random((256, 4)),
            learn=[False] * 256,
            arrival_s=np.full(256, T0 + 104.0),
        )
        spent.append(time.process_time() - began)
    assert all(s.flagged for s in scores), "every key of the crowd must look"
    assert "pooled with 19999 other keys" in scores[0].evidence
    assert min(spent) < 0.020
