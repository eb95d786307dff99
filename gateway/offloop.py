"""Running the scorer's CPU work in a thread without losing track of it.

The worker scores, restores and snapshots clients in the default executor so
its event loop keeps serving heartbeats and replies. A thread cannot be
cancelled, though: when the awaiting task is, ``run_in_executor``'s future
gives up at once while the thread keeps using the scorer, and the caller's
cleanup (a hand-over, the stop's snapshot) would then touch the scorer from
the loop at the same time. :func:`in_thread` waits for the thread first.

Imports the standard library only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_thread(function: Callable[[], T]) -> T:
    """Run ``function`` in the default executor and return its result.

    Cancelled, it still waits for the thread to return before it raises
    ``CancelledError``, however often it is cancelled meanwhile.
    """
    future = asyncio.get_running_loop().run_in_executor(None, function)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                continue  # asked again: still not before the thread is done
        raise
