"""Shared pieces of the admin-plane tests: an admin app on the real Redis, a
stepping TOTP clock, users created the way the bootstrap CLI creates them,
and a login helper."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pyotp
from fastapi import FastAPI

from gateway.admin.app import create_app
from gateway.admin.deps import AdminContext
from gateway.config import Settings
from gateway.store import redis_from_settings
from tests.integration.helpers import delete_prefix

PASSWORD = "correct horse battery staple"
# The cheapest Argon2 cost the settings allow: these tests hash a lot, and the
# cost does not change what they check.
FAST_HASH = {"argon2_time_cost": 1, "argon2_memory_kib": 8192}


@dataclass
class StepClock:
    """Wall time frozen at creation; ``step()`` moves one TOTP interval on, so
    every login can use a fresh code without sleeping."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float = 30.0) -> None:
        self.now += seconds


@dataclass
class AdminHarness:
    settings: Settings
    app: FastAPI
    clock: StepClock
    uris: dict[str, str] = field(default_factory=dict)

    @property
    def context(self) -> AdminContext:
        context: AdminContext = self.app.state.admin
        return context

    def client(self, source: str = "127.0.0.1") -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=(source, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://admin")

    async def add_user(self, name: str, role: str) -> str:
        enrollment = await self.context.users.create(name, role, PASSWORD)  # type: ignore[arg-type]
        self.uris[name] = enrollment.uri
        return enrollment.uri

    def code(self, name: str) -> str:
        return str(pyotp.parse_uri(self.uris[name]).at(self.clock()))

    async def login(
        self, client: httpx.AsyncClient, name: str, *, password: str = PASSWORD
    ) -> httpx.Response:
        """Log in with the current code, then step the clock so the next login
        gets a fresh one (a code is accepted once)."""
        response = await client.post(
            "/v1/sessions",
            json={"user": name, "password": password, "code": self.code(name)},
        )
        self.clock.step()
        return response

    async def session(self, client: httpx.AsyncClient, name: str) -> dict[str, str]:
        response = await self.login(client, name)
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['token']}"}

    async def audit(self) -> list[Any]:
        return list(await self.context.audit.read(1000))


@asynccontextmanager
async def admin_app(settings: Settings) -> AsyncIterator[AdminHarness]:
    """The admin app with its lifespan running; deletes every Redis key under
    the settings' own prefix afterwards."""
    clock = StepClock()
    app = create_app(settings, clock=clock)
    try:
        async with app.router.lifespan_context(app):
            yield AdminHarness(settings, app, clock)
    finally:
        await delete_prefix(settings)


async def dump_prefix(settings: Settings) -> bytes:
    """Every value under the settings' prefix, concatenated (to search for a
    secret that must not be there)."""
    redis = redis_from_settings(settings)
    chunks: list[bytes] = []
    try:
        async for key in redis.scan_iter(match=f"{settings.redis.key_prefix}:*"):
            kind = (await redis.type(key)).decode()
            if kind == "string":
                chunks.append(await redis.get(key) or b"")
            elif kind == "hash":
                for k, v in (await redis.hgetall(key)).items():
                    chunks += [k, v]
            elif kind == "list":
                chunks += await redis.lrange(key, 0, -1)
            elif kind == "set":
                chunks += list(await redis.smembers(key))
            elif kind == "zset":
                chunks += [
                    m for m, _ in await redis.zrange(key, 0, -1, withscores=True)
                ]
            elif kind == "stream":
                for _, fields in await redis.xrange(key):
                    for k, v in fields.items():
                        chunks += [k, v]
            chunks.append(key)
    finally:
        await redis.aclose()
    return b"\n".join(chunks)
