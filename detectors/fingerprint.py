"""Near-duplicate fingerprints shared by all clients, in the spirit of Blacklight.

Blacklight (Li et al., "Blacklight: Scalable Defense for Neural Networks
against Query-Based Black-Box Attacks", USENIX Security 2022) notices that a
query-based attack sends many inputs that are nearly the same, whoever sends
them. It quantises each input, slides a window over the flattened pixels,
hashes every window and keeps a few of the hash values as the query's
fingerprint; two queries are near-duplicates when their fingerprints share
enough hashes. Because a fingerprint does not depend on the sender, one store
of recent fingerprints, shared by every API key, sees an attack spread over
many keys.

This module holds the hashing, the :class:`FingerprintStore` protocol with a
bounded in-memory implementation, and the per-client detector. A Redis
implementation of the store lives in ``gateway.fingerprints``.

Imports numpy and pydantic only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import Field

from detectors._state import (
    FieldSpec,
    Groups,
    check_window,
    group_rows,
    push_window,
    window_fields,
)
from detectors.base import Detector, DetectorParams, DetectorScore

logger = logging.getLogger(__name__)

HashArray = npt.NDArray[np.uint64]

# Odd 64-bit constants of the splitmix64 finaliser (Steele, Lea and Flood,
# 2014): they spread the few bits of a window's code over all 64 bits, so the
# largest hash values are a random-looking choice of windows.
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN_INT = 0x9E3779B97F4A7C15
_GOLDEN_KEY = np.uint64(_GOLDEN_INT)


_NO_OTHERS: Mapping[str, int] = MappingProxyType({})
"""The ``others`` of a row no other client matched, shared and read-only."""

# FingerprintMatch fields by position (own, others).
_OWN = itemgetter(0)
_OTHERS = itemgetter(1)


class FingerprintMatch(NamedTuple):
    """What a store knew about one query when it arrived.

    A named tuple, so a batch of them is built in C (a frozen dataclass cost
    about 1 µs per row); compare and read it by its fields.

    Attributes
    ----------
    own
        Recent queries of the same client that are near-duplicates of this one
        (share at least the store's match threshold of hashes).
    others
        Other clients with near-duplicates of this query among their recent
        queries, and how many each sent; empty when the query is an exact
        repeat (see ``identical``).
    identical
        When this exact input was stored before (by anyone, within the
        horizon; known only if the caller passes input keys): the other
        clients' near-duplicate entries, counted here instead of in
        ``others``. Many honest users sending one popular input is not
        probing, while an attack changes its input on every query (even
        below the quantisation step, where its fingerprint does not change).
    """

    own: int = 0
    others: Mapping[str, int] = _NO_OTHERS
    identical: int = 0


class FingerprintStore(Protocol):
    """Recent fingerprints of every client, shared across API keys.

    One call per batch. Rows are applied in order: a row is compared with
    everything stored before it, including earlier rows of the same call, and
    is stored afterwards.
    """

    def observe(
        self,
        client_ids: Sequence[str],
        hash_sets: HashArray,
        remember: Sequence[bool] | None = None,
        input_keys: npt.NDArray[np.uint64] | None = None,
    ) -> list[FingerprintMatch]:
        """Compare each row's hashes with the store, then add them.

        Parameters
        ----------
        client_ids
            Sender of each row.
        hash_sets
            Array (n, k) of uint64 hash values; 0 marks an empty slot.
        remember
            Per row, whether to add it after comparing (default: all); a row
            not remembered is compared only (for example a replay of traffic
            already stored).
        input_keys
            Per row, :func:`input_keys` of the query, so exact copies of an
            earlier input are told apart (``FingerprintMatch.identical``);
            without them every match counts as a near-duplicate.

        Returns
        -------
        list of FingerprintMatch
            One per row.
        """
        ...


def _mix(values: HashArray) -> HashArray:
    """splitmix64's finaliser, element-wise (uint64 arithmetic wraps)."""
    z = values
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    out: HashArray = z ^ (z >> np.uint64(31))
    return out


def input_keys(X: npt.NDArray[np.float64]) -> npt.NDArray[np.uint64]:
    """One 64-bit key per input, equal for inputs equal at 8 bits per feature
    (an exact copy), different otherwise but for hash collisions. Never 0."""
    n, d = X.shape
    # Eight quantised features per 64-bit word, each word mixed with its
    # position: an eighth of the mixing of one word per feature.
    q = np.zeros((n, -(-d // 8) * 8), dtype=np.uint8)
    q[:, :d] = np.rint(np.clip(X, 0.0, 1.0) * 255.0)
    words = q.view(np.uint64)
    position = _mix(np.arange(1, words.shape[1] + 1, dtype=np.uint64) * _GOLDEN_KEY)
    keys: npt.NDArray[np.uint64] = np.bitwise_xor.reduce(
        _mix(words ^ position[None, :]), axis=1
    )
    keys[keys == 0] = 1
    return keys


def window_hashes(
    X: npt.NDArray[np.float64], *, levels: int, width: int, seed: int = 0
) -> HashArray:
    """Hash of every window of ``width`` consecutive quantised features.

    Parameters
    ----------
    X
        Rows (n, d) scaled to [0, 1]; values outside are clipped.
    levels
        Quantisation levels per feature (Blacklight's step of 50 on 0-255 is
        about 5).
    width
        Features per window; ``levels ** width`` must fit in 48 bits.
    seed
        Mixed into every hash, so two deployments do not share hash values.

    Returns
    -------
    ndarray
        Shape (n, d - width + 1), uint64, never 0. The window's position is
        part of its hash: the same strokes at another place are another window.
    """
    code = window_codes(X, levels=levels, width=width)
    return _hash_codes(code, seed)


def window_codes(
    X: npt.NDArray[np.float64], *, levels: int, width: int
) -> npt.NDArray[np.uint64]:
    """Code (base ``levels`` digits) of every window of ``width`` quantised
    features; shape (n, d - width + 1), each below ``levels ** width``."""
    n, d = X.shape
    q = np.minimum((np.clip(X, 0.0, 1.0) * levels).astype(np.uint64), levels - 1)
    n_windows = d - width + 1
    code = np.zeros((n, n_windows), dtype=np.uint64)
    base = np.uint64(levels)
    for offset in range(width):
        code = code * base + q[:, offset : offset + n_windows]
    return code


def _hash_codes(code: npt.NDArray[np.uint64], seed: int) -> HashArray:
    """Window codes (n, w) to hash values, each mixed with its position."""
    n_windows = code.shape[1]
    position = np.arange(n_windows, dtype=np.uint64) << np.uint64(48)
    salt = np.uint64((seed * _GOLDEN_INT) & 0xFFFF_FFFF_FFFF_FFFF)
    mixed = _mix((code | position[None, :]) ^ salt)
    # 0 marks an empty slot in a fingerprint; a real hash of 0 becomes 1.
    mixed[mixed == 0] = 1
    return mixed


def top_hashes(hashes: HashArray, k: int, common: HashArray | None = None) -> HashArray:
    """The ``k`` largest hash values of each row, leaving out ``common`` ones.

    Parameters
    ----------
    hashes
        Window hashes (n, w), as :func:`window_hashes` returns.
    k
        Fingerprint size.
    common
        Sorted hash values seen in too many reference rows to tell queries
        apart (blank corners of a digit); never part of a fingerprint.

    Returns
    -------
    ndarray
        Shape (n, k), each row sorted descending; 0 fills rows with fewer than
        ``k`` usable windows.
    """
    values = hashes
    if common is not None and len(common):
        index = np.minimum(np.searchsorted(common, values), len(common) - 1)
        values = np.where(common[index] == values, np.uint64(0), values)
    width = values.shape[1]
    if k >= width:
        chosen = values
    else:
        chosen = np.partition(values, width - k, axis=1)[:, width - k :]
    out: HashArray = np.sort(chosen, axis=1)[:, ::-1]
    if k > width:
        pad = np.zeros((len(out), k - width), dtype=np.uint64)
        out = np.concatenate([out, pad], axis=1)
    return np.ascontiguousarray(out)


# Largest (position, code) hash table a detector precomputes: 8 bytes each,
# so 8 MB; digits (59 windows of 4**6 codes) need 1.9 MB.
_MAX_TABLE_ENTRIES = 1 << 20

# Candidate places per row (hashes x candidates per hash) up to which the
# near-duplicate count sorts one matrix row per query; beyond, only the filled
# places are sorted (the matrix would be mostly empty).
_ROW_SORT_PLACES = 512

# Rows compared per step, so that a chunk's new hash values never need more
# than half the table.
_STORE_CHUNK_ROWS = 512


class InMemoryFingerprintStore:
    """A bounded :class:`FingerprintStore` in one process, vectorised.

    Every remembered query becomes an entry (a sequence number and its
    client). For each hash value the store keeps the last ``entries_per_hash``
    entries that contained it. A new query is a near-duplicate of an earlier
    entry when they share at least ``match_threshold`` hashes, as in
    Blacklight; the result names the clients of those entries and how many
    near-duplicates each sent.

    The hash values of one row must be distinct (fingerprints are: a window's
    position is part of its hash).

    Layout: a dict from hash value to a row of a table of entry rings (the
    only per-hash Python work is that look-up); the counting of shared hashes
    per earlier entry is a sort per batch. Hash values are evicted oldest
    first-seen first; client names are kept in an index that only grows
    (about 100 bytes per client ever seen).

    Parameters
    ----------
    match_threshold
        Shared hashes that make a near-duplicate.
    horizon
        Entries (remembered queries of all clients) that count; older ones
        stop counting.
    max_hashes
        Hash values kept.
    entries_per_hash
        Entries kept per hash value; the oldest go first. Bounds the work per
        query at ``k * entries_per_hash`` candidates.
    """

    def __init__(
        self,
        *,
        match_threshold: int,
        horizon: int = 100_000,
        max_hashes: int = 200_000,
        entries_per_hash: int = 8,
    ) -> None:
        if match_threshold < 1 or horizon < 1 or max_hashes < 1:
            raise ValueError("match_threshold, horizon and max_hashes must be >= 1")
        if entries_per_hash < 1:
            raise ValueError("entries_per_hash must be >= 1")
        self.match_threshold = match_threshold
        self.horizon = horizon
        self.max_hashes = max_hashes
        self.entries_per_hash = entries_per_hash
        self._slot_of: dict[int, int] = {}
        capacity = min(max_hashes, 4096)
        self._slot_hash = np.zeros(capacity, dtype=np.uint64)
        self._table = np.full((capacity, entries_per_hash), -1, dtype=np.int64)
        self._table_pos = np.zeros(capacity, dtype=np.int64)
        self._table_len = np.zeros(capacity, dtype=np.int64)
        self._allocated = 0  # slots handed out so far (reused modulo max_hashes)
        self._entry_client = np.full(horizon, -1, dtype=np.int64)
        self._clock = 0
        self._client_index: dict[str, int] = {}
        self._client_names: list[str] = []
        # Input key -> last entry that had it (at most `horizon` keys).
        self._seen_key: dict[int, int] = {}

    def __len__(self) -> int:
        """Hash values held."""
        return len(self._slot_of)

    def _exact_repeats(
        self,
        keys: npt.NDArray[np.uint64],
        rem: npt.NDArray[np.bool_],
        clock_at_row: npt.NDArray[np.int64],
        wanted: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.bool_]:
        """Whether each of the ``wanted`` rows' input was stored before it
        (within the horizon, or by an earlier remembered row of the chunk);
        key 0 means unknown. Only rows another client matched need the
        answer, so only they are looked up, one by one."""
        exact = np.zeros(len(keys), dtype=bool)
        if not wanted.size:
            return exact
        seen = self._seen_key
        horizon = self.horizon
        rows_rem = np.flatnonzero(rem)
        # First remembered row of the chunk holding each key.
        first_in_chunk = dict(
            zip(keys[rows_rem[::-1]].tolist(), rows_rem[::-1].tolist(), strict=True)
        )
        for r, key, clock in zip(
            wanted.tolist(),
            keys[wanted].tolist(),
            clock_at_row[wanted].tolist(),
            strict=True,
        ):
            if key == 0:
                continue
            if first_in_chunk.get(key, r) < r:
                exact[r] = True
                continue
            earlier = seen.get(key)
            exact[r] = earlier is not None and earlier > clock - horizon
        return exact

    def _remember_keys(
        self,
        keys: npt.NDArray[np.uint64],
        rem: npt.NDArray[np.bool_],
        entry_of_row: npt.NDArray[np.int64],
    ) -> None:
        """Remember the input keys of the chunk's remembered rows (the latest
        entry per key), dropping the oldest keys beyond ``horizon``."""
        rows_rem = np.flatnonzero(rem & (keys != 0))
        if not rows_rem.size:
            return
        seen = self._seen_key
        new_keys = keys[rows_rem].tolist()
        # A key seen again moves to the end, so the oldest go first.
        for key in seen.keys() & set(new_keys):
            del seen[key]
        seen.update(zip(new_keys, entry_of_row[rows_rem].tolist(), strict=True))
        excess = len(seen) - self.horizon
        if excess > 0:
            for key in list(itertools.islice(seen, excess)):
                del seen[key]

    def observe(
        self,
        client_ids: Sequence[str],
        hash_sets: HashArray,
        remember: Sequence[bool] | None = None,
        input_keys: npt.NDArray[np.uint64] | None = None,
    ) -> list[FingerprintMatch]:
        n = len(client_ids)
        if n != len(hash_sets):
            raise ValueError(f"{n} client ids for {len(hash_sets)} hash sets")
        keep = (
            np.ones(n, dtype=bool)
            if remember is None
            else np.asarray(remember, dtype=bool)
        )
        if keep.shape != (n,):
            raise ValueError(f"{keep.size} remember flags for {n} rows")
        hashes = np.asarray(hash_sets, dtype=np.uint64).reshape(n, -1)
        keys = (
            np.zeros(n, dtype=np.uint64)
            if input_keys is None
            else np.asarray(input_keys, dtype=np.uint64)
        )
        if keys.shape != (n,):
            raise ValueError(f"{keys.size} input keys for {n} rows")
        index = self._client_index
        names = self._client_names
        clients = np.empty(n, dtype=np.int64)
        for i, client in enumerate(client_ids):
            c = index.get(client)
            if c is None:
                c = index[client] = len(names)
                names.append(client)
            clients[i] = c
        width = max(hashes.shape[1], 1)
        step = max(1, min(_STORE_CHUNK_ROWS, self.max_hashes // (2 * width)))
        out: list[FingerprintMatch] = []
        for start in range(0, n, step):
            stop = min(start + step, n)
            out += self._chunk(
                hashes[start:stop],
                keep[start:stop],
                clients[start:stop],
                keys[start:stop],
            )
        return out

    def _chunk(
        self,
        H: HashArray,
        rem: npt.NDArray[np.bool_],
        clients: npt.NDArray[np.int64],
        keys: npt.NDArray[np.uint64],
    ) -> list[FingerprintMatch]:
        n = H.shape[0]
        E = self.entries_per_hash
        clock0 = self._clock
        rem_int = rem.astype(np.int64)
        rem_cum = np.cumsum(rem_int)
        entry_of_row = clock0 + rem_cum  # meaningful where rem
        clock_at_row = clock0 + rem_cum - rem_int  # entries stored before the row
        remembered_rows = np.flatnonzero(rem)

        # Occurrences (row, hash) of non-empty slots, row-major.
        occ_row, occ_col = np.nonzero(H)
        occ_hash = H[occ_row, occ_col]
        m = len(occ_hash)

        # Sorted by (hash, row): each hash's occurrences in arrival order, and
        # b = remembered occurrences of the same hash earlier in the chunk.
        order = _order_by_hash_then_row(occ_hash, occ_row, n)
        sh, srow = occ_hash[order], occ_row[order]
        srem = rem_int[srow]
        first = np.ones(m, dtype=bool)
        first[1:] = sh[1:] != sh[:-1]
        gstart = np.flatnonzero(first)
        gid = np.cumsum(first) - 1
        # One dict look-up per distinct hash value of the chunk (about half
        # the occurrences on digits), the only per-hash Python work.
        distinct = sh[gstart]
        get = self._slot_of.get
        dslot = np.fromiter(
            map(get, distinct.tolist(), [-1] * len(distinct)),
            dtype=np.int64,
            count=len(distinct),
        )
        sslot = dslot[gid]
        rem_cum_s = np.cumsum(srem)
        rem_before = rem_cum_s - srem
        group_rem_before = rem_before[gstart]
        b = rem_before - group_rem_before[gid]

        # Candidates of an occurrence: the last E entries of its hash's ring
        # (oldest first) followed by the b earlier remembered occurrences of
        # the chunk, which is what the ring will hold when the occurrence
        # comes; so at most E, not E from each.
        # Each distinct hash's ring is read once (-1 where empty). Most
        # occurrences have b = 0 and take their ring whole; only the others
        # (a hash repeated within the chunk) mix in chunk entries.
        age = np.arange(E)
        held = dslot >= 0
        s = np.where(held, dslot, 0)
        length = np.where(held, self._table_len[s], 0)
        ring = (self._table_pos[s][:, None] - length[:, None] + age[None, :]) % E
        entries = np.where(
            age[None, :] < length[:, None], self._table[s[:, None], ring], -1
        )
        cands = entries[gid]
        pushed = np.flatnonzero(b)
        if pushed.size:
            remembered_occ = np.flatnonzero(srem)
            pg = gid[pushed]
            lp = length[pg][:, None]
            k = (lp + b[pushed][:, None] - E) + age[None, :]
            from_ring = (k >= 0) & (k < lp)
            rank = k - lp
            from_chunk = rank >= 0
            at = remembered_occ[
                np.where(from_chunk, group_rem_before[pg][:, None] + rank, 0)
            ]
            cands[pushed] = np.where(
                from_ring,
                entries[pg[:, None], np.clip(k, 0, E - 1)],
                np.where(from_chunk, entry_of_row[srow[at]], -1),
            )

        # Per row, the candidate entries of all its hashes; an entry met in
        # at least match_threshold of them is a near-duplicate.
        near_row, near_entry = self._near_pairs(
            cands, srow, occ_col[order], (n, H.shape[1]), clock0
        )
        keep_near = near_entry > clock_at_row[near_row] - self.horizon
        near_row, near_entry = near_row[keep_near], near_entry[keep_near]
        own = np.zeros(n, dtype=np.int64)
        identical = np.zeros(n, dtype=np.int64)
        others: list[Mapping[str, int]] = [_NO_OTHERS] * n
        if near_row.size:
            sender = np.empty(near_entry.size, dtype=np.int64)
            stored_before = near_entry <= clock0
            sender[stored_before] = self._entry_client[
                near_entry[stored_before] % self.horizon
            ]
            in_chunk = ~stored_before
            sender[in_chunk] = clients[
                remembered_rows[near_entry[in_chunk] - clock0 - 1]
            ]
            is_own = sender == clients[near_row]
            exact = self._exact_repeats(
                keys, rem, clock_at_row, np.unique(near_row[~is_own])
            )
            is_identical = ~is_own & exact[near_row]
            own = np.bincount(near_row[is_own], minlength=n)
            identical = np.bincount(near_row[is_identical], minlength=n)
            other = ~is_own & ~is_identical
            if other.any():
                n_clients = len(self._client_names)
                pairs, found = np.unique(
                    near_row[other] * n_clients + sender[other], return_counts=True
                )
                names = self._client_names
                filled: dict[int, dict[str, int]] = {}
                for pair, count in zip(pairs.tolist(), found.tolist(), strict=True):
                    row, who = divmod(pair, n_clients)
                    filled.setdefault(row, {})[names[who]] = count
                for row, senders in filled.items():
                    others[row] = senders

        self._remember_keys(keys, rem, entry_of_row)
        self._store(sh, gstart, gid, sslot, srem, b, srow, entry_of_row)
        if remembered_rows.size:
            last = remembered_rows[-self.horizon :]
            self._entry_client[entry_of_row[last] % self.horizon] = clients[last]
            self._clock = int(clock0 + remembered_rows.size)
        return list(
            map(
                tuple.__new__,
                repeat(FingerprintMatch, n),
                zip(own.tolist(), others, identical.tolist(), strict=True),
            )
        )

    def _near_pairs(
        self,
        cands: npt.NDArray[np.int64],
        srow: npt.NDArray[np.int64],
        scol: npt.NDArray[np.int64],
        shape: tuple[int, int],
        clock0: int,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The (row, entry) pairs, sorted, where the entry is a candidate of
        at least ``match_threshold`` of the row's hashes.

        ``cands`` holds each occurrence's candidate entries (-1 for none),
        occurrence ``i`` being hash column ``scol[i]`` of row ``srow[i]``.
        """
        n, width = shape
        places = cands.shape[1]
        t = self.match_threshold
        if width * places <= _ROW_SORT_PLACES:
            # Every candidate place of a row in one row of a matrix, sorted
            # row by row: an entry held by t places spans columns c..c+t-1.
            # Measured 0.4 ms per 512 rows against 1.1 ms for the packed sort
            # below (16 hashes x 8 candidates).
            table = np.full((n, width, places), -1, dtype=np.int64)
            table[srow, scol] = cands
            ranked = np.sort(table.reshape(n, width * places), axis=1)
            span = width * places - t + 1
            if span <= 0:
                empty = np.zeros(0, dtype=np.int64)
                return empty, empty
            head = ranked[:, :span]
            hit = (head == ranked[:, t - 1 :]) & (head >= 0)
            hit[:, 1:] &= ranked[:, 1:span] != ranked[:, : span - 1]
            rows, columns = np.nonzero(hit)
            entries: npt.NDArray[np.int64] = ranked[rows, columns]
            return rows, entries
        # Wide fingerprints: only the filled places are sorted, by (row,
        # entry) packed into one integer.
        valid = cands >= 0
        cand_rows = np.broadcast_to(srow[:, None], cands.shape)[valid]
        base = clock0 + n + 1
        packed = np.sort(cand_rows * base + cands[valid])
        rows, values = np.divmod(packed, base)
        if not values.size:
            return rows, values
        run = np.ones(values.size, dtype=bool)
        run[1:] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
        starts = np.flatnonzero(run)
        counts = np.diff(np.append(starts, values.size))
        kept = starts[counts >= t]
        return rows[kept], values[kept]

    def _store(
        self,
        sh: HashArray,
        gstart: npt.NDArray[np.int64],
        gid: npt.NDArray[np.int64],
        sslot: npt.NDArray[np.int64],
        srem: npt.NDArray[np.int64],
        b: npt.NDArray[np.int64],
        srow: npt.NDArray[np.int64],
        entry_of_row: npt.NDArray[np.int64],
    ) -> None:
        """Push the chunk's remembered occurrences into the hash rings."""
        E = self.entries_per_hash
        if not srem.any():
            return
        total = np.add.reduceat(srem, gstart)
        group_slot = sslot[gstart].copy()
        need = (total > 0) & (group_slot < 0)
        if need.any():
            group_slot[need] = self._allocate(sh[gstart][need], group_slot)
        slot = group_slot[gid]
        write = (srem > 0) & (b >= total[gid] - E)
        ws = slot[write]
        self._table[ws, (self._table_pos[ws] + b[write]) % E] = entry_of_row[
            srow[write]
        ]
        touched = total > 0
        gs = group_slot[touched]
        self._table_pos[gs] = (self._table_pos[gs] + total[touched]) % E
        self._table_len[gs] = np.minimum(self._table_len[gs] + total[touched], E)

    def _allocate(
        self, new_hashes: HashArray, in_use: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """Slots for hash values not yet held: the next positions of a ring
        over ``max_hashes`` slots (so the oldest first-seen value goes first),
        skipping slots this chunk uses."""
        u = len(new_hashes)
        touched = in_use[in_use >= 0]
        positions = (self._allocated + np.arange(u + touched.size)) % self.max_hashes
        usable = np.flatnonzero(~np.isin(positions, touched))[:u]
        slots = positions[usable]
        self._allocated += int(usable[-1]) + 1
        needed = int(slots.max()) + 1
        if needed > len(self._slot_hash):
            self._grow(min(self.max_hashes, max(needed, 2 * len(self._slot_hash))))
        slot_of = self._slot_of
        for slot, old in zip(
            slots.tolist(), self._slot_hash[slots].tolist(), strict=True
        ):
            if slot_of.get(old) == slot:
                del slot_of[old]
        slot_of.update(zip(new_hashes.tolist(), slots.tolist(), strict=True))
        self._slot_hash[slots] = new_hashes
        self._table[slots] = -1
        self._table_pos[slots] = 0
        self._table_len[slots] = 0
        return slots

    def _grow(self, capacity: int) -> None:
        old = len(self._slot_hash)
        extra = capacity - old
        self._slot_hash = np.concatenate(
            [self._slot_hash, np.zeros(extra, dtype=np.uint64)]
        )
        self._table = np.concatenate(
            [
                self._table,
                np.full((extra, self.entries_per_hash), -1, dtype=np.int64),
            ]
        )
        self._table_pos = np.concatenate(
            [self._table_pos, np.zeros(extra, dtype=np.int64)]
        )
        self._table_len = np.concatenate(
            [self._table_len, np.zeros(extra, dtype=np.int64)]
        )


def _order_by_hash_then_row(
    occ_hash: HashArray, occ_row: npt.NDArray[np.int64], n_rows: int
) -> npt.NDArray[np.int64]:
    """The permutation sorting occurrences by (hash, row); ``occ_row`` is
    ascending.

    A stable sort by hash gives it, but numpy's stable sort of 64-bit keys
    is a merge sort, measured 5 times slower than its quicksort on a chunk's
    8,000 occurrences. So the row replaces the hash's low bits and the
    unique keys are quicksorted; that order is right unless two different
    hashes of the chunk agree on all other bits (about one chunk in 2**40),
    which shows as neighbours that agree there and differ in full, and then
    the stable sort is used.
    """
    bits = np.uint64(max(1, (n_rows - 1).bit_length()))
    high = (occ_hash >> bits) << bits
    order = np.argsort(high | occ_row.astype(np.uint64))
    high_sorted = high[order]
    hash_sorted = occ_hash[order]
    if np.any(
        (high_sorted[1:] == high_sorted[:-1]) & (hash_sorted[1:] != hash_sorted[:-1])
    ):
        order = np.argsort(occ_hash, kind="stable")
    out: npt.NDArray[np.int64] = order
    return out


def _own_runs(
    state: npt.NDArray[np.int64], groups: Groups, own: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int64]:
    """Length of the client's run of own near-duplicates ending at each row
    (0 where the row is none), carrying ``state`` (each client's run so far)
    into the batch and leaving there the run at its last row.

    ``own`` is in the batch's sorted order (``groups``).
    """
    n = len(own)
    index = np.arange(n)
    start = groups.start[groups.group]
    # Last row at or before each row that broke the run, never before the
    # group's own start minus one.
    broke = np.where(own, -1, index)
    broke[groups.start] = np.maximum(broke[groups.start], groups.start - 1)
    last = np.maximum.accumulate(broke)
    run = index - last
    unbroken = last == start - 1
    run[unbroken] += state[groups.unique][groups.group[unbroken]]
    state[groups.unique] = run[groups.start + groups.size - 1]
    out: npt.NDArray[np.int64] = run
    return out


class FingerprintParams(DetectorParams):
    """Parameters of :class:`FingerprintDetector`."""

    # Source of the defaults: on digits (X / 16) with these values, ART
    # HopSkipJump queries share >= 8 of 16 hashes with an earlier query of the
    # attack for most of the stream, held-out digits with another held-out
    # digit for well under 1% (tests/detectors/test_fingerprint.py measures
    # both).
    levels: int = Field(4, ge=2, le=256)
    """Quantisation levels per feature."""

    width: int = Field(6, ge=1, le=64)
    """Features per hashed window."""

    k: int = Field(16, ge=1, le=256)
    """Hash values kept per query (Blacklight's top-k)."""

    match_threshold: int = Field(8, ge=1, le=256)
    """Hashes two queries must share to count as near-duplicates."""

    common_share: float = Field(0.02, gt=0.0, le=1.0)
    """A window hash found in more than this share of reference rows is common
    and never used (blank borders of digits match everything)."""

    window: int = Field(50, ge=5, le=4096)
    """Recent queries of a client over which the near-duplicate share is taken."""

    # Source of the default: an honest client that re-submits one input sends
    # a short run of near copies (the evaluation's habit: runs of 3 to 8
    # queries, so at most 7 near-duplicates of its own in a row).
    min_run: int = Field(8, ge=1, le=100_000)
    """Near-duplicates of the client's own queries in a row from which each
    counts (shorter runs are an honest re-submission)."""

    threshold: float = Field(0.5, gt=0.0, le=1.0)
    """Share of near-duplicate queries in the window at which a client is flagged."""

    min_queries: int = Field(10, ge=1, le=100_000)
    """Queries a client must have sent before it can be flagged."""

    min_cross: int = Field(3, ge=1, le=100_000)
    """Queries matching another client's that make a client judged before
    ``min_queries``: a key of an attacker spread over many keys sends few
    queries each, and matching other keys is the evidence."""

    horizon: int = Field(100_000, ge=100, le=100_000_000)
    """Queries (all clients) after which a stored fingerprint stops counting."""

    max_hashes: int = Field(200_000, ge=1000, le=100_000_000)
    """Hash values the in-memory store keeps (about 200 bytes each)."""

    entries_per_hash: int = Field(4, ge=1, le=1024)
    """Latest queries the in-memory store keeps per hash value. An attack's
    newest near-duplicate holds most of a query's hashes, so it is among the
    last few entries of each; 4 finds it at half the work of 8 (measured by
    the fingerprint and probing-stream tests)."""


class FingerprintDetector(Detector[FingerprintParams]):
    """Share of a client's recent queries that nearly repeat an earlier query
    of any client, by Blacklight-style fingerprints in a shared store.

    Each query is quantised to ``levels`` levels; every window of ``width``
    consecutive features is hashed with its position, hashes common in the
    reference data are dropped, and the ``k`` largest remaining values are the
    fingerprint. The store says, per query, how many of its own client's
    recent queries and which other clients' share at least
    ``match_threshold`` hashes with it. A query *counts* when it matches
    another client's query and none of its own client's, or when it extends a
    run of at least ``min_run`` near-duplicates of the client's own queries in
    a row.

    Why not every near-duplicate: honest clients re-submit an input a few
    times with tiny changes. Each copy matches the client's previous copy
    (its own) and, for a popular input, the other clients that sent the same
    input before (others). Counting either flagged honest re-submitters; a
    short run of own near-duplicates, and a copy of the client's own query
    that other clients happened to send too, now do not count. A search
    matches itself for far longer than a re-submission run, and a search
    spread over many keys matches the other keys' queries without the key
    having sent a near-duplicate itself.

    Score: in [0, 1], higher is more suspicious: the share of counted queries
    among the client's last ``window`` queries. Flagged at ``threshold`` once
    ``min_queries`` queries have been seen, or earlier once ``min_cross`` of
    them matched another client's: a key of an attacker spread over ten keys
    sends a tenth of the search, and would otherwise be judged only after
    ``10 * min_queries`` queries of the attack. :attr:`last_matches` holds the
    other clients each row of the last batch matched, which the gateway turns
    into links between keys (``detectors.linking``).

    When it is weak:

    - quantisation cuts: a tiny change that crosses a level boundary in every
      window breaks all hashes (Blacklight's own limit); adaptive attackers
      adding noise of one level defeat it, at the price of larger queries;
    - inputs with few features (8x8 digits) give few windows, so ``k`` is
      small and one changed feature touches ``width`` of them;
    - the store is only as shared as it is deployed: the in-memory store sees
      one worker's clients; the gateway adds a Redis store across workers;
    - legitimate clients sending the same input (a popular image) are not
      counted as near-duplicates of each other (identical fingerprints are
      reported apart), but near copies of a popular input are;
    - every client's queries are stored, flagged ones included, so a known
      attacker can send near copies of a victim's typical inputs to make the
      victim's queries match and link it to the attacker's group (framing);
      group risk then needs a person's review before a block;
    - an attacker who re-sends near-duplicates of its own queries in runs
      shorter than ``min_run``, separated by other queries, is not counted;
    - honest clients that send near copies of inputs other clients sent,
      without re-sending them themselves (different users' photos of one
      object), count as matching others.

    Per-client state: a ring of ``window`` bits and four counters (about 100
    bytes). The shared store holds at most ``max_hashes`` hash values.

    Parameters
    ----------
    params
        Validated parameters; defaults when omitted.
    seed
        Mixed into every hash value.
    store
        The shared store; by default a bounded in-memory one.
    """

    name: ClassVar[str] = "fingerprint"
    Params: ClassVar[type[FingerprintParams]] = FingerprintParams
    _mutable_params: ClassVar[frozenset[str]] = frozenset(
        {"threshold", "min_queries", "min_run", "min_cross"}
    )

    def __init__(
        self,
        params: FingerprintParams | None = None,
        *,
        seed: int = 0,
        store: FingerprintStore | None = None,
    ) -> None:
        super().__init__(params, seed=seed)
        p = self._params
        if p.match_threshold > p.k:
            raise ValueError(
                f"{self.name}: match_threshold ({p.match_threshold}) exceeds k ({p.k})"
            )
        if p.levels**p.width >= 1 << 48:
            raise ValueError(f"{self.name}: levels ** width must be below 2**48")
        self.store: FingerprintStore = store or InMemoryFingerprintStore(
            match_threshold=p.match_threshold,
            horizon=p.horizon,
            max_hashes=p.max_hashes,
            entries_per_hash=p.entries_per_hash,
        )
        self._common: HashArray = np.zeros(0, dtype=np.uint64)
        self._table: HashArray | None = None
        self._weights: (
            tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None
        ) = None
        self.last_matches: list[FingerprintMatch] = []
        self.last_hashes: HashArray = np.zeros((0, p.k), dtype=np.uint64)
        self._batch_clients: list[str] = []
        self.last_input_keys: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)

    def score_batch(
        self,
        client_ids: Sequence[str],
        X: npt.NDArray[np.float64],
        *,
        learn: Sequence[bool] | npt.NDArray[np.bool_] | None = None,
        arrival_s: Sequence[float] | npt.NDArray[np.float64] | None = None,
    ) -> list[DetectorScore]:
        # The store is keyed by client id, which _score_rows (given slots)
        # would otherwise have to recover from the arena.
        self._batch_clients = list(client_ids)
        try:
            return super().score_batch(client_ids, X, learn=learn, arrival_s=arrival_s)
        finally:
            self._batch_clients = []

    def fingerprints(self, X: npt.NDArray[np.float64]) -> HashArray:
        """The fingerprint (k hash values, 0 for none) of each row of ``X``."""
        rows = self._check_rows(X)
        p = self._params
        if rows.shape[1] < p.width:
            raise ValueError(
                f"{self.name}: {rows.shape[1]} features are fewer than width={p.width}"
            )
        return self._fingerprint_rows(rows)

    def _fingerprint_rows(self, rows: npt.NDArray[np.float64]) -> HashArray:
        """:meth:`fingerprints` of rows already checked."""
        p = self._params
        table = self._hash_table(rows.shape[1])
        if table is None:
            hashes = window_hashes(
                rows, levels=p.levels, width=p.width, seed=self._seed
            )
            return top_hashes(hashes, p.k, self._common)
        # Every window's (position, code) index into the table in one matrix
        # product of the quantised rows: the codes are integers far below
        # 2**53, so float64 sums them exactly (one BLAS call against six
        # passes of uint64 arithmetic).
        weights, offsets = self._code_weights(rows.shape[1])
        levels = np.floor(np.clip(rows * p.levels, 0.0, p.levels - 1))
        code = (levels @ weights + offsets).astype(np.intp)
        return top_hashes(table[code], p.k)

    def _code_weights(
        self, n_features: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The matrix taking quantised features to window codes (base
        ``levels`` digits, first feature most significant) and each window's
        offset in the hash table."""
        if self._weights is None or self._weights[0].shape[0] != n_features:
            p = self._params
            n_windows = n_features - p.width + 1
            weights = np.zeros((n_features, n_windows))
            columns = np.arange(n_windows)
            for offset in range(p.width):
                weights[columns + offset, columns] = float(
                    p.levels ** (p.width - 1 - offset)
                )
            offsets = columns.astype(np.float64) * float(p.levels**p.width)
            self._weights = (weights, offsets)
        return self._weights

    def _hash_table(self, n_features: int) -> HashArray | None:
        """Every possible window hash by (position, code), common ones already
        0, when that table is small; ``None`` otherwise.

        A gather from it replaces mixing and the search among common hashes,
        which cost more than the rest of the fingerprint together.
        """
        p = self._params
        n_codes = p.levels**p.width
        n_windows = n_features - p.width + 1
        if n_codes * n_windows > _MAX_TABLE_ENTRIES:
            return None
        if self._table is None:
            codes = np.broadcast_to(
                np.arange(n_codes, dtype=np.uint64)[None, :], (n_windows, n_codes)
            ).T
            table = np.ascontiguousarray(_hash_codes(codes, self._seed).T).ravel()
            common = self._common
            if len(common):
                index = np.minimum(np.searchsorted(common, table), len(common) - 1)
                table[common[index] == table] = 0
            self._table = table
        return self._table

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        window = self._params.window
        return {
            **window_fields("near", window, "u1"),
            "n_seen": FieldSpec((), "<i8"),
            "n_cross": FieldSpec((), "<i8"),
            "own_run": FieldSpec((), "<i8"),
        }

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        check_window(values, "near", "near_pos", "near_len")
        if int(values["n_seen"]) < 0 or not 0 <= int(values["n_cross"]) <= int(
            values["n_seen"]
        ):
            raise ValueError("state field 'n_seen' or 'n_cross' is out of range")
        if not 0 <= int(values["own_run"]) <= int(values["n_seen"]):
            raise ValueError("state field 'own_run' is out of range")

    def _on_n_features(self, n_features: int) -> None:
        if n_features < self._params.width:
            raise ValueError(
                f"{self.name}: {n_features} features are fewer than "
                f"width={self._params.width}"
            )

    def _learn_baseline(self, X: npt.NDArray[np.float64]) -> None:
        """Mark window hashes found in more than ``common_share`` of ``X``."""
        p = self._params
        hashes = window_hashes(X, levels=p.levels, width=p.width, seed=self._seed)
        values, counts = np.unique(hashes, return_counts=True)
        self._common = np.sort(values[counts > p.common_share * len(X)])
        # Rebuilt without the newly common hashes, now rather than in the
        # first batch, whose latency it would add to.
        self._table = None
        self._hash_table(X.shape[1])
        logger.debug(
            "fingerprint baseline: %d of %d window hashes are common",
            len(self._common),
            len(values),
            extra={"detector": self.name},
        )

    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        assert self._arena is not None
        arrays = self._arena.arrays
        p = self._params
        n = len(slots)
        client_ids = self._batch_clients

        hashes = self._fingerprint_rows(X)  # checked by score_batch
        # Every row is stored, good standing or not: the store is evidence, not a
        # model of normal traffic, and an attack spread over keys would hide as
        # soon as its first keys were flagged if their queries were left out.
        del learn
        keys = input_keys(X)
        matches = self.store.observe(client_ids, hashes, None, keys)
        self.last_input_keys = keys
        self.last_hashes = hashes
        self.last_matches = matches
        threshold = p.match_threshold
        # Fields by position through C-level map: a generator over the
        # matches cost a Python frame step per row.
        own = np.fromiter(map(_OWN, matches), np.int64, n) > 0
        cross = np.fromiter(map(bool, map(_OTHERS, matches)), bool, n) & ~own

        # A near-duplicate of another client's query counts unless the query
        # also matches one of the client's own (a re-submitted popular input
        # matches everyone who sent it); one of the client's own counts only
        # within a run of at least min_run (see the class docstring).
        groups = group_rows(slots)
        run = _own_runs(arrays["own_run"], groups, own[groups.order])
        near = cross[groups.order] | (run >= p.min_run)
        counts, lengths = push_window(
            arrays["near"],
            arrays["near_pos"],
            arrays["near_len"],
            groups,
            near,
        )
        n_seen = arrays["n_seen"]
        seen = n_seen[groups.unique][groups.group] + groups.position + 1
        n_seen[groups.unique] += groups.size
        crossed = cross[groups.order].astype(np.int64)
        running = np.cumsum(crossed)
        before = running[groups.start] - crossed[groups.start]
        n_cross_col = arrays["n_cross"]
        cross_total = (
            n_cross_col[groups.unique][groups.group] + running - before[groups.group]
        )
        n_cross_col[groups.unique] += np.add.reduceat(crossed, groups.start)

        inverse = np.empty(n, dtype=np.int64)
        inverse[groups.order] = np.arange(n)
        counts = counts[inverse]
        lengths = lengths[inverse]
        cross_row = cross_total[inverse]

        def evidence(row: int) -> str:
            others = matches[row].others
            return (
                f"{counts[row]} of the last {lengths[row]} queries share at least "
                f"{threshold} of {p.k} fingerprint hashes with another client's "
                f"query or extend a run of {p.min_run}+ of its own; "
                f"{cross_row[row]} so far matched another client's"
                + (f" (this one: {', '.join(sorted(others)[:3])})" if others else "")
            )

        warm = (seen >= p.min_queries) | (cross_total >= p.min_cross)
        return self._scores(counts / lengths, warm[inverse], evidence)
