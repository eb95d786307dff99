"""Dependencies shared by the routers: the ``FrontDoor`` and the API key.

Imports FastAPI and the front door's service; the routers import this.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers

from gateway.errors import AuthError
from gateway.frontdoor.errors import HTTP_STATUS
from gateway.frontdoor.schemas import ErrorResponse
from gateway.frontdoor.service import FrontDoor

# auto_error=False: a missing key is answered by the front door with its own
# code (AUTH_MISSING), not by FastAPI's default 403.
_bearer = HTTPBearer(
    auto_error=False,
    description="The token `modelgate keys create` printed: `<key_id>.<secret>`.",
)
_api_key = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="The same token, for clients that cannot set Authorization.",
)


def get_frontdoor(request: Request) -> FrontDoor:
    door: FrontDoor = request.app.state.frontdoor
    return door


def api_token(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_api_key)],
) -> str | None:
    """The presented token: ``Authorization: Bearer`` first, else ``X-API-Key``.

    OpenAPI only; :func:`token_of` is the check that runs (and refuses two
    different tokens)."""
    if bearer is not None and bearer.credentials:
        return bearer.credentials
    return header or None


def token_of(headers: Headers) -> str | None:
    """:func:`api_token` read straight from the headers, for checks that run
    before FastAPI resolves dependencies (the inference route's key check).
    The same rule: a ``Bearer`` credential first, else ``X-API-Key``.

    Raises
    ------
    AuthError
        ``AUTH_AMBIGUOUS`` (400) if either header appears more than once:
        which copy counts would be ours to guess, and a proxy in front may
        have read the other one. Also if a ``Bearer`` credential and an
        ``X-API-Key`` both arrive and differ, for the same reason; equal
        ones name one key and are accepted.
    """
    for name in ("authorization", "x-api-key"):
        if len(headers.getlist(name)) > 1:
            raise AuthError(
                f"the {name} header appears more than once; send one credential",
                code="AUTH_AMBIGUOUS",
            )
    scheme, credentials = get_authorization_scheme_param(headers.get("authorization"))
    header = headers.get("x-api-key") or None
    if scheme.lower() == "bearer" and credentials:
        if header is not None and header != credentials:
            raise AuthError(
                "Authorization and X-API-Key carry different credentials; send one",
                code="AUTH_AMBIGUOUS",
            )
        return credentials
    return header


Door = Annotated[FrontDoor, Depends(get_frontdoor)]
Token = Annotated[str | None, Depends(api_token)]


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` entries for these error statuses, each listing the
    codes that produce it."""
    out: dict[int | str, dict[str, object]] = {}
    for status in statuses:
        codes = sorted(c for c, s in HTTP_STATUS.items() if s == status)
        out[status] = {
            "model": ErrorResponse,
            "description": "Error; `code` is one of " + ", ".join(codes),
        }
    return out
