"""Typed exceptions of the modelgate client: one class per stable error code.

Every error the gateway can answer with has a stable ``code``
(``gateway.errors.ERROR_CODES``); :func:`error_for` turns a code into an
instance of its class here, so callers catch a kind of failure
(``except RateLimitedError``) instead of matching strings. A code this library
does not know yet (a newer gateway) becomes :class:`UnknownGatewayError`, still
carrying the code.

Hierarchy::

    GatewayError                       (gateway.errors.ModelgateError)
    ├── ValidationError                the request is malformed (HTTP 400/404/413)
    │   └── MalformedJsonError ... UnknownModelError, PayloadTooLargeError,
    │       HeadersTooLargeError
    ├── AuthError                      the API key does not allow it (401/403)
    │   └── UnknownKeyError, RevokedKeyError, ..., ModelForbiddenError
    ├── RefusedError                   policy said no
    │   ├── DuplicateRequestError
    │   ├── RateLimitedError           (retry_after_s)
    │   │   └── QuotaExceededError, TooManyInFlightError
    │   └── BlockedError               (retry_after_s)
    ├── ServerError                    the service failed (5xx)
    │   ├── BackendError
    │   │   └── BackendTimeoutError, BackendUnavailableError
    │   ├── StoreUnavailableError, GatewayTimeoutError, InternalError
    ├── TransportError                 no usable answer reached us
    │   └── ConnectionFailedError, RequestTimeoutError, ...
    └── UnknownGatewayError            a code this version does not know

``retriable`` says whether the same request (same request id) may succeed
later; the server's word wins over the class default when it gives one.

This module imports only the standard library, ``gateway.errors`` and
``modelgate.results`` (for ``RateInfo``).
"""

from __future__ import annotations

from typing import ClassVar

from gateway.errors import ModelgateError
from modelgate.results import RateInfo


class GatewayError(ModelgateError):
    """Root of the client's errors: the gateway refused or failed a request,
    or could not be reached.

    Parameters
    ----------
    message
        What went wrong, for a person (the server's message when it sent one).
    code
        Stable code; defaults to the class's ``default_code``.
    retriable
        Whether the same request may succeed later; defaults per class.
    request_id
        The request this error answers, when known.
    retry_after_s
        How long the gateway asked us to wait before retrying, in seconds.
    http_status
        The HTTP status of the answer (HTTP transport only).
    rate
        The binding rate-limit window when the refusal reported it (a
        throttled request: the ``RateLimit`` headers over HTTP, ``rate`` over
        Kafka).

    Attributes
    ----------
    attempts
        How many times the request was sent before this error was raised
        (set by the client's retry loop).
    """

    default_code: ClassVar[str] = "GATEWAY_ERROR"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retriable: bool | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
        http_status: int | None = None,
        rate: RateInfo | None = None,
    ) -> None:
        super().__init__(message, code=code, retriable=retriable)
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.http_status = http_status
        self.rate = rate
        self.attempts = 1

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


# -- the request itself is wrong ----------------------------------------------


class ValidationError(GatewayError):
    """The request does not match the schema or the model's signature."""

    default_code = "SCHEMA_INVALID"


class MalformedJsonError(ValidationError):
    default_code = "MALFORMED_JSON"


class SchemaInvalidError(ValidationError):
    default_code = "SCHEMA_INVALID"


class UnsupportedVersionError(ValidationError):
    default_code = "UNSUPPORTED_VERSION"


class PayloadTooLargeError(ValidationError):
    default_code = "PAYLOAD_TOO_LARGE"


class HeadersTooLargeError(ValidationError):
    """The request line and headers are over the front door's 64 KiB (HTTP
    431): a token or header far longer than any real one."""

    default_code = "HEADERS_TOO_LARGE"


class UnknownModelError(ValidationError):
    default_code = "UNKNOWN_MODEL"


class TensorNameError(ValidationError):
    default_code = "TENSOR_NAME"


class ShapeMismatchError(ValidationError):
    default_code = "SHAPE_MISMATCH"


class DtypeMismatchError(ValidationError):
    default_code = "DTYPE_MISMATCH"


class NonFiniteError(ValidationError):
    default_code = "NON_FINITE"


class OutOfRangeError(ValidationError):
    default_code = "OUT_OF_RANGE"


# -- the key does not allow it -------------------------------------------------


class AuthError(GatewayError):
    """The request does not prove possession of a live API key for the model."""

    default_code = "AUTH_FAILED"


class AuthMissingError(AuthError):
    default_code = "AUTH_MISSING"


class UnknownKeyError(AuthError):
    default_code = "AUTH_UNKNOWN_KEY"


class RevokedKeyError(AuthError):
    default_code = "AUTH_REVOKED"


class ExpiredKeyError(AuthError):
    default_code = "AUTH_EXPIRED"


class BadSignatureError(AuthError):
    default_code = "AUTH_BAD_SIGNATURE"


class StaleRequestError(AuthError):
    """The request's timestamp is outside the accepted clock skew (check the
    client machine's clock)."""

    default_code = "AUTH_STALE"


class ModelForbiddenError(AuthError):
    default_code = "AUTH_MODEL_FORBIDDEN"


class WrongPartitionError(AuthError):
    default_code = "AUTH_WRONG_PARTITION"


class AmbiguousCredentialsError(AuthError):
    """The request carried ``Authorization`` or ``X-API-Key`` more than once,
    or a ``Bearer`` credential and an ``X-API-Key`` that differ (HTTP 400):
    the front door uses no credential it would have to pick."""

    default_code = "AUTH_AMBIGUOUS"


# -- policy refused it ---------------------------------------------------------


class RefusedError(GatewayError):
    """Policy refused the request (duplicate, rate limit, block)."""

    default_code = "REFUSED"


class DuplicateRequestError(RefusedError):
    """Another request with this id was already admitted and has no kept
    answer for this body: a different body under a used id, or the first
    attempt is still being served."""

    default_code = "DUPLICATE_REQUEST"


class RateLimitedError(RefusedError):
    """Too many requests; ``retry_after_s`` says when to try again."""

    default_code = "RATE_LIMITED"
    default_retriable = True


class QuotaExceededError(RateLimitedError):
    """The key's daily quota is used up. Not retriable unless the gateway says
    so; even then the retry loop waits only if ``retry_after_s`` fits the
    request's deadline."""

    default_code = "QUOTA_EXCEEDED"
    default_retriable = False


class TooManyInFlightError(RateLimitedError):
    default_code = "TOO_MANY_IN_FLIGHT"


class BlockedError(RefusedError):
    """The client is blocked for a cool-down (``retry_after_s``)."""

    default_code = "BLOCKED"
    default_retriable = True


# -- the service failed --------------------------------------------------------


class ServerError(GatewayError):
    """The gateway or something behind it failed to serve the request."""

    default_code = "INTERNAL"


class BackendError(ServerError):
    """The model backend failed to produce a prediction."""

    default_code = "BACKEND_ERROR"
    default_retriable = True


class BackendTimeoutError(BackendError):
    default_code = "BACKEND_TIMEOUT"


class BackendUnavailableError(BackendError):
    default_code = "BACKEND_UNAVAILABLE"


class StoreUnavailableError(ServerError):
    default_code = "STORE_UNAVAILABLE"
    default_retriable = True


class GatewayTimeoutError(ServerError):
    """The front door got no answer from the workers in time (HTTP 504)."""

    default_code = "GATEWAY_TIMEOUT"
    default_retriable = True


class InternalError(ServerError):
    default_code = "INTERNAL"


class BrokerUnavailableError(ServerError):
    """The front door cannot reach Kafka (HTTP 503)."""

    default_code = "BROKER_UNAVAILABLE"
    default_retriable = True


class NotReadyError(ServerError):
    """The front door is starting or stopping (HTTP 503)."""

    default_code = "NOT_READY"
    default_retriable = True


class GatewayClosedError(ServerError):
    """The front door stopped while the request waited (HTTP 503)."""

    default_code = "TRANSPORT_CLOSED"
    default_retriable = True


class NotFoundError(GatewayError):
    """No such path on the front door (HTTP 404): a wrong base URL."""

    default_code = "NOT_FOUND"


class MethodNotAllowedError(GatewayError):
    """The front door's path does not take this method (HTTP 405)."""

    default_code = "METHOD_NOT_ALLOWED"


# -- no usable answer ----------------------------------------------------------


class TransportError(GatewayError):
    """No usable answer reached the client: connection, timeout, bad reply."""

    default_code = "TRANSPORT_ERROR"
    default_retriable = True


class ConnectionFailedError(TransportError):
    """The gateway (or the broker) could not be reached."""

    default_code = "CONNECTION_FAILED"


class RequestTimeoutError(TransportError):
    """No answer within the attempt's timeout; the request may still be
    served, so a retry must reuse its request id."""

    default_code = "TIMEOUT"


class BadResponseError(TransportError):
    """The answer could not be read (not JSON, or not the expected shape)."""

    default_code = "BAD_RESPONSE"
    default_retriable = False


class ClientClosedError(TransportError):
    """The client was used after ``close()``."""

    default_code = "CLIENT_CLOSED"
    default_retriable = False


class UnknownGatewayError(GatewayError):
    """An error code this version of the library does not know."""

    default_code = "UNKNOWN"


_CLASSES: tuple[type[GatewayError], ...] = (
    MalformedJsonError,
    SchemaInvalidError,
    AmbiguousCredentialsError,
    UnsupportedVersionError,
    PayloadTooLargeError,
    HeadersTooLargeError,
    UnknownModelError,
    TensorNameError,
    ShapeMismatchError,
    DtypeMismatchError,
    NonFiniteError,
    OutOfRangeError,
    AuthMissingError,
    UnknownKeyError,
    RevokedKeyError,
    ExpiredKeyError,
    BadSignatureError,
    StaleRequestError,
    ModelForbiddenError,
    WrongPartitionError,
    DuplicateRequestError,
    RateLimitedError,
    QuotaExceededError,
    TooManyInFlightError,
    BlockedError,
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    StoreUnavailableError,
    GatewayTimeoutError,
    InternalError,
    BrokerUnavailableError,
    NotReadyError,
    GatewayClosedError,
    NotFoundError,
    MethodNotAllowedError,
    AuthError,
    ConnectionFailedError,
    RequestTimeoutError,
    BadResponseError,
    ClientClosedError,
)

#: The class of every code this library knows.
ERROR_CLASSES: dict[str, type[GatewayError]] = {c.default_code: c for c in _CLASSES}


def error_class(code: str) -> type[GatewayError]:
    """The exception class for ``code``; :class:`UnknownGatewayError` if none."""
    return ERROR_CLASSES.get(code, UnknownGatewayError)


def error_for(
    code: str,
    message: str,
    *,
    retriable: bool | None = None,
    request_id: str | None = None,
    retry_after_s: float | None = None,
    http_status: int | None = None,
    rate: RateInfo | None = None,
) -> GatewayError:
    """An exception instance for an error answer.

    Examples
    --------
    >>> err = error_for("RATE_LIMITED", "slow down", retry_after_s=0.5)
    >>> type(err).__name__, err.retriable, err.retry_after_s
    ('RateLimitedError', True, 0.5)
    >>> type(error_for("SOMETHING_NEW", "?")).__name__
    'UnknownGatewayError'
    """
    return error_class(code)(
        message,
        code=code,
        retriable=retriable,
        request_id=request_id,
        retry_after_s=retry_after_s,
        http_status=http_status,
        rate=rate,
    )
