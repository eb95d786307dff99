"""Adversarial probing with ART's decision-based black-box attacks.

HopSkipJump: Chen, Jordan and Wainwright, "HopSkipJumpAttack: A Query-Efficient
Decision-Based Attack", IEEE S&P 2020 (``art.attacks.evasion.HopSkipJump``).
Boundary: Brendel, Rauber and Bethge, "Decision-Based Adversarial Attacks:
Reliable Attacks Against Black-Box Machine Learning Models", ICLR 2018
(``art.attacks.evasion.BoundaryAttack``). Both as implemented by the
Adversarial Robustness Toolbox. The model is wrapped
in ART's ``BlackBoxClassifier`` whose predict function is a ``QueryFn``, so
every one of the attack's queries goes wherever the query function sends it.

The attack's own output is lost when the oracle stops it mid-way, so the best
adversarial example is tracked from the query stream instead: the closest (L2,
in input units) queried input the oracle labelled differently from the
original. That is exactly what the attacker has learnt at that moment.

Imports numpy and ART; the oracle is a ``QueryFn``. ART is synchronous, so run
this in a thread when the oracle needs the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluation.oracle import QueryFn, QueryStopped

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class HopSkipJumpParams:
    """Settings of one probing run (ART's names where they are ART's).

    The defaults (ART: max_iter 50, max_eval 10 000, init_eval 100) take tens
    of thousands of queries per input; these small ones finish a few inputs in
    about a thousand queries, which still walks the boundary the way the full
    attack does.
    """

    budget: int = 1200
    n_targets: int = 3
    max_iter: int = 8
    max_eval: int = 64
    init_eval: int = 8
    init_size: int = 50
    batch_size: int = 64
    clip: tuple[float, float] = (0.0, 16.0)
    n_classes: int = 10
    seed: int = 0


@dataclass
class TargetOutcome:
    """One attacked input: its label and the closest differently-labelled
    query found (``best_l2`` in input units; None if none was found)."""

    index: int
    label: int
    queries: int = 0
    best_l2: float | None = None
    best_label: int | None = None

    @property
    def found(self) -> bool:
        return self.best_l2 is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "queries": self.queries,
            "found": self.found,
            "best_l2": None if self.best_l2 is None else round(self.best_l2, 4),
            "best_label": self.best_label,
        }


@dataclass
class ProbingResult:
    """Outcome of a probing run over several inputs.

    ``stopped_by`` is the oracle's reason (refusal code or ``BUDGET``) or None
    if every input was attacked to the end of its iterations.
    """

    queries: int = 0
    targets: list[TargetOutcome] = field(default_factory=list)
    stopped_by: str | None = None
    seconds: float = 0.0

    @property
    def found(self) -> int:
        """Inputs for which an adversarial example was found."""
        return sum(t.found for t in self.targets)

    @property
    def median_l2(self) -> float | None:
        """Median distance of the examples found (lower = stronger attack)."""
        found = [t.best_l2 for t in self.targets if t.best_l2 is not None]
        return float(np.median(found)) if found else None

    def to_dict(self) -> dict[str, Any]:
        median = self.median_l2
        return {
            "queries": self.queries,
            "found": self.found,
            "attempted": len(self.targets),
            "median_l2": None if median is None else round(median, 4),
            "stopped_by": self.stopped_by,
            "seconds": round(self.seconds, 2),
            "targets": [t.to_dict() for t in self.targets],
        }


class Tracker:
    """Wraps the oracle: counts queries and keeps the closest input that the
    oracle labelled differently from the current target's label."""

    def __init__(self, query: QueryFn) -> None:
        self._query = query
        self.queries = 0
        self.outcome: TargetOutcome | None = None
        self.original: Array | None = None

    def __call__(self, rows: Array) -> Array:
        rows = np.asarray(rows, dtype=np.float32)
        try:
            proba = self._query(rows)
        except QueryStopped as stop:
            self._observe(rows[stop.answered], stop.probabilities[stop.answered])
            raise
        self._observe(rows, proba)
        return proba

    def _observe(self, rows: Array, proba: Array) -> None:
        self.queries += len(rows)
        outcome, original = self.outcome, self.original
        if outcome is None or original is None:
            return
        outcome.queries += len(rows)
        labels = proba.argmax(axis=1)
        other = labels != outcome.label
        if not other.any():
            return
        distances = np.linalg.norm(rows[other] - original, axis=1)
        best = int(distances.argmin())
        if outcome.best_l2 is None or distances[best] < outcome.best_l2:
            outcome.best_l2 = float(distances[best])
            outcome.best_label = int(labels[other][best])


@contextlib.contextmanager
def quiet_art_import() -> Iterator[None]:
    """Import ART inside this block. ART is imported only where an attack runs:
    it is slow to import and only these attacks need it. It warns at import
    that PyTorch is missing, which only matters for certification code these
    attacks do not use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PyTorch not found")
        yield


def _black_box(
    query: QueryFn, n_features: int, params: HopSkipJumpParams | BoundaryParams
) -> tuple[Tracker, Any]:
    """A ``Tracker`` around the oracle, and ART's ``BlackBoxClassifier`` whose
    every prediction goes through it."""
    with quiet_art_import():
        from art.estimators.classification import BlackBoxClassifier

    tracker = Tracker(query)
    classifier = BlackBoxClassifier(
        predict_fn=tracker,
        input_shape=(n_features,),
        nb_classes=params.n_classes,
        clip_values=params.clip,
    )
    return tracker, classifier


def _attack_each(
    attack: Any,
    tracker: Tracker,
    x: Array,
    indices: Array,
    labels: Array,
    started: float,
    *,
    log_each: bool = False,
) -> ProbingResult:
    """Run a seeded ART evasion ``attack`` on each target in turn until the
    oracle stops it; ``started`` is the run's ``time.monotonic()`` start (s)."""
    result = ProbingResult()
    for index in indices:
        outcome = TargetOutcome(index=int(index), label=int(labels[index]))
        result.targets.append(outcome)
        tracker.outcome = outcome
        tracker.original = x[index].astype(np.float32)
        try:
            attack.generate(x[index : index + 1].astype(np.float32))
        except QueryStopped as stop:
            result.stopped_by = stop.reason
            break
        if log_each:
            logger.info(
                "probing target done",
                extra={"index": int(index), "queries": outcome.queries},
            )
    result.queries = tracker.queries
    result.seconds = time.monotonic() - started
    return result


def run_hopskipjump(
    query: QueryFn, x: Array, indices: Array, labels: Array, params: HopSkipJumpParams
) -> ProbingResult:
    """Attack ``x[i]`` for each ``i`` in ``indices`` until the oracle stops.

    Parameters
    ----------
    query
        The oracle.
    x
        Pool of inputs (input units).
    indices
        Which inputs to attack, in order.
    labels
        The real model's label for every row of ``x``; an input counts as
        attacked successfully when a query near it gets another label.
    params
        Attack settings; the budget is enforced by the oracle.

    Returns
    -------
    ProbingResult
        Per-input outcomes and why the run ended.
    """
    with quiet_art_import():
        from art.attacks.evasion import HopSkipJump

    started = time.monotonic()
    tracker, classifier = _black_box(query, x.shape[1], params)
    attack = HopSkipJump(
        classifier=classifier,
        batch_size=params.batch_size,
        targeted=False,
        norm=2,
        max_iter=params.max_iter,
        max_eval=params.max_eval,
        init_eval=params.init_eval,
        init_size=params.init_size,
        verbose=False,
    )
    # HopSkipJump draws its noise from numpy's global generator; seeding it
    # makes the direct and the gateway runs ask comparable questions.
    np.random.seed(params.seed)
    return _attack_each(attack, tracker, x, indices, labels, started, log_each=True)


@dataclass(frozen=True)
class BoundaryParams:
    """Settings of one Boundary-attack run (ART's names where they are ART's).

    ART's defaults (max_iter 5000, num_trial 25, sample_size 20) spend far more
    than the budget on one input; these small ones still start from a
    misclassified point and walk along the boundary towards the original.
    """

    budget: int = 600
    n_targets: int = 3
    max_iter: int = 20
    num_trial: int = 5
    sample_size: int = 5
    init_size: int = 50
    delta: float = 0.01
    epsilon: float = 0.01
    batch_size: int = 64
    clip: tuple[float, float] = (0.0, 16.0)
    n_classes: int = 10
    seed: int = 0


def run_boundary(
    query: QueryFn, x: Array, indices: Array, labels: Array, params: BoundaryParams
) -> ProbingResult:
    """The Boundary attack on ``x[i]`` for each ``i`` in ``indices``; the same
    contract as ``run_hopskipjump``."""
    with quiet_art_import():
        from art.attacks.evasion import BoundaryAttack

    started = time.monotonic()
    tracker, classifier = _black_box(query, x.shape[1], params)
    attack = BoundaryAttack(
        estimator=classifier,
        batch_size=params.batch_size,
        targeted=False,
        delta=params.delta,
        epsilon=params.epsilon,
        max_iter=params.max_iter,
        num_trial=params.num_trial,
        sample_size=params.sample_size,
        init_size=params.init_size,
        verbose=False,
    )
    # The Boundary attack also draws from numpy's global generator.
    np.random.seed(params.seed)
    return _attack_each(attack, tracker, x, indices, labels, started)


def preload_art() -> None:
    """Import the ART modules the probing attacks use, in the calling thread.

    The attacks import ART lazily (it is slow to import and only probing
    needs it); two attacks starting at once in worker threads then import it
    concurrently, and CPython's per-module import locks can report a
    ``_DeadlockError`` for one of them (seen for HopSkipJump in every full
    evaluation run once the other attacks ended sooner). Importing once
    first makes the later imports plain lookups.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PyTorch not found")
        import art.attacks.evasion
        import art.estimators.classification  # noqa: F401
