"""Traffic detector: how a client sends, not what it sends.

Per client, over its last ``window`` requests: the rate, the burstiness
(coefficient of variation of inter-arrival gaps: about 1 for a Poisson
stream, far above for bursts), the regularity (share of gaps within
``regular_tolerance`` of the median gap: a bot sending at exact intervals
has almost all), and the shares of its recent requests that failed
(``errored``) or that the gateway refused (``rejected``). These five numbers
are compared, feature by feature, with the running mean and variance
(Welford's recurrence, as ``river.stats.Var`` with ``ddof=1`` computes it)
of the same vectors from clients in good standing.

A solo test needs no baseline: at each judgement, the share of the
window's gaps within ``solo_tolerance`` (25%) of their median, as a
binomial z against ``solo_match_rate``, flags a key from ``solo_z``.
Paced sends are stamped late by varying amounts and split over producer
batches, so whether their gaps fall within the regularity feature's 5%
depends on their phase against the millisecond clock; a 25% band holds
most of them at any phase (docs/traffic-solo.md, with what it misses).
It scores only keys seen sending without waiting for their answers (a
request that arrived before the key's previous one was answered), since a
client that loops on its answers is as regular as its round trips.

A third test pools keys. An attacker who spreads a metronome's stream over
many keys gives each key too few requests for its own regularity to count
before it has taken what it came for. Over each key's first ``window``
rows (each row of a request counts; rows of one request share a time) the
detector counts successive gap pairs and those whose two gaps
are within ``cohort_tolerance`` of each other; keys whose first request
came within ``cohort_window_s`` of each other and that keep the same pace
(the cohort, as in :mod:`detectors.margin`) pool those counts, and a pooled
share of matching pairs far above what honest arrivals give (a binomial z
against ``cohort_match_rate``) flags the members that match too.

Cost: a client is judged, and the baseline learns from it, only every
``stride`` requests; between judgements it keeps its last score. Pushing the
times, measuring the judged windows and judging run as two compiled loops
over the batch in row order (:func:`_push_and_measure`, :func:`_judge`),
with numpy's ``log10`` between them.

Imports numpy, pydantic, :mod:`detectors._jit` (numba),
:mod:`detectors._cohort` and :mod:`detectors._numpysum` only; nothing from
Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from detectors._cohort import cohort_sums, sorted_young
from detectors._jit import jit
from detectors._numpysum import pairwise_sum
from detectors._state import (
    FieldSpec,
    check_counters,
    check_ring_counters,
    check_window,
    group_rows,
    push_window,
    window_fields,
)
from detectors.base import Detector, DetectorParams, DetectorScore, LiveBaseline
from detectors.baselines import BaselineRefused, check_fields, read_field

logger = logging.getLogger(__name__)

FEATURES = ("log10 rate", "burstiness", "regularity", "error share", "rejection share")
_FLOORS = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
"""Smallest standard deviation used per feature, so a baseline where every
honest client sent without errors (variance 0) does not turn one error into
an infinite z-score. In the features' own units."""

MAX_TIME_S = 1e16
"""Largest arrival time magnitude taken, in seconds: above Kafka's largest
record time (2**63 - 1 ms, about 9.2e15 s), and small enough that a window's
gaps, their squares and sums stay finite, so every feature does. Times
beyond it are clipped to it; a stored ring holding one is refused."""

_LOG_RATE_SPAN = 20.0
"""Bound on a window's log10 rate either way, for checking an imported
baseline: at most 1023 gaps over at least 1 ms (about 6), at least one gap
over twice MAX_TIME_S (about -16.3)."""

_MAX_BURSTINESS = 64.0
"""Bound on a window's burstiness, for checking an imported baseline: the
coefficient of variation of ``W - 1`` gaps is at most ``sqrt(W - 2)``, 32 at
the largest window."""


_Z_MAX = 1000.0
"""Largest z bar or step a parameter takes: beyond it no key could be
flagged, and an infinite one turned ``(z - bar) / step`` into inf / inf on
every batch."""

_STEP_MIN = 0.01
"""Smallest z step: a step near 0 overflowed the step score."""


class TrafficParams(DetectorParams):
    """Parameters of :class:`TrafficDetector`."""

    window: int = Field(32, ge=8, le=1024)
    """Requests per client over which rate, burstiness and regularity are
    taken, and outcomes over which the error and rejection shares are."""

    stride: int = Field(8, ge=1, le=1024)
    """A client is judged (and may teach the baseline) every ``stride``
    requests."""

    regular_tolerance: float = Field(0.05, gt=0.0, lt=1.0)
    """A gap within this fraction of the median gap counts as regular."""

    z_half: float = Field(3.0, gt=0.0, le=100.0)
    """z-score at which the score is 0.5 (score = z / (z + z_half))."""

    threshold: float = Field(0.6, gt=0.0, lt=1.0)
    """Score at which a client is flagged (0.6: z = 1.5 ``z_half``)."""

    min_queries: int = Field(16, ge=3, le=100_000)
    """Requests a client must have sent before it is judged."""

    min_baseline: int = Field(20, ge=2, le=1_000_000)
    """Honest judgements the baseline must have learned before any score is
    warm."""

    cohort_window_s: float = Field(0.25, ge=0.0, le=3600.0)
    """Keys whose first request came within this many seconds of each other
    form a cohort whose gap pairs are pooled (see the class); 0 turns the
    cohort test off."""

    cohort_pace_share: float = Field(0.2, ge=0.0, le=10.0)
    """Cohort members must also have sent as many rows as the key, within
    this share of its count (at least 2 either way)."""

    cohort_min_keys: int = Field(3, ge=2, le=10_000)
    """Keys (this one included) a cohort needs before its pooled z counts."""

    cohort_min_pairs: int = Field(12, ge=1, le=100_000)
    """Gap pairs the cohort must have pooled before its z counts."""

    cohort_tolerance: float = Field(0.1, gt=0.0, lt=1.0)
    """Two successive gaps match when they are within this fraction of the
    larger. Wider than ``regular_tolerance``: an attacker's keys paced by
    one process wake together and leave one at a time, so each arrival is
    late by up to tens of milliseconds, which the difference of two gaps
    doubles. With arrivals late by up to 30 ms at four per second, 76% of
    pairs match at 10%, 41% at 5%."""

    cohort_match_rate: float = Field(0.18, ge=1e-6, lt=1.0)
    """Share of an honest key's gap pairs taken to match by chance. Poisson
    arrivals match at about 0.053 with the default tolerance (two
    exponential gaps within 10% of the larger); the evaluation's honest
    population, bursts and pauses included, at 0.061. The default is three
    times that, so honest keys that happen to start together stay far
    below ``cohort_z``."""

    cohort_z: float = Field(6.0, gt=0.0, le=_Z_MAX)
    """Pooled binomial z of a cohort's matching pairs at which its members
    that match too (``member_z``) are flagged."""

    cohort_step_z: float = Field(3.0, ge=_STEP_MIN, le=_Z_MAX)
    """Pooled z beyond ``cohort_z`` that adds one ``threshold`` to a
    member's score: at the default 3, a cohort at z 7.5 scores 1.5 times
    the threshold (the policy's default block level) and its members are
    refused on their next request rather than after three flags each. Why
    not later: honest cohorts stayed under z 2 (a restart making 5,000
    honest keys young at once: -2.2), so past ``cohort_z`` more z says
    nothing more about the cohort; what an honest key risks is membership,
    which ``member_z`` and ``strong_member_z`` guard. Set it to
    ``cohort_z`` for the plain proportion ``threshold * z / cohort_z``
    (block level at z 9), as ``margin``'s cohorts score."""

    member_z: float = Field(3.0, ge=0.0, le=_Z_MAX)
    """A key's own binomial z of matching pairs needed to be flagged through
    its cohort: an honest key that started in the same moment as an
    attacker's keys must show the metronome itself. 3.0 takes two matching
    pairs of two (z 3.02), three of three, four of five, not one of one
    (z 2.1): one pair an honest key matches by chance one time in sixteen,
    two in a row one in 270."""

    strong_cohort_z: float = Field(6.0, gt=0.0, le=_Z_MAX)
    """Pooled z from which a cohort also scores its young keys whose own z
    reaches only ``strong_member_z``. The cohort must reach it twice: as a
    whole, and pooled over its members at ``member_z`` alone, so keys below
    that bar never count towards admitting each other. The default is
    ``cohort_z`` (6): any flagged cohort. At 9 (where the score reached the
    default block level before ``cohort_step_z``) the lower bar made no
    measurable difference in the evaluation, whose 10-key learner pauses
    between rounds and whose cohort seldom reached 9; at 6 its copy ended
    under 90% of unhindered in all three seeds, at the honest cost stated
    in docs/traffic-cohort.md."""

    strong_member_z: float = Field(2.0, ge=0.0, le=_Z_MAX)
    """A key's own binomial z of matching pairs, with at least
    :data:`STRONG_MIN_MATCHES` matching pairs, needed to be scored through a
    cohort at ``strong_cohort_z`` (by default any flagged one): 2 of 3 pairs
    (z 2.19), 3 of 5 or 6, 4 of 9, not 1 of 1 (z 2.13, one pair). At or above
    ``member_z`` it adds no member: the lower bar is off."""

    solo_tolerance: float = Field(0.25, gt=0.0, lt=1.0)
    """The solo test (see the class) counts the gaps of a key's window within
    this fraction of their median. Wide, because the evaluation's paced key
    (one request every 25 ms) reached the gateway with gaps of 11 to 45 ms
    around a median of 26 ms (a shared producer's send delays), of which
    a 5% band (``regular_tolerance``) held one in seven."""

    solo_match_rate: float = Field(0.2, ge=1e-6, lt=1.0)
    """Share of a Poisson key's gaps within ``solo_tolerance`` of its
    window's median, against which the solo z is taken: 0.20 at 25%,
    measured over 32-arrival windows at millisecond times (the sample
    median sits where gaps are densest, so more than the 0.17 of the
    exponential's true median). The evaluation's honest habits (bursts,
    pauses, retries) give less."""

    solo_z: float = Field(5.0, ge=0.0, le=_Z_MAX)
    """Binomial z of a key's gaps within ``solo_tolerance`` of its median,
    against ``solo_match_rate``, at which the key is flagged by the solo
    test: its score is then ``threshold`` and one more ``threshold`` per
    ``solo_step_z`` past it (nothing below). 5, the default, is the
    measured setting (the highest of 5,000 honest Poisson or bursty keys
    was 4.85, docs/traffic-solo.md); 0 turns the solo test off.

    An honest client that sends each request when the last is answered (a
    script looping over its data) is as regular as a metronome: its gaps
    are the gateway's own round trip. So a key whose answer times the
    detector has seen is scored only with ``solo_min_overlaps`` open-loop
    requests in its window; through a real worker such closed-loop keys
    (``tests/integration/test_region_links.py``'s sequential keys) were
    refused at their 16th request without that gate."""

    solo_step_z: float = Field(3.0, ge=_STEP_MIN, le=_Z_MAX)
    """Solo z past ``solo_z`` that adds one ``threshold`` to the score: a
    key at z 6.5 is at 1.5 times the threshold, the policy's default block
    level. A window of 31 gaps all within the band is z 13."""

    solo_min_gaps: int = Field(15, ge=2, le=1024)
    """Gaps (positive, so a request's rows are one) a window needs before
    the solo test scores it: 15 is a key's 16th request, when it is first
    judged."""

    solo_min_overlaps: int = Field(2, ge=0, le=1024)
    """Requests of a key's last ``window`` rows that arrived before its
    previous request was answered (open-loop evidence, see the class)
    needed before the solo test scores a key whose answer times the
    detector has seen. A client that sends each request when the last is
    answered never has one, however regular its round trips; a key whose
    answers the detector never saw (an offline replay) is scored as
    without this gate. 0 turns the gate off."""

    @model_validator(mode="after")
    def _strong_cohort_is_stronger(self) -> Self:
        if self.strong_cohort_z < self.cohort_z:
            raise ValueError(
                f"strong_cohort_z ({self.strong_cohort_z:g}) is below cohort_z "
                f"({self.cohort_z:g}): a cohort that does not flag would admit "
                "keys below member_z"
            )
        return self


def _features(
    times: npt.NDArray[np.float64], tolerance: float
) -> npt.NDArray[np.float64]:
    """Log rate, burstiness and regularity per row of a window of times (NaN
    where unfilled). Rows of one request share a time; zero gaps are not
    counted, so a request's rows are one arrival.

    The measures of :func:`_push_and_measure` for given windows, one compiled
    call per row: for tests and tools, not the scoring path.
    """
    stats = np.zeros((len(times), _N_STATS))
    scratch = np.empty((2, times.shape[1]))
    for i in range(len(times)):
        # The solo count (its band 0.25 here) is not among these measures.
        _gap_stats(np.ascontiguousarray(times[i]), tolerance, 0.25, scratch, stats[i])
    return np.stack([_log_rate(stats), stats[:, 2], stats[:, 3]], axis=1)


def _solo_counts(
    times: npt.NDArray[np.float64], solo_tolerance: float
) -> npt.NDArray[np.float64]:
    """Positive gaps and, of them, those within ``solo_tolerance`` of their
    median (-1 when the median is too short to tell, see
    :data:`_TIME_RESOLUTION_S`), per row of a window of times: the solo
    test's counts, for tests and tools."""
    stats = np.zeros((len(times), _N_STATS))
    scratch = np.empty((2, times.shape[1]))
    for i in range(len(times)):
        _gap_stats(
            np.ascontiguousarray(times[i]), 0.05, solo_tolerance, scratch, stats[i]
        )
    return np.stack([stats[:, 0], stats[:, _SOLO_NEAR]], axis=1)


_TIME_RESOLUTION_S = 0.001
"""Arrival times are Kafka record times, whole milliseconds. Gap pairs are
compared only when both gaps are at least this over ``cohort_tolerance``
(10 ms at 10%): shorter gaps (rows of one burst) cannot be told within the
tolerance of each other at that resolution, and would all match."""

_MAX_COHORT_SCORE = 0.999
"""Scores stay below 1, as ``z / (z + z_half)`` does."""

STRONG_MIN_MATCHES = 2
"""Matching pairs a key below ``member_z`` needs of its own to be scored
through an overwhelming cohort (``strong_member_z``): one matching pair,
which an honest Poisson key shows about one time in sixteen, is no
evidence of a metronome."""

_N_STATS = 7
"""Columns measured per judged row: gap count, span, burstiness,
regularity, error share, rejection share, and the solo test's count of
gaps within ``solo_tolerance`` of the median (:data:`_SOLO_NEAR`)."""

_SOLO_NEAR = 6
"""Column of the solo count in the measures (-1: median too short)."""


def _log_rate(stats: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """log10 of arrivals per second from the gap count and span columns.

    numpy's ``log10``, not the compiled one: numpy picks a SIMD version by
    CPU, and the two may differ in the last bit.
    """
    return np.asarray(
        np.log10(np.maximum(stats[:, 0], 1) / np.maximum(stats[:, 1], 1e-3))
    )


@jit
def _gap_stats(
    window: npt.NDArray[np.float64],
    tolerance: float,
    solo_tolerance: float,
    scratch: npt.NDArray[np.float64],
    out: npt.NDArray[np.float64],
) -> None:
    """Gap count, span, burstiness and regularity of one window of times
    (oldest first, NaN where unfilled) into ``out[:4]``, and the count of
    gaps within ``solo_tolerance`` of the median into ``out[_SOLO_NEAR]``
    (-1 when the median is under ``_TIME_RESOLUTION_S / solo_tolerance``:
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
        solo = float(wide) if median * solo_tolerance >= _TIME_RESOLUTION_S else -1.0
    out[_SOLO_NEAR] = solo
    out[0] = count
    out[1] = span
    out[2] = cv
    out[3] = regular


@jit
def _push_and_measure(
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
    judged: npt.NDArray[np.int64],
    stats: npt.NDArray[np.float64],
) -> int:
    """Push each row's arrival time into its client's ring, in row order;
    for each row that is judged (its client's request count a multiple of
    ``stride``, at least ``min_queries`` times in the window) put its index
    in ``judged`` and its window's measures in the row of ``stats`` (see
    :data:`_N_STATS`). Returns the number of judged rows.

    The error and rejection shares are the set bits of the whole ring over
    its filled length, as of before the batch (outcomes arrive after it).

    Also, over each client's first ``width`` rows, the cohort test's counts:
    the time of its first row, its last positive gap, the successive pairs
    of positive gaps both at least ``min_gap``, and those whose two gaps are
    within ``cohort_tolerance`` of the larger.
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
            gap = now - ring[slot, p - 1 if p > 0 else width - 1]
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
        _gap_stats(window, tolerance, solo_tolerance, scratch, row)
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
def _judge(
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


class TrafficDetector(Detector[TrafficParams]):
    """Largest deviation of a client's sending pattern from honest clients'.

    Per feature, ``z = (value - honest mean) / max(honest std, floor)``, taken
    in the suspicious direction (faster, more errors and rejections, more
    regular; burstiness both ways, since a metronome has almost none). The
    score is ``z / (z + z_half)`` for the largest.

    Score: in [0, 1), higher is more suspicious. Warm once the client has sent
    ``min_queries`` requests and the baseline has learned ``min_baseline``
    honest judgements.

    Solo score: at each judgement, the window's positive gaps within
    ``solo_tolerance`` of their median, as a binomial z against
    ``solo_match_rate``; from ``solo_z`` the score is ``threshold`` plus
    one ``threshold`` per ``solo_step_z`` past it (below 1), held between
    judgements, warm or not, once ``solo_min_overlaps`` of the key's last
    ``window`` requests arrived before its previous request was answered
    (open loop; a key whose answer times were never given to
    :meth:`observe_outcomes` is scored without this gate). A key sending
    every 25 ms is flagged by its
    16th to 32nd row at every phase of its stamps against the millisecond
    clock, with sends up to 10 ms late, in 5 ms producer batches, or with
    10% of them split 0/50 ms (100 runs each); the evaluation's paced
    learner, whose gaps ran 11 to 45 ms around 26, at its 24th at z 6.7.
    No honest key of 2,000 with the evaluation's habits, 1,000 of several
    rows a request or 2,000 Poisson keys was flagged (highest z 4.85;
    ``tests/detectors/solo_scenarios.py``).

    Cohort score: over a key's first ``window`` rows, ``pairs`` counts
    successive pairs of gaps both at least ``0.001 / cohort_tolerance``
    seconds long (10 ms at 10%: times are whole milliseconds) and
    ``matches`` those whose gaps are within ``cohort_tolerance`` of the
    larger. A
    young key whose own binomial z of matches against
    ``cohort_match_rate`` reaches ``member_z`` pools the counts of every
    young key whose first request came within ``cohort_window_s`` of its
    own and whose request count is within ``cohort_pace_share`` of its own;
    with ``cohort_min_keys`` keys and ``cohort_min_pairs`` pairs, the
    score is ``threshold * pooled z / cohort_z`` up to ``cohort_z`` and one
    more ``threshold`` per ``cohort_step_z`` past it (below 1), and the
    key's score is the larger of that and its own (warm or not: the test
    needs no learned baseline). A paced thief spread over ten keys at four
    requests per second each is flagged after 5 requests per key at the
    median (4 at least, 10 for one key in ten; 200 keys in 20 seeded runs)
    instead of sixteen. Membership depends on time and pace only, so an
    honest cohort's pooled share is as honest as one key's: a worker
    restart that makes 2,000 honest keys young within one second gave
    pooled z of at most -0.8 in three seeded runs, 0.5 with requests of up
    to 8 rows (``tests/detectors/test_traffic_cohort_honest.py``).

    A flagged cohort also scores its young keys whose own z reaches only
    ``strong_member_z`` (2, with at least :data:`STRONG_MIN_MATCHES`
    matching pairs: 2 of 3, 3 of 5): its pooled z must reach
    ``strong_cohort_z`` (by default ``cohort_z``, 6) both as a whole and
    over its keys at ``member_z`` alone (at least ``cohort_min_keys`` of
    them), so keys under ``member_z`` never count towards admitting each
    other. With ``strong_cohort_z`` 9, ten paced keys stamped in a shared
    producer's batches were all at the block level by row 8 at the median
    (13 at the 90th percentile; 12 and 18 without the lower bar; 100
    seeded runs, ``tests/detectors/cohort_scenarios.py``).
    The counts are read after the whole batch, so every row of a key in
    one batch gets one cohort verdict; a batch that spans a long time (a
    worker catching up) flags a key's earlier rows from its later ones.

    When it is weak:

    - a thief pacing itself like a person (random gaps, a modest rate) looks
      honest here; the content detectors must catch it;
    - honest clients differ a lot (a batch job versus a person); one baseline
      for all of them flags the unusual honest ones, so shadow it until the
      baseline has seen the real population, or set ``z_half`` higher;
    - arrival times are the Kafka record times of the requests, to the
      millisecond: rows of one request are one arrival, and requests in the
      same millisecond look like one;
    - error and rejection shares of a batch reach the score of the next;
    - the cohort test pools only the keys one worker holds: a client's
      requests go to one partition by record key, so ten keys spread over
      four workers often leave fewer than ``cohort_min_keys`` on each;
    - it pools only keys whose first requests came within
      ``cohort_window_s`` of each other: starts staggered by more (1 s in
      the tests) leave each key to its own test;
    - it counts only a key's first ``window`` rows: a key that first sends
      that many rows any other way never pools afterwards;
    - pace is the count of rows, so keys whose counts drift apart by more
      than ``cohort_pace_share`` (at least 2) stop pooling: ten thieves
      each 1.5 times the last one's rate had 3 or 4 of 10 flagged within
      15 requests, where one rate had 9 or 10; 1 to 3 rows a request by
      key, 4 to 7 of 10;
    - it sees only successive gaps within ``cohort_tolerance`` of each
      other: Poisson gaps, gaps drawn uniformly from 0.2 to 0.3 s (0 to 4
      of 10 flagged) or 0.1 to 0.4 s (none), or two alternating periods
      (0.2 and 0.3 s: none, and no gap near the median for the single-key
      regularity either) escape it;
    - gaps under ``0.001 / cohort_tolerance`` (10 ms) form no pair, so a
      key faster than 100 requests per second is left to its rate;
    - a worker restarted without state makes every live key young at the
      same moment: keys are then pooled by the restart, not by when they
      really started, and honest clients polling at one period are flagged
      together there (as their own regularity flags each at 16 requests);
    - an honest key that starts within ``cohort_window_s`` of a paced
      cohort at its pace and whose own first two pairs match (about one
      Poisson key in 300) is flagged with it: 1 of 1,200 such keys
      measured; once that cohort is flagged, 2 of 3 or 3 of 6 of its own
      pairs are enough, and refuse it: 12 of 6,000 honest Poisson keys
      started with ten broker-stamped paced keys were flagged, 5 of them
      three times or at the block level (1 of 6,000, once, without the
      lower bar; 3 and 2 with ``strong_cohort_z`` 9);
    - the lower bar waits for the pooled z of the cohort's keys at
      ``member_z`` to reach ``strong_cohort_z``, and a thief's key whose
      own pairs stay under ``strong_member_z`` (2 of 4, 3 of 7) waits for
      its own bar; the evaluation's 10-key active learner pauses between
      rounds, which spoils two pairs of every key, so its cohort seldom
      reached z 9 and a ``strong_cohort_z`` of 9 made no measurable
      difference there (docs/traffic-cohort.md);
    - a live change of ``cohort_tolerance`` applies to pairs counted from
      then on; pairs already counted keep their verdict;
    - the solo test: a Poisson key's z wanders up to about 5 over many
      judgements (1 of 20,000 keys of 200 requests reached 5.16, one flag);
      sends jittered by up to 20 ms at a 25 ms pace (26 of 100 unflagged
      within 64 rows) or often split into gaps of two periods (25%: block
      level by row 64 for 94 of 100) escape it or slow it; a median gap
      under 4 ms is not scored; a live ``solo_z`` or ``solo_step_z`` applies
      to the held z from the next row, a band, rate or ``solo_min_gaps``
      at each key's next judgement;
    - the solo test's open-loop gate compares a request's record time
      (the broker's clock) with the worker's clock when it answered the
      key's previous request: it needs the two clocks synchronised (on one
      host they are the same). A worker clock behind the broker's hides
      overlaps (a paced thief is scored later or never); ahead by more
      than a closed-loop client's think time, it makes that client look
      open loop. A closed-loop client that gives up waiting and resends
      overlaps, and is scored once it has done so ``solo_min_overlaps``
      times in a window; a paced thief that waits for each answer (one
      request per round trip) is closed loop and never scored by the solo
      test. A key's rows of one batch are gated by its count after each
      row, and a key whose answers the detector never saw (its first
      batch, an offline replay) is scored without the gate.

    Per-client state: a ring of ``window`` float64 times, three rings of
    ``window`` bits (outcomes, open-loop arrivals), the last judgement
    (score, features, solo z), the last answer time and the cohort counts,
    about 0.52 KB at the default window.
    """

    name: ClassVar[str] = "traffic"
    Params: ClassVar[type[TrafficParams]] = TrafficParams
    _mutable_params: ClassVar[frozenset[str]] = frozenset(
        {
            "stride",
            "regular_tolerance",
            "z_half",
            "threshold",
            "min_queries",
            "min_baseline",
            "cohort_window_s",
            "cohort_pace_share",
            "cohort_tolerance",
            "cohort_min_keys",
            "cohort_min_pairs",
            "cohort_match_rate",
            "cohort_z",
            "cohort_step_z",
            "member_z",
            "strong_cohort_z",
            "strong_member_z",
            "solo_tolerance",
            "solo_match_rate",
            "solo_z",
            "solo_step_z",
            "solo_min_gaps",
            "solo_min_overlaps",
        }
    )
    observes_outcomes: ClassVar[bool] = True

    def __init__(self, params: TrafficParams | None = None, *, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        # Honest running mean and sum of squared deviations per feature
        # (Welford), updated in place by the compiled judgement loop: it is
        # sequential, since each judgement may teach the baseline the next
        # one is judged by.
        self._mean = np.zeros(len(FEATURES))
        self._m2 = np.zeros(len(FEATURES))
        self._learned = 0

    @property
    def baseline_size(self) -> int:
        """Honest judgements learned so far."""
        return self._learned

    def baseline(self) -> dict[str, tuple[float, float]]:
        """Honest mean and standard deviation per feature."""
        means, stds = self._moments()
        return {
            name: (mean, std)
            for name, mean, std in zip(FEATURES, means, stds, strict=True)
        }

    def _moments(self) -> tuple[list[float], list[float]]:
        """Honest mean and sample standard deviation (0 under two) per feature."""
        n = self._learned
        means: list[float] = self._mean.tolist()
        if n < 2:
            return means, [0.0] * len(FEATURES)
        return means, [math.sqrt(max(m2 / (n - 1), 0.0)) for m2 in self._m2.tolist()]

    def _export_live(self) -> LiveBaseline:
        """The honest judgements' count, mean and sum of squared deviations."""
        fields = {
            "mean": self._mean.astype("<f8").tobytes(),
            "m2": self._m2.astype("<f8").tobytes(),
        }
        return fields, self._learned, self._learned >= self._params.min_baseline

    def _import_live(
        self, fields: Mapping[str, bytes], samples: int
    ) -> Callable[[], None]:
        check_fields(fields, ("mean", "m2"))
        n_features = len(FEATURES)
        mean = read_field(fields, "mean", "<f8", length=n_features)
        m2 = read_field(fields, "m2", "<f8", length=n_features)
        # Each feature's honest mean lies in its range (log10 rate within
        # MAX_TIME_S's 16 decades either way, burstiness >= 0, the rest
        # shares), and a sample of n values in a range of span w has a sum
        # of squared deviations of at most n w^2 / 4.
        low = np.array([-_LOG_RATE_SPAN, 0.0, 0.0, 0.0, 0.0])
        high = np.array([_LOG_RATE_SPAN, _MAX_BURSTINESS, 1.0, 1.0, 1.0])
        if samples == 0 and (mean.any() or m2.any()):
            raise BaselineRefused("invalid", "traffic: moments without samples")
        if samples < 2 and m2.any():
            raise BaselineRefused("invalid", "traffic: spread from under 2 samples")
        if not ((mean >= low) & (mean <= high)).all():
            raise BaselineRefused("invalid", "traffic: a mean is out of its range")
        if not ((m2 >= 0.0) & (m2 <= samples * (high - low) ** 2 / 4.0)).all():
            raise BaselineRefused("invalid", "traffic: a spread is out of range")

        def apply() -> None:
            # Chan et al.'s pairwise update: the imported judgements and this
            # detector's own are disjoint samples, so their moments combine
            # exactly (at start, when it has none, this is a copy).
            own = self._learned
            total = own + samples
            if total == 0:
                return
            delta = mean - self._mean
            self._m2 += m2 + delta * delta * own * samples / total
            self._mean += delta * samples / total
            self._learned = total

        return apply

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        window = self._params.window
        return {
            **window_fields("times", window, "<f8"),
            "n_seen": FieldSpec((), "<i8"),
            **window_fields("errored", window, "u1"),
            **window_fields("rejected", window, "u1"),
            "score": FieldSpec((), "<f8"),
            "warm": FieldSpec((), "u1"),
            "features": FieldSpec((len(FEATURES),), "<f8"),
            # The cohort test's counts over the client's first window
            # requests (see _push_and_measure).
            "first_s": FieldSpec((), "<f8"),
            "last_gap": FieldSpec((), "<f8"),
            "pairs": FieldSpec((), "<i8"),
            "matches": FieldSpec((), "<i8"),
            # The solo test's binomial z at the client's last judgement.
            "solo_z": FieldSpec((), "<f8"),
            # When the client's last answered request was answered (0: none
            # seen), and per row of the window whether it started a request
            # that arrived before the previous one was answered.
            "answered_s": FieldSpec((), "<f8"),
            **window_fields("overlapped", window, "u1"),
        }

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        check_ring_counters(values, "times", "times_pos", "times_len")
        check_counters(values, "n_seen")
        # Not only the counters: a time no clock gives makes the next judged
        # window's features infinite (see MAX_TIME_S).
        if not (np.abs(values["times"]) <= MAX_TIME_S).all():
            raise ValueError(
                f"state field 'times' holds a time beyond {MAX_TIME_S:g} s"
            )
        check_window(values, "errored", "errored_pos", "errored_len")
        check_window(values, "rejected", "rejected_pos", "rejected_len")
        if not 0.0 <= float(values["score"]) < 1.0 or int(values["warm"]) > 1:
            raise ValueError("state field 'score' or 'warm' is out of range")
        if not np.isfinite(values["features"]).all():
            raise ValueError("state field 'features' is not finite")
        # No count gives a NaN or an infinity: held until the key's next
        # judgement, one would hide a metronome, the other block the key.
        if not np.isfinite(values["solo_z"]):
            raise ValueError("state field 'solo_z' is not finite")
        # A NaN answer time would make every arrival look closed-loop.
        if not abs(float(values["answered_s"])) <= MAX_TIME_S:
            raise ValueError(f"state field 'answered_s' is beyond {MAX_TIME_S:g} s")
        check_window(values, "overlapped", "overlapped_pos", "overlapped_len")
        if not abs(float(values["first_s"])) <= MAX_TIME_S:
            raise ValueError(f"state field 'first_s' is beyond {MAX_TIME_S:g} s")
        if not 0.0 <= float(values["last_gap"]) <= 2.0 * MAX_TIME_S:
            raise ValueError("state field 'last_gap' is out of range")
        # Pairs come from the first window rows only: at most one per row
        # after the first two. Bounded by the key's own count too, or
        # a forged young key claims a metronome it never sent (30 of 30 pairs
        # after 3 requests) and carries it into its cohort's pooled z.
        pairs, matches = int(values["pairs"]), int(values["matches"])
        seen = int(values["n_seen"])
        if not 0 <= matches <= pairs <= max(0, min(seen, self._params.window) - 2):
            raise ValueError("state counters 'pairs' and 'matches' are out of range")
        # A key's first gap comes with its second request; one before it
        # would pair with that gap.
        if seen < 2 and float(values["last_gap"]) != 0.0:
            raise ValueError("state field 'last_gap' is set before a second request")

    def _observe_outcome_rows(
        self,
        slots: npt.NDArray[np.int64],
        errored: npt.NDArray[np.bool_],
        rejected: npt.NDArray[np.bool_],
    ) -> None:
        assert self._arena is not None
        arrays = self._arena.arrays
        groups = group_rows(slots)
        for name, bits in (("errored", errored), ("rejected", rejected)):
            push_window(
                arrays[name],
                arrays[f"{name}_pos"],
                arrays[f"{name}_len"],
                groups,
                bits[groups.order],
            )

    def _observe_answer_times(
        self, slots: npt.NDArray[np.int64], answered_s: npt.NDArray[np.float64]
    ) -> None:
        assert self._arena is not None
        last = self._arena.arrays["answered_s"]
        clipped = np.clip(answered_s, -MAX_TIME_S, MAX_TIME_S)
        # The latest answer per key: a batch may answer a key several times.
        np.maximum.at(last, slots, clipped)

    def _open_loop_counts(
        self, slots: npt.NDArray[np.int64], times: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.int64]:
        """Push each row's open-loop bit into its key's window and return, per
        row, the key's overlapping requests in its window just after it.

        A row starts a request when it is a key's first of the batch or its
        time differs from the key's previous row (rows of one request share a
        time). The first overlaps when it arrived before the key's last
        answer; a later request of the key in the same batch always does,
        as none of the batch is answered before all of it is scored.
        """
        assert self._arena is not None
        arrays = self._arena.arrays
        groups = group_rows(slots)
        sorted_times = times[groups.order]
        previous = np.roll(sorted_times, 1)
        first = groups.position == 0
        bits = np.where(
            first,
            sorted_times < arrays["answered_s"][groups.slot],
            sorted_times != previous,
        )
        counts_sorted, _ = push_window(
            arrays["overlapped"],
            arrays["overlapped_pos"],
            arrays["overlapped_len"],
            groups,
            bits,
        )
        counts = np.empty(len(slots), dtype=np.int64)
        counts[groups.order] = counts_sorted
        return counts

    def _spread(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Honest mean per feature, and standard deviation with its floor."""
        means, stds = self._moments()
        return np.array(means), np.maximum(np.array(stds), _FLOORS)

    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        assert self._arena is not None
        arrays = self._arena.arrays
        p = self._params
        n = len(slots)
        times = np.full(n, time.time()) if self._arrival_s is None else self._arrival_s
        # Finite times far apart (1e300) overflowed a window's sums into an
        # infinite or largest-float feature, which, learned, turned the shared
        # baseline and so every later score into NaN.
        times = np.clip(times, -MAX_TIME_S, MAX_TIME_S)
        # Read before this batch's own answers are taken (observe_outcomes).
        answers_seen = arrays["answered_s"][slots] != 0.0
        overlaps = self._open_loop_counts(slots, times)

        # Times into the rings, and the measures of each judged row's window.
        judged = np.empty(n, dtype=np.int64)
        stats = np.empty((n, _N_STATS))
        m = _push_and_measure(
            slots,
            np.ascontiguousarray(times),
            arrays["times"],
            arrays["times_pos"],
            arrays["times_len"],
            arrays["n_seen"],
            arrays["errored"],
            arrays["errored_len"],
            arrays["rejected"],
            arrays["rejected_len"],
            p.stride,
            p.min_queries,
            p.regular_tolerance,
            p.solo_tolerance,
            p.cohort_tolerance,
            arrays["first_s"],
            arrays["last_gap"],
            arrays["pairs"],
            arrays["matches"],
            _TIME_RESOLUTION_S / p.cohort_tolerance,
            judged,
            stats,
        )
        features = np.empty((m, len(FEATURES)))
        features[:, 0] = _log_rate(stats[:m])
        features[:, 1:] = stats[:m, 2 : 1 + len(FEATURES)]
        solo_judged = self._solo_z(stats[:m, 0], stats[:m, _SOLO_NEAR])

        # Judgements, and every row's judgement held since its client's last.
        out = np.empty((n, 3 + len(FEATURES)))
        self._learned = _judge(
            slots,
            np.ascontiguousarray(learn),
            judged[:m],
            features,
            self._mean,
            self._m2,
            self._learned,
            _FLOORS,
            p.z_half,
            p.min_baseline,
            arrays["score"],
            arrays["warm"],
            arrays["features"],
            solo_judged,
            arrays["solo_z"],
            out,
        )
        score = out[:, 0]
        warm = out[:, 1] > 0
        held = out[:, 2 : 2 + len(FEATURES)]
        solo_z = out[:, 2 + len(FEATURES)]

        # The solo test: the threshold at solo_z and one more per
        # solo_step_z past it; it needs no learned baseline. Nothing under
        # solo_z, unlike the cohort's proportion: honest keys' solo z
        # wanders up to 4 or 5, and any score would stand in for every
        # judgement the baseline is not yet warm for.
        # Gated on open-loop evidence where the key's answer times are known.
        open_loop = ~answers_seen | (overlaps >= p.solo_min_overlaps)
        solo_score = np.zeros(n)
        if p.solo_z > 0.0:
            solo_score = np.where(
                (solo_z >= p.solo_z) & open_loop,
                np.minimum(
                    p.threshold * (1.0 + (solo_z - p.solo_z) / p.solo_step_z),
                    _MAX_COHORT_SCORE,
                ),
                0.0,
            )
        from_solo = solo_score > np.where(warm, score, 0.0)
        score = np.where(from_solo, solo_score, score)
        warm = warm | from_solo

        # The cohort test: in proportion up to the flag threshold at
        # cohort_z, then one more threshold per cohort_step_z, so a cohort
        # whose pooled z is far past any honest one (honest cohorts stay
        # under 2) is refused on its next request instead of after three
        # flags per key.
        cohort = self._cohort_evidence(slots)
        pooled = cohort.pooled_z
        cohort_score = np.clip(
            p.threshold
            * np.where(
                pooled < p.cohort_z,
                pooled / p.cohort_z,
                1.0 + (pooled - p.cohort_z) / p.cohort_step_z,
            ),
            0.0,
            _MAX_COHORT_SCORE,
        )
        from_cohort = cohort_score > np.where(warm, score, 0.0)
        score = np.where(from_cohort, cohort_score, score)
        warm = warm | from_cohort

        # Evidence against the baseline as it stands after the batch.
        honest_means, honest_stds = self._spread()
        window = p.window
        cohort_s, rate, cohort_z = p.cohort_window_s, p.cohort_match_rate, p.cohort_z

        def evidence(row: int) -> str:
            if from_cohort[row]:
                text = (
                    f"{cohort.matches[row]} of {cohort.pairs[row]} successive "
                    f"gap pairs within {p.cohort_tolerance:.0%} of each other "
                    f"over the first rows of {cohort.keys[row]} keys whose "
                    f"first request came within {cohort_s:g} s of its own "
                    f"(honest about {rate:g}), z {cohort.pooled_z[row]:.1f} "
                    f"(flagged from {cohort_z:g}); its own {cohort.own_matches[row]} "
                    f"of {cohort.own_pairs[row]}"
                )
                if cohort.below[row]:
                    text += (
                        f", under member_z {p.member_z:g}, scored as its "
                        f"cohort's {cohort.member_keys[row]} keys at member_z "
                        f"alone give z {cohort.member_z[row]:.1f} (enough from "
                        f"{p.strong_cohort_z:g})"
                    )
                return text
            if from_solo[row]:
                text = (
                    f"regularity beyond chance: gaps within "
                    f"{p.solo_tolerance:.0%} of their median over "
                    f"the last {window} requests far more often than honest "
                    f"(about {p.solo_match_rate:.0%}): binomial z {solo_z[row]:.1f} "
                    f"(flagged from {p.solo_z:g})"
                )
                if answers_seen[row]:
                    text += (
                        f"; {overlaps[row]} of them sent before the previous "
                        "one was answered"
                    )
                return text
            if score[row] <= 0.0:
                return "sending pattern like honest clients'"
            z = (held[row] - honest_means) / honest_stds
            z[1] = abs(z[1])  # burstiness: bursts and metronomes both stand out
            b = int(np.argmax(z))
            return (
                f"{FEATURES[b]} {held[row, b]:.3g} against honest "
                f"{honest_means[b]:.3g} (z {float(np.maximum(z[b], 0.0)):.1f}) over "
                f"the last {window} requests"
            )

        return self._scores(score, warm, evidence)

    def _solo_z(
        self, gaps: npt.NDArray[np.float64], near: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """The solo test's binomial z per judged window: its ``near`` gaps
        within ``solo_tolerance`` of the median of its ``gaps`` positive
        gaps, against ``solo_match_rate``; 0 under ``solo_min_gaps`` gaps or
        when the median was too short to tell (``near`` -1)."""
        p = self._params
        counted = (gaps >= p.solo_min_gaps) & (near >= 0)
        z = _binomial_z(
            np.where(counted, near, 0).astype(np.int64),
            np.where(counted, gaps, 0).astype(np.int64),
            p.solo_match_rate,
        )
        return np.ascontiguousarray(z, dtype=np.float64)

    def _member_bar(self) -> npt.NDArray[np.int64]:
        """Per count of pairs (0 to ``window``), the fewest matches whose
        binomial z reaches ``member_z`` (``count + 1`` when none does, and
        for no pairs): the same test as :func:`_binomial_z` per key, as one
        look-up in the compiled running sums."""
        p = self._params
        counts = np.arange(p.window + 1)
        trials = np.broadcast_to(counts[:, None], (len(counts), len(counts)))
        hits = np.broadcast_to(counts[None, :], trials.shape)
        reach = (
            (hits <= trials)
            & (trials > 0)
            & (_binomial_z(hits, trials, p.cohort_match_rate) >= p.member_z)
        )
        # z grows with matches at a fixed count, so the first reaching one is
        # the bar; a row with none reaches past every count.
        return np.where(reach.any(axis=1), reach.argmax(axis=1), counts + 1)

    def _cohort_evidence(self, slots: npt.NDArray[np.int64]) -> _CohortEvidence:
        """Per row: the pooled z of the key's cohort (0 when the key is not a
        young member of a cohort of ``cohort_min_keys`` with
        ``cohort_min_pairs``), with the counts behind it.

        A key is young while it has sent at most ``window`` rows. A young
        key is a member at ``member_z`` of any cohort; at ``strong_member_z``
        (with :data:`STRONG_MIN_MATCHES` matching pairs) only of an
        overwhelming one: pooled z at least ``strong_cohort_z`` both over
        the whole cohort and over its members at ``member_z`` alone (at
        least ``cohort_min_keys`` of them with ``cohort_min_pairs``). The
        second sum leaves out every key below ``member_z``, the asking one
        included, so however many such keys share a cohort they cannot
        admit each other.

        Only young keys whose own z reaches one of the two bars look for a
        cohort, once per key and batch, so rarely for honest keys by design;
        an attacker makes every key of every batch look. Each look therefore
        costs a few binary searches, not a scan of every key: the young keys
        are sorted once per batch by request count, then first request
        time, with running sums of their counts and of their keys' at
        ``member_z`` (:func:`_running_sums`,
        :func:`detectors._cohort.cohort_sums`). With
        20,000 young keys and 256 looking keys in a batch this takes about
        0.4 to 0.6 ms (sorting the young keys most of it; 1.9 ms over
        100,000) where a scan per look took 20 ms, against 0.1 to 0.5 ms
        for the rest of the detector's batch.
        """
        assert self._arena is not None
        arrays = self._arena.arrays
        p = self._params
        n = len(slots)
        found = _CohortEvidence.empty(n)
        if p.cohort_window_s <= 0.0:
            return found
        seen = arrays["n_seen"]
        pairs, matches = arrays["pairs"], arrays["matches"]
        rate = p.cohort_match_rate
        own_z = _binomial_z(matches[slots], pairs[slots], rate)
        # Below member_z only for the lower bar: off at or above member_z.
        weak = (own_z >= p.strong_member_z) & (matches[slots] >= STRONG_MIN_MATCHES)
        ask = (
            (seen[slots] <= p.window)
            & (pairs[slots] > 0)
            & ((own_z >= p.member_z) | weak)
        )
        asking = np.unique(slots[ask])
        first = arrays["first_s"]
        young, young_first, bounds = sorted_young(
            asking, seen, first, p.window, p.cohort_window_s
        )
        # Running sums over them in that order (see _running_sums).
        sums = np.empty((5, len(young) + 1), dtype=np.int64)
        _running_sums(young, pairs, matches, self._member_bar(), sums)
        cohort = np.empty((6, len(asking)), dtype=np.int64)
        cohort_sums(
            asking,
            seen,
            first,
            young_first,
            bounds,
            sums,
            p.cohort_pace_share,
            p.cohort_window_s,
            cohort,
        )
        keys, total, hits, member_keys, member_total, member_hits = cohort
        pooled_z = np.maximum(_binomial_z(hits, total, rate), 0.0)
        member_z = _binomial_z(member_hits, member_total, rate)
        below = _binomial_z(matches[asking], pairs[asking], rate) < p.member_z
        overwhelming = (
            (pooled_z >= p.strong_cohort_z)
            & (member_z >= p.strong_cohort_z)
            & (member_keys >= p.cohort_min_keys)
            & (member_total >= p.cohort_min_pairs)
        )
        counted = (
            (keys >= p.cohort_min_keys)
            & (total >= p.cohort_min_pairs)
            & (~below | overwhelming)
        )
        if not counted.any():
            return found
        asking, keys, total, hits = (
            asking[counted],
            keys[counted],
            total[counted],
            hits[counted],
        )
        pooled_z, below = pooled_z[counted], below[counted]
        member_keys, member_z = member_keys[counted], member_z[counted]
        # Each row of a counted key, and which of them it is (asking is sorted).
        at = np.minimum(np.searchsorted(asking, slots), len(asking) - 1)
        rows = asking[at] == slots
        at = at[rows]
        found.pooled_z[rows] = pooled_z[at]
        found.keys[rows] = keys[at]
        found.pairs[rows] = total[at]
        found.matches[rows] = hits[at]
        found.own_pairs[rows] = pairs[slots[rows]]
        found.own_matches[rows] = matches[slots[rows]]
        found.below[rows] = below[at]
        found.member_keys[rows] = member_keys[at]
        found.member_z[rows] = member_z[at]
        return found


@jit
def _running_sums(
    young: npt.NDArray[np.int64],
    pairs: npt.NDArray[np.int64],
    matches: npt.NDArray[np.int64],
    bar: npt.NDArray[np.int64],
    sums: npt.NDArray[np.int64],
) -> None:
    """Running sums over the slots ``young`` in their order, 0 first, into
    the five rows of ``sums``: pairs, matches, keys at ``member_z`` (matches
    at least ``bar[pairs]``, see :meth:`TrafficDetector._member_bar`), and
    those keys' pairs and matches.

    One pass, where five numpy cumulative sums over gathered copies doubled
    the look-up's cost. Pairs never exceed ``window - 2`` (counted over the
    first ``window`` rows, and a loaded state is checked for it), so
    ``bar`` covers them; a count past it would be no member.
    """
    totals = np.zeros(5, dtype=np.int64)
    sums[:, 0] = 0
    for j in range(len(young)):
        slot = young[j]
        n_pairs = pairs[slot]
        n_hits = matches[slot]
        totals[0] += n_pairs
        totals[1] += n_hits
        if 0 < n_pairs < len(bar) and n_hits >= bar[n_pairs]:
            totals[2] += 1
            totals[3] += n_pairs
            totals[4] += n_hits
        sums[:, j + 1] = totals


def _binomial_z(
    hits: npt.NDArray[np.int64], trials: npt.NDArray[np.int64], rate: float
) -> npt.NDArray[np.float64]:
    """``(hits - trials * rate) / sqrt(trials * rate * (1 - rate))``, 0 where
    there are no trials."""
    trials_f = trials.astype(np.float64)
    spread = np.sqrt(np.maximum(trials_f, 1.0) * rate * (1.0 - rate))
    return np.where(trials > 0, (hits - trials_f * rate) / spread, 0.0)


@dataclass(slots=True)
class _CohortEvidence:
    """The cohort test's result per row of a batch (see
    :meth:`TrafficDetector._cohort_evidence`): the cohort's pooled z and
    counts, the key's own counts, whether the key is below ``member_z``
    (admitted by an overwhelming cohort), and the cohort's keys at
    ``member_z`` with their pooled z."""

    pooled_z: npt.NDArray[np.float64]
    keys: npt.NDArray[np.int64]
    pairs: npt.NDArray[np.int64]
    matches: npt.NDArray[np.int64]
    own_pairs: npt.NDArray[np.int64]
    own_matches: npt.NDArray[np.int64]
    below: npt.NDArray[np.bool_]
    member_keys: npt.NDArray[np.int64]
    member_z: npt.NDArray[np.float64]

    @classmethod
    def empty(cls, n: int) -> _CohortEvidence:
        def counts() -> npt.NDArray[np.int64]:
            return np.zeros(n, dtype=np.int64)

        return cls(
            pooled_z=np.zeros(n),
            keys=counts(),
            pairs=counts(),
            matches=counts(),
            own_pairs=counts(),
            own_matches=counts(),
            below=np.zeros(n, dtype=np.bool_),
            member_keys=counts(),
            member_z=np.zeros(n),
        )
