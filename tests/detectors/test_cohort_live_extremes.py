"""Cohort parameters changed live to their extremes on detectors with state.

An operator may push ``cohort_window_s`` to an hour, ``cohort_min_keys`` to
2, the strong bars down to the ordinary ones and tolerances near 1 while
keys are young and pooled: every batch after the change must score, with
finite scores in [0, 1] and evidence that formats, and no numpy warning
(a warning in a batch is an invalid value somewhere, even when the score
that reached the caller was the other branch's).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from detectors import OodParams, OutOfDistributionDetector
from detectors.base import Detector
from detectors.margin import MarginDetector, MarginParams
from detectors.traffic import TrafficDetector
from tests.detectors.test_margin_cohort import answers
from tests.detectors.test_ood import continuous_reference, wide_queries

T0 = 1.7e9
KEYS = [f"k{i}" for i in range(12)]
Step = Callable[[Detector[Any], float, np.random.Generator], list[Any]]


def _traffic() -> tuple[Detector[Any], Step]:
    def step(d: Detector[Any], t: float, rng: np.random.Generator) -> list[Any]:
        at = t + rng.uniform(0.0, 0.01, len(KEYS))
        return d.score_batch(KEYS, np.zeros((len(KEYS), 3)), arrival_s=at)

    return TrafficDetector(seed=0), step


def _ood() -> tuple[Detector[Any], Step]:
    detector = OutOfDistributionDetector(OodParams())
    detector.learn_baseline(continuous_reference())

    def step(d: Detector[Any], t: float, rng: np.random.Generator) -> list[Any]:
        rows = wide_queries(len(KEYS), seed=int(rng.integers(1000)))
        at = t + rng.uniform(0.0, 0.01, len(KEYS))
        return d.score_batch(KEYS, rows, learn=[False] * len(KEYS), arrival_s=at)

    return detector, step


def _margin() -> tuple[Detector[Any], Step]:
    detector = MarginDetector(MarginParams())
    rng = np.random.default_rng(0)
    x = rng.random((600, 4))
    margins = rng.random(600)
    detector.learn_baseline(x)
    detector.learn_output_baseline(x, answers(margins))
    warm = [f"w{i}" for i in range(600)]
    detector.score_batch(warm, x, arrival_s=np.full(600, T0 - 50.0))
    detector.observe_outputs(warm, x, answers(margins))

    def step(d: Detector[Any], t: float, rng: np.random.Generator) -> list[Any]:
        rows = rng.random((len(KEYS), 4))
        quiet = [False] * len(KEYS)
        at = t + rng.uniform(0.0, 0.01, len(KEYS))
        scores = d.score_batch(KEYS, rows, learn=quiet, arrival_s=at)
        climb = np.full(len(KEYS), min(1.0, 0.03 * (t - T0) / 0.25))
        d.observe_outputs(KEYS, rows, answers(climb), learn=quiet)
        return scores

    return detector, step


INF = float("inf")
CASES: list[tuple[Callable[[], tuple[Detector[Any], Step]], list[dict[str, Any]]]] = [
    (
        _traffic,
        [
            {"cohort_window_s": 3600.0, "cohort_pace_share": 10.0},
            {"cohort_min_keys": 2, "cohort_min_pairs": 1},
            {"member_z": 0.0, "strong_member_z": 0.0},
            {"strong_cohort_z": 6.0, "cohort_step_z": 0.01},
            {"cohort_tolerance": 0.999, "cohort_match_rate": 0.999},
            {"cohort_match_rate": 1e-6, "cohort_pace_share": 0.0},
            {"cohort_z": 0.01, "strong_cohort_z": 0.01},
            {"cohort_window_s": 0.0},
            {"cohort_window_s": 3600.0},
        ],
    ),
    (
        _ood,
        [
            {"cohort_window_s": 3600.0, "cohort_pace_share": 10.0},
            {"cohort_min_keys": 2, "cohort_member_tail": 1.0},
            {"cohort_significance": 1.0, "honest_rate": 0.999},
            {"cohort_significance": 1e-300, "cohort_member_tail": 1e-300},
            {"range_repeat_eps": 1.0, "honest_rate": 1e-300},
            {"cohort_window_s": 0.0},
            {"cohort_window_s": 3600.0},
        ],
    ),
    (
        _margin,
        [
            {"cohort_window_s": 3600.0, "cohort_pace_share": 10.0},
            {"cohort_min_keys": 2, "member_z": 0.0, "rank_member_z": 0.0},
            {"cohort_z": 1e-300, "rank_z": 1e-300, "opening_z": 1e-300},
            # Infinity is refused as not finite (every float parameter);
            # the largest double is the bar no key reaches.
            {"cohort_z": 1.7e308, "rank_z": 1.7e308},
            {"rank_min_answers": 8, "rank_horizon": 16, "rank_min_baseline": 64},
            {"rank_horizon": 100_000, "rank_repeat_eps": 1.0},
            {"cohort_window_s": 0.0},
            {"cohort_window_s": 3600.0, "cohort_pace_share": 0.0},
        ],
    ),
]


def _play(detector: Detector[Any], step: Step, changes: list[dict[str, Any]]) -> None:
    rng = np.random.default_rng(0)
    t = T0
    for _ in range(6):
        step(detector, t, rng)
        t += 0.25
    for change in changes:
        detector.set_params(**change)
        for _ in range(3):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                scores = step(detector, t, rng)
                for score in scores:
                    assert 0.0 <= score.score <= 1.0, (change, score)
                    assert score.evidence
            t += 0.25


@pytest.mark.parametrize(("build", "changes"), CASES, ids=["traffic", "ood", "margin"])
def test_extreme_cohort_parameters_live(
    build: Callable[[], tuple[Detector[Any], Step]], changes: list[dict[str, Any]]
) -> None:
    detector, step = build()
    _play(detector, step, changes)


@pytest.mark.parametrize(
    "change",
    [
        {"cohort_z": INF, "strong_cohort_z": INF, "cohort_step_z": INF},
        # A match rate near 0 puts honest z near 1e151.
        {"cohort_match_rate": 1e-300, "cohort_step_z": 1e-300},
        {"solo_z": INF, "solo_step_z": INF},
        {"solo_match_rate": 1e-300, "solo_step_z": 1e-300},
    ],
)
def test_degenerate_cohort_bars_are_refused_or_harmless(change: dict[str, Any]) -> None:
    detector, step = _traffic()
    try:
        detector.set_params(**change)
    except ValueError:
        return
    _play(detector, step, [{}])
