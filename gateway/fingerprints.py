"""The cross-client fingerprint store in Redis, shared by every worker.

The same protocol as :class:`detectors.fingerprint.InMemoryFingerprintStore`
(compare each query's fingerprint with every client's recent ones, then store
it), but async and shared by all workers, so an attack spread over API keys
that land on different workers is still seen. One ``EVALSHA`` of
``lua/fingerprints.lua`` per batch: one network round trip, and the rows are
applied in order, atomically.

Data: one list per hash value, ``{prefix:fp}:h:<hex>``, newest first, of at
most ``entries_per_hash`` items ``<ms>|<entry>|<client>`` (items older than
``ttl_s`` are ignored when read); one key per recently stored input,
``{prefix:fp}:in:<hex>``, to tell exact copies apart; and the entry counter
``{prefix:fp}:seq``. Every key expires ``ttl_s`` after its last write, so the
store is bounded by the query rate times ``ttl_s`` times ``k + 1`` keys.

Cost: the script makes about four Redis calls per hash value of each row
(``LRANGE``, ``LPUSH``, ``LTRIM``, ``PEXPIRE``), all inside one ``EVALSHA``
that blocks the Redis server while it runs: measured about 0.1-0.3 ms per
query of 16 hashes on a loaded machine, so 50-150 ms per batch of 500 during
which other workers' admission waits. ``gateway.groups.select_rows`` therefore
sends only rows with a worker-local near-duplicate plus a sample, at most
``cross_client.store_max_rows`` (128) per batch, which bounds a batch's call
(``modelgate bench detectors --redis`` measures both).

Redis Cluster: a query must be compared with every client's fingerprints, so
the key space cannot be split by client. Every key carries the one hash tag
``{<prefix>:fp}``, which keeps the script legal on a cluster but puts the whole
store in one slot, hence on one shard: the fingerprint load does not scale out
with the cluster. Sharding by hash value (one script call per shard with that
shard's keys) would, at the price of one round trip per shard and rows no
longer applied atomically across shards; it is not done here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
import numpy.typing as npt
from redis import exceptions as redis_exc

from detectors.fingerprint import FingerprintMatch
from gateway.errors import StoreError
from gateway.store import RedisClient, redis_guard

logger = logging.getLogger(__name__)

FINGERPRINTS_LUA: bytes = (
    resources.files("gateway").joinpath("lua/fingerprints.lua").read_bytes()
)
FINGERPRINTS_SHA: str = hashlib.sha1(FINGERPRINTS_LUA).hexdigest()


class RedisFingerprintStore:
    """Async fingerprint store in Redis (see the module docstring).

    Parameters
    ----------
    redis
        Client with ``decode_responses=False``.
    prefix
        ``redis.key_prefix``; keys are ``{<prefix>:fp}:...``.
    match_threshold
        Shared hashes that make a near-duplicate (the detector's).
    ttl_s
        Seconds a stored fingerprint counts.
    entries_per_hash
        Entries kept per hash value.
    timeout_s
        Bound on the round trip.
    """

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        *,
        match_threshold: int,
        ttl_s: float = 600.0,
        entries_per_hash: int = 8,
        timeout_s: float = 2.0,
    ) -> None:
        if match_threshold < 1 or ttl_s <= 0 or entries_per_hash < 1:
            raise ValueError(
                "match_threshold, ttl_s and entries_per_hash must be positive"
            )
        self._redis = redis
        self._tag = f"{{{prefix}:fp}}"
        self.match_threshold = match_threshold
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.entries_per_hash = entries_per_hash
        self._timeout_s = timeout_s

    def hash_key(self, value: int) -> str:
        """The list of one hash value."""
        return f"{self._tag}:h:{value:016x}"

    async def observe(
        self,
        client_ids: Sequence[str],
        hash_sets: npt.NDArray[np.uint64],
        remember: Sequence[bool] | None = None,
        input_keys: npt.NDArray[np.uint64] | None = None,
    ) -> list[FingerprintMatch]:
        """Compare each row with the store, then add it (if ``remember``).

        ``input_keys`` (``detectors.fingerprint.input_keys``) tell exact copies
        of an earlier input apart, as in the in-memory store.

        Raises
        ------
        StoreError
            Redis could not be reached or failed.
        ValueError
            Lengths disagree.
        """
        n = len(client_ids)
        if n != len(hash_sets):
            raise ValueError(f"{n} client ids for {len(hash_sets)} hash sets")
        keep = [True] * n if remember is None else list(remember)
        if len(keep) != n:
            raise ValueError(f"{len(keep)} remember flags for {n} rows")
        inputs = [0] * n if input_keys is None else [int(v) for v in input_keys]
        if len(inputs) != n:
            raise ValueError(f"{len(inputs)} input keys for {n} rows")
        if n == 0:
            return []

        # Each distinct hash value is one key, passed once; rows refer to keys
        # by index so a batch of near-duplicates stays a short call.
        key_index: dict[int, int] = {}
        keys: list[str] = [f"{self._tag}:seq"]
        args: list[Any] = [self.ttl_ms, self.entries_per_hash, self.match_threshold, n]
        input_index: dict[int, int] = {}
        rows = zip(client_ids, hash_sets.tolist(), keep, inputs, strict=True)
        for client, row, add, input_key in rows:
            values = [h for h in row if h != 0]
            at = 0
            if input_key:
                at = input_index.get(input_key, 0)
                if not at:
                    keys.append(f"{self._tag}:in:{input_key:016x}")
                    at = input_index[input_key] = len(keys)
            args.extend((client, "1" if add else "0", at, len(values)))
            for h in values:
                index = key_index.get(h)
                if index is None:
                    keys.append(self.hash_key(h))
                    index = key_index[h] = len(keys)  # Lua indexes from 1
                args.append(index)

        async with redis_guard("fingerprints", self._timeout_s, self._redis):
            try:
                reply = await self._redis.evalsha(
                    FINGERPRINTS_SHA, len(keys), *keys, *args
                )
            except redis_exc.NoScriptError:
                logger.info("fingerprint script missing on server; loading it")
                await self._redis.script_load(FINGERPRINTS_LUA)
                reply = await self._redis.evalsha(
                    FINGERPRINTS_SHA, len(keys), *keys, *args
                )
        if not isinstance(reply, list) or len(reply) != n:
            raise StoreError("redis fingerprints: unexpected reply", retriable=False)
        return [_match(row) for row in reply]


def _match(row: list[Any]) -> FingerprintMatch:
    others: dict[str, int] = {}
    for i in range(2, len(row) - 1, 2):
        name = row[i].decode() if isinstance(row[i], bytes) else str(row[i])
        others[name] = int(row[i + 1])
    return FingerprintMatch(own=int(row[0]), others=others, identical=int(row[1]))
