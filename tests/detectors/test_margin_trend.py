"""The margin detector's confidence trend on the evaluation's breast_cancer
model: honest replays of held-out rows (with the benign retries and
near-duplicate runs) stay below the threshold, the evaluation's own
pool-based uncertainty sampler is flagged, and the trend survives a state
round trip. The plain uncertain share alone misses this attack here: the
victim's answers to its picks are no more often under a 0.2 margin than an
honest client's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pydantic
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from detectors.margin import MarginDetector, MarginParams, confidence_trend
from evaluation.attacks.sampling import SamplingParams, run_sampling_extraction
from evaluation.benign import draw_habits, query_stream
from gateway.zoo import Split, breast_cancer_split

Array = npt.NDArray[Any]


@pytest.fixture(scope="module")
def split() -> Split:
    return breast_cancer_split()


@pytest.fixture(scope="module")
def victim(split: Split) -> Pipeline:
    # The zoo's breast_cancer model, trained in memory.
    model = Pipeline(
        [("scale", StandardScaler()), ("lr", LogisticRegression(max_iter=2000))]
    )
    return model.fit(split.x_train, split.y_train)


@pytest.fixture(scope="module")
def attack_rows(split: Split, victim: Pipeline) -> Array:
    """What the evaluation's ``active`` attack sends, in order: the first half
    of the shuffled held-out rows as its pool, rounds of 50 after 25 random."""
    order = np.random.default_rng(0).permutation(len(split.x_test))
    half = len(order) // 2
    pool, eval_x = split.x_test[order[:half]], split.x_test[order[half:]]
    sent: list[Array] = []

    def oracle(rows: Array) -> Array:
        sent.append(np.asarray(rows))
        return np.asarray(victim.predict_proba(rows))

    run_sampling_extraction(
        oracle,
        "active",
        eval_x,
        victim.predict(eval_x),
        SamplingParams(budget=300, round_size=50, initial=25, surrogate="logreg"),
        pool=pool,
    )
    return np.concatenate(sent)


def prepared(split: Split, victim: Pipeline) -> MarginDetector:
    detector = MarginDetector()
    detector.learn_baseline(split.x_train)
    detector.learn_output_baseline(split.x_train, victim.predict_proba(split.x_train))
    return detector


def serve(
    detector: MarginDetector,
    victim: Pipeline,
    client: str,
    rows: Array,
    batch: int = 8,
    learn: bool = True,
) -> int | None:
    """The gateway's order per batch (score, then show the answers); the
    1-based query at which the client was first flagged, or None."""
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        ids = [client] * len(part)
        scores = detector.score_batch(ids, part, learn=[learn] * len(part))
        for offset, score in enumerate(scores):
            if score.flagged:
                return start + offset + 1
        detector.observe_outputs(
            ids, part, np.asarray(victim.predict_proba(part)), learn=[learn] * len(part)
        )
    return None


def test_trend_is_kendall_tau_of_arrival_order() -> None:
    # Ring cells 2, 3, 0, 1 are oldest to newest: 10, 20, 40, 30.
    ring = np.array([[40, 30, 10, 20], [1, 2, 3, 4], [9, 9, 9, 9]], dtype=np.uint8)
    tau = confidence_trend(ring, np.array([2, 0, 0]), np.array([4, 4, 4]))
    assert tau.tolist() == pytest.approx([4 / 6, 1.0, 0.0])
    # A partly filled ring counts only its filled cells: 1, 2, 3 climb.
    partial = confidence_trend(ring[1:2], np.array([3]), np.array([3]))
    assert partial.tolist() == [1.0]
    assert confidence_trend(ring[:1], np.array([0]), np.array([1])).tolist() == [0.0]


def test_honest_replays_stay_below_the_threshold(
    split: Split, victim: Pipeline
) -> None:
    detector = prepared(split, victim)
    spans = tuple(float(v) for v in np.ptp(split.x_test, axis=0))
    clip = (0.0, float(split.x_test.max()))
    for i in range(12):
        rng = np.random.default_rng(100 + i)
        # Every third client retries or replays near-duplicate runs, as in
        # the evaluation.
        habits = draw_habits(1, rng, clip, feature_spans=spans)[0]
        rows = split.x_test[rng.permutation(len(split.x_test))]
        stream = query_stream(rows, habits, 300, rng)
        assert serve(detector, victim, f"honest-{i}", stream, 1 + i % 8) is None


def test_the_evaluation_active_attack_is_flagged_by_its_trend(
    split: Split, victim: Pipeline, attack_rows: Array
) -> None:
    detector = prepared(split, victim)
    first = serve(detector, victim, "thief", attack_rows)
    assert first is not None and first < len(attack_rows), first
    # The share alone (trend off) does not see it: the trend is what flags.
    without = prepared(split, victim)
    without.set_params(trend_weight=0.0)
    assert serve(without, victim, "thief", attack_rows) is None
    score = detector.score_batch(["thief"], attack_rows[-1:], learn=[False])[0]
    assert "Kendall tau" in score.evidence


def test_trend_survives_a_state_round_trip(
    split: Split, victim: Pipeline, attack_rows: Array
) -> None:
    detector = prepared(split, victim)
    # Not learned into the baseline, which is the detector's, not the client's.
    serve(detector, victim, "thief", attack_rows[:90], learn=False)
    blob = detector.dump_state("thief")
    assert blob is not None
    restored = prepared(split, victim)
    restored.load_state("thief", blob)
    probe = attack_rows[90:91]
    before = detector.score_batch(["thief"], probe, learn=[False])[0]
    after = restored.score_batch(["thief"], probe, learn=[False])[0]
    assert (after.score, after.flagged, after.evidence) == (
        before.score,
        before.flagged,
        before.evidence,
    )
    assert before.score > 0.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"trend_weight": -0.1}, "trend_weight"),
        ({"trend_weight": 1.5}, "trend_weight"),
        ({"trend_min_answers": 4}, "trend_min_answers"),
        ({"window": 32, "trend_min_answers": 48}, "trend_min_answers"),
    ],
)
def test_trend_params_are_validated(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        MarginParams.model_validate(overrides)
