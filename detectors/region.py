"""Coarse regions of the input space, and which keys visit the same rare ones.

Key links from near-duplicate fingerprints (:mod:`detectors.linking`) miss an
attacker whose keys query *near* each other without ever repeating a query:
synthetic points grown from the same seeds (Papernot et al.), a foreign data
set (Knockoff), random or equation-solving queries, a boundary walk with large
steps. Those keys still crowd into the same unusual part of the input space.

:class:`RegionMap` gives each (scaled) query a coarse region id: its
coordinates on the reference's top principal components, in units of each
component's reference standard deviation, quantised to a grid of
``cell_sd``-wide cells (clipped at ``max_cell``), plus a bin of how far the
query lies off that subspace (its residual, in half octaves of the reference's
median residual), hashed to a uint64.

Why this shape:

- the principal components are where the reference varies most, so a few of
  them separate the places queries can be in; a grid over them is coarse on
  purpose: nearby queries of one attack share a cell without being
  near-duplicates;
- random, synthetic and foreign queries project onto the centre of the
  reference as often as honest ones (noise averages out over many features),
  but lie far off the subspace; the residual bin keeps them out of the
  honest central cells;
- the map is learned once from the model's reference sample, the same rows
  ``ood`` and ``coverage`` learn from, so every worker computes the same ids.

Which rows count: a region visit says nothing by itself, since honest clients
replay the same held-out data and share every common region all the time. Only
*counted* rows are stored and compared: those the caller judges unusual (the
gateway takes ``ood``'s per-query outlier bit, about 2% of honest queries),
and, of those, only rows in a region the reference rarely visits
(:meth:`RegionMap.rare`). :class:`InMemoryRegionStore` then tells, per counted
row, which other clients sent a counted row into the same region within
``ttl_s``; :func:`region_reports` turns that into reports for
:class:`detectors.linking.KeyLinks`.

numpy and the standard library only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

# splitmix64's multipliers (Steele, Lea and Flood 2014): a cheap mix that
# spreads small cell indexes over all 64 bits, the same on every platform.
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * _MIX_1
        h = h ^ (h >> np.uint64(27))
        h = h * _MIX_2
        return h ^ (h >> np.uint64(31))


class RegionMap:
    """Coarse region ids of queries, learned from a reference sample.

    Parameters
    ----------
    n_components
        Principal components of the reference the grid spans (fewer if the
        reference has fewer informative directions).
    cell_sd
        Width of a cell, in reference standard deviations of its component.
    max_cell
        Cells beyond this many from the centre, on either side, are merged
        into the edge cell, so a component has ``2 * max_cell + 1`` cells.
    max_residual_bin
        Residual bins: bin 0 is up to ``sqrt(2)`` times the reference's median
        residual, bin ``b`` up to ``2**((b + 1) / 2)`` times it, the last one
        everything beyond.
    rare_share
        A region is rare when at most this share of the reference falls in
        it (:meth:`rare`).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(0.5, 0.1, (500, 6)).clip(0, 1)
    >>> regions = RegionMap().fit(ref)
    >>> same = regions.region_ids(ref[:5]) == regions.region_ids(ref[:5] + 1e-9)
    >>> bool(same.all())
    True
    >>> bool(regions.rare(regions.region_ids(np.ones((1, 6))))[0])  # a far corner
    True
    """

    def __init__(
        self,
        *,
        n_components: int = 4,
        cell_sd: float = 1.0,
        max_cell: int = 3,
        max_residual_bin: int = 6,
        rare_share: float = 0.05,
    ) -> None:
        if n_components < 1 or cell_sd <= 0 or max_cell < 0 or max_residual_bin < 0:
            raise ValueError(
                "n_components and cell_sd must be positive, max_cell and "
                "max_residual_bin not negative"
            )
        if not 0 <= rare_share <= 1:
            raise ValueError("rare_share must lie in [0, 1]")
        self.n_components = n_components
        self.cell_sd = cell_sd
        self.max_cell = max_cell
        self.max_residual_bin = max_residual_bin
        self.rare_share = rare_share
        self._mean: npt.NDArray[np.float64] | None = None
        self._axes = np.zeros((0, 0))
        self._sd = np.zeros(0)
        self._residual_unit = 1.0
        self._reference_counts: dict[int, int] = {}
        self._reference_rows = 0

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run."""
        return self._mean is not None

    def fit(self, reference: npt.NDArray[np.float64]) -> RegionMap:
        """Learn the components, their spread, the residual unit and how often
        the reference visits each region; returns ``self``.

        Raises
        ------
        ValueError
            Fewer than two rows, or a non-finite value.
        """
        X = np.asarray(reference, dtype=np.float64)
        if X.ndim != 2 or len(X) < 2 or not np.isfinite(X).all():
            raise ValueError("the reference must be at least 2 finite rows")
        mean = X.mean(axis=0)
        centred = X - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        sd = singular / np.sqrt(len(X) - 1)
        # Directions the reference does not vary along would make every
        # query an edge cell: keep only those with some spread.
        keep = min(self.n_components, int((sd > 1e-9 * max(sd[0], 1e-300)).sum()))
        # An SVD's signs are arbitrary and differ between LAPACK builds, and
        # the workers must agree on every id: each axis is turned so that its
        # largest loading is positive (the convention of sklearn's svd_flip).
        axes = vt[:keep]
        biggest = axes[np.arange(keep), np.abs(axes).argmax(axis=1)]
        axes = axes * np.where(biggest < 0, -1.0, 1.0)[:, None]
        self._mean = mean
        self._axes = axes
        self._sd = sd[:keep]
        residual = self._residual(X)
        median = float(np.median(residual))
        self._residual_unit = median if median > 1e-12 else 1e-12
        ids = self.region_ids(X)
        values, counts = np.unique(ids, return_counts=True)
        self._reference_counts = dict(
            zip(values.tolist(), counts.tolist(), strict=True)
        )
        self._reference_rows = len(X)
        return self

    def _residual(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        assert self._mean is not None
        centred = X - self._mean
        projected = centred @ self._axes.T @ self._axes
        return np.asarray(np.linalg.norm(centred - projected, axis=1))

    def cells(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Per row, its cell index on each component, then its residual bin:
        shape (n, components + 1)."""
        if self._mean is None:
            raise ValueError("RegionMap.fit has not run")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self._mean):
            raise ValueError(
                f"expected rows of {len(self._mean)} features, got shape {X.shape}"
            )
        z = (X - self._mean) @ self._axes.T / self._sd
        grid = np.clip(np.floor(z / self.cell_sd), -self.max_cell, self.max_cell)
        ratio = self._residual(X) / self._residual_unit
        # Bin 0 up to sqrt(2) times the median residual (98% of the digits
        # reference), then one bin per half octave.
        half_octave = np.floor(2 * np.log2(np.maximum(ratio, 1e-300)))
        residual_bin = np.clip(half_octave, 0, self.max_residual_bin)
        return np.column_stack([grid, residual_bin]).astype(np.int64)

    def region_ids(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.uint64]:
        """Per row, its region id (a uint64; the same on every machine)."""
        cells = self.cells(X)
        h = np.full(len(cells), np.uint64(len(self._sd)), dtype=np.uint64)
        for j in range(cells.shape[1]):
            # Offsets make every index non-negative before the cast.
            part = (cells[:, j] + self.max_cell + 1).astype(np.uint64)
            with np.errstate(over="ignore"):
                h = _mix(h ^ (part + _GOLDEN))
        return h

    def reference_share(self, ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
        """Per region id, the share of the reference that fell in it."""
        if not self._reference_rows:
            raise ValueError("RegionMap.fit has not run")
        counts = self._reference_counts
        found = np.fromiter(
            (counts.get(int(v), 0) for v in ids), dtype=np.float64, count=len(ids)
        )
        return found / self._reference_rows

    def rare(self, ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """Per region id, whether the reference visits it at most
        ``rare_share`` of the time."""
        return np.asarray(self.reference_share(ids) <= self.rare_share)

    @property
    def regions_in_reference(self) -> int:
        """Distinct regions the reference visits."""
        return len(self._reference_counts)


class RegionStore(Protocol):
    """Where counted rows are kept and compared (in memory here, Redis in the
    gateway)."""

    def observe(
        self,
        client_ids: Sequence[str],
        regions: npt.NDArray[np.uint64],
        now_s: float,
    ) -> list[list[str]]:
        """Per row, in row order, the other clients with a row in its region
        within the store's time to live (each once); then store
        the row."""
        ...


class InMemoryRegionStore:
    """Recent counted rows per region, for tests and offline measurement.

    Parameters
    ----------
    ttl_s
        Seconds a stored row counts.
    entries_per_region
        Newest rows kept per region.
    max_regions
        Regions kept; the least recently written are dropped beyond it.

    Examples
    --------
    >>> store = InMemoryRegionStore(ttl_s=10.0)
    >>> store.observe(["a", "b", "a"], np.array([1, 1, 2], np.uint64), 0.0)
    [[], ['a'], []]
    """

    def __init__(
        self,
        *,
        ttl_s: float = 600.0,
        entries_per_region: int = 32,
        max_regions: int = 100_000,
    ) -> None:
        if ttl_s <= 0 or entries_per_region < 1 or max_regions < 1:
            raise ValueError(
                "ttl_s, entries_per_region and max_regions must be positive"
            )
        self.ttl_s = ttl_s
        self.entries_per_region = entries_per_region
        self.max_regions = max_regions
        self._regions: OrderedDict[int, deque[tuple[float, str]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._regions)

    def entries(self) -> int:
        """Rows held, over every region."""
        return sum(len(d) for d in self._regions.values())

    def observe(
        self,
        client_ids: Sequence[str],
        regions: npt.NDArray[np.uint64],
        now_s: float,
    ) -> list[list[str]]:
        if len(client_ids) != len(regions):
            raise ValueError(f"{len(client_ids)} client ids for {len(regions)} rows")
        oldest = now_s - self.ttl_s
        out: list[list[str]] = []
        for client, region in zip(client_ids, regions.tolist(), strict=True):
            entries = self._regions.pop(region, None)
            if entries is None:
                entries = deque(maxlen=self.entries_per_region)
            others: dict[str, None] = {}
            for at_s, other in entries:
                if at_s >= oldest and other != client:
                    others.setdefault(other, None)
            out.append(list(others))
            entries.append((now_s, client))
            self._regions[region] = entries  # re-inserted: newest last
            if len(self._regions) > self.max_regions:
                self._regions.popitem(last=False)
        return out


def region_reports(
    client_ids: Sequence[str], others: Sequence[Sequence[str]]
) -> dict[tuple[str, str], int]:
    """Reports ``(client, other) -> count`` for :class:`KeyLinks`: one per
    counted row and other client that sent a counted row into its region.

    Examples
    --------
    >>> region_reports(["b", "c"], [["a"], ["a", "b"]])
    {('b', 'a'): 1, ('c', 'a'): 1, ('c', 'b'): 1}
    """
    reports: dict[tuple[str, str], int] = defaultdict(int)
    for client, found in zip(client_ids, others, strict=True):
        for other in found:
            if other != client:
                reports[(client, other)] += 1
    return dict(reports)
