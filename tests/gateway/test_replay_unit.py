"""Pure parts of the replay cache: what the body hash covers, and where a
kept answer lives."""

from __future__ import annotations

import numpy as np
from redis.asyncio import Redis

from gateway.config import load_settings
from gateway.replay import ReplayCache, body_digest
from gateway.store import CounterStore

ROWS = np.arange(64, dtype=np.float32).reshape(1, 64) % 17


def test_the_digest_covers_model_and_rows_only() -> None:
    first = body_digest("digits", ROWS)
    # What a retry sends again, as the worker validated it: same digest.
    assert body_digest("digits", ROWS.copy()) == first
    assert body_digest("digits", np.asfortranarray(ROWS)) == first
    # Any other body: another digest.
    assert body_digest("digits", ROWS + 1) != first
    assert body_digest("digits", np.vstack([ROWS, ROWS])) != first
    assert body_digest("digits", ROWS.reshape(2, 32)) != first
    assert body_digest("digits", ROWS.astype(np.float64)) != first
    assert body_digest("digits2", ROWS) != first


def test_answers_live_in_the_clients_slot_next_to_the_dedupe_key() -> None:
    settings = load_settings(redis={"key_prefix": "tp"})
    redis = Redis()  # never connected: only key names are computed
    store = CounterStore(redis, settings)
    cache = ReplayCache(redis, store, settings)
    assert cache.answer_key("alice", "r:req:1") == "tp:{c:alice}:ans:r:req:1"
    long_id = "x" * 200
    hashed = store.request_key("alice", long_id).split(":req:", 1)[1]
    assert cache.answer_key("alice", long_id) == "tp:{c:alice}:ans:" + hashed
    assert len(cache.answer_key("alice", long_id)) < 100
