"""Error types for the gateway: one root, one subclass per area, stable codes.

Clients, dead-letter records and tests match ``code``; the message is for people
and may change. This module imports nothing from the rest of the package so any
layer can raise these.
"""

from __future__ import annotations

from typing import ClassVar


class ModelgateError(Exception):
    """Root of every error modelgate raises on purpose.

    Parameters
    ----------
    message
        What went wrong, for a person. Never includes secrets or raw payloads.
    code
        Stable machine-readable code; defaults to the class's ``default_code``.
    retriable
        Whether sending the same request again later may succeed.
    """

    default_code: ClassVar[str] = "INTERNAL"
    default_retriable: ClassVar[bool] = False

    def __init__(
        self, message: str, *, code: str | None = None, retriable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.retriable = self.default_retriable if retriable is None else retriable


class ValidationError(ModelgateError):
    """The request does not match the schema or the model's signature."""

    default_code = "SCHEMA_INVALID"


class AuthError(ModelgateError):
    """The request does not prove possession of a live API key."""

    default_code = "AUTH_FAILED"


class PolicyError(ModelgateError):
    """Policy refused the request (throttle, block, duplicate)."""

    default_code = "REFUSED"


class ConfigError(ModelgateError):
    """Configuration failed validation; the old version stays in force."""

    default_code = "CONFIG_INVALID"


class BackendError(ModelgateError):
    """The model backend failed to answer."""

    default_code = "BACKEND_ERROR"
    default_retriable = True


class StoreError(ModelgateError):
    """Redis (or another store) could not be reached or answered badly."""

    default_code = "STORE_UNAVAILABLE"
    default_retriable = True


class BrokerError(ModelgateError):
    """Kafka could not be reached or refused an operation."""

    default_code = "BROKER_UNAVAILABLE"
    default_retriable = True


class BackendTimeoutError(BackendError):
    """The model backend did not answer within its timeout."""

    default_code = "BACKEND_TIMEOUT"


class BackendUnavailableError(BackendError):
    """The model backend is down or its circuit breaker is open."""

    default_code = "BACKEND_UNAVAILABLE"


# Every code a client can see in an error response, with its meaning. The README
# table is generated from this mapping, and tests assert each code is reachable.
ERROR_CODES: dict[str, str] = {
    "MALFORMED_JSON": "the message value is not valid JSON (or not UTF-8)",
    "SCHEMA_INVALID": "JSON is valid but fields are missing, mistyped or unknown",
    "UNSUPPORTED_VERSION": "the message schema version is not one this gateway reads",
    "PAYLOAD_TOO_LARGE": "the message exceeds the configured size limit",
    "UNKNOWN_MODEL": "no model of that name is served",
    "TENSOR_NAME": "an input tensor is missing or not declared by the model",
    "SHAPE_MISMATCH": "a tensor's shape or element count is wrong",
    "DTYPE_MISMATCH": "a tensor's datatype differs from the declared one",
    "NON_FINITE": "a tensor holds NaN or Infinity",
    "OUT_OF_RANGE": "a value lies outside the model's declared range",
    "AUTH_MISSING": "no signature header on the message",
    "AUTH_UNKNOWN_KEY": "the API key id is not known",
    "AUTH_REVOKED": "the API key was revoked",
    "AUTH_EXPIRED": "the API key has expired",
    "AUTH_BAD_SIGNATURE": "the signature does not match the message and key",
    "AUTH_STALE": "the client timestamp is outside the accepted clock skew",
    "AUTH_MODEL_FORBIDDEN": "the API key is not scoped to this model",
    "AUTH_WRONG_PARTITION": "the record is not keyed (or partitioned) by the key's "
    "client id",
    "DUPLICATE_REQUEST": "a request with this id from this client was already seen",
    "RATE_LIMITED": "the client exceeded its rate limit; retry after retry_after_ms",
    "BLOCKED": "the client is blocked for a cool-down period",
    "BACKEND_ERROR": "the model failed to produce a prediction",
    "STORE_UNAVAILABLE": "the counter store could not be reached and a limit "
    "of the client's plan is in fail mode 'closed'; retry later (in the default "
    "mode 'retry' the worker retries the batch instead of answering)",
    "QUOTA_EXCEEDED": "the client's daily quota is used up; it resets at midnight "
    "UTC (retry_after_ms)",
    "TOO_MANY_IN_FLIGHT": "the client has as many requests in flight as its plan "
    "allows; retry once one is answered",
    "INTERNAL": "an unexpected fault in the gateway; the request was not served",
    "BACKEND_TIMEOUT": "the model backend did not answer within its timeout",
    "BACKEND_UNAVAILABLE": "the model backend is down or its circuit breaker is open",
    "GATEWAY_TIMEOUT": "no reply from the workers in time (HTTP front door only); "
    "retry with the same request id",
}
