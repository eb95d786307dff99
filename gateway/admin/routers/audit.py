"""``/v1/audit``: read the admin audit log, newest first (admin role)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from gateway.admin.deps import AdminContext, Principal, get_context, require_role
from gateway.admin.schemas import ERROR_RESPONSES, AuditEntryOut

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=ERROR_RESPONSES)


@router.get("", response_model=list[AuditEntryOut], summary="Newest audit entries")
async def read_audit(
    _: Annotated[Principal, Depends(require_role("admin"))],
    context: Annotated[AdminContext, Depends(get_context)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        str | None,
        Query(pattern=r"^[0-9]{1,19}-[0-9]{1,19}$", description="Older than this id."),
    ] = None,
) -> list[AuditEntryOut]:
    entries = await context.audit.read(limit, before)
    return [
        AuditEntryOut(
            entry_id=e.entry_id,
            ts_ms=e.ts_ms,
            actor=e.actor,
            action=e.action,
            target=e.target,
            source=e.source,
            outcome=e.outcome,
            detail=e.detail,
            seq=e.seq,
            prev=e.prev,
            hash=e.hash,
            mac=e.mac,
            kid=e.kid,
        )
        for e in entries
    ]
