"""The HTTP transport: Open Inference Protocol v2 REST against the front door.

What this transport assumes of the front door (``docs/client.md`` lists the
same):

* ``POST {base_url}/v2/models/{model}/infer`` with a JSON body
  ``{"id": <request id>, "inputs": [<OIP tensor>, ...]}``; the API key token
  in ``Authorization: Bearer <token>``. A retry sends the same ``id``.
* Success is HTTP 200 with ``{"id", "model_name", "model_version",
  "outputs": [<OIP tensor>, ...], "parameters": {"action": ...}}``.
* Any other status carries ``{"error": <message>, "code": <STABLE_CODE>,
  "retriable": <bool>}``; ``Retry-After`` (delta seconds or an HTTP date)
  when waiting helps. A body without a ``code`` (a proxy's 502 page) maps by
  status: 429 is ``RATE_LIMITED``, other codes become ``HTTP_<status>``,
  retriable for 502, 503 and 504.
* Rate information, when present, in ``RateLimit-Policy``/``RateLimit``
  headers (``"name";q=<limit>;w=<window s>`` and ``"name";r=<remaining>;
  t=<reset s>``), or the older ``RateLimit-Limit``, ``RateLimit-Remaining``
  and ``RateLimit-Reset`` (also with an ``X-`` prefix).
* ``parameters.replayed`` (true for a kept answer sent again to a retry) and
  ``parameters.degrade`` (the degrade level) when the front door sets them.

This module imports httpx, numpy and the client's own modules; no Kafka.
"""

from __future__ import annotations

import email.utils
import logging
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from modelgate.errors import (
    BadResponseError,
    ConnectionFailedError,
    GatewayError,
    RequestTimeoutError,
    error_for,
)
from modelgate.results import InferResult, RateInfo, array_from_tensor, tensor_dict
from modelgate.tokens import split_token

logger = logging.getLogger(__name__)

_RETRIABLE_STATUSES = frozenset({502, 503, 504})
_PARAM = re.compile(r"([A-Za-z][A-Za-z0-9_-]*)\s*=\s*\"?([0-9.]+)\"?")
# Longest error message kept from a body that is not ours (an HTML page).
_MAX_FOREIGN_TEXT = 200


class HttpTransport:
    """Pooled HTTP connections to one front door, for one API key.

    Parameters
    ----------
    base_url
        The front door, e.g. ``http://127.0.0.1:8080``.
    token
        The API key token ``modelgate keys create`` printed.
    connect_timeout_s
        Bound on opening a connection (each attempt also has its own
        overall timeout, passed to ``infer``).
    max_connections
        Pool size; keep-alive connections are reused across requests.
    transport
        An ``httpx.AsyncBaseTransport`` to use instead of the network
        (``httpx.MockTransport`` in tests).

    Raises
    ------
    modelgate.errors.AuthMissingError
        The token is empty.
    modelgate.errors.UnknownKeyError
        The token does not start with a key id. A malformed secret after a
        key id is the front door's to answer, at the first request.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        connect_timeout_s: float = 5.0,
        max_connections: int = 16,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        key_id, secret = split_token(token)
        if any(c.isspace() for c in secret):
            # White space cannot be a secret's, and a line break would not
            # survive a header: send the key id alone, which the front door
            # answers as any malformed secret (unknown key or bad signature),
            # as the Kafka transport's worker does.
            secret = ""
        self._connect_timeout_s = connect_timeout_s
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {key_id}.{secret}"},
            timeout=httpx.Timeout(30.0, connect=connect_timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
            ),
            transport=transport,
            # The token must not follow a redirect to another host.
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        # The token stays out of reprs and tracebacks.
        return f"HttpTransport(base_url={str(self._client.base_url)!r})"

    async def start(self) -> None:
        """Nothing to do: connections open on first use."""

    async def close(self) -> None:
        await self._client.aclose()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        request_id: str,
        timeout_s: float,
    ) -> InferResult:
        """One attempt: send, wait at most ``timeout_s``, read the answer.

        Raises
        ------
        GatewayError
            The class of the answer's code; ``RequestTimeoutError`` or
            ``ConnectionFailedError`` when no answer came.
        """
        body = {
            "id": request_id,
            "inputs": [tensor_dict(name, array) for name, array in inputs.items()],
        }
        url = f"/v2/models/{quote(model, safe='')}/infer"
        timeout = httpx.Timeout(
            timeout_s, connect=min(self._connect_timeout_s, timeout_s)
        )
        try:
            response = await self._client.post(url, json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise RequestTimeoutError(
                f"no answer within {timeout_s:.1f} s ({type(exc).__name__})",
                request_id=request_id,
            ) from exc
        except httpx.TransportError as exc:
            raise ConnectionFailedError(
                f"cannot reach {self._client.base_url}: {type(exc).__name__}: {exc}",
                request_id=request_id,
            ) from exc
        return parse_response(response, request_id, model)


def parse_response(
    response: httpx.Response, request_id: str, model: str
) -> InferResult:
    """The result of a 200 answer; raise the typed error of any other."""
    if response.status_code != 200:
        raise error_from_response(response, request_id)
    try:
        payload = response.json()
        outputs = {str(t["name"]): array_from_tensor(t) for t in payload["outputs"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise BadResponseError(
            f"unreadable inference answer: {type(exc).__name__}: {exc}",
            request_id=request_id,
            http_status=response.status_code,
        ) from exc
    parameters = payload.get("parameters") or {}
    answered_id = payload.get("id")
    if answered_id is not None and answered_id != request_id:
        raise BadResponseError(
            f"answer is for request {answered_id!r}, not {request_id!r}",
            request_id=request_id,
            http_status=response.status_code,
        )
    version = payload.get("model_version")
    return InferResult(
        request_id=request_id,
        model=payload.get("model_name") or model,
        outputs=outputs,
        action=str(parameters.get("action") or "allow"),
        rate=rate_from_headers(response.headers),
        model_version=None if version is None else str(version),
        replayed=parameters.get("replayed") is True,
        degrade=_optional_str(parameters.get("degrade")),
    )


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def error_from_response(response: httpx.Response, request_id: str) -> GatewayError:
    """The typed error an error answer stands for."""
    status = response.status_code
    retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("code"), str):
        retriable = payload.get("retriable")
        return error_for(
            payload["code"],
            str(payload.get("error") or payload.get("message") or "error"),
            retriable=retriable if isinstance(retriable, bool) else None,
            request_id=request_id,
            retry_after_s=retry_after_s,
            http_status=status,
            rate=rate_from_headers(response.headers),
        )
    # Not the front door's error shape: a proxy or load balancer answered.
    code = "RATE_LIMITED" if status == 429 else f"HTTP_{status}"
    text = response.text[:_MAX_FOREIGN_TEXT] if response.content else ""
    return error_for(
        code,
        f"HTTP {status} {response.reason_phrase}: {text}".rstrip(": "),
        retriable=status == 429 or status in _RETRIABLE_STATUSES,
        request_id=request_id,
        retry_after_s=retry_after_s,
        http_status=status,
    )


def parse_retry_after(value: str | None, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta seconds (a
    fraction is accepted) or an HTTP date; ``None`` if absent or unreadable.

    Examples
    --------
    >>> parse_retry_after("2"), parse_retry_after("0.25"), parse_retry_after("x")
    (2.0, 0.25, None)
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        now = time.time() if now_s is None else now_s
        return max(0.0, when.timestamp() - now)
    return seconds if seconds >= 0 and seconds == seconds else None


def rate_from_headers(headers: Mapping[str, str]) -> RateInfo | None:
    """Rate information from ``RateLimit``/``RateLimit-Policy`` headers (the
    IETF httpapi draft's structured form) or ``[X-]RateLimit-Limit``,
    ``-Remaining``, ``-Reset``; ``None`` unless limit and remaining are known.

    Examples
    --------
    >>> rate_from_headers({"RateLimit-Policy": '"default";q=100;w=10',
    ...                    "RateLimit": '"default";r=42;t=3'})
    RateInfo(limit=100, remaining=42, reset_s=3.0, window_s=10.0)
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    found: dict[str, float] = {}
    names = {
        "q": "limit",
        "limit": "limit",
        "r": "remaining",
        "remaining": "remaining",
        "t": "reset",
        "reset": "reset",
        "w": "window",
        "window": "window",
    }
    for header in ("ratelimit-policy", "ratelimit"):
        for key, number in _PARAM.findall(lowered.get(header, "")):
            field_name = names.get(key.lower())
            if field_name is not None and field_name not in found:
                found[field_name] = float(number)
    for prefix in ("ratelimit-", "x-ratelimit-"):
        for suffix in ("limit", "remaining", "reset"):
            raw = lowered.get(prefix + suffix)
            if raw is not None and suffix not in found:
                try:
                    found[suffix] = float(raw.split(",")[0].split(";")[0])
                except ValueError:
                    continue
    if "limit" not in found or "remaining" not in found:
        return None
    return RateInfo(
        limit=int(found["limit"]),
        remaining=int(found["remaining"]),
        reset_s=found.get("reset", 0.0),
        window_s=found.get("window"),
    )
