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

import logging
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import Field

from detectors._state import FieldSpec, check_window, group_rows, push_window
from detectors.base import Detector, DetectorParams, DetectorScore

logger = logging.getLogger(__name__)

HashArray = npt.NDArray[np.uint64]

# Odd 64-bit constants of the splitmix64 finaliser (Steele, Lea and Flood,
# 2014): they spread the few bits of a window's code over all 64 bits, so the
# largest hash values are a random-looking choice of windows.
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN_INT = 0x9E3779B97F4A7C15


@dataclass(frozen=True, slots=True)
class FingerprintMatch:
    """What a store knew about one query when it arrived.

    Attributes
    ----------
    own
        Recent queries of the same client that are near-duplicates of this one
        (share at least the store's match threshold of hashes).
    others
        Other clients with near-duplicates of this query among their recent
        queries, and how many each sent; identical fingerprints are left out.
    identical
        Recent queries of other clients with exactly this fingerprint. They are
        kept apart because many honest users sending one popular input is not
        probing, while an attack varies its input on every query.
    """

    own: int = 0
    others: Mapping[str, int] = field(default_factory=dict)
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
    n, d = X.shape
    q = np.minimum((np.clip(X, 0.0, 1.0) * levels).astype(np.uint64), levels - 1)
    n_windows = d - width + 1
    code = np.zeros((n, n_windows), dtype=np.uint64)
    base = np.uint64(levels)
    for offset in range(width):
        code = code * base + q[:, offset : offset + n_windows]
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


class InMemoryFingerprintStore:
    """A bounded :class:`FingerprintStore` in one process.

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

    def __len__(self) -> int:
        """Hash values held."""
        return len(self._postings)

    def observe(
        self,
        client_ids: Sequence[str],
        hash_sets: HashArray,
        remember: Sequence[bool] | None = None,
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
        for client, row, add in zip(client_ids, hash_sets.tolist(), keep, strict=True):
            entry = self._clock + 1
            hashes = [h for h in row if h]
            size = len(hashes)
            lists = [postings[h] for h in hashes if h in postings]
            # Counter counts in C: the shared-hash count of every earlier entry
            # that holds one of this row's hashes.
            counts = Counter(chain.from_iterable(lists)) if lists else {}
            near = [(e, c) for e, c in counts.items() if c >= threshold]
            own = identical = 0
            others: dict[str, int] = {}
            for e, shared in near:
                sender = entry_client.get(e)
                if sender is None:
                    continue  # older than the horizon
                if sender == client:
                    own += 1
                elif shared == size:
                    identical += 1
                else:
                    others[sender] = others.get(sender, 0) + 1
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

    threshold: float = Field(0.5, gt=0.0, le=1.0)
    """Share of near-duplicate queries in the window at which a client is flagged."""

    min_queries: int = Field(10, ge=1, le=100_000)
    """Queries a client must have sent before it can be flagged."""

    horizon: int = Field(100_000, ge=100, le=100_000_000)
    """Queries (all clients) after which a stored fingerprint stops counting."""

    max_hashes: int = Field(200_000, ge=1000, le=100_000_000)
    """Hash values the in-memory store keeps (about 200 bytes each)."""


class FingerprintDetector(Detector[FingerprintParams]):
    """Share of a client's recent queries that nearly repeat an earlier query
    of any client, by Blacklight-style fingerprints in a shared store.

    Each query is quantised to ``levels`` levels; every window of ``width``
    consecutive features is hashed with its position, hashes common in the
    reference data are dropped, and the ``k`` largest remaining values are the
    fingerprint. The store says, per query, how many hashes its own client had
    sent recently and which other clients share at least ``match_threshold``.
    A query is a *near-duplicate* when either count reaches the threshold.

    Score: in [0, 1], higher is more suspicious: the share of near-duplicates
    among the client's last ``window`` queries. Flagged at ``threshold`` once
    ``min_queries`` queries have been seen. :attr:`last_matches` holds the
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
      group risk then needs a person's review before a block.

    Per-client state: two rings of ``window`` bits and three counters (about
    130 bytes). The shared store holds at most ``max_hashes`` hash values.

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
    _mutable_params: ClassVar[frozenset[str]] = frozenset({"threshold", "min_queries"})

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
        )
        self._common: HashArray = np.zeros(0, dtype=np.uint64)
        self.last_matches: list[FingerprintMatch] = []
        self.last_hashes: HashArray = np.zeros((0, p.k), dtype=np.uint64)
        self._batch_clients: list[str] = []

    def score_batch(
        self,
        client_ids: Sequence[str],
        X: npt.NDArray[np.float64],
        *,
        learn: Sequence[bool] | npt.NDArray[np.bool_] | None = None,
    ) -> list[DetectorScore]:
        # The store is keyed by client id, which _score_rows (given slots)
        # would otherwise have to recover from the arena.
        self._batch_clients = list(client_ids)
        try:
            return super().score_batch(client_ids, X, learn=learn)
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
        hashes = window_hashes(rows, levels=p.levels, width=p.width, seed=self._seed)
        return top_hashes(hashes, p.k, self._common)

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        window = self._params.window
        return {
            "near": FieldSpec((window,), "u1"),
            "near_pos": FieldSpec((), "<i8"),
            "near_len": FieldSpec((), "<i8"),
            "n_seen": FieldSpec((), "<i8"),
            "n_cross": FieldSpec((), "<i8"),
        }

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        check_window(values, "near", "near_pos", "near_len")
        if int(values["n_seen"]) < 0 or not 0 <= int(values["n_cross"]) <= int(
            values["n_seen"]
        ):
            raise ValueError("state field 'n_seen' or 'n_cross' is out of range")

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

        hashes = self.fingerprints(X)
        # Every row is stored, good standing or not: the store is evidence, not a
        # model of normal traffic, and an attack spread over keys would hide as
        # soon as its first keys were flagged if their queries were left out.
        del learn
        matches = self.store.observe(client_ids, hashes)
        self.last_hashes = hashes
        self.last_matches = matches
        threshold = p.match_threshold
        near = np.fromiter((m.own > 0 or bool(m.others) for m in matches), bool, n)
        cross = np.fromiter((bool(m.others) for m in matches), bool, n)

        groups = group_rows(slots)
        counts, lengths = push_window(
            arrays["near"],
            arrays["near_pos"],
            arrays["near_len"],
            groups,
            near[groups.order],
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
        cross_total = cross_total[inverse]
        evidence = [
            f"{count} of the last {length} queries share at least {threshold} of "
            f"{p.k} fingerprint hashes with an earlier query; {total} so far "
            "matched another client's"
            + (f" (this one: {', '.join(sorted(m.others)[:3])})" if m.others else "")
            for count, length, total, m in zip(
                counts.tolist(),
                lengths.tolist(),
                cross_total.tolist(),
                matches,
                strict=True,
            )
        ]
        return self._scores(counts / lengths, seen[inverse] >= p.min_queries, evidence)
