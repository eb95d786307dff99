"""PRADA-style detector: extraction queries have abnormal nearest-query distances.

Juuti, Szyller, Marchal and Asokan ("PRADA: Protecting against DNN Model
Stealing Attacks", EuroS&P 2019) observe that the distance from each of a
client's queries to the nearest of its earlier, sufficiently distinct queries
(its "growing set") is close to normally distributed for natural inputs, while
synthetic queries built by small steps from a few seeds (Papernot et al.'s
Jacobian augmentation, its variants) give a spiky, multi-modal distribution.
A Shapiro-Wilk test on those distances separates the two.

Imports numpy, scipy and pydantic only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator
from scipy.special import ndtri

from detectors._state import FieldSpec, Groups, group_rows
from detectors.base import MAX_STATE_BYTES, Detector, DetectorParams, DetectorScore

logger = logging.getLogger(__name__)

# Rows handled per step: bounds the temporary arrays (512 rows of as many
# clients widen at most 512 growing sets of 64 x 64 features, 8 MB of
# float32). 512 rather than 256 halves the per-client work when clients send a
# few rows per batch: 9.1 against 10.6 µs per query, 100 clients, batches of
# 500, one BLAS thread.
_CHUNK_ROWS = 512

# A client with at least this many rows in a chunk gets its own matrix
# products; smaller groups share stacked ones (the split the similarity
# detector measured: stacking pays for a few rows per client, not for many).
_BIG_GROUP = 32

# The growing-set rule runs one numpy step per position in the chunk (all
# clients' rows at that position) when the chunk holds at least this many rows
# per position, else a Python loop per row. A step costs about 30 numpy calls
# (some 40 µs), a row in Python about 2 µs; measured 500-row batches: one
# client (64 positions) 30 µs per query by positions against 10.6 by rows,
# 1000 clients of 20 queries 6.9 against 11.9.
_ROWS_PER_POSITION = 20

# Smallest growing set worth keeping; below it the detector is refused.
_MIN_GROWING = 8

# Bytes of a dumped state beyond its arrays (msgpack header, field names and
# the layout string): 650 measured for this layout; kept free in the budget so
# the dump, not only the memory, stays within max_state_bytes.
_DUMP_OVERHEAD_BYTES = 1024

# Stored queries are quantised to 8 bits per feature, as the similarity
# detector does (half the memory of float16 and cheaper to widen). In these
# units (q.q - 2 q.h) + h.h stays an integer of magnitude below 2**24 for up
# to 258 features, so float32 distances are exact and a batch scores exactly
# as the same rows sent one at a time.
_LEVELS = 255

# Distances further than this many standard deviations from the sample mean
# are dropped before the test, as the authors' code does (``rejectOutliers(
# dists, 3)`` in LKNSI/node-prada ``gs.js``, a port of the Aalto group's
# Python; the same file tests every 10 queries). Kept inclusive (<=) so a
# constant sample is not emptied.
_REJECT_SIGMA = 3.0

# Royston's polynomial corrections for the two extreme Shapiro-Wilk
# coefficients (Royston 1992, "Approximating the Shapiro-Wilk W-test for
# non-normality", Statistics and Computing 2; algorithm AS R94, 1995), the
# constants scipy.stats.shapiro's swilk uses; lowest power first.
_C1 = np.array([0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056])
_C2 = np.array([0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633])

# Lowest W measured on benign clients (see PradaParams.threshold), quoted in
# the evidence so a reader can judge a W without the docs.
_BENIGN_W_FLOOR = 0.91


@lru_cache(maxsize=512)
def _swilk_coefficients(n: int) -> tuple[npt.NDArray[np.float64], float]:
    """Shapiro-Wilk coefficients for a sorted sample of ``n`` (3 <= n <= 5000).

    The same approximation as ``scipy.stats.shapiro`` (AS R94): expected normal
    order statistics ``m_i = Phi^-1((i - 3/8) / (n + 1/4))``, normalised, with
    the two extreme coefficients corrected by Royston's polynomials.
    Antisymmetric, so it sums to zero; returned with its squared norm.
    """
    half = n // 2
    if n == 3:
        upper = np.array([math.sqrt(0.5)])
    else:
        # Positive expected order statistics, largest first; Royston corrects
        # the largest one (n <= 5) or two, then rescales the others.
        m = -ndtri((np.arange(1, half + 1) - 0.375) / (n + 0.25))
        summ2 = 2.0 * float(np.sum(m * m))
        powers = (1.0 / math.sqrt(n)) ** np.arange(6)
        corrected = [
            float(np.sum(c * powers)) + float(m[i]) / math.sqrt(summ2)
            for i, c in enumerate((_C1, _C2)[: 1 if n <= 5 else 2])
        ]
        k = len(corrected)
        fac = math.sqrt(
            (summ2 - 2.0 * float(np.sum(m[:k] ** 2)))
            / (1.0 - 2.0 * sum(a * a for a in corrected))
        )
        upper = m / fac
        upper[:k] = corrected
    coefficients = np.zeros(n, dtype=np.float64)
    coefficients[:half] = -upper
    coefficients[n - half :] = upper[::-1]
    coefficients.setflags(write=False)
    return coefficients, float(np.sum(coefficients * coefficients))


def shapiro_w(sample: npt.NDArray[np.floating[Any]]) -> float:
    """Shapiro-Wilk W of ``sample`` after dropping values beyond 3 sigma.

    W is the squared correlation between the sorted sample and the expected
    normal order statistics: in [0, 1], near 1 for a normal sample, lower the
    less normal it is. Equal to ``scipy.stats.shapiro(kept).statistic`` to
    about 1e-9 at a tenth of its cost (scipy's argument handling alone takes
    about 70 µs a call). A sample with no spread, or fewer than 3 values
    left, gets 0: a point mass is as far from normal as a sample can be.
    """
    # Plain ufunc reductions (pairwise sums): a few µs where ndarray.std
    # takes 6, and equal inputs give equal bits whatever their alignment,
    # which BLAS dot does not promise.
    add = np.add.reduce
    x = np.array(sample, dtype=np.float64)
    x.sort()
    n = len(x)
    if n < 3:
        return 0.0
    centred = x - float(add(x)) / n
    squares = float(add(centred * centred))
    spread = math.sqrt(squares / n)
    # Sorted, so only the two ends can lie beyond the cut.
    cut = _REJECT_SIGMA * spread
    if -float(centred[0]) > cut or float(centred[-1]) > cut:
        x = x[np.abs(centred) <= cut]
        n = len(x)
        if n < 3:
            return 0.0
        centred = x - float(add(x)) / n
        squares = float(add(centred * centred))
    if x[-1] - x[0] <= 0.0:
        return 0.0
    coefficients, norm_sq = _swilk_coefficients(n)
    numerator = float(add(coefficients * centred)) ** 2
    denominator = norm_sq * squares
    return min(1.0, max(0.0, numerator / denominator))


# A window whose 8 most common distances (on the 1/255 grid) hold at least
# ``PradaParams.lattice_share`` of it counts as lattice-valued too.
_LATTICE_VALUES = 8


def distinct_levels(sample: npt.NDArray[np.floating[Any]]) -> int:
    """Distinct values of ``sample`` on a grid of 1/255, the resolution of the
    stored (8-bit) queries: distances differing by less are the same lattice
    distance seen through quantisation."""
    return len(np.unique(np.rint(np.asarray(sample, dtype=np.float64) * _LEVELS)))


def _grid(sample: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.int64]:
    """``sample`` on the 1/255 grid, as small non-negative integers."""
    return np.rint(np.asarray(sample, dtype=np.float64) * _LEVELS).astype(np.int64)


def _grid_on_lattice(
    grid: npt.NDArray[np.int64], min_distinct: int, share: float
) -> bool:
    """:func:`on_lattice` of a sample already on the grid (:func:`_grid`)."""
    # Distances are non-negative RMS values of [0, 1] features, so the grid
    # holds small non-negative integers: bincount, not np.unique (which sorts
    # and cost a quarter of this detector's time).
    counts = np.bincount(grid)
    if np.count_nonzero(counts) < min_distinct:
        return True
    if len(counts) > _LATTICE_VALUES:
        counts = np.partition(counts, len(counts) - _LATTICE_VALUES)
    top = counts[-_LATTICE_VALUES:]
    return bool(int(top.sum()) >= share * len(grid))


def on_lattice(
    sample: npt.NDArray[np.floating[Any]], min_distinct: int, share: float
) -> bool:
    """Whether the distances of ``sample`` sit on a few values: fewer than
    ``min_distinct`` distinct ones on the 1/255 grid, or ``share`` of them on
    its 8 most common ones."""
    return _grid_on_lattice(_grid(sample), min_distinct, share)


def _rule_by_row(
    groups: Groups,
    duplicate: npt.NDArray[np.bool_],
    suffix_min: npt.NDArray[np.float32],
    among: npt.NDArray[np.float32],
    constants: tuple[int, float, float],
    state: tuple[npt.NDArray[Any], ...],
    out: tuple[npt.NDArray[Any], ...],
) -> None:
    """PRADA's growing-set rule row by row in Python floats, for chunks with
    few rows per position; the same results as the per-position steps.

    ``state`` (per client: growing-set size before the chunk, count, mean,
    M2, admission threshold) is updated in place but for the size, and
    ``out`` (per sorted row: distance, whether it is kept, whether it joins)
    is filled.
    """
    capacity, scale, eps = constants
    filled_all, count_all, mean_all, m2_all, admit_all = state
    dist, has_dist, join_row = out
    dup = duplicate.tolist()
    for g, (begin, size) in enumerate(
        zip(groups.start.tolist(), groups.size.tolist(), strict=True)
    ):
        filled = int(filled_all[g])
        count, mean = int(count_all[g]), float(mean_all[g])
        m2, admit = float(m2_all[g]), float(admit_all[g])
        nearest_by_age = suffix_min[begin : begin + size].tolist()
        # Nearest admitted earlier row of the chunk, per row: Python floats
        # for a few rows, numpy for many (each admission updates the rest).
        small = size < _BIG_GROUP
        pair: Any = among[g, :size, :size]
        best: Any = np.full(size, np.inf, np.float32)
        if small:
            pair, best = pair.tolist(), best.tolist()
        joined = 0
        for t in range(size):
            r = begin + t
            if dup[r]:
                continue
            if filled + joined == 0:
                # The first query seeds the growing set (distance 0).
                count, mean, m2 = 1, 0.0, 0.0
                join = True
            else:
                e = max(0, filled + joined - capacity)  # evicted so far
                nearest = min(nearest_by_age[t][e], float(best[t]))
                d = math.sqrt(max(nearest, 0.0) / scale)
                dist[r] = d
                has_dist[r] = d >= eps
                join = d > admit
                if join:
                    # PRADA: T <- max(T, mean - std of DG before d).
                    admit = max(admit, mean - math.sqrt(max(m2, 0.0) / count))
                    count += 1
                    step = d - mean
                    mean += step / count
                    m2 += step * (d - mean)
            if join:
                join_row[r] = True
                joined += 1
                # Later rows of this client now see this one too.
                if small:
                    row = pair[t]
                    for u in range(t + 1, size):
                        if row[u] < best[u]:
                            best[u] = row[u]
                elif t + 1 < size:
                    np.minimum(best[t + 1 :], pair[t, t + 1 :], out=best[t + 1 :])
        count_all[g], mean_all[g], m2_all[g], admit_all[g] = count, mean, m2, admit


def _tested(w: float, n: int, at: int, delta: float) -> str:
    """Evidence of a client's last test."""
    return (
        f"Shapiro-Wilk W={w:.2f} over the last {n} nearest-query distances at "
        f"query {at} (flagged below {delta:.2f}; benign digit clients stayed "
        f"above {_BENIGN_W_FLOOR:.2f})"
    )


class PradaParams(DetectorParams):
    """Parameters of :class:`DistanceDistributionDetector`.

    Defaults measured on scikit-learn digits (X / 16; streams built as in
    ``tests/detectors/test_prada.py``). Benign: 1000 clients (5 seeds x 200,
    interleaved in batches of 500) replaying 20-200 held-out digits of
    ``gateway.models.digits_split``, 30% of them with runs of 2-30 copies
    (Gaussian noise, sigma 0 to 0.02), and 20 clients of 2000 queries.
    Attack: 35 streams recorded from ``evaluation.attacks.extraction`` against
    the demo model (seeds 0-19 with one public digit per class as the demo,
    0-4 with two and three, 0-4 with the logistic substitute) and 6 full demo
    runs of 1500 queries.
    """

    # Source of the default: 64, 128 and 256 gave the same benign W quantiles
    # to 0.001 and the same Jacobian detection; 64 costs 3.0 µs per query in
    # the distance products against 4.8 for 128.
    growing_set: int = Field(64, ge=_MIN_GROWING, le=4096)
    """Distinct earlier queries kept per client (fewer if the state budget
    needs); the oldest is evicted when full."""

    # Source of the default: windows of 256 to 1024 kept Jacobian streams
    # flagged only 20 queries longer (later augmentation rounds look normal
    # whatever the window) and left benign W unchanged.
    window: int = Field(128, ge=20, le=4096)
    """Most recent nearest-query distances the test is run on."""

    # Source of the default: enough for the resent-copy runs above (each copy
    # sits right after the previous one); with the growing set alone as
    # reference the runs failed the test (next comment).
    recent: int = Field(8, ge=1, le=256)
    """Last queries (all of them, not only the growing set's) against which a
    query counts as a near-duplicate."""

    # Source of the default: the similarity detector's eps, between the
    # smallest distance between two distinct held-out digits (0.076) and the
    # spread of resent legit inputs with small noise (0.028 for sigma 0.02).
    # Filtering only near-duplicates of the growing set, clients resending a
    # digit 2-30 times had a 1% quantile of W of 0.76 (far more than 1%
    # flagged): copies of a query that did not join all get the same
    # distance. With the recent filter, 0.943, as clients without runs.
    eps: float = Field(0.05, ge=0.0, le=1.0)
    """Per-feature RMS distance under which a query is a near-duplicate of one
    of the last ``recent`` queries (then skipped) or of the growing set (then
    its distance is not tested)."""

    # Source of the default: with 50 every Jacobian stream was flagged at its
    # first test (query 60); with 30, benign W fell to 0.886 and one Jacobian
    # stream reached 0.902 at its first test; with 100, detection waits until
    # query 110. PRADA's code waits for more than 100.
    min_queries: int = Field(50, ge=3, le=4096)
    """Distances needed in the window before the first test."""

    # Source of the default: the authors' code tests every 10 queries; a test
    # (sample and W) costs about 10 µs, so 1 µs per query amortised.
    test_every: int = Field(10, ge=1, le=100_000)
    """Queries of a client between two tests (counting every query)."""

    # Source of the default: threshold = 1 - delta with delta = 0.90. Lowest W
    # of the 1000 benign clients at any test: 0.909 (0.5% quantile 0.928, 1%
    # 0.937; 691 clients lived long enough to be tested); of the long ones
    # 0.936: none flagged. W of the 35 Jacobian streams at their first test
    # (query 60): 0.64-0.84, median 0.69: all flagged at query 60.
    threshold: float = Field(0.10, gt=0.0, le=1.0)
    """Score ``1 - W`` at which a warm client is flagged (W below 0.90)."""

    # Source of the default: honest phishing clients (9 features in {0, 0.5,
    # 1}, near-duplicate runs or not) put their windowed distances on 10-14
    # values of the 1/255 grid and reach W 0.80-0.87; honest digit clients
    # hold 36 or more; five Jacobian digit streams (demo attacker, seeds 0-4)
    # held 18-22 at their first test and 30-40 later, and all were flagged.
    # The margin on the attack side is small: 16 is a lattice guard, not a
    # general-purpose knob.
    min_distinct: int = Field(16, ge=1, le=4096)
    """Distinct distances (on a 1/255 grid, the stored queries' resolution)
    the window must hold for a test to run; see the class docstring."""

    # Source of the default: the share of the window on its 8 most common
    # grid values was 0.86-0.93 for honest phishing clients with near-duplicate
    # runs and retries, at most 0.78 for the five Jacobian digit streams (0.72-
    # 0.78 at their first test) and at most 0.43 for honest digit clients.
    # Some honest phishing windows hold 16 or more values (an evaluation
    # client was tested and flagged at W 0.89), so the share backs the count.
    lattice_share: float = Field(0.85, gt=0.0, le=1.0)
    """Share of the window on its 8 most common distances at which it counts
    as lattice-valued and is not tested; 1.0 turns this part off."""

    max_state_bytes: int = Field(MAX_STATE_BYTES, ge=4096, le=1 << 20)
    """Per-client state budget; wide inputs keep fewer than ``growing_set``."""

    @model_validator(mode="after")
    def _min_queries_fit_window(self) -> Self:
        if self.min_queries > self.window:
            raise ValueError(
                f"min_queries ({self.min_queries}) exceeds window ({self.window}), "
                "so no test would ever run"
            )
        return self


class DistanceDistributionDetector(Detector[PradaParams]):
    """How far from normal the distances between a client's queries are.

    For each query, ``d_min`` is its per-feature RMS distance,
    ``||x - y||_2 / sqrt(d)``, to the nearest query of the client's growing
    set. As in PRADA's Algorithm 1, the query joins the growing set when
    ``d_min`` exceeds ``T``, and before it joins ``T`` becomes
    ``max(T, mean - std)`` of the growing set's distances so far (the first
    query joins with distance 0). ``d_min`` is appended to a ring of the last
    ``window`` distances; every ``test_every`` queries, once the ring holds
    ``min_queries``, the Shapiro-Wilk W of the ring (after dropping values
    beyond 3 sigma, as the authors' code does) is computed.

    Score: ``1 - W``, in [0, 1], higher is more suspicious; benign digit
    clients measured at most 0.09 (mostly below 0.05), Jacobian augmentation
    0.16-0.36 at its first test. Between tests the last score is repeated;
    warm once the first test has run. Flagged at ``threshold`` (W below
    ``1 - threshold``).

    Deviations from the paper:

    - class-agnostic: PRADA keeps one growing set per class the model
      predicts, but the gateway scores a query before the model runs, so one
      growing set holds all classes. Distances are smaller than per class and
      the calibration above is for this variant;
    - bounded: the growing set keeps the last ``growing_set`` members and the
      test sees the last ``window`` distances (the paper keeps everything);
    - near-duplicates are skipped: a query within ``eps`` of one of the last
      ``recent`` queries adds no distance and does not join the growing set,
      and a distance below ``eps`` is not tested. Honest clients resending an
      input (retries, bursts of one image with noise) otherwise put a spike
      at 0 into the sample and fail the test; near-duplicates are the
      similarity detector's evidence;
    - W is computed in numpy with scipy's coefficients, not by calling
      ``scipy.stats.shapiro`` (same value to 1e-9, a tenth of the cost);
    - discrete input spaces are not tested: when the window's distances take
      fewer than ``min_distinct`` values (on the 1/255 grid of the stored
      queries), or its 8 most common values hold ``lattice_share`` of it, no
      test runs. PRADA's premise is that natural inputs give a
      continuous, roughly normal spread of nearest distances and that the
      spikes come from synthetic steps; when the features themselves take a
      few values (River Phishing: 0, 0.5 and 1), distances between distinct
      honest inputs fall on a handful of lattice values, the spikes are the
      domain's, and W measures the lattice rather than the client (honest
      phishing clients had W 0.80-0.87). Exact and near repeats never enter
      the window (``eps`` above), so replaying one's data adds no evidence.

    When it is weak:

    - uniform random queries are not flagged: nearest distances among
      independent uniform points in 64 dimensions are close to normal (lowest
      W 0.93-0.98 over five 1000-query streams). Shapiro-Wilk is scale-free,
      so it does not see that they lie farther apart than digits (median
      nearest distance 0.34 against 0.21). The OOD detector flags them
      within 5 queries;
    - the window forgets: later augmentation rounds (hundreds of points)
      look normal, so a Jacobian stream's W is back above 0.9 by query
      140-210; it is flagged from query 60 on, for 5-8% of a 1500-query run
      (the policy blocks at the first flag, whose risk is above 1.5);
    - an attacker who mixes natural inputs into the stream, or spreads it over
      many API keys, dilutes or splits the distances the test sees (the
      evasion the paper itself discusses);
    - decision-based probing (HopSkipJump) is mostly near-duplicates, skipped
      here; ART's runs were flagged only after 470-710 queries. The
      similarity detector catches such probing within 30;
    - the defaults (threshold, eps) are for 8x8 digits scaled to [0, 1];
      the worker adapts them per model from its reference sample
      (``detectors.calibration``), which sees honest traffic only;
    - a client shorter than ``min_queries`` distinct queries is never tested.

    Per-client state: the growing set (64 x 64 features = 4 KB) and squared
    norms, the last ``recent`` queries, the ring of distances as float32 and a
    few counters: 5.5 KB; wide inputs keep fewer growing-set members. Queries
    are stored quantised to 8 bits per feature (clipped to [0, 1] first), so
    distances move by at most 1/255; for up to 258 features the arithmetic is
    exact and a batch scores exactly as its rows sent one at a time.

    Cost: stacked matrix products of the batch's rows against their clients'
    growing sets and recent queries; the sequential growing-set rule as one
    numpy step per position in the chunk (every client's row at that
    position) when there are at least 20 rows per position, else a Python
    loop per row; a W every ``test_every`` queries, the lattice checks of a
    chunk in one count. On 64 features, CPU per query in batches of 500 with
    one BLAS thread (``detectors.bench``, best of two runs): 6.4-6.5 µs for
    100 clients, 6.9 for 10, 10.5 for one, 6.6 for 1000 clients of 20
    queries; about 0.21 ms for a batch of one row.

    Parameters
    ----------
    params
        Validated parameters; defaults when omitted.
    seed
        Unused (the detector is deterministic); accepted for a uniform API.

    Examples
    --------
    >>> import numpy as np
    >>> det = DistanceDistributionDetector()
    >>> rng = np.random.default_rng(0)
    >>> seeds = rng.random((10, 8))
    >>> steps = 0.1 * np.sign(rng.normal(size=(50, 8)))
    >>> X = np.vstack([seeds, np.clip(seeds[np.arange(50) % 10] + steps, 0, 1)])
    >>> last = det.score_batch(["c"] * 60, X)[-1]
    >>> last.flagged, last.warm
    (True, True)
    """

    name: ClassVar[str] = "prada"
    Params: ClassVar[type[PradaParams]] = PradaParams
    _mutable_params: ClassVar[frozenset[str]] = frozenset(
        {
            "threshold",
            "test_every",
            "min_queries",
            "eps",
            "min_distinct",
            "lattice_share",
        }
    )

    def capacity(self, n_features: int) -> int:
        """Growing-set members kept per client for ``n_features`` features.

        Raises
        ------
        ValueError
            If the state budget cannot hold even a minimal growing set.
        """
        params = self._params
        fixed = sum(spec.nbytes for spec in self._fields(n_features, 0).values())
        budget = params.max_state_bytes - _DUMP_OVERHEAD_BYTES - fixed
        capacity = min(params.growing_set, budget // (n_features + 4))
        if capacity < _MIN_GROWING:
            raise ValueError(
                f"{self.name}: {n_features} features leave room for only "
                f"{capacity} growing-set queries in max_state_bytes="
                f"{params.max_state_bytes}; at least {_MIN_GROWING} are needed"
            )
        return capacity

    def _fields(self, n_features: int, capacity: int) -> dict[str, FieldSpec]:
        params = self._params
        return {
            # Growing set: a ring of quantised queries and their squared norms.
            "gs": FieldSpec((capacity, n_features), "u1"),
            "gs_sq": FieldSpec((capacity,), "<f4"),
            "gs_pos": FieldSpec((), "<i8"),
            "gs_len": FieldSpec((), "<i8"),
            # Welford count, mean and M2 of every member's distance when it
            # joined (the paper's DG), and the admission threshold T.
            "gs_count": FieldSpec((), "<i8"),
            "gs_mean": FieldSpec((), "<f8"),
            "gs_m2": FieldSpec((), "<f8"),
            "admit": FieldSpec((), "<f8"),
            # The last `recent` queries, for the near-duplicate filter.
            "recent": FieldSpec((params.recent, n_features), "u1"),
            "recent_sq": FieldSpec((params.recent,), "<f4"),
            "recent_pos": FieldSpec((), "<i8"),
            "recent_len": FieldSpec((), "<i8"),
            # A ring of the last `window` distances.
            "dist": FieldSpec((params.window,), "<f4"),
            "dist_pos": FieldSpec((), "<i8"),
            "dist_len": FieldSpec((), "<i8"),
            # Queries seen, tests run, and the last test's outcome.
            "n_seen": FieldSpec((), "<i8"),
            "n_tests": FieldSpec((), "<i8"),
            "tested_at": FieldSpec((), "<i8"),
            "tested_n": FieldSpec((), "<i8"),
            "score": FieldSpec((), "<f8"),
        }

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        return self._fields(n_features, self.capacity(n_features))

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        for ring, pos, length in (
            ("gs", "gs_pos", "gs_len"),
            ("recent", "recent_pos", "recent_len"),
            ("dist", "dist_pos", "dist_len"),
        ):
            size = values[ring].shape[0]
            position, filled = int(values[pos]), int(values[length])
            if not 0 <= position < size or not 0 <= filled <= size:
                raise ValueError(f"state field {pos!r} or {length!r} is out of range")
            if filled < size and position != filled:
                raise ValueError(f"state field {pos!r} disagrees with {length!r}")
        for ring in ("gs", "recent"):
            rows = values[ring].astype(np.float32)
            if not np.array_equal(
                values[f"{ring}_sq"], np.einsum("ij,ij->i", rows, rows)
            ):
                raise ValueError(f"state field '{ring}_sq' disagrees with {ring!r}")
        dist = values["dist"]
        if not (np.isfinite(dist).all() and (dist >= 0).all() and (dist <= 1).all()):
            raise ValueError("state field 'dist' holds values outside [0, 1]")
        count = int(values["gs_count"])
        if count < int(values["gs_len"]) or (count > 0) != (int(values["gs_len"]) > 0):
            raise ValueError("state field 'gs_count' disagrees with 'gs_len'")
        # Distances lie in [0, 1], so their mean and T do and M2 <= count.
        for field in ("gs_mean", "admit", "score"):
            if not 0.0 <= float(values[field]) <= 1.0:
                raise ValueError(f"state field {field!r} is outside [0, 1]")
        if not 0.0 <= float(values["gs_m2"]) <= max(count, 1):
            raise ValueError("state field 'gs_m2' is out of range")
        counters = ("n_seen", "n_tests", "tested_at", "tested_n")
        if any(int(values[field]) < 0 for field in counters):
            raise ValueError("a counter of the state is negative")

    def _on_n_features(self, n_features: int) -> None:
        self._warn_if_capped(
            n_features,
            self.capacity(n_features),
            self._params.growing_set,
            "growing-set queries",
        )

    # -- scoring ------------------------------------------------------------

    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        # There is no shared baseline, so `learn` has nothing to gate.
        del learn
        assert self._arena is not None
        capacity = self._arena.arrays["gs"].shape[1]
        n = len(slots)
        queries = np.rint(np.clip(X, 0.0, 1.0) * _LEVELS).astype(np.uint8)
        score = np.empty(n, dtype=np.float64)
        warm = np.empty(n, dtype=bool)
        # Per row what its evidence needs: the last test (W as scored, its
        # size and query) or, before any, the distances held; formatted only
        # if read.
        evidence: list[Any] = [None] * n

        # Pieces in which no client has more than `capacity` rows, so a row
        # admitted to the growing set within a chunk is never evicted by later
        # rows of the same chunk. Each client's rows keep their order: piece p
        # holds its rows p * capacity .. (p + 1) * capacity - 1.
        whole = group_rows(slots)
        position = np.empty(n, dtype=np.int64)
        position[whole.order] = whole.position
        piece = position // capacity
        n_pieces = int(piece.max()) + 1
        for p in range(n_pieces):
            rows = np.arange(n) if n_pieces == 1 else np.flatnonzero(piece == p)
            for start in range(0, len(rows), _CHUNK_ROWS):
                chunk = rows[start : start + _CHUNK_ROWS]
                self._score_chunk(
                    slots[chunk], queries[chunk], chunk, score, warm, evidence
                )
        min_queries = self._params.min_queries
        delta = 1.0 - self._params.threshold

        def explain(row: int) -> str:
            info = evidence[row]
            if isinstance(info, tuple):
                current, tested_n, tested_at = info
                return _tested(1.0 - current, tested_n, tested_at, delta)
            if isinstance(info, str):
                return info
            return (
                f"{info} of the {min_queries} nearest-query distances "
                "needed for a normality test so far"
            )

        return self._scores(score, warm, explain)

    def _score_chunk(
        self,
        slots: npt.NDArray[np.int64],
        stored: npt.NDArray[np.uint8],
        row_index: npt.NDArray[np.int64],
        score: npt.NDArray[np.float64],
        warm: npt.NDArray[np.bool_],
        evidence: list[Any],
    ) -> None:
        """Score one chunk of rows (no client with more rows than the growing
        set holds), writing results at ``row_index``."""
        assert self._arena is not None and self._n_features is not None
        arrays = self._arena.arrays
        params = self._params
        capacity = arrays["gs"].shape[1]
        scale = float(_LEVELS * _LEVELS * self._n_features)
        eps = params.eps
        window = params.window
        every = params.test_every
        min_queries = params.min_queries

        # Step: the chunk grouped by client, rows widened once.
        groups = group_rows(slots)
        stored = stored[groups.order]
        q = stored.astype(np.float32)
        q_sq = np.einsum("ij,ij->i", q, q)

        # Step: squared distances to the growing set as it was before the
        # chunk, as suffix minima over age (a row that comes after e evictions
        # sees members e.. only), and among each client's rows of the chunk.
        suffix_min, among = self._growing_set_distances(groups, q, q_sq)

        # Step: near-duplicates of the last `recent` queries; every row then
        # joins the recent ring.
        nearest_recent = self._recent_nearest(groups, q, q_sq, among)
        duplicate = nearest_recent < eps * eps * scale
        self._append("recent", groups, np.arange(len(q)), stored, q_sq)

        # Step: the growing-set rule of PRADA's Algorithm 1, in arrival order.
        # Sequential within a client (whether a row joins decides what its
        # later rows see) but independent across clients, so one numpy step
        # per position in the chunk handles every client's row at that
        # position. Float64 elementwise arithmetic rounds exactly as Python
        # floats do, and the comparisons mirror Python's max/min, so the
        # results are those of the row-by-row rule.
        n = len(q)
        unique = groups.unique
        start, size = groups.start, groups.size
        n_groups = len(unique)
        # Copies (fancy indexing), written back once the rule has run.
        filled = arrays["gs_len"][unique]
        count = arrays["gs_count"][unique]
        mean = arrays["gs_mean"][unique]
        m2 = arrays["gs_m2"][unique]
        admit = arrays["admit"][unique]
        joined = np.zeros(n_groups, dtype=np.int64)
        dist = np.zeros(n, dtype=np.float64)
        has_dist = np.zeros(n, dtype=bool)
        join_row = np.zeros(n, dtype=bool)
        widest = int(size.max())
        if n >= _ROWS_PER_POSITION * widest:
            # Nearest admitted earlier row of the chunk, per group and position.
            best = np.full(among.shape[:2], np.inf, dtype=np.float32)
            # Rows that are not near-duplicates, by position then client.
            live = np.flatnonzero(~duplicate)
            by_position = live[np.argsort(groups.position[live], kind="stable")]
            bounds = np.searchsorted(
                groups.position[by_position], np.arange(int(size.max()) + 1)
            ).tolist()
            for t in range(int(size.max())):
                r = by_position[bounds[t] : bounds[t + 1]]
                if not len(r):
                    continue
                g = groups.group[r]
                total = filled[g] + joined[g]
                first = total == 0
                seeding = bool(first.any())
                if seeding and first.all():
                    rest = g[:0]
                else:
                    rest, rr = g, r
                    if seeding:
                        rest, rr, total = g[~first], r[~first], total[~first]
                    evicted = np.maximum(total - capacity, 0)
                    nearest = suffix_min[rr, evicted]
                    chunk_best = best[rest, t]
                    nearest = np.where(chunk_best < nearest, chunk_best, nearest)
                    d = np.sqrt(np.maximum(nearest.astype(np.float64), 0.0) / scale)
                    dist[rr] = d
                    has_dist[rr] = d >= eps
                    joins = d > admit[rest]
                    rest, d = rest[joins], d[joins]
                    join_row[rr[joins]] = True
                    # PRADA: T <- max(T, mean - std of DG before d).
                    floor = mean[rest] - np.sqrt(
                        np.maximum(m2[rest], 0.0) / count[rest].astype(np.float64)
                    )
                    old = admit[rest]
                    admit[rest] = np.where(floor > old, floor, old)
                    count[rest] += 1
                    step = d - mean[rest]
                    mean[rest] += step / count[rest].astype(np.float64)
                    m2[rest] += step * (d - mean[rest])
                if seeding:
                    # The first query seeds the growing set (distance 0).
                    seed = g[first]
                    count[seed], mean[seed], m2[seed] = 1, 0.0, 0.0
                    join_row[r[first]] = True
                    rest = np.concatenate([rest, seed])
                if len(rest):
                    joined[rest] += 1
                    # Later rows of these clients now see this one too.
                    best[rest] = np.minimum(best[rest], among[rest, t])
        else:
            _rule_by_row(
                groups,
                duplicate,
                suffix_min,
                among,
                (capacity, scale, eps),
                (filled, count, mean, m2, admit),
                (dist, has_dist, join_row),
            )
        arrays["gs_count"][unique] = count
        arrays["gs_mean"][unique] = mean
        arrays["gs_m2"][unique] = m2
        arrays["admit"][unique] = admit

        # Step: the window of distances and the tests that fall due. A test
        # reads only distances, so it runs after the rule, on the rows where
        # one falls due.
        group = groups.group
        seen0 = arrays["n_seen"][unique]
        dist_pos0 = arrays["dist_pos"][unique]
        dist_len0 = arrays["dist_len"][unique]
        seen_row = seen0[group] + groups.position + 1
        running = np.cumsum(has_dist)
        before = running[start] - has_dist[start]
        taken = running - before[group]  # distances of the client so far
        held_row = np.minimum(dist_len0[group] + taken, window)
        due = (seen_row % every == 0) & (held_row >= min_queries)
        n_tests0 = arrays["n_tests"][unique]
        current0 = arrays["score"][unique]
        tested_at0 = arrays["tested_at"][unique]
        tested_n0 = arrays["tested_n"][unique]
        row_score = current0[group]
        row_warm = n_tests0[group] > 0
        held_list = held_row.tolist()
        row_text: list[Any] = [
            (c, tn, ta) if k else h
            for c, tn, ta, k, h in zip(
                row_score.tolist(),
                tested_n0[group].tolist(),
                tested_at0[group].tolist(),
                row_warm.tolist(),
                held_list,
                strict=True,
            )
        ]
        n_new = np.bincount(group, weights=has_dist, minlength=n_groups).astype(
            np.int64
        )
        due_groups = np.unique(group[due])
        if len(due_groups):
            due_list = due.tolist()
            taken_list = taken.tolist()
            seen_list = seen_row.tolist()
            # Per client due a test, its stored window (oldest first, right-
            # aligned to column `window`) then this chunk's distances, rounded
            # to float32 as stored, so a test sees equal values whether its
            # rows came in one batch or one at a time; on the grid too.
            due_slots = unique[due_groups]
            ages = np.arange(window) - window
            chronological = np.zeros(
                (len(due_groups), window + among.shape[1]), dtype=np.float32
            )
            chronological[:, :window] = arrays["dist"][
                due_slots[:, None], (dist_pos0[due_groups, None] + ages) % window
            ]
            rank = np.full(n_groups, -1, dtype=np.int64)
            rank[due_groups] = np.arange(len(due_groups))
            has = np.flatnonzero(has_dist & (rank[group] >= 0))
            chronological[rank[group[has]], window - 1 + taken[has]] = dist[has]
            # Whether each due test's sample is lattice-valued, all at once.
            due_rows = np.flatnonzero(due)
            lattice_list = self._lattice(
                _grid(chronological),
                rank[group[due_rows]],
                window + taken[due_rows],
                held_row[due_rows],
            ).tolist()
            lattice_of = dict(zip(due_rows.tolist(), lattice_list, strict=True))
            for k, member in enumerate(due_groups.tolist()):
                slot = int(unique[member])
                current = float(current0[member])
                n_tests = int(n_tests0[member])
                tested_at, tested_n = int(tested_at0[member]), int(tested_n0[member])
                g_start, g_end = int(start[member]), int(start[member] + size[member])
                values = chronological[k]
                first_due = g_start + due_list[g_start:g_end].index(True)
                text: Any = None
                for row in range(first_due, g_end):
                    held = held_list[row]
                    if due_list[row]:
                        end = window + taken_list[row]
                        if not lattice_of[row]:
                            current = 1.0 - shapiro_w(values[end - held : end])
                            n_tests += 1
                            tested_at, tested_n = seen_list[row], held
                            text = None
                        elif not n_tests:
                            text = (
                                f"the last {held} nearest-query distances sit on "
                                "a few values (a discrete input space); not tested"
                            )
                    if n_tests:
                        text = text or (current, tested_n, tested_at)
                        row_text[row] = text
                    else:
                        row_text[row] = text or held
                    row_score[row] = current
                    row_warm[row] = n_tests > 0
                arrays["n_tests"][slot] = n_tests
                arrays["tested_at"][slot] = tested_at
                arrays["tested_n"][slot] = tested_n
                arrays["score"][slot] = current
        arrays["n_seen"][unique] = seen0 + size
        self._push_distances(groups, dist, has_dist, n_new, dist_pos0)
        arrays["dist_pos"][unique] = (dist_pos0 + n_new) % window
        arrays["dist_len"][unique] = np.minimum(dist_len0 + n_new, window)
        self._append("gs", groups, np.flatnonzero(join_row), stored, q_sq)

        # Step: back to row order.
        out = row_index[groups.order]
        score[out] = row_score
        warm[out] = row_warm
        for i, text in zip(out.tolist(), row_text, strict=True):
            evidence[i] = text

    def _lattice(
        self,
        grids: npt.NDArray[np.int64],
        sample: npt.NDArray[np.int64],
        end: npt.NDArray[np.int64],
        held: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.bool_]:
        """:func:`on_lattice` of several samples at once: sample ``i`` is
        ``grids[sample[i], end[i] - held[i] : end[i]]`` (values on the grid,
        0 to 255 as distances lie in [0, 1]). Counts are integers, so this
        is exactly the one-sample function."""
        n_tests = len(sample)
        offsets = np.cumsum(held) - held
        test = np.repeat(np.arange(n_tests), held)
        column = (end - held)[test] + np.arange(len(test)) - offsets[test]
        values = grids[sample[test], column]
        counts = np.bincount(
            test * (_LEVELS + 1) + values, minlength=n_tests * (_LEVELS + 1)
        ).reshape(n_tests, _LEVELS + 1)
        distinct = np.count_nonzero(counts, axis=1)
        ranked = np.partition(counts, _LEVELS + 1 - _LATTICE_VALUES, axis=1)
        top = ranked[:, -_LATTICE_VALUES:].sum(axis=1)
        params = self._params
        lattice: npt.NDArray[np.bool_] = (distinct < params.min_distinct) | (
            top >= params.lattice_share * held
        )
        return lattice

    def _push_distances(
        self,
        groups: Groups,
        dist: npt.NDArray[np.float64],
        has_dist: npt.NDArray[np.bool_],
        n_new: npt.NDArray[np.int64],
        dist_pos: npt.NDArray[np.int64],
    ) -> None:
        """Append each client's new distances (the sorted rows where
        ``has_dist``) to its window (a ring), in one assignment; only the last
        ``window`` of them can survive."""
        rows = np.flatnonzero(has_dist)
        if not len(rows):
            return
        assert self._arena is not None
        window = self._params.window
        group = groups.group[rows]
        rank = np.arange(len(rows)) - np.searchsorted(group, group)
        if len(rows) > window:  # else no client has more than the ring holds
            keep = rank >= n_new[group] - window
            rows, group, rank = rows[keep], group[keep], rank[keep]
        index = (dist_pos[group] + rank) % window
        self._arena.arrays["dist"][groups.unique[group], index] = dist[rows]

    def _recent_nearest(
        self,
        groups: Groups,
        q: npt.NDArray[np.float32],
        q_sq: npt.NDArray[np.float32],
        among: npt.NDArray[np.float32],
    ) -> npt.NDArray[np.float32]:
        """Squared distance (quantised units) of each sorted row to the nearest
        of its client's last ``recent`` queries, those of the batch included
        (``among``: the chunk's pairwise distances per client, as
        :meth:`_growing_set_distances` gives them)."""
        assert self._arena is not None
        arrays = self._arena.arrays
        size = arrays["recent"].shape[1]
        slot = groups.slot
        g, t = groups.group, groups.position
        old_len = arrays["recent_len"][slot]
        oldest = arrays["recent_pos"][slot] - old_len

        # Against the stored ring: entry of age a (0 = oldest) is still there
        # after the client's t earlier rows of this chunk if a >= len + t - size.
        # One product per client (its rows padded), not per row; the values
        # are integers below 2**24, so any order of summation is exact.
        ring = arrays["recent"][groups.unique].astype(np.float32)
        padded = np.zeros((len(groups.unique), among.shape[1], q.shape[1]), np.float32)
        padded[g, t] = q
        dots = np.matmul(padded, ring.transpose(0, 2, 1))[g, t]
        d_sq = (q_sq[:, None] - 2.0 * dots) + arrays["recent_sq"][slot]
        age = (np.arange(size)[None, :] - oldest[:, None]) % size
        gone = np.maximum(old_len + t - size, 0)
        present = (age < old_len[:, None]) & (age >= gone[:, None])
        best: npt.NDArray[np.float32] = np.where(present, d_sq, np.inf).min(axis=1)

        # Against the client's rows 1..size before it in this chunk.
        if among.shape[1] > 1:
            back = t[:, None] - np.arange(among.shape[1])[None, :]
            near = (back >= 1) & (back <= size)
            chunk = np.where(near, among[g, t], np.inf).min(axis=1)
            best = np.minimum(best, chunk)
        return best

    def _growing_set_distances(
        self,
        groups: Groups,
        q: npt.NDArray[np.float32],
        q_sq: npt.NDArray[np.float32],
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Squared distances of each sorted row to its client's growing set,
        as suffix minima over age, and among the client's rows of the chunk.

        With ``widest`` the most rows a client has in the chunk (at most the
        growing set's capacity), the suffix minima are (rows, widest): a row
        follows at most ``widest - 1`` admissions of its client, so it never
        needs a later entry. The pairwise distances are padded to (clients,
        widest, widest): in theory up to 512 x 64 x 64 float32, in practice
        far less, as the chunk holds 512 rows."""
        assert self._arena is not None
        arrays = self._arena.arrays
        capacity = arrays["gs"].shape[1]
        n_groups = len(groups.unique)
        by_age = np.empty((len(q), capacity), dtype=np.float32)
        widest = int(groups.size.max())
        pairwise = np.full((n_groups, widest, widest), np.inf, dtype=np.float32)

        # Small groups share stacked products; big ones get their own. The
        # small ones are stacked in two sizes, so that the many clients with a
        # few rows are not padded to the widest one (with 100 clients sending
        # 5 rows each on average, about 6 against 13). The products are exact
        # integers, so how rows are stacked does not change a bit.
        small = np.flatnonzero(groups.size < _BIG_GROUP)
        batches = []
        if small.size == 1:
            batches.append(small)
        elif small.size:
            cut = (int(groups.size[small].max()) + 1) // 2
            narrow = groups.size[small] <= cut
            batches += [part for part in (small[narrow], small[~narrow]) if part.size]
        batches += [np.array([g]) for g in np.flatnonzero(groups.size >= _BIG_GROUP)]
        for members in batches:
            slot = groups.unique[members]
            size = groups.size[members]
            start = groups.start[members]
            width = int(size.max())
            inside = np.arange(width)[None, :] < size[:, None]
            which, t = np.nonzero(inside)
            rows = start[which] + t
            padded = np.zeros((len(members), width, q.shape[1]), dtype=np.float32)
            padded[which, t] = q[rows]
            padded_sq = np.zeros((len(members), width), dtype=np.float32)
            padded_sq[which, t] = q_sq[rows]

            # Against the growing set, its rows gathered oldest first before
            # widening (cheaper than reordering the products); absent members
            # get an infinite squared norm, so they are never nearest.
            filled = arrays["gs_len"][slot]
            oldest = (arrays["gs_pos"][slot] - filled) % capacity
            order = (oldest[:, None] + np.arange(capacity)[None, :]) % capacity
            members_set = arrays["gs"][slot[:, None], order].astype(np.float32)
            members_sq = np.where(
                np.arange(capacity)[None, :] < filled[:, None],
                arrays["gs_sq"][slot[:, None], order],
                np.float32(np.inf),
            )
            dots = np.matmul(padded, members_set.transpose(0, 2, 1))
            d_sq = (padded_sq[:, :, None] - 2.0 * dots) + members_sq[:, None, :]
            by_age[rows] = d_sq[which, t]

            # Among the group's own rows.
            if width > 1:
                dots = np.matmul(padded, padded.transpose(0, 2, 1))
                among = (padded_sq[:, :, None] - 2.0 * dots) + padded_sq[:, None, :]
                pairwise[members, :width, :width] = among

        # Suffix minimum along age: entry e is the nearest of members e.. .
        # A row follows at most widest - 1 admissions of its client in the
        # chunk, so only entries e < widest are read: the members from there
        # on are folded into one column by a plain minimum, and the
        # accumulation runs over the few columns before it.
        reach = min(capacity, widest)
        if reach == 1:
            return by_age.min(axis=1, keepdims=True), pairwise
        head = by_age[:, :reach].copy()
        head[:, reach - 1] = by_age[:, reach - 1 :].min(axis=1)
        suffix_min = np.minimum.accumulate(head[:, ::-1], axis=1)[:, ::-1]
        return suffix_min, pairwise

    def _append(
        self,
        ring: str,
        groups: Groups,
        rows: npt.NDArray[np.int64],
        stored: npt.NDArray[np.uint8],
        q_sq: npt.NDArray[np.float32],
    ) -> None:
        """Append the sorted rows ``rows`` (ascending) to their clients' ring
        ``ring`` of queries (``gs`` or ``recent``) and its squared norms."""
        if not len(rows):
            return
        assert self._arena is not None
        arrays = self._arena.arrays
        size = arrays[ring].shape[1]
        unique = groups.unique
        group = groups.group[rows]
        rank = (
            np.arange(len(rows)) - np.searchsorted(group, np.arange(len(unique)))[group]
        )
        added = np.bincount(group, minlength=len(unique))
        # Only each client's last `size` rows survive; writing just those
        # keeps the ring indices distinct.
        keep = rank >= added[group] - size
        rows, group, rank = rows[keep], group[keep], rank[keep]
        position, filled = arrays[f"{ring}_pos"], arrays[f"{ring}_len"]
        index = (position[unique][group] + rank) % size
        arrays[ring][unique[group], index] = stored[rows]
        arrays[f"{ring}_sq"][unique[group], index] = q_sq[rows]
        position[unique] = (position[unique] + added) % size
        filled[unique] = np.minimum(filled[unique] + added, size)
