"""Parameters of the ``margin`` detector (:mod:`detectors.margin`).

Each parameter's bounds, where its default comes from, and the checks
between them (a stretch must fit the ring that holds it). Which
parameters change live is the detector's ``_mutable_params``.

Imports pydantic and :mod:`detectors.base` only; nothing from Kafka,
Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from detectors.base import DetectorParams

RANK_HORIZON_MAX = 100_000
"""Largest ``rank_horizon``; it bounds a stored client's weight sums."""


class MarginParams(DetectorParams):
    """Parameters of :class:`~detectors.margin.MarginDetector` ("the class"
    below)."""

    window: int = Field(64, ge=8, le=4096)
    """Recent answers per client over which the uncertain share is taken."""

    margin_at: float = Field(0.2, gt=0.0, le=1.0)
    """An answer whose top-1 minus top-2 probability is below this is
    uncertain."""

    entropy_at: float = Field(0.9, gt=0.0, le=1.0)
    """An answer whose entropy over ``log(k)`` is above this is uncertain."""

    baseline_size: int = Field(4096, ge=64, le=1_000_000)
    """Honest answers kept as the baseline (the newest replace the oldest)."""

    threshold: float = Field(0.3, gt=0.0, le=1.0)
    """Excess uncertain share (see the class) at which a client is flagged."""

    min_answers: int = Field(32, ge=1, le=100_000)
    """Answers a client must have had before the share and the window trend
    can flag it. Over 20 answers one honest run of near-identical inputs
    near the boundary (3 to 8 copies) moves the share by up to 0.4, as much
    as the threshold allows on a model whose honest share is 14% (phishing):
    it blocked an honest client in an evaluation run (seed 1); over 32 it
    moves it by 0.25."""

    trend_weight: float = Field(0.55, ge=0.0, le=1.0)
    """Factor putting the confidence trend (Kendall's tau, see the class) on
    the share score's scale: the trend flags at tau >= threshold /
    trend_weight (0.545 with the defaults); 0 turns the trend off."""

    trend_min_answers: int = Field(48, ge=8, le=4096)
    """Answers in the window before the trend counts: tau over fewer pairs
    is too noisy for an honest client's random order (its spread under random
    order is about 0.1 at 48 answers, 0.086 at 64)."""

    opening_answers: int = Field(32, ge=8, le=4096)
    """A key's first answers over which its opening trend is tested once
    (see the class); must fit in ``window``."""

    opening_min: int = Field(10, ge=3, le=4096)
    """Answers of the opening before its trend counts."""

    opening_z: float = Field(4.5, gt=0.0)
    """Mann-Kendall z of a key's own opening at which it is flagged alone."""

    cohort_window_s: float = Field(0.25, ge=0.0, le=3600.0)
    """Keys whose first query came within this many seconds of each other
    form a cohort whose openings are pooled (see the class); 0 turns pooling
    off. The assumption it encodes: keys one attacker drives start together,
    honest keys start independently of each other."""

    cohort_pace_share: float = Field(0.2, ge=0.0, le=10.0)
    """Cohort members must also have had as many answers as the key, within
    this share of its count (at least 2 either way): keys one attacker spreads
    its stream over keep the same pace, honest keys that merely started in the
    same moment do not."""

    cohort_min_keys: int = Field(3, ge=2, le=10_000)
    """Keys (this one included) a cohort needs before its pooled z counts."""

    cohort_z: float = Field(6.0, gt=0.0)
    """Pooled (Stouffer) z of a cohort's trends at which its members that
    contribute (``member_z``) are flagged."""

    member_z: float = Field(3.0, ge=0.0)
    """A key's own trend z (over its first ``cohort_answers``) needed to be
    flagged through its cohort: an honest key that happened to start with an
    attacker's keys must still show the climb itself."""

    cohort_answers: int | None = Field(None, ge=8, le=4096)
    """A key's first answers whose confidence trend (Mann-Kendall S and
    variance) it pools with its cohort's; must fit in ``window``; None:
    ``window``, the key's whole young life. Longer than ``opening_answers``
    because a pool-based learner that works through its whole pool climbs
    late: the evaluation's learner on ``digits`` over 10 keys sends each key
    about 45 rows, no more confident at their 32nd than at their first,
    then climbing (see the class)."""

    @property
    def young_answers(self) -> int:
        """``cohort_answers``, or ``window`` when that is None."""
        return self.window if self.cohort_answers is None else self.cohort_answers

    rank_test: bool = True
    """Run the rank test (see the class): the client's answers' margins,
    ranked among honest answers' margins, against the middle rank."""

    rank_horizon: int = Field(192, ge=16, le=RANK_HORIZON_MAX)
    """Answers over which a client's mean rank is taken: each answer's
    weight decays by ``1 - 1 / rank_horizon`` per later answer."""

    rank_z: float = Field(5.0, gt=0.0)
    """z of a client's mean rank at which it is flagged."""

    rank_min_answers: int = Field(48, ge=8, le=100_000)
    """Effective answers (``(sum w)^2 / sum w^2``) before the rank test
    counts."""

    rank_repeat_eps: float = Field(0.02, ge=0.0, le=1.0)
    """A row within this per-feature RMS distance (inputs scaled to [0, 1])
    of the client's previous row is a re-send and is not ranked again; 0
    ranks every row."""

    rank_member_z: float = Field(3.0, ge=0.0)
    """A young key's own rank z needed to pool its ranks with its cohort's
    (see the class) and be flagged through it. 3, as ``member_z``: at 2, a
    sybil attacker's keys started in the same quarter second as honest ones
    at their pace, with doubtful answers, had 11 of 200 honest keys flagged
    (their own first few answers reach z 2 often enough); at 3 none, while
    a learner's ten keys were still flagged, 98 of 100, at their 13th answer
    at the median instead of their 9th
    (``tests/detectors/test_margin_cohort_framing.py``)."""

    rank_min_baseline: int = Field(512, ge=64, le=1_000_000)
    """Honest answers from live traffic the baseline must hold before the
    rank test runs. Answers to the reference (training) data are more
    confident than answers to new data, so ranks against them would make
    every honest client look doubtful: the digits MLP's honest clients reach
    z 8.8 against its training data, 5.6 against each other."""

    @model_validator(mode="after")
    def _trend_fits_window(self) -> Self:
        if self.trend_min_answers > self.window:
            raise ValueError(
                f"trend_min_answers ({self.trend_min_answers}) exceeds window "
                f"({self.window}), so the trend would never count"
            )
        if self.opening_answers > self.window:
            raise ValueError(
                f"opening_answers ({self.opening_answers}) exceeds window "
                f"({self.window}): the ring must hold the whole opening"
            )
        if self.rank_min_baseline > self.baseline_size:
            raise ValueError(
                f"rank_min_baseline ({self.rank_min_baseline}) exceeds "
                f"baseline_size ({self.baseline_size}), so the rank test "
                f"would never run"
            )
        if self.cohort_answers is not None and self.cohort_answers > self.window:
            raise ValueError(
                f"cohort_answers ({self.cohort_answers}) exceeds window "
                f"({self.window}): the ring must hold the whole stretch"
            )
        if self.opening_min > self.opening_answers:
            raise ValueError(
                f"opening_min ({self.opening_min}) exceeds opening_answers "
                f"({self.opening_answers}), so the opening would never count"
            )
        return self
