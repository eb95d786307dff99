"""A cap on HTTP request bodies, shared by the front door and the admin API.

``BodyLimit`` is plain ASGI middleware: it refuses a body over its limit
before any route, or FastAPI's JSON parsing, reads it whole. Each app gives
it the answer to send, in its own error format. Imports only starlette.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The two refusals, as HTTP statuses: the body is over the limit (413), or
# its Content-Length header is not a number (400).
TOO_LARGE = 413
BAD_LENGTH = 400


class BodyLimit:
    """Refuse request bodies over ``max_body_bytes``, judged on
    ``Content-Length`` when sent and on the bytes actually read otherwise.

    The body is read here, up to the limit, and replayed to the app, so that
    a chunked body without a length can never be read whole past the limit.

    Parameters
    ----------
    app
        The ASGI app behind it.
    max_body_bytes
        Largest body passed on.
    refuse
        The answer for a refusal, from its status (``TOO_LARGE`` or
        ``BAD_LENGTH``) and a message for a person.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        refuse: Callable[[int, str], Response],
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return

        # Step: the declared length, when there is one.
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._send(send, BAD_LENGTH, "bad Content-Length")
                    return
                if declared > self.max_body_bytes:
                    await self._too_large(send)
                    return

        # Step: the bytes themselves.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await self._send(
            send, TOO_LARGE, f"request body exceeds {self.max_body_bytes} bytes"
        )

    async def _send(self, send: Send, status: int, message: str) -> None:
        response = self.refuse(status, message)
        scope: Scope = {"type": "http"}

        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        await response(scope, no_body, send)
