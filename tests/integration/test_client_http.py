"""The client library over HTTP against the real front door: uvicorn on
loopback, a real worker, the real Kafka and Redis. Numpy in and out (async and
blocking), typed errors from the front door's real answers, rate information
from its real headers, and a lost answer retried under the same request id
getting the kept answer, marked ``replayed``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.config import Settings
from gateway.keys import KeyStore, format_token
from gateway.models import digits_split, load_model
from gateway.store import redis_from_settings
from modelgate import errors
from modelgate.client import AsyncClient, Client
from modelgate.http import HttpTransport
from modelgate.retry import RetryPolicy
from tests.conftest import StackInfo
from tests.integration.frontdoor_helpers import (
    serving,
    throttled_settings,
    with_instance,
)
from tests.integration.helpers import (
    REPO,
    LosesFirstAnswer,
    assert_answered_from_kept_copy,
    create_key,
    create_token,
    isolated_settings,
    running_worker,
    settings_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

X_TEST = digits_split()[1].astype(np.float64)  # numpy's default dtype on purpose
NOISE = np.random.default_rng(3).uniform(0, 16, size=(4, 64))
NO_RETRY = RetryPolicy(max_attempts=1)


def _other_key_id(key_id: str) -> str:
    """A well-formed key id that differs from ``key_id`` in its last hex
    digit, so it is never the revoked key itself (whose last digit may be
    anything, ``0`` included)."""
    last = "1" if key_id[-1] == "0" else "0"
    return key_id[:-1] + last


async def test_sync_and_async_http_clients_round_trip_numpy(
    settings: Settings, models_dir: Path
) -> None:
    settings = with_instance(settings)
    token = await create_token(settings, "http-user")
    key_id, secret = await create_key(settings, "revoked-user")
    redis = redis_from_settings(settings)
    try:
        assert await KeyStore(redis, settings).revoke(key_id)
    finally:
        await redis.aclose()
    model = load_model(models_dir, "digits")
    expected = model.predict_proba(X_TEST[:6].astype(np.float32))

    def blocking(url: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with Client.http(url, token, retry=NO_RETRY) as client:
            seen["proba"] = client.predict("digits", X_TEST[3:6])
            seen["one"] = client.predict("digits", X_TEST[3])
            try:
                client.predict("digits-v9", X_TEST[:1])
            except errors.GatewayError as exc:
                seen["unknown"] = exc
        with Client.http(url, format_token(key_id, secret)) as client:
            try:
                client.predict("digits", X_TEST[:1])
            except errors.GatewayError as exc:
                seen["revoked"] = exc
        with Client.http(url, format_token(_other_key_id(key_id), b"x" * 32)) as client:
            try:
                client.predict("digits", X_TEST[:1])
            except errors.GatewayError as exc:
                seen["unknown_key"] = exc
        return seen

    async with serving(settings) as url, running_worker(settings):
        async with AsyncClient.http(url, token) as client:
            result = await client.infer("digits", X_TEST[:3])
            proba = await client.predict("digits", X_TEST[:3])
        # The blocking client runs its own loop in a thread; this loop keeps
        # serving the front door and running the worker meanwhile.
        seen = await asyncio.to_thread(blocking, url)

    assert result.model == "digits" and result.model_version == "2"
    assert result.action == "allow" and result.degrade is None
    assert not result.replayed and result.attempts == 1
    assert result["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(result["probabilities"], expected[:3])
    np.testing.assert_array_equal(result["label"], expected[:3].argmax(axis=1))
    np.testing.assert_array_equal(proba, expected[:3])
    assert result.rate is not None and result.rate.limit == 10_000
    np.testing.assert_array_equal(seen["proba"], expected[3:6])
    # One row alone may differ from the same row in a batch in the last bits.
    np.testing.assert_allclose(seen["one"], expected[3], rtol=1e-5, atol=1e-9)

    unknown = seen["unknown"]
    assert isinstance(unknown, errors.UnknownModelError), unknown
    assert unknown.http_status == 404 and not unknown.retriable
    revoked = seen["revoked"]
    assert isinstance(revoked, errors.RevokedKeyError), revoked
    # Refused at once, not retried: an auth error never heals by waiting.
    assert revoked.http_status == 401 and revoked.attempts == 1
    assert isinstance(seen["unknown_key"], errors.UnknownKeyError), seen


async def test_throttled_http_client_reads_retry_after_and_rate(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = throttled_settings(stack, models_dir)
    token = await create_token(settings, "busy")
    async with (
        serving(settings) as url,
        running_worker(settings),
        AsyncClient.http(url, token, retry=NO_RETRY) as once,
        AsyncClient.http(url, token) as patient,
    ):
        first = await once.infer("digits", X_TEST[:1])
        await once.infer("digits", X_TEST[1:2])
        with pytest.raises(errors.RateLimitedError) as caught:
            await once.infer("digits", X_TEST[2:3])
        # The default policy waits out Retry-After and sends the same id.
        later = await patient.infer("digits", X_TEST[3:4])

    assert first.rate is not None
    assert (first.rate.limit, first.rate.remaining, first.rate.window_s) == (2, 1, 6)
    refused = caught.value
    assert refused.http_status == 429 and refused.retriable
    assert refused.code == "RATE_LIMITED" and refused.attempts == 1
    assert refused.retry_after_s in (2.0, 3.0)
    # Rate information parsed from the 429's RateLimit headers.
    assert refused.rate is not None
    assert (refused.rate.limit, refused.rate.remaining) == (2, 0)
    assert refused.rate.window_s == 6 and refused.rate.reset_s in (5.0, 6.0)
    assert later.attempts >= 2 and later.action == "allow"


async def test_a_lost_http_answer_is_retried_and_answered_from_the_kept_copy(
    settings: Settings,
) -> None:
    settings = with_instance(settings)
    token = await create_token(settings, "unlucky")
    policy = RetryPolicy(base_delay_s=0.01, max_delay_s=0.05)
    async with serving(settings) as url, running_worker(settings):
        transport = LosesFirstAnswer(HttpTransport(url, token))
        async with AsyncClient(transport, retry=policy) as client:
            result = await client.infer("digits", X_TEST[:2])

    await assert_answered_from_kept_copy(settings, transport, result, "unlucky")


async def test_a_degraded_http_answer_says_its_level(
    stack: StackInfo, models_dir: Path
) -> None:
    # Uniform noise is out of distribution for the digits model; the ood
    # detector judges from the first query, so the rule applies at once.
    settings = with_instance(
        isolated_settings(
            stack.kafka_bootstrap,
            stack.redis_url,
            models_dir,
            requests_partitions=1,
            policy={
                "rules": [{"action": "degrade", "risk_at": 1.0, "degrade": "label"}]
            },
            detectors={"ood": {"min_queries": 1, "window": 5, "threshold": 0.2}},
            limits={"rate_per_s": 10_000, "burst": 10_000},
        )
    )
    token = await create_token(settings, "noisy")
    async with (
        serving(settings) as url,
        running_worker(settings),
        AsyncClient.http(url, token, retry=NO_RETRY) as client,
    ):
        result = await client.infer("digits", NOISE[:1])

    assert result.action == "degrade" and result.degrade == "label", result
    assert sorted(set(result["probabilities"].ravel().tolist())) == [0.0, 1.0]


async def test_one_malformed_token_gets_one_code_on_every_path(
    settings: Settings,
) -> None:
    """A key id followed by a malformed secret: ``AUTH_UNKNOWN_KEY`` when no key
    has that id, ``AUTH_BAD_SIGNATURE`` when one does, from the front door,
    the Kafka client (the worker's answer) and ``modelgate send`` alike. The
    Kafka client and the CLI said ``AUTH_BAD_SIGNATURE`` for both."""
    settings = with_instance(settings)
    key_id, _ = await create_key(settings, "garbled")
    tokens = {
        "AUTH_BAD_SIGNATURE": f"{key_id}.c2hvcnQ",
        "AUTH_UNKNOWN_KEY": f"{_other_key_id(key_id)}.c2hvcnQ",
    }
    seen: dict[tuple[str, str], str] = {}

    def cli_send(token: str) -> str:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "gateway", "send", "--token", token),
                *("--client-id", "garbled", "--sample", "0"),
            ],
            env=settings_env(settings),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        return done.stderr.split("error [")[1].split("]")[0]

    async with serving(settings) as url, running_worker(settings):
        for want, token in tokens.items():
            for name, client in [
                ("http", AsyncClient.http(url, token, retry=NO_RETRY)),
                (
                    "kafka",
                    AsyncClient.kafka(token, "garbled", settings=settings,
                                      retry=NO_RETRY),
                ),
            ]:  # fmt: skip
                async with client:
                    with pytest.raises(errors.AuthError) as excinfo:
                        await client.infer("digits", X_TEST[:1])
                seen[(want, name)] = excinfo.value.code
            seen[(want, "cli")] = await asyncio.to_thread(cli_send, token)

    assert seen == {(w, n): w for w in tokens for n in ("http", "kafka", "cli")}, seen
