"""Property-based run of schemathesis against the admin OpenAPI document,
in-process (ASGI) on the real Redis and Kafka (the ``/config`` routes publish
to the run's own config topic), authenticated with a real admin session: no
generated request may get a server error, and every answer must match the
documented schema.

Logout is left out: a generated call to it would end the run's session and
leave every later case unauthenticated.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import schemathesis

# Loaded now, at collection, in the main thread. schemathesis imports these
# lazily, and pytest then rewrites them with ast.parse. CPython 3.11's AST
# conversion is not thread-safe ("AST constructor recursion depth mismatch",
# CPython gh-106905), and mid-run other threads (workers' executors,
# servers) are alive: CI failed on schemas' lazy import once, then on the
# transports'. So every module of the package is loaded at collection
# (_load_every_module below), not only these.
import schemathesis.specs.openapi.schemas
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from gateway.admin.app import create_app
from gateway.admin.users import UserStore
from gateway.config import Settings
from gateway.keys import load_server_key
from gateway.store import redis_from_settings
from tests.conftest import StackInfo
from tests.integration.adminkit import FAST_HASH, PASSWORD
from tests.integration.helpers import delete_prefix, isolated_settings


def _load_every_module(package: ModuleType) -> int:
    """Import every submodule of ``package`` now (see the imports above);
    returns how many loaded. One that needs an extra not installed is
    skipped: the test never reaches it either."""
    loaded = 0
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        try:
            importlib.import_module(info.name)
        except ImportError:
            continue
        loaded += 1
    return loaded


_load_every_module(schemathesis)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Examples per operation and mode: 27 operations x 2 modes x 8 take about
# 30 s on the loaded 2-core machine. (schemathesis's lazy pytest loader,
# from_fixture, fails under pytest 9 with "'Function' object has no attribute
# '_nodeid'", so the operations are driven from one test instead.)
MAX_EXAMPLES = 8


@pytest.fixture(scope="module")
def admin_settings(
    stack: StackInfo, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        tmp_path_factory.mktemp("models"),
        auth={"server_key": Fernet.generate_key().decode()},
        admin=FAST_HASH,
    )


@pytest.fixture(scope="module")
def session_headers(admin_settings: Settings) -> Iterator[dict[str, str]]:
    """Bootstrap an admin (as the host CLI does) and log in through the API."""

    async def bootstrap() -> str:
        redis = redis_from_settings(admin_settings)
        try:
            users = UserStore(redis, admin_settings, load_server_key(admin_settings))
            enrollment = await users.create("fuzzer", "admin", PASSWORD)
            return users.current_code(enrollment.uri)
        finally:
            await redis.aclose()

    code = asyncio.run(bootstrap())
    yield {"user": "fuzzer", "code": code}
    asyncio.run(delete_prefix(admin_settings))


def test_admin_api_has_no_server_errors(
    admin_settings: Settings, session_headers: dict[str, str]
) -> None:
    app = create_app(admin_settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(
        path="/v1/sessions/current", method="DELETE"
    )
    with asgi.get_client(app) as client:
        response = client.post(
            "/v1/sessions",
            json={
                "user": "fuzzer",
                "password": PASSWORD,
                "code": session_headers["code"],
            },
        )
    assert response.status_code == 201, response.text
    headers = {"Authorization": f"Bearer {response.json()['token']}"}
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]

    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert len(operations) >= 25, labels
    assert {
        "GET /config",
        "PATCH /config",
        "PUT /config",
        "POST /config/rollback",
        "GET /config/status",
        "PUT /v1/keys/{key_id}/plan",
    } <= labels, labels
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                case.call_and_validate(headers=headers, checks=checks)

            run()

    # The run's own session survived: nothing it sent could end it. (Kafka
    # was reachable throughout: not_a_server_error fails on any 5xx, the
    # documented 503 BROKER_UNAVAILABLE included.)
    with asgi.get_client(app) as client:
        assert client.get("/v1/sessions/me", headers=headers).status_code == 200
        assert client.get("/config/status", headers=headers).status_code == 200
