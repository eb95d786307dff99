"""Compiled kernels of the ``traffic`` detector (:mod:`detectors.traffic`).

Two loops run over a batch in row order: :func:`push_and_measure` pushes
each row's arrival time into its client's ring, counts the cohort test's
gap pairs over the client's first rows and, for each row its client is
judged at, measures the window (gap count, span, burstiness, regularity,
outcome shares and the solo test's count, :func:`gap_stats`);
:func:`judge` then scores those measures against the honest baseline and
teaches it, in the same order, since each judgement may teach the
baseline the next is judged by. numpy's ``log10`` runs between the two
(:func:`log_rate`). :func:`window_features` and :func:`solo_counts` give
the same measures for given windows, for tests and tools.

The arithmetic reproduces, bit for bit, the numpy code these kernels
replaced (sums in numpy's pairwise order, :mod:`detectors._numpysum`), so
the pinned scores keep their meaning.

Imports numpy, :mod:`detectors._jit` (numba) and
:mod:`detectors._numpysum` only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detectors._jit import jit
from detectors._numpysum import pairwise_sum

TIME_RESOLUTION_S = 0.001
"""Arrival times are Kafka record times, whole milliseconds. Gap pairs are
compared only when both gaps are at least this over ``cohort_tolerance``
(10 ms at 10%): shorter gaps (rows of one burst) cannot be told within the
tolerance of each other at that resolution, and would all match."""

N_STATS = 7
"""Columns measured per judged row: gap count, span, burstiness,
regularity, error share, rejection share, and the solo test's count of
gaps within ``solo_tolerance`` of the median (:data:`SOLO_NEAR`)."""

SOLO_NEAR = 6
"""Column of the solo count in the measures (-1: median too short)."""


def log_rate(stats: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """log10 of arrivals per second from the gap count and span columns.

    numpy's ``log10``, not the compiled one: numpy picks a SIMD version by
    CPU, and the two may differ in the last bit.
    """
    return np.asarray(
        np.log10(np.maximum(stats[:, 0], 1) / np.maximum(stats[:, 1], 1e-3))
    )


@jit
def gap_stats(
    window: npt.NDArray[np.float64],
    tolerance: float,
    solo_tolerance: float,
    scratch: npt.NDArray[np.float64],
    out: npt.NDArray[np.float64],
) -> None:
    """Gap count, span, burstiness and regularity of one window of times
    (oldest first, NaN where unfilled) into ``out[:4]``, and the count of
    gaps within ``solo_tolerance`` of the median into ``out[SOLO_NEAR]``
    (-1 when the median is under ``TIME_RESOLUTION_S / solo_tolerance``:
    at millisecond times such a band holds one or two values, which
    would flag any burst).

    Gaps that are not positive (rows of one request) or touch an unfilled
    cell are left out. The arithmetic is numpy's over the row of ``W - 1``
    gaps with left-out gaps as 0 (sums pairwise at their positions, see
    :func:`~detectors._numpysum.pairwise_sum`): mean, then the root mean
    square deviation, their ratio, and the share of gaps within
    ``tolerance`` of the median (the mean of the two middle gaps when their
    count is even).
    """
    width = len(window) - 1
    gaps = scratch[0]
    ordered = scratch[1]
    count = 0
    for j in range(width):
        gap = window[j + 1] - window[j]
        if np.isfinite(gap) and gap > 0:
            gaps[j] = gap
            ordered[count] = gap
            count += 1
        else:
            gaps[j] = 0.0
    span = 0.0 + pairwise_sum(gaps, 0, width)
    filled = max(count, 1)
    mean = span / filled if count > 0 else 0.0
    for j in range(width):
        if gaps[j] != 0.0:
            deviation = gaps[j] - mean
            gaps[j] = deviation * deviation
    std = np.sqrt((0.0 + pairwise_sum(gaps, 0, width)) / filled)
    cv = std / mean if mean > 0 else 0.0
    if np.isnan(cv):
        cv = 0.0
    elif np.isinf(cv):
        cv = np.finfo(np.float64).max if cv > 0 else -np.finfo(np.float64).max
    regular = 0.0
    solo = 0.0
    if count > 0:
        valid = ordered[:count]
        valid.sort()
        median = (valid[(filled - 1) // 2] + valid[filled // 2]) / 2.0
        near = 0
        wide = 0
        for j in range(count):
            off = np.abs(valid[j] - median)
            if off <= tolerance * median:
                near += 1
            if off <= solo_tolerance * median:
                wide += 1
        regular = near / count
        solo = float(wide) if median * solo_tolerance >= TIME_RESOLUTION_S else -1.0
    out[SOLO_NEAR] = solo
    out[0] = count
    out[1] = span
    out[2] = cv
    out[3] = regular


@jit
def push_and_measure(
    slots: npt.NDArray[np.int64],
    arrival_s: npt.NDArray[np.float64],
    ring: npt.NDArray[np.float64],
    pos: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    n_seen: npt.NDArray[np.int64],
    errored: npt.NDArray[np.uint8],
    errored_len: npt.NDArray[np.int64],
    rejected: npt.NDArray[np.uint8],
    rejected_len: npt.NDArray[np.int64],
    stride: int,
    min_queries: int,
    tolerance: float,
    solo_tolerance: float,
    cohort_tolerance: float,
    first_s: npt.NDArray[np.float64],
    last_gap: npt.NDArray[np.float64],
    pairs: npt.NDArray[np.int64],
    matches: npt.NDArray[np.int64],
    min_gap: float,
    answered_s: npt.NDArray[np.float64],
    stall_s: float,
    judged: npt.NDArray[np.int64],
    stats: npt.NDArray[np.float64],
) -> int:
    """Push each row's arrival time into its client's ring, in row order;
    for each row that is judged (its client's request count a multiple of
    ``stride``, at least ``min_queries`` times in the window) put its index
    in ``judged`` and its window's measures in the row of ``stats`` (see
    :data:`N_STATS`). Returns the number of judged rows.

    The error and rejection shares are the set bits of the whole ring over
    its filled length, as of before the batch (outcomes arrive after it).

    Also, over each client's first ``width`` rows, the cohort test's counts:
    the time of its first row, its last positive gap, the successive pairs
    of positive gaps both at least ``min_gap``, and those whose two gaps are
    within ``cohort_tolerance`` of the larger.

    A gap the gateway caused is taken out before the row's time is pushed:
    when the client's last answer (``answered_s``, the worker's clock, as of
    before the batch) came more than ``stall_s`` after its previous request
    and this row arrived after that answer, the client was waiting for the
    gateway (a Redis or worker stall), not pausing. Its older times move
    forward by the wait, so the gap becomes the client's own (this row's
    time minus the answer's), and the stall neither reads as a burst nor
    lowers its rate. ``stall_s`` 0 turns this off.
    """
    width = ring.shape[1]
    window = np.empty(width)
    scratch = np.empty((2, width))
    m = 0
    for i in range(len(slots)):
        slot = slots[i]
        p = pos[slot] % width
        now = arrival_s[i]
        if n_seen[slot] == 0:
            first_s[slot] = now
        elif length[slot] > 0:
            previous = ring[slot, p - 1 if p > 0 else width - 1]
            waited = answered_s[slot] - previous
            if stall_s > 0.0 and waited > stall_s and now >= answered_s[slot]:
                cell = (p - length[slot]) % width
                for _ in range(length[slot]):
                    ring[slot, cell] += waited
                    cell = cell + 1 if cell + 1 < width else 0
                previous += waited
            gap = now - previous
            if gap > 0.0:
                last = last_gap[slot]
                if n_seen[slot] < width and last >= min_gap and gap >= min_gap:
                    pairs[slot] += 1
                    if abs(gap - last) <= cohort_tolerance * max(gap, last):
                        matches[slot] += 1
                last_gap[slot] = gap
        ring[slot, p] = now
        pos[slot] = p + 1 if p + 1 < width else 0
        filled = min(length[slot] + 1, width)
        length[slot] = filled
        n_seen[slot] += 1
        if n_seen[slot] % stride != 0 or filled < min_queries:
            continue

        # The window oldest first, NaN on the left while not full.
        empty = width - filled
        window[:empty] = np.nan
        cell = (pos[slot] - filled) % width
        for j in range(empty, width):
            window[j] = ring[slot, cell]
            cell += 1
            if cell == width:
                cell = 0
        row = stats[m]
        gap_stats(window, tolerance, solo_tolerance, scratch, row)
        errors = 0
        refusals = 0
        for j in range(errored.shape[1]):
            errors += int(errored[slot, j])
        for j in range(rejected.shape[1]):
            refusals += int(rejected[slot, j])
        row[4] = errors / max(errored_len[slot], 1)
        row[5] = refusals / max(rejected_len[slot], 1)
        judged[m] = i
        m += 1
    return m


@jit
def judge(
    slots: npt.NDArray[np.int64],
    learn: npt.NDArray[np.bool_],
    judged: npt.NDArray[np.int64],
    features: npt.NDArray[np.float64],
    mean: npt.NDArray[np.float64],
    m2: npt.NDArray[np.float64],
    learned: int,
    floors: npt.NDArray[np.float64],
    z_half: float,
    min_baseline: int,
    score: npt.NDArray[np.float64],
    warm: npt.NDArray[np.uint8],
    held: npt.NDArray[np.float64],
    solo_judged: npt.NDArray[np.float64],
    solo: npt.NDArray[np.float64],
    out: npt.NDArray[np.float64],
) -> int:
    """Judge the judged rows and hand every row its client's judgement, in
    row order, since each judgement may teach the baseline the next is
    judged by. Returns the new count of learned judgements.

    A judgement: per feature ``z = (value - mean) / max(std, floor)`` with
    the sample standard deviation (0 under two learned), burstiness taken
    both ways; the largest, at least 0, gives ``z / (z + z_half)``; warm
    when ``min_baseline`` are learned. It replaces the client's ``score``,
    ``warm`` and ``held`` features; if the row may ``learn``, Welford's
    recurrence adds its features to ``mean`` and ``m2``. A judgement also
    replaces the client's ``solo`` z with the row's of ``solo_judged``.
    ``out`` (n, 8) gets each row's score, warm, held features and solo z
    just after the row.
    Python float arithmetic in the same order as before compilation.
    """
    n_features = len(mean)
    std = np.zeros(n_features)
    next_judged = 0
    for i in range(len(slots)):
        slot = slots[i]
        if next_judged < len(judged) and judged[next_judged] == i:
            values = features[next_judged]
            next_judged += 1
            for f in range(n_features):
                std[f] = 0.0
                if learned >= 2:
                    variance = m2[f] / (learned - 1)
                    std[f] = np.sqrt(0.0 if variance < 0.0 else variance)
            z = 0.0
            for f in range(n_features):
                scale = std[f] if not floors[f] > std[f] else floors[f]
                zf = (values[f] - mean[f]) / scale
                if f == 1:
                    zf = abs(zf)
                if zf > z:
                    z = zf
            score[slot] = z / (z + z_half)
            warm[slot] = 1 if learned >= min_baseline else 0
            held[slot] = values
            solo[slot] = solo_judged[next_judged - 1]
            if learn[i]:
                # Only clients in good standing teach what honest is.
                learned += 1
                for f in range(n_features):
                    old = mean[f]
                    new = old + (values[f] - old) / learned
                    mean[f] = new
                    m2[f] += (values[f] - old) * (values[f] - new)
        out[i, 0] = score[slot]
        out[i, 1] = warm[slot]
        out[i, 2 : 2 + n_features] = held[slot]
        out[i, 2 + n_features] = solo[slot]
    return learned


def window_features(
    times: npt.NDArray[np.float64], tolerance: float
) -> npt.NDArray[np.float64]:
    """Log rate, burstiness and regularity per row of a window of times (NaN
    where unfilled). Rows of one request share a time; zero gaps are not
    counted, so a request's rows are one arrival.

    The measures of :func:`push_and_measure` for given windows, one compiled
    call per row: for tests and tools, not the scoring path.
    """
    stats = np.zeros((len(times), N_STATS))
    scratch = np.empty((2, times.shape[1]))
    for i in range(len(times)):
        # The solo count (its band 0.25 here) is not among these measures.
        gap_stats(np.ascontiguousarray(times[i]), tolerance, 0.25, scratch, stats[i])
    return np.stack([log_rate(stats), stats[:, 2], stats[:, 3]], axis=1)


def solo_counts(
    times: npt.NDArray[np.float64], solo_tolerance: float
) -> npt.NDArray[np.float64]:
    """Positive gaps and, of them, those within ``solo_tolerance`` of their
    median (-1 when the median is too short to tell, see
    :data:`TIME_RESOLUTION_S`), per row of a window of times: the solo
    test's counts, for tests and tools."""
    stats = np.zeros((len(times), N_STATS))
    scratch = np.empty((2, times.shape[1]))
    for i in range(len(times)):
        gap_stats(
            np.ascontiguousarray(times[i]), 0.05, solo_tolerance, scratch, stats[i]
        )
    return np.stack([stats[:, 0], stats[:, SOLO_NEAR]], axis=1)
