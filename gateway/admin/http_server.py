"""The admin API's limits on request size: heads over the front door's
:data:`~gateway.frontdoor.http_server.MAX_HEAD_BYTES` get ``431
HEADERS_TOO_LARGE`` and bodies over ``admin.max_body_bytes`` get ``413
PAYLOAD_TOO_LARGE``, both with the admin API's error body
``{"error", "code", "retriable"}``, instead of uvicorn's reset connection.

The machinery is the front door's (``gateway/frontdoor/http_server.py`` says
why plain uvicorn resets a client still sending its head); only the answer's
body differs. ``modelgate admin serve`` passes :func:`server_options` to
uvicorn, and ``create_app`` adds the shared body limit
(``gateway/http_body.py``) and the ASGI head check. Imports starlette and
the front door's HTTP pieces; nothing from Kafka or Redis.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from gateway.frontdoor.http_server import MAX_HEAD_BYTES, HeadLimitedH11

_HEAD_MESSAGE = (
    f"the request line and headers exceed {MAX_HEAD_BYTES} bytes; "
    "send the session token alone in Authorization: Bearer <token>"
)


def error_body(status: int, code: str, message: str) -> JSONResponse:
    """The admin API's refusal body (never retriable: these are the
    client's own request)."""
    return JSONResponse(
        status_code=status,
        content={"error": message, "code": code, "retriable": False},
    )


def head_refusal() -> Response:
    """The admin API's answer to a head over ``MAX_HEAD_BYTES``."""
    return error_body(431, "HEADERS_TOO_LARGE", _HEAD_MESSAGE)


class AdminHeadLimitedH11(HeadLimitedH11):
    """The front door's h11 protocol, answering with the admin error body."""

    def head_refusal(self) -> Response:
        return head_refusal()


def server_options() -> dict[str, Any]:
    """The ``uvicorn.run`` options of ``modelgate admin serve`` (and the
    tests' servers) that answer an oversize head instead of resetting."""
    return {
        "http": AdminHeadLimitedH11,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
    }
