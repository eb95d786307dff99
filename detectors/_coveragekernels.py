"""The ``coverage`` detector's arithmetic: its partition, the honest
expectation of coverage, and the compiled loops over each client's windows.

The partition is a plain k-means (:func:`kmeans`, :func:`assign`); the
honest expectation and spread of distinct cells after ``n`` draws are exact
for i.i.d. draws (:func:`expected_coverage`, :func:`coverage_sd`). Each
client's windows are rings in its state; the compiled loops push each row's
cell (or region) and walk back over the window counting distinct values per
horizon (:func:`window_horizons`), row by row in arrival order, instead of
copying every row's window out (:func:`detectors._ring.push_ring`'s layout,
without the copies). The detector (:mod:`detectors.coverage`) says what the
score catches and when it is weak; the public functions are re-exported
there.

Imports numpy and :mod:`detectors._jit` (numba) only; nothing from Kafka,
Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._jit import jit

MIN_SD = 1.0
"""Floor of the honest standard deviation in a score's denominator, in cells:
once coverage saturates its spread tends to 0, and one extra cell must not
then count as many deviations."""

MAX_SCORE = 10.0
"""Honest standard deviations that map to a score of 1 (the cap): scores
stay in [0, 1] like every detector's, and 0.45 reads as 4.5 deviations."""


def kmeans(
    X: npt.NDArray[np.float64], k: int, iterations: int, seed: int
) -> npt.NDArray[np.float64]:
    """Centroids of a plain Lloyd k-means with k-means++ seeding."""
    rng = np.random.default_rng(seed)
    k = min(k, len(X))
    centres = np.empty((k, X.shape[1]))
    centres[0] = X[rng.integers(len(X))]
    nearest = ((X - centres[0]) ** 2).sum(axis=1)
    for i in range(1, k):
        total = nearest.sum()
        pick = (
            rng.integers(len(X))
            if total <= 0
            else rng.choice(len(X), p=nearest / total)
        )
        centres[i] = X[pick]
        nearest = np.minimum(nearest, ((X - centres[i]) ** 2).sum(axis=1))
    for _ in range(iterations):
        labels = assign(X, centres)
        for c in range(k):
            members = X[labels == c]
            if len(members):
                centres[c] = members.mean(axis=0)
    return centres


def assign(
    X: npt.NDArray[np.float64], centres: npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    """Index of each row's nearest centre (one matrix product)."""
    return nearest(np.ascontiguousarray(X @ centres.T), (centres**2).sum(axis=1))


@jit
def nearest(
    products: npt.NDArray[np.float64], centre_sq: npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    """Per row, the first ``j`` with the least ``centre_sq[j] - 2.0 *
    products[i, j]`` (the squared distance to centre ``j`` less the row's own
    squared norm, computed in that order)."""
    n, k = products.shape
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        best = centre_sq[0] - 2.0 * products[i, 0]
        for j in range(1, k):
            value = centre_sq[j] - 2.0 * products[i, j]
            if value < best:
                best = value
                out[i] = j
    return out


def expected_coverage(
    counts: npt.NDArray[np.float64], horizon: int
) -> npt.NDArray[np.float64]:
    """Expected distinct cells after ``n`` i.i.d. draws, for n = 0..horizon,
    with cell probabilities proportional to ``counts``."""
    p = counts[counts > 0] / counts.sum()
    n = np.arange(horizon + 1, dtype=np.float64)
    return np.asarray((1.0 - (1.0 - p[None, :]) ** n[:, None]).sum(axis=1))


def coverage_sd(
    counts: npt.NDArray[np.float64], horizon: int
) -> npt.NDArray[np.float64]:
    """Standard deviation of the distinct cells after ``n`` i.i.d. draws, for
    n = 0..horizon (exact, from the pairwise chance that two cells are both
    still empty: ``Var = sum_ij (1 - p_i - p_j)^n - (sum_i (1 - p_i)^n)^2``
    with the diagonal term ``(1 - p_i)^n``)."""
    p = counts[counts > 0] / counts.sum()
    both_empty = np.clip(1.0 - p[:, None] - p[None, :], 0.0, 1.0)
    np.fill_diagonal(both_empty, 1.0 - p)
    one_empty = 1.0 - p
    out = np.zeros(horizon + 1)
    pair_power = np.ones_like(both_empty)
    single_power = np.ones_like(one_empty)
    for n in range(1, horizon + 1):
        pair_power *= both_empty
        single_power *= one_empty
        out[n] = pair_power.sum() - single_power.sum() ** 2
    return np.sqrt(np.clip(out, 0.0, None))


def window_horizons(width: int) -> npt.NDArray[np.int64]:
    """The last 16, 32, 64, ... queries of a window of ``width``, and the
    whole window, ascending.

    Several horizons because coverage saturates: a sweep covers every cell
    in its first few dozen queries, and over a long window honest clients get
    there too; the short horizons see how fast it happened."""
    horizons = {min(h, width) for h in (16, 32, 64, 128, 256)} | {width}
    return np.array(sorted(horizons), dtype=np.int64)


@jit
def window_growth(
    ring: npt.NDArray[np.integer[Any]],
    pos: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    slot: int,
    expected: npt.NDArray[np.float64],
    spread: npt.NDArray[np.float64],
    horizons: npt.NDArray[np.int64],
    stamp: npt.NDArray[np.int64],
    mark: int,
) -> tuple[float, int]:
    """Largest excess coverage of one client's window over its horizons, and
    the distinct values of the whole window.

    Walks the ring ``ring[slot]`` (the layout of :func:`push_cell`) from the
    newest value (just before ``pos[slot]``) back over its ``length[slot]``
    filled cells, counting distinct values: a value ``v`` is new unless
    ``stamp[v] == mark`` (``mark`` must differ from every earlier call's on
    the same ``stamp``); a value outside ``stamp`` counts each time it occurs
    (only a corrupted state holds one, and the detector's ``_check_state``
    refuses those).
    At each horizon ``h``, with ``c`` the distinct values among the newest
    ``m = min(h, length[slot])``, the excess is
    ``clip((c - expected[m]) / max(spread[m], MIN_SD) / MAX_SCORE, 0, 1)``,
    the arithmetic of the score's definition in that order; the result is
    the largest, from 0.
    """
    n_keys = stamp.shape[0]
    cells = ring[slot]
    filled = length[slot]
    # Newest first. The index is unsigned (numba tests every signed index for
    # wrap-around) and wraps by a test, as a modulo per value cost more than
    # the rest of the loop.
    one = np.uint64(1)
    last = np.uint64(ring.shape[1] - 1)
    at = np.uint64(pos[slot])
    best = 0.0
    covered = 0
    k = 0
    for h in horizons:
        stop = min(h, filled)
        while k < stop:
            at = at - one if at > 0 else last
            value = np.int64(cells[at])
            if value < 0 or value >= n_keys:
                covered += 1
            elif stamp[value] != mark:
                stamp[value] = mark
                covered += 1
            k += 1
        z = (covered - expected[stop]) / max(spread[stop], MIN_SD)
        best = max(best, min(max(z / MAX_SCORE, 0.0), 1.0))
    return best, covered


@jit
def push_cell(
    ring: npt.NDArray[np.integer[Any]],
    pos: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    slot: int,
    value: int,
) -> None:
    """Append ``value`` to the ring ``ring[slot]``, in place: the layout of
    :func:`detectors._ring.push_ring`, one row at a time, so that no window
    is copied out."""
    width = ring.shape[1]
    ring[slot, pos[slot]] = value
    pos[slot] = pos[slot] + 1 if pos[slot] + 1 < width else 0
    length[slot] = min(length[slot] + 1, width)


@jit
def score_windows(
    slots: npt.NDArray[np.int64],
    cells: npt.NDArray[np.int64],
    ring: npt.NDArray[np.int16],
    pos: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    n_seen: npt.NDArray[np.int64],
    expected: npt.NDArray[np.float64],
    spread: npt.NDArray[np.float64],
    horizons: npt.NDArray[np.int64],
    n_keys: int,
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]:
    """Append each row's cell to its client's ring, in arrival order, and
    measure the window just after it.

    ``ring[slot]`` holds the client's last ``width`` cells, ``pos[slot]`` the
    next index to write and ``length[slot]`` how many are filled
    (:func:`push_cell`); ``n_seen`` counts the client's queries. All are
    updated in place.

    Returns
    -------
    tuple of arrays
        Per row: the growth score of its window (:func:`window_growth`),
        the distinct cells in it, its length and the client's queries so far.
    """
    n = slots.shape[0]
    growth = np.empty(n)
    covered = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    seen = np.empty(n, dtype=np.int64)
    stamp = np.zeros(n_keys, dtype=np.int64)
    for i in range(n):
        slot = slots[i]
        push_cell(ring, pos, length, slot, cells[i])
        n_seen[slot] += 1
        growth[i], covered[i] = window_growth(
            ring, pos, length, slot, expected, spread, horizons, stamp, i + 1
        )
        lengths[i] = length[slot]
        seen[i] = n_seen[slot]
    return growth, covered, lengths, seen


@jit
def observe_windows(
    slots: npt.NDArray[np.int64],
    keys: npt.NDArray[np.int64],
    ring: npt.NDArray[np.int32],
    pos: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    n_answers: npt.NDArray[np.int64],
    region_score: npt.NDArray[np.float64],
    expected: npt.NDArray[np.float64],
    spread: npt.NDArray[np.float64],
    horizons: npt.NDArray[np.int64],
    n_keys: int,
) -> None:
    """Append each answer's decision-region key to its client's ring, in
    arrival order, then set each client's ``region_score`` to the growth
    score of its window after its last answer (the state its next queries
    are judged by). Rings as in :func:`score_windows`; ``n_answers`` counts
    answers. With an empty ``expected`` (no output baseline yet) the rings
    and counts advance and no score is set.
    """
    n = slots.shape[0]
    for i in range(n):
        slot = slots[i]
        push_cell(ring, pos, length, slot, keys[i])
        n_answers[slot] += 1
    if expected.shape[0] == 0 or n == 0:
        return
    stamp = np.zeros(n_keys, dtype=np.int64)
    done = np.zeros(slots.max() + 1, dtype=np.bool_)
    for i in range(n):
        slot = slots[i]
        if not done[slot]:
            done[slot] = True
            region_score[slot] = window_growth(
                ring, pos, length, slot, expected, spread, horizons, stamp, i + 1
            )[0]


@jit
def teach_pairs(
    slots: npt.NDArray[np.int64],
    keys: npt.NDArray[np.int64],
    learn: npt.NDArray[np.bool_],
    n_answers: npt.NDArray[np.int64],
    per_client: int,
    table: npt.NDArray[np.int64],
    clients: npt.NDArray[np.uint64],
) -> int:
    """Count, in arrival order, each answer whose row may ``learn`` and
    whose client had fewer than ``per_client`` answers before it (its
    answers before the batch, ``n_answers``, plus its earlier rows in the
    batch): ``table[cell, class] += 1`` and bit ``slot % 64`` of
    ``clients[cell, class]`` set, with ``cell, class = divmod(key, 256)``;
    ``table`` must already be wide enough. Returns the answers counted."""
    n = slots.shape[0]
    if n == 0:
        return 0
    earlier = np.zeros(slots.max() + 1, dtype=np.int64)
    taught = 0
    one = np.uint64(1)
    for i in range(n):
        slot = slots[i]
        before = n_answers[slot] + earlier[slot]
        earlier[slot] += 1
        if learn[i] and before < per_client:
            cell = keys[i] // 256
            label = keys[i] % 256
            table[cell, label] += 1
            clients[cell, label] |= one << np.uint64(slot % 64)
            taught += 1
    return taught
