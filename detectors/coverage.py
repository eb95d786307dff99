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

This module holds the detector: its per-client state, its live (cell,
class) table and how the two parts become one score with its evidence. The
partition, the honest expectation and the compiled loops over each client's
windows are in :mod:`detectors._coveragekernels` (the public functions
re-exported here), the parameters in :mod:`detectors._coverageparams`.
Imports numpy, those two modules, :mod:`detectors._state` and
:mod:`detectors.baselines`; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detectors._coveragekernels import MAX_SCORE as MAX_SCORE
from detectors._coveragekernels import MIN_SD as MIN_SD
from detectors._coveragekernels import assign as assign
from detectors._coveragekernels import coverage_sd as coverage_sd
from detectors._coveragekernels import expected_coverage as expected_coverage
from detectors._coveragekernels import kmeans as kmeans
from detectors._coveragekernels import (
    observe_windows,
    score_windows,
    teach_pairs,
    window_horizons,
)
from detectors._coverageparams import CoverageParams as CoverageParams
from detectors._state import (
    FieldSpec,
    check_counters,
    check_ring_counters,
    window_fields,
)
from detectors.base import Detector, DetectorScore, LiveBaseline
from detectors.baselines import MAX_SAMPLES, BaselineRefused, check_fields, read_field

logger = logging.getLogger(__name__)

_CLASS_SLOTS = 256
"""Decision-region keys are ``cell * 256 + class`` (classes above 255 share)."""


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
    score is the larger part over the horizons of
    :func:`~detectors._coveragekernels.window_horizons`.

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
        taught = teach_pairs(
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
        observe_windows(
            slots,
            keys,
            arrays["regions"],
            arrays["regions_pos"],
            arrays["regions_len"],
            arrays["n_answers"],
            arrays["region_score"],
            expected,
            spread,
            window_horizons(self._params.window),
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
        growth, covered, lengths, seen = score_windows(
            slots,
            assign(X, self._centres),
            arrays["cells"],
            arrays["cells_pos"],
            arrays["cells_len"],
            arrays["n_seen"],
            self._expected_in,
            self._sd_in,
            window_horizons(p.window),
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
