"""The front door's HTTP/1.1 server: uvicorn's h11 protocol with an answered
limit on the size of a request head.

uvicorn hands request bytes to h11, which refuses a head (request line and
headers) still incomplete past ``h11_max_incomplete_event_size`` (16 KiB by
default) but only checks when it needs more bytes: a larger head that
arrives in one read (asyncio reads up to 256 KiB at once) is accepted, so the
limit depended on how the network cut the bytes. On a refusal uvicorn writes
a plain-text 400 and closes at once with the client's bytes unread, and the
kernel then resets the connection: a client still sending its head (an
``Authorization`` header of a few hundred KiB) gets a reset and no answer.

Here the limit is :data:`MAX_HEAD_BYTES` whatever the reads: h11 refuses a
head still incomplete past it (:class:`HeadLimitedH11`) and :class:`HeadLimit`
refuses a complete head over it. Both answer ``431 HEADERS_TOO_LARGE`` with
the contract's JSON error body, and the protocol reads and drops what the
client still sends for a while (a "lingering close", as nginx does) so that
the answer reaches it. Other malformed HTTP keeps uvicorn's plain-text 400,
now also delivered before the close.

Known shortcoming: :class:`HeadLimitedH11` overrides
``H11Protocol.send_400_response``, which is uvicorn's internal, not an API
(uvicorn has no hook for its refusals); the version is pinned in
``requirements.lock``, and a uvicorn upgrade must pass
``tests/integration/test_frontdoor_attack.py`` again.

This module imports uvicorn, h11, starlette's types and the front door's
error table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import h11
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.frontdoor.errors import error_response

logger = logging.getLogger(__name__)

# 64 KiB: four times h11's own default and above any real token (ours are 61
# characters), yet small enough that a client cannot make the server buffer
# much per connection. nginx's default is 4 buffers of 8 KiB per header line.
MAX_HEAD_BYTES = 64 * 1024
# How long, and how many bytes, a refused connection is read and dropped so
# that the client's send completes and it reads the answer. Bounded so that a
# client cannot hold the connection open by sending forever.
LINGER_S = 5.0
LINGER_MAX_BYTES = 8 * 1024 * 1024

_TOO_LARGE_MESSAGE = (
    f"the request line and headers exceed {MAX_HEAD_BYTES} bytes; "
    "send the API key token alone in Authorization: Bearer <token>"
)


def head_refusal() -> Response:
    """The front door's answer to a head over :data:`MAX_HEAD_BYTES`."""
    return error_response("HEADERS_TOO_LARGE", _TOO_LARGE_MESSAGE, False)


def server_options() -> dict[str, Any]:
    """The ``uvicorn.Config`` options that give the front door this module's
    limit (``modelgate frontdoor serve`` and the tests' servers use them)."""
    return {"http": HeadLimitedH11, "h11_max_incomplete_event_size": MAX_HEAD_BYTES}


class HeadLimitedH11(H11Protocol):
    """uvicorn's h11 protocol whose refusals reach the client.

    A head h11 finds too long gets ``431 HEADERS_TOO_LARGE`` as a JSON error
    body; any other malformed request uvicorn's plain-text 400. Either way
    the connection then drops what the client still sends, for at most
    :data:`LINGER_S` seconds and :data:`LINGER_MAX_BYTES` bytes, and closes.
    Another app gives its own error body by overriding :meth:`head_refusal`
    (the admin API does, gateway/admin/http_server.py).
    """

    def head_refusal(self) -> Response:
        """The JSON answer to a head over :data:`MAX_HEAD_BYTES`."""
        return head_refusal()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lingering = False
        self._dropped_bytes = 0
        self._linger_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)
            return
        self._dropped_bytes += len(data)
        if self._dropped_bytes > LINGER_MAX_BYTES:
            self.transport.close()

    def eof_received(self) -> None:
        # The client is done sending; if it was refused, it has our answer.
        if self._lingering:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # h11 keeps the bytes it could not parse; more than the limit of them
        # is its "receive buffer too long", the only refusal of that size.
        if len(self.conn.trailing_data[0]) > MAX_HEAD_BYTES:
            answer = self.head_refusal()
            status = answer.status_code
            content_type = b"application/json"
            body = bytes(answer.body)
            logger.info(
                "refused a request head over %d bytes",
                MAX_HEAD_BYTES,
                extra={"client": self.client[0] if self.client else None},
            )
        else:
            status = 400
            content_type = b"text/plain; charset=utf-8"
            body = msg.encode("ascii")
            logger.info("refused a malformed HTTP request: %s", msg)
        # A length, so the client knows the answer is whole without waiting
        # for the close, which lingers.
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=status, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")

        # Step: a lingering close. Closing now, with the client's bytes
        # unread, makes the kernel reset the connection, and the client
        # would see the reset instead of the answer.
        self._lingering = True
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)
        if self.transport.can_write_eof():
            # Our half is done: a client reading to the end sees it now.
            self.transport.write_eof()


class HeadLimit:
    """Refuse a request whose head is over :data:`MAX_HEAD_BYTES` with 431.

    For heads h11 parsed whole because they arrived in one read; the ones
    that did not are refused by :class:`HeadLimitedH11` with the same answer.
    The size counted is that of the request line and every header line.
    ``refusal`` makes the answer (default: the front door's error body).
    """

    def __init__(
        self, app: ASGIApp, refusal: Callable[[], Response] = head_refusal
    ) -> None:
        self.app = app
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _head_bytes(scope) > MAX_HEAD_BYTES:
            logger.info(
                "refused a request head over %d bytes",
                MAX_HEAD_BYTES,
                extra={"client": (scope.get("client") or (None,))[0]},
            )
            response = self.refusal()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _head_bytes(scope: Scope) -> int:
    """Size of the request line and header lines of ``scope``, as sent."""
    # "METHOD target HTTP/1.1\r\n" and "name: value\r\n" per header.
    line = len(scope["method"]) + len(scope.get("raw_path") or b"") + 12
    line += len(scope.get("query_string") or b"") + 1
    return line + sum(len(n) + len(v) + 4 for n, v in scope.get("headers", ()))
