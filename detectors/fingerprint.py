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
implementation of the store lives in ``gateway.fingerprints``; the compiled
loops live in ``detectors._fpkernels``.

Imports numpy, pydantic and numba (through ``detectors._fpkernels``) only;
nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import Field

from detectors._fpkernels import (
    common_free_window_hashes,
    input_keys_rows,
    mix_array,
    observe_chunk,
    power_of_two,
    rehash,
    reindex,
    score_windows,
)
from detectors._state import FieldSpec, check_counters, check_window, window_fields
from detectors.base import Detector, DetectorParams, DetectorScore

logger = logging.getLogger(__name__)

HashArray = npt.NDArray[np.uint64]

# 2**64 / golden ratio, odd: spreads a seed over 64 bits.
_GOLDEN_INT = 0x9E3779B97F4A7C15


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
    flat = mix_array(np.ascontiguousarray(values).ravel())
    return flat.reshape(values.shape)


def input_keys(X: npt.NDArray[np.float64]) -> npt.NDArray[np.uint64]:
    """One 64-bit key per input, equal for inputs equal at 8 bits per feature
    (an exact copy), different otherwise but for hash collisions. Never 0.

    Eight quantised features per 64-bit word, each word mixed with its
    position: an eighth of the mixing of one word per feature (the order is
    in :func:`detectors._fpkernels.input_keys_rows`).
    """
    return input_keys_rows(np.ascontiguousarray(X, dtype=np.float64))


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


def _salt(seed: int) -> int:
    """What a seed XORs into every window before mixing."""
    return (seed * _GOLDEN_INT) & 0xFFFF_FFFF_FFFF_FFFF


def _hash_codes(code: npt.NDArray[np.uint64], seed: int) -> HashArray:
    """Window codes (n, w) to hash values, each mixed with its position."""
    n_windows = code.shape[1]
    position = np.arange(n_windows, dtype=np.uint64) << np.uint64(48)
    salt = np.uint64(_salt(seed))
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
    # numpy's partition and sort of uint64 rows, not a compiled loop: they
    # are vectorised (measured 0.13 µs per row of 59 against 0.9 µs for an
    # insertion into a sorted top k, whose branches the CPU cannot predict).
    if k >= width:
        chosen = values
    else:
        chosen = np.partition(values, width - k, axis=1)[:, width - k :]
    out: HashArray = np.sort(chosen, axis=1)[:, ::-1]
    if k > width:
        pad = np.zeros((len(out), k - width), dtype=np.uint64)
        out = np.concatenate([out, pad], axis=1)
    return np.ascontiguousarray(out)


# Most (position, code) windows a detector keeps a common bit for (128 KB);
# digits (59 windows of 4**6 codes) need 30 KB. Beyond, numpy hashes the
# windows and searches the common ones.
_MAX_COMMON_BITS = 1 << 20

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
    """Hash values the in-memory store keeps (about 80 bytes each)."""

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
        self._common_table: HashArray | None = None
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
        common = self._common_bits(rows.shape[1])
        if common is None:
            hashes = window_hashes(
                rows, levels=p.levels, width=p.width, seed=self._seed
            )
            return top_hashes(hashes, p.k, self._common)
        hashes = common_free_window_hashes(
            np.ascontiguousarray(rows, dtype=np.float64),
            p.levels,
            p.width,
            np.uint64(_salt(self._seed)),
            common,
        )
        return top_hashes(hashes, p.k)

    def _common_bits(self, n_features: int) -> HashArray | None:
        """One bit per (position, code) window, set where its hash is common,
        when that is small; ``None`` otherwise.

        With it the compiled loop hashes each window and drops common ones
        by one bit test: cheaper than a search among common hashes, and than
        a table of every window's hash (1.9 MB on digits, which other
        detectors' work pushes out of the cache between batches).
        """
        p = self._params
        n_codes = p.levels**p.width
        n_windows = n_features - p.width + 1
        if n_codes * n_windows > _MAX_COMMON_BITS:
            return None
        if self._common_table is None:
            codes = np.broadcast_to(
                np.arange(n_codes, dtype=np.uint64)[None, :], (n_windows, n_codes)
            ).T
            every = np.ascontiguousarray(_hash_codes(codes, self._seed).T).ravel()
            common = np.zeros(-(-every.size // 64) * 64, dtype=bool)
            if len(self._common):
                index = np.minimum(
                    np.searchsorted(self._common, every), len(self._common) - 1
                )
                common[: every.size] = self._common[index] == every
            # Bit (i % 64) of word i // 64 is window i (little-endian words).
            packed = np.packbits(common, bitorder="little")
            self._common_table = packed.view("<u8").astype(np.uint64)
        return self._common_table

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
        check_counters(values, "n_seen")
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
        self._common_table = None
        self._common_bits(X.shape[1])
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
        if isinstance(self.store, InMemoryFingerprintStore):
            matches, own, matched_others = self.store.observe_arrays(
                client_ids, hashes, None, keys
            )
        else:
            matches = self.store.observe(client_ids, hashes, None, keys)
            # Fields by position through C-level map: a generator over the
            # matches cost a Python frame step per row.
            own = np.fromiter(map(_OWN, matches), np.int64, n)
            matched_others = np.fromiter(map(bool, map(_OTHERS, matches)), bool, n)
        self.last_input_keys = keys
        self.last_hashes = hashes
        self.last_matches = matches
        threshold = p.match_threshold

        # A near-duplicate of another client's query counts unless the query
        # also matches one of the client's own (a re-submitted popular input
        # matches everyone who sent it); one of the client's own counts only
        # within a run of at least min_run (see the class docstring).
        score, warm, counts, lengths, cross_row = score_windows(
            slots,
            own,
            matched_others,
            arrays["near"],
            arrays["near_pos"],
            arrays["near_len"],
            arrays["n_seen"],
            arrays["n_cross"],
            arrays["own_run"],
            p.min_run,
            p.min_queries,
            p.min_cross,
        )

        def evidence(row: int) -> str:
            others = matches[row].others
            return (
                f"{counts[row]} of the last {lengths[row]} queries share at least "
                f"{threshold} of {p.k} fingerprint hashes with another client's "
                f"query or extend a run of {p.min_run}+ of its own; "
                f"{cross_row[row]} so far matched another client's"
                + (f" (this one: {', '.join(sorted(others)[:3])})" if others else "")
            )

        return self._scores(score, warm, evidence)
