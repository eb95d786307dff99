"""Out-of-distribution detector: extraction queries that do not look like data.

Learning-based model extraction (random or synthetic queries, Papernot et al.'s
Jacobian augmentation, off-domain "knockoff" sets) sends inputs unlike the
traffic a model normally serves. A shared Half-Space Trees model (River) learns
what normal queries look like from reference data and from clients in good
standing; each client is scored by the share of its recent queries the model
finds anomalous, so random or synthetic queries stand out from the first few.

The per-row work (the trees in :mod:`detectors._hst`, the lattice and range
checks, the per-client counters) runs in compiled loops, row by row in
arrival order, so a batch ends exactly where its rows sent one at a time would.

This module holds the detector: the shared trees and the tracked honest
rate, the per-client windows and counters, and how they become a score
with its evidence. The lattice, range and repeat checks are in
:mod:`detectors._oodrows`, the cohort test in :mod:`detectors._oodcohort`,
the per-client counters' loop and the stored state's checks and migration
in :mod:`detectors._oodstate`, the parameters in :mod:`detectors._oodparams`.

Imports numpy, scipy (the binomial tail, :mod:`detectors._binomial`),
River (through :mod:`detectors._hst`), the four modules above,
:mod:`detectors._state` and ``traffic``'s time bound only; nothing from
Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detectors._binomial import upper_tail
from detectors._cohortindex import CohortIndex
from detectors._hst import HalfSpaceForest
from detectors._oodcohort import cohort_evidence
from detectors._oodparams import OodParams as OodParams
from detectors._oodrows import (
    MAX_HALF_WIDE_RATE,
    Lattice,
    counted_outliers,
    half_wide_rate,
    outside_counts,
)
from detectors._oodstate import check_state, client_counts, with_off_lattice_ring
from detectors._state import (
    FieldSpec,
    LayoutMigration,
    group_rows,
    push_window,
    window_fields,
)
from detectors.base import Detector, DetectorScore, LiveBaseline
from detectors.baselines import (
    MAX_SAMPLES,
    BaselineRefused,
    check_fields,
    read_field,
)
from detectors.traffic import MAX_TIME_S

logger = logging.getLogger(__name__)

# Calibrate on rows outside the current reference window when at least this
# many exist; rows inside it score lower because they built the masses.
_MIN_CALIBRATION_ROWS = 100

HONEST_RATE_PRIOR_ROWS = 1000
"""Weight, in learned rows, of ``honest_rate`` in the tracked honest outlier
rate: the first thousand rows of clients in good standing move it little, so
an early burst of odd traffic cannot lower or raise it much."""

HONEST_RATE_CAP = 0.1
"""Highest honest outlier rate the tracked estimate may reach: clients in
good standing include attackers not yet flagged, and an estimate they pushed
up would make every count look ordinary."""


class OutOfDistributionDetector(Detector[OodParams]):
    """Share of a client's recent queries that fall outside normal traffic.

    A shared ``river.anomaly.HalfSpaceTrees`` model (its masses counted in
    numpy, see :mod:`detectors._hst`; scores equal River's ``score_one``) gives
    each query an anomaly score in [0, 1]. A query is an *outlier* when its
    score exceeds ``query_threshold``, calibrated by :meth:`learn_baseline` so
    that about ``1 - calibration_quantile`` of normal queries are. The client
    score is the share of outliers among its last ``window`` queries, counted
    only when so many outliers are unlikely for an honest client (binomial
    upper tail at most ``significance`` at the honest outlier rate, tracked
    from clients in good standing; else the score is 0) or the client sent
    an off-lattice query; a running mean (EWMA) of the raw scores is
    reported in the evidence.

    A query is also an outlier when it is *off the lattice*: many features
    whose reference values are quantised (pixel intensities 0..16,
    categorical codes) hold a value between the levels (by more than
    ``lattice_tolerance``). Real inputs keep their quantisation; synthesized
    ones (perturbations for equation solving, interpolations, gradient steps,
    random or natural-image patches) do not. This evidence is strong enough
    to judge a client from its first such query: a client with one is warm
    at once, so a thief spreading a few queries over each of many keys is
    still judged per key. Measured offline on the evaluation's zoo (60 honest
    held-out replays of 300 queries per model, 30% near-duplicate runs with
    0.5% noise): no honest query had more than 2 of 64 digits pixels or 1 of
    9 phishing features off; equation-solving queries had a median of 8-9
    (digits) and 3-6 (phishing).

    A run of off-lattice queries is refused on its count: a client with
    ``lattice_block`` (3) of them among its last ``window`` queries scores
    ``lattice_block_level`` (the policy's default block level) however many
    real inputs sit beside them, so a thief that opens with real inputs and
    then synthesizes (Papernot et al.'s seed set, then augmentation) is
    refused at its third synthetic query, not when its share catches up.

    A query is also an outlier when it is *wide*: at least
    ``range_min_features`` features lie outside the reference's range (by
    more than ``range_tolerance``), unless it is a repeat (below). Weaker
    evidence than the lattice: on the evaluation's breast-cancer model 1.2%
    of honest held-out queries are wide (new patients beyond the training
    range), against 70% of equation-solving queries (perturbations of 0.05
    raw push the narrowest features, 0.002 to 0.05 wide, far past their
    range). So a
    client is warm early only after ``range_early`` (3) counted wide queries,
    which an honest client meets with a chance of about 1e-4 among its first
    ten; a thief's key with three or four queries is then judged.

    Repeats. The binomial test assumes a client's queries are independent;
    an honest client re-sending one input is not: in the evaluation (seed 1)
    a client re-submitted one held-out digit that the trees find unusual (as
    0.7% of held-out digits are) in a run of near-duplicates, and 4 of its
    first 8 queries were outliers, which blocked it at once. So an on-lattice
    outlier (HST or wide) within ``range_repeat_eps`` (RMS per feature, 0.05,
    ten times the evaluation's re-send noise) of its client's previous
    *counted* one is not counted (neither as an outlier nor as wide);
    compared on the stored 8-bit grid, so a batch counts as its rows one at
    a time. Off-lattice queries always count and never become the row
    repeats are measured from. Offline replays of the evaluation's 60 honest
    digits clients (``tests/detectors/ood_repeat_sim.py``, seeds 0-9, ``ood``
    alone): 2 flagged (1 blocked) before, none after. What a thief gains is
    little: a repeat is an input whose answer it already has (give or take
    5% per feature); random and Knockoff queries lie far apart (uniform
    images about 0.4 RMS), HopSkipJump's and Boundary's are off the lattice,
    and only the previous counted outlier is remembered, so alternating
    between two unusual inputs counts every query.

    Cohorts. Spread over ten keys (round-robin, keys sent at once), equation
    solving gives each key about three queries: a key whose three are not
    all counted wide is never judged alone, and in the evaluation (seed 2)
    four keys of ten never were, so the thief got all 31 answers. Its keys
    start within a fraction of a second of each other and send at one pace,
    so young keys (at most ``window`` queries) whose first queries came
    within ``cohort_window_s`` (0.25 s) of each other and whose query counts
    are within ``cohort_pace_share`` (20%, at least 2) pool their outlier
    counts (every outlier in their windows: HST, off-lattice, wide). A young
    key with evidence of its own (``cohort_min_own``: one counted wide or
    off-lattice query, and an outlier count whose tail at the honest rate is
    at most ``cohort_member_tail``, 0.05: one of its first one or two
    queries, two of its first 18 or so) whose cohort has ``cohort_min_keys``
    (3) keys and a pooled count with a tail of at most
    ``cohort_significance`` (1e-4) is scored by the cohort's pooled share.
    That share is on the scale of the key's own: a cohort of thief keys
    (about 70% wide) is past the policy's default block level (1.5 times
    ``threshold``, a share of 0.45) from its first queries; an honest
    cohort's share (about 2%) is far below the flag, and its count rarely
    passes the tail test anyway. Membership depends on time and pace only,
    so an honest cohort is as honest as one key. Measured offline on the
    zoo's breast-cancer model (``tests/detectors/ood_cohort_sim.py``, seeds
    0-4, 4 queries per second per key): the thief got 1 to 12 of its 31
    answers before every key was refused (24 to 31 without the cohort test,
    all 31 at seed 2 with 4 keys never refused); a worker restart making
    2,000 honest keys young within one second flagged none.

    Score: in [0, 1], higher is more suspicious; at the default calibration an
    honest client's expected score is about 0.005. Flagged at ``threshold``
    once ``min_queries`` queries have been seen (or one off-lattice query)
    and a baseline exists.

    Only rows whose ``learn`` flag is true (clients in good standing) update the
    baseline, so a flagged client never shapes what normal means.

    When it is weak:

    - calibration depends on the baseline sample: a reference sample unlike
      live traffic (another population, sorted by class so the last window is
      one class) makes honest queries look anomalous; the gateway should pass
      a representative sample, which :meth:`learn_baseline` shuffles;
    - HST separates well only when anomalies are spread out: synthetic queries
      close to real data (Jacobian augmentation with small steps, natural
      images from a nearby domain) or noise added to real inputs can score as
      normal, and anomalies packed together, once learned from, become normal;
    - the masses reflect only the last ``window_size`` learned rows, and a
      client that stays in good standing while sending odd queries slowly
      shifts the baseline toward them;
    - in pure River, HST costs tens of µs per query (about 26 µs to score,
      21 µs to learn and 5 µs to build the dict here); the numpy mirror brings
      it to about 5 µs per query in batches of 500, but a batch of one row
      still pays about 0.2 ms of numpy call overhead;
    - each worker learns its own trees' masses; they are neither part of
      the per-client state handed over on rebalance nor of the live
      baseline a worker saves (only the tracked honest rate's counts are:
      :meth:`export_baseline`), so a restarted worker's masses start again
      from the reference sample;
    - the lattice check assumes honest inputs are the quantised values
      themselves, give or take small noise: a deployment whose clients send
      rescaled or noisier versions of quantised data must widen
      ``lattice_tolerance`` or set ``lattice_levels=0``; and it sees nothing
      on continuous features (breast cancer); there only the range check
      applies, which misses perturbations that stay inside the data's range.
    - the repeat rule forgets nothing but the previous counted outlier's
      place: a thief whose unusual queries each move under
      ``range_repeat_eps`` (0.05 RMS) from its last counted one (on digits,
      one pixel changed by under 0.4 of its range) has those steps
      uncounted; one-pixel queries were no ``ood`` outliers in the
      evaluation either way, and off-lattice steps always count;
    - the cohort test flags honest keys that start with a thief's: an
      honest key whose first query came within ``cohort_window_s`` of an
      equation-solving cohort's, at its pace, and that sent a wide query
      among its first one or two is scored by the thief's pooled share;
      measured 7 of 400 such honest keys flagged (3 of them blocked, the
      pooled share past 1.5 times the threshold), with 20 honest keys
      started in the same quarter second as each of 20 attacks;
    - honest keys at a thief's pace dilute its pool: in the same runs the
      thief got 0 to 29 of its 31 answers (median 15.5) instead of 1 to 12;
    - the cohort test pools only the keys one worker holds (a client's
      requests go to one partition by key), only keys that started within
      ``cohort_window_s`` of each other, and only their first ``window``
      queries; a thief staggering its keys' starts by more, or giving each
      key a different rate, is left to each key's own test;
    - the counts are read after the whole batch, so every row of a key in
      one batch gets one cohort verdict; a worker restarted without state
      makes every live key young at once (keys are then pooled by the
      restart, not by when they started).

    Per-client state: rings of ``window`` outlier and off-lattice bits,
    counters, the EWMA, the first query's time and the last counted outlier
    at 8 bits per feature with a flag saying whether there is one (about 177
    bytes plus one per feature). The shared model holds about 200 KB with the defaults.
    A state saved by the release before ``lattice_block`` (no ring of
    off-lattice bits) is migrated on load, its ring derived from its counters
    (see :func:`detectors._oodstate.with_off_lattice_ring`; lattice_block may
    then fire later for up to one window).

    Parameters
    ----------
    params
        Validated parameters; defaults when omitted.
    seed
        Seed of the trees' random split features and thresholds.
    """

    name: ClassVar[str] = "ood"
    Params: ClassVar[type[OodParams]] = OodParams
    _mutable_params: ClassVar[frozenset[str]] = frozenset(
        {
            "query_threshold",
            "calibration_quantile",
            "threshold",
            "min_queries",
            "ewma_alpha",
            "honest_rate",
            "significance",
            # Read at scoring only; lattice_levels is not here because the
            # lattice is found from the reference at start.
            "lattice_tolerance",
            "lattice_share",
            "lattice_min_features",
            "lattice_block",
            "lattice_block_level",
            "range_min_features",
            "range_tolerance",
            "range_early",
            "range_repeat_eps",
            "cohort_window_s",
            "cohort_pace_share",
            "cohort_min_keys",
            "cohort_min_own",
            "cohort_member_tail",
            "cohort_significance",
        }
    )

    def __init__(self, params: OodParams | None = None, *, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        self._forest: HalfSpaceForest | None = None
        self._calibrated_threshold: float | None = None
        # Lattice features and their levels (see _learn_lattice).
        self._lattice = Lattice.empty()
        # The reference's range per feature (None before a baseline).
        self._range_low: npt.NDArray[np.float64] | None = None
        self._range_high: npt.NDArray[np.float64] | None = None
        # Rows of clients in good standing judged since the baseline, and how
        # many of them were outliers: the tracked honest outlier rate.
        self._learned_rows = 0
        self._learned_outliers = 0
        # Per row of the last score_batch call, whether it counted as an
        # outlier (HST, off-lattice or wide, after the repeat rule): the
        # gateway's region links (detectors.region) store only those rows.
        self.last_outliers: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        # And the share of outliers in its client's window after it.
        self.last_window_share: npt.NDArray[np.float64] = np.zeros(0)
        # Young keys kept across batches for the cohort look-up; None sums
        # and sorts them per batch instead (the reference tests and the
        # benchmark compare it with).
        self._cohort_index: CohortIndex | None = CohortIndex(2)

    @property
    def honest_rate(self) -> float:
        """The per-query outlier rate counts are judged against: the tracked
        rate of clients in good standing (with ``honest_rate`` as a prior of
        ``HONEST_RATE_PRIOR_ROWS`` rows), at least ``honest_rate`` and at most
        ``HONEST_RATE_CAP``."""
        return float(
            self._rate(
                np.array([self._learned_rows]), np.array([self._learned_outliers])
            )[0]
        )

    def _export_live(self) -> LiveBaseline:
        """The tracked honest outlier rate's counts (rows, outliers). The
        trees' masses are not part of it (see the class)."""
        counts = np.array([self._learned_rows, self._learned_outliers], dtype="<i8")
        rows = self._learned_rows
        return {"counts": counts.tobytes()}, rows, rows >= HONEST_RATE_PRIOR_ROWS

    def _import_live(
        self, fields: Mapping[str, bytes], samples: int
    ) -> Callable[[], None]:
        check_fields(fields, ("counts",))
        rows, outliers = read_field(fields, "counts", "<i8", length=2).tolist()
        if rows != samples or not 0 <= outliers <= rows:
            raise BaselineRefused(
                "invalid",
                f"{self.name}: {outliers} outliers of {rows} rows "
                f"({samples} samples) is not a count",
            )

        def apply() -> None:
            # Disjoint rows of other clients: the counts add.
            self._learned_rows = min(self._learned_rows + rows, MAX_SAMPLES)
            self._learned_outliers = min(
                self._learned_outliers + outliers, self._learned_rows
            )

        return apply

    def _rate(
        self, rows: npt.NDArray[np.int64], outliers: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """The honest outlier rate after ``rows`` learned rows holding
        ``outliers`` outliers (see :attr:`honest_rate`)."""
        prior = self._params.honest_rate
        tracked = (outliers + HONEST_RATE_PRIOR_ROWS * prior) / (
            rows + HONEST_RATE_PRIOR_ROWS
        )
        return np.clip(tracked, prior, max(prior, HONEST_RATE_CAP))

    @property
    def lattice_features(self) -> npt.NDArray[np.int64]:
        """Indices of the features checked against their reference levels."""
        return self._lattice.features

    @property
    def query_threshold(self) -> float | None:
        """The outlier threshold in force: set, calibrated, or none yet."""
        if self._params.query_threshold is not None:
            return self._params.query_threshold
        return self._calibrated_threshold

    @property
    def baseline_nbytes(self) -> int:
        """Bytes of the shared model (not per client)."""
        return 0 if self._forest is None else self._forest.nbytes

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        return {
            **window_fields("outlier", self._params.window, "u1"),
            # Which of those outliers were off the lattice (lattice_block).
            **window_fields("off_lattice", self._params.window, "u1"),
            "n_seen": FieldSpec((), "<i8"),
            "ewma": FieldSpec((), "<f8"),
            "n_off_lattice": FieldSpec((), "<i8"),
            "n_wide": FieldSpec((), "<i8"),
            # The client's previous counted on-lattice outlier (HST or wide)
            # at 8 bits per feature, and whether it has one: repeats of it
            # do not count (see _counted_outliers).
            "last_outlier": FieldSpec((n_features,), "u1"),
            "has_outlier": FieldSpec((), "u1"),
            # Arrival time of the client's first query (seconds; 0 before
            # it), which dates it for the cohort test.
            "first_s": FieldSpec((), "<f8"),
        }

    def _migrations(self, n_features: int) -> list[LayoutMigration]:
        # The release before lattice_block kept no ring of off-lattice bits;
        # its states are read with one derived from its counters.
        before = {
            name: spec
            for name, spec in self._layout(n_features).items()
            if not name.startswith("off_lattice")
        }
        return [LayoutMigration(before, with_off_lattice_ring)]

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        check_state(values, self._params.window)

    def _on_n_features(self, n_features: int) -> None:
        params = self._params
        self._forest = HalfSpaceForest(
            n_features,
            n_trees=params.n_trees,
            height=params.height,
            window_size=params.window_size,
            seed=self._seed,
        )

    def _learn_baseline(self, X: npt.NDArray[np.float64]) -> None:
        """Learn reference rows (shuffled with the seed), then calibrate.

        Raises
        ------
        ValueError
            If no reference window has been completed, so nothing can be scored.
        """
        forest = self._forest
        assert forest is not None
        self._learn_lattice(X)

        # Shuffle so the last window, which becomes the reference masses, is a
        # sample of the whole set even if the caller's rows are sorted.
        rows = X[np.random.default_rng(self._seed).permutation(len(X))]
        window_of_row = forest.n_pivots + (forest.counter + np.arange(len(rows))) // (
            forest.window_size
        )
        forest.process(rows, np.ones(len(rows), dtype=bool))
        if not forest.ready:
            raise ValueError(
                f"{self.name}: the baseline needs at least window_size="
                f"{forest.window_size} rows in total, got {len(rows)}"
            )

        # Score the reference rows against the masses now in force; rows of the
        # reference window itself are held out of the quantile when possible.
        outside = window_of_row != forest.n_pivots - 1
        sample = rows[outside] if outside.sum() >= _MIN_CALIBRATION_ROWS else rows
        scores = forest.score(sample)
        self._calibrated_threshold = float(
            np.quantile(scores, self._params.calibration_quantile)
        )
        logger.debug(
            "ood baseline learned from %d rows; outlier threshold %.4f",
            len(rows),
            self._calibrated_threshold,
            extra={"detector": self.name},
        )

    def _learn_lattice(self, X: npt.NDArray[np.float64]) -> None:
        """Find the quantised features of the reference and their levels, and
        whether its range says where honest queries lie."""
        self._range_low, self._range_high = None, None
        if self._range_is_informative(X):
            self._range_low = X.min(axis=0)
            self._range_high = X.max(axis=0)
        self._lattice = Lattice.learn(X, self._params.lattice_levels)

    def off_lattice(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Per row, how many lattice features lie off their reference levels."""
        return self._lattice.off(self._feature_rows(X), self._params.lattice_tolerance)

    def _feature_rows(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``X`` as C-ordered float64 rows for the compiled checks.

        Raises
        ------
        ValueError
            If ``X`` is not (n, d) with this detector's ``d`` once it has one:
            the compiled loops read features by index, unchecked (before a
            baseline there is nothing to read).
        """
        rows = np.ascontiguousarray(X, dtype=np.float64)
        d = self._n_features
        if rows.ndim != 2 or (d is not None and rows.shape[1] != d):
            raise ValueError(
                f"{self.name}: rows of shape {rows.shape}, not (n, {self._n_features})"
            )
        return rows

    def _range_is_informative(self, X: npt.NDArray[np.float64]) -> bool:
        """Whether the reference's range says where honest queries lie: the
        rows of one random half must rarely be wide against the other half's
        range (a small or thin reference puts many honest inputs outside)."""
        p = self._params
        if p.range_min_features == 0:
            return False
        rate = half_wide_rate(X, p, self._seed)
        if rate > MAX_HALF_WIDE_RATE:
            logger.warning(
                "ood range check off: %.1f%% of one half of the %d reference rows "
                "are wide against the other half's range",
                100.0 * rate,
                len(X),
                extra={"detector": self.name},
            )
            return False
        return True

    def outside_range(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Per row, how many features lie outside the reference's range."""
        if self._range_low is None or self._range_high is None:
            return np.zeros(len(X), dtype=np.int64)
        return outside_counts(
            self._feature_rows(X),
            self._range_low,
            self._range_high,
            self._params.range_tolerance,
        )

    def _counted_outliers(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        hst: npt.NDArray[np.bool_],
        synthetic: npt.NDArray[np.bool_],
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """HST-outlier and wide queries that count after the repeat rule, and
        the wide ones among them (:func:`detectors._oodrows.counted_outliers`),
        with wide queries found against the reference's range."""
        wide = np.zeros(len(X), dtype=bool)
        p = self._params
        if p.range_min_features > 0:
            wide = self.outside_range(X) >= p.range_min_features
        arrays = None if self._arena is None else self._arena.arrays
        return counted_outliers(arrays, slots, X, hst, synthetic, wide, p)

    def _synthetic(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        """Rows off the lattice in enough features to be synthesized."""
        n_lattice = len(self._lattice.features)
        if n_lattice == 0:
            return np.zeros(len(X), dtype=bool)
        p = self._params
        needed = max(p.lattice_min_features, int(np.ceil(p.lattice_share * n_lattice)))
        if needed > n_lattice:
            return np.zeros(len(X), dtype=bool)
        return np.asarray(self.off_lattice(X) >= needed)

    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        forest = self._forest
        assert forest is not None and self._arena is not None
        arrays = self._arena.arrays
        params = self._params
        n = len(slots)

        # Shared baseline: score every row, learn the good-standing ones.
        raw = forest.process(X, learn)
        query_threshold = self.query_threshold
        judged = forest.ready and query_threshold is not None
        if judged and query_threshold is not None:
            outlier = raw > query_threshold
        else:
            outlier = np.zeros(n, dtype=bool)
        synthetic = self._synthetic(X)
        counted, wide = self._counted_outliers(slots, X, outlier, synthetic)
        outlier = counted | synthetic
        self.last_outliers = outlier

        # Outlier bits into each client's window, in arrival order.
        groups = group_rows(slots)
        counts, lengths = push_window(
            arrays["outlier"],
            arrays["outlier_pos"],
            arrays["outlier_len"],
            groups,
            outlier[groups.order],
        )
        off_counts, _ = push_window(
            arrays["off_lattice"],
            arrays["off_lattice_pos"],
            arrays["off_lattice_len"],
            groups,
            synthetic[groups.order],
        )
        inverse = np.empty(n, dtype=np.int64)
        inverse[groups.order] = np.arange(n)
        # Queries, off-lattice and counted wide queries so far per row (its
        # client's counts after it), and the running mean anomaly score.
        arrival_s = (
            np.full(n, time.time()) if self._arrival_s is None else self._arrival_s
        )
        seen, off_rows, wide_rows, ewma = client_counts(
            slots,
            raw,
            synthetic,
            wide,
            np.clip(arrival_s, -MAX_TIME_S, MAX_TIME_S),
            arrays["n_seen"],
            arrays["n_off_lattice"],
            arrays["n_wide"],
            arrays["ewma"],
            arrays["first_s"],
            params.ewma_alpha,
        )

        # One score per row.
        counts = counts[inverse]
        lengths = lengths[inverse]
        off_counts = off_counts[inverse]
        self.last_window_share = counts / np.maximum(lengths, 1)
        if judged:
            # How unlikely each window's count is for an honest client
            # (binomial upper tail at the honest rate, as it stood before this
            # batch): a share from a few queries is noise, 2 chance outliers
            # of 5 are a share of 0.4.
            # The rate is learned from established clients in good standing
            # only: past their first `window` queries. In the evaluation the
            # keys of distributed attacks, each in good standing for its
            # first few queries, had pushed breast cancer's rate from 0.03 to
            # 0.08 (each key's first wide queries counted as honest).
            # Off-lattice rows are judged at once, not by count, and their
            # clients are about to be flagged: they tell nothing of the
            # honest rate. Each row is judged at the rate as it stood just
            # before it, so a batch scores as its rows sent one at a time.
            counted = (learn & ~synthetic & (seen > params.window)).astype(np.int64)
            rows_before = self._learned_rows + np.cumsum(counted) - counted
            hits = counted * outlier
            outliers_before = self._learned_outliers + np.cumsum(hits) - hits
            rate = self._rate(rows_before, outliers_before)
            self._learned_rows += int(counted.sum())
            self._learned_outliers += int(hits.sum())
            tail = upper_tail(counts, lengths, rate)
            unlikely = tail <= params.significance
            member = (
                (seen <= params.window)
                & (off_rows + wide_rows >= params.cohort_min_own)
                & (tail <= params.cohort_member_tail)
            )
            index = self._cohort_index
            cohort = cohort_evidence(
                arrays,
                slots,
                member,
                float(rate[0]),
                params,
                None if index is None else (index, self._arena),
            )

            def evidence(row: int) -> str:
                if from_run[row]:
                    return (
                        f"{off_counts[row]} of the last {lengths[row]} queries "
                        f"hold values between the levels real inputs take "
                        f"(off the lattice of the reference's quantised "
                        f"features), which honest inputs keep; "
                        f"{params.lattice_block} or more are refused; "
                        f"{counts[row]} of the {lengths[row]} are outliers in all"
                    )
                if from_cohort[row]:
                    return (
                        f"{cohort.outliers[row]} of the {cohort.rows[row]} queries "
                        f"of {cohort.keys[row]} keys whose first query came within "
                        f"{params.cohort_window_s:g} s of its own, at its pace, look "
                        f"unlike normal traffic (chance {cohort.tail[row]:.1e} for "
                        f"honest keys at an outlier rate of {rate[0]:.3f}); its "
                        f"own {counts[row]} of {lengths[row]}, {off_rows[row]} off "
                        f"the values real inputs take, {wide_rows[row]} outside "
                        f"their range"
                    )
                return (
                    f"{counts[row]} of the last {lengths[row]} queries look unlike "
                    f"normal traffic (anomaly score above {query_threshold:.3f}, "
                    f"or off the values real inputs take, or outside their range; "
                    f"{off_rows[row]} so far off them, {wide_rows[row]} outside; "
                    f"chance {tail[row]:.1e} for an honest client at an outlier "
                    f"rate of {rate[row]:.3f}"
                    # A fresh user read that chance as the reason for a
                    # score it played no part in.
                    + (
                        "; judged on the share alone, the chance aside: a "
                        "query off the values real inputs take is no chance "
                        "event"
                        if off_rows[row] > 0 and not unlikely[row]
                        else ""
                    )
                    + f"); this one {raw[row]:.3f}, running mean {ewma[row]:.3f}"
                )

            warm = (
                (seen >= params.min_queries)
                | (off_rows > 0)
                | (wide_rows >= params.range_early)
            )
            # Off-lattice queries are strong evidence, judged from the first;
            # otherwise the share counts only when the count behind it is
            # unlikely by chance (an honest client's score stays 0).
            share = np.where((off_rows > 0) | unlikely, counts / lengths, 0.0)
            # A young key with evidence of its own whose cohort's pooled
            # count is unlikely by chance is scored by the cohort's share: on
            # the scale of its own, so a cohort of equation-solving keys
            # (about 70% wide) reaches the block level (1.5 times the
            # threshold) and an honest cohort's share (about 2%) stays far
            # below the flag.
            from_cohort = cohort.share > np.where(warm, share, 0.0)
            share = np.where(from_cohort, cohort.share, share)
            warm = warm | from_cohort
            # A run of off-lattice queries is refused on its count, not its
            # share: a thief that opens with real inputs (Papernot et al.'s
            # seed set) dilutes its share for as long as those stay in the
            # window. Off-lattice counts are the key's own, so this also
            # wins over a cohort's share.
            run = (params.lattice_block > 0) & (off_counts >= params.lattice_block)
            run_share = min(params.lattice_block_level * params.threshold, 1.0)
            from_run = run & (run_share > share)
            from_cohort &= ~from_run
            share = np.where(from_run, run_share, share)
            return self._scores(share, warm, evidence)
        if self._cohort_index is not None:
            # Not judged, so no look-up noted this batch's keys, whose counts
            # grew: re-read at the next look-up.
            self._cohort_index.touch(slots)
        cold = [
            "no baseline of normal traffic yet (learn_baseline has not "
            "completed a window), so no query is judged"
        ] * n
        return self._scores(counts / lengths, np.zeros(n, dtype=bool), cold)
