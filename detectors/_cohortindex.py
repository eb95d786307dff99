"""An index of young keys kept across batches, for the cohort look-ups.

:mod:`detectors._cohort` finds each asking key's cohort in young keys sorted
by row count, then first time; sorting them on every batch made a batch of
one row cost as much as the young keys near it (1.7 ms in ``traffic``, 4.4 ms
in ``ood`` over 50,000 keys started in one instant). :class:`CohortIndex`
keeps what that look-up needs across batches, so a batch pays for the slots
it touches and the keys that ask, with log factors, not for every young key.

How it is kept:

- Every young slot indexed has a *coordinate*: its place in one array
  sorted by first time, fixed while it stays young (a slot's first time does
  not change while it holds a client). Each coordinate keeps the slot's row
  count and its values (the counts pooled) as of its last refresh.
- Coordinates are grouped in blocks of ``2**shift``; a Fenwick tree over the
  blocks holds, per row count, the number of slots and the sums of their
  values, so the full blocks of a run of coordinates sum in ``log(blocks)``
  steps per row count within pace.
- A refreshed slot whose count or values changed moves between two entries
  of its block (two tree updates); one that left youth (or whose first time
  changed: a slot freed and reused, or a state loaded) leaves a tombstone
  (count 0). A new young slot whose first time is not before the last
  coordinate's is appended, as every key started in arrival order is; an
  earlier one waits in a short *fresh* list, which each look-up sorts as
  :func:`detectors._cohort.sorted_young` did (only those). A full fresh
  list, or a full array, rebuilds the index from the arena.

A look-up is :func:`detectors._cohort.cohort_sums`'s, with its member test:
the run of coordinates whose time passes ``abs(t - own) <= window_s`` (two
binary searches, :func:`detectors._cohort._run`), within it the slots whose
count passes ``abs(count - own) <= pace``. Sums of integers, so the result is
the same however the members are grouped: bit for bit what the per-batch
sort gave (``tests/detectors/test_cohort_index.py``).

The upkeep is lazy: :meth:`CohortIndex.update` only notes a batch's slots
(and :meth:`CohortIndex.touch` a batch that looked nothing up), and the
index catches up at the next :meth:`CohortIndex.pool` with a key asking.
An established service's batches, where no key asks, so pay one
comparison of the caller's key instead of a re-read of every row (which
made ``ood`` 6 to 10% dearer on ``modelgate bench detectors``' traffic,
against 0 to 2% now; ``docs/cohort-attacks.md``). Slots noted past the
young keys indexed (or :data:`detectors._state.CHANGED_MAX`) drop the
list and rebuild at the next look-up instead, which costs no more than
re-reading them.

The index is derived, never saved: it is rebuilt from the arena when it is
first used, when the arena, ``window`` or the caller's key (``traffic``'s
member bar) changes, when the cohort test was off, and when more slots
were freed or loaded between two look-ups than
:data:`detectors._state.CHANGED_MAX`; otherwise each slot freed, loaded
or noted is re-read from the arena. Per young key it
holds a coordinate's time, count and values, and ``(window + 1) * (values +
1) * 8`` bytes per block of at least 64 coordinates, all twice over for
tombstones and growth (about 170 bytes in ``traffic``, 110 in ``ood``), and
8 bytes per slot of the arena (:attr:`CohortIndex.nbytes`), and 8 bytes per
slot noted while it waits for a look-up.

Imports numpy, :mod:`detectors._cohort`, :mod:`detectors._jit` (numba) and
:mod:`detectors._state` only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from detectors._cohort import _run, cohort_sums, sorted_young
from detectors._jit import jit
from detectors._state import CHANGED_MAX, SlotArena

IntArray = npt.NDArray[np.int64]

FRESH = -2
"""``slot_coord`` of a slot waiting in the fresh list (-1: not indexed)."""

PENDING = -3
"""``slot_coord`` of a newly young slot while :func:`_refresh` places it."""

FRESH_MIN = 256
"""Fresh slots held before a rebuild, plus one per 32 coordinates: a rebuild
costs a sort of every young key, the fresh list a sort of its own slots per
look-up, and this keeps both small against a batch."""

MIN_CAPACITY = 1024
"""Coordinates allocated at least; a rebuild allocates twice the young keys."""

Values = Callable[[IntArray], IntArray]
"""The caller's counts pooled, for some slots: shape (len(slots), values)."""


class CohortIndex:
    """Young slots (1 to ``window`` rows seen) of one arena, with the values
    pooled over cohorts, kept for :meth:`pool` across batches (see the
    module docstring).

    Parameters
    ----------
    n_values
        Values per slot that :meth:`pool` sums (the number of members comes
        first, besides them).
    """

    def __init__(self, n_values: int) -> None:
        self.n_values = n_values
        self.rebuilds = 0
        """Times the index was built from the arena (read by tests)."""
        self._arena: SlotArena | None = None
        self._window = -1
        self._key = np.zeros(0, dtype=np.int64)
        self._built = False
        self._shift = 6
        self._n_coords = 0
        self._n_fresh = 0
        self._slot_coord = np.zeros(0, dtype=np.int64)
        self._coord_time = np.zeros(0)
        self._coord_count = np.zeros(0, dtype=np.int64)
        self._coord_values = np.zeros((0, n_values), dtype=np.int64)
        self._tree = np.zeros((1, 1, n_values + 1), dtype=np.int64)
        self._fresh = np.zeros(0, dtype=np.int64)
        # Slots noted since the last look-up (update, touch), re-read then.
        self._pending: list[IntArray] = []
        self._n_pending = 0

    @property
    def nbytes(self) -> int:
        """Bytes the index holds (its arrays)."""
        return sum(
            a.nbytes
            for a in (
                self._slot_coord,
                self._coord_time,
                self._coord_count,
                self._coord_values,
                self._tree,
                self._fresh,
            )
        )

    def stale(self) -> None:
        """Forget the index; the next look-up rebuilds it. For a caller
        that skips a batch's update (its cohort test off)."""
        self._built = False
        self._pending.clear()
        self._n_pending = 0

    def touch(self, touched: IntArray) -> None:
        """Note slots whose counts changed in a batch that did not look
        anything up (nor call :meth:`update`): re-read at the next look-up,
        as :meth:`update`'s are."""
        if self._built:
            self._note(touched)

    def update(
        self,
        arena: SlotArena,
        touched: IntArray,
        window: int,
        values: Values,
        key: IntArray | None = None,
    ) -> None:
        """Note a batch: ``touched`` (its slots, in any order, repeats
        allowed) are re-read, with every slot the arena freed or loaded
        meanwhile, at the next :meth:`pool` with a key asking; a change of
        ``arena``, ``window`` or ``key`` (anything ``values`` depends on
        besides the arena: ``traffic``'s member bar) rebuilds it then.

        Lazy: a batch with no key asking, an established service's usual
        one, pays for this call only (one comparison of ``key``), not for
        re-reading its slots. Slots noted past the young keys indexed (or
        :data:`detectors._state.CHANGED_MAX`) drop the list and rebuild
        at the next look-up instead, which costs no more than re-reading
        them and keeps the list bounded.
        """
        key = np.zeros(0, dtype=np.int64) if key is None else key
        if (
            not self._built
            or arena is not self._arena
            or window != self._window
            or not np.array_equal(key, self._key)
        ):
            self.stale()
            self._arena, self._window, self._key = arena, window, key.copy()
            return
        self._note(touched)

    def _note(self, touched: IntArray) -> None:
        self._pending.append(touched)
        self._n_pending += len(touched)
        if self._n_pending > max(CHANGED_MAX, self._n_coords):
            self.stale()

    def _catch_up(self, values: Values) -> None:
        """Re-read the slots noted and those the arena freed or loaded since
        the last look-up, or rebuild (see :meth:`update`)."""
        arena, window, key = self._arena, self._window, self._key
        assert arena is not None
        seen = arena.arrays["n_seen"]
        changed = arena.changed() if self._built else None
        if changed is None:
            self._rebuild(arena, window, values, key)
            return
        # Repeats are harmless: a slot read twice is unchanged the second time.
        slots = np.concatenate([*self._pending, changed])
        self._pending.clear()
        self._n_pending = 0
        if len(seen) > len(self._slot_coord):
            grown = np.full(len(seen), -1, dtype=np.int64)
            grown[: len(self._slot_coord)] = self._slot_coord
            self._slot_coord = grown
        # Only young or indexed slots matter (a fresh one is read at each
        # look-up): most of an established service's rows are neither, and
        # their values are not computed.
        slots = slots.astype(np.int64, copy=False)
        count = seen[slots]
        slots = slots[
            ((count > 0) & (count <= window)) | (self._slot_coord[slots] >= 0)
        ]
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        self._n_coords, self._n_fresh, full = _refresh(
            slots,
            seen,
            arena.arrays["first_s"],
            np.ascontiguousarray(values(slots), dtype=np.int64),
            window,
            self._shift,
            self._slot_coord,
            self._coord_time,
            self._coord_count,
            self._coord_values,
            self._tree,
            self._n_coords,
            self._fresh,
            self._n_fresh,
        )
        if full:
            self._rebuild(arena, window, values, key)

    def pool(
        self,
        asking: IntArray,
        pace_share: float,
        window_s: float,
        values: Values,
    ) -> IntArray:
        """For each asking slot (unique), its cohort among the young slots:
        shape ``(1 + n_values, len(asking))``, the number of members, then
        the sum of each value over them; what
        :func:`detectors._cohort.cohort_sums` gives over young slots sorted
        per batch. :meth:`update` must have run since the arena changed
        (the index catches up here, if a key asks)."""
        assert self._arena is not None
        if len(asking):
            self._catch_up(values)
        elif not _upkeep_warm:
            _warm_upkeep(self.n_values)
        arrays = self._arena.arrays
        seen, first = arrays["n_seen"], arrays["first_s"]
        asking = np.ascontiguousarray(asking, dtype=np.int64)
        out = np.zeros((1 + self.n_values, len(asking)), dtype=np.int64)
        # Keys of one count and first time have one cohort: in this order the
        # kernel looks it up once (a crowd started in one instant asks as one).
        order = np.lexsort((first[asking], seen[asking]))
        # Always run the kernel: a warm-up whose traffic never asks compiles
        # it before an attacker's first batch would.
        _lookup(
            asking,
            order,
            seen,
            first,
            self._window,
            pace_share,
            window_s,
            self._shift,
            self._coord_time,
            self._coord_count,
            self._coord_values,
            self._n_coords,
            self._tree,
            out,
        )
        fresh = self._fresh[: self._n_fresh]
        if len(asking) and len(fresh):
            # The fresh slots' share, from the arena as it is now: sorted by
            # count then time as the per-batch look-up did, only these.
            fresh = fresh[(seen[fresh] > 0) & (seen[fresh] <= self._window)]
            young, young_first, bounds = sorted_young(
                asking, seen, first, self._window, window_s, fresh
            )
            sums = np.zeros((self.n_values, len(young) + 1), dtype=np.int64)
            np.cumsum(values(young).T, axis=1, out=sums[:, 1:])
            extra = np.empty_like(out)
            cohort_sums(
                asking,
                seen,
                first,
                young_first,
                bounds,
                sums,
                pace_share,
                window_s,
                extra,
            )
            out += extra
        return out

    def _rebuild(
        self, arena: SlotArena, window: int, values: Values, key: IntArray
    ) -> None:
        """Build the index from the arena: every young slot appended in
        order of first time, no tombstones, no fresh slots."""
        arena.watch()
        # What was freed or loaded before now is in the arrays read here.
        arena.changed()
        self._pending.clear()
        self._n_pending = 0
        seen, first = arena.arrays["n_seen"], arena.arrays["first_s"]
        young = np.flatnonzero((seen > 0) & (seen <= window))
        young = young[np.argsort(first[young], kind="stable")]
        n = len(young)
        capacity = max(MIN_CAPACITY, 2 * n)
        # Blocks at least as long as the row counts a look-up walks, so a
        # run's two partial blocks cost no more than its counts.
        self._shift = max(6, int(window + 1).bit_length())
        n_blocks = (capacity >> self._shift) + 1
        self._coord_time = np.zeros(capacity)
        self._coord_time[:n] = first[young]
        self._coord_count = np.zeros(capacity, dtype=np.int64)
        self._coord_count[:n] = seen[young]
        self._coord_values = np.zeros((capacity, self.n_values), dtype=np.int64)
        self._coord_values[:n] = values(young)
        self._slot_coord = np.full(len(seen), -1, dtype=np.int64)
        self._slot_coord[young] = np.arange(n)
        self._tree = np.zeros((n_blocks + 1, window + 1, self.n_values + 1), np.int64)
        _build_tree(self._coord_count, self._coord_values, n, self._shift, self._tree)
        self._n_coords = n
        self._fresh = np.zeros(FRESH_MIN + n // 32, dtype=np.int64)
        self._n_fresh = 0
        self._arena, self._window, self._key = arena, window, key.copy()
        self._built = True
        self.rebuilds += 1


_upkeep_warm = False
"""Whether this process ran the upkeep kernels (see :func:`_warm_upkeep`)."""


def _warm_upkeep(n_values: int) -> None:
    """Run the upkeep kernels once on nothing: with the upkeep lazy, a
    warm-up (:mod:`detectors.warm`) whose traffic never asks would leave
    them to compile in an attacker's first batch, seconds late."""
    global _upkeep_warm
    ints = np.zeros(0, dtype=np.int64)
    tree = np.zeros((2, 2, n_values + 1), dtype=np.int64)
    table = np.zeros((0, n_values), dtype=np.int64)
    _refresh(
        ints,
        ints,
        np.zeros(0),
        table,
        1,
        6,
        ints,
        np.zeros(0),
        ints.copy(),
        table.copy(),
        tree,
        0,
        ints.copy(),
        0,
    )
    _build_tree(ints, table, 0, 6, tree)
    _tree_add(tree, 0, 1, np.zeros(n_values, dtype=np.int64), 0)
    _tree_move(
        tree,
        0,
        1,
        1,
        np.zeros((1, n_values), dtype=np.int64),
        0,
        np.zeros((1, n_values), dtype=np.int64),
        0,
    )
    _upkeep_warm = True


@jit
def _tree_add(
    tree: IntArray,
    block: int,
    count: int,
    values: IntArray,
    sign: int,
) -> None:
    """Add (``sign`` 1) or take away (-1) one slot of ``count`` rows and its
    ``values`` at ``block`` of the Fenwick tree (nodes from 1)."""
    i = block + 1
    n_nodes = tree.shape[0] - 1
    while i <= n_nodes:
        tree[i, count, 0] += sign
        for q in range(len(values)):
            tree[i, count, q + 1] += sign * values[q]
        i += i & -i


@jit
def _tree_move(
    tree: IntArray,
    block: int,
    old_count: int,
    new_count: int,
    old_values: IntArray,
    at: int,
    new_values: IntArray,
    j: int,
) -> None:
    """Move one slot of ``block`` from ``old_count`` rows and values
    ``old_values[at]`` to ``new_count`` and ``new_values[j]``: one walk up
    the tree where a removal and an addition took two (a batch's rows are
    mostly such moves)."""
    i = block + 1
    n_nodes = tree.shape[0] - 1
    n_values = old_values.shape[1]
    while i <= n_nodes:
        tree[i, old_count, 0] -= 1
        tree[i, new_count, 0] += 1
        for q in range(n_values):
            tree[i, old_count, q + 1] -= old_values[at, q]
            tree[i, new_count, q + 1] += new_values[j, q]
        i += i & -i


@jit
def _build_tree(
    coord_count: IntArray,
    coord_values: IntArray,
    n_coords: int,
    shift: int,
    tree: IntArray,
) -> None:
    """The Fenwick tree of the first ``n_coords`` coordinates, from zeros:
    each block's sums into its own node, then each node into its parent
    (linear, where an update per slot would take a log factor more)."""
    n_values = coord_values.shape[1]
    for i in range(n_coords):
        node = (i >> shift) + 1
        count = coord_count[i]
        tree[node, count, 0] += 1
        for q in range(n_values):
            tree[node, count, q + 1] += coord_values[i, q]
    n_nodes = tree.shape[0] - 1
    for node in range(1, n_nodes + 1):
        parent = node + (node & -node)
        if parent <= n_nodes:
            tree[parent] += tree[node]


@jit
def _refresh(
    slots: IntArray,
    seen: IntArray,
    first: npt.NDArray[np.float64],
    values: IntArray,
    window: int,
    shift: int,
    slot_coord: IntArray,
    coord_time: npt.NDArray[np.float64],
    coord_count: IntArray,
    coord_values: IntArray,
    tree: IntArray,
    n_coords: int,
    fresh: IntArray,
    n_fresh: int,
) -> tuple[int, int, bool]:
    """Re-read ``slots`` (repeats allowed; ``values`` theirs, in order):
    move each indexed one to its present count and values, tombstone one
    no longer young or whose first time changed, append or hold as fresh
    one newly young. Returns the coordinates and fresh slots now used, and
    whether either ran out (then the caller rebuilds; what was done is
    harmless)."""
    n_values = values.shape[1]
    capacity = len(coord_time)
    n_blocks = tree.shape[0] - 1
    # Newly young slots (their row j), placed after the others in order of
    # first time: a batch's new keys then append rather than wait as fresh.
    new_rows = np.empty(len(slots), dtype=np.int64)
    n_new = 0
    for j in range(len(slots)):
        slot = slots[j]
        count = seen[slot]
        if count < 1 or count > window:
            count = 0
        at = slot_coord[slot]
        if at >= 0:
            if count > 0 and coord_time[at] == first[slot]:
                same = coord_count[at] == count
                for q in range(n_values):
                    if coord_values[at, q] != values[j, q]:
                        same = False
                if not same:
                    _tree_move(
                        tree,
                        at >> shift,
                        coord_count[at],
                        count,
                        coord_values,
                        at,
                        values,
                        j,
                    )
                    coord_count[at] = count
                    for q in range(n_values):
                        coord_values[at, q] = values[j, q]
                continue
            _tree_add(tree, at >> shift, coord_count[at], coord_values[at], -1)
            coord_count[at] = 0
            coord_values[at] = 0
            slot_coord[slot] = -1
            at = -1
        if at < -1 or count == 0:
            # Fresh (read from the arena at each look-up) or already pending.
            continue
        slot_coord[slot] = PENDING
        new_rows[n_new] = j
        n_new += 1
    new_rows = new_rows[:n_new]
    new_times = np.empty(n_new)
    for i in range(n_new):
        new_times[i] = first[slots[new_rows[i]]]
    for j in new_rows[np.argsort(new_times)]:
        slot = slots[j]
        count = seen[slot]
        t = first[slot]
        if (
            n_coords < capacity
            and (n_coords >> shift) < n_blocks
            and (n_coords == 0 or t >= coord_time[n_coords - 1])
        ):
            coord_time[n_coords] = t
            coord_count[n_coords] = count
            coord_values[n_coords] = values[j]
            _tree_add(tree, n_coords >> shift, count, values[j], 1)
            slot_coord[slot] = n_coords
            n_coords += 1
        elif n_fresh < len(fresh):
            fresh[n_fresh] = slot
            n_fresh += 1
            slot_coord[slot] = FRESH
        else:
            slot_coord[slot] = -1
            return n_coords, n_fresh, True
    return n_coords, n_fresh, False


@jit
def _lookup(
    asking: IntArray,
    order: IntArray,
    seen: IntArray,
    first: npt.NDArray[np.float64],
    window: int,
    pace_share: float,
    window_s: float,
    shift: int,
    coord_time: npt.NDArray[np.float64],
    coord_count: IntArray,
    coord_values: IntArray,
    n_coords: int,
    tree: IntArray,
    out: IntArray,
) -> None:
    """For each asking slot ``k``, the indexed slots of a count within pace
    and a time within ``window_s`` of its own (the tests of
    :func:`detectors._cohort.cohort_sums`, as computed there): their number
    into ``out[0, k]``, their values' sums into ``out[1:, k]``.

    The times pass in one run of the coordinates (sorted by time, so a
    rounded difference never decreases away from ``own``); the counts in
    one range (``abs`` of their difference grows away from the key's own
    count). The run's full blocks are summed from the tree over that
    range, its partial end blocks slot by slot; tombstones have count 0,
    below every range. ``order`` puts asking slots of one count and first
    time next to each other; each such group is looked up once.
    """
    n_values = coord_values.shape[1]
    previous = -1
    for j in range(len(order)):
        k = order[j]
        slot = asking[k]
        own_seen = seen[slot]
        own = first[slot]
        if (
            previous >= 0
            and own_seen == seen[asking[previous]]
            and own == first[asking[previous]]
        ):
            for r in range(n_values + 1):
                out[r, k] = out[r, previous]
            continue
        previous = k
        pace = max(2.0, pace_share * own_seen)
        for r in range(n_values + 1):
            out[r, k] = 0
        low = window + 1
        high = 0
        for count in range(1, window + 1):
            if abs(count - own_seen) <= pace:
                low = min(low, count)
                high = count
        if high == 0:
            continue
        start, stop = _run(coord_time, 0, n_coords, own, window_s)
        if start >= stop:
            continue
        first_block = start >> shift
        last_block = stop >> shift
        # The partial blocks (one, if the run lies in one block).
        head_stop = stop if first_block == last_block else (first_block + 1) << shift
        tail_start = max(head_stop, last_block << shift)
        for i in range(start, head_stop):
            _take(coord_count, coord_values, i, low, high, out, k)
        for i in range(tail_start, stop):
            _take(coord_count, coord_values, i, low, high, out, k)
        if last_block <= first_block + 1:
            continue
        # The full blocks first_block + 1 .. last_block - 1: a difference of
        # two prefix sums of the tree.
        node = last_block
        while node > 0:
            _add_node(tree, node, low, high, 1, out, k)
            node -= node & -node
        node = first_block + 1
        while node > 0:
            _add_node(tree, node, low, high, -1, out, k)
            node -= node & -node


@jit
def _take(
    coord_count: IntArray,
    coord_values: IntArray,
    i: int,
    low: int,
    high: int,
    out: IntArray,
    k: int,
) -> None:
    """Coordinate ``i`` into ``out[:, k]`` if its count is in ``[low, high]``."""
    count = coord_count[i]
    if low <= count <= high:
        out[0, k] += 1
        for q in range(coord_values.shape[1]):
            out[q + 1, k] += coord_values[i, q]


@jit
def _add_node(
    tree: IntArray,
    node: int,
    low: int,
    high: int,
    sign: int,
    out: IntArray,
    k: int,
) -> None:
    """A tree node's sums over counts ``low`` to ``high`` into ``out[:, k]``."""
    for count in range(low, high + 1):
        for r in range(tree.shape[2]):
            out[r, k] += sign * tree[node, count, r]
