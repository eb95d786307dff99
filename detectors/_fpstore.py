"""The store of recent fingerprints shared by every client: what it answers
per query (:class:`FingerprintMatch`), the protocol a store follows
(:class:`FingerprintStore`) and the bounded in-memory implementation
(:class:`InMemoryFingerprintStore`). A Redis implementation lives in
``gateway.fingerprints``; the compiled loops in :mod:`detectors._fpkernels`.
All three names are re-exported from :mod:`detectors.fingerprint`.

Imports numpy and :mod:`detectors._fpkernels` (numba) only; nothing from
Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import repeat
from types import MappingProxyType
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from detectors._fphash import HashArray
from detectors._fpkernels import observe_chunk, power_of_two, rehash, reindex

_NO_OTHERS: Mapping[str, int] = MappingProxyType({})
"""The ``others`` of a row no other client matched, shared and read-only."""


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
            Per row, :func:`~detectors.fingerprint.input_keys` of the query,
            so exact copies of an earlier input are told apart
            (``FingerprintMatch.identical``); without them every match
            counts as a near-duplicate.

        Returns
        -------
        list of FingerprintMatch
            One per row.
        """
        ...


# Rows compared per step, so that a chunk's new hash values never need more
# than half the slots.
_STORE_CHUNK_ROWS = 512

# Slots (and input keys) the store starts with; it grows by doubling.
_INITIAL_SLOTS = 4096


# Shared matches of rows that matched no other client, by own * 16 +
# identical (both below 16): a named tuple is immutable, so rows may share
# one, and a look-up is ten times cheaper than building one per row.
_MATCH_SIDE = 16


def _plain_matches() -> npt.NDArray[np.object_]:
    table = np.empty(_MATCH_SIDE * _MATCH_SIDE, dtype=object)
    for own in range(_MATCH_SIDE):
        for identical in range(_MATCH_SIDE):
            table[own * _MATCH_SIDE + identical] = FingerprintMatch(
                own, _NO_OTHERS, identical
            )
    return table


_PLAIN_MATCHES = _plain_matches()


def _matches(
    own: npt.NDArray[np.int64],
    others: list[Mapping[str, int]],
    identical: npt.NDArray[np.int64],
    matched: npt.NDArray[np.bool_],
) -> list[FingerprintMatch]:
    """One :class:`FingerprintMatch` per row; ``matched`` marks the rows
    whose ``others`` is not empty."""
    plain = ~matched & (own < _MATCH_SIDE) & (identical < _MATCH_SIDE)
    code = np.where(plain, own * _MATCH_SIDE + identical, 0)
    out: list[FingerprintMatch] = _PLAIN_MATCHES[code].tolist()
    for row in np.flatnonzero(~plain).tolist():
        out[row] = FingerprintMatch(int(own[row]), others[row], int(identical[row]))
    return out


class InMemoryFingerprintStore:
    """A bounded :class:`FingerprintStore` in one process, compiled.

    Every remembered query becomes an entry (a sequence number and its
    client). For each hash value the store keeps the last ``entries_per_hash``
    entries that contained it. A new query is a near-duplicate of an earlier
    entry when they share at least ``match_threshold`` hashes, as in
    Blacklight; the result names the clients of those entries and how many
    near-duplicates each sent.

    The hash values of one row must be distinct (fingerprints are: a window's
    position is part of its hash).

    Layout: numpy arrays only, worked on by one compiled kernel per chunk of
    rows (:func:`detectors._fpkernels.observe_chunk`): a slot per hash value
    held (a 64-byte row: the value, a ring of its last entries and their
    counters), an open-addressing table from hash value to slot (4 bytes a
    cell), the client of each of the last ``horizon`` entries, and a table
    from input key to the last entry that had it. Hash values are evicted
    oldest first-seen first (within a chunk, the chunk's new values take
    slots in ascending value order, never a slot the chunk itself uses); an
    input key stops counting once its last entry is beyond the horizon.
    Client names are kept in an index that only grows (about 100 bytes per
    client ever seen). One thread at a time: the kernels release the GIL,
    and two calls at once would interleave their updates.

    Parameters
    ----------
    match_threshold
        Shared hashes that make a near-duplicate.
    horizon
        Entries (remembered queries of all clients) that count; older ones
        stop counting.
    max_hashes
        Hash values kept. A chunk holds at most ``max_hashes / 2`` new values
        unless one row has more hashes than that; then (``max_hashes`` below
        twice the fingerprint size) the new values that find no free slot are
        not stored.
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
        capacity = min(max_hashes, _INITIAL_SLOTS)
        # Per slot one row: the ring of entries, its next position, its
        # length, the last chunk of rows that used the slot (not reused by
        # that chunk's new values) and the bits of the hash value held (0:
        # slot free); padded to whole 64-byte cache lines.
        self._hash_column = entries_per_hash + 3
        self._slot_width = -(-(entries_per_hash + 4) // 8) * 8
        self._slots = self._empty_slots(capacity)
        # Hash value -> slot number (-1: empty cell), at most half full; 4
        # bytes a cell, as the value itself is in the slot's row.
        self._index = np.full(2 * power_of_two(capacity), -1, dtype=np.int32)
        self._entry_client = np.full(horizon, -1, dtype=np.int64)
        # Input key -> last entry that had it; keys beyond the horizon are
        # dropped when the table would pass half full.
        self._seen = np.zeros((power_of_two(_INITIAL_SLOTS), 2), dtype=np.uint64)
        # Entries stored, slot positions handed out (modulo max_hashes), keys
        # in the seen table (those beyond the horizon included), chunks seen.
        self._counters = np.zeros(4, dtype=np.int64)
        self._client_index: dict[str, int] = {}
        self._client_names: list[str] = []

    def __len__(self) -> int:
        """Hash values held."""
        return int(np.count_nonzero(self._slots[:, self._hash_column]))

    def observe(
        self,
        client_ids: Sequence[str],
        hash_sets: HashArray,
        remember: Sequence[bool] | None = None,
        input_keys: npt.NDArray[np.uint64] | None = None,
    ) -> list[FingerprintMatch]:
        return self.observe_arrays(client_ids, hash_sets, remember, input_keys)[0]

    def observe_arrays(
        self,
        client_ids: Sequence[str],
        hash_sets: HashArray,
        remember: Sequence[bool] | None = None,
        input_keys: npt.NDArray[np.uint64] | None = None,
    ) -> tuple[list[FingerprintMatch], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """:meth:`observe`, also returning per row ``own`` and whether
        ``others`` is not empty as arrays (which the detector would
        otherwise rebuild from the matches, row by row)."""
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
        hashes = np.ascontiguousarray(hash_sets, dtype=np.uint64).reshape(n, -1)
        keys = (
            np.zeros(n, dtype=np.uint64)
            if input_keys is None
            else np.ascontiguousarray(input_keys, dtype=np.uint64)
        )
        if keys.shape != (n,):
            raise ValueError(f"{keys.size} input keys for {n} rows")
        clients = self._client_numbers(client_ids)
        width = max(hashes.shape[1], 1)
        step = max(1, min(_STORE_CHUNK_ROWS, self.max_hashes // (2 * width)))
        own = np.zeros(n, dtype=np.int64)
        identical = np.zeros(n, dtype=np.int64)
        others: list[Mapping[str, int]] = [_NO_OTHERS] * n
        matched = np.zeros(n, dtype=bool)
        names = self._client_names
        filled: dict[int, dict[str, int]] = {}
        for start in range(0, n, step):
            stop = min(start + step, n)
            H = hashes[start:stop]
            self._make_room(stop - start, H.shape[1])
            own[start:stop], identical[start:stop], pairs = observe_chunk(
                H,
                keep[start:stop],
                clients[start:stop],
                keys[start:stop],
                self._slots,
                self._index,
                self._entry_client,
                self._seen,
                self._counters,
                self.entries_per_hash,
                self.match_threshold,
                self.max_hashes,
            )
            for row, who, count in pairs.tolist():
                filled.setdefault(start + row, {})[names[who]] = count
        for row, senders in filled.items():
            others[row] = senders
            matched[row] = True
        return _matches(own, others, identical, matched), own, matched

    def _client_numbers(self, client_ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Each client's number in the name index, new clients added."""
        index = self._client_index
        n = len(client_ids)
        clients = np.fromiter(map(index.get, client_ids, repeat(-1, n)), np.int64, n)
        for i in np.flatnonzero(clients < 0).tolist():
            client = client_ids[i]
            c = index.get(client)
            if c is None:
                c = index[client] = len(self._client_names)
                self._client_names.append(client)
            clients[i] = c
        return clients

    def _make_room(self, n_rows: int, width: int) -> None:
        """Grow the slots and the tables so a chunk of ``n_rows`` rows of
        ``width`` hashes fits (the kernel cannot reallocate)."""
        handed_out = int(self._counters[1])
        needed = min(self.max_hashes, handed_out + n_rows * max(width, 1))
        old = len(self._slots)
        if needed > old:
            capacity = min(self.max_hashes, max(needed, 2 * old))
            extra = capacity - old
            self._slots = np.concatenate([self._slots, self._empty_slots(extra)])
            self._index = reindex(
                self._slots, self._hash_column, 2 * power_of_two(capacity)
            )
        # Keys beyond the horizon never count again; they go when the table
        # would pass half full, and it grows only if it is still too full.
        held = int(self._counters[2])
        if 2 * (held + n_rows) > len(self._seen):
            oldest = int(self._counters[0]) - self.horizon
            keys = np.ascontiguousarray(self._seen[:, 0])
            entries = self._seen[:, 1].astype(np.int64)
            live = int(np.count_nonzero((keys != 0) & (entries > oldest)))
            self._seen = rehash(
                keys,
                entries,
                oldest,
                max(len(self._seen), power_of_two(4 * (live + n_rows))),
            )
            self._counters[2] = live

    def _empty_slots(self, n: int) -> npt.NDArray[np.int64]:
        """``n`` slot rows with empty rings."""
        slots = np.zeros((n, self._slot_width), dtype=np.int64)
        slots[:, : self.entries_per_hash] = -1
        return slots
