"""``margin``'s keys kept in order of first time
(:class:`detectors._startorder.StartOrder`) give, bit for bit, the cohort
float sums that a scan and sort per batch gave
(:func:`detectors._cohort.float_pool`): through keys of one time (ties),
keys dated out of order, large cohorts (running sums) and small (sums in
order), slots freed and reused, states loaded and the arena grown; and
``margin`` scores the same with it as without it."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from detectors import _startorder, _state
from detectors._cohort import DIRECT_MAX, float_pool
from detectors._startorder import StartOrder, pool
from detectors._state import FieldSpec, SlotArena
from detectors.margin import MarginDetector, MarginParams
from tests.detectors.test_cohort_index import _moved

T0 = 1.7e9
FIELDS = {
    "n_seen": FieldSpec((), "<i8"),
    "first_s": FieldSpec((), "<f8"),
    "member": FieldSpec((), "<f8"),
    "a": FieldSpec((), "<f8"),
    "b": FieldSpec((), "<f8"),
}


def _both(
    order: StartOrder,
    arena: SlotArena,
    asking: npt.NDArray[np.int64],
    pace_share: float,
    window_s: float,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    arrays = arena.arrays
    seen, first = arrays["n_seen"], arrays["first_s"]
    values = [arrays["a"], arrays["b"]]
    kept = pool(
        order,
        arena,
        asking,
        seen,
        first,
        values,
        arrays["member"],
        pace_share,
        window_s,
    )
    reference = float_pool(
        asking,
        seen,
        first,
        values,
        (arrays["member"] > 0) & (first > 0),
        pace_share,
        window_s,
    )
    return kept, reference


def _date(rng: np.random.Generator, clock: float) -> float:
    """Mostly the clock (many keys of one instant: ties), sometimes a step
    back (dated out of order), sometimes a float step beside it."""
    roll = rng.random()
    if roll < 0.6:
        return clock
    if roll < 0.8:
        return clock - float(rng.choice([0.1, 0.5, 2.0]))
    return float(np.nextafter(clock, clock + float(rng.choice([-1.0, 1.0]))))


@pytest.mark.parametrize("seed", range(6))
def test_the_order_gives_the_sums_the_per_batch_sort_gave(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small limits, so that merges, compactions and rebuilds all happen
    # within a few hundred slots.
    monkeypatch.setattr(_startorder, "MIN_CAPACITY", 8)
    changed_max = 64
    monkeypatch.setattr(_state, "CHANGED_MAX", changed_max)
    monkeypatch.setattr(_startorder, "CHANGED_MAX", changed_max)
    rng = np.random.default_rng(seed)
    arena = SlotArena(FIELDS, initial_slots=4)
    order = StartOrder()
    arrays = arena.arrays
    clients: list[str] = []
    clock = T0
    compared = large = ties = 0
    for step in range(150):
        arrays = arena.arrays
        clock += float(rng.choice([0.0, 0.05, 0.3]))
        # New keys, dated in this batch (crowds of one instant at times).
        n_new = int(rng.choice([0, 1, 3, 90])) if step % 7 else 120
        names = [f"c{step}-{i}" for i in range(n_new)]
        if names:
            new = arena.slots(names)
            arrays = arena.arrays
            arrays["first_s"][new] = [_date(rng, clock) for _ in names]
            order.touch(arena, new)
            clients += names
        # Some keys answer: counts grow, values move (some to exactly 0).
        if clients:
            some = arena.slots(list(rng.choice(clients, min(len(clients), 40))))
            arrays["n_seen"][some] += rng.integers(0, 3, len(some))
            arrays["a"][some] = rng.normal(0.0, 1.0, len(some)) * 10.0 ** rng.integers(
                -3, 4, len(some)
            )
            arrays["b"][some] = rng.random(len(some))
            arrays["member"][some] = rng.choice([0.0, 0.5, 1.0], len(some))
        # Keys freed (and their slots reused by later ones) and loaded with
        # an earlier start.
        if clients and rng.random() < 0.2:
            for name in rng.choice(clients, int(rng.integers(1, 6)), replace=False):
                arena.release(str(name))
                clients.remove(str(name))
        if clients and rng.random() < 0.15:
            name = str(rng.choice(clients))
            blob = arena.dump(name)
            assert blob is not None
            fields = dict(blob)
            fields["first_s"] = np.float64(clock - 1.0).tobytes()
            arena.load(name, fields)
        if step == 90:
            # More loads than the arena lists: the order must rebuild.
            for name in clients[: changed_max + 1]:
                blob = arena.dump(name)
                assert blob is not None
                arena.load(name, blob)
        if not clients or rng.random() < 0.2:
            # A batch whose keys do not ask: nothing synced.
            continue
        asking = np.unique(
            arena.slots(list(rng.choice(clients, int(rng.integers(1, 8)))))
        )
        pace_share = float(rng.choice([0.2, 0.5]))
        window_s = float(rng.choice([0.25, 1.0]))
        kept, reference = _both(order, arena, asking, pace_share, window_s)
        assert kept.tobytes() == reference.tobytes(), step
        compared += 1
        large += int((reference[0] > DIRECT_MAX).sum())
        dated = arena.arrays["first_s"][asking]
        ties += int(
            np.isin(arena.arrays["first_s"], dated).sum() > len(np.unique(dated))
        )
    # The comparison must have covered what it is about.
    assert compared > 80
    assert large > 0 and ties > 0
    assert order.rebuilds >= 2


def test_keys_of_one_instant_are_summed_in_slot_order() -> None:
    """Ties of count and time: float sums of one cohort differ with the
    order they run in; both ways must take slot order."""
    arena = SlotArena(FIELDS, initial_slots=4)
    order = StartOrder()
    values = [1e16, 1.0, -1e16, 1.0, 3.0, 1e-3]
    names = [f"k{i}" for i in range(len(values))]
    # Dated in two batches, the second's slots before the first's (freed
    # slots reused): the order must still run by slot within the instant.
    first = arena.slots(names[:3])
    order.touch(arena, first)
    arena.arrays["first_s"][first] = T0
    arena.arrays["n_seen"][first] = 1
    arena.arrays["member"][first] = 1.0
    asking = first[:1]
    _both(order, arena, asking, 0.2, 0.25)
    arena.release(names[0])
    second = arena.slots(names[3:])
    order.touch(arena, second)
    arrays = arena.arrays
    arrays["first_s"][second] = T0
    arrays["n_seen"][second] = 1
    arrays["member"][second] = 1.0
    live = arena.slots(names[1:])
    arrays["a"][live] = values[1:]
    kept, reference = _both(order, arena, live[:1], 0.2, 0.25)
    assert kept.tobytes() == reference.tobytes()
    assert kept[0, 0] == len(live)


def _margin_pair() -> list[Any]:
    def make() -> MarginDetector:
        return MarginDetector(MarginParams())

    return [make(), _reference(make())]


def _reference(detector: MarginDetector) -> MarginDetector:
    detector._start_order = None
    return detector


@pytest.mark.parametrize("seed", range(2))
def test_margin_scores_the_same_with_the_order(seed: int) -> None:
    rng = np.random.default_rng(seed)

    def make() -> MarginDetector:
        return MarginDetector(MarginParams())

    pair = [make(), _reference(make())]
    x = rng.random((600, 4))
    honest = np.where(rng.random(600) < 0.15, rng.random(600) * 0.5, 0.95)
    proba = np.column_stack([(1.0 + honest) / 2.0, (1.0 - honest) / 2.0])
    warm = [f"h{i}" for i in range(600)]
    for detector in pair:
        detector.learn_baseline(x)
        detector.learn_output_baseline(x, proba)
        detector.score_batch(warm, x, arrival_s=np.full(600, T0))
        detector.observe_outputs(warm, x, proba)
    # Crowds of climbing keys started in one instant, and honest ones.
    keys = [f"k{i}" for i in range(120)] + [f"o{i}" for i in range(40)]
    start = {
        k: T0 + 100.0 + (0.0 if k[0] == "k" else float(rng.uniform(0, 3))) for k in keys
    }
    sent = dict.fromkeys(keys, 0)
    flagged = 0
    for step in range(40):
        if step == 20:
            pair = _moved(pair, make, keys + warm)
            pair[1] = _reference(pair[1])
        if step % 13 == 12:
            gone = str(rng.choice(keys))
            for detector in pair:
                detector.forget(gone)
            sent[gone] = 0
            start[gone] = T0 + 100.0 + step * 0.25
        batch = [str(k) for k in rng.choice(keys, 48)]
        times = np.array([start[k] + 0.25 * sent[k] for k in batch])
        rows = rng.random((len(batch), 4))
        scored = [
            d.score_batch(batch, rows, learn=[False] * len(batch), arrival_s=times)
            for d in pair
        ]
        for a, b in zip(*scored, strict=True):
            assert (a.score, a.warm, a.flagged, a.evidence) == (
                b.score,
                b.warm,
                b.flagged,
                b.evidence,
            )
            flagged += a.flagged
        m = np.array(
            [min(0.01 + 0.08 * sent[k], 0.99) if k[0] == "k" else 0.95 for k in batch]
        )
        answers = np.column_stack([(1.0 + m) / 2.0, (1.0 - m) / 2.0])
        for detector in pair:
            detector.observe_outputs(batch, rows, answers, learn=[False] * len(batch))
        for k in batch:
            sent[k] += 1
    assert flagged > 0, "the cohorts must speak for the comparison to mean much"


def test_the_order_holds_a_bounded_few_bytes_per_key() -> None:
    """Two entries (time and slot, 16 bytes) per dated key, twice over for
    growth and tombstones, and 8 bytes per slot of the arena: about 40
    bytes per key (the module docstring)."""
    n_keys = 3000
    arena = SlotArena(FIELDS, initial_slots=4)
    order = StartOrder()
    slots = arena.slots([f"k{i}" for i in range(n_keys)])
    arena.arrays["first_s"][slots] = T0 + np.arange(n_keys) * 0.01
    arena.arrays["n_seen"][slots] = 1
    arena.arrays["member"][slots] = 1.0
    values = [arena.arrays["a"], arena.arrays["b"]]
    pool(
        order,
        arena,
        slots[:1],
        *(arena.arrays[k] for k in ("n_seen", "first_s")),
        values,
        arena.arrays["member"],
        0.2,
        0.25,
    )
    assert order.rebuilds == 1
    per_slot = 8 * len(arena.arrays["first_s"])
    assert 16 * n_keys <= order.nbytes - per_slot <= 40 * n_keys
