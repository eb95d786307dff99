"""The score-based probing attacks (Square through ART, NES) against models in
this process: they find adversarial examples, count and bound their queries,
and keep every query inside the declared range and the L-inf ball."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from evaluation.attacks.scorebased import (
    NesParams,
    SquareParams,
    UnitBox,
    grid_side,
    nes_attack_one,
    run_nes,
    run_square,
)
from evaluation.oracle import DirectOracle

Array = np.ndarray[Any, Any]

EPS = 0.2  # share of the 0..16 pixel range: 3.2 grey levels


@pytest.fixture(scope="module")
def digits_lr() -> tuple[LogisticRegression, Array, Array]:
    """A logistic regression on half of scikit-learn's digits, and 12 held-out
    digits it classifies correctly with their labels."""
    x, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=2000).fit(x[::2], y[::2])
    held_x, held_y = x[1::2], y[1::2]
    right = np.flatnonzero(model.predict(held_x) == held_y)[:12]
    return model, held_x[right].astype(np.float32), held_y[right]


class _Recording:
    """A query function that answers with ``predict_proba`` and keeps every
    row it was asked."""

    def __init__(self, predict_proba: Any) -> None:
        self._predict = predict_proba
        self.rows: list[Array] = []

    def __call__(self, rows: Array) -> Array:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        self.rows.extend(rows)
        return np.asarray(self._predict(rows), dtype=np.float32)


def test_nes_finds_an_adversarial_digit_within_its_budget_on_most_inputs(
    digits_lr: tuple[LogisticRegression, Array, Array],
) -> None:
    model, x, _ = digits_lr
    params = NesParams(eps=EPS, step=EPS / 4)
    box = UnitBox(x, params.clip, per_feature=False)
    rng = np.random.default_rng(0)
    found = 0
    for image in x:
        oracle = DirectOracle(model.predict_proba, budget=300)
        adversarial = nes_attack_one(oracle, image, box, params, 300, rng)
        assert oracle.used <= 300
        if adversarial is None:
            continue
        row, label = adversarial
        # Really misclassified, and within the ball and the pixel range.
        assert model.predict(row[None, :])[0] == label != model.predict(image[None])[0]
        assert np.abs(row - image).max() <= EPS * 16 + 1e-4
        assert row.min() >= 0.0 and row.max() <= 16.0
        found += 1
    assert found >= 9, f"NES found {found} of {len(x)}"


def test_nes_uses_exactly_one_query_plus_samples_and_a_check_per_iteration() -> None:
    # A model that never changes its mind: NES runs every iteration it can.
    def constant(rows: Array) -> Array:
        return np.tile(np.array([0.9, 0.1], dtype=np.float32), (len(rows), 1))

    x = np.random.default_rng(1).uniform(0, 16, (2, 64)).astype(np.float32)
    params = NesParams(samples=10, n_classes=2)
    oracle = DirectOracle(constant, budget=10_000, n_classes=2)
    box = UnitBox(x, params.clip, per_feature=False)

    assert nes_attack_one(oracle, x[0], box, params, 100, np.random.default_rng(0)) is (
        None
    )
    # 1 + k * 11 <= 100: k = 9 iterations, 100 queries.
    assert oracle.used == 1 + 9 * 11

    result = run_nes(
        DirectOracle(constant, budget=10_000, n_classes=2),
        x,
        np.array([0, 1]),
        np.array([0, 0]),
        NesParams(budget=200, n_targets=2, samples=10, n_classes=2),
    )
    assert [t.queries for t in result.targets] == [100, 100]
    assert result.queries == 200 and result.stopped_by is None


def test_nes_stops_at_the_budget_and_keeps_the_answered_rows(
    digits_lr: tuple[LogisticRegression, Array, Array],
) -> None:
    model, x, labels = digits_lr
    oracle = DirectOracle(model.predict_proba, budget=50)
    result = run_nes(
        oracle,
        x,
        np.arange(3),
        labels,
        NesParams(budget=600, n_targets=3, eps=EPS, step=EPS / 4),
    )
    assert result.stopped_by == "BUDGET"
    assert result.queries == oracle.used == 50
    assert sum(t.queries for t in result.targets) == 50


def test_square_finds_adversarial_digits_inside_the_ball_and_never_asks_twice(
    digits_lr: tuple[LogisticRegression, Array, Array],
) -> None:
    model, x, labels = digits_lr
    oracle = _Recording(model.predict_proba)
    n_targets = 6
    result = run_square(
        oracle,
        x,
        np.arange(n_targets),
        labels,
        SquareParams(budget=150 * n_targets, n_targets=n_targets, eps=EPS),
    )

    assert result.found >= 4, result.to_dict()
    assert all(t.queries <= 150 for t in result.targets), result.to_dict()
    assert result.queries == len(oracle.rows)
    # Every query of target i lies in the L-inf ball around x[i], in range.
    asked = np.stack(oracle.rows)
    starts = np.cumsum([0] + [t.queries for t in result.targets])
    for i, (begin, end) in enumerate(itertools.pairwise(starts)):
        mine = asked[begin:end]
        assert np.abs(mine - x[i]).max() <= EPS * 16 + 1e-4
        assert mine.min() >= 0.0 and mine.max() <= 16.0
        # The memo answers ART's repeated questions: no row is sent twice.
        assert len(np.unique(mine, axis=0)) == len(mine)


def test_per_feature_box_keeps_queries_in_each_features_range() -> None:
    rng = np.random.default_rng(2)
    # Features of very different scales, one constant.
    scales = np.array([0.02, 1.0, 30.0, 4000.0, 0.0])
    x = (rng.uniform(0.5, 1.0, (40, 5)) * scales).astype(np.float32)
    weights = np.array([50.0, 1.0, 0.03, 0.0002, 0.0]) / scales.clip(1e-9)

    def model(rows: Array) -> Array:
        z = (np.asarray(rows, dtype=np.float64) - x.mean(axis=0)) @ weights
        p1 = 1.0 / (1.0 + np.exp(-z))
        return np.stack([1.0 - p1, p1], axis=1).astype(np.float32)

    labels = model(x).argmax(axis=1)
    for run in (run_nes, run_square):
        oracle = _Recording(model)
        params: Any = (NesParams if run is run_nes else SquareParams)(
            budget=120,
            n_targets=2,
            eps=EPS,
            per_feature=True,
            clip=(0.0, 5000.0),
            n_classes=2,
        )
        run(oracle, x, np.arange(2), labels, params)
        asked = np.stack(oracle.rows)
        assert (asked >= x.min(axis=0) - 1e-6).all(), run
        assert (asked <= x.max(axis=0) + 1e-3).all(), run
        # A constant feature is never moved; the others are.
        assert (asked[:, 4] == x[0, 4]).all()
        assert np.ptp(asked[:, :4], axis=0).min() > 0


def test_grid_side_and_parameter_checks() -> None:
    assert [grid_side(n) for n in (2, 9, 30, 64)] == [2, 3, 6, 8]
    with pytest.raises(ValueError, match="at least 2 features"):
        grid_side(1)
    with pytest.raises(ValueError, match="even number"):
        NesParams(samples=7)
