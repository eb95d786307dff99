"""The admin API against the real Redis: two factors, replay, lockout, the
per-source login limit, roles, sessions, keys shown once and never stored in
clear, users, and the audit trail.

Each test gets its own key prefix (``isolated_settings``) and deletes it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.fernet import Fernet
from fastapi import APIRouter

from gateway.admin.app import create_app
from gateway.admin.cli import uvicorn_proxy_options
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError
from gateway.keys import KeyStore
from tests.conftest import StackInfo
from tests.integration.adminkit import (
    FAST_HASH,
    PASSWORD,
    AdminHarness,
    StepClock,
    admin_app,
    dump_prefix,
)
from tests.integration.frontdoor_helpers import listening
from tests.integration.helpers import delete_prefix, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Factory = Callable[..., AbstractAsyncContextManager[AdminHarness]]


@pytest.fixture
def make_admin(stack: StackInfo, models_dir: Path) -> Factory:
    """An admin app on isolated settings, with ``admin`` overrides."""

    def make(**admin: Any) -> AbstractAsyncContextManager[AdminHarness]:
        settings = isolated_settings(
            stack.kafka_bootstrap,
            stack.redis_url,
            models_dir,
            auth={"server_key": Fernet.generate_key().decode()},
            admin={**FAST_HASH, **admin},
        )
        return admin_app(settings)

    return make


@pytest.fixture
async def admin(make_admin: Factory) -> AsyncIterator[AdminHarness]:
    async with make_admin() as harness:
        yield harness


async def _session_keys(settings: Settings) -> int:
    from gateway.store import redis_from_settings

    redis = redis_from_settings(settings)
    try:
        pattern = f"{settings.redis.key_prefix}:admin:session:*"
        return len([k async for k in redis.scan_iter(match=pattern)])
    finally:
        await redis.aclose()


def _logins(entries: list[Any], user: str) -> list[Any]:
    return [e for e in entries if e.action == "login" and e.actor == user]


async def test_stolen_password_without_second_factor_gets_nothing(
    admin: AdminHarness,
) -> None:
    await admin.add_user("alice", "admin")
    async with admin.client() as http:
        wrong_code = await http.post(
            "/v1/sessions",
            json={"user": "alice", "password": PASSWORD, "code": "000000"},
        )
        no_code = await http.post(
            "/v1/sessions", json={"user": "alice", "password": PASSWORD, "code": ""}
        )
        wrong_password = await http.post(
            "/v1/sessions",
            json={"user": "alice", "password": "x" * 20, "code": admin.code("alice")},
        )
        # Without a session nothing is reachable, reads included.
        keys = await http.get("/v1/keys")

    for response in (wrong_code, no_code, wrong_password, keys):
        assert response.status_code == 401, response.text
        assert response.json()["code"] == "ADMIN_UNAUTHENTICATED", response.text
    # The right password is not even confirmed: same answer as a wrong one.
    assert wrong_code.json() == wrong_password.json()
    assert "token" not in wrong_code.text
    assert await _session_keys(admin.settings) == 0

    reasons = [e.detail["reason"] for e in _logins(await admin.audit(), "alice")]
    assert sorted(reasons) == ["bad_code", "bad_code", "bad_password"], reasons
    assert all(e.outcome == "denied" for e in _logins(await admin.audit(), "alice"))


async def test_totp_replay_and_old_codes_are_refused(admin: AdminHarness) -> None:
    uri = await admin.add_user("bob", "viewer")
    assert not (await admin.context.users.get("bob")).enrolled  # type: ignore[union-attr]
    code = admin.code("bob")
    body = {"user": "bob", "password": PASSWORD, "code": code}
    async with admin.client() as http:
        first = await http.post("/v1/sessions", json=body)
        replay = await http.post("/v1/sessions", json=body)
        # A code from two intervals ago is outside the window.
        import pyotp

        old = str(pyotp.parse_uri(uri).at(admin.clock() - 60))
        stale = await http.post(
            "/v1/sessions", json={"user": "bob", "password": PASSWORD, "code": old}
        )
        # The next interval's code is accepted once the clock gets there.
        admin.clock.step()
        later = await admin.login(http, "bob")

    assert first.status_code == 201, first.text
    assert replay.status_code == 401, replay.text
    assert stale.status_code == 401, stale.text
    assert later.status_code == 201, later.text
    # The first valid code confirmed the enrollment.
    assert (await admin.context.users.get("bob")).enrolled  # type: ignore[union-attr]
    reasons = [e.detail.get("reason") for e in _logins(await admin.audit(), "bob")]
    assert "replayed_code" in reasons and "bad_code" in reasons, reasons


async def test_lockout_after_failures_then_expiry(make_admin: Factory) -> None:
    async with make_admin(
        max_failures=3, lockout_s=2.0, login_attempts_per_window=1000
    ) as admin:
        await admin.add_user("carol", "operator")
        async with admin.client() as http:
            for _ in range(3):
                bad = await admin.login(http, "carol", password="wrong password!!")
                assert bad.status_code == 401, bad.text
            locked = await admin.login(http, "carol")
            assert locked.status_code == 429, locked.text
            assert locked.json()["code"] == "ACCOUNT_LOCKED"
            assert int(locked.headers["Retry-After"]) >= 1

            # Unknown names lock the same way: a lock reveals no account.
            for _ in range(3):
                await http.post(
                    "/v1/sessions",
                    json={"user": "nobody", "password": PASSWORD, "code": "123456"},
                )
            ghost = await http.post(
                "/v1/sessions",
                json={"user": "nobody", "password": PASSWORD, "code": "123456"},
            )
            assert ghost.json()["code"] == "ACCOUNT_LOCKED", ghost.text

            # The lock lifts by itself after lockout_s.
            deadline = time.monotonic() + 10
            while True:
                response = await admin.login(http, "carol")
                if response.status_code == 201:
                    break
                assert response.json()["code"] == "ACCOUNT_LOCKED", response.text
                assert time.monotonic() < deadline, "lock never lifted"
                await asyncio.sleep(0.1)

        entries = _logins(await admin.audit(), "carol")
        assert any(e.detail.get("locked") == "true" for e in entries)
        assert any(e.detail.get("reason") == "ACCOUNT_LOCKED" for e in entries)


async def test_login_attempts_are_limited_per_source(make_admin: Factory) -> None:
    async with make_admin(login_attempts_per_window=3, max_failures=100) as admin:
        await admin.add_user("dave", "viewer")
        async with admin.client("10.0.0.1") as first, admin.client("10.0.0.2") as other:
            for _ in range(3):
                bad = await admin.login(first, "dave", password="wrong password!!")
                assert bad.status_code == 401, bad.text
            limited = await admin.login(first, "dave")
            assert limited.status_code == 429, limited.text
            assert limited.json()["code"] == "LOGIN_RATE_LIMITED"
            assert "Retry-After" in limited.headers
            # Another address is not affected, and the right credentials work.
            fine = await admin.login(other, "dave")
            assert fine.status_code == 201, fine.text
        limited_entries = [
            e
            for e in await admin.audit()
            if e.detail.get("reason") == "LOGIN_RATE_LIMITED"
        ]
        assert limited_entries and limited_entries[0].source == "10.0.0.1"


async def _forwarded_logins(admin: AdminHarness, forwarded: list[str]) -> list[int]:
    """Wrong-password logins for "dave" through real uvicorn, configured as
    ``modelgate admin serve`` configures it, one per X-Forwarded-For value."""
    config = uvicorn.Config(
        admin.app,
        host="127.0.0.1",
        port=0,
        lifespan="off",  # the harness runs the app's lifespan
        log_level="warning",
        access_log=False,
        **uvicorn_proxy_options(admin.settings),
    )
    statuses = []
    async with (
        listening(config) as url,
        httpx.AsyncClient(base_url=url, trust_env=False) as http,
    ):
        for value in forwarded:
            body = {"user": "dave", "password": "wrong password!!", "code": "000000"}
            answer = await http.post(
                "/v1/sessions", json=body, headers={"X-Forwarded-For": value}
            )
            statuses.append(answer.status_code)
    return statuses


async def test_a_forwarded_for_header_counts_only_from_a_trusted_proxy(
    make_admin: Factory,
) -> None:
    # uvicorn alone believes the header from 127.0.0.1, where the admin API
    # listens: each of these logins would then come from a new source.
    async with make_admin(login_attempts_per_window=3, max_failures=100) as admin:
        await admin.add_user("dave", "viewer")
        statuses = await _forwarded_logins(admin, [f"10.9.0.{i}" for i in range(5)])
        assert statuses == [401, 401, 401, 429, 429]
        sources = {e.source for e in _logins(await admin.audit(), "dave")}
        assert sources == {"127.0.0.1"}

    trusted = {"trusted_proxies": ["127.0.0.0/8"]}
    async with make_admin(
        login_attempts_per_window=3, max_failures=100, **trusted
    ) as admin:
        await admin.add_user("dave", "viewer")
        statuses = await _forwarded_logins(
            admin, ["10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4, 127.0.0.5"]
        )
        assert statuses == [401] * 4  # four sources, one attempt each
        sources = [e.source for e in _logins(await admin.audit(), "dave")]
        # The rightmost address no trusted proxy owns is the caller.
        assert sorted(sources) == ["10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4"]


async def test_spellings_and_addresses_of_one_ipv6_host_share_a_login_limit(
    make_admin: Factory,
) -> None:
    async with make_admin(login_attempts_per_window=3, max_failures=100) as admin:
        await admin.add_user("dave", "viewer")
        statuses = []
        for source in ("2001:db8::1", "2001:DB8:0::1", "2001:db8::2", "2001:db8::3"):
            async with admin.client(source) as http:
                answer = await admin.login(http, "dave", password="wrong password!!")
                statuses.append(answer.status_code)
        assert statuses == [401, 401, 401, 429]
        # The audit log keeps each address, in one spelling.
        sources = [e.source for e in _logins(await admin.audit(), "dave")]
        assert set(sources) == {"2001:db8::1", "2001:db8::2", "2001:db8::3"}


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert load_settings(admin={"trusted_proxies": ["10.0.0.0/8", "::1"]})
    with pytest.raises(ConfigError, match="not an IP address or network"):
        load_settings(admin={"trusted_proxies": ["proxy.internal"]})
    assert uvicorn_proxy_options(load_settings()) == {"proxy_headers": False}


async def test_roles_are_enforced(admin: AdminHarness) -> None:
    await admin.add_user("vic", "viewer")
    await admin.add_user("otto", "operator")
    await admin.context.keys.create("c1")  # a client to release
    async with admin.client() as http:
        viewer = await admin.session(http, "vic")
        operator = await admin.session(http, "otto")

        assert (await http.get("/v1/keys", headers=viewer)).status_code == 200
        assert (await http.get("/v1/clients/top", headers=viewer)).status_code == 200
        create = await http.post("/v1/keys", json={"client_id": "c1"}, headers=viewer)
        release = await http.post("/v1/clients/c1/release", headers=viewer)
        users = await http.get("/v1/users", headers=viewer)
        audit = await http.get("/v1/audit", headers=operator)
        op_create = await http.post(
            "/v1/keys", json={"client_id": "c1"}, headers=operator
        )
        op_release = await http.post("/v1/clients/c1/release", headers=operator)

    for response in (create, release, users, audit, op_create):
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "ADMIN_FORBIDDEN"
    assert op_release.status_code == 200, op_release.text
    denied = [
        e for e in await admin.audit() if e.outcome == "denied" and e.actor == "vic"
    ]
    assert {e.action for e in denied} == {
        "POST /v1/keys",
        "POST /v1/clients/{client_id}/release",
    }, denied


async def test_releasing_no_such_client_is_404_and_leaves_nothing(
    admin: AdminHarness,
) -> None:
    """Regression: a release of a client id no key was issued to and the
    gateway never saw answered 200 ``was_blocked: false`` and left a release
    marker and a history entry behind."""
    from gateway.store import redis_from_settings

    await admin.add_user("otto", "operator")
    await admin.context.keys.create("has-a-key")
    async with admin.client() as http:
        operator = await admin.session(http, "otto")
        missing = await http.post("/v1/clients/nobody/release", headers=operator)
        keyed = await http.post("/v1/clients/has-a-key/release", headers=operator)

    assert missing.status_code == 404, missing.text
    assert missing.json()["code"] == "NOT_FOUND"
    assert keyed.status_code == 200, keyed.text
    assert keyed.json() == {"client_id": "has-a-key", "was_blocked": False}
    redis = redis_from_settings(admin.settings)
    try:
        clients = admin.context.clients
        assert await redis.exists(clients.released_key("nobody")) == 0
        assert await redis.exists(clients.key("nobody", "history")) == 0
        assert await redis.exists(clients.released_key("has-a-key")) == 1
    finally:
        await redis.aclose()
    releases = [
        e
        for e in await admin.audit()
        if e.action == "POST /v1/clients/{client_id}/release"
    ]
    outcomes = {e.target: (e.outcome, e.detail) for e in releases}
    assert len(releases) == 2, releases
    assert outcomes["nobody"] == ("failed", {"reason": "no such client"})
    assert outcomes["has-a-key"][0] == "ok"


async def test_sessions_expire_and_can_be_revoked(make_admin: Factory) -> None:
    async with make_admin(session_ttl_s=1.0) as admin:
        await admin.add_user("erin", "admin")
        async with admin.client() as http:
            first = await admin.session(http, "erin")
            second = await admin.session(http, "erin")
            listed = (await http.get("/v1/sessions", headers=first)).json()
            assert len(listed) == 2, listed
            me = (await http.get("/v1/sessions/me", headers=first)).json()
            other_sid = next(
                s["session_id"] for s in listed if s["session_id"] != me["session_id"]
            )

            # Revoking one session ends it, and only it.
            gone = await http.delete(f"/v1/sessions/{other_sid}", headers=first)
            assert gone.status_code == 204, gone.text
            assert (
                await http.get("/v1/sessions/me", headers=second)
            ).status_code == 401
            assert (await http.get("/v1/sessions/me", headers=first)).status_code == 200

            # Logout ends the caller's own session.
            assert (
                await http.delete("/v1/sessions/current", headers=first)
            ).status_code == 204
            assert (await http.get("/v1/sessions/me", headers=first)).status_code == 401

            # A session dies by itself after session_ttl_s.
            third = await admin.session(http, "erin")
            deadline = time.monotonic() + 5
            while (await http.get("/v1/sessions/me", headers=third)).status_code == 200:
                assert time.monotonic() < deadline, "session never expired"
                await asyncio.sleep(0.1)
        actions = [e.action for e in await admin.audit() if e.actor == "erin"]
        assert "logout" in actions and "DELETE /v1/sessions/{session_id}" in actions


async def test_key_is_shown_once_and_never_stored_or_logged(
    admin: AdminHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await admin.add_user("root", "admin")
    async with admin.client() as http:
        headers = await admin.session(http, "root")
        created = await http.post(
            "/v1/keys",
            json={"client_id": "client-7", "models": ["digits"], "ttl_s": 3600},
            headers=headers,
        )
        listing = await http.get("/v1/keys", headers=headers)
        revoked = await http.delete(
            f"/v1/keys/{created.json()['key_id']}", headers=headers
        )
        again = await http.delete(
            f"/v1/keys/{created.json()['key_id']}", headers=headers
        )
        unknown = await http.delete("/v1/keys/mgk_000000000000", headers=headers)

    assert created.status_code == 201, created.text
    assert created.headers["Cache-Control"] == "no-store"
    body = created.json()
    token = body["token"]
    key_id, secret = KeyStore.parse_token(token)
    assert key_id == body["key_id"] and body["models"] == ["digits"]
    assert body["expires_ms"] is not None

    # Listed without any secret; revoked once (the second time it is already).
    assert listing.status_code == 200
    assert token not in listing.text and "secret" not in listing.text
    assert revoked.status_code == 204, revoked.text
    assert again.status_code == 204 and unknown.status_code == 404

    # Not in Redis in plain form (raw or base64), not in any log record.
    stored = await dump_prefix(admin.settings)
    encoded = token.split(".", 1)[1].encode()
    assert secret not in stored and encoded not in stored
    assert base64.b64encode(secret) not in stored
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert token.split(".", 1)[1] not in logged
    assert body["key_id"] in logged  # the key id is logged, its secret is not
    audit = [e for e in await admin.audit() if e.target == body["key_id"]]
    assert [e.action for e in audit] == [
        "DELETE /v1/keys/{key_id}",
        "DELETE /v1/keys/{key_id}",
        "POST /v1/keys",
    ]
    assert all(token not in str(e) for e in audit)


async def test_user_management(admin: AdminHarness) -> None:
    await admin.add_user("root", "admin")
    async with admin.client() as http:
        headers = await admin.session(http, "root")
        created = await http.post(
            "/v1/users",
            json={"name": "fay", "role": "viewer", "password": PASSWORD},
            headers=headers,
        )
        dup = await http.post(
            "/v1/users",
            json={"name": "fay", "role": "viewer", "password": PASSWORD},
            headers=headers,
        )
        short = await http.post(
            "/v1/users",
            json={"name": "gus", "role": "viewer", "password": "short"},
            headers=headers,
        )
        assert created.status_code == 201, created.text
        enrollment = created.json()
        assert enrollment["provisioning_uri"].startswith("otpauth://totp/")
        assert enrollment["qr_svg_data_uri"].startswith("data:image/svg+xml")
        assert enrollment["user"] == {
            "name": "fay",
            "role": "viewer",
            "enrolled": False,
            "created_ms": enrollment["user"]["created_ms"],
        }
        assert dup.status_code == 409 and short.status_code == 422, short.text
        assert short.json()["code"] == "SCHEMA_INVALID"

        # The new user logs in with the code from its enrollment.
        admin.uris["fay"] = enrollment["provisioning_uri"]
        fay = await admin.session(http, "fay")
        promote = await http.patch(
            "/v1/users/fay", json={"role": "operator"}, headers=headers
        )
        assert promote.json()["role"] == "operator" and promote.json()["enrolled"]
        # The role is read per call: the live session has it at once.
        assert (await http.get("/v1/sessions/me", headers=fay)).json()[
            "role"
        ] == "operator"

        last = await http.patch(
            "/v1/users/root", json={"role": "viewer"}, headers=headers
        )
        assert last.status_code == 409, last.text
        delete = await http.delete("/v1/users/fay", headers=headers)
        assert delete.status_code == 204
        assert (await http.get("/v1/sessions/me", headers=fay)).status_code == 401

    actions = {(e.action, e.target, e.outcome) for e in await admin.audit()}
    assert ("POST /v1/users", "fay", "ok") in actions
    assert ("PATCH /v1/users/{name}", "fay", "ok") in actions
    assert ("DELETE /v1/users/{name}", "fay", "ok") in actions
    assert ("PATCH /v1/users/{name}", "root", "failed") in actions


async def test_extra_routers_need_an_operator(
    stack: StackInfo, models_dir: Path
) -> None:
    """The mount point left for other features' routers (live config)."""
    router = APIRouter(prefix="/v1/config")

    @router.put("")
    async def put_config() -> dict[str, str]:
        return {"status": "applied"}

    settings = isolated_settings(
        stack.kafka_bootstrap, stack.redis_url, models_dir, admin=FAST_HASH
    )
    clock = StepClock()
    app = create_app(settings, extra_routers=[router], clock=clock)
    try:
        async with app.router.lifespan_context(app):
            admin = AdminHarness(settings, app, clock)
            await admin.add_user("vic", "viewer")
            await admin.add_user("otto", "operator")
            async with admin.client() as http:
                viewer = await admin.session(http, "vic")
                operator = await admin.session(http, "otto")
                anonymous = await http.put("/v1/config")
                refused = await http.put("/v1/config", headers=viewer)
                applied = await http.put("/v1/config", headers=operator)
    finally:
        await delete_prefix(settings)
    assert anonymous.status_code == 401 and refused.status_code == 403
    assert applied.json() == {"status": "applied"}
    assert "/v1/config" in app.openapi()["paths"]
