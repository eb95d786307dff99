"""Structure of successive changes: sparse edits and repeated directions.

Two shapes of probing that distance alone describes poorly:

- sparse attacks (one-pixel, JSMA-like, Su et al. 2019) send an input that
  differs from an earlier one in very few features, often by a lot;
- decision-based attacks walking a boundary (HopSkipJump's binary searches
  and geometric steps, the Boundary attack's steps toward the original) move
  along the same direction again and again.

For each query this detector counts the features that differ from the
client's nearest earlier query (L0), and compares the step from the client's
previous query with its last few steps (absolute cosine). How often honest
traffic does either by chance depends on the data (correlated tabular
features make steps between unrelated honest rows point the same way), so
the rates are measured on the reference sample and a share is judged only
when its count is unlikely at them.

Imports numpy, scipy (the binomial tail, :mod:`detectors._binomial`) and
pydantic only; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from detectors._binomial import upper_tail
from detectors._history import LEVELS, check_ring, quantise, ring_fields
from detectors._probehist import nearest_and_push, step_changes
from detectors._state import FieldSpec, check_counters, check_window, window_fields
from detectors.base import MAX_STATE_BYTES, Detector, DetectorParams, DetectorScore

# Reference rows replayed (in a seeded random order) to measure the honest
# rates of sparse edits and repeated steps: bounds the work at start to
# about 1000 x history distances.
_MAX_REFERENCE_ROWS = 1000


def honest_rates(
    stored: npt.NDArray[np.uint8],
    history: int,
    directions: int,
    change_tol: float,
    max_changed: int,
    cos_threshold: float,
) -> tuple[float, float]:
    """Shares of sparse edits and of repeated steps in ``stored`` (quantised
    rows, in the order a client would send them), counted as the detector
    counts them: the nearest of the last ``history`` rows, the step from the
    previous row against the last ``directions`` steps. Unit steps are not
    rounded to float16 here; the rates are estimates."""
    n = len(stored)
    if n < 2:
        return 0.0, 0.0
    rows = stored.astype(np.float64)
    steps = np.diff(rows, axis=0)
    norms = np.linalg.norm(steps, axis=1)
    units = np.divide(
        steps, norms[:, None], out=np.zeros_like(steps), where=norms[:, None] > 0
    )
    sparse = repeat = 0
    for i in range(1, n):
        earlier = rows[max(0, i - history) : i]
        nearest = earlier[np.argmin(((earlier - rows[i]) ** 2).sum(axis=1))]
        changed = int(np.count_nonzero(np.abs(rows[i] - nearest) > change_tol))
        sparse += 1 <= changed <= max_changed
        step = i - 1
        if step >= 1:
            recent = units[max(0, step - directions) : step]
            repeat += float(np.abs(recent @ units[step]).max()) >= cos_threshold
    return sparse / (n - 1), repeat / (n - 1)


class StructureParams(DetectorParams):
    """Parameters of :class:`ChangeStructureDetector`."""

    history: int = Field(32, ge=4, le=4096)
    """Earlier queries searched for the nearest one (fewer if the budget needs)."""

    max_changed: int = Field(3, ge=1, le=4096)
    """At most this many changed features (and at least one) make a sparse edit."""

    change_tol: float = Field(0.02, ge=0.0, lt=1.0)
    """A feature counts as changed when it moved by more than this (in [0, 1])."""

    directions: int = Field(8, ge=1, le=256)
    """Recent steps a new step is compared with."""

    cos_threshold: float = Field(0.95, gt=0.0, le=1.0)
    """Absolute cosine with a recent step at which a step counts as repeated."""

    window: int = Field(50, ge=5, le=4096)
    """Recent queries over which the shares of sparse edits and repeats are taken."""

    threshold: float = Field(0.3, gt=0.0, le=1.0)
    """Share (the larger of the two) at which the client is flagged."""

    min_queries: int = Field(10, ge=1, le=100_000)
    """Queries a client must have sent before it can be flagged."""

    # Source of the default: repeated steps among the evaluation's held-out
    # digits replayed in random order: 0.08%, breast cancer 3.1%, phishing
    # 1.5% (its sparse edits far more); a floor for references that show
    # none, so one chance repeat in a few queries is never unlikely.
    honest_rate: float = Field(0.01, gt=0.0, lt=1.0)
    """Least per-query rate of sparse edits and of repeated steps assumed of
    an honest client; the rates measured on the reference sample replace it
    when higher."""

    # Source of the default: as the ood detector's. At the breast-cancer
    # repeat rate (3.1%) an honest client's 3 repeats of 10 have a chance of
    # 3e-3; a line search's 7 of 10, 3e-9.
    significance: float = Field(1e-4, gt=0.0, le=1.0)
    """A share is judged only when its count in the window is this unlikely
    for an honest client (binomial tail ``P(X >= count)`` at the honest
    rate); 1.0 turns the check off."""


class ChangeStructureDetector(Detector[StructureParams]):
    """The larger of two shares over the client's last ``window`` queries:
    sparse edits of an earlier query, and steps repeating a recent step.

    A query is a *sparse edit* when, against its nearest earlier query (L2,
    among the last ``history``), between 1 and ``max_changed`` features moved
    by more than ``change_tol``. Its *step* is the difference from the client's
    previous query; the step is *repeated* when its absolute cosine with one of
    the client's last ``directions`` steps reaches ``cos_threshold``.

    Score: in [0, 1], higher is more suspicious: the larger share when the
    count behind it is unlikely for an honest client (its binomial upper
    tail, over the window's length at the honest rate of that kind, is at
    most ``significance``), else 0. The honest rates are measured by
    :meth:`learn_baseline` on the reference sample replayed in a random
    order (at least ``honest_rate``). Flagged at ``threshold`` once
    ``min_queries`` queries have been seen.

    Why: features of real tabular data are correlated (the size features of
    breast cancer), so the step between two unrelated honest rows mostly
    points along the few directions the data varies in, and consecutive
    steps are often nearly parallel: 3.1% of honest breast-cancer steps
    repeat one of the last 8 at ``|cos| >= 0.95``, against 0.08% of digits;
    an honest client meeting 3 in its first 10 queries was flagged. The
    count test keeps chance repeats of such data ordinary while a line
    search, which repeats nearly every step, is judged as before.

    When it is weak:

    - a sparse attacker that interleaves unrelated queries, or edits a query
      older than ``history``, has no near predecessor to compare with;
    - attacks that change many features a little (HopSkipJump's gradient
      estimation, NES, Square) are not sparse; only their line searches repeat
      a direction, which the repeat share catches while they last;
    - honest streams of slowly varying inputs (a sensor, a video) repeat
      directions naturally;
    - ``max_changed`` is in features, not a share: wide inputs need it raised;
    - the honest rates are measured with the parameters in force at
      :meth:`learn_baseline` and on the reference's rows in random order:
      honest clients whose traffic is ordered (a sensor, a sweep) repeat
      more than that, and a reference unlike live traffic misstates them.

    Per-client state: the history as uint8 (32 x 64 features = 2 KB), the
    last ``directions`` unit steps as float16 (1 KB), two rings of ``window``
    bits and counters, about 3.2 KB.

    Parameters
    ----------
    params
        Validated parameters; defaults when omitted.
    seed
        Unused (deterministic); accepted for a uniform API.
    """

    name: ClassVar[str] = "structure"
    Params: ClassVar[type[StructureParams]] = StructureParams
    _mutable_params: ClassVar[frozenset[str]] = frozenset(
        {
            "max_changed",
            "change_tol",
            "cos_threshold",
            "threshold",
            "min_queries",
            "honest_rate",
            "significance",
        }
    )

    def __init__(self, params: StructureParams | None = None, *, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        # Sparse-edit and repeated-step rates of the reference (none before
        # a baseline).
        self._reference_rates: tuple[float, float] = (0.0, 0.0)

    @property
    def honest_rates(self) -> tuple[float, float]:
        """Per-query rates of sparse edits and of repeated steps that counts
        are judged against: the reference's, at least ``honest_rate``."""
        floor = self._params.honest_rate
        sparse, repeat = self._reference_rates
        return max(floor, sparse), max(floor, repeat)

    def _learn_baseline(self, X: npt.NDArray[np.float64]) -> None:
        """Measure the honest rates on the reference in a seeded random
        order (at most ``_MAX_REFERENCE_ROWS`` rows)."""
        p = self._params
        order = np.random.default_rng(self._seed).permutation(len(X))
        stored = quantise(X[order[:_MAX_REFERENCE_ROWS]])
        self._reference_rates = honest_rates(
            stored,
            self.capacity(X.shape[1]),
            p.directions,
            p.change_tol * LEVELS,
            p.max_changed,
            p.cos_threshold,
        )

    def capacity(self, n_features: int) -> int:
        """Queries kept per client for inputs of ``n_features`` features."""
        p = self._params
        spare = MAX_STATE_BYTES - 2 * p.window - 64 - 2 * p.directions * n_features
        capacity = min(p.history, spare // n_features)
        if capacity < 2:
            raise ValueError(
                f"{self.name}: {n_features} features leave no room for a history"
            )
        return capacity

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        p = self._params
        return {
            **ring_fields(self.capacity(n_features), n_features),
            "dirs": FieldSpec((p.directions, n_features), "<f2"),
            **window_fields("sparse", p.window, "u1"),
            **window_fields("repeat", p.window, "u1"),
            "n_seen": FieldSpec((), "<i8"),
        }

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        check_ring(values)
        check_window(values, "sparse", "sparse_pos", "sparse_len")
        check_window(values, "repeat", "repeat_pos", "repeat_len")
        check_counters(values, "n_seen")
        dirs = values["dirs"].astype(np.float64)
        if not np.isfinite(dirs).all() or (np.linalg.norm(dirs, axis=1) > 1.01).any():
            raise ValueError("state field 'dirs' holds non-unit steps")
        if int(values["n_seen"]) < int(values["hist_len"]):
            raise ValueError("state field 'n_seen' is below 'hist_len'")

    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        del learn  # nothing shared is learned
        assert self._arena is not None
        arrays = self._arena.arrays
        p = self._params
        n = len(slots)
        # Rows sorted by client, each client's in arrival order.
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        stored = quantise(X)
        found = nearest_and_push(arrays, order, sorted_slots, stored)

        # Sparse edits, steps and their cosines, and the windows, row by row
        # (sorted order, results in row order).
        changed_row = np.empty(n, dtype=np.int64)
        cos_row = np.empty(n, dtype=np.float64)
        sparse_counts = np.empty(n, dtype=np.int64)
        repeat_counts = np.empty(n, dtype=np.int64)
        lengths = np.empty(n, dtype=np.int64)
        seen = np.empty(n, dtype=np.int64)
        step_changes(
            (order, sorted_slots, stored),
            found,
            (arrays["dirs"].view(np.uint16), arrays["n_seen"]),
            (
                (arrays["sparse"], arrays["sparse_pos"], arrays["sparse_len"]),
                (arrays["repeat"], arrays["repeat_pos"], arrays["repeat_len"]),
            ),
            # The tolerance as float32: the distances it was compared with
            # were float32 arrays, and numpy compares them with a Python
            # float in float32.
            (np.float32(p.change_tol * LEVELS), p.max_changed, p.cos_threshold),
            (changed_row, cos_row, sparse_counts, repeat_counts, lengths, seen),
        )

        def evidence(row: int) -> str:
            c = int(changed_row[row])
            return (
                f"of the last {lengths[row]} queries {sparse_counts[row]} changed "
                f"1-{p.max_changed} features of an earlier one and "
                f"{repeat_counts[row]} repeated a recent step "
                f"(|cos| >= {p.cos_threshold:g}); this one changed "
                + (f"{c} features" if c >= 0 else "nothing before it")
                + f", step |cos| {cos_row[row]:.2f}; chance {tail[row]:.1e} "
                f"for an honest client (rates {sparse_rate:.3f} sparse, "
                f"{repeat_rate:.3f} repeated)"
            )

        # The count behind the larger share must be unlikely for an honest
        # client at that kind's rate (binomial upper tail).
        sparse_rate, repeat_rate = self.honest_rates
        larger = np.maximum(sparse_counts, repeat_counts)
        rate = np.where(repeat_counts >= sparse_counts, repeat_rate, sparse_rate)
        tail = upper_tail(larger, lengths, rate)
        score = np.where(tail <= p.significance, larger / lengths, 0.0)
        return self._scores(score, seen >= p.min_queries, evidence)
