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

Cost: a client is judged, and the baseline learns from it, only every
``stride`` requests; between judgements it keeps its last score. Pushing the
times, measuring the judged windows and judging run as two compiled loops
over the batch in row order (:func:`_push_and_measure`, :func:`_judge`),
with numpy's ``log10`` between them.

Imports numpy, pydantic, :mod:`detectors._jit` (numba) and
:mod:`detectors._numpysum` only; nothing from
Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

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
        _gap_stats(np.ascontiguousarray(times[i]), tolerance, scratch, stats[i])
    return np.stack([_log_rate(stats), stats[:, 2], stats[:, 3]], axis=1)


_N_STATS = 6
"""Columns measured per judged row: gap count, span, burstiness,
regularity, error share, rejection share."""


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
    scratch: npt.NDArray[np.float64],
    out: npt.NDArray[np.float64],
) -> None:
    """Gap count, span, burstiness and regularity of one window of times
    (oldest first, NaN where unfilled) into ``out[:4]``.

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
    if count > 0:
        valid = ordered[:count]
        valid.sort()
        median = (valid[(filled - 1) // 2] + valid[filled // 2]) / 2.0
        near = 0
        for j in range(count):
            if np.abs(valid[j] - median) <= tolerance * median:
                near += 1
        regular = near / count
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
    """
    width = ring.shape[1]
    window = np.empty(width)
    scratch = np.empty((2, width))
    m = 0
    for i in range(len(slots)):
        slot = slots[i]
        p = pos[slot] % width
        ring[slot, p] = arrival_s[i]
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
        _gap_stats(window, tolerance, scratch, row)
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
    recurrence adds its features to ``mean`` and ``m2``. ``out`` (n, 7)
    gets each row's score, warm and held features just after the row.
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
        out[i, 2:] = held[slot]
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

    When it is weak:

    - a thief pacing itself like a person (random gaps, a modest rate) looks
      honest here; the content detectors must catch it;
    - honest clients differ a lot (a batch job versus a person); one baseline
      for all of them flags the unusual honest ones, so shadow it until the
      baseline has seen the real population, or set ``z_half`` higher;
    - arrival times are the Kafka record times of the requests, to the
      millisecond: rows of one request are one arrival, and requests in the
      same millisecond look like one;
    - error and rejection shares of a batch reach the score of the next.

    Per-client state: a ring of ``window`` float64 times, two rings of
    ``window`` outcome bits, the last judgement (score, features), about 0.4
    KB at the default window.
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
            judged,
            stats,
        )
        features = np.empty((m, len(FEATURES)))
        features[:, 0] = _log_rate(stats[:m])
        features[:, 1:] = stats[:m, 2:]

        # Judgements, and every row's judgement held since its client's last.
        out = np.empty((n, 2 + len(FEATURES)))
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
            out,
        )
        score = out[:, 0]
        warm = out[:, 1] > 0
        held = out[:, 2:]

        # Evidence against the baseline as it stands after the batch.
        honest_means, honest_stds = self._spread()
        window = p.window

        def evidence(row: int) -> str:
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
