"""The live configuration through the admin API, end to end on the real broker
and Redis with a worker subprocess: a two-factor operator session changes a
limit, the worker acknowledges within a second and enforces it; viewers, a
password without its code and invalid values change nothing and are audited;
rollback and history; 503 while Kafka is unreachable; key plans."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from gateway.config import Settings
from gateway.keys import KeyStore
from gateway.models import digits_split
from tests.conftest import StackInfo
from tests.integration.adminkit import FAST_HASH, AdminHarness, admin_app
from tests.integration.helpers import (
    RawKafka,
    answer_codes,
    isolated_settings,
    start_worker_process,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

X_TEST = digits_split()[1]
APPLY_BUDGET_MS = 1000


def _settings(stack: StackInfo, models_dir: Path, **overrides: Any) -> Settings:
    # Shadow mode and high limits, as the request-path tests use: only the
    # limits changed through the API may refuse a request.
    limits = {"rate_per_s": 10_000, "burst": 10_000, **overrides.pop("limits", {})}
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        auth={"server_key": Fernet.generate_key().decode()},
        admin=FAST_HASH,
        policy={"shadow": True},
        limits=limits,
        **overrides,
    )


async def _status(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    done: Callable[[dict[str, Any]], bool],
    timeout_s: float,
) -> dict[str, Any]:
    """Poll ``GET /config/status`` until ``done`` or the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        response = await client.get("/config/status", headers=headers)
        assert response.status_code == 200, response.text
        status: dict[str, Any] = response.json()
        if done(status):
            return status
        if loop.time() > deadline:
            raise AssertionError(f"status after {timeout_s} s: {status}")
        await asyncio.sleep(0.02)  # polling interval of the condition


async def _codes(
    kafka: RawKafka, settings: Settings, key: dict[str, Any], n: int = 4
) -> list[str]:
    """Answer codes of ``n`` requests sent at once with a key from
    ``POST /v1/keys``, on its client's partition."""
    key_pair = KeyStore.parse_token(key["token"])
    return await answer_codes(kafka, settings, key_pair, key["client_id"], X_TEST[:n])


async def _until_admitted(
    kafka: RawKafka, settings: Settings, key: dict[str, Any], timeout_s: float
) -> None:
    """Send one request at a time until one is admitted or the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (codes := await _codes(kafka, settings, key, 1)) != ["ok"]:
        assert loop.time() < deadline, f"still refused after {timeout_s} s: {codes}"


async def _new_key(
    admin: AdminHarness,
    client: httpx.AsyncClient,
    headers: dict[str, str],
    client_id: str,
    **extra: Any,
) -> dict[str, Any]:
    response = await client.post(
        "/v1/keys", json={"client_id": client_id, **extra}, headers=headers
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def _config_entries(entries: list[Any], action: str) -> list[Any]:
    return [e for e in entries if e.action == action]


async def test_operator_changes_config_through_the_api(
    stack: StackInfo, models_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(stack, models_dir)
    worker = start_worker_process(settings, tmp_path / "worker.log")
    try:
        async with (
            admin_app(settings) as admin,
            admin.client() as client,
            RawKafka(settings) as kafka,
        ):
            for name, role in (("root", "admin"), ("olga", "operator")):
                await admin.add_user(name, role)
            await admin.add_user("vic", "viewer")
            root = await admin.session(client, "root")
            olga = await admin.session(client, "olga")
            vic = await admin.session(client, "vic")

            status = await _status(client, vic, lambda s: len(s["workers"]) == 1, 120)
            worker_id = status["workers"][0]["worker_id"]
            assert status["version"] == 0 and status["workers"][0]["version"] == 0
            steady = await _new_key(admin, client, root, "steady")
            assert await _codes(kafka, settings, steady) == ["ok"] * 4

            # A key's own limit override through the API binds on the worker;
            # changing its plan back frees it within the key cache's life.
            one_per_hour = {"rules": [{"limit": 1, "window_s": 3600, "burst": 1}]}
            capped = await _new_key(
                admin, client, root, "capped", limit_overrides=one_per_hour
            )
            assert await _codes(kafka, settings, capped, 2) == ["ok", "RATE_LIMITED"]
            plan = await client.put(
                f"/v1/keys/{capped['key_id']}/plan",
                json={"plan": "default"},
                headers=root,
            )
            assert plan.status_code == 200, plan.text
            await _until_admitted(kafka, settings, capped, timeout_s=10)

            # A two-factor operator session publishes; the worker runs it
            # within a second and enforces it on the next requests.
            changed = await client.patch(
                "/config",
                json={"changes": {"limits.burst": 1, "limits.rate_per_s": 0.01}},
                headers=olga,
            )
            assert changed.status_code == 200, changed.text
            record = changed.json()["record"]
            assert record["version"] == 2 and record["author"] == "admin:olga"
            status = await _status(
                client, vic, lambda s: s["workers"][0]["version"] == 2, 5
            )
            applied_ms = status["workers"][0]["applied_at_ms"]
            latency_ms = applied_ms - record["at_ms"]
            print(f"publish through the admin API to the worker's ack: {latency_ms} ms")
            assert latency_ms <= APPLY_BUDGET_MS, status
            limited = await _new_key(admin, client, root, "limited")
            codes = await _codes(kafka, settings, limited)
            assert codes[0] == "ok" and "RATE_LIMITED" in codes[1:], codes

            # A viewer reads but cannot change: 403, audited.
            assert (await client.get("/config", headers=vic)).status_code == 200
            refused = await client.patch(
                "/config", json={"changes": {"limits.burst": 500}}, headers=vic
            )
            assert refused.status_code == 403, refused.text
            assert refused.json()["code"] == "ADMIN_FORBIDDEN"

            # A stolen password without the current code gets no session, and
            # no session means no change.
            stolen = await client.post(
                "/v1/sessions",
                json={"user": "olga", "password": "correct horse battery staple"},
            )
            assert stolen.status_code == 422, stolen.text
            wrong_code = str((int(admin.code("olga")) + 1) % 1_000_000).zfill(6)
            stolen = await client.post(
                "/v1/sessions",
                json={
                    "user": "olga",
                    "password": "correct horse battery staple",
                    "code": wrong_code,
                },
            )
            assert stolen.status_code == 401, stolen.text
            anonymous = await client.patch(
                "/config", json={"changes": {"limits.burst": 500}}
            )
            assert anonymous.status_code == 401, anonymous.text
            assert anonymous.json()["code"] == "ADMIN_UNAUTHENTICATED"

            # An invalid value names the field and the rule; nothing is
            # published and the worker stays on version 2.
            invalid = await client.patch(
                "/config", json={"changes": {"limits.burst": 0}}, headers=olga
            )
            assert invalid.status_code == 422, invalid.text
            body = invalid.json()
            assert body["code"] == "CONFIG_INVALID" and not body["retriable"]
            assert "limits.burst" in body["error"] and "rule:" in body["error"], body
            current = (await client.get("/config", headers=vic)).json()
            assert current["version"] == 2
            assert current["document"]["limits"]["burst"] == 1

            # Rollback through the API: version 1's document as version 3,
            # applied by the worker, requests pass again.
            back = await client.post(
                "/config/rollback", json={"version": 1}, headers=olga
            )
            assert back.status_code == 200, back.text
            assert back.json()["record"]["version"] == 3
            await _status(client, vic, lambda s: s["workers"][0]["version"] == 3, 5)
            released = await _new_key(admin, client, root, "released")
            assert await _codes(kafka, settings, released) == ["ok"] * 4

            history = (await client.get("/config/history", headers=vic)).json()
            assert [(r["version"], r["kind"], r["author"]) for r in history] == [
                (1, "initial", "admin:olga"),
                (2, "set", "admin:olga"),
                (3, "rollback", "admin:olga"),
            ]
            worker_status = (await client.get("/config/status", headers=vic)).json()
            assert worker_status["workers"][0]["worker_id"] == worker_id

            # The admin audit log has every attempt, with the versions.
            entries = await admin.audit()
            patches = _config_entries(entries, "PATCH /config")
            by_outcome = {(e.actor, e.outcome): e for e in patches}
            accepted = by_outcome[("olga", "ok")].detail
            assert accepted["version_before"] == "1", accepted
            assert accepted["version_after"] == "2", accepted
            assert "limits.burst: 10000 -> 1" in accepted["summary"], accepted
            failed = by_outcome[("olga", "failed")].detail
            assert failed["code"] == "CONFIG_INVALID", failed
            assert failed["version_before"] == failed["version_after"] == "2"
            assert failed["summary"] == "set limits.burst=0", failed
            assert by_outcome[("vic", "denied")].target == "/config"
            assert ("-", "denied") in by_outcome
            rolled = _config_entries(entries, "POST /config/rollback")
            assert [(e.actor, e.outcome) for e in rolled] == [("olga", "ok")]
            assert rolled[0].detail["version_before"] == "2"
            assert rolled[0].detail["version_after"] == "3"
            # Reads are not audited (only changes and logins are).
            assert not _config_entries(entries, "GET /config/status")

            # A string for a number or a boolean is refused over HTTP too
            # (lax pydantic published "81" as 81 and "yes" as true).
            for changes, rule in (
                ({"limits.burst": "81"}, "string_not_number"),
                ({"policy.shadow": "yes"}, "string_not_boolean"),
            ):
                quoted = await client.patch(
                    "/config", json={"changes": changes}, headers=olga
                )
                assert quoted.status_code == 422, quoted.text
                assert quoted.json()["code"] == "CONFIG_INVALID"
                assert f"(rule: {rule})" in quoted.json()["error"], quoted.text
            current = (await client.get("/config", headers=vic)).json()
            assert current["version"] == 3
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_config_routes_answer_503_without_kafka(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = _settings(
        stack,
        models_dir,
        kafka={"bootstrap": f"127.0.0.1:{_closed_port()}", "request_timeout_s": 2},
    )
    async with admin_app(settings) as admin, admin.client() as client:
        await admin.add_user("olga", "operator")
        olga = await admin.session(client, "olga")

        for call in (
            client.get("/config", headers=olga),
            client.patch(
                "/config", json={"changes": {"limits.burst": 5}}, headers=olga
            ),
        ):
            response = await call
            assert response.status_code == 503, response.text
            assert response.json() == {
                "error": "the live configuration is unavailable: Kafka cannot be "
                "reached",
                "code": "BROKER_UNAVAILABLE",
                "retriable": True,
            }
            assert int(response.headers["Retry-After"]) >= 1
        # The rest of the admin API is unaffected.
        me = await client.get("/v1/sessions/me", headers=olga)
        assert me.status_code == 200, me.text
        # Anonymous callers are refused before any connection attempt.
        anonymous = await client.get("/config")
        assert anonymous.status_code == 401, anonymous.text
        failed = [
            e
            for e in await admin.audit()
            if e.action == "PATCH /config" and e.outcome == "failed"
        ]
        assert [(e.actor, e.detail["code"]) for e in failed] == [
            ("olga", "BROKER_UNAVAILABLE")
        ]

        # A key's plan other than "default" is checked against the live
        # configuration, so it cannot be changed without Kafka either.
        await admin.add_user("root", "admin")
        root = await admin.session(client, "root")
        plan = await client.put(
            "/v1/keys/mgk_000000000000/plan", json={"plan": "gold"}, headers=root
        )
        assert plan.status_code == 503, plan.text
        assert plan.json()["code"] == "BROKER_UNAVAILABLE", plan.text
        refused = [
            e for e in await admin.audit() if e.action.startswith("PUT /v1/keys")
        ]
        assert [(e.actor, e.outcome, e.detail) for e in refused] == [
            ("root", "failed", {"reason": "BROKER_UNAVAILABLE"})
        ]


async def test_key_plans_through_the_api(stack: StackInfo, models_dir: Path) -> None:
    plans = {"gold": {"quota": {"daily": 10_000}}, "free": {"quota": {"daily": 10}}}
    settings = _settings(stack, models_dir, limits={"plans": plans})
    async with admin_app(settings) as admin, admin.client() as client:
        await admin.add_user("root", "admin")
        await admin.add_user("olga", "operator")
        root = await admin.session(client, "root")
        olga = await admin.session(client, "olga")

        hourly = {"rules": [{"limit": 100, "window_s": 3600}]}
        created = await _new_key(
            admin, client, root, "tiered", plan="gold", limit_overrides=hourly
        )
        assert created["plan"] == "gold" and created["limit_overrides"] == hourly
        key_id = created["key_id"]
        store = KeyStore(admin.context.redis, settings)
        stored = await store.get(key_id)
        assert stored is not None and stored.plan == "gold"
        assert stored.limit_overrides == '{"rules":[{"limit":100.0,"window_s":3600.0}]}'
        listed = (await client.get("/v1/keys", headers=olga)).json()
        assert [(k["plan"], k["limit_overrides"]) for k in listed] == [
            ("gold", {"rules": [{"limit": 100.0, "window_s": 3600.0}]})
        ]

        # Only an admin changes a plan; an operator's attempt is audited.
        path = f"/v1/keys/{key_id}/plan"
        forbidden = await client.put(path, json={"plan": "free"}, headers=olga)
        assert forbidden.status_code == 403, forbidden.text
        changed = await client.put(
            path,
            json={"plan": "free", "limit_overrides": {"quota": {"daily": 5}}},
            headers=root,
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["plan"] == "free"
        assert changed.json()["limit_overrides"] == {"quota": {"daily": 5}}
        stored = await KeyStore(admin.context.redis, settings).get(key_id)
        assert stored is not None and stored.plan == "free"
        assert stored.limit_overrides == '{"quota":{"daily":5}}'
        cleared = await client.put(path, json={"plan": "free"}, headers=root)
        assert cleared.json()["limit_overrides"] == {}

        bad_plan = await client.put(path, json={"plan": "no spaces"}, headers=root)
        assert bad_plan.status_code == 422, bad_plan.text
        bad_rule = await client.put(
            path,
            json={"plan": "free", "limit_overrides": {"quota": {"daily": 0}}},
            headers=root,
        )
        assert bad_rule.status_code == 422, bad_rule.text
        unknown = await client.put(
            "/v1/keys/mgk_000000000000/plan", json={"plan": "free"}, headers=root
        )
        assert unknown.status_code == 404, unknown.text
        # A plan no configuration defines is refused, not run as the default.
        typo = await client.put(path, json={"plan": "glod"}, headers=root)
        assert typo.status_code == 422, typo.text
        assert typo.json()["code"] == "UNKNOWN_PLAN", typo.text
        assert "free, gold" in typo.json()["error"], typo.text
        stored = await KeyStore(admin.context.redis, settings).get(key_id)
        assert stored is not None and stored.plan == "free"
        # Creating a key on one is refused alike, and creates nothing.
        before = await admin.context.keys.list()
        typo_key = await client.post(
            "/v1/keys", json={"client_id": "typo", "plan": "glod"}, headers=root
        )
        assert typo_key.status_code == 422, typo_key.text
        assert typo_key.json()["code"] == "UNKNOWN_PLAN", typo_key.text
        assert "free, gold" in typo_key.json()["error"], typo_key.text
        assert await admin.context.keys.list() == before
        refused_create = [
            e
            for e in await admin.audit()
            if e.action == "POST /v1/keys" and e.outcome == "failed"
        ]
        assert [(e.target, e.detail) for e in refused_create] == [
            ("typo", {"reason": "unknown plan glod"})
        ]

        # The audit log reads newest first.
        entries = [
            e
            for e in reversed(await admin.audit())
            if e.action == "PUT /v1/keys/{key_id}/plan"
        ]
        assert [(e.actor, e.outcome) for e in entries] == [
            ("olga", "denied"),
            ("root", "ok"),
            ("root", "ok"),
            ("root", "failed"),
            ("root", "failed"),
        ]
        assert entries[-1].detail == {"reason": "unknown plan glod"}
        first_change = entries[1].detail
        assert first_change["plan_before"] == "gold" and first_change["plan"] == "free"
        assert "3600" in first_change["limit_overrides_before"]
        creation = [
            e
            for e in await admin.audit()
            if e.action == "POST /v1/keys" and e.outcome == "ok"
        ]
        assert creation[0].detail["plan"] == "gold"
