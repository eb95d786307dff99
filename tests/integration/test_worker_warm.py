"""A worker warms the detectors' kernels up before it consumes, off its
event loop (``detectors.warm.ensure_warm``). The warm-up is replaced by a
stand-in that blocks until the loop shows it is still running: compiling for
real takes tens of seconds, and whether to compile is tested on its own in
tests/detectors/test_warm.py."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import gateway.worker
from gateway.config import Settings
from gateway.worker import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_kernels_warm_off_the_loop_before_scoring_or_consuming(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    loop_ticked = threading.Event()
    seen: dict[str, Any] = {}
    worker = Worker(settings)

    def stand_in() -> float:
        # The callback runs only if the loop is free while this blocks (its
        # heartbeats and health endpoint would be too).
        loop.call_soon_threadsafe(loop_ticked.set)
        seen["loop_ran"] = loop_ticked.wait(10)
        seen["scorer"] = worker._scorer
        seen["consumer"] = worker._consumer
        return 1.0

    monkeypatch.setattr(gateway.worker, "ensure_warm", stand_in)
    try:
        await asyncio.wait_for(worker.start(), 45)
        assert seen["loop_ran"], "the warm-up blocked the event loop"
        # Before the detectors (whose set-up runs kernels) and the consumer.
        assert seen["scorer"] is None and seen["consumer"] is None, seen
        assert worker._consumer is not None
    finally:
        await worker.stop()
