"""The cross-client region store in Redis, shared by every worker.

The same protocol as :class:`detectors.region.InMemoryRegionStore` (per
counted row, the other clients that sent a counted row into its region within
the time to live; then store the row), but async and shared by all workers.
One ``EVALSHA`` of ``lua/regions.lua`` per batch: one network round trip, rows
applied in order, atomically.

Data: one list per region and model, ``{<prefix>:rg}:<model>:<hex id>``,
newest first, of at most ``entries_per_region`` items ``<ms>|<client>``
(older than ``ttl_s``: ignored when read). Every list expires ``ttl_s`` after
its last write, so the store holds at most ``entries_per_region`` items per
region visited in the last ``ttl_s``; regions are coarse (a few thousand per
model at most with the defaults) and only counted rows, about 2% of honest
queries, are written.

Redis Cluster: a row must be compared with every client's rows in its
region, so every key carries the one hash tag ``{<prefix>:rg}``: legal on a
cluster, but the whole store sits in one slot, hence on one shard, as the
fingerprint store does (:mod:`gateway.fingerprints`).
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

from gateway.errors import StoreError
from gateway.store import RedisClient, redis_guard

logger = logging.getLogger(__name__)

REGIONS_LUA: bytes = resources.files("gateway").joinpath("lua/regions.lua").read_bytes()
REGIONS_SHA: str = hashlib.sha1(REGIONS_LUA).hexdigest()


class RedisRegionStore:
    """Async region store in Redis (see the module docstring).

    Parameters
    ----------
    redis
        Client with ``decode_responses=False``.
    prefix
        ``redis.key_prefix``; keys are ``{<prefix>:rg}:...``.
    ttl_s
        Seconds a stored row counts; also its list's expiry.
    entries_per_region
        Newest rows kept per region.
    timeout_s
        Bound on the round trip.
    """

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        *,
        ttl_s: float = 600.0,
        entries_per_region: int = 32,
        timeout_s: float = 2.0,
    ) -> None:
        if ttl_s <= 0 or entries_per_region < 1:
            raise ValueError("ttl_s and entries_per_region must be positive")
        self._redis = redis
        self._tag = f"{{{prefix}:rg}}"
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.entries_per_region = entries_per_region
        self._timeout_s = timeout_s

    def region_key(self, model: str, region: int) -> str:
        """The list of one region of one model."""
        return f"{self._tag}:{model}:{region:016x}"

    async def observe(
        self,
        model: str,
        client_ids: Sequence[str],
        regions: npt.NDArray[np.uint64],
    ) -> list[list[str]]:
        """Per row, the other clients with a row in its region within
        ``ttl_s`` (each once); then store the row.

        Raises
        ------
        StoreError
            Redis could not be reached or failed.
        ValueError
            Lengths disagree.
        """
        n = len(client_ids)
        if n != len(regions):
            raise ValueError(f"{n} client ids for {len(regions)} regions")
        if n == 0:
            return []
        key_index: dict[int, int] = {}
        keys: list[str] = []
        args: list[Any] = [self.ttl_ms, self.entries_per_region, n]
        for client, region in zip(client_ids, regions.tolist(), strict=True):
            index = key_index.get(region)
            if index is None:
                keys.append(self.region_key(model, region))
                index = key_index[region] = len(keys)  # Lua indexes from 1
            args.extend((client, index))

        async with redis_guard("regions", self._timeout_s, self._redis):
            try:
                reply = await self._redis.evalsha(REGIONS_SHA, len(keys), *keys, *args)
            except redis_exc.NoScriptError:
                logger.info("region script missing on server; loading it")
                await self._redis.script_load(REGIONS_LUA)
                reply = await self._redis.evalsha(REGIONS_SHA, len(keys), *keys, *args)
        if not isinstance(reply, list) or len(reply) != n:
            raise StoreError("redis regions: unexpected reply", retriable=False)
        return [
            [o.decode() if isinstance(o, bytes) else str(o) for o in row or ()]
            for row in reply
        ]
