"""``/v1/keys``: client API keys. Listing needs viewer; creating, revoking
and changing a key's limits plan need admin.

The token is in the creation response only (``Cache-Control: no-store``);
Redis holds the secret Fernet-encrypted (``gateway.keys``), and neither the
audit log nor the logs ever see it. A revocation reaches every worker within
``auth.key_cache_ttl_s`` (1 s by default), the life of a worker's key cache.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import Field

from gateway.admin.deps import (
    AdminContext,
    Principal,
    audit,
    get_context,
    refuse,
    require_role,
)
from gateway.admin.errors import AdminError
from gateway.admin.live import LiveConfigHandle
from gateway.admin.schemas import (
    CLIENT_ID_REGEX,
    ERROR_RESPONSES,
    KEY_ID_REGEX,
    MODEL_REGEX,
    PLAN_REGEX,
    Body,
    ErrorBody,
    KeyOut,
)
from gateway.config import PlanConfig
from gateway.errors import ModelgateError

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=ERROR_RESPONSES)
Context = Annotated[AdminContext, Depends(get_context)]
Model = Annotated[str, Field(pattern=MODEL_REGEX)]


class KeyIn(Body):
    client_id: str = Field(pattern=CLIENT_ID_REGEX)
    models: list[Model] = Field(
        default=[], max_length=64, description="Models the key may call; empty: all."
    )
    ttl_s: float | None = Field(
        default=None,
        gt=0,
        le=10 * 365 * 86_400,
        description="Lifetime; none: no expiry.",
    )
    plan: str = Field(
        default="default",
        pattern=PLAN_REGEX,
        description="Limits plan: 'default' or one the running configuration "
        "defines in limits.plans (else 422 UNKNOWN_PLAN).",
    )
    limit_overrides: PlanConfig | None = Field(
        default=None,
        description="Plan fields replacing the plan's for this key; only the "
        "fields given are stored.",
    )


class PlanIn(Body):
    plan: str = Field(
        pattern=PLAN_REGEX,
        description="Limits plan: 'default' or one the running configuration "
        "defines in limits.plans (else 422 UNKNOWN_PLAN).",
    )
    limit_overrides: PlanConfig | None = Field(
        default=None,
        description="Replaces the key's overrides; none: the plan as it is.",
    )


class KeyCreated(Body):
    key_id: str
    client_id: str
    models: list[str]
    expires_ms: int | None
    plan: str
    limit_overrides: dict[str, Any]
    token: str = Field(description="Shown once: '<key_id>.<secret>'.")


def _given(overrides: PlanConfig | None) -> dict[str, Any]:
    """The override fields the caller wrote, not the model's defaults (an
    unwritten ``rules=()`` must not wipe the plan's rules)."""
    if overrides is None:
        return {}
    given: dict[str, Any] = overrides.model_dump(mode="json", exclude_unset=True)
    return given


@router.get("", response_model=list[KeyOut], summary="List keys (never secrets)")
async def list_keys(
    _: Annotated[Principal, Depends(require_role("viewer"))], context: Context
) -> list[KeyOut]:
    return [KeyOut.model_validate(row) for row in await context.keys.list()]


@router.post(
    "",
    status_code=201,
    response_model=KeyCreated,
    summary="Create a key; its token is shown once",
)
async def create_key(
    body: KeyIn,
    request: Request,
    response: Response,
    principal: Annotated[Principal, Depends(require_role("admin"))],
    context: Context,
) -> KeyCreated:
    # Checked before anything is written: a key created on a mistyped plan
    # would run on the default plan unnoticed, as PUT .../plan refuses too.
    await _known_plan_or_refuse(request, context, principal, body.client_id, body.plan)
    overrides = _given(body.limit_overrides)
    try:
        key, token = await context.keys.create(
            body.client_id,
            models=body.models,
            ttl_s=body.ttl_s,
            plan=body.plan,
            limit_overrides=overrides,
        )
    except ValueError as exc:
        # The store's own checks, should they ever be stricter than the schema.
        raise AdminError(str(exc), code="SCHEMA_INVALID") from exc
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok",
        target=key.key_id,
        detail={
            "client": key.client_id,
            "models": ",".join(key.models) or "*",
            "plan": key.plan,
            "limit_overrides": key.limit_overrides,
        },
    )
    response.headers["Cache-Control"] = "no-store"
    return KeyCreated(
        key_id=key.key_id,
        client_id=key.client_id,
        models=list(key.models),
        expires_ms=key.expires_ms,
        plan=key.plan,
        limit_overrides=overrides,
        token=token,
    )


@router.put(
    "/{key_id}/plan",
    response_model=KeyOut,
    responses={404: {"model": ErrorBody, "description": "NOT_FOUND"}},
    summary="Change a key's limits plan and overrides (workers apply it within "
    "auth.key_cache_ttl_s)",
)
async def set_key_plan(
    key_id: Annotated[str, Path(pattern=KEY_ID_REGEX)],
    body: PlanIn,
    request: Request,
    principal: Annotated[Principal, Depends(require_role("admin"))],
    context: Context,
) -> KeyOut:
    await _known_plan_or_refuse(request, context, principal, key_id, body.plan)
    before = await context.keys.get(key_id)
    overrides = _given(body.limit_overrides)
    try:
        found = await context.keys.set_plan(key_id, body.plan, overrides)
    except ValueError as exc:
        raise AdminError(str(exc), code="SCHEMA_INVALID") from exc
    detail = {"plan": body.plan, "limit_overrides": json.dumps(overrides)}
    if before is not None:
        detail["plan_before"] = before.plan
        detail["limit_overrides_before"] = before.limit_overrides or "{}"
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok" if found else "failed",
        target=key_id,
        detail=detail,
    )
    if not found:
        raise AdminError("no such key", code="NOT_FOUND")
    for row in await context.keys.list():
        if row["key_id"] == key_id:
            return KeyOut.model_validate(row)
    # Revoked keys stay listed, so only a deletion racing this call lands here.
    raise AdminError("no such key", code="NOT_FOUND")


async def _known_plan_or_refuse(
    request: Request,
    context: AdminContext,
    principal: Principal,
    target: str,
    plan: str,
) -> None:
    """Refuse (audited, as failed, against ``target``: the key id, or the
    client id of a key being created) a plan the running configuration does
    not define, as ``modelgate keys create`` and ``set-plan`` do: a key naming
    no defined plan would silently run on the default plan, so a typo would
    go unseen.

    ``default`` is always known and needs no Kafka; any other name is looked
    up in the live configuration's newest version (``limits.plans``).

    Raises
    ------
    AdminError
        ``UNKNOWN_PLAN`` (422), or ``BROKER_UNAVAILABLE`` (503) when the
        configuration cannot be read.
    """
    if plan == "default":
        return
    handle: LiveConfigHandle = request.app.state.live_config
    try:
        service = await handle.get()
        _, document = await service.current()
    except AdminError as exc:
        await refuse(
            context, request, exc, actor=principal.user, reason=exc.code, target=target
        )
    except ModelgateError as exc:
        error = AdminError(
            f"the live configuration cannot be read: {exc.message}",
            code="BROKER_UNAVAILABLE",
        )
        await refuse(
            context,
            request,
            error,
            actor=principal.user,
            reason=exc.code,
            target=target,
        )
    plans = sorted({"default", *document.limits.plans})
    if plan not in plans:
        error = AdminError(
            f"no plan {plan!r} in the running configuration; the plans are: "
            f"{', '.join(plans)} (define it in limits.plans first)",
            code="UNKNOWN_PLAN",
        )
        await refuse(
            context,
            request,
            error,
            actor=principal.user,
            reason=f"unknown plan {plan}",
            target=target,
        )


@router.delete(
    "/{key_id}",
    status_code=204,
    responses={404: {"model": ErrorBody, "description": "NOT_FOUND"}},
    summary="Revoke a key (every worker refuses it within auth.key_cache_ttl_s)",
)
async def revoke_key(
    key_id: Annotated[str, Path(pattern=KEY_ID_REGEX)],
    request: Request,
    principal: Annotated[Principal, Depends(require_role("admin"))],
    context: Context,
) -> None:
    revoked = await context.keys.revoke(key_id)
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok" if revoked else "failed",
        target=key_id,
    )
    if not revoked:
        raise AdminError("no such key", code="NOT_FOUND")
