"""Adversarial probing with score-based black-box attacks: Square and NES.

Square: Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a
query-efficient black-box adversarial attack via random search", ECCV 2020,
as implemented by the Adversarial Robustness Toolbox
(``art.attacks.evasion.SquareAttack``, untargeted, L-inf). NES: Ilyas,
Engstrom, Athalye and Lin, "Black-box Adversarial Attacks with Limited
Queries and Information", ICML 2018: the gradient of the loss is estimated
from the answers at antithetic Gaussian samples around the current point
(their Algorithm 1) and followed by projected L-inf sign steps (PGD), as in
their query-limited setting. NES is written here; Square is ART's.

Both read the returned probabilities (score-based), unlike HopSkipJump and
Boundary (``attacks.probing``) which read only the label. Both run in a unit
box: feature j is mapped to ``(x_j - low_j) / span_j``, so that one ``eps``
means the same share of every feature's range. For images the box is the
declared pixel range (every pixel 0..16 on digits); for tabular data it is each
feature's range in the data the attacker holds (``per_feature``), because the
signature declares one range for all features (0..4466.7 on
``breast_cancer``, where some features are 0.02 wide). The bounds are clipped
to the declared range, so no query leaves it.

ART's Square attack wants an image: the d features are laid out row by row on
the smallest square grid that holds them, and grid cells past d are padding
the model never sees. On tabular data a "square" is then a block of features
that are neighbours only in the column order: the attack is a random search
over blocks of coordinates there, not the image attack of the paper.

ART's loop asks again for points it was already answered (the current
iterate, twice per iteration); an attacker keeps its answers, so
repeated rows of one target are answered from a memo and never sent: one new
query per iteration, as in the paper.

The best adversarial example is tracked from the query stream, as for the
other probing attacks (``attacks.probing.Tracker``).

Imports numpy and ART; the oracle is a ``QueryFn``. ART is synchronous, so run
this in a thread when the oracle needs the event loop.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.attacks.probing import (
    ProbingResult,
    TargetOutcome,
    Tracker,
    quiet_art_import,
)
from evaluation.oracle import QueryFn, QueryStopped

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

# Probabilities are clipped here before the log in NES's loss, so that an
# answer of exactly 0 (float32 underflow, a degraded answer) stays finite.
_PROBA_FLOOR = 1e-12


@dataclass(frozen=True)
class SquareParams:
    """Settings of one Square-attack run (ART's names where they are ART's).

    ``eps`` is the L-inf radius as a share of each feature's span (see the
    module docstring). ``p_init`` is the share of the grid the first squares
    cover; the paper's schedule halves it as the iterations go (ART rescales
    it to ``max_iter``, which here is each target's share of the budget).
    ART's default ``p_init`` is 0.8; 0.3 opens with 4 x 4 squares on the
    8 x 8 digits, a quarter of the image. ART fails (numpy's ``randint``
    on an empty range) when a square is as wide as the grid, so ``p_init``
    must keep ``round(sqrt(p_init) * side)`` below ``side``: below about
    0.69 on the 3 x 3 grid of a 9-feature model (0.7 fails).
    """

    budget: int = 500
    n_targets: int = 3
    eps: float = 0.2
    p_init: float = 0.3
    per_feature: bool = False
    clip: tuple[float, float] = (0.0, 16.0)
    n_classes: int = 10
    seed: int = 0


@dataclass(frozen=True)
class NesParams:
    """Settings of one NES run, in the unit box (shares of each feature's span).

    Attributes
    ----------
    budget
        Queries in total; each target gets ``budget // n_targets``.
    n_targets
        Inputs attacked, one after the other.
    eps
        L-inf radius of the perturbation.
    samples
        Queries per gradient estimate (``n`` in the paper; ``samples / 2``
        antithetic pairs), so an iteration costs ``samples + 1`` queries with
        the check of the new point.
    sigma
        Standard deviation of the search distribution.
    step
        Size of each sign step (the PGD learning rate).
    per_feature
        Scale each feature by its own range in the data held (tabular).
    clip
        Declared input range.
    n_classes
        Width of the answers.
    seed
        Seeds the Gaussian samples.
    """

    budget: int = 500
    n_targets: int = 3
    eps: float = 0.2
    samples: int = 10
    sigma: float = 0.02
    step: float = 0.05
    per_feature: bool = False
    clip: tuple[float, float] = (0.0, 16.0)
    n_classes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 2 or self.samples % 2:
            raise ValueError("NES needs an even number of samples, at least 2")


class UnitBox:
    """Maps inputs to the unit box the attacks search in and back.

    Parameters
    ----------
    x
        The inputs the attacker holds (rows, input units).
    clip
        Declared input range.
    per_feature
        False: every feature spans ``clip``. True: feature j spans the range
        of ``x[:, j]`` within ``clip``; a feature constant in ``x`` gets span
        0 and is never moved.
    """

    def __init__(
        self, x: Array, clip: tuple[float, float], *, per_feature: bool
    ) -> None:
        n_features = x.shape[1]
        if per_feature:
            low = np.maximum(np.min(x, axis=0), clip[0])
            high = np.minimum(np.max(x, axis=0), clip[1])
        else:
            low = np.full(n_features, clip[0])
            high = np.full(n_features, clip[1])
        self.low: Array = low.astype(np.float64)
        self.span: Array = np.maximum(high - low, 0.0).astype(np.float64)

    def to_unit(self, rows: Array) -> Array:
        safe = np.where(self.span > 0, self.span, 1.0)
        unit = np.where(self.span > 0, (rows - self.low) / safe, 0.0)
        return np.clip(unit, 0.0, 1.0)

    def to_input(self, unit: Array) -> Array:
        # Clipped once more in input units: float rounding must not carry a
        # query a hair past the declared range, which the gateway refuses.
        rows = self.low + self.span * np.clip(unit, 0.0, 1.0)
        bounded: Array = np.clip(rows, self.low, self.low + self.span)
        return bounded.astype(np.float32)


def grid_side(n_features: int) -> int:
    """Side of the smallest square grid holding ``n_features`` cells (ART's
    Square attack needs an image of at least 2 x 2)."""
    if n_features < 2:
        raise ValueError("the Square attack needs at least 2 features")
    return max(2, math.ceil(math.sqrt(n_features)))


class _Memo:
    """ART's predict function for one target: unit-box grid images in,
    answers out; rows answered before come from memory, new ones go through
    the tracker (which counts them) to the oracle."""

    def __init__(self, tracker: Tracker, box: UnitBox, n_features: int) -> None:
        self._tracker = tracker
        self._box = box
        self._n_features = n_features
        self._seen: dict[bytes, Array] = {}

    def reset(self) -> None:
        self._seen.clear()

    def __call__(self, images: Array) -> Array:
        unit = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
        unit = unit[:, : self._n_features]
        keys = [row.tobytes() for row in unit]
        fresh: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._seen and key not in fresh:
                fresh[key] = i
        if fresh:
            rows = self._box.to_input(unit[list(fresh.values())])
            answers = self._tracker(rows)
            for key, answer in zip(fresh, answers, strict=True):
                self._seen[key] = answer
        return np.stack([np.asarray(self._seen[key]) for key in keys])


def run_square(
    query: QueryFn, x: Array, indices: Array, labels: Array, params: SquareParams
) -> ProbingResult:
    """ART's Square attack (untargeted, L-inf) on ``x[i]`` for each ``i`` in
    ``indices`` until the oracle stops; the contract of
    ``attacks.probing.run_hopskipjump``.

    Each target gets ``budget // n_targets`` new queries: one for its label,
    one for the paper's opening stripes, one per iteration.
    """
    with quiet_art_import():
        from art.attacks.evasion import SquareAttack
        from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    started = time.monotonic()
    n_features = x.shape[1]
    side = grid_side(n_features)
    box = UnitBox(x, params.clip, per_feature=params.per_feature)
    tracker = Tracker(query)
    memo = _Memo(tracker, box, n_features)
    classifier = BlackBoxClassifierNeuralNetwork(
        predict_fn=memo,
        input_shape=(side, side, 1),
        nb_classes=params.n_classes,
        channels_first=False,
        clip_values=(0.0, 1.0),
    )
    per_target = params.budget // max(1, params.n_targets)
    attack = SquareAttack(
        estimator=classifier,
        norm=np.inf,
        max_iter=max(1, per_target - 2),
        eps=params.eps,
        p_init=params.p_init,
        nb_restarts=1,
        batch_size=1,
        verbose=False,
    )
    # ART draws the squares from numpy's global generator (as HopSkipJump
    # does); seeding it makes the direct and the gateway runs comparable.
    # TODO: in the evaluation, HopSkipJump and Boundary draw from the same
    # generator in other threads at the same time, so a gateway run's squares
    # need not be the direct run's (on digits, seed 0, run 013918-fb7b: 10
    # queries through the gateway, 26 direct). ART takes no generator;
    # running the ART attacks one at a time would make them repeatable, at
    # the cost of time.
    np.random.seed(params.seed)
    result = ProbingResult()
    for index in indices:
        outcome = TargetOutcome(index=int(index), label=int(labels[index]))
        result.targets.append(outcome)
        tracker.outcome = outcome
        tracker.original = x[index].astype(np.float32)
        memo.reset()
        flat = np.zeros((1, side * side), dtype=np.float32)
        flat[0, :n_features] = box.to_unit(x[index : index + 1])[0]
        image = flat.reshape(1, side, side, 1)
        try:
            # The attacker's own label for the input: its first query. Given
            # to ART, which would otherwise ask for it again (a memo hit, but
            # logged at INFO for every target).
            label = int(memo(image)[0].argmax())
            attack.generate(image, y=np.eye(params.n_classes)[[label]])
        except QueryStopped as stop:
            result.stopped_by = stop.reason
            break
        logger.debug(
            "square target done",
            extra={"index": int(index), "queries": outcome.queries},
        )
    result.queries = tracker.queries
    result.seconds = time.monotonic() - started
    return result


def nes_attack_one(
    query: QueryFn,
    original: Array,
    box: UnitBox,
    params: NesParams,
    max_queries: int,
    rng: np.random.Generator,
) -> tuple[Array, int] | None:
    """NES with projected sign steps on one input, at most ``max_queries``.

    The loss is the cross-entropy of the class the model gave ``original``
    (``-log p_y``); each iteration estimates its gradient from ``samples``
    antithetic Gaussian samples around the current point (Ilyas et al. 2018,
    Algorithm 1), steps ``step`` along its sign, projects onto the L-inf
    ball of radius ``eps`` around the original and onto the box, and asks
    for the new point. Uses exactly ``1 + k * (samples + 1)`` queries for
    ``k`` iterations, stopping at the first iterate labelled differently.

    Returns
    -------
    tuple[Array, int] | None
        The adversarial input (input units) and its label, or None.

    Raises
    ------
    QueryStopped
        The oracle stopped answering.
    """
    start = box.to_unit(original[None, :])[0]
    movable = box.span > 0
    label = int(query(box.to_input(start[None, :]))[0].argmax())
    point = start.copy()
    used = 1
    half = params.samples // 2
    while used + params.samples + 1 <= max_queries:
        # Antithetic pairs, asked in the paper's order (u_i, then -u_i), so
        # the estimate is sum (L(x + s u_i) - L(x - s u_i)) u_i.
        noise = rng.standard_normal((half, start.size))
        noise = np.stack([noise, -noise], axis=1).reshape(-1, start.size) * movable
        probes = box.to_input(point + params.sigma * noise)
        proba = np.asarray(query(probes), dtype=np.float64)
        loss = -np.log(np.maximum(proba[:, label], _PROBA_FLOOR))
        gradient = (loss[:, None] * noise).sum(axis=0) / (params.samples * params.sigma)

        # Ascend the loss of the true class (untargeted), then project.
        point = point + params.step * np.sign(gradient)
        point = np.clip(point, start - params.eps, start + params.eps)
        point = np.clip(point, 0.0, 1.0)
        row = box.to_input(point[None, :])
        answer = query(row)[0]
        used += params.samples + 1
        if int(answer.argmax()) != label:
            return row[0], int(answer.argmax())
    return None


def run_nes(
    query: QueryFn, x: Array, indices: Array, labels: Array, params: NesParams
) -> ProbingResult:
    """NES on ``x[i]`` for each ``i`` in ``indices`` until the oracle stops;
    the contract of ``attacks.probing.run_hopskipjump``. Each target gets
    ``budget // n_targets`` queries."""
    started = time.monotonic()
    box = UnitBox(x, params.clip, per_feature=params.per_feature)
    tracker = Tracker(query)
    rng = np.random.default_rng(params.seed)
    per_target = params.budget // max(1, params.n_targets)
    result = ProbingResult()
    for index in indices:
        outcome = TargetOutcome(index=int(index), label=int(labels[index]))
        result.targets.append(outcome)
        tracker.outcome = outcome
        tracker.original = x[index].astype(np.float32)
        try:
            nes_attack_one(tracker, x[index], box, params, per_target, rng)
        except QueryStopped as stop:
            result.stopped_by = stop.reason
            break
        logger.debug(
            "nes target done", extra={"index": int(index), "queries": outcome.queries}
        )
    result.queries = tracker.queries
    result.seconds = time.monotonic() - started
    return result
