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
against ``cohort_match_rate``) flags the members that match too
(:mod:`detectors._trafficcohort`).

Cost: a client is judged, and the baseline learns from it, only every
``stride`` requests; between judgements it keeps its last score. Pushing the
times, measuring the judged windows and judging run as two compiled loops
over the batch in row order (:mod:`detectors._traffickernels`), with
numpy's ``log10`` between them.

This module holds the detector: its per-client state, the honest
baseline, the solo test, and how the three tests become one score with
its evidence. The compiled loops and the cohort test live in the two
modules named above, the parameters in :mod:`detectors._trafficparams`.
Imports numpy, :mod:`detectors._binomial`, those three modules and
:mod:`detectors._state` only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detectors._binomial import binomial_z
from detectors._cohortindex import CohortIndex
from detectors._state import (
    FieldSpec,
    check_counters,
    check_ring_counters,
    check_window,
    group_rows,
    push_window,
    window_fields,
)
from detectors._trafficcohort import CohortEvidence, cohort_evidence
from detectors._traffickernels import (
    N_STATS,
    SOLO_NEAR,
    TIME_RESOLUTION_S,
    judge,
    log_rate,
    push_and_measure,
)
from detectors._trafficparams import TrafficParams as TrafficParams
from detectors.base import Detector, DetectorScore, LiveBaseline
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


STALL_S: float = TrafficParams.model_fields["stall_s"].default
"""The default of :attr:`TrafficParams.stall_s`."""

_MAX_COHORT_SCORE = 0.999
"""Scores stay below 1, as ``z / (z + z_half)`` does."""


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
    ``strong_member_z`` (2, with at least
    :data:`~detectors._trafficcohort.STRONG_MIN_MATCHES` matching pairs: 2
    of 3, 3 of 5): its pooled z must reach
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
    - a gap that follows an answer more than ``stall_s`` late is
      measured from that answer (the client was waiting for the gateway);
      a broker that stalls stamps the requests producers held back all
      at once, and that burst is the broker's, unrecognised here (after a
      15 s broker stop two open-loop honest keys were blocked on
      regularity 1);
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
            "stall_s",
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
        # Young keys kept across batches for the cohort look-up; None sorts
        # them per batch instead (the reference tests and the benchmark
        # compare it with).
        self._cohort_index: CohortIndex | None = CohortIndex(5)

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
            # requests (see push_and_measure).
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
        stats = np.empty((n, N_STATS))
        m = push_and_measure(
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
            TIME_RESOLUTION_S / p.cohort_tolerance,
            arrays["answered_s"],
            p.stall_s,
            judged,
            stats,
        )
        features = np.empty((m, len(FEATURES)))
        features[:, 0] = log_rate(stats[:m])
        features[:, 1:] = stats[:m, 2 : 1 + len(FEATURES)]
        solo_judged = self._solo_z(stats[:m, 0], stats[:m, SOLO_NEAR])

        # Judgements, and every row's judgement held since its client's last.
        out = np.empty((n, 3 + len(FEATURES)))
        self._learned = judge(
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
        z = binomial_z(
            np.where(counted, near, 0).astype(np.int64),
            np.where(counted, gaps, 0).astype(np.int64),
            p.solo_match_rate,
        )
        return np.ascontiguousarray(z, dtype=np.float64)

    def _cohort_evidence(self, slots: npt.NDArray[np.int64]) -> CohortEvidence:
        """Per row: the pooled z of the key's cohort and the counts behind it
        (:func:`detectors._trafficcohort.cohort_evidence`)."""
        assert self._arena is not None
        index = (
            None if self._cohort_index is None else (self._cohort_index, self._arena)
        )
        return cohort_evidence(self._arena.arrays, slots, self._params, index)
