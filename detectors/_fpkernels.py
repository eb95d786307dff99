"""Compiled kernels of the fingerprint detector and its in-memory store.

:mod:`detectors.fingerprint` keeps the logic's description, the parameters and
the Python-facing API; this module holds the loops it runs per row: input
keys, window hashes, the store's per-chunk comparison and update, and the
per-client window of counted queries. Each kernel says in what order it
works, since the order fixes the results.

Hash tables here are open addressing with linear probing, never more than
half full (the caller grows them first), so a probe always ends: either one
uint64 array of (key, value) cells, key 0 for an empty cell (key and value
share a cache line), or, for the store's hash value -> slot index, int32
slot numbers (-1 empty) whose key is read from the slot's row.

Imports numpy and ``detectors._jit`` only; nothing from Kafka, Redis, FastAPI
or ``gateway``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detectors._jit import jit

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

# Odd 64-bit constants of the splitmix64 finaliser (Steele, Lea and Flood,
# 2014): they spread the few bits of a window's code over all 64 bits, so the
# largest hash values are a random-looking choice of windows.
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
"""2**64 / golden ratio, odd: spreads consecutive integers over 64 bits."""


@jit
def mix64(z: np.uint64) -> np.uint64:
    """splitmix64's finaliser of one value (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


@jit
def mix_array(values: U64) -> U64:
    """:func:`mix64` of every element of a 1-D array, as a new array."""
    out = np.empty_like(values)
    for i in range(values.size):
        out[i] = mix64(values[i])
    return out


@jit
def input_keys_rows(X: npt.NDArray[np.float64]) -> U64:
    """One 64-bit key per row of features in [0, 1] (clipped), never 0.

    Each feature is quantised to ``rint(x * 255)`` (8 bits); eight of them,
    first feature in the lowest byte, make a 64-bit word (zero-padded at the
    end of the row); word ``j`` is XORed with ``mix64((j + 1) * GOLDEN)``,
    mixed, and the row's key is the XOR of its mixed words (0 becomes 1).
    """
    n, d = X.shape
    n_words = (d + 7) // 8
    position = np.empty(n_words, dtype=np.uint64)
    for j in range(n_words):
        position[j] = mix64(np.uint64(j + 1) * GOLDEN)
    keys = np.empty(n, dtype=np.uint64)
    for r in range(n):
        key = np.uint64(0)
        for j in range(n_words):
            word = np.uint64(0)
            for b in range(min(8, d - 8 * j)):
                x = min(max(X[r, 8 * j + b], 0.0), 1.0)
                word |= np.uint64(np.rint(x * 255.0)) << np.uint64(8 * b)
            key ^= mix64(word ^ position[j])
        keys[r] = key if key != np.uint64(0) else np.uint64(1)
    return keys


@jit
def common_free_window_hashes(
    X: npt.NDArray[np.float64],
    levels: int,
    width: int,
    salt: np.uint64,
    common: U64,
) -> U64:
    """Hash of every window of quantised features of rows in [0, 1], 0 for
    a common one; shape (n, d - width + 1).

    Feature ``x`` quantises to ``floor(clip(x * levels, 0, levels - 1))``;
    window ``i`` (features ``i .. i + width - 1``, first most significant)
    has code ``sum q * levels ** place`` (integer arithmetic, exact) and hash
    ``mix64((code | i << 48) ^ salt)``, 1 where that is 0, and 0 where bit
    ``i * levels ** width + code`` of ``common`` (little-endian words) is set.
    """
    n, d = X.shape
    n_windows = d - width + 1
    n_codes = levels**width
    top_level = float(levels - 1)
    q = np.empty(d, dtype=np.int64)
    out = np.empty((n, n_windows), dtype=np.uint64)
    for r in range(n):
        for j in range(d):
            q[j] = np.int64(np.floor(min(max(X[r, j] * levels, 0.0), top_level)))
        for i in range(n_windows):
            code = 0
            for o in range(width):
                code = code * levels + q[i + o]
            h = mix64((np.uint64(code) | (np.uint64(i) << np.uint64(48))) ^ salt)
            if h == np.uint64(0):
                h = np.uint64(1)
            at = i * n_codes + code
            bit = (common[at >> 6] >> np.uint64(at & 63)) & np.uint64(1)
            # Multiplied rather than branched on: common windows come and
            # go unpredictably.
            out[r, i] = h * (np.uint64(1) - bit)
    return out


@jit
def _home(key: np.uint64, mask: int) -> int:
    """First cell probed for ``key`` in a table of ``mask + 1`` cells."""
    h = key * GOLDEN
    # Signed: unsigned cell numbers would turn ``i + 1`` into a float.
    return int(np.int64((h ^ (h >> np.uint64(29))) & np.uint64(mask)))


@jit
def _find(table: U64, key: np.uint64) -> int:
    """Cell of ``key`` (nonzero) in ``table``, or -1 when absent."""
    mask = table.shape[0] - 1
    i = _home(key, mask)
    while True:
        held = table[i, 0]
        if held == key:
            return i
        if held == np.uint64(0):
            return -1
        i = (i + 1) & mask


@jit
def _put(table: U64, key: np.uint64, value: int) -> bool:
    """Set ``key`` (nonzero) to ``value`` (>= 0); True when the key is new."""
    mask = table.shape[0] - 1
    i = _home(key, mask)
    while True:
        held = table[i, 0]
        if held == key or held == np.uint64(0):
            table[i, 0] = key
            table[i, 1] = np.uint64(value)
            return bool(held == np.uint64(0))
        i = (i + 1) & mask


@jit
def _slot_of(index: I32, slots: I64, column: int, key: np.uint64) -> int:
    """Slot holding hash ``key`` (its bits in ``slots[slot, column]``), or
    -1; ``index`` holds slot numbers, -1 for an empty cell."""
    mask = index.size - 1
    i = _home(key, mask)
    while True:
        slot = index[i]
        if slot < 0:
            return -1
        if np.uint64(slots[slot, column]) == key:
            return int(slot)
        i = (i + 1) & mask


@jit
def _index_add(index: I32, key: np.uint64, slot: int) -> None:
    """Enter ``slot`` for hash ``key``, which is not in ``index``."""
    mask = index.size - 1
    i = _home(key, mask)
    while index[i] >= 0:
        i = (i + 1) & mask
    index[i] = slot


@jit
def _index_remove(index: I32, slots: I64, column: int, key: np.uint64) -> None:
    """Delete hash ``key`` from ``index``, shifting later cells of its probe
    run back (no tombstones, so look-ups stay short as values come and go)."""
    mask = index.size - 1
    i = _home(key, mask)
    while True:
        if index[i] < 0:
            return
        if np.uint64(slots[index[i], column]) == key:
            break
        i = (i + 1) & mask
    index[i] = -1
    j = i
    while True:
        j = (j + 1) & mask
        slot = index[j]
        if slot < 0:
            return
        home = _home(np.uint64(slots[slot, column]), mask)
        # The value at j may fill the hole at i unless its home lies
        # cyclically in (i, j], where a look-up would stop before i.
        stays = (i < home <= j) if i <= j else (home > i or home <= j)
        if not stays:
            index[i] = slot
            index[j] = -1
            i = j


@jit
def reindex(slots: I64, column: int, cells: int) -> I32:
    """A hash value -> slot table of ``cells`` cells (a power of two) for
    the slots whose hash bits (``slots[:, column]``) are not 0."""
    index = np.full(cells, -1, dtype=np.int32)
    for slot in range(slots.shape[0]):
        if slots[slot, column] != 0:
            _index_add(index, np.uint64(slots[slot, column]), slot)
    return index


@jit
def rehash(keys: U64, values: I64, min_value: int, capacity: int) -> U64:
    """A new table of ``capacity`` cells (a power of two) holding the
    nonzero ``keys`` whose value exceeds ``min_value``."""
    table = np.zeros((capacity, 2), dtype=np.uint64)
    for i in range(keys.size):
        if keys[i] != np.uint64(0) and values[i] > min_value:
            _put(table, keys[i], values[i])
    return table


@jit
def power_of_two(n: int) -> int:
    """The smallest power of two at least ``n`` and at least 16."""
    cells = 16
    while cells < n:
        cells *= 2
    return cells


@jit
def _count_ring(
    rings: I64,
    row: int,
    E: int,
    oldest: int,
    count_keys: U64,
    count_values: I64,
    used: I64,
    n_used: int,
) -> int:
    """Count once each entry newer than ``oldest`` among the filled cells of
    the ring in ``rings[row]`` (see :func:`observe_chunk`; their order does
    not matter) in a per-row table of entries whose used cells are listed in
    ``used``; returns the new number of used cells."""
    mask = count_keys.size - 1
    pos = rings[row, E]
    length = rings[row, E + 1]
    start = pos - length
    if start < 0:
        start += E
    for a in range(E):
        after_start = a - start
        if after_start < 0:
            after_start += E
        e = rings[row, a]
        if after_start >= length or e <= oldest:
            continue
        # Entries are consecutive integers: their low bits spread them over
        # the table. No branch on whether the entry is new: the CPU cannot
        # predict it, and a mispredicted branch costs more than the work.
        key = np.uint64(e)
        i = e & mask
        while True:
            held = count_keys[i]
            if held == key or held == np.uint64(0):
                break
            i = (i + 1) & mask
        count_keys[i] = key
        count_values[i] += 1
        used[n_used] = i
        n_used += held == np.uint64(0)
    return n_used


@jit
def _push(rings: I64, row: int, E: int, entry: int) -> None:
    """Append ``entry`` to the ring in ``rings[row]``."""
    pos = rings[row, E]
    rings[row, pos] = entry
    rings[row, E] = pos + 1 if pos + 1 < E else 0
    rings[row, E + 1] = min(rings[row, E + 1] + 1, E)


@jit
def observe_chunk(
    H: U64,
    rem: npt.NDArray[np.bool_],
    clients: I64,
    keys: U64,
    slots: I64,
    index: I32,
    entry_client: I64,
    seen: U64,
    counters: I64,
    entries_per_hash: int,
    match_threshold: int,
    max_hashes: int,
) -> tuple[I64, I64, I64]:
    """Compare a chunk's rows with the store in order, then store the chunk.

    Rows are taken in order. Row ``r`` is compared with the entries stored
    before it: ``c`` (``counters[0]`` plus the remembered rows before ``r``)
    entries, numbered 1..c; a remembered row becomes entry ``c + 1``. For
    each nonzero hash of the row, left to right, the candidates are the last
    ``E`` (``entries_per_hash``) entries holding that hash (the store's ring
    as the chunk began, followed by the chunk's own remembered occurrences
    of it), and then, if the row is remembered, the row joins them. An entry
    newer than ``c - horizon`` that is a candidate of at least
    ``match_threshold`` of the row's hashes is a near-duplicate; its sender
    (``entry_client``, or the chunk's client for an entry of this chunk) is
    the row's own client (``own``), or else, when the row's input key
    (nonzero) was remembered by an earlier row of this chunk or by an entry
    newer than ``c - horizon``, it counts as ``identical``, and otherwise
    towards the row's ``others``.

    Held hash values' rings are updated in place; a value not held gets a
    ring of the chunk's own. After the rows, those of them that some
    remembered row holds get slots, in ascending hash order, at the next
    positions (``counters[1]`` onwards, modulo ``max_hashes``) not used by a
    hash of this chunk, evicting the value held there (the oldest
    first-seen); then the remembered rows' input keys map to their entry
    (the last one when a key repeats).

    Parameters
    ----------
    H
        (n, w) hash values of the chunk's rows; 0 is an empty place.
    rem
        Whether each row is stored after it is compared.
    clients, keys
        Each row's client number and input key (0: unknown).
    slots
        Per slot, one row (one cache line for ``E = 4``): the ring of the
        last ``E`` entries (its filled cells are the ``length`` before
        ``pos``, cyclically), then ``pos``, ``length``, the last chunk
        (``counters[3]``) that used the slot and the bits of the hash value
        held (0: none); updated. At least ``min(max_hashes, counters[1] +
        n * w)`` slots.
    index
        Hash value -> slot table (slot numbers, -1 empty; the value is in
        the slot's row), at least twice as many cells as slots.
    entry_client
        Client of entry ``e`` at ``e % horizon`` (its length is the
        horizon).
    seen
        Input key -> last entry table, with room for ``n`` more keys at half
        load.
    counters
        Entries stored so far, slot positions handed out so far, keys in
        the seen table, chunks seen; updated.
    entries_per_hash
        ``E``.
    match_threshold
        Shared hashes that make a near-duplicate.
    max_hashes
        Slots in all.

    Returns
    -------
    tuple of arrays
        ``own`` and ``identical`` (n,) counts, and ``others`` (m, 3): rows
        of (row, client, near-duplicates), by row then client.
    """
    n, w = H.shape
    E = entries_per_hash
    POS, LEN, CHUNK, HASH = E, E + 1, E + 2, E + 3
    horizon = entry_client.size
    clock0 = counters[0]
    counters[3] += 1
    chunk = counters[3]

    # Hash values not held, numbered in order of first sight, each with a
    # ring of its own (laid out as a slot) until it gets a slot.
    # Room for few at first, doubled when needed: most chunks of a warm
    # store bring few new values, and room for every place of the chunk
    # (megabytes) costs fresh pages on every call.
    cap = min(max(n * w, 1), 256)
    fresh = np.zeros((power_of_two(2 * cap), 2), dtype=np.uint64)
    fresh_hash = np.empty(cap, dtype=np.uint64)
    fresh_rings = np.empty((cap, slots.shape[1]), dtype=np.int64)
    fresh_pushed = np.empty(cap, dtype=np.int64)
    n_fresh = 0
    # Input keys remembered by earlier rows of the chunk.
    chunk_keys = np.zeros((power_of_two(2 * max(n, 1)), 2), dtype=np.uint64)
    remembered = np.empty(n, dtype=np.int64)
    n_rem = 0

    # Per row: candidates counted in a small table of entries, emptied
    # after the row through the list of cells it used.
    count_keys = np.zeros(power_of_two(4 * max(w * E, 1)), dtype=np.uint64)
    count_values = np.zeros(count_keys.size, dtype=np.int64)
    used = np.empty(max(w * E, 1), dtype=np.int64)
    senders = np.empty(max(w * E, 1), dtype=np.int64)

    own = np.zeros(n, dtype=np.int64)
    identical = np.zeros(n, dtype=np.int64)
    others = np.empty((n * max(1, (w * E) // match_threshold), 3), dtype=np.int64)
    n_others = 0

    for r in range(n):
        clock = clock0 + n_rem
        entry = clock + 1
        keep = rem[r]
        if keep:
            remembered[n_rem] = r
        oldest = clock - horizon  # entries up to it no longer count

        # Candidates, hash by hash (a repeated hash sees the row itself).
        n_used = 0
        for j in range(w):
            h = H[r, j]
            if h == np.uint64(0):
                continue
            slot = _slot_of(index, slots, HASH, h)
            if slot >= 0:
                slots[slot, CHUNK] = chunk
                n_used = _count_ring(
                    slots, slot, E, oldest, count_keys, count_values, used, n_used
                )
                if keep:
                    _push(slots, slot, E, entry)
                continue
            cell = _find(fresh, h)
            if cell >= 0:
                g = int(np.int64(fresh[cell, 1]))
            else:
                if n_fresh == fresh_hash.size:
                    grown = np.zeros((2 * fresh.shape[0], 2), dtype=np.uint64)
                    for c in range(fresh.shape[0]):
                        if fresh[c, 0] != np.uint64(0):
                            _put(grown, fresh[c, 0], int(np.int64(fresh[c, 1])))
                    fresh = grown
                    fresh_hash = np.concatenate((fresh_hash, np.empty_like(fresh_hash)))
                    fresh_rings = np.concatenate(
                        (fresh_rings, np.empty_like(fresh_rings))
                    )
                    fresh_pushed = np.concatenate(
                        (fresh_pushed, np.empty_like(fresh_pushed))
                    )
                g = n_fresh
                n_fresh += 1
                _put(fresh, h, g)
                fresh_hash[g] = h
                fresh_rings[g] = -1
                fresh_rings[g, POS] = 0
                fresh_rings[g, LEN] = 0
                fresh_pushed[g] = 0
            n_used = _count_ring(
                fresh_rings, g, E, oldest, count_keys, count_values, used, n_used
            )
            if keep:
                _push(fresh_rings, g, E, entry)
                fresh_pushed[g] += 1

        # Near-duplicates, by sender; the input key is looked up only for a
        # row that another client matched.
        exact = -1
        n_senders = 0
        for u in range(n_used):
            i = used[u]
            if count_values[i] >= match_threshold:
                e = int(np.int64(count_keys[i]))
                if e <= clock0:
                    sender = entry_client[e % horizon]
                else:
                    sender = clients[remembered[e - clock0 - 1]]
                if sender == clients[r]:
                    own[r] += 1
                    continue
                if exact < 0:
                    key = keys[r]
                    exact = 0
                    if key != np.uint64(0):
                        if _find(chunk_keys, key) >= 0:
                            exact = 1
                        else:
                            found = _find(seen, key)
                            if found >= 0 and np.int64(seen[found, 1]) > oldest:
                                exact = 1
                if exact == 1:
                    identical[r] += 1
                else:
                    senders[n_senders] = sender
                    n_senders += 1
        for u in range(n_used):
            count_keys[used[u]] = 0
            count_values[used[u]] = 0
        if n_senders:
            ranked = np.sort(senders[:n_senders])
            start = 0
            for u in range(1, n_senders + 1):
                if u == n_senders or ranked[u] != ranked[start]:
                    others[n_others, 0] = r
                    others[n_others, 1] = ranked[start]
                    others[n_others, 2] = u - start
                    n_others += 1
                    start = u

        if keep:
            n_rem += 1
            # Safe before the chunk ends: the entry it overwrites is older
            # than the horizon for every later row.
            entry_client[entry % horizon] = clients[r]
            if keys[r] != np.uint64(0):
                _put(chunk_keys, keys[r], r)

    # New hash values some remembered row holds get slots, in ascending
    # hash order, skipping the slots of this chunk's held values (stamped
    # with the chunk) and those just given.
    stored = np.empty(n_fresh, dtype=np.int64)
    n_stored = 0
    for g in range(n_fresh):
        if fresh_pushed[g] > 0:
            stored[n_stored] = g
            n_stored += 1
    stored = stored[:n_stored]
    position = counters[1]
    tried = 0
    for g in stored[np.argsort(fresh_hash[stored])]:
        slot = -1
        while tried < max_hashes:
            candidate = position % max_hashes
            position += 1
            tried += 1
            if slots[candidate, CHUNK] != chunk:
                slot = candidate
                break
        if slot < 0:
            break  # more new values than max_hashes leaves free
        counters[1] = position
        old = slots[slot, HASH]
        if old != 0:
            _index_remove(index, slots, HASH, np.uint64(old))
        slots[slot] = fresh_rings[g]
        slots[slot, CHUNK] = chunk
        slots[slot, HASH] = np.int64(fresh_hash[g])
        _index_add(index, fresh_hash[g], slot)

    # The chunk's input keys.
    for t in range(n_rem):
        r = remembered[t]
        if keys[r] != np.uint64(0) and _put(seen, keys[r], clock0 + t + 1):
            counters[2] += 1
    counters[0] = clock0 + n_rem
    return own, identical, others[:n_others]


@jit
def score_windows(
    slots: I64,
    own: I64,
    matched_others: npt.NDArray[np.bool_],
    near: npt.NDArray[np.uint8],
    near_pos: I64,
    near_len: I64,
    n_seen: I64,
    n_cross: I64,
    own_run: I64,
    min_run: int,
    min_queries: int,
    min_cross: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], I64, I64, I64]:
    """Update each row's client (arena ``slots``) in row order and score it.

    A row is *own* when ``own > 0`` and *cross* when it matched another
    client and is not own. The client's run of own rows (``own_run``) grows
    by one on an own row and resets to 0 on any other; the bit pushed into
    the client's ring of the last ``window`` bits (``near``) is ``cross or
    run >= min_run``. Then ``n_seen`` grows by one and ``n_cross`` by the
    cross bit.

    Returns
    -------
    tuple of arrays
        Per row: score (set bits in the ring over its length, after the
        push), warm (``n_seen >= min_queries`` or ``n_cross >= min_cross``
        after the row), set bits, ring length and ``n_cross``.
    """
    n = slots.size
    window = near.shape[1]
    score = np.empty(n, dtype=np.float64)
    warm = np.empty(n, dtype=np.bool_)
    counts = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    crossed = np.empty(n, dtype=np.int64)
    for r in range(n):
        s = slots[r]
        is_own = own[r] > 0
        cross = matched_others[r] and not is_own
        run = own_run[s] + 1 if is_own else 0
        own_run[s] = run

        pos = near_pos[s]
        near[s, pos] = 1 if (cross or run >= min_run) else 0
        length = min(near_len[s] + 1, window)
        pos = pos + 1 if pos + 1 < window else 0
        near_pos[s] = pos
        near_len[s] = length
        # The window is the `length` bits before `pos`, cyclically: at most
        # two runs of cells, summed without a division per cell.
        start = pos - length
        count = 0
        if start < 0:
            for a in range(start + window, window):
                count += near[s, a]
            start = 0
        for a in range(start, pos):
            count += near[s, a]

        n_seen[s] += 1
        n_cross[s] += 1 if cross else 0
        counts[r] = count
        lengths[r] = length
        crossed[r] = n_cross[s]
        score[r] = count / length
        warm[r] = n_seen[s] >= min_queries or n_cross[s] >= min_cross
    return score, warm, counts, lengths, crossed
