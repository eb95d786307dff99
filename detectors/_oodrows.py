"""Which of a batch's queries the ``ood`` detector counts as outliers, row
by row, besides the trees: the lattice, range and repeat checks.

What the reference sample's values look like is learned once, at the
baseline: the features whose values are quantised and their levels
(:class:`Lattice`), and whether the reference's range says where honest
queries lie (:func:`half_wide_rate`). Each query is then checked against
them in compiled loops (:func:`off_lattice_counts`,
:func:`outside_counts`), and :func:`counted_outliers` applies the repeat
rule (an honest re-send of one unusual input counts once). The detector
(:mod:`detectors.ood`, whose docstring says what each check catches,
misses and costs) turns the counted rows into a score.

Imports numpy, :mod:`detectors._jit` (numba) and
:mod:`detectors._oodparams` only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._jit import jit
from detectors._oodparams import OodParams

MIN_RANGE_ROWS = 40
"""Fewest reference rows for the range check (below it the range is noise)."""

MAX_HALF_WIDE_RATE = 0.10
"""Largest share of one random half of the reference that may be wide
against the other half's range for the range check to run; measured 2.7%
(at most 4.9% over ten splits) on the evaluation's breast-cancer sample of
284 rows, 0% on phishing, 0.2% on digits."""

LATTICE_ROWS_PER_LEVEL = 10
"""Reference rows per distinct value a feature needs to count as a lattice
feature: a continuous feature sampled by a small reference has few distinct
values by chance, and must not be mistaken for a quantised one."""


def complete_grid(
    values: npt.NDArray[np.float64], limit: int
) -> npt.NDArray[np.float64]:
    """A feature's levels, completed to its regular grid over [0, 1] when the
    reference levels are multiples of one step (pixel intensities k/16), so a
    level the reference happened not to show (a sparse edge pixel) is not
    taken for an off-lattice value; the observed levels otherwise."""
    step = float(np.diff(values).min())
    offsets = (values - values[0]) / step
    if step <= 0 or not np.allclose(offsets, np.rint(offsets), atol=1e-6):
        return values
    first = -np.floor(values[0] / step + 1e-9)
    last = np.floor((1.0 - values[0]) / step + 1e-9)
    if last - first + 1 > limit:
        return values
    return np.asarray(values[0] + step * np.arange(first, last + 1))


@jit
def off_lattice_counts(
    X: npt.NDArray[np.float64],
    grid_features: npt.NDArray[np.uint32],
    grid_origin: npt.NDArray[np.float64],
    grid_step: npt.NDArray[np.float64],
    grid_last: npt.NDArray[np.float64],
    other_features: npt.NDArray[np.uint32],
    levels: npt.NDArray[np.float64],
    tolerance: float,
) -> npt.NDArray[np.int64]:
    """Per row, how many lattice features lie farther than ``tolerance`` from
    every level of their reference.

    A regular grid's nearest level is
    ``clip(rint((x - origin) / step) * step + origin, origin, last)``, rounded
    half to even, in that order of operations (the grid level a value is
    checked against must not move by a rounding); the other features are
    checked against each of their levels (``levels``, padded with +inf).
    Feature indices are unsigned: numba tests a signed index for wrap-around
    on every lookup.
    """
    n = X.shape[0]
    off = np.zeros(n, dtype=np.int64)
    for i in range(n):
        row = X[i]
        count = 0
        for k in range(grid_features.shape[0]):
            value = row[grid_features[k]]
            origin = grid_origin[k]
            nearest = np.rint((value - origin) / grid_step[k]) * grid_step[k] + origin
            nearest = min(max(nearest, origin), grid_last[k])
            count += abs(value - nearest) > tolerance
        for k in range(other_features.shape[0]):
            value = row[other_features[k]]
            far = True
            for level in levels[k]:
                if abs(value - level) <= tolerance:
                    far = False
                    break
            if far:
                count += 1
        off[i] = count
    return off


@jit
def outside_counts(
    X: npt.NDArray[np.float64],
    low: npt.NDArray[np.float64],
    high: npt.NDArray[np.float64],
    tolerance: float,
) -> npt.NDArray[np.int64]:
    """Per row, how many features lie below ``low - tolerance`` or above
    ``high + tolerance``."""
    n, d = X.shape
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        count = 0
        for j in range(d):
            value = X[i, j]
            if low[j] - tolerance > value or high[j] + tolerance < value:
                count += 1
        out[i] = count
    return out


@jit
def count_non_repeats(
    slots: npt.NDArray[np.int64],
    codes: npt.NDArray[np.uint8],
    last: npt.NDArray[np.uint8],
    has_last: npt.NDArray[np.uint8],
    limit: float,
) -> npt.NDArray[np.bool_]:
    """Per outlier row (in arrival order), whether it counts: it does unless
    its client has a previous counted outlier (``has_last``) whose 8-bit
    codes (``last``) lie within squared distance ``limit`` of its own. A
    counted row becomes its client's previous one; the arena arrays (indexed
    by slot) are updated in place."""
    n, d = codes.shape
    counted = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        slot = slots[i]
        if has_last[slot]:
            distance = 0.0
            for j in range(d):
                step = float(codes[i, j]) - float(last[slot, j])
                distance += step * step
            if distance <= limit:
                continue
        counted[i] = True
        has_last[slot] = 1
        for j in range(d):
            last[slot, j] = codes[i, j]
    return counted


@dataclass(frozen=True, slots=True)
class Lattice:
    """The reference's lattice features and their levels: regular grids by
    origin, step and last level (checked by rounding, O(1) per value); the
    others by their levels, padded with +inf to one width so a batch is
    checked in one pass. Feature indices are unsigned for the compiled
    check (see :func:`off_lattice_counts`)."""

    features: npt.NDArray[np.int64]
    grid_features: npt.NDArray[np.uint32]
    grid_origin: npt.NDArray[np.float64]
    grid_last: npt.NDArray[np.float64]
    grid_step: npt.NDArray[np.float64]
    other_features: npt.NDArray[np.uint32]
    levels: npt.NDArray[np.float64]

    @classmethod
    def empty(cls) -> Lattice:
        """No lattice features (before a baseline, or the check off)."""
        empty = np.zeros(0)
        return cls(
            features=np.zeros(0, dtype=np.int64),
            grid_features=np.zeros(0, dtype=np.uint32),
            grid_origin=empty,
            grid_last=empty,
            grid_step=empty,
            other_features=np.zeros(0, dtype=np.uint32),
            levels=np.zeros((0, 0)),
        )

    @classmethod
    def learn(cls, X: npt.NDArray[np.float64], limit: int) -> Lattice:
        """The quantised features of the reference ``X`` (at most ``limit``
        distinct values, each seen :data:`LATTICE_ROWS_PER_LEVEL` times on
        average; none when ``limit`` is 0) and their levels."""
        features: list[int] = []
        levels: list[npt.NDArray[np.float64]] = []
        if limit > 0:
            for j in range(X.shape[1]):
                values = np.unique(X[:, j])
                if 2 <= len(values) <= limit and (
                    len(X) >= LATTICE_ROWS_PER_LEVEL * len(values)
                ):
                    features.append(j)
                    levels.append(complete_grid(values, limit))
        steps = np.array([float(np.diff(v).min()) for v in levels])
        regular = np.array(
            [
                bool(np.allclose(np.diff(v), s))
                for v, s in zip(levels, steps, strict=True)
            ],
            dtype=bool,
        )
        lattice_features = np.asarray(features, dtype=np.int64)
        others = [v for v, r in zip(levels, regular, strict=True) if not r]
        width = max((len(v) for v in others), default=0)
        padded = np.full((len(others), width), np.inf)
        for i, values in enumerate(others):
            padded[i, : len(values)] = values
        return cls(
            features=lattice_features,
            grid_features=lattice_features[regular].astype(np.uint32),
            grid_origin=np.array(
                [v[0] for v, r in zip(levels, regular, strict=True) if r]
            ),
            grid_last=np.array(
                [v[-1] for v, r in zip(levels, regular, strict=True) if r]
            ),
            grid_step=steps[regular] if len(steps) else np.zeros(0),
            other_features=lattice_features[~regular].astype(np.uint32),
            levels=padded,
        )

    def off(
        self, rows: npt.NDArray[np.float64], tolerance: float
    ) -> npt.NDArray[np.int64]:
        """Per row of ``rows`` (C-ordered float64, the detector's width), how
        many lattice features lie farther than ``tolerance`` from every level
        of their reference."""
        return off_lattice_counts(
            rows,
            self.grid_features,
            self.grid_origin,
            self.grid_step,
            self.grid_last,
            self.other_features,
            self.levels,
            tolerance,
        )


def half_wide_rate(X: npt.NDArray[np.float64], p: OodParams, seed: int) -> float:
    """Share of the rows of one random half of the reference ``X`` that are
    wide against the other half's range (1 under :data:`MIN_RANGE_ROWS`
    rows): a small or thin reference puts many honest inputs outside its
    range, and then the range check must not run (see
    :data:`MAX_HALF_WIDE_RATE`)."""
    if len(X) < MIN_RANGE_ROWS:
        return 1.0
    order = np.random.default_rng(seed).permutation(len(X))
    half, other = X[order[: len(X) // 2]], X[order[len(X) // 2 :]]
    t = p.range_tolerance
    out = (half.min(axis=0) - t > other) | (half.max(axis=0) + t < other)
    return float(np.mean(out.sum(axis=1) >= p.range_min_features))


def counted_outliers(
    arrays: Mapping[str, npt.NDArray[Any]] | None,
    slots: npt.NDArray[np.int64],
    X: npt.NDArray[np.float64],
    hst: npt.NDArray[np.bool_],
    synthetic: npt.NDArray[np.bool_],
    wide: npt.NDArray[np.bool_],
    p: OodParams,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """HST-outlier and wide queries that count, and the wide ones among
    them, in arrival order (updates the per-client ``last_outlier`` and
    ``has_outlier`` of ``arrays``; nothing counts without them).

    An on-lattice outlier (HST or wide) within ``range_repeat_eps`` of
    its client's previous counted one is a repeat and does not count;
    off-lattice rows always count, and a wide one counts as wide, but
    they neither are judged as repeats nor become the row repeats are
    measured from.
    """
    counted = np.zeros(len(X), dtype=bool)
    if arrays is None:
        return counted, counted.copy()
    rows = np.flatnonzero((hst | wide) & ~synthetic)
    if len(rows):
        # Compared on the stored 8-bit grid, so a batch counts exactly
        # as its rows sent one at a time.
        codes = np.rint(np.clip(X[rows], 0.0, 1.0) * 255.0).astype(np.uint8)
        limit = (p.range_repeat_eps * 255.0) ** 2 * X.shape[1]
        counted[rows] = count_non_repeats(
            slots[rows],
            codes,
            arrays["last_outlier"],
            arrays["has_outlier"],
            limit,
        )
    return counted, wide & (counted | synthetic)
