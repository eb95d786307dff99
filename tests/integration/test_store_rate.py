"""The rate window numbers ``admit.lua`` returns with each admission
(``Admission.limit/remaining/reset_ms/window_s``), against the real Redis."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from gateway.config import Settings, load_settings
from gateway.store import AdmitItem, CounterStore, redis_from_settings
from tests.conftest import StackInfo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def counters(stack: StackInfo) -> AsyncIterator[CounterStore]:
    prefix = f"mgr{secrets.token_hex(4)}"
    settings: Settings = load_settings(
        redis={"url": stack.redis_url, "key_prefix": prefix}
    )
    redis = redis_from_settings(settings)
    try:
        store = CounterStore(redis, settings)
        await store.load_scripts()
        yield store
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.unlink(*keys)
        await redis.aclose()


async def test_each_admission_carries_its_window(counters: CounterStore) -> None:
    client = f"rate-{secrets.token_hex(4)}"
    items = [
        AdmitItem(client, f"r{i}", f"0:{i}", rate_per_s=1.0, burst=2) for i in range(3)
    ]
    first, second, third = await counters.admit_batch(items)

    assert [a.outcome for a in (first, second, third)] == ["ok", "ok", "rate_limited"]
    for admission in (first, second, third):
        assert admission.limit == 2 and admission.window_s == 2.0
    # One cell spent: one left, full again one emission interval (1 s) later.
    assert first.remaining == 1 and 990 <= first.reset_ms <= 1000
    # Both spent; the refused third leaves the TAT (count_refused is off).
    assert second.remaining == 0 and 1990 <= second.reset_ms <= 2000
    assert third.remaining == 0 and third.reset_ms == second.reset_ms
    assert 990 <= third.retry_after_ms <= 1000
