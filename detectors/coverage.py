"""Coverage detector: a client exploring the input space and the decision
regions faster than honest use does.

After Kesarwani et al. ("Model Extraction Warning in MLaaS Paradigm", 2018),
who watch how much of a partition of the input space each user's queries
cover. Here the partition is a small k-means quantiser (``cells`` centroids)
fitted on the model's reference data; a query falls in its nearest cell, and
an answered query in the *decision region* (cell, predicted class). Honest
clients draw inputs like the reference data, so after ``n`` queries they cover
about ``E(n) = sum_c 1 - (1 - p_c)^n`` cells, with ``p_c`` the reference share
of cell ``c``; an extractor sweeping the space, or walking along class
boundaries, covers more cells, or more (cell, class) pairs, than that.

The decision-region part needs the model's answers, so it is counted in
:meth:`~detectors.base.Detector.observe_outputs` and judges the client's next
queries.

Each client's windows are rings in its state; compiled loops push each row's
cell (or region) and walk back over the window counting distinct values per
horizon, row by row in arrival order, instead of copying every row's window
out (:func:`detectors._ring.push_ring`'s layout, without the copies).

Imports numpy, pydantic and :mod:`detectors._jit` (numba) only; nothing from
Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from detectors._jit import jit
from detectors._state import (
    FieldSpec,
    check_counters,
    check_ring_counters,
    window_fields,
)
from detectors.base import Detector, DetectorParams, DetectorScore, LiveBaseline
from detectors.baselines import MAX_SAMPLES, BaselineRefused, check_fields, read_field

logger = logging.getLogger(__name__)

_CLASS_SLOTS = 256
"""Decision-region keys are ``cell * 256 + class`` (classes above 255 share)."""

MIN_SD = 1.0
"""Floor of the honest standard deviation in a score's denominator, in cells:
once coverage saturates its spread tends to 0, and one extra cell must not
then count as many deviations."""

MAX_SCORE = 10.0
"""Honest standard deviations that map to a score of 1 (the cap): scores
stay in [0, 1] like every detector's, and 0.45 reads as 4.5 deviations."""


class CoverageParams(DetectorParams):
    """Parameters of :class:`CoverageDetector`."""

    cells: int = Field(16, ge=4, le=255)
    """Cells of the input partition (k-means centroids on the reference)."""

    window: int = Field(64, ge=8, le=4096)
    """Recent queries (and answers) per client whose coverage is counted."""

    kmeans_iterations: int = Field(15, ge=1, le=200)
    """Lloyd iterations when fitting the partition."""

    threshold: float = Field(0.45, gt=0.0, le=1.0)
    """Score at which a client is flagged: 0.45 is 4.5 honest standard
    deviations above the expected coverage."""

    min_queries: int = Field(30, ge=1, le=100_000)
    """Queries (for the input part) or answers (for the decision part) a
    client must have had before that part can flag it."""

    live_min_answers: int = Field(512, ge=1, le=MAX_SAMPLES)
    """Answers to clients in good standing the live (cell, class) table must
    hold before the decision part's honest expectation comes from it rather
    than from the model's answers to the reference data."""

    live_min_clients: int = Field(3, ge=1, le=64)
    """Distinct clients (told apart by 64 bits of their slots) that must
    have taught a (cell, class) pair before it counts in the live
    expectation: a thief not yet flagged teaches pairs no honest client
    hits, which would raise the expectation and hide it."""

    live_answers_per_client: int = Field(64, ge=1, le=1_000_000)
    """Answers of each client that may teach the live table (its first):
    without a cap one unflagged thief sending hundreds of queries into
    cells honest clients seldom reach raised their share enough to hide
    itself (measured below); with it, ``live_min_answers`` also needs
    answers from several clients."""

    live_refresh_answers: int = Field(1024, ge=1, le=10_000_000)
    """Answers learnt between two recomputations of the decision part's
    expectation from the live table, or an eighth of the table if more
    (each costs :func:`coverage_sd`'s O(pairs^2 * window): 8.5 ms for 160
    pairs at the default window)."""


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
    return _nearest(np.ascontiguousarray(X @ centres.T), (centres**2).sum(axis=1))


@jit
def _nearest(
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


def _horizons(width: int) -> npt.NDArray[np.int64]:
    """The last 16, 32, 64, ... queries of a window of ``width``, and the
    whole window, ascending.

    Several horizons because coverage saturates: a sweep covers every cell
    in its first few dozen queries, and over a long window honest clients get
    there too; the short horizons see how fast it happened."""
    horizons = {min(h, width) for h in (16, 32, 64, 128, 256)} | {width}
    return np.array(sorted(horizons), dtype=np.int64)


@jit
def _window_growth(
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

    Walks the ring ``ring[slot]`` (the layout of :func:`_push_cell`) from the
    newest value (just before ``pos[slot]``) back over its ``length[slot]``
    filled cells, counting distinct values: a value ``v`` is new unless
    ``stamp[v] == mark`` (``mark`` must differ from every earlier call's on
    the same ``stamp``); a value outside ``stamp`` counts each time it occurs
    (only a corrupted state holds one, and ``_check_state`` refuses those).
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
def _push_cell(
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
def _score_windows(
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
    (:func:`_push_cell`); ``n_seen`` counts the client's queries. All are
    updated in place.

    Returns
    -------
    tuple of arrays
        Per row: the growth score of its window (:func:`_window_growth`),
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
        _push_cell(ring, pos, length, slot, cells[i])
        n_seen[slot] += 1
        growth[i], covered[i] = _window_growth(
            ring, pos, length, slot, expected, spread, horizons, stamp, i + 1
        )
        lengths[i] = length[slot]
        seen[i] = n_seen[slot]
    return growth, covered, lengths, seen


@jit
def _observe_windows(
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
    are judged by). Rings as in :func:`_score_windows`; ``n_answers`` counts
    answers. With an empty ``expected`` (no output baseline yet) the rings
    and counts advance and no score is set.
    """
    n = slots.shape[0]
    for i in range(n):
        slot = slots[i]
        _push_cell(ring, pos, length, slot, keys[i])
        n_answers[slot] += 1
    if expected.shape[0] == 0 or n == 0:
        return
    stamp = np.zeros(n_keys, dtype=np.int64)
    done = np.zeros(slots.max() + 1, dtype=np.bool_)
    for i in range(n):
        slot = slots[i]
        if not done[slot]:
            done[slot] = True
            region_score[slot] = _window_growth(
                ring, pos, length, slot, expected, spread, horizons, stamp, i + 1
            )[0]


@jit
def _teach_pairs(
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


class CoverageDetector(Detector[CoverageParams]):
    """How much more of the input partition, and of its decision regions, a
    client's last ``window`` queries cover than honest clients' would.

    With ``c`` the distinct cells among the client's last ``m`` queries and
    ``E(m)``, ``sd(m)`` the honest expectation and its standard deviation
    (exact for i.i.d. draws, :func:`coverage_sd`), the input part is
    ``(c - E(m)) / max(sd(m), MIN_SD)`` when ``c > E(m)``, else 0; the
    decision part is the same over (cell, predicted class) pairs among the
    last ``m`` answers, with ``E`` and ``sd`` from the model's answers to the
    reference data at first, then from live honest answers (below). The
    score is the larger part over the horizons of :func:`_horizons`.

    Live decision baseline: training data is answered more confidently and
    more correctly than new data, so honest clients replaying held-out data
    cover more (cell, class) pairs than the reference answers predict (an
    honest digits client reached 4.5 deviations, the threshold, in the
    2026-12-05 evaluations). So the detector counts the pairs of answers to
    clients in good standing (``learn``; a flagged client never teaches) in
    a table of at most ``cells`` x classes counters, and once it holds
    ``live_min_answers`` the decision part's ``E`` and ``sd`` come from it,
    recomputed every ``live_refresh_answers`` learnt (or an eighth of the
    table, if more). Two guards against a thief teaching it before it is
    flagged: each client teaches only its first ``live_answers_per_client``
    answers, and a pair counts only once ``live_min_clients`` clients taught
    it (else as the reference's share of it). The table is a live baseline
    (:meth:`export_baseline`): keys, counts, a 64-bit client mask per pair and
    the partition's digest, so a table from another partition is refused.

    Measured (``tests/detectors/coverage_live_sim.py``: the 60 honest
    clients of ``modelgate eval --models digits`` for seeds 0, 1, 2 on the
    digits MLP, plus one attacker of 400 queries from 30 s in): the largest
    honest decision-part excess went from 4.52, 4.02, 4.45 deviations to
    3.77, 3.62, 4.13, and the honest client flagged at seed 0 (index 38, the
    evaluation's ``benign-38``) no longer is. The price: the expectation is
    wider, so marginal thieves are caught later or not at all: uniform random
    queries first flagged at query 172, 212, 51 before and 201, none, 63
    after; active learning at 91, 166, none before and none, 190, none after
    (``ood`` and ``margin`` are what catch those in the evaluation).

    Why deviations and not the earlier ratio ``1 - E/c``: the ratio ignored
    how much honest coverage varies, and a 16-cell partition's honest spread
    is wide, so 22 of 60 honest clients replaying held-out data crossed a
    ratio threshold of 0.25 in a `modelgate eval` run (2026-12-04). Measured
    since (offline replay, 40 held-out clients per model of the evaluation's
    zoo, 250 queries each with the evaluation's near-duplicate habit): the
    largest honest excess was 4.0 deviations; the threshold is 4.5.

    Score: deviations over ``MAX_SCORE``, capped, in [0, 1]; higher is more
    suspicious. Cold until a partition exists and ``min_queries`` are seen.

    When it is weak:

    - ``E(m)`` assumes honest queries are independent draws from the
      reference distribution; a real client sends a narrower mix, so it
      scores low, and so does a thief that stays within the reference data's
      populated cells (a knockoff thief with natural data; ``prada`` and
      ``ood`` look at other things);
    - uniform random queries in a high-dimensional space fall in the few
      cells nearest the middle of the data, so the input part barely moves
      for them; their *decision* part moves, and ``ood`` flags them;
    - a thief spreading queries over many keys covers little per key (key
      linking fuses the group's risk);
    - the partition is fixed at start; a model whose inputs drift needs a
      restart to refit it;
    - at 16 cells honest replay reaches 15 cells in 16 queries, so a thief
      sweeping the cells one query each (about 3.9 deviations on digits) is
      not told apart from honest use; learning-based thieves on the
      evaluation's tabular models (random, active) reach at most about 4.2,
      so in practice this detector flags little beyond random queries on
      image models. More cells do not help: at 64 cells random queries fall
      into the central cells and score lower still.

    - the live table trusts clients in good standing: many keys of one
      thief (each teaching its first answers, together vouching for their
      pairs) can widen it; key linking and group risk are the answer there;
    - each recomputation costs :func:`coverage_sd`'s O(pairs^2 * window),
      8.5 ms for digits' 160 pairs but about 0.3 s at 1,000 pairs and 7 s at
      4,096 (16 cells of a 256-class model), paid in the batch that crosses
      the refresh point.

    Per-client state: a ring of ``window`` int16 cells, one of ``window``
    int32 regions and seven counters, 440 bytes at the default window.
    """

    name: ClassVar[str] = "coverage"
    Params: ClassVar[type[CoverageParams]] = CoverageParams
    _mutable_params: ClassVar[frozenset[str]] = frozenset({"threshold", "min_queries"})
    observes_outputs: ClassVar[bool] = True

    def __init__(self, params: CoverageParams | None = None, *, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        self._centres: npt.NDArray[np.float64] | None = None
        self._expected_in: npt.NDArray[np.float64] | None = None
        self._expected_dec: npt.NDArray[np.float64] | None = None
        self._sd_in: npt.NDArray[np.float64] | None = None
        self._sd_dec: npt.NDArray[np.float64] | None = None
        # The decision part's expectation from the reference answers, kept
        # so that it is what applies while the live table is too small.
        self._ref_dec: tuple[npt.NDArray[np.float64], ...] | None = None
        # Live (cell, class) counts of answers to clients in good standing:
        # rows are cells, columns classes (grown to the widest class seen,
        # at most _CLASS_SLOTS), so at most cells * classes counters.
        self._live_pairs = np.zeros((self._params.cells, 0), dtype=np.int64)
        # Per pair, bit ``slot % 64`` set for each client that taught it: a
        # cheap lower bound on how many distinct clients did.
        self._live_clients = np.zeros((self._params.cells, 0), dtype=np.uint64)
        # The reference answers' share of each pair, in the live table's
        # shape: what a pair too few clients taught counts as.
        self._ref_share = np.zeros((self._params.cells, 0))
        self._live_total = 0
        self._live_since_refresh = 0
        self._live_in_use = False

    @property
    def centres(self) -> npt.NDArray[np.float64] | None:
        """The partition's centroids, once fitted."""
        return self._centres

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        window = self._params.window
        return {
            **window_fields("cells", window, "<i2"),
            "n_seen": FieldSpec((), "<i8"),
            **window_fields("regions", window, "<i4"),
            "n_answers": FieldSpec((), "<i8"),
            "region_score": FieldSpec((), "<f8"),
        }

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        check_ring_counters(values, "cells", "cells_pos", "cells_len")
        check_ring_counters(values, "regions", "regions_pos", "regions_len")
        check_counters(values, "n_seen", "n_answers")
        # The compiled window walk indexes a table by these values.
        cells = self._params.cells
        for ring, limit in (("cells", cells), ("regions", cells * _CLASS_SLOTS)):
            if not np.all((values[ring] >= 0) & (values[ring] < limit)):
                raise ValueError(
                    f"state field {ring!r} holds values outside the partition's "
                    f"[0, {limit})"
                )
        score = float(values["region_score"])
        if not 0.0 <= score <= 1.0:
            raise ValueError("state field 'region_score' is outside [0, 1]")

    def _learn_baseline(self, X: npt.NDArray[np.float64]) -> None:
        p = self._params
        self._centres = kmeans(X, p.cells, p.kmeans_iterations, self._seed)
        counts = np.bincount(assign(X, self._centres), minlength=len(self._centres))
        self._expected_in = expected_coverage(counts.astype(np.float64), p.window)
        self._sd_in = coverage_sd(counts.astype(np.float64), p.window)
        logger.debug(
            "coverage partition of %d cells from %d rows",
            len(self._centres),
            len(X),
            extra={"detector": self.name},
        )

    def _learn_output_baseline(
        self, X: npt.NDArray[np.float64], proba: npt.NDArray[np.float64]
    ) -> None:
        if self._centres is None:
            self._learn_baseline(X)
        assert self._centres is not None
        keys = self._region_keys(X, proba)
        counts = np.bincount(keys).astype(np.float64)
        self._widen_live(int((keys % _CLASS_SLOTS).max()) + 1)
        share = np.zeros(self._ref_share.shape)
        cell, label = np.divmod(np.flatnonzero(counts), _CLASS_SLOTS)
        share[cell, label] = counts[counts > 0] / counts.sum()
        self._ref_share = share
        self._ref_dec = (
            expected_coverage(counts, self._params.window),
            coverage_sd(counts, self._params.window),
        )
        if not self._live_in_use:
            self._expected_dec, self._sd_dec = self._ref_dec

    @property
    def live_answers(self) -> int:
        """Answers to clients in good standing counted in the live table."""
        return self._live_total

    @property
    def decision_baseline(self) -> str:
        """Where the decision part's honest expectation comes from now:
        ``"live"`` (answers to clients in good standing, once
        ``live_min_answers`` are counted) or ``"reference"``."""
        return "live" if self._live_in_use else "reference"

    def _learn_live(
        self,
        slots: npt.NDArray[np.int64],
        keys: npt.NDArray[np.int64],
        learn: npt.NDArray[np.bool_],
        n_answers: npt.NDArray[np.int64],
    ) -> None:
        """Count the (cell, class) keys of answers to clients in good
        standing (``learn``), each client's first ``live_answers_per_client``
        only (``n_answers``: its answers before this batch), and recompute the
        decision part's expectation when it is due (:meth:`_refresh_live`)."""
        if not learn.any():
            return
        self._widen_live(int((keys % _CLASS_SLOTS).max()) + 1)
        taught = _teach_pairs(
            slots,
            keys,
            learn,
            n_answers,
            self._params.live_answers_per_client,
            self._live_pairs,
            self._live_clients,
        )
        if not taught:
            return
        self._live_total = min(self._live_total + taught, MAX_SAMPLES)
        self._live_since_refresh += taught
        self._refresh_live()

    def _widen_live(self, classes: int) -> None:
        """Give the live table at least ``classes`` columns."""
        table = self._live_pairs
        if classes > table.shape[1]:
            wider = np.zeros((table.shape[0], classes), dtype=np.int64)
            wider[:, : table.shape[1]] = table
            self._live_pairs = wider
            masks = np.zeros((table.shape[0], classes), dtype=np.uint64)
            masks[:, : table.shape[1]] = self._live_clients
            self._live_clients = masks
            share = np.zeros((table.shape[0], classes))
            share[:, : table.shape[1]] = self._ref_share
            self._ref_share = share

    def _live_counts(self) -> npt.NDArray[np.float64]:
        """The live table's counts, flat, where at least ``live_min_clients``
        clients taught the pair; elsewhere the reference answers' share of
        it times the table's total. So a pair one unflagged thief alone
        taught counts as much as the reference says (usually nothing), and
        an honest pair too rare live to have its clients yet is not lost."""
        masks = self._live_clients.ravel()
        taught = np.zeros(len(masks), dtype=np.int64)
        for bit in range(64):
            taught += ((masks >> np.uint64(bit)) & np.uint64(1)).astype(np.int64)
        counts = self._live_pairs.ravel().astype(np.float64)
        vouched = taught >= self._params.live_min_clients
        fallback = self._ref_share.ravel() * float(counts.sum())
        return np.where(vouched, counts, fallback)

    def _refresh_live(self) -> None:
        """Take the decision part's expectation from the live table once it
        holds ``live_min_answers``, then again every ``live_refresh_answers``
        learnt: recomputing per batch would cost O(pairs^2 * window) each
        time, and a few hundred answers barely move the frequencies."""
        p = self._params
        if self._live_total < p.live_min_answers:
            return
        due = max(p.live_refresh_answers, self._live_total // 8)
        if self._live_in_use and self._live_since_refresh < due:
            return
        counts = self._live_counts()
        if not counts.any():
            return
        self._expected_dec = expected_coverage(counts, p.window)
        self._sd_dec = coverage_sd(counts, p.window)
        self._live_in_use = True
        self._live_since_refresh = 0
        logger.debug(
            "coverage decision baseline from %d live answers",
            self._live_total,
            extra={"detector": self.name},
        )

    def _partition_digest(self) -> bytes:
        """Eight bytes naming the partition (its centroids), so a live table
        counted over another partition is never merged into this one."""
        assert self._centres is not None
        raw = np.ascontiguousarray(self._centres, dtype="<f8").tobytes()
        return hashlib.blake2b(raw, digest_size=8).digest()

    def _export_live(self) -> LiveBaseline | None:
        """The live table's non-empty (cell, class) keys (``cell * 256 +
        class``, ascending) and their counts, with the partition's digest;
        ``None`` before a partition exists (its keys would mean nothing)."""
        if self._centres is None:
            return None
        cell, label = np.nonzero(self._live_pairs)
        fields = {
            "keys": (cell * _CLASS_SLOTS + label).astype("<i4").tobytes(),
            "counts": self._live_pairs[cell, label].astype("<i8").tobytes(),
            "clients": self._live_clients[cell, label].astype("<u8").tobytes(),
            "partition": self._partition_digest(),
        }
        total = self._live_total
        return fields, total, total >= self._params.live_min_answers

    def _import_live(
        self, fields: Mapping[str, bytes], samples: int
    ) -> Callable[[], None]:
        check_fields(fields, ("keys", "counts", "clients", "partition"))
        if self._centres is None:
            raise BaselineRefused(
                "invalid", f"{self.name}: no partition yet to count a live table on"
            )
        if fields["partition"] != self._partition_digest():
            raise BaselineRefused(
                "invalid",
                f"{self.name}: live table counted over another partition "
                "(cells, seed or reference differ)",
            )
        limit = self._params.cells * _CLASS_SLOTS
        keys = read_field(fields, "keys", "<i4", max_length=limit).astype(np.int64)
        counts = read_field(fields, "counts", "<i8", length=len(keys))
        clients = read_field(fields, "clients", "<u8", length=len(keys))
        if not np.all(clients != 0):
            raise BaselineRefused(
                "invalid", f"{self.name}: a pair counted without a client"
            )
        if len(keys) and not (keys[0] >= 0 and keys[-1] < limit):
            raise BaselineRefused(
                "invalid", f"{self.name}: a key lies outside the partition's pairs"
            )
        if not (np.all(np.diff(keys) > 0) and np.all(counts >= 1)):
            raise BaselineRefused(
                "invalid", f"{self.name}: keys not ascending or a count under 1"
            )
        # Summed as Python ints: int64 counts near MAX_SAMPLES could wrap.
        if sum(counts.tolist()) != samples:
            raise BaselineRefused(
                "invalid", f"{self.name}: counts do not add up to {samples} samples"
            )

        def apply() -> None:
            # Disjoint answers of other clients (a catch-up imports only
            # while this table is not ready, so none is counted twice): the
            # counts add. Two totals of at most MAX_SAMPLES fit an int64.
            cell, label = np.divmod(keys, _CLASS_SLOTS)
            if len(keys):
                self._widen_live(int(label.max()) + 1)
            self._live_pairs[cell, label] += counts
            self._live_clients[cell, label] |= clients
            self._live_total = min(self._live_total + samples, MAX_SAMPLES)
            self._live_since_refresh += samples
            self._refresh_live()

        return apply

    def _region_keys(
        self, X: npt.NDArray[np.float64], proba: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.int64]:
        assert self._centres is not None
        label = np.minimum(np.argmax(proba, axis=1), _CLASS_SLOTS - 1)
        keys = assign(X, self._centres) * _CLASS_SLOTS + label
        return np.asarray(keys, dtype=np.int64)

    def _observe_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        proba: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> None:
        if self._centres is None:
            return
        assert self._arena is not None
        keys = self._region_keys(X, proba)
        arrays = self._arena.arrays
        # Only answers to clients in good standing shape what honest means,
        # and only each one's first live_answers_per_client.
        self._learn_live(slots, keys, learn, arrays["n_answers"])
        expected, spread = self._expected_dec, self._sd_dec
        if expected is None or spread is None:
            expected = spread = np.zeros(0)
        _observe_windows(
            slots,
            keys,
            arrays["regions"],
            arrays["regions_pos"],
            arrays["regions_len"],
            arrays["n_answers"],
            arrays["region_score"],
            expected,
            spread,
            _horizons(self._params.window),
            self._params.cells * _CLASS_SLOTS,
        )

    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        del learn  # the expectation comes from the reference data only
        assert self._arena is not None
        n = len(slots)
        if self._centres is None or self._expected_in is None or self._sd_in is None:
            cold = ["no input partition yet, so no query is judged"] * n
            return self._scores(np.zeros(n), np.zeros(n, dtype=bool), cold)
        arrays = self._arena.arrays
        p = self._params
        growth, covered, lengths, seen = _score_windows(
            slots,
            assign(X, self._centres),
            arrays["cells"],
            arrays["cells_pos"],
            arrays["cells_len"],
            arrays["n_seen"],
            self._expected_in,
            self._sd_in,
            _horizons(p.window),
            p.cells,
        )
        expected = self._expected_in[lengths]
        input_part = np.where(seen >= p.min_queries, growth, 0.0)
        answers = arrays["n_answers"][slots]
        region_part = np.where(
            answers >= p.min_queries, arrays["region_score"][slots], 0.0
        )
        score = np.maximum(input_part, region_part)
        warm = (seen >= p.min_queries) | (answers >= p.min_queries)
        n_cells = p.cells
        source = self.decision_baseline

        def evidence(row: int) -> str:
            return (
                f"last {lengths[row]} queries cover {covered[row]} of {n_cells} input "
                f"cells (honest about {expected[row]:.0f}); decision-region part "
                f"{region_part[row]:.2f} ({source} baseline)"
            )

        return self._scores(score, warm, evidence)
