"""``/v1/users``: admin users (admin role only).

A new user, or one whose second factor is reset, gets a provisioning URI and
QR code in the response, once; the first login with a valid code confirms
the enrollment. The password is sent in the body over the admin API's own
transport (loopback by default) and only its Argon2 hash is stored.
"""

from __future__ import annotations

from typing import Annotated

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
from gateway.admin.schemas import (
    ERROR_RESPONSES,
    USERNAME_REGEX,
    Body,
    EnrollmentOut,
    ErrorBody,
    UserOut,
)
from gateway.admin.users import (
    MAX_PASSWORD_CHARS,
    MIN_PASSWORD_CHARS,
    Enrollment,
    Role,
    User,
)

router = APIRouter(
    prefix="/v1/users",
    tags=["users"],
    responses={
        **ERROR_RESPONSES,
        404: {"model": ErrorBody, "description": "NOT_FOUND"},
    },
)
Admin = Annotated[Principal, Depends(require_role("admin"))]
Context = Annotated[AdminContext, Depends(get_context)]
UserName = Annotated[str, Path(pattern=USERNAME_REGEX)]


class UserIn(Body):
    name: str = Field(pattern=USERNAME_REGEX)
    role: Role
    password: str = Field(min_length=MIN_PASSWORD_CHARS, max_length=MAX_PASSWORD_CHARS)


class RoleIn(Body):
    role: Role


def user_out(user: User) -> UserOut:
    return UserOut(
        name=user.name,
        role=user.role,
        enrolled=user.enrolled,
        created_ms=user.created_ms,
    )


def enrollment_out(enrollment: Enrollment) -> EnrollmentOut:
    return EnrollmentOut(
        user=user_out(enrollment.user),
        provisioning_uri=enrollment.uri,
        qr_svg_data_uri=enrollment.qr_svg_data_uri(),
    )


async def _admins(context: AdminContext) -> list[str]:
    return [u.name for u in await context.users.list() if u.role == "admin"]


@router.get("", response_model=list[UserOut], summary="List admin users")
async def list_users(_: Admin, context: Context) -> list[UserOut]:
    return [user_out(u) for u in await context.users.list()]


@router.post(
    "",
    status_code=201,
    response_model=EnrollmentOut,
    responses={409: {"model": ErrorBody, "description": "CONFLICT: name taken"}},
    summary="Create a user; returns its TOTP enrollment once",
)
async def create_user(
    body: UserIn,
    request: Request,
    response: Response,
    principal: Admin,
    context: Context,
) -> EnrollmentOut:
    try:
        enrollment: Enrollment | None = await context.users.create(
            body.name, body.role, body.password
        )
    except FileExistsError:
        enrollment = None
    if enrollment is None:
        await refuse(
            context,
            request,
            AdminError("a user of that name exists", code="CONFLICT"),
            actor=principal.user,
            target=body.name,
            reason="exists",
        )
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok",
        target=body.name,
        detail={"role": body.role},
    )
    response.headers["Cache-Control"] = "no-store"
    return enrollment_out(enrollment)


@router.patch(
    "/{name}",
    response_model=UserOut,
    responses={409: {"model": ErrorBody, "description": "CONFLICT: last admin"}},
    summary="Change a user's role",
)
async def set_role(
    name: UserName, body: RoleIn, request: Request, principal: Admin, context: Context
) -> UserOut:
    admins = await _admins(context)
    if body.role != "admin" and admins == [name]:
        await refuse(
            context,
            request,
            AdminError("the last admin cannot be demoted", code="CONFLICT"),
            actor=principal.user,
            target=name,
            reason="last admin",
        )
    if not await context.users.set_role(name, body.role):
        await refuse(
            context,
            request,
            AdminError("no such user", code="NOT_FOUND"),
            actor=principal.user,
            target=name,
            reason="not found",
        )
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok",
        target=name,
        detail={"role": body.role},
    )
    user = await context.users.get(name)
    if user is None:
        raise AdminError("no such user", code="NOT_FOUND")
    return user_out(user)


@router.delete(
    "/{name}",
    status_code=204,
    responses={409: {"model": ErrorBody, "description": "CONFLICT: last admin"}},
    summary="Delete a user and end its sessions",
)
async def delete_user(
    name: UserName, request: Request, principal: Admin, context: Context
) -> None:
    if await _admins(context) == [name]:
        await refuse(
            context,
            request,
            AdminError("the last admin cannot be deleted", code="CONFLICT"),
            actor=principal.user,
            target=name,
            reason="last admin",
        )
    deleted = await context.users.delete(name)
    ended = await context.sessions.revoke_all(name)
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok" if deleted else "failed",
        target=name,
        detail={"sessions_ended": str(ended)},
    )
    if not deleted:
        raise AdminError("no such user", code="NOT_FOUND")


@router.post(
    "/{name}/totp",
    response_model=EnrollmentOut,
    summary="Reset a user's second factor; returns the new enrollment once",
)
async def reset_totp(
    name: UserName,
    request: Request,
    response: Response,
    principal: Admin,
    context: Context,
) -> EnrollmentOut:
    enrollment = await context.users.reset_totp(name)
    if enrollment is None:
        await refuse(
            context,
            request,
            AdminError("no such user", code="NOT_FOUND"),
            actor=principal.user,
            target=name,
            reason="not found",
        )
    ended = await context.sessions.revoke_all(name)
    await audit(
        context,
        request,
        actor=principal.user,
        outcome="ok",
        target=name,
        detail={"sessions_ended": str(ended)},
    )
    response.headers["Cache-Control"] = "no-store"
    return enrollment_out(enrollment)
