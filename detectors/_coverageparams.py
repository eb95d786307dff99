"""Parameters of the ``coverage`` detector (:mod:`detectors.coverage`).

Each parameter's bounds and where its default comes from. Which parameters
change live is the detector's ``_mutable_params``.

Imports pydantic, :mod:`detectors.base` and the live baselines' sample cap
(:mod:`detectors.baselines`) only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

from pydantic import Field

from detectors.base import DetectorParams
from detectors.baselines import MAX_SAMPLES


class CoverageParams(DetectorParams):
    """Parameters of :class:`~detectors.coverage.CoverageDetector`."""

    cells: int = Field(16, ge=4, le=255)
    """Cells of the input partition (k-means centroids on the reference)."""

    window: int = Field(64, ge=8, le=4096)
    """Recent queries (and answers) per client whose coverage is counted."""

    kmeans_iterations: int = Field(15, ge=1, le=200)
    """Lloyd iterations when fitting the partition."""

    threshold: float = Field(0.45, gt=0.0, le=1.0)
    """Score at which a client is flagged: 0.45 is 4.5 honest standard
    deviations above the expected coverage."""

    min_queries: int = Field(30, ge=1, le=100_000)
    """Queries (for the input part) or answers (for the decision part) a
    client must have had before that part can flag it."""

    live_min_answers: int = Field(512, ge=1, le=MAX_SAMPLES)
    """Answers to clients in good standing the live (cell, class) table must
    hold before the decision part's honest expectation comes from it rather
    than from the model's answers to the reference data."""

    live_min_clients: int = Field(3, ge=1, le=64)
    """Distinct clients (told apart by 64 bits of their slots) that must
    have taught a (cell, class) pair before it counts in the live
    expectation: a thief not yet flagged teaches pairs no honest client
    hits, which would raise the expectation and hide it."""

    live_answers_per_client: int = Field(64, ge=1, le=1_000_000)
    """Answers of each client that may teach the live table (its first):
    without a cap one unflagged thief sending hundreds of queries into
    cells honest clients seldom reach raised their share enough to hide
    itself (measured below); with it, ``live_min_answers`` also needs
    answers from several clients."""

    live_refresh_answers: int = Field(1024, ge=1, le=10_000_000)
    """Answers learnt between two recomputations of the decision part's
    expectation from the live table, or an eighth of the table if more
    (each costs :func:`~detectors.coverage.coverage_sd`'s O(pairs^2 *
    window): 8.5 ms for 160 pairs at the default window)."""
