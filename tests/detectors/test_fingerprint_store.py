"""The compiled in-memory fingerprint store against a plain reference, and
what only the compiled store decides (eviction order, bounds)."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from itertools import chain

import numpy as np
import pytest

from detectors.fingerprint import (
    FingerprintMatch,
    HashArray,
    InMemoryFingerprintStore,
)


class ReferenceStore:
    """The store as a plain loop, row by row: the specification the
    compiled store must match (it was the first implementation).

    Every observed query becomes an entry (a sequence number and its client).
    For each hash value the store keeps the last ``entries_per_hash`` entries
    that contained it. A new query is a near-duplicate of an earlier entry when
    they share at least ``match_threshold`` hashes, as in Blacklight; the
    result names the clients of those entries and how many near-duplicates
    each sent.

    Parameters
    ----------
    match_threshold
        Shared hashes that make a near-duplicate.
    horizon
        Entries (queries of all clients) kept; older ones stop counting.
    max_hashes
        Hash values kept; the first seen go first.
    entries_per_hash
        Entries kept per hash value; the oldest go first. Bounds the work per
        query at ``k * entries_per_hash`` look-ups.
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
        self._postings: dict[int, deque[int]] = {}
        self._entry_client: dict[int, str] = {}
        self._clock = 0
        self._seen_key: dict[int, int] = {}

    def __len__(self) -> int:
        """Hash values held."""
        return len(self._postings)

    def observe(
        self,
        client_ids: Sequence[str],
        hash_sets: HashArray,
        remember: Sequence[bool] | None = None,
        input_keys: np.ndarray | None = None,
    ) -> list[FingerprintMatch]:
        if len(client_ids) != len(hash_sets):
            raise ValueError(
                f"{len(client_ids)} client ids for {len(hash_sets)} hash sets"
            )
        keep = [True] * len(client_ids) if remember is None else list(remember)
        if len(keep) != len(client_ids):
            raise ValueError(f"{len(keep)} remember flags for {len(client_ids)} rows")
        postings = self._postings
        entry_client = self._entry_client
        threshold = self.match_threshold
        cap = self.entries_per_hash
        out: list[FingerprintMatch] = []
        # A loop over rows of Python ints: per row k dictionary look-ups and
        # one Counter over at most k * entries_per_hash entries.
        keys = [0] * len(client_ids) if input_keys is None else input_keys.tolist()
        for client, row, add, key in zip(
            client_ids, hash_sets.tolist(), keep, keys, strict=True
        ):
            entry = self._clock + 1
            earlier_key = self._seen_key.get(key)
            exact = (
                key != 0
                and earlier_key is not None
                and earlier_key > self._clock - self.horizon
            )
            hashes = [h for h in row if h]
            lists = [postings[h] for h in hashes if h in postings]
            # Counter counts in C: the shared-hash count of every earlier entry
            # that holds one of this row's hashes.
            counts = Counter(chain.from_iterable(lists)) if lists else {}
            near = [(e, c) for e, c in counts.items() if c >= threshold]
            own = identical = 0
            others: dict[str, int] = {}
            for e, _ in near:
                sender = entry_client.get(e)
                if sender is None:
                    continue  # older than the horizon
                if sender == client:
                    own += 1
                elif exact:
                    identical += 1
                else:
                    others[sender] = others.get(sender, 0) + 1
            if add and key != 0:
                self._seen_key.pop(key, None)
                self._seen_key[key] = entry
                if len(self._seen_key) > self.horizon:
                    del self._seen_key[next(iter(self._seen_key))]
            if add:
                self._clock = entry
                for h in hashes:
                    earlier = postings.get(h)
                    if earlier is None:
                        postings[h] = earlier = deque(maxlen=cap)
                    earlier.append(entry)
                entry_client[entry] = client
                if len(entry_client) > self.horizon:
                    del entry_client[next(iter(entry_client))]
                # Oldest first-seen hash values go first (insertion order).
                while len(postings) > self.max_hashes:
                    del postings[next(iter(postings))]
            out.append(FingerprintMatch(own, others, identical))
        return out


def _stream(
    seed: int, n: int, k: int, n_clients: int
) -> tuple[list[str], HashArray, list[bool], np.ndarray]:
    """Random fingerprints of distinct values per row, many of them near or
    exact copies of a recent row, from interleaved clients; input keys equal
    for some exact copies (a copied input), new for the rest."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 2**62, (n, k), dtype=np.uint64)
    keys = rng.integers(1, 2**62, n, dtype=np.uint64)
    for i in range(1, n):
        if rng.random() < 0.6:
            source = i - int(rng.integers(1, min(i, 30) + 1))
            rows[i] = rows[source]
            if rng.random() < 0.3:
                keys[i] = keys[source]
                continue
            changed = rng.random(k) < rng.uniform(0, 0.6)
            rows[i, changed] = rng.integers(
                1, 2**62, int(changed.sum()), dtype=np.uint64
            )
    rows[rng.random((n, k)) < 0.05] = 0  # some empty slots
    clients = [f"c{int(c)}" for c in rng.integers(0, n_clients, n)]
    remember = (rng.random(n) < 0.85).tolist()
    return clients, rows, remember, keys


@pytest.mark.parametrize(
    ("seed", "horizon", "entries", "threshold"),
    [(0, 100_000, 8, 4), (1, 50, 8, 4), (2, 1000, 2, 3), (3, 200, 4, 6)],
)
def test_compiled_store_matches_the_reference(
    seed: int,
    horizon: int,
    entries: int,
    threshold: int,
) -> None:
    clients, rows, remember, keys = _stream(seed, 1500, 8, 7)
    reference = ReferenceStore(
        match_threshold=threshold, horizon=horizon, entries_per_hash=entries
    )
    store = InMemoryFingerprintStore(
        match_threshold=threshold, horizon=horizon, entries_per_hash=entries
    )
    expected = reference.observe(clients, rows, remember, keys)
    got: list[FingerprintMatch] = []
    for a, b in [(0, 1), (1, 300), (300, 301), (301, 1000), (1000, 1500)]:
        got += store.observe(clients[a:b], rows[a:b], remember[a:b], keys[a:b])
    assert got == expected
    assert sum(bool(m.others) for m in got) > 20
    assert sum(m.own > 0 for m in got) > 20
    assert sum(m.identical > 0 for m in got) > 5


def test_observe_arrays_agree_with_the_matches() -> None:
    clients, rows, remember, keys = _stream(4, 600, 8, 5)
    store = InMemoryFingerprintStore(match_threshold=4)
    matches, own, matched = store.observe_arrays(clients, rows, remember, keys)
    assert own.tolist() == [m.own for m in matches]
    assert matched.tolist() == [bool(m.others) for m in matches]
    assert any(matched) and any(own)


def _sets(*rows: list[int]) -> HashArray:
    return np.array(rows, dtype=np.uint64)


def test_full_store_evicts_the_oldest_values_a_chunk_at_a_time() -> None:
    # 4 slots and rows of 2 hashes: one row per chunk. A chunk's new values
    # take the next slots in ascending value order, so row 3's two new
    # values take the slots of 3 and then 5, the first seen.
    store = InMemoryFingerprintStore(match_threshold=2, max_hashes=4)
    store.observe(["a", "b", "c"], _sets([5, 3], [9, 7], [11, 1]))
    assert len(store) == 4
    gone, kept = store.observe(["x", "y"], _sets([5, 3], [9, 7]), [False, False])
    assert gone.others == {} and dict(kept.others) == {"b": 1}
    # A chunk's own held values are never evicted by its new ones: the next
    # slot holds 7, which the chunk uses, so 2 takes 9's slot instead.
    store.observe(["d"], _sets([7, 2]))
    gone, kept = store.observe(["x", "y"], _sets([9, 7], [7, 2]), [False, False])
    assert gone.others == {} and dict(kept.others) == {"d": 1}


def test_more_new_values_than_slots_keeps_the_store_bounded() -> None:
    # max_hashes below one row's hashes: the values that find no free slot
    # are not stored, and the store never holds more than max_hashes.
    store = InMemoryFingerprintStore(match_threshold=1, max_hashes=3)
    for start in range(0, 40, 4):
        store.observe(["a"], _sets(list(range(start + 1, start + 5))))
        assert len(store) <= 3
    # The three largest of the last row's values are held.
    found = store.observe(["b"], _sets([38, 39, 40]), [False])[0]
    assert dict(found.others) == {"a": 1}


def test_an_input_repeated_within_a_chunk_stays_known_for_the_horizon() -> None:
    # Key 7 comes first and fourth in one chunk; its last entry (4) is
    # within the horizon of 3 when the next call sends it again, so the
    # near-duplicate of x's row is an exact copy (identical), as in the
    # row-by-row reference, however many other keys the chunk held.
    store = InMemoryFingerprintStore(match_threshold=1, horizon=3)
    keys = np.array([7, 1, 2, 7, 3, 4], dtype=np.uint64)
    store.observe(
        ["w", "a", "b", "x", "c", "d"],
        _sets([1], [2], [3], [10], [4], [5]),
        input_keys=keys,
    )
    again = store.observe(["y"], _sets([10]), input_keys=np.array([7], np.uint64))
    assert again[0] == FingerprintMatch(own=0, identical=1)
    reference = ReferenceStore(match_threshold=1, horizon=3)
    expected = reference.observe(
        ["w", "a", "b", "x", "c", "d", "y"],
        _sets([1], [2], [3], [10], [4], [5], [10]),
        input_keys=np.array([7, 1, 2, 7, 3, 4, 7], dtype=np.uint64),
    )
    assert expected[-1] == again[0]


def test_input_keys_beyond_the_horizon_are_dropped() -> None:
    store = InMemoryFingerprintStore(match_threshold=1, horizon=100)
    rng = np.random.default_rng(2)
    for _ in range(30):
        store.observe(
            [f"c{i}" for i in range(500)],
            rng.integers(1, 2**60, (500, 4)).astype(np.uint64),
            input_keys=rng.integers(1, 2**60, 500).astype(np.uint64),
        )
    # Live keys are at most the horizon; the table is rebuilt without the
    # others once half full, so it stays near 4 * (horizon + one chunk).
    assert len(store._seen) <= 4096
