"""What both client transports make of a token before anything is sent: an
empty one and one no key can have fail the same way over HTTP and Kafka; a
malformed secret after a key id is left to the gateway, which alone knows
whether that key exists (``tests/integration/test_client_http.py`` checks the
gateway's answer on every path)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from gateway.config import Settings
from modelgate import errors
from modelgate.client import AsyncClient
from modelgate.kafka import KafkaClientTransport
from modelgate.tokens import split_token

# Built, never started: nothing here reaches a broker.
SETTINGS = Settings()


def _http(token: str, seen: list[httpx.Request] | None = None) -> AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(
            401, json={"error": "no", "code": "AUTH_UNKNOWN_KEY", "retriable": False}
        )

    return AsyncClient.http(
        "http://frontdoor.test", token, http_transport=httpx.MockTransport(answer)
    )


def _kafka(token: str) -> AsyncClient:
    return AsyncClient.kafka(token, "someone", settings=SETTINGS)


@pytest.mark.parametrize("build", [_http, _kafka], ids=["http", "kafka"])
@pytest.mark.parametrize("token", ["", "   ", "\n"])
def test_an_empty_token_is_auth_missing_on_both_transports(
    build: object, token: str
) -> None:
    """It was a bare ValueError over HTTP and UnknownKeyError over Kafka."""
    with pytest.raises(errors.AuthMissingError) as excinfo:
        build(token)  # type: ignore[operator]  # one of the two builders
    assert excinfo.value.code == "AUTH_MISSING"
    assert "no API key token given" in excinfo.value.message


@pytest.mark.parametrize("build", [_http, _kafka], ids=["http", "kafka"])
@pytest.mark.parametrize(
    "token",
    ["not-a-token", "mgk_0123456789AB.c2VjcmV0", "mgk_0123 456789ab.c2VjcmV0"],
)
def test_a_token_no_key_can_have_is_unknown_on_both_transports(
    build: object, token: str
) -> None:
    with pytest.raises(errors.UnknownKeyError) as excinfo:
        build(token)  # type: ignore[operator]  # one of the two builders
    assert excinfo.value.message.startswith("malformed API key token")
    assert token not in excinfo.value.message


@pytest.mark.parametrize(
    "token", ["mgk_0123456789ab", "mgk_0123456789ab.", "mgk_0123456789ab.c2hvcnQ"]
)
def test_a_malformed_secret_is_left_to_the_gateway(token: str) -> None:
    """Built without error on both transports: the code depends on whether the
    key id exists, which only the front door or the worker can tell."""
    _http(token)
    transport = KafkaClientTransport(SETTINGS, token, "someone")
    assert transport._secret is None


async def test_a_secret_with_white_space_is_sent_as_the_key_id_alone() -> None:
    """A line break would not survive a header; the key id alone gets the
    front door's answer to a malformed secret."""
    seen: list[httpx.Request] = []
    async with _http("mgk_0123456789ab.c2Vj\ncmV0", seen) as client:
        with pytest.raises(errors.UnknownKeyError):
            await client.infer("digits", np.zeros((1, 64)))
    assert seen[0].headers["authorization"] == "Bearer mgk_0123456789ab."


def test_split_token_strips_and_splits_at_the_first_dot() -> None:
    assert split_token(" mgk_0123456789ab.a.b ") == ("mgk_0123456789ab", "a.b")
    assert split_token("mgk_0123456789ab") == ("mgk_0123456789ab", "")
