"""The Jacobian-augmentation attack's pure parts: the input gradient, one
augmentation step, agreement, and the loop's handling of budget and refusal."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from evaluation.attacks.extraction import (
    JacobianParams,
    agreement,
    class_gradient,
    jacobian_augment,
    pick_seed_set,
    run_jacobian_extraction,
)
from evaluation.oracle import DirectOracle, QueryRefused

Array = np.ndarray[Any, Any]


def _toy_data(seed: int = 0) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(90, 5))
    y = np.argmax(x[:, :3] + 0.3 * rng.normal(size=(90, 3)), axis=1)
    return x, y


def _fit(model: Any, x: Array, y: Array) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


@pytest.mark.parametrize(
    ("model", "binary"),
    [
        (MLPClassifier(hidden_layer_sizes=(7,), max_iter=500, random_state=0), False),
        (
            MLPClassifier(
                hidden_layer_sizes=(4, 3),
                activation="tanh",
                max_iter=500,
                random_state=0,
            ),
            False,
        ),
        (LogisticRegression(max_iter=500), False),
        # One logit for two classes (breast_cancer's substitute).
        (LogisticRegression(max_iter=500), True),
    ],
    ids=["mlp-relu", "mlp-tanh-2layers", "logreg", "logreg-binary"],
)
def test_class_gradient_matches_finite_differences(model: Any, binary: bool) -> None:
    x, y = _toy_data()
    if binary:
        y = (y == 0).astype(int)
    model = _fit(model, x, y)
    rows, classes = x[:6], y[:6]

    analytic = class_gradient(model, rows, classes)

    eps = 1e-6
    numeric = np.zeros_like(rows)
    index = np.arange(len(rows))
    column = np.searchsorted(model.classes_, classes)
    for j in range(rows.shape[1]):
        step = np.zeros(rows.shape[1])
        step[j] = eps
        up = model.predict_proba(rows + step)[index, column]
        down = model.predict_proba(rows - step)[index, column]
        numeric[:, j] = (up - down) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, atol=1e-6)


def test_class_gradient_refuses_unknown_class() -> None:
    x, y = _toy_data()
    model = _fit(LogisticRegression(max_iter=500), x, y)
    with pytest.raises(ValueError, match="fitted on"):
        class_gradient(model, x[:1], np.array([7]))


def test_augmentation_moves_each_pixel_by_step_along_the_gradient_sign() -> None:
    x, y = _toy_data()
    scale = 16.0
    inputs = np.clip((x + 3.0) * 2.0, 0.0, 16.0)  # input units, inside [0, 16]
    model = _fit(
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=500, random_state=0),
        inputs / scale,
        y,
    )
    step = 0.5

    moved = jacobian_augment(model, inputs, y, step, scale=scale, clip=(0.0, 16.0))

    sign = np.sign(class_gradient(model, inputs / scale, y))
    expected = np.clip(inputs + step * sign, 0.0, 16.0)
    assert moved.shape == inputs.shape
    assert moved.dtype == np.float32
    np.testing.assert_allclose(moved, expected, atol=1e-5)
    # Ascending the gradient of the label's probability raises that probability
    # for (almost) every point: the step is small and points the right way.
    column = np.searchsorted(model.classes_, y)
    before = model.predict_proba(inputs / scale)[np.arange(len(y)), column]
    after = model.predict_proba(moved / scale)[np.arange(len(y)), column]
    assert np.mean(after >= before) > 0.9


def test_augmentation_clips_to_the_valid_range() -> None:
    x, y = _toy_data()
    model = _fit(LogisticRegression(max_iter=500), x, y)
    moved = jacobian_augment(model, x, y, 100.0, scale=1.0, clip=(-1.0, 1.0))
    assert moved.min() >= -1.0
    assert moved.max() <= 1.0


def test_agreement() -> None:
    assert agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    assert agreement(np.array([5]), np.array([5])) == 1.0
    with pytest.raises(ValueError):
        agreement(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError):
        agreement(np.array([]), np.array([]))


def test_seed_set_takes_per_class_examples() -> None:
    labels = np.repeat(np.arange(10), 5)
    chosen = pick_seed_set(np.zeros((50, 2)), labels, 2, np.random.default_rng(0))
    assert len(chosen) == 20
    assert np.bincount(labels[chosen]).tolist() == [2] * 10


class _Victim:
    """A fixed linear "real model" on 8 features with values in [0, 16]."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.weights = rng.normal(size=(8, 3))

    def predict_proba(self, rows: Array) -> Array:
        logits = (np.asarray(rows) / 16.0 - 0.5) @ self.weights * 4.0
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float32)


def _victim_setup() -> tuple[_Victim, Array, Array, Array]:
    victim = _Victim()
    pool = np.random.default_rng(2).uniform(0, 16, size=(400, 8)).astype(np.float32)
    labels = victim.predict_proba(pool).argmax(axis=1)
    seeds = pick_seed_set(pool, labels, 2, np.random.default_rng(0))
    return victim, pool, labels, seeds


def test_loop_spends_exactly_the_budget_and_records_the_curve() -> None:
    victim, pool, labels, seeds = _victim_setup()
    params = JacobianParams(budget=50, substitute="logreg", step=1.0)
    oracle = DirectOracle(victim.predict_proba, params.budget)

    result = run_jacobian_extraction(oracle, pool[seeds], pool, labels, params)

    assert oracle.used == 50
    assert result.queries == 50
    assert result.stopped_by == "BUDGET"
    # 6 seeds, then 6, 12, 24 new points, then 2 sampled from 48 candidates.
    assert [q for q, _ in result.curve] == [6, 12, 24, 48, 50]
    assert all(0.0 <= a <= 1.0 for _, a in result.curve)
    assert result.agreement == result.curve[-1][1]


def test_loop_is_deterministic_for_a_seed() -> None:
    victim, pool, labels, seeds = _victim_setup()
    params = JacobianParams(budget=60, substitute="mlp", hidden_units=8, seed=3)
    first = run_jacobian_extraction(
        DirectOracle(victim.predict_proba, 60), pool[seeds], pool, labels, params
    )
    second = run_jacobian_extraction(
        DirectOracle(victim.predict_proba, 60), pool[seeds], pool, labels, params
    )
    assert first.curve == second.curve


def test_refusal_keeps_the_answered_rows_and_stops() -> None:
    victim, pool, labels, seeds = _victim_setup()
    calls: list[int] = []

    def refusing(rows: Array) -> Array:
        # Answers the seeds, then half of the next batch, then refuses.
        calls.append(len(rows))
        proba = victim.predict_proba(rows)
        if len(calls) == 1:
            return proba
        answered = np.arange(len(rows)) < len(rows) // 2
        raise QueryRefused("BLOCKED", answered, np.where(answered[:, None], proba, 0))

    params = JacobianParams(budget=500, substitute="logreg")
    result = run_jacobian_extraction(refusing, pool[seeds], pool, labels, params)

    assert result.stopped_by == "BLOCKED"
    assert calls == [6, 6]
    assert result.queries == 6 + 3
    assert len(result.curve) == 2
