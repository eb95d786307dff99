"""The margin detector's opening test and its cohort pooling.

Synthetic answers with known margins: a key whose first answers climb in
confidence (as each of a distributed uncertainty sampler's keys sees its
share of ranked rounds) against keys whose answers come in random order (an
honest client's). Then the evaluation's own active-learning attack on the
breast_cancer model, spread round-robin over 10 keys that start together, as
``evaluation.attacks.distributed.SpreadOracle`` sends it.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import numpy.typing as npt
import pydantic
import pytest
from sklearn.pipeline import Pipeline

from detectors._state import StateBlob, decode_blob, encode_blob
from detectors.margin import MarginDetector, MarginParams, mann_kendall
from evaluation.benign import draw_habits, query_stream
from gateway.zoo import Split
from tests.detectors.test_margin_trend import (  # noqa: F401  (fixtures)
    attack_rows,
    prepared,
    split,
    victim,
)

Array = npt.NDArray[Any]
START_S = 1_800_000_000.0


def answers(margin: Array) -> Array:
    """Two-class answers whose top-1 minus top-2 is ``margin``."""
    m = np.asarray(margin, dtype=np.float64)
    return np.column_stack([(1.0 + m) / 2.0, (1.0 - m) / 2.0])


def climbing(rng: np.random.Generator, n: int) -> Array:
    """Margins that climb with noise: round-robin shares of ranked rounds."""
    return np.clip(np.linspace(0.05, 0.95, n) + rng.normal(0.0, 0.25, n), 0.0, 1.0)


def honest(rng: np.random.Generator, n: int) -> Array:
    """Margins in random order: mostly confident, some near the boundary."""
    return np.where(rng.random(n) < 0.15, rng.random(n) * 0.5, 0.9 + rng.random(n) / 10)


def fresh(**params: Any) -> MarginDetector:
    detector = MarginDetector(MarginParams(**params))
    baseline = np.random.default_rng(0)
    x = baseline.random((256, 4))
    detector.learn_baseline(x)
    detector.learn_output_baseline(x, answers(honest(baseline, 256)))
    return detector


def run(
    detector: MarginDetector,
    streams: dict[str, Array],
    starts: dict[str, float],
    pace_s: float = 0.25,
) -> dict[str, int]:
    """Every key sends one query every ``pace_s`` from its start, one batch
    per tick; returns the 1-based query at which each flagged key was first
    flagged."""
    flagged: dict[str, int] = {}
    longest = max(len(s) for s in streams.values())
    x = np.zeros((1, 4))
    ticks = sorted({starts[k] + i * pace_s for k in streams for i in range(longest)})
    sent = dict.fromkeys(streams, 0)
    for tick in ticks:
        due = [
            k
            for k, s in streams.items()
            if sent[k] < len(s) and abs(starts[k] + sent[k] * pace_s - tick) < 1e-9
        ]
        if not due:
            continue
        rows = np.repeat(x, len(due), axis=0)
        scores = detector.score_batch(
            due, rows, learn=[False] * len(due), arrival_s=[tick] * len(due)
        )
        for key, score in zip(due, scores, strict=True):
            if score.flagged and key not in flagged:
                flagged[key] = sent[key] + 1
        margins = np.array([streams[k][sent[k]] for k in due])
        # Not learned: the baseline is the detector's, not these keys'.
        detector.observe_outputs(due, rows, answers(margins), learn=[False] * len(due))
        for key in due:
            sent[key] += 1
    return flagged


def test_mann_kendall_matches_counting_pairs_with_ties() -> None:
    rng = np.random.default_rng(3)
    values = rng.integers(0, 6, size=(20, 12)).astype(np.uint8)
    length = rng.integers(2, 13, size=20)
    stat, var = mann_kendall(values, length)
    for row, n in enumerate(length.tolist()):
        v = values[row, :n].astype(int)
        s = sum(np.sign(v[j] - v[i]) for i, j in itertools.combinations(range(n), 2))
        _, t = np.unique(v, return_counts=True)
        expected = (n * (n - 1) * (2 * n + 5) - np.sum(t * (t - 1) * (2 * t + 5))) / 18
        assert stat[row] == s
        assert var[row] == pytest.approx(expected)


def test_opening_and_young_trend_kept_per_batch_match_the_whole_stretch() -> None:
    # S and its variance are extended batch by batch (each new answer
    # compared once with the earlier ones); they must equal the statistic of
    # the whole stretch, ties included, whatever the batch sizes.
    rng = np.random.default_rng(12)
    detector = fresh(cohort_answers=48)
    keys = [f"k{i}" for i in range(6)]
    sent: dict[str, list[float]] = {k: [] for k in keys}
    x = np.zeros((1, 4))
    while min(len(v) for v in sent.values()) < 70:
        ids = [k for k in keys for _ in range(int(rng.integers(0, 4)))]
        if not ids:
            continue
        # Few distinct margins, so that ties are common.
        margins = rng.integers(0, 6, len(ids)) / 5.0
        rows = np.repeat(x, len(ids), axis=0)
        detector.score_batch(ids, rows, learn=[False] * len(ids))
        detector.observe_outputs(ids, rows, answers(margins), learn=[False] * len(ids))
        for key, m in zip(ids, margins, strict=True):
            sent[key].append(float(m))
    assert detector._arena is not None
    arrays = detector._arena.arrays
    for key in keys:
        slot = int(detector._arena.slots([key])[0])
        values = np.rint(np.array(sent[key]) * 255).astype(np.uint8)
        for count, stat, var in ((32, "open_s", "open_v"), (48, "young_s", "young_v")):
            # A key that went past the window inside one batch keeps the
            # values it had before that batch; none does here (batches <= 3).
            s, v = mann_kendall(values[None, :count], np.array([count]))
            assert arrays[stat][slot] == s[0], (key, stat)
            assert arrays[var][slot] == pytest.approx(v[0], rel=1e-12), (key, var)


def test_climbing_keys_that_start_together_are_flagged_only_pooled() -> None:
    rng = np.random.default_rng(1)
    streams = {f"k{i}": climbing(rng, 14) for i in range(10)}
    starts = dict.fromkeys(streams, START_S)
    flagged = run(fresh(), streams, starts)
    assert len(flagged) >= 5, flagged
    assert max(flagged.values()) <= 15
    # Alone, no key's 14 answers are enough: the pooling is what flags.
    assert run(fresh(cohort_window_s=0.0), streams, starts) == {}
    # Keys that start seconds apart are not pooled.
    apart = {k: START_S + 5.0 * i for i, k in enumerate(streams)}
    assert run(fresh(), streams, apart) == {}


def test_honest_keys_that_start_together_are_not_flagged() -> None:
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        streams = {f"h{i}": honest(rng, 64) for i in range(20)}
        assert run(fresh(), streams, dict.fromkeys(streams, START_S)) == {}, seed


def test_an_honest_key_starting_with_an_attacker_is_not_flagged() -> None:
    rng = np.random.default_rng(7)
    streams = {f"k{i}": climbing(rng, 20) for i in range(10)}
    streams |= {f"h{i}": honest(rng, 20) for i in range(10)}
    flagged = run(fresh(), streams, dict.fromkeys(streams, START_S))
    assert any(k.startswith("k") for k in flagged)
    assert not any(k.startswith("h") for k in flagged), flagged


def test_a_steep_opening_is_flagged_alone() -> None:
    rng = np.random.default_rng(2)
    steep = {"solo": np.clip(np.linspace(0.0, 1.0, 32) + rng.normal(0, 0.05, 32), 0, 1)}
    flagged = run(fresh(), steep, {"solo": START_S})
    assert "solo" in flagged and flagged["solo"] <= 20


def test_opening_and_cohort_survive_a_state_round_trip() -> None:
    rng = np.random.default_rng(1)
    streams = {f"k{i}": climbing(rng, 14) for i in range(10)}
    detector = fresh()
    run(
        detector,
        {k: s[:13] for k, s in streams.items()},
        dict.fromkeys(streams, START_S),
    )
    blobs = {k: detector.dump_state(k) for k in streams}
    restored = fresh()
    for key, blob in blobs.items():
        assert blob is not None
        restored.load_state(key, blob)
    keys = list(streams)
    probe = np.zeros((len(keys), 4))
    at = [START_S + 13 * 0.25] * len(keys)
    never = [False] * len(keys)
    before = detector.score_batch(keys, probe, learn=never, arrival_s=at)
    after = restored.score_batch(keys, probe, learn=never, arrival_s=at)
    assert [(s.score, s.flagged, s.evidence) for s in after] == [
        (s.score, s.flagged, s.evidence) for s in before
    ]
    assert any(s.flagged and "pooled with" in s.evidence for s in before)


def test_the_evaluation_attack_over_ten_keys_is_flagged(
    split: Split,  # noqa: F811
    victim: Pipeline,  # noqa: F811
    attack_rows: Array,  # noqa: F811
) -> None:
    detector = prepared(split, victim)
    keys = [f"k{i}" for i in range(10)]
    flagged: dict[str, int] = {}
    # Row i goes to key i mod 10; the keys' shares go out together, one row
    # per key every 0.25 s, the first at the same moment.
    for tick, start in enumerate(range(0, len(attack_rows), 10)):
        part = attack_rows[start : start + 10]
        ids = keys[: len(part)]
        at = [START_S + 0.25 * tick + 0.003 * i for i in range(len(part))]
        for key, score in zip(
            ids, detector.score_batch(ids, part, arrival_s=at), strict=True
        ):
            if score.flagged and key not in flagged:
                flagged[key] = start + keys.index(key) + 1
        detector.observe_outputs(ids, part, np.asarray(victim.predict_proba(part)))
    assert flagged, "no key of the distributed attack was flagged"
    # The same rows from honest clients that start together, in random order
    # with the evaluation's habits, are not.
    spans = tuple(float(v) for v in np.ptp(split.x_test, axis=0))
    clip = (0.0, float(split.x_test.max()))
    rng = np.random.default_rng(5)
    streams = []
    for habits in draw_habits(10, rng, clip, feature_spans=spans):
        rows = split.x_test[rng.permutation(len(split.x_test))]
        streams.append(query_stream(rows, habits, 40, rng))
    honest_keys = [f"h{i}" for i in range(10)]
    for tick in range(40):
        part = np.stack([s[tick] for s in streams])
        at = [START_S + 100.0 + 0.25 * tick] * 10
        for score in detector.score_batch(honest_keys, part, arrival_s=at):
            assert not score.flagged, score.evidence
        detector.observe_outputs(
            honest_keys, part, np.asarray(victim.predict_proba(part))
        )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (
            {"window": 16, "opening_answers": 32, "trend_min_answers": 16},
            "opening_answers",
        ),
        ({"opening_answers": 12, "opening_min": 20}, "opening_min"),
        ({"cohort_window_s": -1.0}, "cohort_window_s"),
        ({"cohort_min_keys": 1}, "cohort_min_keys"),
        ({"opening_z": 0.0}, "opening_z"),
    ],
)
def test_opening_params_are_validated(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        MarginParams.model_validate(overrides)


def test_an_early_near_duplicate_run_near_the_boundary_is_not_flagged() -> None:
    # An honest client re-sends one boundary input 8 times among its first
    # 20 answers (the evaluation's near-duplicate habit); the rest are
    # confident and in random order.
    rng = np.random.default_rng(4)
    margins = np.concatenate([0.95 + rng.random(12) / 20, 0.1 + rng.random(8) / 100])
    stream = {"honest": np.concatenate([margins, 0.95 + rng.random(30) / 20])}
    start = {"honest": START_S}
    assert run(fresh(), stream, start) == {}
    # Judged from 20 answers, as before, the run alone reaches the threshold.
    assert run(fresh(min_answers=20), stream, start) == {"honest": 21}


def late_climb(rng: np.random.Generator, n: int = 45, flat: int = 30) -> Array:
    """One key's share of a learner that works through its whole pool: the
    first ``flat`` answers in random order with a fifth near the boundary,
    then only confident ones (the pool's doubtful rows are used up)."""
    early = np.where(
        rng.random(flat) < 0.2, rng.random(flat) * 0.4, 0.6 + rng.random(flat) * 0.4
    )
    return np.concatenate([early, 0.9 + rng.random(n - flat) / 10])


def test_a_cohort_that_climbs_only_after_its_opening_is_flagged() -> None:
    # No key's opening (first 32) climbs; the climb comes after. The cohort
    # pools each key's whole young life, so it is flagged; pooling only the
    # openings, as before, it is not.
    rng = np.random.default_rng(11)
    streams = {f"k{i}": late_climb(rng) for i in range(10)}
    starts = dict.fromkeys(streams, START_S)
    flagged = run(fresh(), streams, starts)
    assert len(flagged) >= 3, flagged
    assert min(flagged.values()) > 32
    assert run(fresh(cohort_answers=32), streams, starts) == {}
    # Keys that start seconds apart are judged alone, and alone no key is.
    apart = {k: START_S + 5.0 * i for i, k in enumerate(streams)}
    assert run(fresh(), streams, apart) == {}


def test_honest_keys_with_copy_runs_that_start_together_are_not_flagged() -> None:
    # Runs of 3 to 8 near-identical answers (the evaluation's near-duplicate
    # habit) correlate neighbours, which widens an honest key's trend z
    # beyond the standard normal (sd about 1.1 over 64 answers offline):
    # 20 keys over their whole young life still stay under cohort_z. (The
    # share test, which such runs near the boundary can trip, is kept out by
    # min_answers: it is not what this test is about.)
    for seed in range(5):
        rng = np.random.default_rng(200 + seed)
        streams = {}
        for i in range(20):
            out: list[float] = []
            while len(out) < 64:
                value = float(honest(rng, 1)[0])
                copies = int(rng.integers(3, 9)) if rng.random() < 0.05 else 1
                out += [value + float(rng.normal(0, 0.005)) for _ in range(copies)]
            streams[f"h{i}"] = np.clip(np.array(out[:64]), 0.0, 1.0)
        starts = dict.fromkeys(streams, START_S)
        assert run(fresh(min_answers=10_000), streams, starts) == {}, seed


def test_cohort_answers_must_fit_the_window() -> None:
    with pytest.raises(pydantic.ValidationError, match="cohort_answers"):
        MarginParams(window=32, trend_min_answers=16, cohort_answers=48)
    assert MarginParams(window=32, trend_min_answers=16).young_answers == 32
    assert MarginParams(cohort_answers=40).young_answers == 40


@pytest.mark.parametrize(
    ("field", "value"),
    [("young_v", -1.0), ("young_s", 1e9), ("young_v", 1e12), ("young_s", float("inf"))],
)
def test_young_trend_sums_no_stream_gives_are_refused(field: str, value: float) -> None:
    rng = np.random.default_rng(1)
    streams = {f"k{i}": climbing(rng, 14) for i in range(3)}
    detector = fresh()
    run(detector, streams, dict.fromkeys(streams, START_S))
    blob = decode_blob(detector.dump_state("k0") or b"")
    fields = {**blob.fields, field: np.array(value, dtype="<f8").tobytes()}
    hostile = encode_blob(
        StateBlob(blob.format, blob.detector, blob.n_features, blob.layout, fields)
    )
    with pytest.raises(ValueError, match="young"):
        detector.load_state("other", hostile)
    detector.load_state("other", encode_blob(blob))
