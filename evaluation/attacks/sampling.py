"""Extraction by choosing queries and retraining a surrogate on the answers.

Three attacks share one loop (query a round of inputs, retrain the surrogate
on everything answered so far, measure its agreement with the real model on
held-out data) and differ in how a round's inputs are chosen:

- ``random``: inputs drawn uniformly from the signature's declared value
  range, the baseline "random queries" strategy of Tramèr et al. (USENIX
  Security 2016, section 5, retraining with uniform queries);
- ``knockoff``: natural inputs from a *different* distribution, sampled at
  random from a transfer set, the "random" strategy of Orekondy, Schiele and
  Fritz, "Knockoff Nets: Stealing Functionality of Black-Box Models", CVPR
  2019. As in the paper the surrogate is trained on the victim's full
  probability vectors (soft labels): cross-entropy against a probability
  vector equals a sum of per-class cross-entropies weighted by the
  probabilities, so each answered row is fitted once per likely class with
  that class's probability as its sample weight;
- ``active``: pool-based uncertainty sampling (Lewis and Gale 1994, used for
  extraction by Chandrasekaran et al., USENIX Security 2020, and Pal et al.,
  ActiveThief, AAAI 2020): start from a few random pool points, then each round
  query the unlabelled pool points on which the current surrogate is least
  certain (lowest top-class probability) and retrain.

For digits the Knockoff transfer set is 8 x 8 patches of the two photographs
scikit-learn ships (``load_sample_images``): natural images, but not digits,
the way the paper queries a CIFAR or Caltech victim with ImageNet pictures.
No bundled data shares the tabular models' features, so Knockoff runs on the
image models only.

Pure numpy and scikit-learn; the oracle is a ``QueryFn``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from evaluation.attacks.extraction import ExtractionResult, agreement
from evaluation.oracle import QueryFn, QueryStopped

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
Strategy = Literal["random", "knockoff", "active"]
# Soft-label classes below this probability are left out of the weighted fit:
# they change the loss by less than the optimiser's tolerance.
_SOFT_LABEL_FLOOR = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    """Settings of one sampling-extraction run.

    Attributes
    ----------
    budget
        Oracle queries (rows) allowed.
    round_size
        Queries per round; the surrogate is retrained (and measured) after each.
    initial
        Active learning only: random pool points labelled before the first
        uncertainty round.
    surrogate
        ``mlp`` (one hidden layer of ``hidden_units``) or ``logreg``.
    soft_labels
        Train on the probability vectors rather than the top label.
    clip
        The signature's declared value range.
    seed
        Seeds sampling and surrogate training.
    """

    budget: int = 800
    round_size: int = 100
    initial: int = 50
    surrogate: Literal["mlp", "logreg"] = "mlp"
    hidden_units: int = 64
    soft_labels: bool = False
    clip: tuple[float, float] = (0.0, 16.0)
    seed: int = 0


def make_surrogate(params: SamplingParams) -> Any:
    """A fresh, unfitted surrogate: standardised inputs, then the classifier."""
    model: Any
    if params.surrogate == "logreg":
        model = LogisticRegression(max_iter=1000, C=10.0)
    else:
        model = MLPClassifier(
            hidden_layer_sizes=(params.hidden_units,),
            max_iter=300,
            random_state=params.seed,
        )
    return Pipeline([("scale", StandardScaler()), ("clf", model)])


def fit_surrogate(x: Array, proba: Array, params: SamplingParams) -> Any | None:
    """Fit a surrogate on answered rows; None while only one class was seen.

    With ``soft_labels`` each row is repeated once per class whose probability
    is at least 0.001, weighted by that probability (soft cross-entropy).
    """
    proba = np.asarray(proba, dtype=np.float64)
    if params.soft_labels:
        rows, classes = np.nonzero(proba >= _SOFT_LABEL_FLOOR)
        fit_x, fit_y, weight = x[rows], classes, proba[rows, classes]
    else:
        fit_x, fit_y, weight = x, proba.argmax(axis=1), None
    if len(np.unique(fit_y)) < 2:
        return None
    model = make_surrogate(params)
    with warnings.catch_warnings():
        # Small early training sets never "converge"; the curve shows it.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(fit_x, fit_y, clf__sample_weight=weight)
    return model


def least_certain(model: Any, pool: Array, k: int) -> Array:
    """Indices of the ``k`` pool rows whose top predicted probability is lowest
    (the least-confidence rule of uncertainty sampling), most uncertain first."""
    confidence = np.asarray(model.predict_proba(pool)).max(axis=1)
    order = np.argsort(confidence, kind="stable")
    return np.asarray(order[:k])


def uniform_queries(
    n: int, n_features: int, clip: tuple[float, float], rng: np.random.Generator
) -> Array:
    """``n`` rows drawn uniformly from the declared range, float32."""
    return rng.uniform(clip[0], clip[1], size=(n, n_features)).astype(np.float32)


def natural_patches(n: int, rng: np.random.Generator, side: int = 8) -> Array:
    """``n`` natural-image patches as digits-like rows (side x side, 0..16).

    Random square crops (16 to 96 pixels wide) of scikit-learn's two bundled
    photographs, grey-scaled, block-averaged down to ``side`` x ``side``, and
    stretched to 0..16; half are inverted so bright-on-dark and dark-on-bright
    both occur (digits are bright strokes on a dark ground).
    """
    from sklearn.datasets import load_sample_images

    photos = [img.mean(axis=2) for img in load_sample_images().images]
    out = np.empty((n, side * side), dtype=np.float32)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        width = int(rng.integers(2, 13)) * side
        top = int(rng.integers(0, photo.shape[0] - width))
        left = int(rng.integers(0, photo.shape[1] - width))
        crop = photo[top : top + width, left : left + width]
        block = width // side
        small = crop.reshape(side, block, side, block).mean(axis=(1, 3))
        low, high = small.min(), small.max()
        small = (small - low) / (high - low + 1e-9) * 16.0
        if rng.random() < 0.5:
            small = 16.0 - small
        out[i] = small.ravel()
    return out


def run_sampling_extraction(
    query: QueryFn,
    strategy: Strategy,
    eval_x: Array,
    eval_labels: Array,
    params: SamplingParams,
    *,
    pool: Array | None = None,
    on_round: Callable[[int, int, float], None] | None = None,
) -> ExtractionResult:
    """Run one strategy until the budget or the oracle runs out.

    Parameters
    ----------
    query
        The oracle.
    strategy
        ``random``, ``knockoff`` (needs ``pool``: the transfer set) or
        ``active`` (needs ``pool``: the unlabelled public data).
    eval_x, eval_labels
        Held-out inputs and the real model's labels, for measurement only.
    params
        Attack settings.
    pool
        Candidate inputs for ``knockoff`` and ``active``.
    on_round
        Called with (round, queries, agreement) after each retraining.
    """
    if strategy != "random" and (pool is None or len(pool) == 0):
        raise ValueError(f"strategy {strategy!r} needs a pool of inputs")
    started = time.monotonic()
    rng = np.random.default_rng(params.seed)
    n_features = eval_x.shape[1]
    result = ExtractionResult()
    known_x = np.empty((0, n_features), dtype=np.float32)
    known_p = np.empty((0, 0), dtype=np.float32)
    unused = np.ones(0 if pool is None else len(pool), dtype=bool)
    order = rng.permutation(len(unused))  # Knockoff's random draw order
    surrogate: Any | None = None

    for rho in range(10_000):
        # Step 1: choose this round's inputs.
        size = min(params.round_size, params.budget - result.queries)
        if strategy == "active" and rho == 0:
            size = min(params.initial, size)
        if size <= 0:
            result.stopped_by = result.stopped_by or "BUDGET"
            break
        picked: Array | None = None
        if strategy == "random":
            batch = uniform_queries(size, n_features, params.clip, rng)
        else:
            assert pool is not None
            candidates = np.flatnonzero(unused)
            if strategy == "active" and surrogate is not None and len(candidates):
                picked = candidates[least_certain(surrogate, pool[candidates], size)]
            else:
                picked = np.asarray([i for i in order if unused[i]][:size])
            if len(picked) == 0:
                result.stopped_by = "POOL"
                break
            unused[picked] = False
            batch = pool[picked].astype(np.float32)

        # Step 2: ask the oracle, keeping what it answered if it stops.
        try:
            answers = query(batch)
            answered = np.ones(len(batch), dtype=bool)
        except QueryStopped as stop:
            answers, answered = stop.probabilities, stop.answered
            result.stopped_by = stop.reason
        result.queries += int(answered.sum())
        known_x = np.concatenate([known_x, batch[answered]])
        known_p = (
            answers[answered]
            if known_p.size == 0
            else np.concatenate([known_p, answers[answered]])
        )

        # Step 3: retrain and measure.
        fitted = fit_surrogate(known_x, known_p, params) if len(known_x) else None
        if fitted is not None:
            surrogate = fitted
            result.rounds = rho + 1
            result.agreement = agreement(surrogate.predict(eval_x), eval_labels)
            result.curve.append((result.queries, result.agreement))
            if on_round is not None:
                on_round(rho, result.queries, result.agreement)
        logger.debug(
            "sampling extraction round",
            extra={
                "strategy": strategy,
                "round": rho,
                "queries": result.queries,
                "agree": result.agreement,
            },
        )
        if result.stopped_by is not None:
            break

    result.seconds = time.monotonic() - started
    return result
