"""The ``margin`` detector's tests over young keys: openings and rank sums,
alone and pooled over a key's cohort.

A key's opening (the Mann-Kendall trend of its first answers) and its
decaying rank sums are read here per row of a batch; a young key that
leans the attacker's way on its own pools them with the keys that started
in the same moment at the same pace (:func:`cohort_sums`, through
:func:`detectors._startorder.pool`). The statistics themselves are kept
up to date by the detector (:mod:`detectors.margin`, whose docstring says
what these tests catch and miss) from :mod:`detectors._marginstats`.

Imports numpy, :mod:`detectors._cohort`, :mod:`detectors._marginparams`,
:mod:`detectors._startorder` and :mod:`detectors._state` only; nothing
from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._cohort import float_pool
from detectors._marginparams import MarginParams
from detectors._startorder import StartOrder, pool
from detectors._state import SlotArena


@dataclass
class RankEvidence:
    """The rank test's per-row results (see :func:`rank_evidence`)."""

    mean: npt.NDArray[np.float64]
    z: npt.NDArray[np.float64]
    ready: npt.NDArray[np.bool_]
    pooled_mean: npt.NDArray[np.float64]
    pooled_z: npt.NDArray[np.float64]
    keys: npt.NDArray[np.int64]


def rank_evidence(
    arrays: Mapping[str, npt.NDArray[Any]],
    slots: npt.NDArray[np.int64],
    p: MarginParams,
    ranks: tuple[npt.NDArray[np.float64], float] | None,
    base_live: int,
    order: tuple[StartOrder, SlotArena] | None = None,
) -> RankEvidence:
    """Per row: the client's decaying mean rank and its z (positive when
    the answers are less confident than honest ones), whether that counts
    (live baseline ready, ``rank_min_answers`` effective answers), and the
    same pooled over the key's cohort (see :func:`cohort_sums`) for a
    young key whose own z reaches ``rank_member_z``.

    ``ranks`` is the rank table of the live honest answers and its
    variance (``MarginDetector._rank_baseline``, None while there is
    none), ``base_live`` how many live honest answers it was made from,
    ``order`` the detector's keys kept in order of first time (see
    :func:`cohort_sums`).
    """
    n = len(slots)
    out = RankEvidence(
        mean=np.full(n, 0.5),
        z=np.zeros(n),
        ready=np.zeros(n, dtype=bool),
        pooled_mean=np.full(n, 0.5),
        pooled_z=np.zeros(n),
        keys=np.ones(n, dtype=np.int64),
    )
    if ranks is None or ranks[1] <= 0.0:
        # No live baseline yet, or every honest answer had one margin.
        return out
    var = ranks[1]
    w = arrays["rank_w"][slots]
    w2 = arrays["rank_w2"][slots]
    wu = arrays["rank_wu"][slots]
    some = w2 > 0
    effective = np.divide(w * w, w2, out=np.zeros(n), where=some)
    out.ready = effective >= p.rank_min_answers
    np.divide(wu, w, out=out.mean, where=some)
    own_z = rank_z(out.mean, effective, var, base_live)
    out.z = np.where(out.ready, own_z, 0.0)
    if p.cohort_window_s <= 0:
        return out
    # Keys of a distributed learner stay young and each has too few
    # answers to be judged alone; only those already leaning its way
    # look for a cohort, once per key.
    answers = arrays["n_answers"][slots]
    ask = some & (answers <= p.window) & (own_z >= p.rank_member_z)
    asking = np.unique(slots[ask])
    found = cohort_sums(
        arrays, asking, "rank_w2", ("rank_w", "rank_w2", "rank_wu"), p, order
    )
    count, total_w, total_w2, total_wu = found
    pooled_n = np.divide(
        total_w * total_w, total_w2, out=np.zeros(len(asking)), where=count > 0
    )
    counted = (count >= p.cohort_min_keys) & (pooled_n >= p.rank_min_answers)
    if not counted.any():
        return out
    asking, count = asking[counted], count[counted]
    mean = total_wu[counted] / total_w[counted]
    pooled_z = rank_z(mean, pooled_n[counted], var, base_live)
    # Each row of a counted key, and which of them it is (asking is sorted).
    at = np.minimum(np.searchsorted(asking, slots), len(asking) - 1)
    rows = asking[at] == slots
    at = at[rows]
    out.pooled_mean[rows] = mean[at]
    out.pooled_z[rows] = pooled_z[at]
    out.keys[rows] = count[at].astype(np.int64)
    return out


def rank_z(
    mean: npt.NDArray[np.float64],
    effective: npt.NDArray[np.float64],
    var: float,
    base_live: int,
) -> npt.NDArray[np.float64]:
    """z of mean ranks over ``effective`` answers against the honest 0.5.

    The weighted mean of independent ranks has variance var * sum w^2 /
    (sum w)^2, i.e. var over the effective count; the baseline is a
    sample too, whose own spread adds var over its size (as in the
    two-sample rank-sum test), which matters while it is young.
    """
    spread = var * (1.0 / np.maximum(effective, 1.0) + 1.0 / base_live)
    z: npt.NDArray[np.float64] = (0.5 - mean) / np.sqrt(spread)
    return z


def cohort_sums(
    arrays: Mapping[str, npt.NDArray[Any]],
    asking: npt.NDArray[np.int64],
    counted: str,
    names: tuple[str, ...],
    p: MarginParams,
    order: tuple[StartOrder, SlotArena] | None = None,
) -> npt.NDArray[np.float64]:
    """Per asking key (unique, sorted): its cohort's size, then the sum of
    each state field of ``names`` over it, one row each. The cohort is
    every key whose state field ``counted`` is above 0 and whose first
    scored query came within ``cohort_window_s`` of the asking key's own
    and whose answer count is within ``cohort_pace_share`` of its own (at
    least 2 either way), itself included. Time and pace only, never what
    the answers were, so an honest cohort's pooled statistic is as honest
    as one key's.

    An attacker makes every key of every batch look: each look is a few
    binary searches over the keys that started near the asking ones, where
    a scan of every key per asking key took 373 ms for a 256-row batch
    over 50,000 such keys. With ``order`` (the detector's
    :class:`detectors._startorder.StartOrder` and its arena) those keys are
    found in the order kept across batches; without it they are found by
    a scan and sorted per batch (:func:`detectors._cohort.float_pool`, the
    reference, the same result bit for bit).
    """
    first = arrays["first_s"]
    if order is not None:
        return pool(
            order[0],
            order[1],
            asking,
            arrays["n_answers"],
            first,
            [arrays[name] for name in names],
            arrays[counted],
            p.cohort_pace_share,
            p.cohort_window_s,
        )
    return float_pool(
        asking,
        arrays["n_answers"],
        first,
        [arrays[name] for name in names],
        (arrays[counted] > 0) & (first > 0),
        p.cohort_pace_share,
        p.cohort_window_s,
    )


def opening_evidence(
    arrays: Mapping[str, npt.NDArray[Any]],
    slots: npt.NDArray[np.int64],
    p: MarginParams,
    order: tuple[StartOrder, SlotArena] | None = None,
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
]:
    """Per row: the key's own opening z, its own z over its first
    ``cohort_answers`` (``window`` by default), its cohort's pooled z
    over theirs (0 when the key is not a contributing member of a large
    enough cohort) and the cohort's size.

    Both count once the key has had ``opening_min`` answers and while it
    has had at most ``window``: young keys, which is what a distributed
    attacker's keys stay. The cohort is every key of this detector whose
    first query came within ``cohort_window_s`` of this key's, itself
    included, each contributing the S and variance of its first
    ``cohort_answers`` answers (Stouffer's pooling of independent rank
    statistics).
    """
    n = len(slots)
    own = np.zeros(n)
    young_z = np.zeros(n)
    pooled = np.zeros(n)
    size = np.ones(n, dtype=np.int64)
    answers = arrays["n_answers"][slots]
    young = (answers >= p.opening_min) & (answers <= p.window)
    var = arrays["open_v"][slots]
    opened = young & (var > 0)
    own[opened] = arrays["open_s"][slots[opened]] / np.sqrt(var[opened])
    var = arrays["young_v"][slots]
    young &= var > 0
    if not young.any():
        return own, young_z, pooled, size
    young_z[young] = arrays["young_s"][slots[young]] / np.sqrt(var[young])
    if p.cohort_window_s <= 0:
        return own, young_z, pooled, size
    # Only keys that could be flagged through a cohort look for one, once
    # per key and batch.
    asking = np.unique(slots[young & (young_z >= p.member_z)])
    count, total_s, total_v = cohort_sums(
        arrays, asking, "young_v", ("young_s", "young_v"), p, order
    )
    counted = count >= p.cohort_min_keys
    if not counted.any():
        return own, young_z, pooled, size
    asking = asking[counted]
    z = total_s[counted] / np.sqrt(total_v[counted])
    at = np.minimum(np.searchsorted(asking, slots), len(asking) - 1)
    rows = asking[at] == slots
    at = at[rows]
    pooled[rows] = z[at]
    size[rows] = count[counted][at].astype(np.int64)
    return own, young_z, pooled, size
