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

This module holds the per-client detector and its parameters. The hashing
is in :mod:`detectors._fphash`, the :class:`FingerprintStore` protocol and
its bounded in-memory implementation in :mod:`detectors._fpstore` (their
public names re-exported here), and the compiled loops of both in
:mod:`detectors._fpkernels`. A Redis implementation of the store lives in
``gateway.fingerprints``.

Imports numpy, pydantic, those three modules and :mod:`detectors._state`
only; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from detectors._fphash import HashArray as HashArray
from detectors._fphash import hash_codes, seed_salt
from detectors._fphash import input_keys as input_keys
from detectors._fphash import top_hashes as top_hashes
from detectors._fphash import window_codes as window_codes
from detectors._fphash import window_hashes as window_hashes
from detectors._fpkernels import common_free_window_hashes, score_windows
from detectors._fpstore import FingerprintMatch as FingerprintMatch
from detectors._fpstore import FingerprintStore as FingerprintStore
from detectors._fpstore import InMemoryFingerprintStore as InMemoryFingerprintStore
from detectors._state import FieldSpec, check_counters, check_window, window_fields
from detectors.base import Detector, DetectorParams, DetectorScore

logger = logging.getLogger(__name__)

# FingerprintMatch fields by position (own, others).
_OWN = itemgetter(0)
_OTHERS = itemgetter(1)

# Most (position, code) windows a detector keeps a common bit for (128 KB);
# digits (59 windows of 4**6 codes) need 30 KB. Beyond, numpy hashes the
# windows and searches the common ones.
_MAX_COMMON_BITS = 1 << 20


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
            np.uint64(seed_salt(self._seed)),
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
            every = np.ascontiguousarray(hash_codes(codes, self._seed).T).ravel()
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
