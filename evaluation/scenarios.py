"""The evaluation's catalogue: which attacks run on which model, with what
budget, and how each one is called on a query function.

A ``ModelTask`` is everything about one served model the harness needs: its
held-out data split into the attacker's unlabelled public pool and the
evaluation set (agreement is measured there, probing targets come from there),
the real model's labels, the declared value range and the surrogate family an
attacker would pick (an MLP for the image MLP, a logistic regression for the
logistic-regression victims, as Tramèr et al. assume the model class known).

``run_attack`` runs one attack on one ``QueryFn``, the same call for the
gateway run and for the unhindered baseline, and returns plain data.

Imports the attacks, numpy and the model zoo; nothing from the worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluation.attacks.equation import (
    EquationParams,
    recovery_error,
    run_equation_solving,
    true_affine_parameters,
)
from evaluation.attacks.extraction import JacobianParams, run_jacobian_extraction
from evaluation.attacks.onepixel import OnePixelParams, run_one_pixel
from evaluation.attacks.probing import (
    BoundaryParams,
    HopSkipJumpParams,
    run_boundary,
    run_hopskipjump,
)
from evaluation.attacks.sampling import (
    SamplingParams,
    Strategy,
    natural_patches,
    run_sampling_extraction,
)
from evaluation.attacks.scorebased import NesParams, SquareParams, run_nes, run_square
from evaluation.oracle import QueryFn
from gateway.models import DIGITS, ServedModel
from gateway.zoo import BREAST_CANCER, DIGITS_LR, PHISHING, SPLITS

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

EQUATION = "equation"
RANDOM = "random"
KNOCKOFF = "knockoff"
ACTIVE = "active"
PAPERNOT = "papernot"
HOPSKIPJUMP = "hopskipjump"
BOUNDARY = "boundary"
ONEPIXEL = "onepixel"
SQUARE = "square"
NES = "nes"
EXTRACTION_ATTACKS = (EQUATION, RANDOM, KNOCKOFF, ACTIVE, PAPERNOT)
PROBING_ATTACKS = (HOPSKIPJUMP, BOUNDARY, ONEPIXEL, SQUARE, NES)
ATTACKS = EXTRACTION_ATTACKS + PROBING_ATTACKS
MODELS = (DIGITS, DIGITS_LR, BREAST_CANCER, PHISHING)
IMAGE_MODELS = (DIGITS, DIGITS_LR)
LINEAR_MODELS = (DIGITS_LR, BREAST_CANCER, PHISHING)
# The score-based attacks' L-inf radius, as a share of each feature's span
# (the declared pixel range on images, the range in the data the attacker holds
# on tabular models): the smallest of the usual radii (0.05, 0.1, 0.2, 0.3)
# at which both Square and NES, unhindered, find an example for most of the
# targets of `digits` and `breast_cancer` within the probing budget (seeds 0
# and 1, measured 2026-12-06). At 0.1 NES finds one or two of three there.
SCORE_EPS = 0.2

# Where each attack can run at all: equation solving needs a logistic
# regression; Knockoff's transfer set, Papernot's pixel steps and the one-pixel
# attack need images. Square and NES skip `phishing`: unhindered, neither finds
# an example for more than one of its three targets at SCORE_EPS (most of its
# features take a few values), so a run there would measure nothing.
APPLICABLE: dict[str, tuple[str, ...]] = {
    EQUATION: LINEAR_MODELS,
    RANDOM: MODELS,
    KNOCKOFF: IMAGE_MODELS,
    ACTIVE: MODELS,
    PAPERNOT: IMAGE_MODELS,
    HOPSKIPJUMP: MODELS,
    BOUNDARY: MODELS,
    ONEPIXEL: IMAGE_MODELS,
    SQUARE: (DIGITS, DIGITS_LR, BREAST_CANCER),
    NES: (DIGITS, DIGITS_LR, BREAST_CANCER),
}
# The default run: every attack once, on the model it was designed against,
# plus the cheap extraction attacks on the tabular models; all of it fits the
# 10-minute bound on 2 cores.
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (
    (EQUATION, DIGITS_LR),
    (EQUATION, BREAST_CANCER),
    (EQUATION, PHISHING),
    (RANDOM, DIGITS),
    (RANDOM, BREAST_CANCER),
    (RANDOM, PHISHING),
    (KNOCKOFF, DIGITS),
    (ACTIVE, DIGITS),
    (ACTIVE, BREAST_CANCER),
    (ACTIVE, PHISHING),
    (PAPERNOT, DIGITS),
    (HOPSKIPJUMP, DIGITS),
    (HOPSKIPJUMP, BREAST_CANCER),
    (BOUNDARY, DIGITS),
    (ONEPIXEL, DIGITS),
    (SQUARE, DIGITS),
    (SQUARE, BREAST_CANCER),
    (NES, DIGITS),
    (NES, BREAST_CANCER),
)


def select_pairs(
    models: tuple[str, ...] | None, attacks: tuple[str, ...] | None
) -> list[tuple[str, str]]:
    """(attack, model) pairs to run: the default pairs when no model is named,
    else every applicable pair of the named models; filtered by ``attacks``.

    Raises
    ------
    ValueError
        An unknown model or attack name.
    """
    unknown = sorted(set(models or ()) - set(MODELS)) + sorted(
        set(attacks or ()) - set(ATTACKS)
    )
    if unknown:
        raise ValueError(f"unknown model or attack: {', '.join(unknown)}")
    wanted = set(attacks or ATTACKS)
    if models is None:
        return [(a, m) for a, m in DEFAULT_PAIRS if a in wanted]
    return [
        (a, m) for a in ATTACKS for m in APPLICABLE[a] if m in models and a in wanted
    ]


@dataclass(frozen=True)
class Budgets:
    """Query budget per attack (rows), the same with and without the gateway.

    Equation solving always asks exactly d + 1 queries; active learning also
    stops when its pool is used up.
    """

    extraction: int = 600
    tabular_extraction: int = 300
    probing: int = 500
    probing_targets: int = 3

    @classmethod
    def flat(cls, queries: int) -> Budgets:
        """The same budget for every attack (equation solving keeps d + 1)."""
        if queries < 1:
            raise ValueError("a budget must be at least 1 query")
        return cls(extraction=queries, tabular_extraction=queries, probing=queries)

    def scaled(self, factor: float) -> Budgets:
        return Budgets(
            extraction=max(50, int(self.extraction * factor)),
            tabular_extraction=max(40, int(self.tabular_extraction * factor)),
            probing=max(60, int(self.probing * factor)),
            probing_targets=self.probing_targets,
        )


@dataclass
class ModelTask:
    """One served model and the data the evaluation uses with it."""

    name: str
    model: ServedModel
    input_name: str
    clip: tuple[float, float]
    n_classes: int
    pool: Array
    eval_x: Array
    eval_labels: Array
    replay: Array
    targets: Array = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def n_features(self) -> int:
        return int(self.eval_x.shape[1])

    @property
    def surrogate(self) -> str:
        return "logreg" if self.name in LINEAR_MODELS else "mlp"

    @property
    def is_tabular(self) -> bool:
        return self.name not in IMAGE_MODELS


def build_task(name: str, model: ServedModel, seed: int, n_targets: int) -> ModelTask:
    """Split ``name``'s held-out half in two: the attacker's public pool
    (first half, shuffled with ``seed``) and the evaluation set; probing targets
    are evaluation inputs the model classifies correctly."""
    split = SPLITS[name]()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(split.x_test))
    half = len(order) // 2
    pool_idx, eval_idx = order[:half], order[half:]
    labels = model.predict_proba(split.x_test).argmax(axis=1)
    spec = model.signature.inputs[0]
    low = 0.0 if spec.min is None else spec.min
    high = float(np.max(split.x_test)) if spec.max is None else spec.max
    eval_x, eval_labels = split.x_test[eval_idx], labels[eval_idx]
    correct = np.flatnonzero(eval_labels == split.y_test[eval_idx])
    targets = rng.choice(correct, size=min(n_targets, len(correct)), replace=False)
    return ModelTask(
        name=name,
        model=model,
        input_name=spec.name,
        clip=(float(low), float(high)),
        n_classes=len(model.signature.classes),
        pool=split.x_test[pool_idx],
        eval_x=eval_x,
        eval_labels=eval_labels,
        replay=split.x_test,
        targets=np.asarray(targets, dtype=np.int64),
    )


def budget_of(attack: str, task: ModelTask, budgets: Budgets) -> int:
    """The query budget ``attack`` gets on ``task``."""
    if attack == EQUATION:
        return task.n_features + 1
    if attack in PROBING_ATTACKS:
        return budgets.probing
    if task.is_tabular:
        return budgets.tabular_extraction
    return budgets.extraction


def _sampling_params(
    attack: str, task: ModelTask, budget: int, seed: int
) -> SamplingParams:
    rounds = 8 if not task.is_tabular else 6
    return SamplingParams(
        budget=budget,
        round_size=max(10, budget // rounds),
        initial=max(10, budget // (2 * rounds)),
        surrogate="logreg" if task.surrogate == "logreg" else "mlp",
        soft_labels=attack == KNOCKOFF,
        clip=task.clip,
        seed=seed,
    )


def _papernot_seeds(task: ModelTask, seed: int) -> list[int]:
    """Papernot et al.'s small public seed set: one pool row per class the
    model predicts, as indices into the pool."""
    rng = np.random.default_rng(seed)
    pool_labels = task.model.predict_proba(task.pool).argmax(axis=1)
    return [
        int(rng.choice(np.flatnonzero(pool_labels == c)))
        for c in np.unique(pool_labels)
    ]


def honest_opening(attack: str, task: ModelTask, budgets: Budgets, seed: int) -> int:
    """How many of ``attack``'s first queries are rows honest clients send too.

    The attacker's pool is half of the held-out data that the honest
    population replays. Active learning opens with a round of rows drawn from
    it at random, and Papernot et al.'s attack with one row per class. Until
    those are answered, nothing in the stream tells the attacker from an
    honest client, so no detector can stop it sooner without stopping honest
    clients at the same rate. The report uses this to show what the
    agreement bound asks of such an attack. 0 for attacks whose first query
    is unlike honest traffic.
    """
    budget = budget_of(attack, task, budgets)
    if attack == ACTIVE:
        return min(_sampling_params(attack, task, budget, seed).initial, budget)
    if attack == PAPERNOT:
        return min(len(_papernot_seeds(task, seed)), budget)
    return 0


def run_attack(
    attack: str, query: QueryFn, task: ModelTask, budgets: Budgets, seed: int
) -> dict[str, Any]:
    """Run ``attack`` on ``query`` and return its outcome as plain data.

    Extraction outcomes hold ``agreement`` (0..1, the surrogate's agreement
    with the real model on the evaluation set) and ``curve``; probing ones hold
    ``found`` and ``attempted`` (inputs with an adversarial example within the
    budget) and ``median_l2``. Both hold ``queries`` and ``stopped_by``.
    """
    budget = budget_of(attack, task, budgets)
    if attack == EQUATION:
        result, solved = run_equation_solving(
            query,
            task.pool[0],
            task.eval_x,
            task.eval_labels,
            EquationParams(clip=task.clip, seed=seed),
        )
        out = result.to_dict()
        truth = true_affine_parameters(
            task.model.estimator.decision_function, task.n_features
        )
        out["recovery_error"] = (
            None if solved is None else round(recovery_error(solved, truth), 6)
        )
        return out
    if attack in (RANDOM, KNOCKOFF, ACTIVE):
        params = _sampling_params(attack, task, budget, seed)
        pool: Array | None = task.pool
        if attack == KNOCKOFF:
            pool = natural_patches(4 * budget, np.random.default_rng(seed))
        strategy: Strategy = (
            "random"
            if attack == RANDOM
            else "knockoff"
            if attack == KNOCKOFF
            else "active"
        )
        return run_sampling_extraction(
            query, strategy, task.eval_x, task.eval_labels, params, pool=pool
        ).to_dict()
    if attack == PAPERNOT:
        return run_jacobian_extraction(
            query,
            task.pool[_papernot_seeds(task, seed)],
            task.eval_x,
            task.eval_labels,
            JacobianParams(
                budget=budget,
                substitute="logreg" if task.surrogate == "logreg" else "mlp",
                clip=task.clip,
                step=0.1 * task.clip[1],
                seed=seed,
            ),
        ).to_dict()
    n_targets = len(task.targets)
    if attack == HOPSKIPJUMP:
        hsj = HopSkipJumpParams(
            budget=budget,
            n_targets=n_targets,
            clip=task.clip,
            n_classes=task.n_classes,
            seed=seed,
        )
        probe = run_hopskipjump(query, task.eval_x, task.targets, task.eval_labels, hsj)
    elif attack == BOUNDARY:
        boundary = BoundaryParams(
            budget=budget,
            n_targets=n_targets,
            clip=task.clip,
            n_classes=task.n_classes,
            seed=seed,
        )
        probe = run_boundary(
            query, task.eval_x, task.targets, task.eval_labels, boundary
        )
    elif attack == ONEPIXEL:
        onepixel = OnePixelParams(
            budget=budget, n_targets=n_targets, clip=task.clip, seed=seed
        )
        probe = run_one_pixel(
            query, task.eval_x, task.targets, task.eval_labels, onepixel
        )
    elif attack == SQUARE:
        square = SquareParams(
            budget=budget,
            n_targets=n_targets,
            eps=SCORE_EPS,
            per_feature=task.is_tabular,
            clip=task.clip,
            n_classes=task.n_classes,
            seed=seed,
        )
        probe = run_square(query, task.eval_x, task.targets, task.eval_labels, square)
    elif attack == NES:
        nes = NesParams(
            budget=budget,
            n_targets=n_targets,
            eps=SCORE_EPS,
            # Four sign steps reach the edge of the ball (Ilyas et al. take
            # a fifth of eps on ImageNet).
            step=SCORE_EPS / 4,
            per_feature=task.is_tabular,
            clip=task.clip,
            n_classes=task.n_classes,
            seed=seed,
        )
        probe = run_nes(query, task.eval_x, task.targets, task.eval_labels, nes)
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return probe.to_dict()
