"""Cost of the cross-worker fingerprint store in Redis, per query.

``modelgate bench detectors --redis`` calls :func:`bench_fingerprint_store`.
Replayed digits go through a :class:`~detectors.fingerprint.FingerprintDetector`
(as a worker scores them), then each batch's fingerprints go to
:class:`~gateway.fingerprints.RedisFingerprintStore` twice, into two key
prefixes of their own: every row (what the gateway did before rows were
selected), and only the rows :func:`gateway.groups.select_rows` picks. Two
streams: honest replays (few local near-duplicates) and a probing-like one
(near copies of a few digits, nearly every row a local near-duplicate, so the
cap on rows per batch is what bounds it).

The figures are wall time of the ``EVALSHA`` round trip, which is also the
time the script blocks the shared Redis server. Keys of the run are deleted at
the end.

Imports the detectors and the gateway's Redis store; nothing from Kafka or
FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt
from redis.exceptions import RedisError

from detectors.bench import _digits
from detectors.fingerprint import FingerprintDetector
from gateway.cleanup import unlink_matching
from gateway.config import Settings
from gateway.fingerprints import RedisFingerprintStore
from gateway.groups import FingerprintBatch, select_rows
from gateway.store import redis_from_settings

logger = logging.getLogger(__name__)


def _streams(
    n_queries: int, n_clients: int, seed: int
) -> dict[str, tuple[list[str], npt.NDArray[np.float64]]]:
    """Honest replays and a probing-like stream, as (client ids, rows)."""
    rng = np.random.default_rng(seed)
    _, traffic = _digits()
    client_of_row = rng.integers(0, n_clients, n_queries)
    ids = [f"client-{c}" for c in client_of_row.tolist()]
    honest = traffic[rng.integers(0, len(traffic), n_queries)]
    # Near copies of five digits, as a decision-boundary search sends them.
    sources = traffic[rng.integers(0, len(traffic), 5)]
    probing = np.clip(
        sources[rng.integers(0, 5, n_queries)]
        + rng.normal(0.0, 0.01, (n_queries, traffic.shape[1])),
        0.0,
        1.0,
    )
    return {"honest": (ids, honest), "probing": (ids, probing)}


async def bench_fingerprint_store(
    settings: Settings,
    *,
    n_queries: int = 4000,
    n_clients: int = 50,
    batch_size: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Milliseconds of Redis per query of the fingerprint store, all rows
    against selected rows, for an honest and a probing-like stream.

    Parameters
    ----------
    settings
        ``redis`` (URL and socket timeout) and ``cross_client`` (selection,
        entries per hash, TTL) are used; keys go under a prefix of the run.
    n_queries, n_clients, batch_size, seed
        Size and shape of each stream.

    Returns
    -------
    dict
        Per stream: ``all_rows_ms_per_query``, ``selected_ms_per_query``
        (both over every query of the stream), ``selected_share`` (rows sent
        over rows) and ``max_batch_ms`` (longest single call with selection).
    """
    config = settings.cross_client
    redis = redis_from_settings(settings)
    prefixes: list[str] = []
    report: dict[str, Any] = {"batch_size": batch_size, "n_queries": n_queries}
    try:
        for name, (ids, rows) in _streams(n_queries, n_clients, seed).items():
            detector = FingerprintDetector(seed=seed)
            reference, _ = _digits()
            detector.learn_baseline(reference)
            tag = uuid.uuid4().hex[:10]
            stores = {}
            for mode in ("all", "selected"):
                prefix = f"fpbench{tag}{mode}"
                prefixes.append(prefix)
                stores[mode] = RedisFingerprintStore(
                    redis,
                    prefix,
                    match_threshold=detector.params.match_threshold,
                    ttl_s=config.fingerprint_ttl_s,
                    entries_per_hash=config.entries_per_hash,
                    timeout_s=max(settings.redis.socket_timeout_s, 30.0),
                )
            spent = {"all": 0.0, "selected": 0.0}
            sent = 0
            longest = 0.0
            for start in range(0, n_queries, batch_size):
                batch_ids = ids[start : start + batch_size]
                detector.score_batch(batch_ids, rows[start : start + batch_size])
                batch = FingerprintBatch(
                    model="digits",
                    client_ids=batch_ids,
                    hashes=detector.last_hashes,
                    remember=[True] * len(batch_ids),
                    match_threshold=detector.params.match_threshold,
                    input_keys=detector.last_input_keys,
                    local_near=np.array(
                        [m.own > 0 or bool(m.others) for m in detector.last_matches],
                        dtype=bool,
                    ),
                )
                began = time.perf_counter()
                await stores["all"].observe(
                    batch.client_ids, batch.hashes, batch.remember, batch.input_keys
                )
                spent["all"] += time.perf_counter() - began
                began = time.perf_counter()
                chosen = select_rows(
                    batch,
                    sample_every=config.store_sample_every,
                    max_rows=config.store_max_rows,
                )
                if chosen.size:
                    assert batch.input_keys is not None
                    await stores["selected"].observe(
                        [batch.client_ids[r] for r in chosen.tolist()],
                        batch.hashes[chosen],
                        [True] * len(chosen),
                        batch.input_keys[chosen],
                    )
                took = time.perf_counter() - began
                spent["selected"] += took
                longest = max(longest, took)
                sent += len(chosen)
            report[name] = {
                "all_rows_ms_per_query": spent["all"] / n_queries * 1e3,
                "selected_ms_per_query": spent["selected"] / n_queries * 1e3,
                "selected_share": sent / n_queries,
                "max_batch_ms": longest * 1e3,
            }
    finally:
        await _delete(redis, prefixes)
        await redis.aclose()
    return report


async def _delete(redis: Any, prefixes: list[str]) -> None:
    """Delete the run's keys; best effort (they expire with the TTL anyway)."""
    try:
        async with asyncio.timeout(30.0):
            for prefix in prefixes:
                await unlink_matching(redis, f"{{{prefix}:fp}}*")
    except (RedisError, OSError, TimeoutError) as exc:
        logger.warning("fingerprint bench keys not all deleted: %r", exc)


def fingerprint_store_command(settings: Settings) -> dict[str, Any]:
    """Hold the local stack and run :func:`bench_fingerprint_store` on it
    (``modelgate bench detectors --redis``)."""
    import os

    from gateway import stack

    with stack.hold(holder=f"fpbench-{os.getpid()}") as info:
        redis = settings.redis.model_copy(update={"url": info.redis_url})
        return asyncio.run(
            bench_fingerprint_store(settings.model_copy(update={"redis": redis}))
        )
