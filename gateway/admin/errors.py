"""Errors of the admin API, each with a stable code and its HTTP status.

Kept apart from ``gateway.errors.ERROR_CODES``, which lists what an inference
client can see; an admin client sees these. Imports nothing but the root error.
"""

from __future__ import annotations

from gateway.errors import ModelgateError

# code -> (HTTP status, meaning). The OpenAPI description and docs/admin.md
# list these; clients match the code, never the message.
ADMIN_ERROR_CODES: dict[str, tuple[int, str]] = {
    "ADMIN_UNAUTHENTICATED": (401, "no valid session (or bad login credentials)"),
    "ADMIN_FORBIDDEN": (403, "the session's role may not do this"),
    "ACCOUNT_LOCKED": (429, "too many failed logins for this account; wait"),
    "LOGIN_RATE_LIMITED": (429, "too many login attempts from this source; wait"),
    "NOT_FOUND": (404, "no such user, key, client or session"),
    "CONFLICT": (409, "the change contradicts the current state"),
    "MALFORMED_REQUEST": (400, "the request body could not be parsed"),
    "UNKNOWN_PLAN": (422, "no such plan in the running configuration's limits.plans"),
    "PAYLOAD_TOO_LARGE": (413, "the request body is over admin.max_body_bytes"),
    "HEADERS_TOO_LARGE": (431, "the request line and headers exceed 64 KiB"),
    "METHOD_NOT_ALLOWED": (405, "the path does not take this method"),
    "SCHEMA_INVALID": (422, "the request body or parameters are invalid"),
    "STORE_UNAVAILABLE": (503, "Redis could not be reached; retry"),
    "BROKER_UNAVAILABLE": (503, "Kafka could not be reached (config routes); retry"),
    "INTERNAL": (500, "an unexpected fault in the admin API"),
}


class AdminError(ModelgateError):
    """A refusal of the admin API; ``status`` is its HTTP status.

    Parameters
    ----------
    message
        For a person; never holds a password, code or token.
    code
        A key of :data:`ADMIN_ERROR_CODES`.
    retry_after_s
        For the 429 codes: seconds until a retry may succeed.
    """

    default_code = "INTERNAL"

    def __init__(
        self, message: str, *, code: str, retry_after_s: float | None = None
    ) -> None:
        status, _ = ADMIN_ERROR_CODES[code]
        super().__init__(message, code=code, retriable=status in (429, 503))
        self.status = status
        self.retry_after_s = retry_after_s
