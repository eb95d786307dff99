"""``/v1/keys``: client API keys. Listing needs viewer; creating and revoking
need admin.

The token is in the creation response only (``Cache-Control: no-store``);
Redis holds the secret Fernet-encrypted (``gateway.keys``), and neither the
audit log nor the logs ever see it. A revocation reaches every worker within
``auth.key_cache_ttl_s`` (1 s by default), the life of a worker's key cache.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import Field

from gateway.admin.deps import AdminContext, Principal, audit, get_context, require_role
from gateway.admin.errors import AdminError
from gateway.admin.schemas import (
    CLIENT_ID_REGEX,
    ERROR_RESPONSES,
    KEY_ID_REGEX,
    MODEL_REGEX,
    Body,
    ErrorBody,
    KeyOut,
)

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


class KeyCreated(Body):
    key_id: str
    client_id: str
    models: list[str]
    expires_ms: int | None
    token: str = Field(description="Shown once: '<key_id>.<secret>'.")


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
    try:
        key, token = await context.keys.create(
            body.client_id, models=body.models, ttl_s=body.ttl_s
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
        detail={"client": key.client_id, "models": ",".join(key.models) or "*"},
    )
    response.headers["Cache-Control"] = "no-store"
    return KeyCreated(
        key_id=key.key_id,
        client_id=key.client_id,
        models=list(key.models),
        expires_ms=key.expires_ms,
        token=token,
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
