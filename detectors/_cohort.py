"""Cohorts: keys that started together and keep one pace, judged as one stream.

A thief spreading one stream over many API keys gives each key too few rows
to be judged alone, but its keys start within a moment of each other and send
at one pace. ``ood``, ``traffic`` and ``margin`` pool their counts over
such keys, and this module finds each asking key's cohort without a scan of
every key: the young keys are sorted by row count, then by first request
time, with running sums of the counts pooled, and each asking key's cohort
is a few binary searches (:func:`cohort_sums`). ``ood`` pools two counts
(:func:`pool`); ``traffic`` five, those of every key and those of its keys
at the ordinary member bar, which its second, lower bar needs; ``margin``
float sums (:func:`float_pool`).

Sorted here, the young keys are sorted on every batch, which costs a batch
in proportion to the young keys near the asking ones whatever its own rows.
``ood`` and ``traffic`` therefore keep them across batches in
:class:`detectors._cohortindex.CohortIndex`, which finds the same members
by the same tests (:func:`_run`), and ``margin`` keeps its keys in order of
first time in :class:`detectors._startorder.StartOrder`, which hands
:func:`cohort_float_sums` the very list :func:`float_pool` sorts;
:func:`pool`, :func:`float_pool` and :func:`sorted_young` remain their
reference (tests, ``tests/detectors/cohort_attack_sim.py``) and the
index's way with its few fresh keys.

Imports numpy and :mod:`detectors._jit` (numba) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from detectors._jit import jit


@dataclass(frozen=True, slots=True)
class Pooled:
    """Per asking key: the cohort's size (itself included) and the sums of
    the two pooled counts over its members."""

    keys: npt.NDArray[np.int64]
    total_a: npt.NDArray[np.int64]
    total_b: npt.NDArray[np.int64]


def candidates(
    asking: npt.NDArray[np.int64],
    seen: npt.NDArray[np.int64],
    first: npt.NDArray[np.float64],
    window: int,
    window_s: float,
) -> npt.NDArray[np.int64]:
    """The young slots (seen 1 to ``window`` rows) that can be in an asking
    slot's cohort: first time within ``window_s`` of the asking slots' span,
    widened by a second and four float spacings so that no member the
    kernel's rounded test takes is left out. Sorting and summing these
    instead of every young slot makes an attacker's batch, whose keys all
    started in one moment, cost little however many honest keys are
    young."""
    if len(asking) == 0:
        return np.zeros(0, dtype=np.int64)
    young = (seen > 0) & (seen <= window)
    own = first[asking]
    low, high = float(own.min()), float(own.max())
    margin = window_s + 1.0 + 4.0 * float(np.spacing(max(abs(low), abs(high))))
    return np.flatnonzero(young & (first >= low - margin) & (first <= high + margin))


def sorted_young(
    asking: npt.NDArray[np.int64],
    seen: npt.NDArray[np.int64],
    first: npt.NDArray[np.float64],
    window: int,
    window_s: float,
    young: npt.NDArray[np.int64] | None = None,
    stable: bool = False,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """The young slots that may be in an asking slot's cohort (``young``, or
    :func:`candidates` when None), sorted by row count, then first time; their
    first times; and ``bounds``, where each row count's run starts (count 0
    has none): what :func:`cohort_sums` searches, with running sums of the
    counts pooled taken in the same order.

    No slot asking gives empty arrays: the kernel still runs on every batch,
    so a warm-up whose traffic never pools compiles it before an attacker's
    first batch would.
    """
    if not len(asking):
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.empty(0), np.zeros(window + 2, dtype=np.int64)
    if young is None:
        young = candidates(asking, seen, first, window, window_s)
    # By count, then time: a sort by time, then a stable one by count (a
    # radix sort on 16 bits), five times faster than np.lexsort.
    young = young[np.argsort(first[young], kind="stable" if stable else None)]
    young = young[np.argsort(seen[young].astype(np.uint16), kind="stable")]
    bounds = np.searchsorted(seen[young], np.arange(window + 2))
    return young, first[young], bounds


def pool(
    asking: npt.NDArray[np.int64],
    seen: npt.NDArray[np.int64],
    first: npt.NDArray[np.float64],
    count_a: npt.NDArray[np.int64],
    count_b: npt.NDArray[np.int64],
    window: int,
    pace_share: float,
    window_s: float,
    young: npt.NDArray[np.int64] | None = None,
) -> Pooled:
    """The cohort sums of each asking slot.

    Parameters
    ----------
    asking
        Slots looking for their cohort (unique).
    seen, first
        Per slot: rows seen, and the time of its first one (seconds).
    count_a, count_b
        Per slot: the two counts pooled. Read only at young slots.
    window
        A slot is young while it has seen at most this many rows (and one).
    pace_share, window_s
        Row counts within ``max(2, pace_share * own)`` of the asking slot's,
        and first times within ``window_s`` of its own, make a member.
    young
        The slots that may be members (:func:`candidates`, which it is when
        None); any other young slot is taken as too far in time.

    Returns
    -------
    Pooled
        One entry per asking slot, in ``asking`` order.
    """
    n = len(asking)
    young, young_first, bounds = sorted_young(
        asking, seen, first, window, window_s, young
    )
    # Running sums of the two counts in that order, 0 first.
    sums = np.zeros((2, len(young) + 1), dtype=np.int64)
    np.cumsum(count_a[young], out=sums[0, 1:])
    np.cumsum(count_b[young], out=sums[1, 1:])
    found = np.empty((3, n), dtype=np.int64)
    cohort_sums(
        np.ascontiguousarray(asking, dtype=np.int64),
        seen,
        first,
        young_first,
        bounds,
        sums,
        pace_share,
        window_s,
        found,
    )
    return Pooled(found[0], found[1], found[2])


@jit
def _run(
    young_first: npt.NDArray[np.float64],
    lo: int,
    hi: int,
    own: float,
    window_s: float,
) -> tuple[int, int]:
    """The run ``[start, stop)`` of ``young_first[lo:hi]`` (sorted) whose
    times pass ``abs(t - own) <= window_s`` as computed, by two binary
    searches with that same test (see :func:`cohort_sums`)."""
    end = hi
    # First index whose time is at or after own, or close enough.
    while lo < hi:
        mid = (lo + hi) // 2
        t = young_first[mid]
        if t >= own or abs(t - own) <= window_s:
            hi = mid
        else:
            lo = mid + 1
    start = lo
    # First index past own and too far.
    hi = end
    while lo < hi:
        mid = (lo + hi) // 2
        t = young_first[mid]
        if t > own and not abs(t - own) <= window_s:
            hi = mid
        else:
            lo = mid + 1
    return start, lo


@jit
def cohort_sums(
    asking: npt.NDArray[np.int64],
    seen: npt.NDArray[np.int64],
    first: npt.NDArray[np.float64],
    young_first: npt.NDArray[np.float64],
    bounds: npt.NDArray[np.int64],
    sums: npt.NDArray[np.int64],
    pace_share: float,
    window_s: float,
    out: npt.NDArray[np.int64],
) -> None:
    """For each asking slot ``k``, the young keys whose first request time is
    within ``window_s`` of its own and whose request count is within
    ``max(2, pace_share * count)`` of its own: their number into ``out[0,
    k]``, and the sums of each row of ``sums`` over them into ``out[1:,
    k]``.

    The young keys are sorted by count, then first time; ``bounds[v]`` is
    where those with count ``v`` start, each row of ``sums`` a running sum
    in that order (0 first). Within one count, the keys whose ``abs(t -
    own) <= window_s`` (as computed, rounding included) form one run of the
    sorted times, since a rounded difference never decreases as ``t``
    moves away from ``own``: two binary searches find its ends with that
    same test, so the members are exactly those a scan would take.
    """
    n_sums = sums.shape[0]
    for k in range(len(asking)):
        slot = asking[k]
        own_seen = seen[slot]
        own = first[slot]
        pace = max(2.0, pace_share * own_seen)
        for r in range(n_sums + 1):
            out[r, k] = 0
        for count in range(1, len(bounds) - 1):
            if not abs(count - own_seen) <= pace:
                continue
            start, stop = _run(
                young_first, bounds[count], bounds[count + 1], own, window_s
            )
            out[0, k] += stop - start
            for r in range(n_sums):
                out[r + 1, k] += sums[r, stop] - sums[r, start]


DIRECT_MAX = 64
"""Members up to which :func:`cohort_float_sums` adds a cohort's values one
by one rather than as a difference of running sums: a difference of two
running float sums over tens of thousands of keys rounds at the scale of
those sums, which a small cohort's own sum may be far below."""


def float_pool(
    asking: npt.NDArray[np.int64],
    seen: npt.NDArray[np.int64],
    first: npt.NDArray[np.float64],
    values: Sequence[npt.NDArray[np.float64]],
    members: npt.NDArray[np.bool_],
    pace_share: float,
    window_s: float,
) -> npt.NDArray[np.float64]:
    """The cohort of each asking slot among the slots of ``members``: slots
    whose first time is within ``window_s`` of its own and whose count is
    within ``max(2, pace_share * own)`` of its own; any count, not only
    young ones (``margin`` takes every key that started with it).

    Parameters
    ----------
    asking
        Slots looking for their cohort (unique).
    seen, first
        Per slot: its count, and the time of its first row (seconds).
    values
        Per slot, each of the ``r`` float values summed over each cohort.
    members
        Per slot, whether it may be a member at all.
    pace_share, window_s
        As in :func:`pool`.

    Returns
    -------
    array
        Shape (r + 1, len(asking)): the number of members, then the sum of
        each row of ``values`` over them. Exact for small cohorts (up to
        :data:`DIRECT_MAX` members, summed in sorted order); a difference of
        running sums beyond, so a batch costs a sort of the slots that
        started near the asking ones and a few binary searches per asking
        slot, however large the cohorts.

    Notes
    -----
    Slots of one count and one first time are summed in slot order (a
    stable sort of :func:`candidates`' list), so the result does not hang
    on how numpy's sort breaks ties. ``margin`` no longer calls this per
    batch: :func:`detectors._startorder.pool` gives the same result from
    keys kept in order across batches, without this function's scan of
    every slot and sort (``docs/cohort-attacks.md``). The integer index of
    ``traffic`` and ``ood`` (:class:`detectors._cohortindex.CohortIndex`,
    sums in any grouping) could not: members here depend on the asking
    keys' counts (``top``), small sums on the sorted order, large ones on
    which keys the running sums start from.
    """
    n = len(asking)
    out = np.zeros((len(values) + 1, n))
    if not n:
        # Still run the kernel: a warm-up whose traffic never pools compiles
        # it before an attacker's first batch would.
        top = 0
    else:
        own = seen[asking]
        pace = np.maximum(2.0, pace_share * own.astype(np.float64))
        top = int((own + np.floor(pace)).max())
    young = np.zeros(0, dtype=np.int64)
    if n:
        young = candidates(asking, seen, first, top, window_s)
        young = young[members[young]]
    # Slots of one count and time in slot order (candidates lists them so):
    # the order the sums run in, which :mod:`detectors._startorder` keeps.
    young, young_first, bounds = sorted_young(
        asking, seen, first, top, window_s, young, stable=True
    )
    gathered = np.zeros((len(values), len(young)))
    for r, value in enumerate(values):
        gathered[r] = value[young]
    sums = np.empty((len(values), len(young) + 1))
    cohort_float_sums(
        np.ascontiguousarray(asking, dtype=np.int64),
        seen,
        first,
        young_first,
        bounds,
        gathered,
        sums,
        pace_share,
        window_s,
        DIRECT_MAX,
        out,
    )
    return out


@jit
def cohort_float_sums(
    asking: npt.NDArray[np.int64],
    seen: npt.NDArray[np.int64],
    first: npt.NDArray[np.float64],
    young_first: npt.NDArray[np.float64],
    bounds: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
    sums: npt.NDArray[np.float64],
    pace_share: float,
    window_s: float,
    direct_max: int,
    out: npt.NDArray[np.float64],
) -> None:
    """:func:`cohort_sums` over float values: for each asking slot ``k``, the
    number of members into ``out[0, k]`` and the sums of each row of
    ``values`` over them into ``out[1:, k]``; a member's run of one count is
    found by the same two binary searches. Cohorts of at most
    ``direct_max`` members are summed value by value, larger ones as
    differences of running sums, which go into ``sums`` (0 first; one pass,
    where numpy's cumulative sum over the gathered rows cost a third of the
    look-up)."""
    n_sums = values.shape[0]
    for r in range(n_sums):
        total = 0.0
        sums[r, 0] = 0.0
        for i in range(values.shape[1]):
            total += values[r, i]
            sums[r, i + 1] = total
    n_counts = len(bounds) - 2
    starts = np.empty(max(n_counts, 1), dtype=np.int64)
    stops = np.empty(max(n_counts, 1), dtype=np.int64)
    for k in range(len(asking)):
        slot = asking[k]
        own_seen = seen[slot]
        own = first[slot]
        pace = max(2.0, pace_share * own_seen)
        for r in range(n_sums + 1):
            out[r, k] = 0.0
        # Counts within pace: own +- floor(pace), both integers, so the test
        # below takes no count outside them.
        reach = int(np.floor(pace))
        low_count = max(1, own_seen - reach)
        high_count = min(n_counts, own_seen + reach)
        runs = 0
        size = 0
        for count in range(low_count, high_count + 1):
            if not abs(count - own_seen) <= pace:
                continue
            start, stop = _run(
                young_first, bounds[count], bounds[count + 1], own, window_s
            )
            if stop > start:
                starts[runs] = start
                stops[runs] = stop
                runs += 1
                size += stop - start
        out[0, k] = size
        for r in range(n_sums):
            total = 0.0
            if size <= direct_max:
                for j in range(runs):
                    for i in range(starts[j], stops[j]):
                        total += values[r, i]
            else:
                for j in range(runs):
                    total += sums[r, stops[j]] - sums[r, starts[j]]
            out[r + 1, k] = total
