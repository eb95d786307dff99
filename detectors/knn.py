"""k-nearest-neighbour detector: stateful detection of query-based attacks.

Chen, Carlini and Wagner ("Stateful Detection of Black-Box Adversarial
Attacks", 2019) keep each client's recent queries and flag a query whose mean
distance to its k nearest earlier queries is unusually small; the threshold is
set from benign traffic for a chosen false-positive rate. Iterative attacks
(HopSkipJump, Boundary, NES) query many points around one input, so their
k-nearest distances collapse, while honest clients' stay at the distance
between unrelated inputs. Here the statistic is the distance to the k-th
nearest distinct earlier query rather than the mean over the k nearest, so
that an honest client re-submitting one input a few times is not close (see
:class:`KnnDistanceDetector`).

Imports numpy and pydantic only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from detectors._history import neighbours_and_push, ring_fields
from detectors._history import quantise as quantise_ring
from detectors._probehist import push_bits
from detectors._radius import (
    check_history,
    history_fields,
    nearest_and_count,
    quantise,
)
from detectors._state import (
    FieldSpec,
    SlotArena,
    check_counters,
    check_window,
    group_rows,
    window_fields,
)
from detectors.base import MAX_STATE_BYTES, Detector, DetectorParams, DetectorScore

logger = logging.getLogger(__name__)

# Simulated benign streams learn_baseline replays: each the reference in a
# new random order, cycled to the history plus this many judged queries. Only
# queries meeting a full history are judged, as most are in service (streams
# of 50 against a history of 64 had put the threshold where honest clients of
# 300 queries crossed it).
_CALIBRATION_STREAMS = 8
_CALIBRATION_JUDGED = 128

# Honest clients re-submit an input now and then, a few times with tiny
# changes (a user sending the same digit again, a sensor re-reading one
# object). The simulated benign streams do the same, so the calibrated
# distance already allows for it: after 5% of rows, a run of 1 to k - 1 copies
# with Gaussian noise of 0.005 per feature (0.5% of the [0, 1] range; the
# habit of evaluation/benign.py, whose runs are 3 to 8 queries long).
_RESUBMIT_SHARE = 0.05
_RESUBMIT_NOISE = 0.005


class KnnParams(DetectorParams):
    """Parameters of :class:`KnnDistanceDetector`."""

    # Source of the default: an honest client that re-submits one input sends
    # a short run of near copies (the evaluation's habit: runs of 3 to 8, so
    # at most 7 earlier copies). A run shifts a copy's rank by up to 7, so k
    # must be well above 7: with k = 8 honest breast-cancer re-submitters
    # still crossed the threshold in an offline replay; with 16 none did.
    k: int = Field(16, ge=1, le=64)
    """Rank of the earlier query whose distance is measured: a query is
    close when its ``k``-th nearest distinct earlier query is (Chen et al.
    average the k nearest, k = 50 on CIFAR with a history of thousands)."""

    history: int = Field(64, ge=8, le=4096)
    """Earlier queries kept per client (fewer if the state budget needs)."""

    knn_threshold: float | None = Field(None, gt=0.0, le=1.0)
    """Mean k-nearest RMS distance under which one query counts as close.
    ``None``: set by :meth:`KnnDistanceDetector.learn_baseline` from the
    reference data replayed as benign clients, at ``target_fpr``."""

    target_fpr: float = Field(0.01, gt=0.0, lt=0.5)
    """Share of benign queries allowed below the calibrated ``knn_threshold``."""

    window: int = Field(50, ge=5, le=4096)
    """Recent queries of a client over which the share of close ones is taken."""

    threshold: float = Field(0.3, gt=0.0, le=1.0)
    """Share of close queries in the window at which the client is flagged."""

    min_queries: int = Field(10, ge=1, le=100_000)
    """Queries a client must have sent before it can be flagged."""


def calibrate(
    benign_streams: Sequence[npt.NDArray[np.float64]],
    target_fpr: float,
    *,
    k: int = 16,
    history: int = 64,
    warmup: int = 0,
) -> float:
    """The ``k``-th-nearest distance that leaves ``target_fpr`` of benign
    queries below it.

    Parameters
    ----------
    benign_streams
        Each an array (m, d) of one honest client's queries in order, scaled
        to [0, 1] (for example held-out data replayed by simulated clients).
    target_fpr
        Wanted share of benign queries counted as close (0 < fpr < 1).
    k, history
        As the detector will use them.
    warmup
        Leading queries of each stream left out of the quantile (a client in
        service mostly meets a full history; queries meeting a short one are
        farther from their neighbours and would raise the threshold).

    Returns
    -------
    float
        The ``target_fpr`` quantile of the distances to the ``k``-th nearest
        distinct earlier query, over every query that had ``k`` of them.

    Raises
    ------
    ValueError
        No stream is long enough to have a query with ``k`` earlier ones.
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    distances = [
        d
        for stream in benign_streams
        for d in _stream_distances(
            np.asarray(stream, dtype=np.float64), k, history, warmup
        )
    ]
    if not distances:
        raise ValueError(f"no benign query had {k} earlier ones to compare with")
    return float(np.quantile(np.asarray(distances), target_fpr))


def _stream_distances(
    stream: npt.NDArray[np.float64], k: int, history: int, warmup: int = 0
) -> list[float]:
    """Distances of one client's queries to their k-th nearest distinct earlier
    query (those with k before)."""
    if stream.ndim != 2 or len(stream) <= k:
        return []
    capacity = min(history, len(stream))
    arena = SlotArena(ring_fields(capacity, stream.shape[1]), initial_slots=1)
    slots = arena.slots(["c"] * len(stream))
    groups = group_rows(slots)
    found = neighbours_and_push(arena.arrays, groups, quantise_ring(stream), 2 * k)
    kth = _kth_distinct(found.k_dist, k)[warmup:]
    return [float(v) for v in kth[np.isfinite(kth)]]


def with_resubmissions(
    stream: npt.NDArray[np.float64], k: int, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """``stream`` with honest re-submissions: after ``_RESUBMIT_SHARE`` of the
    rows, 1 to ``k - 1`` noisy copies of it (fewer than ``k``, so a run alone
    never makes its queries close)."""
    out: list[npt.NDArray[np.float64]] = []
    for row in stream:
        out.append(row[None, :])
        if k > 1 and rng.random() < _RESUBMIT_SHARE:
            copies = int(rng.integers(1, k))
            noise = rng.normal(0.0, _RESUBMIT_NOISE, (copies, len(row)))
            out.append(np.clip(row[None, :] + noise, 0.0, 1.0))
    if not out:
        return stream
    return np.concatenate(out)


def _kth_distinct(k_dist: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.float64]:
    """The ``k``-th smallest positive distance of each row of ascending
    distances (``inf`` where there are fewer than ``k``).

    Exact copies (distance 0, exact in the quantised arithmetic) are left
    out: no search resends its input unchanged, while honest clients replay
    identical rows. Rows hold ``2k`` distances, so up to ``k`` copies among
    the nearest are skipped; more make the row ``inf`` (not close).
    """
    zeros = (k_dist == 0.0).sum(axis=1)
    column = np.minimum(zeros + k - 1, k_dist.shape[1] - 1)
    kth: npt.NDArray[np.float64] = k_dist[np.arange(len(k_dist)), column]
    kth[zeros + k > k_dist.shape[1]] = np.inf
    return kth


class KnnDistanceDetector(Detector[KnnParams]):
    """Share of a client's recent queries that have ``k`` distinct earlier
    queries of the same client unusually close.

    For each query, the per-feature RMS distance (``||x - y||_2 / sqrt(d)``,
    in [0, 1]) to its ``k``-th nearest among the client's last ``history``
    queries, leaving out exact copies (no probe; the fingerprint detector
    counts copies). The query is *close* when that distance is below
    ``knn_threshold``, which :meth:`learn_baseline` calibrates
    (:func:`calibrate`) so that ``target_fpr`` of benign queries are close.
    The score is the share of close queries among the client's last
    ``window``.

    Why the ``k``-th distance and not the mean of the ``k`` nearest (Chen et
    al.'s statistic): honest clients re-submit an input a few times with tiny
    changes, and a run of such copies pulls the mean of the nearest to almost
    0, so every copy looked close and honest re-submitters were flagged. The
    ``k``-th nearest distinct query is close only when ``k`` earlier queries
    crowd around this one, more than a re-submission run holds. The benign
    streams it is calibrated on include such runs.

    Score: in [0, 1], higher is more suspicious; an honest client's expected
    score is about ``target_fpr``. Flagged at ``threshold`` once
    ``min_queries`` queries have been seen and a threshold exists.

    When it is weak:

    - an attacker who interleaves unrelated queries, or spreads one search over
      many keys, keeps each key's history far apart (the fingerprint store and
      key links look across keys);
    - the history is short (``history`` queries): a slow attack spacing its
      probes further apart is not seen, and a search needs ``k`` queries
      around a point before any counts;
    - the calibration is only as good as its benign sample: honest clients
      that resend similar inputs (frames of a video) need their own;
    - it overlaps the similarity detector (a count within a fixed ``eps``);
      the two are kept apart because the calibrated threshold adapts to the
      data.

    Per-client state: the history as uint8 (64 x 64 features = 4 KB) with
    each stored query's squared norm, a ring of ``window`` bits and counters,
    about 4.4 KB.

    Parameters
    ----------
    params
        Validated parameters; defaults when omitted.
    seed
        Shuffles the reference data before it is cut into benign streams.
    """

    name: ClassVar[str] = "knn"
    Params: ClassVar[type[KnnParams]] = KnnParams
    _mutable_params: ClassVar[frozenset[str]] = frozenset(
        {"knn_threshold", "target_fpr", "threshold", "min_queries"}
    )

    def __init__(self, params: KnnParams | None = None, *, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        self._calibrated: float | None = None

    @property
    def knn_threshold(self) -> float | None:
        """The close-query threshold in force: set, calibrated, or none yet."""
        if self._params.knn_threshold is not None:
            return self._params.knn_threshold
        return self._calibrated

    def calibrate(
        self,
        benign_streams: Sequence[npt.NDArray[np.float64]],
        target_fpr: float,
        *,
        warmup: int = 0,
    ) -> float:
        """Set the close-query threshold from benign streams; returns it."""
        p = self._params
        self._calibrated = calibrate(
            benign_streams, target_fpr, k=p.k, history=p.history, warmup=warmup
        )
        return self._calibrated

    def capacity(self, n_features: int) -> int:
        """Queries kept per client for inputs of ``n_features`` features."""
        p = self._params
        # Each stored query: its features (uint8) and squared norm (float32).
        row_bytes = n_features + 4
        capacity = min(p.history, (MAX_STATE_BYTES - p.window - 64) // row_bytes)
        if capacity < 2 * p.k:
            raise ValueError(
                f"{self.name}: {n_features} features leave room for {capacity} "
                f"queries; k={p.k} needs at least {2 * p.k}"
            )
        return capacity

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        window = self._params.window
        return {
            **history_fields(self.capacity(n_features), n_features),
            **window_fields("close", window, "u1"),
            "n_seen": FieldSpec((), "<i8"),
        }

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        check_history(values)
        check_window(values, "close", "close_pos", "close_len")
        check_counters(values, "n_seen")
        if int(values["n_seen"]) < int(values["hist_len"]):
            raise ValueError("state field 'n_seen' is below 'hist_len'")

    def _learn_baseline(self, X: npt.NDArray[np.float64]) -> None:
        """Replay the reference rows as benign clients, re-submitting now and
        then, and calibrate."""
        rng = np.random.default_rng(self._seed)
        p = self._params
        warmup = self.capacity(X.shape[1])
        streams = [
            with_resubmissions(
                X[np.resize(rng.permutation(len(X)), warmup + _CALIBRATION_JUDGED)],
                p.k,
                rng,
            )
            for _ in range(_CALIBRATION_STREAMS)
        ]
        try:
            threshold = self.calibrate(streams, p.target_fpr, warmup=warmup)
        except ValueError:
            logger.warning(
                "knn: reference data too small to calibrate",
                extra={"detector": self.name},
            )
            return
        logger.debug(
            "knn threshold %.4f from %d reference rows",
            threshold,
            len(X),
            extra={"detector": self.name},
        )

    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        del learn  # the calibration is fixed; nothing shared is learned online
        assert self._arena is not None
        arrays = self._arena.arrays
        p = self._params
        n = len(slots)
        limit = self.knn_threshold
        # The k-th nearest distinct earlier query is within the threshold
        # exactly when k distinct earlier queries are: counted in one pass
        # over the history, without sorting distances. The distances are
        # computed here, not shared with similarity (which computes the same
        # on an equal history): the kernel makes them cheap, and sharing tied
        # knn to the order and thread the worker calls detectors in.
        nearest, within = nearest_and_count(
            arrays, slots, quantise(X), limit if limit is not None else 0.0
        )
        # An exact copy of an earlier query is not close either: no search
        # resends its input unchanged, while honest clients replay rows.
        close = (within >= p.k) & (nearest > 0.0)
        counts, lengths, seen = push_bits(arrays, "close", slots, close)
        if limit is None:
            evidence_cold = ["no benign calibration yet, so no query is judged"] * n
            warm = np.zeros(n, dtype=bool)
        else:
            bound = limit

            def evidence(row: int) -> str:
                return (
                    f"{counts[row]} of the last {lengths[row]} queries have "
                    f"{p.k} distinct earlier queries within {bound:.3f}; "
                    f"this one has {within[row]}"
                )

            warm = seen >= p.min_queries
            return self._scores(counts / lengths, warm, evidence)
        return self._scores(counts / lengths, warm, evidence_cold)
