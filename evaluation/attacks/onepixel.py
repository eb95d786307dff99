"""The one-pixel attack: differential evolution over (x, y, value) tuples.

Su, Vargas and Sakurai, "One Pixel Attack for Fooling Deep Neural Networks",
IEEE Transactions on Evolutionary Computation 23(5), 2019. A candidate
perturbation is ``n_pixels`` tuples (column, row, new value); differential
evolution (DE/rand/1 in the paper; scipy's ``differential_evolution`` here,
same family) evolves a population of candidates to minimise the probability
the model gives the true class, and stops early as soon as one candidate is
misclassified. Only the output probabilities are used: a black-box,
score-based attack.

Every candidate of every generation is one oracle query (scipy's vectorised
mode hands over the whole population at once, which becomes one batch of
queries). The paper uses a population of 400 and up to 100 generations on
32 x 32 images; digits are 8 x 8, and the budget here allows far fewer, so
``popsize`` and ``maxiter`` are small and stated in the report.

Imports numpy and scipy; the oracle is a ``QueryFn``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import differential_evolution

from evaluation.attacks.probing import ProbingResult, TargetOutcome
from evaluation.oracle import QueryFn, QueryStopped

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class OnePixelParams:
    """Settings of one one-pixel run.

    Attributes
    ----------
    budget
        Queries allowed in total (also enforced by the oracle).
    n_targets
        Inputs attacked, one after the other.
    n_pixels
        Pixels changed per candidate (the paper reports 1, 3 and 5).
    side
        Image side length (digits: 8).
    popsize
        scipy's population multiplier: the population is popsize x 3 x
        n_pixels candidates.
    maxiter
        Generations at most per input.
    clip
        Pixel value range.
    seed
        Seeds the evolution.
    """

    budget: int = 600
    n_targets: int = 3
    n_pixels: int = 1
    side: int = 8
    popsize: int = 10
    maxiter: int = 8
    clip: tuple[float, float] = (0.0, 16.0)
    seed: int = 0


class _Found(Exception):
    """Raised inside the objective to end the evolution early."""


def apply_pixels(image: Array, candidates: Array, side: int) -> Array:
    """The images obtained by writing each candidate's pixels into ``image``.

    ``candidates`` has shape (n, 3 * n_pixels): (column, row, value) tuples;
    positions are floored to integers.
    """
    candidates = np.atleast_2d(candidates)
    out = np.repeat(np.asarray(image, dtype=np.float32)[None, :], len(candidates), 0)
    for start in range(0, candidates.shape[1], 3):
        column = np.clip(candidates[:, start].astype(int), 0, side - 1)
        row = np.clip(candidates[:, start + 1].astype(int), 0, side - 1)
        out[np.arange(len(out)), row * side + column] = candidates[:, start + 2]
    return out


def attack_one(
    query: QueryFn, image: Array, label: int, params: OnePixelParams, seed: int
) -> tuple[Array, int] | None:
    """Evolve pixel changes to ``image`` until one is misclassified.

    Returns the adversarial image and its new label, or None.

    Raises
    ------
    QueryStopped
        The oracle stopped answering.
    """
    found: list[tuple[Array, int]] = []

    def objective(population: Array) -> Array:
        # scipy passes the population transposed: shape (parameters, n).
        images = apply_pixels(image, population.T, params.side)
        proba = query(images)
        wrong = np.flatnonzero(proba.argmax(axis=1) != label)
        if wrong.size:
            found.append((images[wrong[0]], int(proba[wrong[0]].argmax())))
            raise _Found
        return np.asarray(proba[:, label], dtype=np.float64)

    bounds = [
        (0.0, params.side - 1e-6),
        (0.0, params.side - 1e-6),
        params.clip,
    ] * params.n_pixels
    try:
        differential_evolution(
            objective,
            bounds,
            popsize=params.popsize,
            maxiter=params.maxiter,
            # The paper's settings: no crossover, F = 0.5, no polishing.
            recombination=0.0,
            mutation=0.5,
            strategy="rand1bin",
            polish=False,
            init="random",
            tol=0.0,
            vectorized=True,
            updating="deferred",
            rng=seed,
        )
    except _Found:
        return found[0]
    return None


class _Counting:
    """Counts the rows the oracle answered, including those of a call that
    stopped part-way."""

    def __init__(self, query: QueryFn) -> None:
        self._query = query
        self.answered = 0

    def __call__(self, rows: Array) -> Array:
        try:
            proba = self._query(rows)
        except QueryStopped as stop:
            self.answered += int(np.sum(stop.answered))
            raise
        self.answered += len(rows)
        return proba


def run_one_pixel(
    query: QueryFn, x: Array, indices: Array, labels: Array, params: OnePixelParams
) -> ProbingResult:
    """Attack ``x[i]`` for each ``i`` in ``indices`` until the oracle stops.

    An input counts as attacked successfully when an evolved candidate is
    labelled differently from ``labels[i]``; its L2 distance (input units) to
    the original is reported like the other probing attacks'.
    """
    started = time.monotonic()
    counting = _Counting(query)
    result = ProbingResult()
    for position, index in enumerate(indices):
        outcome = TargetOutcome(index=int(index), label=int(labels[index]))
        result.targets.append(outcome)
        before = counting.answered
        try:
            adversarial = attack_one(
                counting, x[index], outcome.label, params, params.seed + position
            )
        except QueryStopped as stop:
            result.stopped_by = stop.reason
            break
        finally:
            outcome.queries = counting.answered - before
        if adversarial is not None:
            image, new_label = adversarial
            outcome.best_l2 = float(np.linalg.norm(image - x[index]))
            outcome.best_label = new_label
        logger.debug(
            "one-pixel target done",
            extra={"index": int(index), "queries": outcome.queries},
        )
    result.queries = counting.answered
    result.seconds = time.monotonic() - started
    return result
