"""Compiled kernels of the probing detectors (``similarity``, ``knn``,
``structure``) and the thin wrappers that call them.

They live in one module because numba's on-disk cache of a kernel is keyed
on its own source file only: a kernel calling a kernel of another file keeps
its stale compiled copy after that file is edited. Here an edit to any of
them recompiles all.

Queries are compared quantised to 8 bits per feature, with integer
arithmetic, so distances are exact and ties are real ties. Every kernel
takes rows in an order that keeps each client's rows in arrival order and
updates the client's state as it goes, so a batch scores exactly as its rows
sent one at a time.

- :func:`scan_history`: nearest distance and count within a radius, for
  ``detectors._radius``.
- :func:`scan_ring`: the ``k`` nearest distances, the nearest and the
  previous query, for ``detectors._history`` and :func:`nearest_and_push`.
- :func:`push_bits`: :func:`detectors._state.push_window` row by row, with
  the client's query count.
- :func:`step_changes`: ``structure``'s sparse edits and repeated steps.

Imports numpy and ``detectors._jit`` only; nothing from Kafka, Redis, FastAPI
or ``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._jit import jit

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Window = tuple[npt.NDArray[np.uint8], IntArray, IntArray]

MAX_FEATURES = 33_025
"""Widest rows compared: squared distances are summed in int32, and 33,025
squared differences of at most 255**2 stay below 2**31."""

# Rows of a batch taken per chunk by scan_ring, in sorted order. Which of two
# equally near stored queries is the nearest depends on the chunks (the ring
# comes before the chunk's own rows), and structure's pinned scores were
# recorded with chunks of 512.
_CHUNK_ROWS = 512

# Partial sums of a cosine kept apart: products of two float16 steps are
# exact in float64 and every partial sum is below 2 with at most 50
# significant bits, so any grouping gives the same cosine, and independent
# sums let the additions overlap (one chain was measured at 4 cycles a term).
_LANES = 8


@jit
def squared_distance(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> int:
    """Exact squared L2 distance of two quantised rows of at most
    ``MAX_FEATURES`` features.

    Summed in int32, which the compiler vectorises (the order of an integer
    sum does not change it); an int64 sum was measured 2.4 times slower.
    """
    total = np.int32(0)
    for f in range(a.shape[0]):
        diff = np.int32(a[f]) - np.int32(b[f])
        total = np.int32(total + np.int32(diff * diff))
    return int(total)


LEVELS = 255
"""Quantisation of stored features: ``round(x * 255)`` as uint8."""


def quantise(X: FloatArray) -> npt.NDArray[np.uint8]:
    """Rows scaled to [0, 1] as stored: clipped, times 255, rounded (ties to
    even), as uint8."""
    rows = np.ascontiguousarray(X, dtype=np.float64)
    out = np.empty(rows.shape, dtype=np.uint8)
    _quantise(rows, out)
    return out


@jit
def _quantise(X: FloatArray, out: npt.NDArray[np.uint8]) -> None:
    """:func:`quantise` element by element."""
    for i in range(X.shape[0]):
        for f in range(X.shape[1]):
            out[i, f] = np.uint8(np.rint(min(max(X[i, f], 0.0), 1.0) * LEVELS))


# -- similarity and knn -------------------------------------------------------


@jit
def scan_history(
    history: tuple[
        npt.NDArray[np.uint8],
        npt.NDArray[np.float32],
        IntArray,
        IntArray,
    ],
    slots: IntArray,
    rows: npt.NDArray[np.uint8],
    row_sq: npt.NDArray[np.float32],
    radius_sq: float,
    scale: float,
    out: tuple[FloatArray, IntArray],
) -> None:
    """Row by row in arrival order: compare with the client's stored
    queries, then append the row to its ring.

    ``history`` is the arena's ``hist``, ``hist_sq``, ``hist_pos`` and
    ``hist_len`` (``detectors._radius.history_fields``); ``row_sq`` each
    row's squared norm as stored. ``out`` gets per row ``sqrt(best /
    scale)`` of the smallest squared distance (``inf`` with no history) and
    the stored queries whose squared distance is above 0 (not an exact copy)
    and below ``radius_sq``. A ring that is not full holds its entries at
    indices ``0 .. length - 1`` (``check_history``), so the filled entries
    are a prefix.
    """
    hist, hist_sq, hist_pos, hist_len = history
    nearest, count = out
    capacity = hist.shape[1]
    for i in range(slots.shape[0]):
        slot = slots[i]
        length = hist_len[slot]
        row = rows[i]

        # Against every stored query of the client.
        best = -1
        within = 0
        for j in range(length):
            d_sq = squared_distance(row, hist[slot, j])
            if best < 0 or d_sq < best:
                best = d_sq
            if d_sq > 0 and d_sq < radius_sq:
                within += 1
        nearest[i] = np.inf if best < 0 else np.sqrt(best / scale)
        count[i] = within

        # Append: the client's next row sees this one.
        position = hist_pos[slot]
        hist[slot, position] = row
        hist_sq[slot, position] = row_sq[i]
        hist_pos[slot] = position + 1 if position + 1 < capacity else 0
        hist_len[slot] = min(length + 1, capacity)


# -- knn calibration and structure ----------------------------------------------


@jit
def scan_ring(
    ring: tuple[npt.NDArray[np.uint8], IntArray, IntArray],
    slots: IntArray,
    rows: npt.NDArray[np.uint8],
    out: tuple[
        FloatArray,
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        npt.NDArray[np.bool_],
    ],
) -> None:
    """Compare rows sorted by slot with their clients' rings, then push them.

    ``ring`` is the arena's ``hist``, ``hist_pos`` and ``hist_len``
    (``detectors._history.ring_fields``). ``out`` is filled per row: the
    ``k`` smallest squared distances ascending (``k = out[0].shape[1]``,
    ``inf`` where fewer exist), the nearest earlier query (zeros where there
    is none), the previous query and whether there is one.

    The rows are cut into chunks of ``_CHUNK_ROWS``; a client's rows within
    one chunk form a segment. Row ``t`` of a segment sees the ring entries
    its ``t`` predecessors have not yet evicted, in physical index order,
    then those predecessors latest first (at most ``capacity`` back); the
    first strictly smaller distance makes a new nearest. The segment's last
    ``capacity`` rows are appended once it is done.
    """
    hist, hist_pos, hist_len = ring
    k_sq, nearest, previous, has_previous = out
    capacity = hist.shape[1]
    k = k_sq.shape[1]
    n = slots.shape[0]
    begin = 0
    while begin < n:
        # One segment: the same client, within one chunk.
        slot = slots[begin]
        chunk_end = min((begin // _CHUNK_ROWS + 1) * _CHUNK_ROWS, n)
        end = begin + 1
        while end < chunk_end and slots[end] == slot:
            end += 1
        old_len = hist_len[slot]
        old_pos = hist_pos[slot]
        oldest = old_pos - old_len
        if oldest < 0:
            oldest += capacity

        for i in range(begin, end):
            t = i - begin
            row = rows[i]
            best = k_sq[i]
            best[:] = np.inf
            where = -1  # ring index, or capacity + lag - 1

            # The ring's entries of age evicted .. old_len - 1 (age 0 the
            # oldest), by physical index.
            evicted = max(old_len + t - capacity, 0)
            for j in range(capacity):
                age = j - oldest
                if age < 0:
                    age += capacity
                if age < evicted or age >= old_len:
                    continue
                d_sq = float(squared_distance(row, hist[slot, j]))
                if d_sq < best[0]:
                    where = j
                _insert(best, d_sq, k)

            # The segment's earlier rows, latest first.
            for lag in range(1, min(t, capacity) + 1):
                d_sq = float(squared_distance(row, rows[i - lag]))
                if d_sq < best[0]:
                    where = capacity + lag - 1
                _insert(best, d_sq, k)

            if where < 0:
                nearest[i] = 0.0
            elif where < capacity:
                nearest[i] = hist[slot, where]
            else:
                nearest[i] = rows[i - (where - capacity + 1)]
            has_previous[i] = t >= 1 or old_len >= 1
            if t >= 1:
                previous[i] = rows[i - 1]
            elif old_len >= 1:
                previous[i] = hist[slot, old_pos - 1 if old_pos >= 1 else capacity - 1]
            else:
                previous[i] = 0.0

        # Append the segment's last `capacity` rows (earlier ones would be
        # overwritten within it).
        size = end - begin
        for t in range(max(size - capacity, 0), size):
            hist[slot, (old_pos + t) % capacity] = rows[begin + t]
        hist_pos[slot] = (old_pos + size) % capacity
        hist_len[slot] = min(old_len + size, capacity)
        begin = end


@jit
def _insert(best: FloatArray, value: float, k: int) -> None:
    """Insert ``value`` into the ascending ``best[:k]``, dropping the largest."""
    if not value < best[k - 1]:
        return
    j = k - 1
    while j > 0 and best[j - 1] > value:
        best[j] = best[j - 1]
        j -= 1
    best[j] = value


def nearest_and_push(
    arrays: Mapping[str, npt.NDArray[Any]],
    order: IntArray,
    sorted_slots: IntArray,
    stored: npt.NDArray[np.uint8],
) -> tuple[
    npt.NDArray[np.bool_],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    npt.NDArray[np.bool_],
]:
    """Per row (sorted order): whether it has an earlier query, the nearest
    one (L2, 0..255 units), the client's previous query and whether there is
    one; then store the rows in the ring (``detectors._history.ring_fields``).

    What ``detectors._history.neighbours_and_push`` gives with ``k = 1``
    (the same nearest query, ties going to the same stored entry).

    Parameters
    ----------
    arrays
        Arena arrays holding the ring; updated in place.
    order, sorted_slots
        The stable sort of the rows by slot, and the sorted slots.
    stored
        Rows quantised to uint8, in batch (unsorted) order.
    """
    n_features = arrays["hist"].shape[2]
    n = len(order)
    best_sq = np.empty((n, 1), dtype=np.float64)
    nearest = np.empty((n, n_features), dtype=np.float32)
    previous = np.empty((n, n_features), dtype=np.float32)
    has_previous = np.empty(n, dtype=np.bool_)
    scan_ring(
        (arrays["hist"], arrays["hist_pos"], arrays["hist_len"]),
        sorted_slots,
        stored[order],
        (best_sq, nearest, previous, has_previous),
    )
    return best_sq[:, 0] < np.inf, nearest, previous, has_previous


# -- windows of bits --------------------------------------------------------------


def push_bits(
    arrays: Mapping[str, npt.NDArray[Any]],
    window: str,
    slots: IntArray,
    bits: npt.NDArray[np.bool_],
) -> tuple[IntArray, IntArray, IntArray]:
    """Append one bit per row (arrival order) to each client's window
    ``window`` and count the row in ``n_seen``.

    Parameters
    ----------
    arrays
        Arena arrays holding the window (``window_fields(window, ...)``) and
        ``n_seen``; updated in place.
    window
        Name of the window's ring field.
    slots, bits
        Each row's client slot and bit, in arrival order.

    Returns
    -------
    tuple of arrays
        Per row: the set bits in the client's window just after it, the
        window's length then, and the client's queries seen including it.
    """
    n = len(slots)
    counts = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    seen = np.empty(n, dtype=np.int64)
    _push_bits(
        (arrays[window], arrays[f"{window}_pos"], arrays[f"{window}_len"]),
        arrays["n_seen"],
        slots,
        bits,
        (counts, lengths, seen),
    )
    return counts, lengths, seen


@jit
def _push_bits(
    window: Window,
    n_seen: IntArray,
    slots: IntArray,
    bits: npt.NDArray[np.bool_],
    out: tuple[IntArray, IntArray, IntArray],
) -> None:
    """:func:`push_bits` row by row."""
    counts, lengths, seen = out
    for i in range(slots.shape[0]):
        slot = slots[i]
        counts[i], lengths[i] = push_bit(window, slot, bits[i])
        n_seen[slot] += 1
        seen[i] = n_seen[slot]


@jit
def push_bit(window: Window, slot: int, bit: bool) -> tuple[int, int]:
    """Append ``bit`` to ``slot``'s window; return its set bits and length.

    ``window`` is the arena's bits, next position and length. The window is
    the ``length`` entries ending at the one just written; a loaded state
    may hold them anywhere in the ring (only its counters are checked), so
    they are counted where they are: before the write position, then the
    wrapped tail.
    """
    bits, pos, length = window
    width = bits.shape[1]
    position = pos[slot]
    bits[slot, position] = 1 if bit else 0
    filled = min(length[slot] + 1, width)
    pos[slot] = position + 1 if position + 1 < width else 0
    length[slot] = filled
    count = 0
    first = position + 1 - filled
    for j in range(max(first, 0), position + 1):
        count += bits[slot, j]
    for j in range(width + first if first < 0 else width, width):
        count += bits[slot, j]
    return count, filled


# -- structure ---------------------------------------------------------------------


@jit
def step_changes(
    rows: tuple[IntArray, IntArray, npt.NDArray[np.uint8]],
    found: tuple[
        npt.NDArray[np.bool_],
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
        npt.NDArray[np.bool_],
    ],
    steps: tuple[npt.NDArray[np.uint16], IntArray],
    windows: tuple[Window, Window],
    params: tuple[np.float32, int, float],
    out: tuple[IntArray, FloatArray, IntArray, IntArray, IntArray, IntArray],
) -> None:
    """``structure`` per row, in sorted order: the features changed from
    the nearest earlier query, the unit step from the previous one and its
    largest absolute cosine with the client's last ``directions`` steps;
    then push the step, both bits and the query count.

    ``rows`` is the sort order, each sorted row's slot and the quantised rows
    (row order); ``found`` what :func:`nearest_and_push` gave (sorted order);
    ``steps`` the step ring as float16 bit patterns and ``n_seen``, whose
    count of a client's queries is also its step ring's write position;
    ``windows`` the sparse and repeat windows; ``params`` the change
    tolerance in 8-bit units (float32, as it was compared with float32
    arrays), ``max_changed`` and ``cos_threshold``. ``out`` gets, in row
    order: changed features (-1 without an earlier query), the largest
    cosine, both windows' counts, their length and the queries seen.

    A step is ``q - previous`` (zero for a first query) divided by its norm
    in float64, then rounded to float16 as stored, so a step met later in
    the batch equals the one read back from the ring.
    """
    order, slots, stored = rows
    has_nearest, nearest, previous, has_previous = found
    dirs, n_seen = steps
    sparse_window, repeat_window = windows
    tolerance, max_changed, cos_threshold = params
    changed_out, cos_out, sparse_out, repeat_out, length_out, seen_out = out
    n_steps, n_features = dirs.shape[1], dirs.shape[2]
    ring = np.empty((n_steps, n_features), dtype=np.float64)
    step = np.empty(n_features, dtype=np.float64)
    step_bits = np.empty(n_features, dtype=np.uint16)
    difference = np.empty(n_features, dtype=np.int64)
    lanes = np.empty(_LANES, dtype=np.float64)
    current = -1
    for i in range(order.shape[0]):
        row = order[i]
        slot = slots[i]
        q = stored[row]
        if slot != current:
            # A new client: its stored steps, widened once.
            current = slot
            for j in range(n_steps):
                _from_half(dirs[slot, j], ring[j])

        # Sparse edit: features moved by more than the tolerance.
        changed = -1
        if has_nearest[i]:
            changed = 0
            for f in range(n_features):
                if abs(np.float32(q[f]) - nearest[i, f]) > tolerance:
                    changed += 1
        sparse = 1 <= changed <= max_changed

        # The unit step, rounded to float16; its squared norm is an exact
        # integer, so summed as one.
        norm_sq = 0
        for f in range(n_features):
            value = int(q[f]) - int(previous[i, f]) if has_previous[i] else 0
            difference[f] = value
            norm_sq += value * value
        norm = np.sqrt(float(norm_sq))
        for f in range(n_features):
            step[f] = difference[f] / norm if norm_sq > 0 else 0.0
        _to_half(step, step_bits)

        # Largest |cos| with the last min(seen, directions) steps.
        seen = n_seen[slot]
        best = 0.0
        j = (seen - 1) % n_steps
        for _ in range(min(seen, n_steps)):
            lanes[:] = 0.0
            for f0 in range(0, n_features - _LANES + 1, _LANES):
                for lane in range(_LANES):
                    lanes[lane] += step[f0 + lane] * ring[j, f0 + lane]
            for f in range(n_features - n_features % _LANES, n_features):
                lanes[0] += step[f] * ring[j, f]
            best = max(best, abs(lanes.sum()))
            j = j - 1 if j > 0 else n_steps - 1

        # Push the step, the bits and the count.
        j = seen % n_steps
        ring[j] = step
        dirs[slot, j] = step_bits
        n_seen[slot] = seen + 1
        sparse_count, length = push_bit(sparse_window, slot, sparse)
        repeat_count, _ = push_bit(repeat_window, slot, best >= cos_threshold)
        changed_out[row] = changed
        cos_out[row] = best
        sparse_out[row] = sparse_count
        repeat_out[row] = repeat_count
        length_out[row] = length
        seen_out[row] = seen + 1


@jit
def _to_half(values: FloatArray, bits: npt.NDArray[np.uint16]) -> None:
    """Round ``values`` in place to float16 (nearest, ties to even: what
    ``astype(np.float16)`` gives; NaN is not expected) and write their bit
    patterns into ``bits``.

    A magnitude whose float16 spacing is ``2**e`` (``e`` from its exponent,
    at least -24 where float16 is subnormal) is rounded by adding and taking
    away ``1.5 * 2**(52 + e)``: the sum's float64 spacing is ``2**e``, so the
    addition itself rounds, to nearest and ties to even. The bit pattern is
    then read off the rounded value's float64 pattern.
    """
    raw = values.view(np.int64)
    for f in range(values.shape[0]):
        negative = raw[f] < 0  # the sign bit, also of -0.0
        exponent = (raw[f] >> 52) & 0x7FF  # biased by 1023
        spacing = min(max(exponent - 1033, -24), _MAX_SPACING)  # e above
        shifter = _SHIFTERS[spacing + 24]
        rounded = (abs(values[f]) + shifter) - shifter
        values[f] = -rounded if negative else rounded
    for f in range(values.shape[0]):
        b = raw[f]
        sign = (b >> 48) & 0x8000
        exponent = ((b >> 52) & 0x7FF) - 1008  # rebiased for float16 (15)
        if exponent >= 31:
            h = 0x7C00  # beyond float16: infinity
        elif exponent >= 1:
            h = (exponent << 10) | ((b >> 42) & 0x3FF)
        else:
            h = int(abs(values[f]) * 2.0**24)  # subnormal: units of 2**-24
        bits[f] = sign | h


@jit
def _from_half(bits: npt.NDArray[np.uint16], values: FloatArray) -> None:
    """Values of float16 bit patterns (finite: the state check refuses
    others), written into ``values``: the 10 fraction bits, with the
    implicit leading bit where the exponent is not 0, times a power of 2."""
    for f in range(bits.shape[0]):
        h = np.int64(bits[f])
        exponent = (h >> 10) & 0x1F
        significand = (h & 0x3FF) | (0x400 if exponent else 0)
        value = significand * _POWERS[exponent if exponent > 0 else 1]
        values[f] = -value if h & 0x8000 else value


# 2**(exponent - 25) for each float16 exponent field (a significand of 11
# bits times it is the value), and the shifters of _to_half for spacings
# 2**-24 .. 2**_MAX_SPACING (65504, float16's largest, has spacing 2**5).
_POWERS = np.ldexp(1.0, np.arange(32) - 25)
_MAX_SPACING = 5
_SHIFTERS = 1.5 * np.ldexp(1.0, 52 + np.arange(-24, _MAX_SPACING + 1))
