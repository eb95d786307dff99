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

Cost: the vectors are built vectorised for the whole batch, but a client is
judged, and the baseline learns from it, only every ``stride`` requests, so
River runs on about one row in ``stride``; between judgements a client keeps
its last score.

Imports numpy and pydantic only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from detectors._ring import push_ring
from detectors._state import (
    FieldSpec,
    check_ring_counters,
    check_window,
    group_rows,
    push_window,
    window_fields,
)
from detectors.base import Detector, DetectorParams, DetectorScore

logger = logging.getLogger(__name__)

FEATURES = ("log10 rate", "burstiness", "regularity", "error share", "rejection share")
_FLOORS = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
"""Smallest standard deviation used per feature, so a baseline where every
honest client sent without errors (variance 0) does not turn one error into
an infinite z-score. In the features' own units."""


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
    counted, so a request's rows are one arrival."""
    gaps = np.diff(times, axis=1)
    valid = np.isfinite(gaps) & (gaps > 0)
    count = valid.sum(axis=1)
    safe = np.where(valid, gaps, np.nan)
    span = np.nansum(safe, axis=1)
    rate = np.log10(np.maximum(count, 1) / np.maximum(span, 1e-3))
    # Moments and median from sums and one sort (NaN sorts last), not
    # nanmean/nanstd/nanmedian: nanmedian along an axis goes through masked
    # arrays and cost more than the rest of the detector.
    filled = np.maximum(count, 1)
    mean = np.where(count > 0, span / filled, 0.0)
    deviation = np.where(valid, gaps - mean[:, None], 0.0)
    std = np.sqrt((deviation * deviation).sum(axis=1) / filled)
    cv = np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), 0.0)
    ordered = np.sort(safe, axis=1)
    rows = np.arange(len(gaps))
    low = ordered[rows, (filled - 1) // 2] if gaps.shape[1] else np.zeros(0)
    high = ordered[rows, filled // 2] if gaps.shape[1] else np.zeros(0)
    median = np.where(count > 0, (low + high) / 2.0, 0.0)
    with np.errstate(invalid="ignore"):
        near = np.abs(safe - median[:, None]) <= tolerance * median[:, None]
    regular = np.where(
        count > 0, (near & valid).sum(axis=1) / np.maximum(count, 1), 0.0
    )
    return np.stack([rate, np.nan_to_num(cv), regular], axis=1)


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
        # Honest running mean and sum of squared deviations per feature, as
        # Python floats: the judgement loop below is sequential (each one may
        # teach the baseline the next one is judged by), and River's Var
        # objects and 1 x 5 numpy calls cost more than the arithmetic.
        self._mean = [0.0] * len(FEATURES)
        self._m2 = [0.0] * len(FEATURES)
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
        if n < 2:
            return list(self._mean), [0.0] * len(FEATURES)
        return list(self._mean), [math.sqrt(max(m2 / (n - 1), 0.0)) for m2 in self._m2]

    def _learn_one(self, values: list[float]) -> None:
        self._learned += 1
        n = self._learned
        for i, value in enumerate(values):
            old = self._mean[i]
            new = old + (value - old) / n
            self._mean[i] = new
            self._m2[i] += (value - old) * (value - new)

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

    @staticmethod
    def _z(
        features: npt.NDArray[np.float64],
        spread: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """Per row of ``features`` (n, 5): the largest suspicious-direction
        z-score (at least 0) and the feature giving it."""
        z = (features - spread[0]) / spread[1]
        z[:, 1] = np.abs(z[:, 1])  # burstiness: bursts and metronomes both stand out
        best = np.argmax(z, axis=1)
        return np.maximum(z[np.arange(len(z)), best], 0.0), best

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
        groups = group_rows(slots)
        order = groups.order
        windows, lengths = push_ring(
            arrays["times"],
            arrays["times_pos"],
            arrays["times_len"],
            groups,
            times[order],
            np.nan,
        )
        seen = arrays["n_seen"][groups.unique][groups.group] + groups.position + 1
        arrays["n_seen"][groups.unique] += groups.size

        # The client's last judgement before this batch, held by its rows
        # until a judgement in the batch replaces it.
        old_score = arrays["score"][groups.unique][groups.group]
        old_warm = arrays["warm"][groups.unique][groups.group].astype(bool)
        old_feats = arrays["features"][groups.unique][groups.group]
        new_score = np.zeros(n)
        new_warm = np.zeros(n, dtype=bool)
        new_feats = np.zeros((n, len(FEATURES)))

        # Judgements, in row order because each may teach the baseline.
        judged = np.flatnonzero((seen % p.stride == 0) & (lengths >= p.min_queries))
        if len(judged):
            feats = np.zeros((len(judged), len(FEATURES)))
            feats[:, :3] = _features(windows[judged], p.regular_tolerance)
            judged_slots = groups.slot[judged]
            for column, name in ((3, "errored"), (4, "rejected")):
                filled = np.maximum(arrays[f"{name}_len"][judged_slots], 1)
                feats[:, column] = arrays[name][judged_slots].sum(axis=1) / filled
            floors = _FLOORS.tolist()
            rows_of = judged.tolist()
            learn_of = learn[order[judged]].tolist()
            values_of = feats.tolist()
            means, stds = self._moments()
            for k in np.argsort(order[judged], kind="stable").tolist():
                values = values_of[k]
                z = 0.0
                for i, value in enumerate(values):
                    zi = (value - means[i]) / max(stds[i], floors[i])
                    # burstiness: bursts and metronomes both stand out
                    z = max(z, abs(zi) if i == 1 else zi)
                row = rows_of[k]
                new_score[row] = z / (z + p.z_half)
                new_warm[row] = self._learned >= p.min_baseline
                new_feats[row] = feats[k]
                if learn_of[k]:
                    # Only clients in good standing teach what honest is.
                    self._learn_one(values)
                    means, stds = self._moments()

        marker = np.full(n, -1, dtype=np.int64)
        marker[judged] = judged
        latest = np.maximum.accumulate(marker) if n else marker
        fresh = latest >= groups.start[groups.group]
        pick = np.where(fresh, latest, 0)
        score = np.where(fresh, new_score[pick], old_score)
        warm = np.where(fresh, new_warm[pick], old_warm)
        held = np.where(fresh[:, None], new_feats[pick], old_feats)
        last = groups.start + groups.size - 1
        arrays["score"][groups.unique] = score[last]
        arrays["warm"][groups.unique] = warm[last]
        arrays["features"][groups.unique] = held[last]

        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        score, warm, held = score[inverse], warm[inverse], held[inverse]
        # Evidence against the baseline as it stands after the batch.
        spread = self._spread()
        honest_means = spread[0]
        zs, best = self._z(held, spread)
        window = p.window

        def evidence(row: int) -> str:
            if score[row] <= 0.0:
                return "sending pattern like honest clients'"
            b = int(best[row])
            return (
                f"{FEATURES[b]} {held[row, b]:.3g} against honest "
                f"{honest_means[b]:.3g} (z {zs[row]:.1f}) over the last {window} "
                "requests"
            )

        return self._scores(score, warm, evidence)
