"""A real front door for the integration tests: uvicorn on a free loopback
port, in this event loop (``serving``) or in a thread of its own
(``serving_in_thread``, for synchronous tools such as schemathesis)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from gateway.config import Settings
from gateway.frontdoor.app import create_app
from gateway.frontdoor.service import reply_topic_for
from gateway.topics import delete_topics
from tests.conftest import StackInfo
from tests.integration.helpers import isolated_settings


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the test runner keeps Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def with_instance(
    settings: Settings, instance_id: str | None = None, *, settle_s: float = 0.0
) -> Settings:
    """``settings`` with a front-door instance id (so a reply topic) of its own.

    ``settle_s`` (``frontdoor.reply_topic_settle_s``) is 0 by default: every
    test but the one about it starts its front doors before the worker's
    first batch, whose topic listing then includes their reply topics.
    """
    section = settings.frontdoor.model_copy(
        update={
            "instance_id": instance_id or f"t-{uuid.uuid4().hex[:10]}",
            "reply_topic_settle_s": settle_s,
        }
    )
    return settings.model_copy(update={"frontdoor": section})


def throttled_settings(stack: StackInfo, models_dir: Path) -> Settings:
    """Isolated front-door settings (shadow mode) whose one plan allows two
    requests per 6 s, burst 2.

    One cell per 3 s, so that a loaded machine's round trips (well under 3 s)
    cannot let the bucket refill mid-test. A rule of its own window, since the
    RateLimit headers state the rule's window (a 1 s legacy rule with a burst
    other than its limit would state q and w of different windows).
    """
    return with_instance(
        isolated_settings(
            stack.kafka_bootstrap,
            stack.redis_url,
            models_dir,
            policy={"shadow": True},
            limits={"plans": {"default": {"rules": [{"limit": 2, "window_s": 6}]}}},
        )
    )


def _config(settings: Settings, app: FastAPI | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app or create_app(settings),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        access_log=False,
    )


def _url(server: uvicorn.Server) -> str:
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def listening(config: uvicorn.Config) -> AsyncIterator[str]:
    """uvicorn serving ``config`` in this event loop; yields its base URL
    once it listens, and stops it afterwards."""
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(60):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        yield _url(server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, *, ready: bool = True, app: FastAPI | None = None
) -> AsyncIterator[str]:
    """A front door on a free port; yields its base URL once it is ready
    (unless ``ready`` is False). Its reply topic is deleted afterwards.
    ``app``: one the test built from ``settings`` (to reach its state)."""
    try:
        async with listening(_config(settings, app)) as url:
            if ready:
                async with asyncio.timeout(60), httpx.AsyncClient() as client:
                    while True:
                        probe = await client.get(url + "/v2/health/ready")
                        if probe.status_code == 200:
                            break
                        await asyncio.sleep(0.1)
            yield url
    finally:
        with contextlib.suppress(Exception):
            await delete_topics(settings, [reply_topic_for(settings)])


@contextlib.contextmanager
def serving_in_thread(settings: Settings) -> Iterator[str]:
    """As ``serving``, in a thread with its own event loop."""
    server = _Server(_config(settings))
    thread = threading.Thread(target=server.run, name="frontdoor", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive(), "front door thread died"
            assert time.monotonic() < deadline, "front door did not start"
            time.sleep(0.05)
        url = _url(server)
        while httpx.get(url + "/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "front door never became ready"
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        asyncio.run(_quiet_delete(settings))


async def _quiet_delete(settings: Settings) -> None:
    with contextlib.suppress(Exception):
        await delete_topics(settings, [reply_topic_for(settings)])


def bearer(token: str) -> dict[str, Any]:
    return {"Authorization": f"Bearer {token}"}
