"""The ``traffic`` detector's cohort test: gap pairs pooled over young keys.

An attacker who spreads a metronome's stream over many keys gives each key
too few requests for its own regularity to count. Keys whose first request
came within ``cohort_window_s`` of each other and that keep one pace form
a cohort; :func:`cohort_evidence` pools their counts of successive gap
pairs and of those that match (counted per key by
:func:`detectors._traffickernels.push_and_measure`) and tests the pooled
share against honest arrivals' (:func:`detectors._binomial.binomial_z`). The detector
(:class:`detectors.traffic.TrafficDetector`, whose docstring says what the
test catches and misses) turns the pooled z into a score.

Imports numpy, :mod:`detectors._binomial`, :mod:`detectors._jit` (numba),
:mod:`detectors._cohort`, :mod:`detectors._cohortindex`,
:mod:`detectors._state` and :mod:`detectors._trafficparams` only; nothing
from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._binomial import binomial_z
from detectors._cohort import cohort_sums, sorted_young
from detectors._cohortindex import CohortIndex
from detectors._jit import jit
from detectors._state import SlotArena
from detectors._trafficparams import TrafficParams

STRONG_MIN_MATCHES = 2
"""Matching pairs a key below ``member_z`` needs of its own to be scored
through an overwhelming cohort (``strong_member_z``): one matching pair,
which an honest Poisson key shows about one time in sixteen, is no
evidence of a metronome."""


def member_bar(p: TrafficParams) -> npt.NDArray[np.int64]:
    """Per count of pairs (0 to ``window``), the fewest matches whose
    binomial z reaches ``member_z`` (``count + 1`` when none does, and
    for no pairs): the same test as
    :func:`~detectors._binomial.binomial_z` per key, as one look-up in the
    compiled running sums. Read-only, and kept for the last few parameter
    sets: computed per batch it cost 75 µs, 0.15 µs per query of a
    500-row batch."""
    return _member_bar(p.window, p.cohort_match_rate, p.member_z)


@functools.lru_cache(maxsize=8)
def _member_bar(
    window: int, match_rate: float, member_z: float
) -> npt.NDArray[np.int64]:
    counts = np.arange(window + 1)
    trials = np.broadcast_to(counts[:, None], (len(counts), len(counts)))
    hits = np.broadcast_to(counts[None, :], trials.shape)
    reach = (
        (hits <= trials)
        & (trials > 0)
        & (binomial_z(hits, trials, match_rate) >= member_z)
    )
    # z grows with matches at a fixed count, so the first reaching one is
    # the bar; a row with none reaches past every count.
    bar = np.where(reach.any(axis=1), reach.argmax(axis=1), counts + 1)
    bar.flags.writeable = False
    return bar


def cohort_evidence(
    arrays: Mapping[str, npt.NDArray[Any]],
    slots: npt.NDArray[np.int64],
    p: TrafficParams,
    index: tuple[CohortIndex, SlotArena] | None = None,
) -> CohortEvidence:
    """Per row: the pooled z of the key's cohort (0 when the key is not a
    young member of a cohort of ``cohort_min_keys`` with
    ``cohort_min_pairs``), with the counts behind it.

    A key is young while it has sent at most ``window`` rows. A young
    key is a member at ``member_z`` of any cohort; at ``strong_member_z``
    (with :data:`STRONG_MIN_MATCHES` matching pairs) only of an
    overwhelming one: pooled z at least ``strong_cohort_z`` both over
    the whole cohort and over its members at ``member_z`` alone (at
    least ``cohort_min_keys`` of them with ``cohort_min_pairs``). The
    second sum leaves out every key below ``member_z``, the asking one
    included, so however many such keys share a cohort they cannot
    admit each other.

    Only young keys whose own z reaches one of the two bars look for a
    cohort, once per key and batch, so rarely for honest keys by design;
    an attacker makes every key of every batch look. Each look therefore
    costs a few binary searches, not a scan of every key: ``index`` (the
    detector's :class:`detectors._cohortindex.CohortIndex` and its arena)
    keeps the young keys by first request time across batches, with sums
    per request count of their counts and of their keys' at ``member_z``
    (:func:`member_values`), and re-reads only the batch's keys. Without
    ``index`` the young keys near the asking ones are sorted once per
    batch by request count, then first request time, with running sums
    (:func:`running_sums`, :func:`detectors._cohort.cohort_sums`): the
    same result, kept as the reference the index is tested and measured
    against, at a cost that grows with those keys (about 0.4 to 0.6 ms
    with 20,000 young keys and 256 looking ones, 1.7 ms for a batch of
    one row over 50,000 keys started in one instant).
    """
    n = len(slots)
    found = CohortEvidence.empty(n)
    if p.cohort_window_s <= 0.0:
        if index is not None:
            # Not kept while off: rebuilt when the test is back on.
            index[0].stale()
        return found
    seen = arrays["n_seen"]
    pairs, matches = arrays["pairs"], arrays["matches"]
    rate = p.cohort_match_rate
    own_z = binomial_z(matches[slots], pairs[slots], rate)
    # Below member_z only for the lower bar: off at or above member_z.
    weak = (own_z >= p.strong_member_z) & (matches[slots] >= STRONG_MIN_MATCHES)
    ask = (
        (seen[slots] <= p.window) & (pairs[slots] > 0) & ((own_z >= p.member_z) | weak)
    )
    asking = np.unique(slots[ask])
    first = arrays["first_s"]
    bar = member_bar(p)
    if index is not None:
        kept, arena = index

        def values(some: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
            return member_values(some, pairs, matches, bar)

        kept.update(arena, slots, p.window, values, bar)
        cohort = kept.pool(asking, p.cohort_pace_share, p.cohort_window_s, values)
    else:
        young, young_first, bounds = sorted_young(
            asking, seen, first, p.window, p.cohort_window_s
        )
        # Running sums over them in that order (see running_sums).
        sums = np.empty((5, len(young) + 1), dtype=np.int64)
        running_sums(young, pairs, matches, bar, sums)
        cohort = np.empty((6, len(asking)), dtype=np.int64)
        cohort_sums(
            asking,
            seen,
            first,
            young_first,
            bounds,
            sums,
            p.cohort_pace_share,
            p.cohort_window_s,
            cohort,
        )
    keys, total, hits, member_keys, member_total, member_hits = cohort
    pooled_z = np.maximum(binomial_z(hits, total, rate), 0.0)
    member_z = binomial_z(member_hits, member_total, rate)
    below = binomial_z(matches[asking], pairs[asking], rate) < p.member_z
    overwhelming = (
        (pooled_z >= p.strong_cohort_z)
        & (member_z >= p.strong_cohort_z)
        & (member_keys >= p.cohort_min_keys)
        & (member_total >= p.cohort_min_pairs)
    )
    counted = (
        (keys >= p.cohort_min_keys)
        & (total >= p.cohort_min_pairs)
        & (~below | overwhelming)
    )
    if not counted.any():
        return found
    asking, keys, total, hits = (
        asking[counted],
        keys[counted],
        total[counted],
        hits[counted],
    )
    pooled_z, below = pooled_z[counted], below[counted]
    member_keys, member_z = member_keys[counted], member_z[counted]
    # Each row of a counted key, and which of them it is (asking is sorted).
    at = np.minimum(np.searchsorted(asking, slots), len(asking) - 1)
    rows = asking[at] == slots
    at = at[rows]
    found.pooled_z[rows] = pooled_z[at]
    found.keys[rows] = keys[at]
    found.pairs[rows] = total[at]
    found.matches[rows] = hits[at]
    found.own_pairs[rows] = pairs[slots[rows]]
    found.own_matches[rows] = matches[slots[rows]]
    found.below[rows] = below[at]
    found.member_keys[rows] = member_keys[at]
    found.member_z[rows] = member_z[at]
    return found


def member_values(
    slots: npt.NDArray[np.int64],
    pairs: npt.NDArray[np.int64],
    matches: npt.NDArray[np.int64],
    bar: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Per slot, the five values :func:`running_sums` sums (pairs, matches,
    whether the key is at ``member_z``, and its pairs and matches if so),
    shape ``(len(slots), 5)``: what the index keeps per young key."""
    out = np.empty((len(slots), 5), dtype=np.int64)
    # Compiled: as ten numpy calls it cost 30 µs a batch, as much as the
    # rest of the index's update.
    _member_values(
        np.ascontiguousarray(slots, dtype=np.int64), pairs, matches, bar, out
    )
    return out


@jit
def _member_values(
    slots: npt.NDArray[np.int64],
    pairs: npt.NDArray[np.int64],
    matches: npt.NDArray[np.int64],
    bar: npt.NDArray[np.int64],
    out: npt.NDArray[np.int64],
) -> None:
    """:func:`member_values` into ``out``, by the test of
    :func:`running_sums`."""
    for j in range(len(slots)):
        n_pairs = pairs[slots[j]]
        n_hits = matches[slots[j]]
        member = 0 < n_pairs < len(bar) and n_hits >= bar[n_pairs]
        out[j, 0] = n_pairs
        out[j, 1] = n_hits
        out[j, 2] = 1 if member else 0
        out[j, 3] = n_pairs if member else 0
        out[j, 4] = n_hits if member else 0


@jit
def running_sums(
    young: npt.NDArray[np.int64],
    pairs: npt.NDArray[np.int64],
    matches: npt.NDArray[np.int64],
    bar: npt.NDArray[np.int64],
    sums: npt.NDArray[np.int64],
) -> None:
    """Running sums over the slots ``young`` in their order, 0 first, into
    the five rows of ``sums``: pairs, matches, keys at ``member_z`` (matches
    at least ``bar[pairs]``, see :func:`member_bar`), and
    those keys' pairs and matches.

    One pass, where five numpy cumulative sums over gathered copies doubled
    the look-up's cost. Pairs never exceed ``window - 2`` (counted over the
    first ``window`` rows, and a loaded state is checked for it), so
    ``bar`` covers them; a count past it would be no member.
    """
    totals = np.zeros(5, dtype=np.int64)
    sums[:, 0] = 0
    for j in range(len(young)):
        slot = young[j]
        n_pairs = pairs[slot]
        n_hits = matches[slot]
        totals[0] += n_pairs
        totals[1] += n_hits
        if 0 < n_pairs < len(bar) and n_hits >= bar[n_pairs]:
            totals[2] += 1
            totals[3] += n_pairs
            totals[4] += n_hits
        sums[:, j + 1] = totals


@dataclass(slots=True)
class CohortEvidence:
    """The cohort test's result per row of a batch (see
    :func:`cohort_evidence`): the cohort's pooled z and
    counts, the key's own counts, whether the key is below ``member_z``
    (admitted by an overwhelming cohort), and the cohort's keys at
    ``member_z`` with their pooled z."""

    pooled_z: npt.NDArray[np.float64]
    keys: npt.NDArray[np.int64]
    pairs: npt.NDArray[np.int64]
    matches: npt.NDArray[np.int64]
    own_pairs: npt.NDArray[np.int64]
    own_matches: npt.NDArray[np.int64]
    below: npt.NDArray[np.bool_]
    member_keys: npt.NDArray[np.int64]
    member_z: npt.NDArray[np.float64]

    @classmethod
    def empty(cls, n: int) -> CohortEvidence:
        def counts() -> npt.NDArray[np.int64]:
            return np.zeros(n, dtype=np.int64)

        return cls(
            pooled_z=np.zeros(n),
            keys=counts(),
            pairs=counts(),
            matches=counts(),
            own_pairs=counts(),
            own_matches=counts(),
            below=np.zeros(n, dtype=np.bool_),
            member_keys=counts(),
            member_z=np.zeros(n),
        )
