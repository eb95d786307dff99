"""The modelgate client over Kafka on the real broker and Redis, against an
in-process worker: numpy in and out (async and blocking), typed errors, and a
lost answer retried under the same request id getting the kept answer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.config import Settings
from gateway.keys import KeyStore, format_token
from gateway.models import digits_split, load_model
from gateway.store import redis_from_settings
from gateway.topics import ensure_topics
from modelgate import errors
from modelgate.client import AsyncClient, Client
from modelgate.kafka import KafkaClientTransport
from modelgate.results import InferResult
from modelgate.retry import RetryPolicy
from tests.integration.helpers import (
    LosesFirstAnswer,
    assert_answered_from_kept_copy,
    create_key,
    create_token,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1].astype(np.float64)  # numpy's default dtype on purpose


async def test_async_client_round_trip_with_numpy(
    settings: Settings, models_dir: Path
) -> None:
    token = await create_token(settings, "async-user")
    expected = load_model(models_dir, "digits").predict_proba(
        X_TEST[:4].astype(np.float32)
    )
    async with (
        running_worker(settings),
        AsyncClient.kafka(token, "async-user", settings=settings) as client,
    ):
        batch = await client.predict("digits", X_TEST[:4])
        one = await client.predict("digits", X_TEST[0])
        result = await client.infer("digits", X_TEST[:2])
    assert batch.dtype == np.float32 and batch.shape == (4, 10)
    np.testing.assert_allclose(batch, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(one, expected[0], rtol=1e-5, atol=1e-7)
    assert result.action == "allow" and result.attempts == 1 and not result.replayed
    np.testing.assert_array_equal(result["label"], expected[:2].argmax(axis=1))


async def test_infer_many_answers_each_item_in_order_through_a_worker(
    settings: Settings, models_dir: Path
) -> None:
    token = await create_token(settings, "many-user")
    expected = load_model(models_dir, "digits").predict_proba(
        X_TEST[:12].astype(np.float32)
    )
    # Item 5 has the wrong number of features: refused by the worker alone.
    batch = [X_TEST[i] for i in range(12)]
    batch[5] = X_TEST[5][:10]
    async with (
        running_worker(settings),
        AsyncClient.kafka(token, "many-user", settings=settings) as client,
    ):
        results = await client.infer_many(
            "digits", batch, concurrency=4, return_errors=True
        )
        with pytest.raises(errors.ShapeMismatchError):
            await client.infer_many("digits", batch, concurrency=4)
    refused = results.pop(5)
    assert isinstance(refused, errors.ShapeMismatchError), refused
    assert all(isinstance(r, InferResult) for r in results), results
    answered = np.vstack([r.output() for r in results if isinstance(r, InferResult)])
    np.testing.assert_allclose(
        answered, np.delete(expected, 5, axis=0), rtol=1e-5, atol=1e-7
    )
    assert len({r.request_id for r in results if isinstance(r, InferResult)}) == 11


async def test_blocking_client_round_trip_and_typed_errors(
    settings: Settings, models_dir: Path
) -> None:
    token = await create_token(settings, "sync-user")
    key_id, secret = await create_key(settings, "revoked-user")
    redis = redis_from_settings(settings)
    try:
        assert await KeyStore(redis, settings).revoke(key_id)
    finally:
        await redis.aclose()
    expected = load_model(models_dir, "digits").predict_proba(
        X_TEST[:3].astype(np.float32)
    )

    def use_blocking_clients() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Client.kafka(token, "sync-user", settings=settings) as client:
            seen["proba"] = client.predict("digits", X_TEST[:3])
            try:
                client.predict("digits-v9", X_TEST[:1])
            except errors.GatewayError as exc:
                seen["unknown"] = exc
        revoked = format_token(key_id, secret)
        with Client.kafka(revoked, "revoked-user", settings=settings) as client:
            try:
                client.predict("digits", X_TEST[:1])
            except errors.GatewayError as exc:
                seen["revoked"] = exc
        return seen

    async with running_worker(settings):
        # The blocking client runs its own loop in a thread; this loop keeps
        # running the worker meanwhile.
        seen = await asyncio.to_thread(use_blocking_clients)

    np.testing.assert_allclose(seen["proba"], expected, rtol=1e-5, atol=1e-7)
    unknown, revoked = seen["unknown"], seen["revoked"]
    assert isinstance(unknown, errors.UnknownModelError), unknown
    assert isinstance(unknown, errors.ValidationError)
    assert not unknown.retriable and unknown.attempts == 1
    assert isinstance(revoked, errors.RevokedKeyError), revoked
    assert isinstance(revoked, errors.AuthError) and revoked.attempts == 1


async def test_a_lost_answer_is_retried_and_answered_from_the_kept_copy(
    settings: Settings,
) -> None:
    token = await create_token(settings, "unlucky")
    transport = LosesFirstAnswer(KafkaClientTransport(settings, token, "unlucky"))
    policy = RetryPolicy(base_delay_s=0.01, max_delay_s=0.05)
    async with running_worker(settings), AsyncClient(transport, retry=policy) as client:
        result = await client.infer("digits", X_TEST[:2])

    await assert_answered_from_kept_copy(settings, transport, result, "unlucky")


async def test_a_malformed_token_is_a_typed_error(settings: Settings) -> None:
    with pytest.raises(errors.UnknownKeyError):
        AsyncClient.kafka("not-a-token", "someone", settings=settings)


async def test_an_unreachable_broker_is_a_connection_error(
    settings: Settings, unused_tcp_port: int
) -> None:
    token = await create_token(settings, "nobroker")
    dead = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={
                    "bootstrap": f"127.0.0.1:{unused_tcp_port}",
                    "request_timeout_s": 2.0,
                }
            )
        }
    )
    client = AsyncClient.kafka(token, "nobroker", settings=dead)
    with pytest.raises(errors.ConnectionFailedError):
        await client.start()
    await client.close()


async def test_no_reply_times_out_each_attempt_and_cancelling_forgets_the_request(
    settings: Settings,
) -> None:
    # No worker consumes the requests topic: nothing ever answers.
    await ensure_topics(settings)
    token = await create_token(settings, "unanswered")
    transport = KafkaClientTransport(settings, token, "unanswered")
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.02)
    async with AsyncClient(transport, timeout_s=0.5, retry=policy) as client:
        with pytest.raises(errors.RequestTimeoutError) as caught:
            await client.infer("digits", X_TEST[:1], request_id="never-answered")
        assert caught.value.attempts == 2 and caught.value.retriable
        assert caught.value.request_id == "never-answered"

        call = asyncio.create_task(client.infer("digits", X_TEST[:1]))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert transport.pending_count == 0
