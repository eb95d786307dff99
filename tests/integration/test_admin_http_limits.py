"""The admin API served by uvicorn as ``modelgate admin serve`` serves it:
a request head over 64 KiB gets ``431 HEADERS_TOO_LARGE`` and a body over
``admin.max_body_bytes`` ``413 PAYLOAD_TOO_LARGE``, both with the admin error
body, instead of a reset connection (gateway/admin/http_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography.fernet import Fernet

from gateway.admin.app import create_app
from gateway.admin.http_server import server_options
from tests.conftest import StackInfo
from tests.integration.adminkit import FAST_HASH
from tests.integration.frontdoor_helpers import listening
from tests.integration.helpers import delete_prefix, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

MAX_BODY_BYTES = 4096


@contextlib.asynccontextmanager
async def _admin_url(stack: StackInfo, models_dir: Path) -> AsyncIterator[str]:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        auth={"server_key": Fernet.generate_key().decode()},
        admin={**FAST_HASH, "max_body_bytes": MAX_BODY_BYTES},
    )
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        access_log=False,
        **server_options(),
    )
    try:
        async with listening(config) as url:
            yield url
    finally:
        await delete_prefix(settings)


@pytest.fixture
async def admin_url(stack: StackInfo, models_dir: Path) -> AsyncIterator[str]:
    async with _admin_url(stack, models_dir) as url:
        yield url


@pytest.mark.parametrize("token_bytes", [70_000, 300_000, 2_000_000])
async def test_an_oversize_head_gets_431_not_a_reset(
    admin_url: str, token_bytes: int
) -> None:
    """Regression test: the admin API ran on plain uvicorn, which resets a
    client whose head passes h11's buffer (a few hundred KiB)."""
    async with httpx.AsyncClient(base_url=admin_url) as http:
        answer = await http.post(
            "/v1/keys",
            json={"client_id": "c"},
            headers={"Authorization": "Bearer " + "a" * token_bytes},
        )
        under = await http.post(
            "/v1/keys",
            json={"client_id": "c"},
            headers={"Authorization": "Bearer " + "a" * 60_000},
        )

    assert answer.status_code == 431, answer.text
    assert answer.json() == {
        "error": answer.json()["error"],
        "code": "HEADERS_TOO_LARGE",
        "retriable": False,
    }
    assert "65536 bytes" in answer.json()["error"], answer.text
    assert under.status_code == 401, under.text
    assert under.json()["code"] == "ADMIN_UNAUTHENTICATED", under.text


async def test_a_refused_head_is_answered_to_a_client_still_sending(
    admin_url: str,
) -> None:
    host, port = admin_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/audit HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
    for _ in range(64):
        writer.write(b"a" * 16_384)
        await writer.drain()
    writer.write(b"\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()

    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"code":"HEADERS_TOO_LARGE"' in payload, answer[:400]


async def test_an_oversize_body_gets_413(admin_url: str) -> None:
    big = {"user": "u", "password": "p" * MAX_BODY_BYTES, "code": "000000"}

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: judged on the bytes read.
        for _ in range(8):
            yield b" " * 1024

    async with httpx.AsyncClient(base_url=admin_url) as http:
        declared = await http.post("/v1/sessions", json=big)
        streamed = await http.post(
            "/v1/sessions",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        small = await http.post(
            "/v1/sessions", json={"user": "u", "password": "p", "code": "000000"}
        )

    for answer in (declared, streamed):
        assert answer.status_code == 413, answer.text
        assert answer.json()["code"] == "PAYLOAD_TOO_LARGE", answer.text
        assert f"{MAX_BODY_BYTES} bytes" in answer.json()["error"], answer.text
    assert small.status_code == 401, small.text
