"""Equation-solving extraction of a logistic regression (Tramèr et al. 2016).

Tramèr, Zhang, Juels, Reiter and Ristenpart, "Stealing Machine Learning Models
via Prediction APIs", USENIX Security 2016, section 4.1. A logistic regression
that returns probabilities leaks its logits: for a binary model
``log(p / (1 - p)) = w·x + b``, so d + 1 queries at linearly independent
points give d + 1 linear equations in the d + 1 unknowns (w, b). For a
multinomial (softmax) model the paper's version uses log-ratios against one
reference class: ``log(p_k / p_0) = (w_k - w_0)·x + (b_k - b_0)``; the same
d + 1 queries determine every difference, which is all the model's decisions
depend on. Affine preprocessing (a scaler in a Pipeline) keeps the logits
affine in the raw input, so the attack recovers the composite model.

The query points are a public sample (the attacker's one natural input) plus
small random perturbations of it: points spread over the whole declared range
would saturate the answers (float32 probabilities reach 1.0 at a logit near
17, and the log-ratio is then lost), and the paper's attack needs only that
the points are linearly independent, which random perturbations are with
probability one.

A gateway that rounds or perturbs probabilities ("degrade") corrupts the
equations; one that refuses part-way leaves fewer than d + 1, and the system
is then solved in the least-squares, minimum-norm sense with what was answered.

Pure numpy; the oracle is a ``QueryFn``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.attacks.extraction import ExtractionResult, agreement
from evaluation.oracle import QueryFn, QueryStopped

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

# Probabilities are clipped to this floor before the logarithm: an answer of
# exactly 0 (float32 underflow, or a degraded answer) would give -inf.
_PROBA_FLOOR = 1e-30


@dataclass(frozen=True)
class EquationParams:
    """Settings of one equation-solving run.

    Attributes
    ----------
    relative_step
        Perturbation of each feature, as a share of its magnitude in the
        public sample (plus ``absolute_step`` so zero features move too).
    absolute_step
        Perturbation floor in input units.
    clip
        The signature's declared value range; queries stay inside it.
    seed
        Seeds the perturbations.
    """

    relative_step: float = 0.05
    absolute_step: float = 0.05
    clip: tuple[float, float] = (0.0, 16.0)
    seed: int = 0


@dataclass(frozen=True)
class RecoveredModel:
    """The solved affine logit model: ``logits = [x, 1] @ theta`` with the
    reference class's logit fixed at 0 (``theta`` has one column per other
    class; one column for a binary model)."""

    theta: Array

    def logits(self, x: Array) -> Array:
        design = np.hstack([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))])
        others = design @ self.theta
        return np.hstack([np.zeros((len(x), 1)), others])

    def predict(self, x: Array) -> Array:
        return np.asarray(self.logits(x).argmax(axis=1))


def log_ratios(proba: Array) -> Array:
    """``log(p_k / p_0)`` for k = 1..K-1: the logit differences a softmax (or,
    for K = 2, logistic) model leaks. Shape (n, K - 1)."""
    p = np.clip(np.asarray(proba, dtype=np.float64), _PROBA_FLOOR, 1.0)
    return np.asarray(np.log(p[:, 1:]) - np.log(p[:, :1]))


def equation_queries(sample: Array, params: EquationParams) -> Array:
    """The d + 1 query points: ``sample`` and d random perturbations of it."""
    rng = np.random.default_rng(params.seed)
    base = np.asarray(sample, dtype=np.float64).ravel()
    d = base.size
    scale = params.relative_step * np.abs(base) + params.absolute_step
    noise = rng.uniform(-1.0, 1.0, size=(d, d)) * scale
    points = np.vstack([base, base + noise])
    return np.clip(points, *params.clip).astype(np.float32)


def solve(points: Array, proba: Array) -> RecoveredModel:
    """Solve ``[x, 1] @ theta = log_ratios(proba)`` (exactly when there are
    d + 1 independent points, least squares otherwise)."""
    x = np.asarray(points, dtype=np.float64)
    design = np.hstack([x, np.ones((len(x), 1))])
    theta, *_ = np.linalg.lstsq(design, log_ratios(proba), rcond=None)
    return RecoveredModel(np.asarray(theta))


def run_equation_solving(
    query: QueryFn,
    sample: Array,
    eval_x: Array,
    eval_labels: Array,
    params: EquationParams,
) -> tuple[ExtractionResult, RecoveredModel | None]:
    """Query d + 1 points, solve for the logits, measure the copy.

    Parameters
    ----------
    query
        The oracle.
    sample
        One public input the perturbations are centred on.
    eval_x, eval_labels
        Held-out inputs and the real model's labels, for the agreement only.
    params
        Attack settings.

    Returns
    -------
    tuple
        The result (one curve point, at the queries answered) and the solved
        model, or None when fewer than two rows were answered.
    """
    started = time.monotonic()
    result = ExtractionResult()
    points = equation_queries(sample, params)
    try:
        proba = query(points)
        answered = np.ones(len(points), dtype=bool)
    except QueryStopped as stop:
        proba, answered = stop.probabilities, stop.answered
        result.stopped_by = stop.reason
    result.queries = int(answered.sum())
    model: RecoveredModel | None = None
    if result.queries >= 2:
        model = solve(points[answered], proba[answered])
        result.agreement = agreement(model.predict(eval_x), eval_labels)
        result.rounds = 1
        result.curve.append((result.queries, result.agreement))
    result.stopped_by = result.stopped_by or "BUDGET"
    result.seconds = time.monotonic() - started
    logger.debug(
        "equation solving done",
        extra={"queries": result.queries, "agree": result.agreement},
    )
    return result, model


def true_affine_parameters(decision_function: Any, n_features: int) -> Array:
    """The real model's ``theta`` in the same parameterisation as
    ``RecoveredModel`` (logit differences to class 0), read from its exact
    float64 ``decision_function`` at the origin and the unit vectors.

    Ground truth for the report's parameter recovery error; it needs the model
    itself, so only the harness (never the attacker) calls it.
    """
    basis = np.vstack([np.zeros(n_features), np.eye(n_features)])
    logits = np.asarray(decision_function(basis), dtype=np.float64)
    # A binary model's decision function is already the log-ratio to class 0.
    ratios = logits[:, None] if logits.ndim == 1 else logits[:, 1:] - logits[:, :1]
    intercept = ratios[0]
    weights = ratios[1:] - intercept
    return np.asarray(np.vstack([weights, intercept]))


def recovery_error(recovered: RecoveredModel, truth: Array) -> float:
    """Relative error of the recovered parameters, ‖θ̂ - θ‖ / ‖θ‖ (0 = exact)."""
    return float(np.linalg.norm(recovered.theta - truth) / np.linalg.norm(truth))
