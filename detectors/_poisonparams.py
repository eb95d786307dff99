"""Parameters of the poisoning guard (:mod:`detectors.poisoning`): each
one's bounds and where its default comes from.

Imports pydantic only; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PoisoningParams(BaseModel):
    """Parameters of :class:`~detectors.poisoning.PoisoningGuard`; frozen,
    unknown keys refused."""

    # NaN and infinity are refused as not finite before any bound is
    # checked, so every parameter gives the same message for them.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    confidence: float = Field(0.9, ge=0.5, lt=1.0)
    """Probability the model must give another class than the label for the
    record to be a confident disagreement."""

    false_rejection_rate: float = Field(0.01, gt=0.0, le=0.2)
    """Share of clean records the record-level checks may reject; half of it
    goes to ``rarity``, and the other half to ``spectral`` or, with
    ``distance_check``, a quarter each to ``spectral`` and ``distance``, when
    they are calibrated."""

    distance_check: bool = True
    """Judge each record against its label's clean calibration rows alone
    (the ``distance`` check), which no submitter's records can move. Off,
    the guard is the one before session 13 (``spectral`` keeps half of
    ``false_rejection_rate``): for tests of the spectral windows themselves,
    whose trigger clusters the check would refuse from their first record."""

    # Source of the default: 1e-4 per record is a few chance rejections in
    # 10,000 clean records even if every test were independent; measured
    # none on the zoo's clean streams (docs/feedback-guard.md).
    significance: float = Field(1e-4, gt=0.0, le=0.1)
    """Binomial tail at or below which a submitter's disagreement count (or
    pair count) is judged not honest."""

    window: int = Field(200, ge=10, le=2000)
    """Recent records per submitter over which disagreements are counted."""

    pair_min: int = Field(3, ge=2, le=1000)
    """Fewest confident disagreements on one pair before the pair test runs."""

    rate_prior: float = Field(0.005, gt=0.0, lt=0.5)
    """Floor of the clean disagreement rate (a small calibration set can
    measure 0); a pair's floor is this divided by the number of pairs."""

    rate_cap: float = Field(0.2, gt=0.0, lt=1.0)
    """Ceiling of the clean disagreement rate: above it the model is too
    often confidently wrong for the flip tests to mean anything."""

    rare_share: float = Field(0.005, gt=0.0, lt=0.5)
    """A feature value is rare when at most this share of the reference
    sample lies at or beyond it (on its side of the distribution)."""

    spectral_window: int = Field(256, ge=16, le=4096)
    """Accepted records kept per class for the spectral test."""

    spectral_min_records: int = Field(32, ge=8, le=4096)
    """Records a class window needs before the spectral test runs."""

    max_submitters: int = Field(10_000, ge=1, le=1_000_000)
    """Submitters whose state is held; the least recently seen is dropped
    (and can be reloaded from its serialised state) beyond it."""
