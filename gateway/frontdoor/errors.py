"""HTTP status of every error code, the error body, and rate-limit headers.

The table here is the one HTTP mapping of ``gateway.errors.ERROR_CODES``
(contract 1); a test asserts that every code has an entry. This module imports
only the gateway's errors and protocol and starlette's response class.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse

from gateway.errors import ModelgateError
from gateway.protocol import RateInfo

# Codes the front door itself raises, beside the workers' ones.
FRONTDOOR_CODES: dict[str, str] = {
    "GATEWAY_TIMEOUT": "no reply from the workers in time (HTTP only)",
    "BROKER_UNAVAILABLE": "the front door cannot reach Kafka",
    "NOT_READY": "the front door is starting or stopping",
    "TRANSPORT_CLOSED": "the front door stopped while the request waited",
    "NOT_FOUND": "no such path",
    "METHOD_NOT_ALLOWED": "the path does not take this method",
    "HEADERS_TOO_LARGE": "the request line and headers exceed 64 KiB",
    "AUTH_AMBIGUOUS": "Authorization or X-API-Key appears more than once, "
    "or the two carry different credentials",
}

_VALIDATION = (
    "MALFORMED_JSON",
    "SCHEMA_INVALID",
    "UNSUPPORTED_VERSION",
    "TENSOR_NAME",
    "SHAPE_MISMATCH",
    "DTYPE_MISMATCH",
    "NON_FINITE",
    "OUT_OF_RANGE",
)
_UNAUTHENTICATED = (
    "AUTH_MISSING",
    "AUTH_UNKNOWN_KEY",
    "AUTH_BAD_SIGNATURE",
    "AUTH_STALE",
    "AUTH_EXPIRED",
    "AUTH_REVOKED",
    # The front door keys each record by the key's own client, so a worker
    # refusing the partition means the key changed owner under us: the
    # credential no longer proves what it did.
    "AUTH_WRONG_PARTITION",
    "AUTH_FAILED",
)

HTTP_STATUS: dict[str, int] = {
    **dict.fromkeys(_VALIDATION, 400),
    "AUTH_AMBIGUOUS": 400,
    "PAYLOAD_TOO_LARGE": 413,
    "HEADERS_TOO_LARGE": 431,
    "UNKNOWN_MODEL": 404,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    **dict.fromkeys(_UNAUTHENTICATED, 401),
    "AUTH_MODEL_FORBIDDEN": 403,
    "DUPLICATE_REQUEST": 409,
    "RATE_LIMITED": 429,
    "QUOTA_EXCEEDED": 429,
    "TOO_MANY_IN_FLIGHT": 429,
    "BLOCKED": 403,
    "BACKEND_ERROR": 502,
    "BACKEND_UNAVAILABLE": 503,
    "STORE_UNAVAILABLE": 503,
    "BROKER_UNAVAILABLE": 503,
    "NOT_READY": 503,
    "TRANSPORT_CLOSED": 503,
    "BACKEND_TIMEOUT": 504,
    "GATEWAY_TIMEOUT": 504,
    "INTERNAL": 500,
}

logger = logging.getLogger(__name__)

# Failures of what stands behind the front door. Their messages name internal
# addresses and operations (a Redis host and command, a broker or backend URL):
# the operator's business, not the caller's. The caller gets the code and one of
# these; the original message goes to the log.
PUBLIC_MESSAGES: dict[str, str] = {
    "STORE_UNAVAILABLE": "the counter store is unavailable; retry later",
    "BROKER_UNAVAILABLE": "the gateway cannot reach its message broker; retry later",
    "BACKEND_ERROR": "the model failed to produce a prediction",
    "BACKEND_UNAVAILABLE": "the model backend is unavailable; retry later",
    "BACKEND_TIMEOUT": "the model backend did not answer in time",
    "INTERNAL": "internal error",
}

# Statuses that tell the client when to come back.
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_RETRY_AFTER_CODES = frozenset({"BLOCKED"})

# The policy name in the rate-limit headers; one window today.
RATE_POLICY = "burst"


def status_of(code: str) -> int:
    """HTTP status for ``code``; an unmapped code is a 500, never a 200."""
    return HTTP_STATUS.get(code, 500)


def error_body(message: str, code: str, retriable: bool) -> dict[str, object]:
    """The error body of contract 2: ``{"error", "code", "retriable"}``."""
    return {"error": message, "code": code, "retriable": retriable}


def rate_headers(rate: RateInfo) -> dict[str, str]:
    """``RateLimit-Policy`` and ``RateLimit`` for the binding window.

    Syntax of draft-ietf-httpapi-ratelimit-headers-10 (unchanged since -09):
    both are Structured Field lists of one item, the quoted policy name with
    parameters; ``q`` the quota and ``w`` the window in seconds on the
    policy, ``r`` the remaining quota and ``t`` the seconds until it is
    restored on ``RateLimit``. Seconds are integers, so ``w`` and ``t`` round
    up (a client waiting that long is never early).

    Examples
    --------
    >>> rate_headers(RateInfo(limit=5, remaining=4, reset_ms=100, window_s=0.5))
    {'RateLimit-Policy': '"burst";q=5;w=1', 'RateLimit': '"burst";r=4;t=1'}
    """
    # Rounded first so that float noise (2 / (1/3) = 6.000...01) adds no second.
    window_s = max(1, math.ceil(round(rate.window_s, 6)))
    reset_s = max(0, math.ceil(rate.reset_ms / 1000))
    return {
        "RateLimit-Policy": f'"{RATE_POLICY}";q={rate.limit};w={window_s}',
        "RateLimit": f'"{RATE_POLICY}";r={max(rate.remaining, 0)};t={reset_s}',
    }


def retry_after_s(retry_after_ms: int) -> int:
    """``Retry-After`` in whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(retry_after_ms / 1000))


@dataclass
class _Quiet:
    """One code's logging state: when its last line went out, and how many
    of its answers have gone unlogged since."""

    logged_at: float
    suppressed: int = 0


class ErrorLogThrottle:
    """Keeps a store or broker outage from logging one line per refused
    request. Per code: the first answer is logged; later ones within
    ``every_s`` of the last line are counted, and the first answer after that
    logs one summary line with ``count`` (how many went unlogged) and its own
    ``detail``.

    Known shortcoming: the count is flushed by the next answer with that code,
    not by a timer, so answers suppressed at the very end of an outage are
    never reported.
    """

    def __init__(
        self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every_s = every_s
        self._clock = clock
        self._codes: dict[str, _Quiet] = {}

    def log(
        self, level: int, code: str, detail: str, *, path: str, source: str
    ) -> None:
        """Log (or count) one answer given a generic message for ``code``."""
        now = self._clock()
        quiet = self._codes.get(code)
        fields = {"code": code, "detail": detail, "path": path, "source": source}
        if quiet is None:
            self._codes[code] = _Quiet(logged_at=now)
            logger.log(level, "answered %s with a generic message", code, extra=fields)
            return
        if now - quiet.logged_at < self.every_s:
            quiet.suppressed += 1
            return
        count, quiet.suppressed, quiet.logged_at = quiet.suppressed, 0, now
        logger.log(
            level,
            "answered %s with a generic message; %d more since the last line",
            code,
            count,
            extra={**fields, "count": count},
        )


def public_message(
    code: str, message: str, *, path: str, source: str, log: ErrorLogThrottle
) -> str:
    """The message a caller may see for ``code``: ``message`` itself, or for
    a failure behind the front door (``PUBLIC_MESSAGES``) a generic one, the
    original being logged through ``log`` with ``code``, ``path`` and
    ``source`` (``frontdoor`` or ``worker``: who raised it)."""
    generic = PUBLIC_MESSAGES.get(code)
    if generic is None or message == generic:
        return message
    # A worker's answer was logged by the worker already; ours is not logged
    # anywhere else.
    level = logging.WARNING if source == "frontdoor" else logging.INFO
    log.log(level, code, message, path=path, source=source)
    return generic


def error_response(
    code: str,
    message: str,
    retriable: bool,
    *,
    retry_after_ms: int | None = None,
    rate: RateInfo | None = None,
) -> JSONResponse:
    """The HTTP answer for an error code, with its headers."""
    status = status_of(code)
    headers: dict[str, str] = {}
    if rate is not None:
        headers.update(rate_headers(rate))
    if retry_after_ms is not None and (
        status in _RETRY_AFTER_STATUSES or code in _RETRY_AFTER_CODES
    ):
        headers["Retry-After"] = str(retry_after_s(retry_after_ms))
    return JSONResponse(
        error_body(message, code, retriable), status_code=status, headers=headers
    )


def response_for_error(
    exc: ModelgateError, *, path: str, log: ErrorLogThrottle
) -> JSONResponse:
    """The HTTP answer for an error the front door raised itself."""
    message = public_message(
        exc.code, exc.message, path=path, source="frontdoor", log=log
    )
    return error_response(exc.code, message, exc.retriable)
