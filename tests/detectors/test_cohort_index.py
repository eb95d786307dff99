"""The index of young keys kept across batches
(:class:`detectors._cohortindex.CohortIndex`) finds, bit for bit, the cohorts
that sorting the young keys again on every batch found
(:func:`detectors._cohort.pool`), through counts that grow, keys that age out
of youth, slots freed and reused, states loaded, and live changes of the
cohort parameters; and ``traffic`` and ``ood`` score the same with it as
without it."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from detectors import OodParams, OutOfDistributionDetector, _cohortindex
from detectors._cohort import pool
from detectors._cohortindex import CohortIndex
from detectors._state import CHANGED_MAX, FieldSpec, SlotArena
from detectors.base import Detector
from detectors.traffic import TrafficDetector, TrafficParams
from tests.detectors.test_ood import continuous_reference, wide_queries

T0 = 1.7e9
FIELDS = {
    "n_seen": FieldSpec((), "<i8"),
    "first_s": FieldSpec((), "<f8"),
    "a": FieldSpec((), "<i8"),
    "b": FieldSpec((), "<i8"),
}


def _start_time(rng: np.random.Generator, window_s: float) -> float:
    """A first time on, or one float step beside, another key's edge of
    ``window_s``, or anywhere in a few seconds (and so often before the
    newest key's: a fresh slot)."""
    if rng.random() < 0.3:
        return float(T0 + rng.uniform(-3.0, 3.0))
    anchor = T0 + int(rng.integers(0, 6)) * window_s * float(rng.choice([0.5, 1.0]))
    at = anchor + float(rng.choice([0.0, window_s, -window_s]))
    return float(np.nextafter(at, at + int(rng.integers(-1, 2))))


def _values(arena: SlotArena) -> Any:
    def values(slots: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return np.stack([arena.arrays["a"][slots], arena.arrays["b"][slots]], axis=1)

    return values


@pytest.mark.parametrize("seed", range(6))
def test_the_index_finds_what_the_per_batch_sort_found(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small limits, so that fresh slots, full arrays and rebuilds all happen
    # within a few hundred slots.
    monkeypatch.setattr(_cohortindex, "FRESH_MIN", 6)
    monkeypatch.setattr(_cohortindex, "MIN_CAPACITY", 16)
    rng = np.random.default_rng(seed)
    arena = SlotArena(FIELDS, initial_slots=8)
    index = CohortIndex(2)
    values = _values(arena)
    names = [f"k{i}" for i in range(300)]
    window, window_s, pace_share = 8, 0.25, 0.2
    compared = 0
    for step in range(160):
        # Live changes of the cohort parameters, now and then.
        if rng.random() < 0.05:
            window = int(rng.choice([4, 8, 12]))
        if rng.random() < 0.1:
            window_s = float(rng.choice([0.25, 0.001, 1.0, 3600.0]))
        if rng.random() < 0.1:
            pace_share = float(rng.choice([0.0, 0.2, 0.5, 10.0]))

        # Freed and loaded slots: a key forgotten, a state restored (a first
        # time and counts of any kind, young or not).
        for name in rng.choice(names, int(rng.integers(0, 4))).tolist():
            arena.release(name)
        for name in rng.choice(names, int(rng.integers(0, 3))).tolist():
            loaded = {
                "n_seen": int(rng.integers(0, 14)),
                "first_s": _start_time(rng, window_s),
                "a": int(rng.integers(0, 50)),
                "b": int(rng.integers(0, 50)),
            }
            arena.load(
                name,
                {
                    field: np.array(value, dtype=FIELDS[field].dtype).tobytes()
                    for field, value in loaded.items()
                },
            )

        # A batch: each key's count grows by a row or a few, its values too.
        batch = arena.slots(rng.choice(names, int(rng.integers(1, 40))).tolist())
        arrays = arena.arrays
        for slot in np.unique(batch).tolist():
            if arrays["n_seen"][slot] == 0:
                arrays["first_s"][slot] = _start_time(rng, window_s)
            arrays["n_seen"][slot] += int(rng.integers(1, 3))
            arrays["a"][slot] += int(rng.integers(0, 3))
            arrays["b"][slot] += int(rng.integers(0, 2))
        index.update(arena, batch, window, values)

        # Every key asks, young or not, and a sample of them.
        held = np.array(sorted(arena.slots(arena.clients())), dtype=np.int64)
        for asking in (held, np.unique(rng.choice(held, min(len(held), 5)))):
            seen, first = arrays["n_seen"], arrays["first_s"]
            got = index.pool(asking, pace_share, window_s, values)
            want = pool(
                asking,
                seen,
                first,
                arrays["a"],
                arrays["b"],
                window,
                pace_share,
                window_s,
            )
            expected = np.stack([want.keys, want.total_a, want.total_b])
            assert np.array_equal(got, expected), f"step {step}"
            compared += int((expected[0] > 1).sum())
    assert compared > 200, "cohorts of more than one key must be compared"
    # Kept across batches, not rebuilt on each: a rebuild only when the
    # window changed, a slot list overflowed or the small arrays filled.
    assert 2 <= index.rebuilds < 80


def test_more_changes_than_the_arena_lists_rebuild_the_index() -> None:
    arena = SlotArena(FIELDS, initial_slots=8)
    index = CohortIndex(2)
    values = _values(arena)
    names = [f"k{i}" for i in range(10)]
    slots = arena.slots(names)
    arena.arrays["n_seen"][slots] = 1
    arena.arrays["first_s"][slots] = T0
    index.update(arena, slots, 8, values)
    # Built at the first look-up with a key asking (the upkeep is lazy).
    index.pool(slots[:0], 0.0, 0.25, values)
    assert index.rebuilds == 0
    index.pool(slots[:1], 0.0, 0.25, values)
    assert index.rebuilds == 1
    for i in range(CHANGED_MAX + 1):
        arena.slots([f"x{i}"])
        arena.release(f"x{i}")
    # k1 changed behind the index's back, and a rebuild is what finds it.
    arena.arrays["n_seen"][slots[1]] = 6
    index.update(arena, slots[:0], 8, values)
    got = index.pool(slots[1:2], 0.0, 0.25, values)
    assert index.rebuilds == 2
    assert got[0].tolist() == [1]


def _same_scores(pair: list[Detector], *args: Any, **kwargs: Any) -> int:
    """Score one batch on both detectors; they must agree exactly. Returns
    how many rows were flagged."""
    indexed, reference = (d.score_batch(*args, **kwargs) for d in pair)
    for a, b in zip(indexed, reference, strict=True):
        assert (a.score, a.warm, a.flagged, a.evidence) == (
            b.score,
            b.warm,
            b.flagged,
            b.evidence,
        )
    return sum(s.flagged for s in indexed)


def _moved(pair: list[Detector], make: Any, keys: list[str]) -> list[Detector]:
    """Every key's state into fresh detectors (a restore), as a worker that
    takes over a partition does."""
    fresh = [make(), make()]
    for old, new in zip(pair, fresh, strict=True):
        baseline = old.export_baseline()
        if baseline is not None:
            new.import_baseline(baseline)
        for key in keys:
            blob = old.dump_state(key)
            if blob is not None:
                new.load_state(key, blob)
    return fresh


def _reference(detector: Detector) -> Detector:
    detector._cohort_index = None  # type: ignore[attr-defined]
    return detector


@pytest.mark.parametrize("seed", range(2))
def test_traffic_scores_the_same_with_the_index(seed: int) -> None:
    rng = np.random.default_rng(seed)

    def make() -> Detector:
        return TrafficDetector(TrafficParams(window=12), seed=0)

    pair = [make(), _reference(make())]
    # Metronome keys started together, Poisson keys, in waves.
    keys = [f"m{i}" for i in range(40)] + [f"p{i}" for i in range(40)]
    start = {key: T0 + 0.05 * (i % 20) + 2.0 * (i // 20) for i, key in enumerate(keys)}
    sent = dict.fromkeys(keys, 0)
    flagged = 0
    for step in range(60):
        if step == 30:
            pair = _moved(pair, make, keys)
            pair[1] = _reference(pair[1])
        # The cohort test off for a few batches (their keys' counts grow
        # meanwhile), then on, and other live changes.
        change: dict[str, float] = {}
        if step in (5, 10):
            change = {"cohort_window_s": 0.0 if step == 5 else 0.25}
        elif step % 10 == 5:
            change = {
                "cohort_window_s": float(rng.choice([0.25, 0.5])),
                "cohort_pace_share": float(rng.choice([0.2, 0.5])),
                "member_z": float(rng.choice([2.0, 3.0])),
            }
        for detector in pair:
            detector.set_params(**change)
        if step % 15 == 14:
            gone = str(rng.choice(keys))
            for detector in pair:
                detector.forget(gone)
            sent[gone] = 0
            start[gone] = T0 + step * 0.25
        batch = [str(k) for k in rng.choice(keys, 24)]
        times = []
        for key in batch:
            jitter = 0.0 if key[0] == "m" else float(rng.exponential(0.2))
            times.append(start[key] + 0.25 * sent[key] + jitter)
            sent[key] += 1
        order = np.argsort(times, kind="stable")
        flagged += _same_scores(
            pair,
            [batch[i] for i in order],
            np.zeros((len(batch), 3)),
            arrival_s=np.asarray(times)[order],
        )
    assert flagged > 0, "the cohorts must speak for the comparison to mean much"


@pytest.mark.parametrize("seed", range(2))
def test_ood_scores_the_same_with_the_index(seed: int) -> None:
    rng = np.random.default_rng(seed)

    def make(baseline: bool = True) -> Detector:
        detector = OutOfDistributionDetector(OodParams(window=8))
        if baseline:
            detector.learn_baseline(continuous_reference())
        return detector

    # No baseline for the first batches: none is judged, the cohort test
    # does not run, and the keys it sent must still count once it does.
    pair = [make(False), _reference(make(False))]
    keys = [f"k{i}" for i in range(60)]
    start = {key: T0 + 0.02 * (i % 30) + 1.0 * (i // 30) for i, key in enumerate(keys)}
    sent = dict.fromkeys(keys, 0)
    flagged = 0
    honest = continuous_reference(seed=1)
    for step in range(40):
        if step == 4:
            for detector in pair:
                detector.learn_baseline(continuous_reference())
        if step == 20:
            pair = _moved(pair, make, keys)
            pair[1] = _reference(pair[1])
        change: dict[str, float] = {}
        if step in (8, 12):
            change = {"cohort_window_s": 0.0 if step == 8 else 0.25}
        elif step % 10 == 5:
            change = {
                "cohort_window_s": float(rng.choice([0.25, 1.0])),
                "cohort_pace_share": float(rng.choice([0.2, 0.5])),
            }
        for detector in pair:
            detector.set_params(**change)
        if step % 12 == 11:
            gone = str(rng.choice(keys))
            for detector in pair:
                detector.forget(gone)
            sent[gone] = 0
            start[gone] = T0 + step * 0.5
        batch = [str(k) for k in rng.choice(keys, 16)]
        wide = wide_queries(len(batch), seed=int(rng.integers(1 << 30)))
        rows = np.where(
            rng.random((len(batch), 1)) < 0.5,
            wide,
            honest[rng.integers(0, len(honest), len(batch))],
        )
        times = []
        for key in batch:
            times.append(start[key] + 0.5 * sent[key])
            sent[key] += 1
        order = np.argsort(times, kind="stable")
        flagged += _same_scores(
            pair,
            [batch[i] for i in order],
            rows[order],
            learn=[False] * len(batch),
            arrival_s=np.asarray(times)[order],
        )
    assert flagged > 0, "the cohorts must speak for the comparison to mean much"


def test_the_index_holds_a_bounded_few_bytes_per_young_key() -> None:
    n_keys = 3000
    detector = TrafficDetector(seed=0)
    keys = [f"k{i}" for i in range(n_keys)]
    # Keys at one pace: they ask from their fourth request, which builds
    # the index (its upkeep waits for a look-up).
    for step in range(5):
        at = np.full(n_keys, T0 + 0.25 * step)
        detector.score_batch(keys, np.zeros((n_keys, 3)), arrival_s=at)
    index = detector._cohort_index
    assert index is not None and detector._arena is not None
    assert index.rebuilds >= 1
    slots = len(detector._arena.arrays["n_seen"])
    # About 170 bytes per young key with the defaults (the module docstring).
    assert 100 * n_keys < index.nbytes - 8 * slots < 200 * n_keys


def test_ood_batches_not_judged_still_count_in_the_index() -> None:
    """A threshold cleared live stops ``ood`` judging (no look-up, so no
    update of the index) while its keys keep sending: once judged again,
    their grown counts must be what the index pools."""
    rng = np.random.default_rng(3)
    threshold = 0.9

    def make() -> Detector:
        detector = OutOfDistributionDetector(
            OodParams(window=8, window_size=64, query_threshold=threshold)
        )
        # The reference's range and lattice (what makes a wide query count
        # from the first) without the calibrated threshold learn_baseline
        # would also set, which would keep it judging.
        detector._on_n_features(honest.shape[1])
        detector._learn_lattice(continuous_reference())
        return detector

    honest = continuous_reference(seed=1)
    pair = [make(), _reference(make())]
    # The forest learns live traffic (no reference sample, so no
    # calibrated threshold to fall back on): judged once it is ready.
    for detector in pair:
        detector.score_batch(
            [f"w{i}" for i in range(128)],
            honest[:128],
            learn=[True] * 128,
            arrival_s=np.full(128, T0 - 100.0),
        )
    keys = [f"k{i}" for i in range(30)]
    sent = dict.fromkeys(keys, 0)
    flagged = 0
    for step in range(14):
        # Judged, not judged for three batches, judged again.
        for detector in pair:
            detector.set_params(query_threshold=None if 7 <= step < 10 else threshold)
        if step == 7:
            index = pair[0]._cohort_index  # type: ignore[attr-defined]
            assert index.rebuilds > 0, "the index must be in use before"
        batch = [str(k) for k in rng.choice(keys, 12)]
        times = [T0 + 0.01 * int(k[1:]) + 0.5 * sent[k] for k in batch]
        for key in batch:
            sent[key] += 1
        order = np.argsort(times, kind="stable")
        flagged += _same_scores(
            pair,
            [batch[i] for i in order],
            wide_queries(len(batch), seed=step)[order],
            learn=[False] * len(batch),
            arrival_s=np.asarray(times)[order],
        )
    assert flagged > 0, "the cohorts must speak for the comparison to mean much"
