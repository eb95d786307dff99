"""``/v1/sessions``: log in with password and TOTP code, list and end sessions.

Login is one step (user, password and code in one request). A two-step login
would have to answer the password step on its own, which tells whoever holds
a stolen password that it is right; here every failure is the same 401, so a
password without the second factor yields neither a session nor a hint, and
no half-authenticated state lives on the server.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import Field

from gateway.admin.deps import (
    AdminContext,
    Principal,
    audit,
    client_source,
    get_context,
    refuse,
    require_role,
)
from gateway.admin.errors import AdminError
from gateway.admin.schemas import (
    ERROR_RESPONSES,
    SESSION_ID_REGEX,
    USERNAME_REGEX,
    Body,
    ErrorBody,
    SessionOut,
)
from gateway.admin.sessions import Session
from gateway.admin.users import ROLE_RANK, Role

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], responses=ERROR_RESPONSES)


class LoginIn(Body):
    user: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    code: str = Field(max_length=16, description="The current 6-digit TOTP code.")


class LoginOut(Body):
    token: str = Field(description="Send as 'Authorization: Bearer <token>'.")
    session_id: str
    user: str
    role: Role
    expires_ms: int


class WhoAmI(Body):
    user: str
    role: Role
    session_id: str
    source: str


def _out(session: Session) -> SessionOut:
    return SessionOut(
        session_id=session.session_id,
        user=session.user,
        created_ms=session.created_ms,
        expires_ms=session.expires_ms,
        source=session.source,
    )


@router.post(
    "",
    status_code=201,
    response_model=LoginOut,
    responses={429: {"model": ErrorBody, "description": "locked or rate limited"}},
    summary="Log in with password and TOTP code",
)
async def login(
    body: LoginIn,
    request: Request,
    response: Response,
    context: Annotated[AdminContext, Depends(get_context)],
) -> LoginOut:
    """Open a session. Every wrong password, wrong code or replayed code is the
    same ``ADMIN_UNAUTHENTICATED``; the audit log records which it was."""
    source = client_source(request)

    # Step: per-source limit, then the account lock, before any secret check.
    try:
        await context.guard.check_source(source)
        await context.guard.check_locked(body.user)
    except AdminError as exc:
        await audit(
            context,
            request,
            actor=body.user[:64],
            outcome="denied",
            action="login",
            detail={"reason": exc.code},
        )
        raise

    # Step: both factors.
    user, failure = await context.users.verify_login(
        body.user, body.password, body.code
    )
    if user is None:
        locked = await context.guard.record_failure(body.user)
        await audit(
            context,
            request,
            actor=body.user[:64],
            outcome="denied",
            action="login",
            detail={"reason": failure or "unknown", "locked": str(locked).lower()},
        )
        raise AdminError("invalid credentials", code="ADMIN_UNAUTHENTICATED")

    # Step: the session.
    await context.guard.record_success(user.name)
    token, session = await context.sessions.create(user.name, source)
    await audit(
        context,
        request,
        actor=user.name,
        outcome="ok",
        action="login",
        detail={"session": session.session_id},
    )
    response.headers["Cache-Control"] = "no-store"
    return LoginOut(
        token=token,
        session_id=session.session_id,
        user=user.name,
        role=user.role,
        expires_ms=session.expires_ms,
    )


@router.get("/me", response_model=WhoAmI, summary="The caller's session")
async def whoami(
    principal: Annotated[Principal, Depends(require_role("viewer"))],
) -> WhoAmI:
    return WhoAmI(
        user=principal.user,
        role=principal.role,
        session_id=principal.session_id,
        source=principal.source,
    )


@router.get("", response_model=list[SessionOut], summary="List live sessions")
async def list_sessions(
    principal: Annotated[Principal, Depends(require_role("viewer"))],
    context: Annotated[AdminContext, Depends(get_context)],
    user: Annotated[
        str | None,
        Query(pattern=USERNAME_REGEX, description="Another user's (admin only)."),
    ] = None,
) -> list[SessionOut]:
    target = user or principal.user
    if target != principal.user and ROLE_RANK[principal.role] < ROLE_RANK["admin"]:
        raise AdminError(
            "only an admin may list others' sessions", code="ADMIN_FORBIDDEN"
        )
    return [_out(s) for s in await context.sessions.list(target)]


@router.delete(
    "/current", status_code=204, summary="Log out (end the caller's session)"
)
async def logout(
    request: Request,
    principal: Annotated[Principal, Depends(require_role("viewer"))],
    context: Annotated[AdminContext, Depends(get_context)],
) -> None:
    await context.sessions.revoke(principal.user, principal.session_id)
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok",
        action="logout",
        target=principal.session_id,
    )


@router.delete(
    "/{session_id}",
    status_code=204,
    responses={404: {"model": ErrorBody, "description": "NOT_FOUND"}},
    summary="Revoke a session (one's own, or anyone's as admin)",
)
async def revoke_session(
    request: Request,
    session_id: Annotated[str, Path(pattern=SESSION_ID_REGEX)],
    principal: Annotated[Principal, Depends(require_role("viewer"))],
    context: Annotated[AdminContext, Depends(get_context)],
    user: Annotated[str | None, Query(pattern=USERNAME_REGEX)] = None,
) -> None:
    target = user or principal.user
    if target != principal.user and ROLE_RANK[principal.role] < ROLE_RANK["admin"]:
        await refuse(
            context,
            request,
            AdminError(
                "only an admin may revoke others' sessions", code="ADMIN_FORBIDDEN"
            ),
            actor=principal.user,
            outcome="denied",
            target=f"{target}/{session_id}",
            reason="not admin",
        )
    revoked = await context.sessions.revoke(target, session_id)
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok" if revoked else "failed",
        target=f"{target}/{session_id}",
    )
    if not revoked:
        raise AdminError("no such live session", code="NOT_FOUND")
