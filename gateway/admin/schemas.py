"""Request and response bodies shared by the admin routers.

Pydantic models only; the OpenAPI document is generated from them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.admin.users import Role

USERNAME_REGEX = r"^[a-z][a-z0-9._-]{0,63}$"
CLIENT_ID_REGEX = r"^[A-Za-z0-9._@-]{1,128}$"
KEY_ID_REGEX = r"^mgk_[0-9a-f]{12}$"
MODEL_REGEX = r"^[A-Za-z0-9_-]{1,64}$"
SESSION_ID_REGEX = r"^[0-9a-f]{16}$"
PLAN_REGEX = r"^[A-Za-z0-9_-]{1,64}$"


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorBody(BaseModel):
    """Every refusal: match ``code``, never ``error``."""

    error: str
    code: str
    retriable: bool


class UserOut(Body):
    name: str
    role: Role
    enrolled: bool = Field(description="Whether a first valid TOTP code was seen.")
    created_ms: int


class EnrollmentOut(Body):
    """Shown once: the secret is inside the URI and the QR code."""

    user: UserOut
    provisioning_uri: str = Field(description="otpauth:// URI for an authenticator.")
    qr_svg_data_uri: str = Field(description="The same URI as an SVG QR code.")


class SessionOut(Body):
    session_id: str
    user: str
    created_ms: int
    expires_ms: int
    source: str


class KeyOut(Body):
    key_id: str
    client_id: str
    models: list[str] = Field(description="Models the key may call; empty: all.")
    status: str
    created_ms: int
    expires_ms: int | None
    plan: str = Field("default", description="The limits plan (limits.plans).")
    limit_overrides: dict[str, Any] = Field(
        default={}, description="PlanConfig fields replacing the plan's for this key."
    )


class ClientSummaryOut(Body):
    client_id: str
    risk: float = Field(
        description="Latest risk: strongest detector score over its threshold "
        "(1.0 = at threshold)."
    )
    action: str
    ts_ms: int
    scores: dict[str, float]


class ClientDetailOut(Body):
    client_id: str
    summary: ClientSummaryOut | None
    evidence: list[str]
    evidence_ts_ms: int | None
    counters: dict[str, int]
    block_reason: str | None
    history: list[dict[str, Any]] = Field(description="Newest first.")


class AuditEntryOut(Body):
    entry_id: str
    ts_ms: int
    actor: str
    action: str
    target: str
    source: str
    outcome: str
    detail: dict[str, str]
    seq: int = Field(0, description="Place in the chain; 0: written before chaining.")
    prev: str = Field("", description="hash of the entry before.")
    hash: str = Field("", description="SHA-256 of the entry with seq and prev.")
    mac: str = Field("", description="HMAC-SHA256 of hash under admin.audit_key.")
    kid: str = Field(
        "", description="Id of the key that made mac (empty: unsigned, or older)."
    )


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "MALFORMED_REQUEST"},
    401: {"model": ErrorBody, "description": "ADMIN_UNAUTHENTICATED"},
    403: {"model": ErrorBody, "description": "ADMIN_FORBIDDEN"},
    413: {"model": ErrorBody, "description": "PAYLOAD_TOO_LARGE"},
    422: {"model": ErrorBody, "description": "SCHEMA_INVALID"},
    503: {"model": ErrorBody, "description": "STORE_UNAVAILABLE"},
}
