"""The poisoning guard's calibration (:mod:`detectors.poisoning`): the
clean disagreement rates, the split-conformal thresholds of the record
checks, and the dragged-window check's bound and fallback threshold, all
from clean labelled records.

Imports numpy, :mod:`detectors._poisonparams` and
:mod:`detectors._poisonspectral` only; nothing from Kafka, Redis, FastAPI
or ``gateway``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from detectors._poisonparams import PoisoningParams
from detectors._poisonspectral import (
    _Rarity,
    _spectral_scale,
    _top_directions,
    spectral_scores,
    top_direction,
)

FloatArray = npt.NDArray[np.float64]
_Spread = TypeVar("_Spread", float, FloatArray)

# The drift check's calibration (_anchored_calibration): random halvings of
# each class's clean rows, from a fixed seed so that every guard of a
# deployment computes the same bound; a class needs this many clean rows
# (a few per half) to take part.
_DRIFT_SPLITS = 100
_DRIFT_SEED = 0
_DRIFT_MIN_ROWS = 8
# The clean spread along a direction that a record is judged by, once its
# window is judged dragged, is floored by this share of the clean rows' mean
# spread per feature. A class has fewer clean rows (about 45 for digits) than
# features (64), so some directions have almost no clean spread however much
# honest records vary along them: a framer that spreads its accepted rows
# along such a direction (alternating sides, so nothing moves the centre)
# set off the check and had 15% to 45% of the class's honest records refused
# (session 12 attack pass); with the floor at 8 times the mean, 0% to 2.6%
# (1.5% without a framer), at 4 times 2% to 6%. A trigger patch stands far
# out even against the floor (its pixels are ones the class never sets):
# the 128- and 256-step drags are caught as without it (docs/feedback-guard.md).
FLOOR_SHRINK = 8.0


def floored_spread(along: _Spread, per_feature: _Spread) -> _Spread:
    """The clean rows' spread along a direction (their mean squared
    projection from their centre) floored by :data:`FLOOR_SHRINK` times their
    mean spread per feature (mean squared deviation over rows and features):
    what a record's or a window's squared projection is divided by when
    judged against the clean rows (the guard's drift check, and its
    calibration). Element-wise on arrays of subsets."""
    return along + FLOOR_SHRINK * per_feature


# Subsets whose (d, d) matrices are iterated at once: 64 of 64 features is
# 2 MB.
_BATCH = 64


@dataclass(frozen=True)
class Calibration:
    """What clean feedback taught the guard.

    Attributes
    ----------
    disagree_rate
        Share of clean records that are confident disagreements (floored at
        ``rate_prior``, capped at ``rate_cap``).
    pair_rates
        (k, k) share of clean records per (label, model class) confident
        disagreement, floored at ``rate_prior / (k * (k - 1))``.
    rarity_threshold
        Rare features at which a record is rejected.
    spectral_threshold
        Spectral score (ratio to the window's mean) at which a record is
        rejected.
    clean_rejected
        Share of the clean records the record-level checks reject at these
        thresholds (in-sample, so optimistic for a small set).
    rows
        Clean records calibrated on.
    anchored_threshold
        Spectral score against the clean rows alone (squared projection from
        their centre over their mean) at which a record is rejected while its
        class window is dragged; ``inf`` when no class has rows enough.
    drift_threshold
        Ratio of a class window's mean squared projection (from the clean
        rows' centre, on the top direction of both) to the clean rows' own at
        which the window is judged dragged; ``inf`` when no class has rows
        enough.
    distance_threshold
        Distance score (a record's squared distance from its label's clean
        centre over the clean rows' floored spread along that record's own
        direction) at which a record is rejected; ``inf`` when the check is
        off or no class has rows enough.
    """

    disagree_rate: float
    pair_rates: FloatArray
    rarity_threshold: int
    spectral_threshold: float
    clean_rejected: float
    rows: int
    anchored_threshold: float = float("inf")
    drift_threshold: float = float("inf")
    distance_threshold: float = float("inf")


def calibrate(
    params: PoisoningParams,
    reference: FloatArray,
    x_clean: FloatArray,
    y_clean: npt.NDArray[np.int64],
    proba_clean: FloatArray,
) -> Calibration:
    """Thresholds and clean rates from clean labelled records (held-out data
    the model did not train on).

    ``rarity`` gets half of ``false_rejection_rate`` and ``spectral`` the
    other half, or a quarter with ``distance`` the last quarter
    (``distance_check``): each threshold lies just above the split-conformal
    order statistic of the clean scores (rank ceil((n + 1)(1 - share))), so
    a new record exchangeable with the clean ones is rejected with
    probability at most that share.
    With fewer than ``1 / share - 1`` clean rows (199 at the default) no
    order statistic gives the bound; the largest clean score is used, and
    the rate is then only estimated. The flip tests take the clean records'
    confident disagreement rates.

    Raises
    ------
    ValueError
        Shapes disagree, labels fall outside the classes, or fewer than 20
        clean rows are given.
    """
    x = np.asarray(x_clean, dtype=np.float64)
    y = np.asarray(y_clean, dtype=np.int64)
    proba = np.asarray(proba_clean, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if x.ndim != 2 or ref.ndim != 2 or x.shape[1] != ref.shape[1]:
        raise ValueError("clean rows and reference must be (n, d) with one d")
    if len(x) < 20 or len(y) != len(x) or len(proba) != len(x) or proba.ndim != 2:
        raise ValueError("need at least 20 clean rows, one label and proba each")
    k = proba.shape[1]
    if k < 2 or y.min() < 0 or y.max() >= k:
        raise ValueError("clean labels must be class indices of the probabilities")
    budget = params.false_rejection_rate / 2
    # The distance check takes half of the spectral check's budget, so that
    # the record-level checks together still reject at most
    # false_rejection_rate of clean records (a union bound).
    spectral_budget = budget / 2 if params.distance_check else budget

    # Step: confident disagreements of clean records, overall and per pair.
    predicted = proba.argmax(axis=1)
    confident = proba[np.arange(len(x)), predicted] >= params.confidence
    disagree = confident & (predicted != y)
    rate = min(max(float(disagree.mean()), params.rate_prior), params.rate_cap)
    pairs = np.zeros((k, k))
    np.add.at(pairs, (y[disagree], predicted[disagree]), 1.0)
    pair_floor = params.rate_prior / (k * (k - 1))
    pair_rates = np.maximum(pairs / len(x), pair_floor)

    # Step: rare-feature counts of clean records; the smallest count that
    # rejects at most the budget.
    rarity = _Rarity(ref)
    counts = np.array([len(rarity.rare_features(r, params.rare_share)) for r in x])
    # The split-conformal order statistic, not the in-sample quantile: with
    # n exchangeable clean counts, a new clean record exceeds the k-th
    # smallest, k = ceil((n + 1)(1 - budget)), with probability at most the
    # budget. The in-sample quantile promised the budget on the rows it was
    # fitted to and measured 0.67% out of sample for 0.5% on digits.
    order = _conformal_rank(len(counts), budget)
    ranked = np.sort(counts)
    threshold = int(ranked[min(order, len(ranked)) - 1]) + 1

    # Step: spectral scores of clean records within their class, each class
    # at most one window of records (as the guard will see it).
    low, span = _spectral_scale(ref)
    scaled = (x - low) / span
    clean_scores: list[FloatArray] = []
    for c in range(k):
        rows = scaled[y == c][-params.spectral_window :]
        if len(rows) >= params.spectral_min_records:
            clean_scores.append(spectral_scores(rows)[0])
    all_scores = np.concatenate(clean_scores) if clean_scores else np.zeros(1)
    # The same order statistic; when the budget asks for more rows than
    # there are (k > m), the largest clean score is the best bound there is.
    ranked_scores = np.sort(all_scores)
    order = _conformal_rank(len(ranked_scores), spectral_budget)
    spectral = float(ranked_scores[min(order, len(ranked_scores)) - 1]) * 1.0001

    # Step: the check on a dragged window (the guard's ``_drift``) and the
    # score it falls back on, from the clean rows of each class.
    by_class = [scaled[y == c] for c in range(k)]
    anchored, drift = _anchored_calibration(by_class, budget)
    distance = (
        _distance_threshold(by_class, budget / 2)
        if params.distance_check
        else float("inf")
    )

    rejected = (counts >= threshold).copy()
    return Calibration(
        disagree_rate=rate,
        pair_rates=pair_rates,
        rarity_threshold=threshold,
        spectral_threshold=max(spectral, 1.0),
        clean_rejected=float(rejected.mean()),
        rows=len(x),
        anchored_threshold=anchored,
        drift_threshold=drift,
        distance_threshold=distance,
    )


def _anchored_calibration(
    classes: list[FloatArray], budget: float
) -> tuple[float, float]:
    """The clean-rows-only score's threshold and the drift bound, from each
    class's scaled clean rows.

    Threshold: leave-one-out, each clean row is scored as a record is
    against a dragged window (squared projection from the other rows'
    centre, on their top direction, over their mean), and the split-conformal
    order statistic of these scores at ``budget`` is taken, as for the other
    checks. Drift bound: each class's rows are halved at random
    ``_DRIFT_SPLITS`` times; one half plays the clean rows and the other an
    honest window, and the largest ratio over every split is the bound.
    A half is the smallest window the check judges with so few rows, and
    the noisiest: a larger honest window spreads closer to the clean rows.
    """
    loo: list[FloatArray] = []
    ratios: list[FloatArray] = []
    rng = np.random.default_rng(_DRIFT_SEED)
    for rows in classes:
        n, d = rows.shape
        if n < _DRIFT_MIN_ROWS:
            continue
        mean = rows.mean(axis=0)
        whole = rows - mean
        scatter = whole.T @ whole
        # Every subset's direction is close to the whole class's: a warm
        # start saves most of each power iteration.
        start = top_direction(scatter)
        for chunk in np.array_split(np.arange(n), -(-n // _BATCH)):
            # Without row i, the scatter about the other rows' centre is a
            # rank-one downdate of the whole class's.
            c = whole[chunk]
            grams = scatter[None] - (n / (n - 1)) * c[:, :, None] * c[:, None, :]
            v = _top_directions(grams, start)
            floor = floored_spread(
                np.einsum("mi,mij,mj->m", v, grams, v) / (n - 1),
                np.einsum("mii->m", grams) / ((n - 1) * d),
            )
            record = (n / (n - 1) * np.einsum("mi,mi->m", c, v)) ** 2
            ok = floor > 0.0
            loo.append(record[ok] / floor[ok])
        halves = [rng.permutation(n) for _ in range(_DRIFT_SPLITS)]
        for start_at in range(0, _DRIFT_SPLITS, _BATCH):
            part = halves[start_at : start_at + _BATCH]
            clean_idx = np.array([h[: n // 2] for h in part])
            window_idx = np.array([h[n // 2 :] for h in part])
            centres = rows[clean_idx].mean(axis=1)
            # Every row about the clean half's centre: the whole scatter
            # plus the shift of the centre.
            shift = mean[None] - centres
            grams = scatter[None] + n * shift[:, :, None] * shift[:, None, :]
            v = _top_directions(grams, start)
            a = np.einsum("mkd,md->mk", rows[clean_idx] - centres[:, None], v)
            w = np.einsum("mkd,md->mk", rows[window_idx] - centres[:, None], v)
            clean = rows[clean_idx] - centres[:, None]
            floor = floored_spread((a**2).mean(axis=1), (clean**2).mean(axis=(1, 2)))
            ok = floor > 0.0
            ratios.append((w**2).mean(axis=1)[ok] / floor[ok])
    all_loo = np.concatenate(loo) if loo else np.zeros(0)
    all_ratios = np.concatenate(ratios) if ratios else np.zeros(0)
    if not len(all_loo) or not len(all_ratios):
        return float("inf"), float("inf")
    ranked = np.sort(all_loo)
    order = _conformal_rank(len(ranked), budget)
    anchored = float(ranked[min(order, len(ranked)) - 1]) * 1.0001
    return max(anchored, 1.0), max(float(all_ratios.max()) * 1.0001, 1.0)


def _distance_threshold(classes: list[FloatArray], budget: float) -> float:
    """The distance check's threshold: leave-one-out, each clean row is
    scored against the other rows of its class as a record is against its
    label's clean rows (:meth:`~detectors.poisoning.PoisoningGuard._distance`),
    and the split-conformal order statistic of these scores at ``budget``
    is taken. A class with fewer than ``_DRIFT_MIN_ROWS`` clean rows takes no
    part (the guard does not judge its records by distance); ``inf`` when
    none does."""
    scores: list[FloatArray] = []
    for rows in classes:
        n, d = rows.shape
        if n < _DRIFT_MIN_ROWS:
            continue
        mean = rows.mean(axis=0)
        whole = rows - mean
        scatter = whole.T @ whole
        for chunk in np.array_split(np.arange(n), -(-n // _BATCH)):
            # Without row i, the other rows' scatter about their centre is a
            # rank-one downdate of the whole class's, and row i lies
            # n / (n - 1) times further from that centre than from the mean.
            c = whole[chunk]
            grams = scatter[None] - (n / (n - 1)) * c[:, :, None] * c[:, None, :]
            offset = n / (n - 1) * c
            squared = np.einsum("mi,mi->m", offset, offset)
            along = np.einsum("mi,mij,mj->m", offset, grams, offset)
            # A row at the others' centre scores 0, as a record there does.
            at = squared > 0.0
            floor = floored_spread(
                np.divide(along, squared * (n - 1), out=np.zeros(len(c)), where=at),
                np.einsum("mii->m", grams) / ((n - 1) * d),
            )
            ok = floor > 0.0
            scores.append(squared[ok] / floor[ok])
    ranked = np.sort(np.concatenate(scores)) if scores else np.zeros(0)
    if not len(ranked):
        return float("inf")
    order = _conformal_rank(len(ranked), budget)
    return max(float(ranked[min(order, len(ranked)) - 1]) * 1.0001, 1.0)


def _conformal_rank(n: int, share: float) -> int:
    """1-based rank k of the order statistic that a new exchangeable value
    exceeds with probability at most ``share``: ceil((n + 1)(1 - share)),
    which may be n + 1 (no finite bound from n values)."""
    return int(np.ceil((n + 1) * (1.0 - share) - 1e-9))
