"""Compiled kernels of the ``prada`` detector (``detectors.prada``).

One kernel scores a whole batch row by row (near-duplicate filter,
PRADA's growing-set rule, the window of distances, the lattice check and
the sample of each Shapiro-Wilk test); a second turns the samples into W
once the caller has the coefficients of their sizes, which come from
scipy's ``ndtri`` and so stay outside compiled code. The arithmetic
reproduces, bit for bit, the numpy code these kernels replaced: sums in
numpy's pairwise order, float32 where numpy compared in float32, and
Python's ``pow`` for a square.

Imports numpy, ``detectors._jit`` and ``detectors._numpysum`` only; nothing
from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from detectors._jit import jit
from detectors._numpysum import pairwise_sum

# Most features whose squared distance fits int32: 33025 * 255**2 < 2**31.
_INT32_FEATURES = 33025

# Levels of a stored feature (8 bits), as ``detectors.prada`` quantises.
_LEVELS = 255

# Most common grid values whose share of a window makes it lattice-valued
# (``detectors.prada`` explains the rule).
_LATTICE_VALUES = 8

# Least distance whose logarithm is taken on the log scale: half a grid step
# of one feature in 64 (a window holds distances of at least eps, so only
# eps 0 reaches it; log 0 would be -inf).
_LOG_FLOOR = 0.5 / _LEVELS / 8.0


@jit
def centre_sample(
    x: npt.NDArray[np.float64],
    n: int,
    centred: npt.NDArray[np.float64],
    scratch: npt.NDArray[np.float64],
    reject_sigma: float,
) -> tuple[int, float]:
    """Drop the values of the sorted ``x[:n]`` beyond ``reject_sigma``
    standard deviations of its mean, then centre what is left.

    In order: mean and sum of squared deviations of ``x[:n]`` (pairwise
    sums); if an end lies beyond the cut (inclusive), the kept values are
    moved to the front of ``x`` and both are computed again. ``centred``
    receives the deviations, ``scratch`` (at least ``n`` long) is
    overwritten.

    Returns
    -------
    tuple
        Values kept and their sum of squared deviations; 0 values when fewer
        than 3 are left or they do not spread (W is then 0).
    """
    mean = pairwise_sum(x, 0, n) / n
    for i in range(n):
        centred[i] = x[i] - mean
        scratch[i] = centred[i] * centred[i]
    squares = pairwise_sum(scratch, 0, n)
    cut = reject_sigma * math.sqrt(squares / n)
    # Sorted, so only the two ends can lie beyond the cut.
    if -centred[0] > cut or centred[n - 1] > cut:
        kept = 0
        for i in range(n):
            if abs(centred[i]) <= cut:
                x[kept] = x[i]
                kept += 1
        n = kept
        if n < 3:
            return 0, 0.0
        mean = pairwise_sum(x, 0, n) / n
        for i in range(n):
            centred[i] = x[i] - mean
            scratch[i] = centred[i] * centred[i]
        squares = pairwise_sum(scratch, 0, n)
    if n < 3 or x[n - 1] - x[0] <= 0.0:
        return 0, 0.0
    return n, squares


@jit
def w_statistic(
    centred: npt.NDArray[np.float64],
    n: int,
    coefficients: npt.NDArray[np.float64],
    norm_sq: float,
    squares: float,
    scratch: npt.NDArray[np.float64],
    power: float,
) -> float:
    """Shapiro-Wilk W of a centred sorted sample of ``n`` values: the squared
    pairwise sum of ``coefficients * centred`` over ``norm_sq * squares``,
    clipped to [0, 1].

    The square is ``pow(sum, power)`` with ``power`` 2.0 passed at run time:
    Python squares a float with libm's ``pow``, which differs from a
    multiply in the last bit about once in 1200 values, and a constant
    exponent would let LLVM turn the call into a multiply.
    """
    for i in range(n):
        scratch[i] = coefficients[i] * centred[i]
    numerator = math.pow(pairwise_sum(scratch, 0, n), power)
    w = numerator / (norm_sq * squares)
    # Python's min(1.0, max(0.0, w)), comparison for comparison.
    w = w if w > 0.0 else 0.0
    return w if w < 1.0 else 1.0


@jit
def sample_on_lattice(
    x: npt.NDArray[np.float64],
    n: int,
    counts: npt.NDArray[np.int64],
    min_distinct: int,
    share: float,
) -> bool:
    """Whether ``x[:n]`` sits on a few values of the 1/255 grid: fewer than
    ``min_distinct`` distinct ``rint(x * 255)``, or its 8 most common ones
    holding at least ``share`` of it. ``counts`` must have more entries than
    the largest grid value; it is overwritten. Counts are integers, so the
    order of the work does not matter."""
    counts[:] = 0
    for i in range(n):
        counts[np.int64(np.rint(x[i] * _LEVELS))] += 1
    distinct = 0
    top = np.zeros(_LATTICE_VALUES, dtype=np.int64)  # ascending
    for value in counts:
        if value == 0:
            continue
        distinct += 1
        if value > top[0]:
            # Insert, dropping the smallest of the 8.
            k = 0
            while k + 1 < _LATTICE_VALUES and top[k + 1] < value:
                top[k] = top[k + 1]
                k += 1
            top[k] = value
    return distinct < min_distinct or float(top.sum()) >= share * n


@jit
def _sort_on_grid(
    x: npt.NDArray[np.float64],
    n: int,
    counts: npt.NDArray[np.int64],
    out: npt.NDArray[np.float64],
) -> None:
    """``x[:n]`` sorted into ``out[:n]``, given ``counts`` as
    :func:`sample_on_lattice` left them for it (overwritten).

    ``rint(255 x)`` never decreases as ``x`` grows, so placing each value in
    its grid cell orders all but the values sharing a cell (a few per cell
    for a sample worth testing), which an insertion pass then orders: about
    a tenth of the cost of a quicksort of 128 values.
    """
    first = 0
    for cell in range(counts.shape[0]):
        size = counts[cell]
        counts[cell] = first
        first += size
    for i in range(n):
        cell = int(np.rint(x[i] * _LEVELS))
        out[counts[cell]] = x[i]
        counts[cell] += 1
    for i in range(1, n):
        value = out[i]
        j = i - 1
        while j >= 0 and out[j] > value:
            out[j + 1] = out[j]
            j -= 1
        out[j + 1] = value


@jit
def _nearest(
    ring: npt.NDArray[np.uint8],
    slot: int,
    length: int,
    queries: npt.NDArray[np.uint8],
    row: int,
) -> int:
    """Smallest exact squared distance of ``queries[row]`` to the first
    ``length`` entries of ``ring[slot]`` (-1 when there are none).

    Indexes the arrays in place: a view per entry would cost two atomic
    reference-count updates each. The int32 sum is forced back to int32 at
    every step (numba widens int32 arithmetic to int64), which lets LLVM
    vectorise it: 0.35 against 0.83 µs for 64 entries of 64 features.
    """
    n_features = queries.shape[1]
    best = -1
    if n_features <= _INT32_FEATURES:
        for j in range(length):
            total = np.int32(0)
            for f in range(n_features):
                step = np.int32(ring[slot, j, f]) - np.int32(queries[row, f])
                total = np.int32(total + step * step)
            if best < 0 or total < best:
                best = int(total)
        return best
    # Wider rows could overflow int32: the same sum in int64, not vectorised.
    for j in range(length):
        wide = 0
        for f in range(n_features):
            gap = int(ring[slot, j, f]) - int(queries[row, f])
            wide += gap * gap
        if best < 0 or wide < best:
            best = wide
    return best


@jit
def _row_order(
    slots: npt.NDArray[np.int64],
    capacity: int,
    chunk_rows: int,
    scratch: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Rows in the order they are scored, and the chunk of each row.

    Rows are grouped by client (clients in order of first appearance, each
    client's rows in arrival order), so a client's rings stay in cache
    across its rows; clients are independent, so the order across them
    changes nothing. Chunks are those of the numpy code before the kernel,
    which the evidence still follows: piece p holds every client's rows
    p * capacity .. (p + 1) * capacity - 1 in arrival order, cut into
    ``chunk_rows`` rows; a row's chunk is ``p * n + rank // chunk_rows``
    (increasing along each client's rows). ``scratch`` (one entry per slot)
    is overwritten.
    """
    n = slots.shape[0]
    for i in range(n):
        scratch[slots[i]] = 0
    piece = np.empty(n, dtype=np.int64)
    for i in range(n):
        piece[i] = scratch[slots[i]] // capacity
        scratch[slots[i]] += 1
    rank_in_piece = np.zeros(n + 1, dtype=np.int64)
    chunk = np.empty(n, dtype=np.int64)
    for i in range(n):
        chunk[i] = piece[i] * n + rank_in_piece[piece[i]] // chunk_rows
        rank_in_piece[piece[i]] += 1

    # Group numbers by first appearance (reusing `piece` for them), then a
    # counting sort by group, stable.
    for i in range(n):
        scratch[slots[i]] = -1
    n_groups = 0
    for i in range(n):
        if scratch[slots[i]] < 0:
            scratch[slots[i]] = n_groups
            n_groups += 1
        piece[i] = scratch[slots[i]]
    start = np.zeros(n_groups + 1, dtype=np.int64)
    for i in range(n):
        start[piece[i] + 1] += 1
    for g in range(n_groups):
        start[g + 1] += start[g]
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        order[start[piece[i]]] = i
        start[piece[i]] += 1
    return order, chunk


@jit
def score_rows(
    slots: npt.NDArray[np.int64],
    queries: npt.NDArray[np.uint8],
    q_sq: npt.NDArray[np.float32],
    state_i8: tuple[npt.NDArray[np.int64], ...],
    state_f8: tuple[npt.NDArray[np.float64], ...],
    rings: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
    ring_sq: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    dist: npt.NDArray[np.float32],
    settings: npt.NDArray[np.float64],
    out_f8: npt.NDArray[np.float64],
    out_i8: npt.NDArray[np.int64],
) -> tuple[
    int,
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
]:
    """Score a batch row by row, updating the clients' state in place.

    ``state_i8`` are the arena's ``gs_pos, gs_len, gs_count, recent_pos,
    recent_len, dist_pos, dist_len, n_seen, n_tests, tested_at, tested_n``
    and ``state_f8`` its ``gs_mean, gs_m2, admit, score``; ``rings`` are
    ``gs`` and ``recent``, ``ring_sq`` their squared norms (kept for the
    state check; distances here are exact integer sums instead); ``settings``
    is ``scale, duplicate_below, eps, test_every, min_queries,
    min_distinct, lattice_share, chunk_rows, reject_sigma`` and, optionally,
    ``log_scale`` (non-zero: W is taken of the distances' logarithms).

    Rows are taken client by client (:func:`_row_order`), each client's in
    arrival order; per row:

    1. its nearest of the client's last ``recent`` queries; a near-duplicate
       (squared distance below ``duplicate_below``, the float32 threshold
       numpy compared with) adds nothing; every row then joins the ring;
    2. PRADA's rule: the first query seeds the growing set; a later one gets
       ``d = sqrt(nearest / scale)`` to the growing set as it stands (rows of
       the batch admitted before it included, evicted ones excluded), joins
       when ``d > T``, and before it joins ``T <- max(T, mean - std)`` of the
       Welford statistics, which then take ``d``;
    3. ``d >= eps`` goes to the ring of distances (as float32);
    4. every ``test_every`` queries, with ``min_queries`` distances held: the
       lattice check of the window, then its sorted, trimmed and centred
       sample is recorded for :func:`finish_tests`.

    ``out_f8`` (n,) receives each row's score as held before any test of
    this batch; ``out_i8`` (5, n) per row: the test whose W scores it (-1:
    none of this batch), warm, evidence kind (0 distances held, 1 last test,
    2 lattice, not tested), held or tested_n, tested_at. The lattice
    evidence holds for the client's later rows of the same chunk
    (``chunk_rows`` rows of a piece), as the chunked numpy code gave it.

    Returns
    -------
    tuple
        Tests recorded, and per test its slot, centred sample (row-padded),
        values kept (0: W is 0) and sum of squared deviations.
    """
    gs_pos, gs_len, gs_count, recent_pos, recent_len = state_i8[:5]
    dist_pos, dist_len, n_seen, n_tests, tested_at, tested_n = state_i8[5:]
    gs_mean, gs_m2, admit, score = state_f8
    gs, recent = rings
    gs_sq, recent_sq = ring_sq
    scale, duplicate_below, eps = settings[0], settings[1], settings[2]
    every, min_queries = int(settings[3]), int(settings[4])
    min_distinct, share = int(settings[5]), settings[6]
    chunk_rows, reject_sigma = int(settings[7]), settings[8]
    log_scale = settings.shape[0] > 9 and settings[9] != 0.0
    n = slots.shape[0]
    n_slots, capacity = gs.shape[0], gs.shape[1]
    recent_size, window = recent.shape[1], dist.shape[1]

    # Per slot: its last test of this batch, and the held count of a lattice
    # verdict still quoted as evidence (-1: none).
    last_test = np.empty(n_slots, dtype=np.int64)
    lattice_held = np.empty(n_slots, dtype=np.int64)
    order, chunk = _row_order(slots, capacity, chunk_rows, last_test)
    # Room for every test that can fall due: rows whose query count is a
    # multiple of `every` (counted per slot in `last_test` first).
    for i in range(n):
        last_test[slots[i]] = 0
    room = 0
    for i in range(n):
        last_test[slots[i]] += 1
        if (n_seen[slots[i]] + last_test[slots[i]]) % every == 0:
            room += 1
    for i in range(n):
        last_test[slots[i]] = -1
    test_slot = np.empty(room, dtype=np.int64)
    test_centred = np.empty((room, window), dtype=np.float64)
    test_n = np.empty(room, dtype=np.int64)
    test_squares = np.empty(room, dtype=np.float64)
    n_recorded = 0
    sample = np.empty(window, dtype=np.float64)
    ordered = np.empty(window, dtype=np.float64)
    scratch = np.empty(window, dtype=np.float64)
    counts = np.empty(_LEVELS + 1, dtype=np.int64)

    for k in range(n):
        i = order[k]
        s = slots[i]
        # The client's first row of a chunk: lattice verdicts are quoted
        # within a chunk only.
        if k == 0 or slots[order[k - 1]] != s or chunk[order[k - 1]] != chunk[i]:
            lattice_held[s] = -1

        # Step 1: near-duplicate of a recent query; the row joins the ring.
        nearest = _nearest(recent, s, recent_len[s], queries, i)
        duplicate = nearest >= 0 and float(nearest) < duplicate_below
        at = recent_pos[s]
        recent[s, at, :] = queries[i, :]
        recent_sq[s, at] = q_sq[i]
        recent_pos[s] = (at + 1) % recent_size
        recent_len[s] = min(recent_len[s] + 1, recent_size)

        # Step 2: the growing-set rule.
        if not duplicate:
            join = False
            if gs_len[s] == 0:
                gs_count[s], gs_mean[s], gs_m2[s] = 1, 0.0, 0.0
                join = True
            else:
                nearest = _nearest(gs, s, gs_len[s], queries, i)
                d = math.sqrt(float(nearest) / scale)
                # Step 3: the distance, unless it is a near-duplicate's.
                if d >= eps:
                    at = dist_pos[s]
                    dist[s, at] = np.float32(d)
                    dist_pos[s] = (at + 1) % window
                    dist_len[s] = min(dist_len[s] + 1, window)
                if d > admit[s]:
                    join = True
                    count, mean, m2 = gs_count[s], gs_mean[s], gs_m2[s]
                    # Python's max(m2, 0.0) and max(T, floor).
                    floor = mean - math.sqrt((0.0 if m2 < 0.0 else m2) / count)
                    if floor > admit[s]:
                        admit[s] = floor
                    count += 1
                    step = d - mean
                    mean += step / count
                    m2 += step * (d - mean)
                    gs_count[s], gs_mean[s], gs_m2[s] = count, mean, m2
            if join:
                at = gs_pos[s]
                gs[s, at, :] = queries[i, :]
                gs_sq[s, at] = q_sq[i]
                gs_pos[s] = (at + 1) % capacity
                gs_len[s] = min(gs_len[s] + 1, capacity)

        # Step 4: a test when one falls due.
        n_seen[s] += 1
        held = dist_len[s]
        if n_seen[s] % every == 0 and held >= min_queries:
            oldest = dist_pos[s] - held + window
            for j in range(held):
                sample[j] = np.float64(dist[s, (oldest + j) % window])
            if not sample_on_lattice(sample, held, counts, min_distinct, share):
                _sort_on_grid(sample, held, counts, ordered)
                if log_scale:
                    # Monotone, so the order holds; distances in the window
                    # are at least eps, floored at one grid step for eps 0.
                    for j in range(held):
                        ordered[j] = math.log(max(ordered[j], _LOG_FLOOR))
                kept, squares = centre_sample(
                    ordered, held, test_centred[n_recorded], scratch, reject_sigma
                )
                test_slot[n_recorded] = s
                test_n[n_recorded] = kept
                test_squares[n_recorded] = squares
                last_test[s] = n_recorded
                n_recorded += 1
                n_tests[s] += 1
                tested_at[s] = n_seen[s]
                tested_n[s] = held
            elif n_tests[s] == 0:
                lattice_held[s] = held

        # The row's score source, warm bit and evidence.
        out_f8[i] = score[s]
        out_i8[0, i] = last_test[s]
        warm = n_tests[s] > 0
        out_i8[1, i] = warm
        if warm:
            out_i8[2, i], out_i8[3, i], out_i8[4, i] = 1, tested_n[s], tested_at[s]
        elif lattice_held[s] >= 0:
            out_i8[2, i], out_i8[3, i] = 2, lattice_held[s]
        else:
            out_i8[2, i], out_i8[3, i] = 0, held
    return n_recorded, test_slot, test_centred, test_n, test_squares


@jit
def finish_tests(
    n_recorded: int,
    test_slot: npt.NDArray[np.int64],
    test_centred: npt.NDArray[np.float64],
    test_n: npt.NDArray[np.int64],
    test_squares: npt.NDArray[np.float64],
    coefficients: npt.NDArray[np.float64],
    norm_sq: npt.NDArray[np.float64],
    coefficient_row: npt.NDArray[np.int64],
    power: float,
    row_test: npt.NDArray[np.int64],
    row_score: npt.NDArray[np.float64],
    score: npt.NDArray[np.float64],
) -> None:
    """Score ``1 - W`` of each test :func:`score_rows` recorded, in order.

    Test t of ``test_n[t]`` values uses ``coefficients[coefficient_row[n]]``
    and ``norm_sq`` of the same row (0 values: W is 0). Each test's score
    goes to its client's ``score`` (later tests of a client last) and to
    the rows whose ``row_test`` names it.
    """
    tested = np.empty(n_recorded, dtype=np.float64)
    scratch = np.empty(test_centred.shape[1], dtype=np.float64)
    for t in range(n_recorded):
        n = test_n[t]
        w = 0.0
        if n > 0:
            row = coefficient_row[n]
            w = w_statistic(
                test_centred[t],
                n,
                coefficients[row],
                norm_sq[row],
                test_squares[t],
                scratch,
                power,
            )
        tested[t] = 1.0 - w
        score[test_slot[t]] = tested[t]
    for i in range(row_test.shape[0]):
        if row_test[i] >= 0:
            row_score[i] = tested[row_test[i]]
