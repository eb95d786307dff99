"""Admin commands: ``modelgate admin user add|serve``, ``modelgate admin
audit``, ``modelgate login`` and ``modelgate clients top|show|release``.

``admin user add`` is the host-level bootstrap: it writes to Redis directly
with the server key, so it works before any admin exists and only where the
server key is readable. Everything else goes through the admin API with the
session ``modelgate login`` saved (mode 0600). Heavy imports (FastAPI,
argon2, httpx) happen inside the commands so ``modelgate --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli_common import ConfigOption, load_cli_settings

admin_app = typer.Typer(help="The admin plane: admin users and the admin API.")
user_app = typer.Typer(help="Admin users (host-level: needs Redis and the server key).")
admin_app.add_typer(user_app, name="user")
clients_app = typer.Typer(
    help="Riskiest clients now, one client's record, and release (via the admin API)."
)

DEFAULT_SESSION_FILE = Path.home() / ".config" / "modelgate" / "session.json"
SessionFile = Annotated[
    Path,
    typer.Option(
        "--session-file",
        envvar="MODELGATE_SESSION_FILE",
        help="Where modelgate login keeps the session (mode 0600).",
    ),
]
_HTTP_TIMEOUT_S = 10.0


def _settings(config: Path | None) -> Any:
    return load_cli_settings(config)


def _fail(code: str, message: str, exit_code: int = 1) -> typer.Exit:
    typer.echo(f"error [{code}]: {message}", err=True)
    return typer.Exit(exit_code)


def _read_secret(prompt: str, from_stdin: bool, confirm: bool = False) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    value: str = typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    return value


# -- admin user add / admin serve -----------------------------------------------


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="User name ([a-z][a-z0-9._-]*).")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    password_stdin: Annotated[
        bool, typer.Option(help="Read the password from stdin instead of a prompt.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Create an admin user; prints its TOTP provisioning URI and QR code once.

    The password is read from a prompt (or stdin), never from an argument, so
    it stays out of shell history and the process list.
    """
    import asyncio

    from gateway.admin.users import UserStore, check_password
    from gateway.errors import ModelgateError
    from gateway.keys import load_server_key
    from gateway.store import redis_from_settings

    settings = _settings(config)
    password = _read_secret("Password", password_stdin, confirm=True)
    try:
        check_password(password)
    except ValueError as exc:
        raise _fail("BAD_ARGUMENT", str(exc), 2) from None

    async def create() -> Any:
        server_key = await asyncio.to_thread(load_server_key, settings)
        redis = redis_from_settings(settings)
        try:
            store = UserStore(redis, settings, server_key)
            return await store.create(name, role, password)  # type: ignore[arg-type]  # checked by create
        finally:
            await redis.aclose()

    try:
        enrollment = asyncio.run(create())
    except FileExistsError:
        raise _fail("CONFLICT", f"user {name} exists") from None
    except ValueError as exc:
        raise _fail("BAD_ARGUMENT", str(exc), 2) from None
    except ModelgateError as exc:
        raise _fail(exc.code, exc.message) from None

    typer.echo(f"created {enrollment.user.name} ({enrollment.user.role})")
    typer.echo("Scan this with an authenticator app (shown once):")
    typer.echo(enrollment.qr_terminal())
    typer.echo(f"or enter this URI: {enrollment.uri}")
    typer.echo("The first login with a valid code confirms the enrollment.")


@admin_app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Else admin.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Else admin.port.")] = None,
    config: ConfigOption = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Run the admin API (loopback by default) until Ctrl-C. Prometheus
    metrics are on ``admin.metrics_host:metrics_port`` (0: none), never on
    the API's port."""
    import uvicorn

    from gateway import logs
    from gateway.admin.app import create_app
    from gateway.admin.http_server import server_options
    from gateway.errors import ModelgateError

    logs.configure(log_level)
    settings = _settings(config)
    app = create_app(settings)
    api_port = settings.admin.port if port is None else port
    metrics = app.state.metrics
    try:
        # Before the API takes its port, so that a taken metrics port fails
        # the command at once rather than after the API is up.
        metrics.serve(
            settings.admin.metrics_host, settings.admin.metrics_port, beside=api_port
        )
    except ModelgateError as exc:
        raise _fail(exc.code, exc.message, 2) from None
    try:
        uvicorn.run(
            app,
            host=host or settings.admin.host,
            port=api_port,
            log_config=None,
            access_log=False,
            **uvicorn_proxy_options(settings),
            **server_options(),
        )
    finally:
        metrics.close()


def uvicorn_proxy_options(settings: Any) -> dict[str, Any]:
    """How uvicorn treats ``X-Forwarded-For`` for the admin API.

    uvicorn believes the header from 127.0.0.1 unless told otherwise, and the
    admin API listens on loopback: every local caller could then name any
    source it liked, and the per-source login limit and the audit log's
    source would count what the caller wrote. Only ``admin.trusted_proxies``
    are believed; with none, the header is ignored.
    """
    trusted = list(settings.admin.trusted_proxies)
    if not trusted:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": trusted}


# -- login -------------------------------------------------------------------------


def _default_url(settings: Any) -> str:
    host = settings.admin.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.admin.port}"


def login(
    user: Annotated[str, typer.Option("--user", "-u", help="Admin user name.")],
    url: Annotated[
        str | None, typer.Option(help="Admin API URL (else admin.host/port).")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option(help="Read the password from stdin instead of a prompt.")
    ] = False,
    code: Annotated[str | None, typer.Option(help="TOTP code (else prompted).")] = None,
    session_file: SessionFile = DEFAULT_SESSION_FILE,
    config: ConfigOption = None,
) -> None:
    """Log in to the admin API with password and TOTP code; saves the session."""
    base = url or _default_url(_settings(config))
    password = _read_secret("Password", password_stdin)
    if code is None:
        code = str(typer.prompt("TOTP code")).strip()
    body = _call(
        "POST",
        base,
        "/v1/sessions",
        None,
        json_body={"user": user, "password": password, "code": code},
    )
    _save_session(session_file, {"url": base, **body})
    expires = time.strftime("%H:%M:%S", time.localtime(body["expires_ms"] / 1000))
    typer.echo(f"logged in as {body['user']} ({body['role']}) until {expires}")


def _save_session(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # An existing file keeps its old mode through O_CREAT; force 0600.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)


def _load_session(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        raise _fail(
            "ADMIN_UNAUTHENTICATED", "no saved session; run modelgate login"
        ) from None
    return data


def _call(
    method: str,
    base: str,
    path: str,
    token: str | None,
    *,
    json_body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(
            method,
            base.rstrip("/") + path,
            json=json_body,
            params=params,
            headers=headers,
            timeout=_HTTP_TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        raise _fail("ADMIN_UNREACHABLE", f"{base}: {exc}") from None
    if response.status_code >= 400:
        try:
            error = response.json()
            code, message = error["code"], error["error"]
        except (ValueError, KeyError, TypeError):
            code, message = "HTTP_ERROR", f"HTTP {response.status_code}"
        if code == "ADMIN_UNAUTHENTICATED" and token:
            message += " (run modelgate login)"
        raise _fail(code, message)
    return response.json() if response.content else None


def _session_call(session_file: Path, method: str, path: str, **kwargs: Any) -> Any:
    session = _load_session(session_file)
    return _call(method, session["url"], path, session.get("token"), **kwargs)


# -- audit -------------------------------------------------------------------------


@admin_app.command("audit")
def audit(
    limit: Annotated[
        int, typer.Option(min=1, max=1000, help="How many of the newest entries.")
    ] = 100,
    from_kafka: Annotated[
        bool,
        typer.Option(
            "--from-kafka",
            help="Read kafka.topics.audit straight from the broker (no session; "
            "needs Kafka access) instead of the API's Redis stream.",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check the hash chain and signatures of every entry (the Redis "
            "stream read directly, or with --from-kafka the whole topic) "
            "under admin.audit_key and admin.audit_retired_keys; exit 1 naming "
            "the first broken entry.",
        ),
    ] = False,
    session_file: SessionFile = DEFAULT_SESSION_FILE,
    config: ConfigOption = None,
) -> None:
    """Print audit entries as JSON lines: by default the newest from the admin
    API (admin role, newest first); with --from-kafka the audit topic's,
    oldest first, each with its partition, offset and key. With --verify,
    check the entries' chain instead (host-level: needs Redis or Kafka
    access and the key)."""
    if verify:
        _verify(_settings(config), from_kafka)
        return
    if not from_kafka:
        rows = _session_call(session_file, "GET", "/v1/audit", params={"limit": limit})
        for row in rows:
            typer.echo(json.dumps(row, sort_keys=True))
        return

    import asyncio

    from gateway.admin.audit_topic import read_topic
    from gateway.errors import ModelgateError

    settings = _settings(config)
    try:
        records = asyncio.run(read_topic(settings, limit=limit))
    except ModelgateError as exc:
        raise _fail(exc.code, exc.message) from None
    # Oldest first across partitions: ts_ms, then the stream id's order.
    records.sort(key=lambda r: (_int(r.entry.get("ts_ms")), _stream_order(r.entry)))
    for record in records[-limit:]:
        typer.echo(
            json.dumps(
                {
                    "partition": record.partition,
                    "offset": record.offset,
                    "key": record.key,
                    **record.entry,
                },
                sort_keys=True,
            )
        )


def _verify(settings: Any, from_kafka: bool) -> None:
    """``admin audit --verify``: read every entry, oldest first, and check
    the chain (gateway/admin/audit_chain.py) under the current and retired
    keys; exit 1 with the first broken entry's code. The Redis stream is read
    a page at a time (memory bounded by the page, whatever its length); the
    topic is read whole, to drop its copies."""
    import asyncio

    from gateway.admin.audit import audit_keys
    from gateway.admin.audit_chain import verify
    from gateway.admin.audit_topic import read_topic
    from gateway.errors import ModelgateError

    keys = audit_keys(settings)
    if not keys:
        typer.echo(
            "warning: admin.audit_key is unset: checking hashes and links only; "
            "a writer who recomputed them would not be seen",
            err=True,
        )

    async def from_topic() -> Any:
        return verify(topic_entries(await read_topic(settings)), keys)

    try:
        verdict = asyncio.run(
            from_topic() if from_kafka else verify_stream(settings, keys)
        )
    except ModelgateError as exc:
        raise _fail(exc.code, exc.message) from None
    except _CopyMismatch as exc:
        raise _fail("AUDIT_ENTRY_ALTERED", str(exc)) from None
    if verdict.code is not None:
        raise _fail(verdict.code, verdict.message)
    typer.echo(verdict.message)


async def verify_stream(settings: Any, keys: list[bytes], page: int = 1000) -> Any:
    """The verdict on the Redis audit stream, read ``page`` entries at a
    time and checked as they come, stopping at the first broken entry.

    Raises
    ------
    StoreError
        Redis could not be reached.
    """
    from gateway.admin.audit import AuditLog
    from gateway.admin.audit_chain import ChainVerifier
    from gateway.store import redis_from_settings

    verifier = ChainVerifier(keys)
    redis = redis_from_settings(settings)
    try:
        async for entries in AuditLog(redis, settings).pages(page):
            for entry in entries:
                broken = verifier.feed(entry.chained())
                if broken is not None:
                    return broken
    finally:
        await redis.aclose()
    return verifier.result()


class _CopyMismatch(Exception):
    """Two records of one entry_id on the topic that differ."""


def topic_entries(records: list[Any]) -> list[Any]:
    """The audit topic's records as chain entries, oldest first, one per
    ``entry_id`` (a re-sent entry is on the topic more than once).

    Raises
    ------
    _CopyMismatch
        Two records share an ``entry_id`` but not their content.
    """
    from gateway.admin.audit_chain import Chained

    by_id: dict[str, Chained] = {}
    for record in records:
        raw = record.entry
        detail = raw.get("detail")
        entry = Chained(
            entry_id=str(raw.get("entry_id", "")),
            seq=_int(raw.get("seq")),
            prev=str(raw.get("prev", "")),
            hash=str(raw.get("hash", "")),
            mac=str(raw.get("mac", "")),
            kid=str(raw.get("kid", "")),
            ts_ms=_int(raw.get("ts_ms")),
            actor=str(raw.get("actor", "")),
            action=str(raw.get("action", "")),
            target=str(raw.get("target", "")),
            source=str(raw.get("source", "")),
            outcome=str(raw.get("outcome", "")),
            detail=(
                {str(k): str(v) for k, v in detail.items()}
                if isinstance(detail, dict)
                else {}
            ),
        )
        seen = by_id.setdefault(entry.entry_id, entry)
        if seen != entry:
            raise _CopyMismatch(
                f"entry {entry.entry_id}: two records on the topic differ "
                f"(partition {record.partition}, offset {record.offset})"
            )
    return sorted(by_id.values(), key=lambda e: _stream_order({"entry_id": e.entry_id}))


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _stream_order(entry: dict[str, object]) -> tuple[int, int]:
    """A stream id (``ms-seq``) as numbers, so ``10-0`` follows ``9-0``."""
    ms, _, seq = str(entry.get("entry_id", "")).partition("-")
    return (int(ms), int(seq)) if ms.isdigit() and seq.isdigit() else (0, 0)


# -- clients -----------------------------------------------------------------------


def _ago(ts_ms: int) -> str:
    seconds = max(0.0, time.time() - ts_ms / 1000)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


@clients_app.command("top")
def clients_top(
    limit: Annotated[int, typer.Option(help="How many clients.")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    session_file: SessionFile = DEFAULT_SESSION_FILE,
) -> None:
    """The riskiest clients now (latest risk, highest first)."""
    rows = _session_call(
        session_file, "GET", "/v1/clients/top", params={"limit": limit}
    )
    if as_json:
        typer.echo(json.dumps(rows))
        return
    typer.echo(f"{'client':<32} {'risk':>6}  {'action':<9} {'seen':<9} scores")
    for row in rows:
        scores = " ".join(f"{k}={v:.3g}" for k, v in sorted(row["scores"].items()))
        typer.echo(
            f"{row['client_id']:<32} {row['risk']:>6.2f}  {row['action']:<9} "
            f"{_ago(row['ts_ms']):<9} {scores}"
        )


@clients_app.command("show")
def clients_show(
    client_id: Annotated[str, typer.Argument(help="The client id.")],
    history: Annotated[int, typer.Option(help="History entries to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    session_file: SessionFile = DEFAULT_SESSION_FILE,
) -> None:
    """Counters, detector scores, evidence and actions over time of one client."""
    detail = _session_call(
        session_file, "GET", f"/v1/clients/{client_id}", params={"history": history}
    )
    if as_json:
        typer.echo(json.dumps(detail))
        return
    typer.echo(f"client {detail['client_id']}")
    counters = detail["counters"]
    typer.echo("  counters: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
    if detail["block_reason"] is not None:
        typer.echo(
            f"  BLOCKED ({counters['blocked_ms'] / 1000:.0f}s left): "
            f"{detail['block_reason']}"
        )
    summary = detail["summary"]
    if summary:
        typer.echo(
            f"  latest: risk {summary['risk']:.2f}, action {summary['action']}, "
            f"{_ago(summary['ts_ms'])}"
        )
        for name, score in sorted(summary["scores"].items()):
            typer.echo(f"    {name}: {score:.4g}")
    for line in detail["evidence"]:
        typer.echo(f"  evidence: {line}")
    typer.echo("  history (newest first):")
    for entry in detail["history"]:
        risk = entry.get("risk")
        risk_text = "-" if risk is None else f"{risk:.2f}"
        extra = f" by {entry['by']}" if "by" in entry else ""
        typer.echo(
            f"    {_ago(entry['ts_ms']):<9} {entry['action']:<9} "
            f"risk {risk_text}{extra}"
        )


@clients_app.command("release")
def clients_release(
    client_id: Annotated[str, typer.Argument(help="The client id.")],
    session_file: SessionFile = DEFAULT_SESSION_FILE,
) -> None:
    """Unblock a client now and reset its detector and policy state (operator)."""
    body = _session_call(session_file, "POST", f"/v1/clients/{client_id}/release")
    state = "was blocked, now released" if body["was_blocked"] else "was not blocked"
    typer.echo(f"{body['client_id']}: {state}; its state resets at its next batch")
