"""Every stable error code has its own exception class, in the right family."""

from __future__ import annotations

import pytest

from gateway.errors import ERROR_CODES
from modelgate import errors

# Contract 1: codes other branches add to ERROR_CODES; the client must know
# them before the merge, so they are listed here as well.
CONTRACT_CODES = {
    "GATEWAY_TIMEOUT",
    "QUOTA_EXCEEDED",
    "TOO_MANY_IN_FLIGHT",
    "BACKEND_TIMEOUT",
    "BACKEND_UNAVAILABLE",
}


@pytest.mark.parametrize("code", sorted(set(ERROR_CODES) | CONTRACT_CODES))
def test_every_code_has_its_own_class(code: str) -> None:
    cls = errors.error_class(code)
    assert cls is not errors.UnknownGatewayError, code
    assert cls.default_code == code
    err = errors.error_for(code, "message", request_id="r-1")
    assert isinstance(err, cls) and err.code == code and err.request_id == "r-1"


def test_classes_are_one_per_code() -> None:
    codes = [c.default_code for c in errors._CLASSES]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize(
    ("family", "codes"),
    [
        (
            errors.ValidationError,
            [
                "MALFORMED_JSON",
                "SCHEMA_INVALID",
                "UNSUPPORTED_VERSION",
                "PAYLOAD_TOO_LARGE",
                "UNKNOWN_MODEL",
                "TENSOR_NAME",
                "SHAPE_MISMATCH",
                "DTYPE_MISMATCH",
                "NON_FINITE",
                "OUT_OF_RANGE",
            ],
        ),
        (errors.AuthError, [c for c in ERROR_CODES if c.startswith("AUTH_")]),
        (
            errors.RateLimitedError,
            ["RATE_LIMITED", "QUOTA_EXCEEDED", "TOO_MANY_IN_FLIGHT"],
        ),
        (
            errors.RefusedError,
            ["DUPLICATE_REQUEST", "RATE_LIMITED", "BLOCKED", "QUOTA_EXCEEDED"],
        ),
        (
            errors.BackendError,
            ["BACKEND_ERROR", "BACKEND_TIMEOUT", "BACKEND_UNAVAILABLE"],
        ),
        (
            errors.ServerError,
            ["BACKEND_ERROR", "STORE_UNAVAILABLE", "GATEWAY_TIMEOUT", "INTERNAL"],
        ),
    ],
)
def test_codes_fall_into_their_family(
    family: type[errors.GatewayError], codes: list[str]
) -> None:
    for code in codes:
        assert issubclass(errors.error_class(code), family), code


def test_default_retriability() -> None:
    retriable = {
        "RATE_LIMITED",
        "TOO_MANY_IN_FLIGHT",
        "BLOCKED",
        "BACKEND_ERROR",
        "BACKEND_TIMEOUT",
        "BACKEND_UNAVAILABLE",
        "STORE_UNAVAILABLE",
        "GATEWAY_TIMEOUT",
    }
    for code in set(ERROR_CODES) | CONTRACT_CODES:
        assert errors.error_for(code, "m").retriable is (code in retriable), code


def test_the_servers_word_on_retriable_wins() -> None:
    assert errors.error_for("BACKEND_ERROR", "m", retriable=False).retriable is False
    assert errors.error_for("INTERNAL", "m", retriable=True).retriable is True


def test_an_unknown_code_keeps_its_code() -> None:
    err = errors.error_for("NEW_IN_V9", "later", retriable=True, http_status=418)
    assert type(err) is errors.UnknownGatewayError
    assert (err.code, err.retriable, err.http_status) == ("NEW_IN_V9", True, 418)
    assert str(err) == "[NEW_IN_V9] later"


def test_rate_limited_carries_retry_after() -> None:
    err = errors.error_for("RATE_LIMITED", "slow down", retry_after_s=1.5)
    assert isinstance(err, errors.RateLimitedError)
    assert err.retry_after_s == 1.5


def test_every_code_the_front_door_answers_has_its_class() -> None:
    # The front door's HTTP table is the list of codes an HTTP client can get.
    from gateway.frontdoor.errors import HTTP_STATUS

    for code in HTTP_STATUS:
        cls = errors.error_class(code)
        assert cls is not errors.UnknownGatewayError, code
        assert cls.default_code == code
    for code in ("NOT_READY", "BROKER_UNAVAILABLE", "TRANSPORT_CLOSED"):
        assert errors.error_for(code, "m").retriable, code
