"""``/v1/clients``: the riskiest clients now, one client's record, release.

Reads need viewer; release needs operator. The data comes from the view the
workers write once per batch (``gateway.clientview``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
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
from gateway.admin.schemas import (
    CLIENT_ID_REGEX,
    ERROR_RESPONSES,
    Body,
    ClientDetailOut,
    ClientSummaryOut,
    ErrorBody,
)
from gateway.clientview import ClientSummary

router = APIRouter(prefix="/v1/clients", tags=["clients"], responses=ERROR_RESPONSES)
Context = Annotated[AdminContext, Depends(get_context)]
Viewer = Annotated[Principal, Depends(require_role("viewer"))]
ClientId = Annotated[str, Path(pattern=CLIENT_ID_REGEX)]


class ReleaseOut(Body):
    client_id: str
    was_blocked: bool = Field(description="Whether a block was lifted.")


def _summary(s: ClientSummary) -> ClientSummaryOut:
    return ClientSummaryOut(
        client_id=s.client_id,
        risk=s.risk,
        action=s.action,
        ts_ms=s.ts_ms,
        scores=s.scores,
    )


@router.get("/top", response_model=list[ClientSummaryOut], summary="Riskiest clients")
async def top(
    _: Viewer,
    context: Context,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> list[ClientSummaryOut]:
    return [_summary(s) for s in await context.clients.top(limit)]


@router.get(
    "/{client_id}",
    response_model=ClientDetailOut,
    responses={404: {"model": ErrorBody, "description": "NOT_FOUND"}},
    summary="Counters, detector scores, evidence and actions over time",
)
async def show(
    client_id: ClientId,
    _: Viewer,
    context: Context,
    history: Annotated[int, Query(ge=1, le=10_000)] = 50,
) -> ClientDetailOut:
    detail = await context.clients.show(client_id, history)
    if detail is None:
        raise AdminError("nothing is known about this client", code="NOT_FOUND")
    return ClientDetailOut(
        client_id=detail.client_id,
        summary=_summary(detail.summary) if detail.summary else None,
        evidence=detail.evidence,
        evidence_ts_ms=detail.evidence_ts_ms,
        counters=detail.counters,
        block_reason=detail.block_reason,
        history=detail.history,
    )


async def _known(context: AdminContext, client_id: str) -> bool:
    """Whether ``client_id`` is a client: a key was issued to it (revoked and
    expired keys count: their client may still be blocked) or the gateway
    has seen it (view, history, counters or a block). The keys are asked
    only when the view knows nothing, and then through the key store's index
    by client: the cost is that client's keys, not every key record."""
    if await context.clients.show(client_id, 1) is not None:
        return True
    return bool(await context.keys.key_ids_of(client_id))


@router.post(
    "/{client_id}/release",
    response_model=ReleaseOut,
    responses={404: {"model": ErrorBody, "description": "NOT_FOUND"}},
    summary="Unblock a client and reset its detector and policy state",
)
async def release(
    client_id: ClientId,
    request: Request,
    principal: Annotated[Principal, Depends(require_role("operator"))],
    context: Context,
) -> ReleaseOut:
    # A release of a mistyped id would leave a marker and a history entry for
    # a client that does not exist and answer "was not blocked", which reads
    # as success.
    if not await _known(context, client_id):
        await refuse(
            context,
            request,
            AdminError("no such client", code="NOT_FOUND"),
            actor=principal.user,
            reason="no such client",
            target=client_id,
        )
    was_blocked = await context.clients.release(client_id, principal.user)
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok",
        target=client_id,
        detail={"was_blocked": str(was_blocked).lower()},
    )
    return ReleaseOut(client_id=client_id, was_blocked=was_blocked)
