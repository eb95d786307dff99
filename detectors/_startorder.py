"""``margin``'s keys in order of first time, kept across batches.

``margin`` pools float sums over a key's cohort
(:func:`detectors._cohort.float_pool`): its members are the keys that
started within ``cohort_window_s`` of the asking ones, of any count up to
the asking keys' own plus pace, sorted by count, then first time, then
slot; small cohorts are summed value by value in that order and large ones
as differences of running sums over every such key. Float sums depend on
that order and on which keys the running sums start from, so the integer
Fenwick tree of :class:`detectors._cohortindex.CohortIndex` (sums in any
grouping) cannot give them bit for bit. What was dear was the rest: a
scan of every slot for the candidates and a sort of them on every batch
(3 to 6 ms for a row over 50,000 keys started in one instant).

:class:`StartOrder` keeps every dated slot (``first_s`` above 0, finite) in
one array ordered by first time, then slot, across batches. A look-up
(:func:`pool`) binary-searches the asking keys' span, walks it once
keeping the members, and places them by count in one counting pass (which
keeps time-then-slot order within a count): the very list, bounds and
running sums ``float_pool`` builds, handed to the same kernel, so the
result is the same bit for bit (``tests/detectors/test_start_order.py``).
A batch then costs the keys started near the asking ones once, linearly,
not a sort of them and a scan of every slot: a row over 50,000 keys
started in one instant cost ``margin`` 9.0 ms with the sort and 1.2 ms
with the order in one run of ``tests/detectors/cohort_attack_sim.py``
(load 11 on the shared 2 cores). Still linear, plainly: exact float sums
over such a crowd need every member's value in order on every batch, so
``margin`` stays the dearest of the three cohort tests against the
trickle (``traffic`` and ``ood`` pay log factors).

It holds a time and a slot per dated key, twice over for growth and
tombstones (about 32 bytes per key), 8 bytes per slot of the arena, and 8
per slot noted while it waits for a look-up (:attr:`StartOrder.nbytes`).

Counts and values are read from the arena at the look-up, never kept: only
a slot's first time is, which changes when the slot is first dated (the
detector calls :meth:`StartOrder.touch` with those slots), freed or loaded
(the arena's :meth:`detectors._state.SlotArena.changed`). The upkeep is
lazy: touched slots wait in a list until a look-up, which merges them in
(an append when they come after every kept key, as keys dated by arrival
do); a list longer than the keys kept, a change list the arena gave up on,
or tombstones outnumbering live entries rebuild the order from the arena
(a sort of every dated slot) at the next look-up.

Imports numpy, :mod:`detectors._cohort`, :mod:`detectors._jit` (numba) and
:mod:`detectors._state` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from detectors._cohort import DIRECT_MAX, cohort_float_sums
from detectors._jit import jit
from detectors._state import CHANGED_MAX, SlotArena

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

MIN_CAPACITY = 1024
"""Entries allocated at least; a rebuild allocates twice the dated slots."""


class StartOrder:
    """Dated slots of one arena in order of first time, then slot (see the
    module docstring)."""

    def __init__(self) -> None:
        self.rebuilds = 0
        """Times the order was built from the arena (read by tests)."""
        self._arena: SlotArena | None = None
        self._built = False
        self._times = np.zeros(0)
        self._slots = np.zeros(0, dtype=np.int64)
        self._n = 0
        self._live = 0
        self._pos = np.zeros(0, dtype=np.int64)
        self._pending: list[IntArray] = []
        self._n_pending = 0

    @property
    def nbytes(self) -> int:
        """Bytes the order holds (its arrays, not the waiting list)."""
        return self._times.nbytes + self._slots.nbytes + self._pos.nbytes

    def touch(self, arena: SlotArena, slots: IntArray) -> None:
        """Note slots whose first time this batch set; read at the next
        look-up. Costs an append, whatever the arena holds."""
        if arena is not self._arena or not self._built:
            # Rebuilt from the arena at the next look-up anyway.
            self._arena = arena
            self._built = False
            return
        self._pending.append(slots)
        self._n_pending += len(slots)
        if self._n_pending > max(CHANGED_MAX, self._live):
            # A rebuild costs a sort of the dated slots: no dearer than
            # re-reading this many, and the list stops growing.
            self._built = False
            self._pending.clear()
            self._n_pending = 0

    def sync(self, arena: SlotArena) -> None:
        """Bring the order up to date with ``arena`` (a look-up does)."""
        changed = arena.changed() if self._built and arena is self._arena else None
        if changed is None or 2 * (self._n - self._live) > max(self._n, MIN_CAPACITY):
            self._rebuild(arena)
            return
        parts = [*self._pending, changed]
        self._pending.clear()
        self._n_pending = 0
        slots = np.ascontiguousarray(np.concatenate(parts), dtype=np.int64)
        if not len(slots):
            return
        first = arena.arrays["first_s"]
        if len(first) > len(self._pos):
            grown = np.full(len(first), -1, dtype=np.int64)
            grown[: len(self._pos)] = self._pos
            self._pos = grown
        new = np.zeros(len(slots), dtype=np.int64)
        n_new, removed = _drop_moved(
            slots, first, self._times, self._slots, self._pos, new
        )
        self._live -= removed
        if not n_new:
            return
        new = new[:n_new]
        new = new[np.lexsort((new, first[new]))]
        times = first[new]
        n = self._n
        after = n == 0 or times[0] > self._times[n - 1]
        if not after and times[0] == self._times[n - 1]:
            after = 0 <= self._slots[n - 1] < new[0]
        if after and n + n_new <= len(self._times):
            self._times[n : n + n_new] = times
            self._slots[n : n + n_new] = new
            self._pos[new] = np.arange(n, n + n_new)
            self._n = n + n_new
        else:
            capacity = max(MIN_CAPACITY, 2 * (self._live + n_new))
            merged_times = np.zeros(capacity)
            merged_slots = np.full(capacity, -1, dtype=np.int64)
            self._n = _merge(
                self._times,
                self._slots,
                n,
                times,
                new,
                merged_times,
                merged_slots,
                self._pos,
            )
            self._times, self._slots = merged_times, merged_slots
        self._live += n_new

    def members(
        self,
        low: float,
        high: float,
        seen: IntArray,
        member_value: FloatArray,
        top: int,
        values: tuple[FloatArray, ...],
    ) -> tuple[IntArray, IntArray, FloatArray, FloatArray]:
        """The slots dated within ``[low, high]`` (as ``first >= low`` and
        ``first <= high`` compute) whose count is 1 to ``top`` and whose
        ``member_value`` is above 0, by count, then time, then slot; where
        each count's run starts (:func:`detectors._cohort.sorted_young`'s
        ``bounds``); their first times; and each of ``values`` at them, one
        row each. :meth:`sync` must have run since the arena changed."""
        bounds = np.zeros(top + 2, dtype=np.int64)
        start, stop = _count_members(
            self._times,
            self._slots,
            self._n,
            low,
            high,
            seen,
            member_value,
            top,
            bounds,
        )
        n_young = int(bounds[top + 1])
        young = np.empty(n_young, dtype=np.int64)
        young_first = np.empty(n_young)
        gathered = np.empty((len(values), n_young))
        _place_members(
            self._times,
            self._slots,
            start,
            stop,
            seen,
            member_value,
            top,
            bounds,
            values,
            young,
            young_first,
            gathered,
        )
        return young, bounds, young_first, gathered

    def _rebuild(self, arena: SlotArena) -> None:
        """Every dated slot in order of first time, then slot."""
        arena.watch()
        # What was freed or loaded before now is in the arrays read here.
        arena.changed()
        self._pending.clear()
        self._n_pending = 0
        first = arena.arrays["first_s"]
        dated = np.flatnonzero((first > 0) & np.isfinite(first))
        # Stable: slots of one time stay in slot order.
        dated = dated[np.argsort(first[dated], kind="stable")]
        n = len(dated)
        capacity = max(MIN_CAPACITY, 2 * n)
        self._times = np.zeros(capacity)
        self._times[:n] = first[dated]
        self._slots = np.full(capacity, -1, dtype=np.int64)
        self._slots[:n] = dated
        self._pos = np.full(len(first), -1, dtype=np.int64)
        self._pos[dated] = np.arange(n)
        self._n = self._live = n
        self._arena = arena
        self._built = True
        self.rebuilds += 1


def pool(
    order: StartOrder,
    arena: SlotArena,
    asking: IntArray,
    seen: IntArray,
    first: FloatArray,
    values: Sequence[FloatArray],
    member_value: FloatArray,
    pace_share: float,
    window_s: float,
) -> FloatArray:
    """:func:`detectors._cohort.float_pool` with ``members`` being
    ``(member_value > 0) & (first > 0)``, from ``order`` (kept for
    ``arena``, whose arrays ``seen``, ``first``, ``values`` and
    ``member_value`` are) rather than a scan and sort: the same result, bit
    for bit. ``order`` is synced here, and only when a key asks."""
    n = len(asking)
    out = np.zeros((len(values) + 1, n))
    if not n:
        # Still run the kernel, as float_pool does: a warm-up whose traffic
        # never pools compiles it before an attacker's first batch would.
        top = 0
        young = np.zeros(0, dtype=np.int64)
        bounds = np.zeros(2, dtype=np.int64)
        young_first = np.zeros(0)
        gathered = np.zeros((len(values), 0))
        if not _upkeep_warm:
            _warm_upkeep()
    else:
        own = seen[asking]
        pace = np.maximum(2.0, pace_share * own.astype(np.float64))
        top = int((own + np.floor(pace)).max())
        # float_pool's candidates: the asking keys' span, widened as there.
        own_first = first[asking]
        low, high = float(own_first.min()), float(own_first.max())
        margin = window_s + 1.0 + 4.0 * float(np.spacing(max(abs(low), abs(high))))
        order.sync(arena)
        young, bounds, young_first, gathered = order.members(
            low - margin, high + margin, seen, member_value, top, tuple(values)
        )
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


_upkeep_warm = False
"""Whether this process ran the order's kernels (see :func:`_warm_upkeep`)."""


def _warm_upkeep() -> None:
    """Run the order's kernels once on nothing: they run only when a key
    asks, so a warm-up (:mod:`detectors.warm`) whose traffic never does
    would leave them to compile in an attacker's first batch."""
    global _upkeep_warm
    ints = np.zeros(1, dtype=np.int64)
    floats = np.zeros(1)
    _drop_moved(ints[:0], floats, floats.copy(), ints.copy(), ints.copy(), ints.copy())
    _merge(
        floats, ints, 0, floats[:0], ints[:0], floats.copy(), ints.copy(), ints.copy()
    )
    bounds = np.zeros(2, dtype=np.int64)
    _count_members(floats, ints, 0, 0.0, 0.0, ints.copy(), floats.copy(), 0, bounds)
    for n_values in (2, 3):
        # margin's two look-ups: openings (2 values) and ranks (3).
        _place_members(
            floats,
            ints,
            0,
            0,
            ints.copy(),
            floats.copy(),
            0,
            bounds,
            tuple(floats.copy() for _ in range(n_values)),
            ints[:0],
            floats[:0],
            np.zeros((n_values, 0)),
        )
    _upkeep_warm = True


@jit
def _drop_moved(
    slots: IntArray,
    first: FloatArray,
    times: FloatArray,
    kept: IntArray,
    pos: IntArray,
    new: IntArray,
) -> tuple[int, int]:
    """Tombstone each kept slot of ``slots`` whose first time is no longer
    its entry's (freed, reused or loaded); list into ``new`` each dated slot
    not kept (once; ``pos`` -2 marks it listed). Returns how many were
    listed and how many tombstoned."""
    n_new = 0
    removed = 0
    for j in range(len(slots)):
        slot = slots[j]
        t = first[slot]
        dated = t > 0 and t < np.inf
        at = pos[slot]
        if at >= 0:
            if dated and times[at] == t:
                continue
            # The tombstone keeps its time: the array stays sorted by time.
            kept[at] = -1
            pos[slot] = -1
            removed += 1
            at = -1
        if at == -1 and dated:
            pos[slot] = -2
            new[n_new] = slot
            n_new += 1
    return n_new, removed


@jit
def _merge(
    times: FloatArray,
    kept: IntArray,
    n: int,
    new_times: FloatArray,
    new: IntArray,
    out_times: FloatArray,
    out_slots: IntArray,
    pos: IntArray,
) -> int:
    """Merge the live entries of ``times``/``kept[:n]`` with ``new`` (sorted
    by time, then slot) into ``out_*`` by time, then slot, dropping
    tombstones and setting ``pos``. Returns the entries written."""
    i = 0
    j = 0
    w = 0
    while i < n or j < len(new):
        if i < n and kept[i] < 0:
            i += 1
            continue
        take_old = j >= len(new) or (
            i < n
            and (
                times[i] < new_times[j]
                or (times[i] == new_times[j] and kept[i] < new[j])
            )
        )
        if take_old:
            out_times[w] = times[i]
            out_slots[w] = kept[i]
            i += 1
        else:
            out_times[w] = new_times[j]
            out_slots[w] = new[j]
            j += 1
        pos[out_slots[w]] = w
        w += 1
    return w


@jit
def _count_members(
    times: FloatArray,
    kept: IntArray,
    n: int,
    low: float,
    high: float,
    seen: IntArray,
    member_value: FloatArray,
    top: int,
    bounds: IntArray,
) -> tuple[int, int]:
    """The run ``[start, stop)`` of entries dated in ``[low, high]`` (one
    run of the sorted times), and into ``bounds`` (zeros, ``top + 2``
    long) where each count's members start; returns the run."""
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        if times[mid] >= low:
            hi = mid
        else:
            lo = mid + 1
    start = lo
    stop = start
    while stop < n and times[stop] <= high:
        stop += 1
    for i in range(start, stop):
        slot = kept[i]
        if slot < 0:
            continue
        count = seen[slot]
        if 1 <= count <= top and member_value[slot] > 0:
            bounds[count + 1] += 1
    for count in range(1, top + 2):
        bounds[count] += bounds[count - 1]
    return start, stop


@jit
def _place_members(
    times: FloatArray,
    kept: IntArray,
    start: int,
    stop: int,
    seen: IntArray,
    member_value: FloatArray,
    top: int,
    bounds: IntArray,
    values: tuple[FloatArray, ...],
    young: IntArray,
    young_first: FloatArray,
    gathered: FloatArray,
) -> None:
    """Each member of the run into its count's place (in order within a
    count), with its time and values: one pass where a placement and a
    gather per value took one each."""
    cursor = bounds[: top + 1].copy()
    for i in range(start, stop):
        slot = kept[i]
        if slot < 0:
            continue
        count = seen[slot]
        if 1 <= count <= top and member_value[slot] > 0:
            at = cursor[count]
            cursor[count] += 1
            young[at] = slot
            young_first[at] = times[i]
            for r in range(len(values)):
                gathered[r, at] = values[r][slot]
