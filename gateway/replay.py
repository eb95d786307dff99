"""Answers kept for client retries: a request id served once is answered again
from Redis, not refused as a duplicate and not scored or counted again.

A client that times out cannot tell a lost request from a lost answer, so it
sends the same request again under the same request id. The admission script
(``lua/admit.lua``) refuses a second record with an admitted id as
``DUPLICATE_REQUEST``; that stops replays, but it also refuses the honest
retry. The worker therefore keeps each successful answer (the encoded
``InferResponse``) for the replay window under the client's hash tag::

    {prefix}:{c:<client_id>}:ans:<request>   sha256(body) + encoded answer

and, before admission, answers a request whose id has a kept answer **and
whose body is the same** with that answer. The cache is keyed by (client,
request id); the body hash covers the model name and the validated input rows
(not the timestamp, signature or reply topic, which a retry legitimately
changes), so a different body under a served id still goes on to admission
and is refused as a duplicate. A request still in flight, refused, or whose answer
was too large to keep also goes on to admission, with today's outcome.

Known shortcoming: kept answers cost Redis memory, about one answer's size
(a few hundred bytes for the digits model) per request for the replay window
(``auth.replay_window_s``, 15 min by default); ``worker.replay_max_bytes``
bounds one answer, and 0 turns the cache off.

This module imports Redis, the wire formats and the batch item; nothing from
Kafka or the detectors.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from gateway import protocol
from gateway.batch import BatchItem
from gateway.config import Settings
from gateway.errors import StoreError
from gateway.store import CounterStore, RedisClient, redis_guard

logger = logging.getLogger(__name__)

_DIGEST_BYTES = 32  # sha256

# Sets one client's kept answers in one command: KEYS are answer keys,
# ARGV[1] the lifetime in ms, ARGV[1 + i] the value of KEYS[i]. All keys share
# the client's hash tag, so this stays one slot on Redis Cluster. Sent as EVAL
# (a few hundred bytes) so that no SCRIPT LOAD round trip is ever needed.
_KEEP_LUA = """
for i, key in ipairs(KEYS) do
  redis.call("SET", key, ARGV[i + 1], "PX", ARGV[1])
end
return #KEYS
"""


def body_digest(model: str, rows: np.ndarray[Any, Any]) -> bytes:
    """What a retry must repeat to be answered from the cache: the model and
    the validated input rows it would be run on (dtype, shape and bytes).

    The timestamp, key id, reply topic and correlation id are left out
    because a retry may change them (a new signature, another front door).
    Two bodies that validate to the same rows would get the same prediction,
    so they count as the same request. Hashing the validated array rather
    than re-encoding the JSON tensors keeps this at about a microsecond.
    """
    digest = hashlib.sha256(model.encode("utf-8"))
    digest.update(f"\0{rows.dtype.str}\0{rows.shape}\0".encode("ascii"))
    digest.update(np.ascontiguousarray(rows).tobytes())
    return digest.digest()


class ReplayCache:
    """Kept answers of one worker's clients, read and written once per batch.

    Parameters
    ----------
    redis
        An asyncio client with ``decode_responses=False``.
    store
        Supplies the key layout (``{prefix}:{c:<client>}:...``) so that kept
        answers live in the client's hash slot next to its dedupe keys.
    settings
        ``auth.replay_window_s`` (how long an answer is kept),
        ``worker.replay_max_bytes`` (largest answer kept; 0: keep none) and
        ``redis.socket_timeout_s`` (bounds each round trip).
    """

    def __init__(
        self, redis: RedisClient, store: CounterStore, settings: Settings
    ) -> None:
        self._redis = redis
        self._store = store
        self._ttl_ms = max(1, round(settings.auth.replay_window_s * 1000))
        self._max_bytes = settings.worker.replay_max_bytes
        self._timeout_s = settings.redis.socket_timeout_s

    @property
    def enabled(self) -> bool:
        return self._max_bytes > 0

    def answer_key(self, client_id: str, request_id: str) -> str:
        """Redis key of one kept answer; long request ids are hashed the way
        the dedupe key hashes them."""
        dedupe = self._store.request_key(client_id, request_id)
        request_part = dedupe[len(self._store.client_key(client_id, "req:")) :]
        return self._store.client_key(client_id, "ans:" + request_part)

    async def take_replays(self, items: Sequence[BatchItem]) -> list[BatchItem]:
        """Answer from the cache every authenticated, valid request whose id
        has a kept answer for the same body; return those items.

        Each returned item has ``replay`` set (the kept answer, with this
        attempt's correlation id) and ``action`` copied from it. One round
        trip for the whole batch.

        Raises
        ------
        StoreError
            Redis could not be reached; the batch is retried, as for admission.
        """
        if not self.enabled:
            return []
        live = [
            i
            for i in items
            if i.error is None and i.key is not None and i.request is not None
        ]
        if not live:
            return []
        # One MGET per client (its keys share a hash slot), all pipelined:
        # per-command overhead, not the network, dominates a large batch.
        by_client: dict[str, list[int]] = {}
        for index, item in enumerate(live):
            if item.key is not None:
                by_client.setdefault(item.key.client_id, []).append(index)
        async with redis_guard("replay lookup", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for client_id, indices in by_client.items():
                # Raw MGET: the cluster pipeline refuses its mget() method,
                # yet routes the command by its keys (one client, one slot).
                pipe.execute_command(
                    "MGET",
                    *(
                        self.answer_key(client_id, live[i].request_id or "")
                        for i in indices
                    ),
                )
            replies: list[list[bytes | None]] = await pipe.execute()
        kept: list[bytes | None] = [None] * len(live)
        for indices, values in zip(by_client.values(), replies, strict=True):
            for index, value in zip(indices, values, strict=True):
                kept[index] = value

        replays: list[BatchItem] = []
        for item, blob in zip(live, kept, strict=True):
            if blob is None or item.request is None or item.rows is None:
                continue
            if blob[:_DIGEST_BYTES] != body_digest(item.request.model, item.rows):
                # Same id, other body: not a retry. Admission refuses it as a
                # duplicate, exactly as without the cache.
                logger.debug(
                    "request id reused with another body",
                    extra={"client": item.client_id, "request": item.request_id},
                )
                continue
            try:
                answer = protocol.decode_response(blob[_DIGEST_BYTES:])
            except protocol.DECODE_ERRORS:
                logger.warning(
                    "kept answer unreadable; admission decides as without it",
                    extra={"client": item.client_id, "request": item.request_id},
                )
                continue
            item.replay = msgspec.structs.replace(
                answer, correlation_id=item.correlation_id, replayed=True
            )
            item.action = answer.action or "allow"
            replays.append(item)
            logger.debug(
                "answered from the replay cache",
                extra={"client": item.client_id, "request": item.request_id},
            )
        return replays

    async def keep(self, answers: Sequence[tuple[BatchItem, bytes]]) -> None:
        """Keep the encoded ``ok`` answers of freshly served requests for the
        replay window, in one round trip. Answers larger than
        ``worker.replay_max_bytes`` are not kept (their retries stay refused
        as duplicates).

        Best effort: a Redis failure is logged and swallowed, because the
        answers themselves have already been produced; only a retry of these
        requests loses (it is refused as a duplicate, as before this cache).
        """
        if not self.enabled:
            return
        by_client: dict[str, tuple[list[str], list[bytes]]] = {}
        for item, value in answers:
            if (
                item.key is None
                or item.request is None
                or item.rows is None
                or len(value) > self._max_bytes
            ):
                continue
            keys, values = by_client.setdefault(item.key.client_id, ([], []))
            keys.append(self.answer_key(item.key.client_id, item.request.request_id))
            values.append(body_digest(item.request.model, item.rows) + value)
        if not by_client:
            return
        try:
            async with redis_guard("replay keep", self._timeout_s, self._redis):
                pipe = self._redis.pipeline(transaction=False)
                for keys, values in by_client.values():
                    pipe.eval(_KEEP_LUA, len(keys), *keys, self._ttl_ms, *values)
                await pipe.execute()
        except StoreError as exc:
            logger.warning(
                "answers not kept for retries: %s",
                exc,
                extra={"clients": len(by_client)},
            )
