"""Model extraction by Jacobian-based dataset augmentation (Papernot et al.).

Papernot, McDaniel, Goodfellow, Jha, Celik and Swami, "Practical Black-Box
Attacks against Machine Learning", ASIA CCS 2017, Algorithm 1: start from a
small set of public inputs, label them with the victim (the oracle), train a
substitute on the labels, then grow the set with
``x + λ · sign(∂F_y(x)/∂x)`` for every known ``x``, where ``F`` is the
substitute's softmax and ``y`` the oracle's label for ``x``, and repeat. Two
refinements from the same paper are kept: the periodic step size
``λ_ρ = λ · (-1)^⌊ρ/τ⌋`` and reservoir sampling (only a random subset of the
new points is queried once the budget would be exceeded).

Only the oracle's labels are used, as in the paper, so rounding or perturbing
the probabilities (the gateway's "degrade") does not slow this attack down;
refusing to answer does.

Pure numpy and scikit-learn; the oracle is a ``QueryFn``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from evaluation.oracle import QueryFn, QueryStopped

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
# A fitted MLPClassifier or LogisticRegression; scikit-learn ships no type hints.
Substitute: TypeAlias = Any


@dataclass(frozen=True)
class JacobianParams:
    """Settings of one Jacobian-augmentation run.

    Attributes
    ----------
    budget
        Oracle queries (rows) allowed, seed labels included.
    step
        λ in input units. Papernot et al. use λ = 0.1 on MNIST scaled to
        [0, 1]; digits pixels run 0..16, so 0.1 · 16 = 1.6.
    tau
        Rounds between sign flips of λ (the paper's periodic step size; it
        used τ = 3).
    max_rounds
        Substitute training rounds at most (ρ in the paper).
    substitute
        ``mlp`` (one hidden ReLU layer, the paper's DNN in miniature) or
        ``logreg``.
    hidden_units
        Width of the MLP's hidden layer.
    clip
        Valid input range; augmented points are clipped to it.
    seed
        Seeds reservoir sampling and substitute training.
    """

    budget: int = 1500
    step: float = 1.6
    tau: int = 3
    max_rounds: int = 12
    substitute: Literal["mlp", "logreg"] = "mlp"
    hidden_units: int = 64
    clip: tuple[float, float] = (0.0, 16.0)
    seed: int = 0


@dataclass
class ExtractionResult:
    """What the attacker got: its curve of agreement against queries spent.

    ``curve`` holds ``(queries, agreement)`` after each substitute training,
    where agreement is the share of the evaluation inputs on which the
    substitute and the real model predict the same class (0..1, higher is a
    better copy). ``stopped_by`` is the refusal code, ``BUDGET``, or None if
    the rounds ran out first.
    """

    queries: int = 0
    rounds: int = 0
    agreement: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)
    stopped_by: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "rounds": self.rounds,
            "agreement": round(self.agreement, 4),
            "curve": [[q, round(a, 4)] for q, a in self.curve],
            "stopped_by": self.stopped_by,
            "seconds": round(self.seconds, 2),
        }


def agreement(first: Array, second: Array) -> float:
    """Share of positions where two label vectors agree, in [0, 1].

    Examples
    --------
    >>> agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]))
    0.75
    """
    first = np.asarray(first)
    second = np.asarray(second)
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {first.shape} vs {second.shape}")
    if first.size == 0:
        raise ValueError("nothing to compare")
    return float(np.mean(first == second))


def _softmax(logits: Array) -> Array:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


_ACTIVATIONS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    # name: (activation, derivative as a function of the pre-activation)
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(z.dtype)),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
    "logistic": (
        lambda z: 1.0 / (1.0 + np.exp(-z)),
        lambda z: (s := 1.0 / (1.0 + np.exp(-z))) * (1.0 - s),
    ),
    "identity": (lambda z: z, np.ones_like),
}


def class_gradient(model: Substitute, x: Array, classes: Array) -> Array:
    """∂p_c(x)/∂x for each row: the gradient of the softmax probability of the
    class named for that row, with respect to the (already scaled) input.

    Parameters
    ----------
    model
        A fitted multi-class ``MLPClassifier`` (softmax output) or a
        ``LogisticRegression`` (multinomial, or binary).
    x
        Inputs, shape (n, features), in the scale the model was fitted on.
    classes
        For each row, a label from ``model.classes_``.

    Returns
    -------
    numpy.ndarray
        Shape (n, features).
    """
    x = np.asarray(x, dtype=np.float64)
    column = np.searchsorted(model.classes_, classes)
    if np.any(column >= len(model.classes_)) or np.any(
        model.classes_[np.minimum(column, len(model.classes_) - 1)] != classes
    ):
        raise ValueError("every class must be one the model was fitted on")

    # Forward pass, keeping each layer's pre-activation for the backward pass.
    if isinstance(model, LogisticRegression):
        weights = [model.coef_.T]
        biases = [model.intercept_]
        if len(model.classes_) == 2:
            # A binary fit keeps one logit z for the second class; the
            # sigmoid of z is the softmax of (0, z).
            weights = [np.hstack([np.zeros_like(model.coef_.T), model.coef_.T])]
            biases = [np.concatenate([[0.0], model.intercept_])]
        hidden_act = "identity"
    else:
        if model.out_activation_ != "softmax":
            raise ValueError("only multi-class (softmax) MLPs are supported")
        weights = list(model.coefs_)
        biases = list(model.intercepts_)
        hidden_act = model.activation
    act, act_grad = _ACTIVATIONS[hidden_act]
    activations = [x]
    pre: list[Array] = []
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        z = activations[-1] @ w + b
        pre.append(z)
        if layer < len(weights) - 1:
            activations.append(act(z))
    proba = _softmax(pre[-1])

    # Backward pass: d p_c / d z_k = p_c (1[k = c] - p_k).
    rows = np.arange(len(x))
    p_c = proba[rows, column]
    upstream = -p_c[:, None] * proba
    upstream[rows, column] += p_c
    for layer in range(len(weights) - 1, -1, -1):
        grad_in = upstream @ weights[layer].T
        if layer == 0:
            return np.asarray(grad_in)
        upstream = grad_in * act_grad(pre[layer - 1])
    raise AssertionError("unreachable")  # pragma: no cover


def jacobian_augment(
    model: Substitute,
    x: Array,
    labels: Array,
    step: float,
    *,
    scale: float,
    clip: tuple[float, float],
) -> Array:
    """One augmentation step: ``clip(x + step · sign(∂F_label(x)/∂x))``.

    Parameters
    ----------
    model
        The substitute, fitted on ``x / scale``.
    x
        Known points in input units, shape (n, features).
    labels
        The oracle's label for each point.
    step
        λ_ρ in input units; negative steps move against the gradient.
    scale
        Divisor that maps input units to the substitute's scale.
    clip
        Valid input range.

    Returns
    -------
    numpy.ndarray
        The n new points, float32.
    """
    # The sign of the gradient is the same in both scales (scale > 0).
    gradient = class_gradient(model, np.asarray(x) / scale, np.asarray(labels))
    moved = np.asarray(x, dtype=np.float64) + step * np.sign(gradient)
    return np.clip(moved, clip[0], clip[1]).astype(np.float32)


def train_substitute(x: Array, labels: Array, params: JacobianParams) -> Substitute:
    """Fit the substitute on ``x`` (input units) and the oracle's labels."""
    scaled = np.asarray(x, dtype=np.float64) / params.clip[1]
    model: Substitute
    if params.substitute == "logreg":
        model = LogisticRegression(max_iter=500, C=10.0)
    else:
        model = MLPClassifier(
            hidden_layer_sizes=(params.hidden_units,),
            activation="relu",
            max_iter=400,
            random_state=params.seed,
        )
    with warnings.catch_warnings():
        # Tiny early training sets never "converge"; the curve shows the effect.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scaled, labels)
    return model


def run_jacobian_extraction(
    query: QueryFn,
    seed_x: Array,
    eval_x: Array,
    eval_labels: Array,
    params: JacobianParams,
    *,
    on_round: Callable[[int, int, float], None] | None = None,
) -> ExtractionResult:
    """Run Algorithm 1 until the budget, the rounds or the oracle run out.

    Parameters
    ----------
    query
        The oracle.
    seed_x
        The attacker's initial public inputs (input units).
    eval_x, eval_labels
        Held-out inputs and the real model's labels for them; used only to
        measure the substitute after each round, never shown to the oracle.
    params
        Attack settings.
    on_round
        Called with (round, queries, agreement) after each training.

    Returns
    -------
    ExtractionResult
        The final substitute's agreement and the curve.
    """
    started = time.monotonic()
    rng = np.random.default_rng(params.seed)
    scale = params.clip[1]
    result = ExtractionResult()
    known_x = np.empty((0, seed_x.shape[1]), dtype=np.float32)
    known_y = np.empty(0, dtype=np.int64)
    new_x = np.asarray(seed_x, dtype=np.float32)[: params.budget]

    for rho in range(params.max_rounds):
        # Step 1: label the new points with the oracle, keeping what it answered
        # even if it stops part-way.
        try:
            answers = query(new_x)
            answered = np.ones(len(new_x), dtype=bool)
        except QueryStopped as stop:
            answers, answered = stop.probabilities, stop.answered
            result.stopped_by = stop.reason
        result.queries += int(answered.sum())
        known_x = np.concatenate([known_x, new_x[answered]])
        known_y = np.concatenate([known_y, answers[answered].argmax(axis=1)])

        # Step 2: train the substitute on everything labelled so far. A single
        # class cannot be fitted; that only happens if the oracle refused at once.
        if len(np.unique(known_y)) < 2:
            break
        substitute = train_substitute(known_x, known_y, params)
        result.rounds = rho + 1
        result.agreement = agreement(substitute.predict(eval_x / scale), eval_labels)
        result.curve.append((result.queries, result.agreement))
        logger.info(
            "extraction round",
            extra={"round": rho, "queries": result.queries, "agree": result.agreement},
        )
        if on_round is not None:
            on_round(rho, result.queries, result.agreement)
        remaining = params.budget - result.queries
        if result.stopped_by is not None or remaining <= 0:
            result.stopped_by = result.stopped_by or "BUDGET"
            break

        # Step 3: augment every known point along the sign of the substitute's
        # Jacobian for its oracle label, with the periodic step size.
        step = params.step * (-1.0) ** (rho // params.tau)
        candidates = jacobian_augment(
            substitute, known_x, known_y, step, scale=scale, clip=params.clip
        )
        if len(candidates) > remaining:
            # Reservoir sampling: query only as many new points as the budget
            # still allows, chosen uniformly.
            keep = rng.choice(len(candidates), size=remaining, replace=False)
            candidates = candidates[np.sort(keep)]
        new_x = candidates

    result.seconds = time.monotonic() - started
    return result


def pick_seed_set(
    x: Array, labels: Array, per_class: int, rng: np.random.Generator
) -> Array:
    """Indices of ``per_class`` random examples of every class: the attacker's
    small "public" seed set (Papernot et al. used 150 MNIST test images; digits
    is smaller, so ten suffice)."""
    chosen: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        chosen.extend(rng.choice(members, size=per_class, replace=False).tolist())
    return np.asarray(sorted(chosen), dtype=np.int64)
