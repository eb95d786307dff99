"""The admin app's handle on the configuration service: a failed start
answers BROKER_UNAVAILABLE, is not retried within the retry interval, and a
later call connects. The service is replaced by a fake (pure logic; the real
Kafka paths are in tests/integration/test_admin_config.py)."""

from __future__ import annotations

import pytest

from gateway.admin.errors import AdminError
from gateway.admin.live import LiveConfigHandle
from gateway.config import load_settings
from gateway.errors import BrokerError


class FakeService:
    """Fails its first ``failures`` starts, then starts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.starts = 0
        self.stops = 0

    async def start(self) -> None:
        self.starts += 1
        if self.starts <= self.failures:
            raise BrokerError("cannot reach Kafka")

    async def stop(self) -> None:
        self.stops += 1


def _handle(fake: FakeService, retry_s: float) -> LiveConfigHandle:
    handle = LiveConfigHandle(load_settings(), retry_s=retry_s)
    handle.service = fake  # type: ignore[assignment]
    return handle


async def test_a_failed_start_is_not_retried_within_the_interval() -> None:
    fake = FakeService(failures=1)
    handle = _handle(fake, retry_s=3600)
    for _ in range(3):
        with pytest.raises(AdminError) as info:
            await handle.get()
        assert info.value.code == "BROKER_UNAVAILABLE" and info.value.status == 503
        assert info.value.retriable and info.value.retry_after_s == 3600
    assert fake.starts == 1 and not handle.started


async def test_a_later_call_connects_and_close_stops() -> None:
    fake = FakeService(failures=1)
    handle = _handle(fake, retry_s=0)
    with pytest.raises(AdminError):
        await handle.get()
    started: object = await handle.get()
    assert started is fake
    assert await handle.get() is started
    assert fake.starts == 2 and handle.started
    await handle.close()
    assert fake.stops == 1 and not handle.started


async def test_start_soon_connects_once() -> None:
    fake = FakeService(failures=0)
    handle = _handle(fake, retry_s=3600)
    handle.start_soon()
    started: object = await handle.get()
    assert started is fake and fake.starts == 1
    await handle.close()
    assert fake.stops == 1
