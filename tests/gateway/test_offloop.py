"""in_thread: a cancelled wait for the scorer's thread ends only after the
thread has returned, so nothing touches the scorer from two threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.offloop import in_thread


async def test_a_result_comes_back_from_the_thread() -> None:
    loop_thread = threading.get_ident()
    ran_in = await in_thread(threading.get_ident)
    assert ran_in != loop_thread


async def test_cancelled_it_still_waits_for_the_thread() -> None:
    started, release = threading.Event(), threading.Event()
    events: list[str] = []

    def work() -> None:
        started.set()
        release.wait(timeout=30)
        events.append("thread returned")

    task = asyncio.create_task(in_thread(work))
    assert await asyncio.to_thread(started.wait, 30)
    task.cancel()
    # Cancelled twice: the second request must not cut the wait short either.
    for _ in range(20):
        await asyncio.sleep(0)
    task.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()

    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    events.append("task ended")
    assert events == ["thread returned", "task ended"]


async def test_an_exception_in_the_thread_reaches_the_caller() -> None:
    def fail() -> None:
        raise ValueError("hostile snapshot")

    with pytest.raises(ValueError, match="hostile snapshot"):
        await in_thread(fail)
