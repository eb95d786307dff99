"""Hostile HTTP requests against the front door, with a real worker, Kafka and
Redis: request ids other clients also use, and API-key headers that are not
tokens. Malformed bodies are covered by tests/integration/test_frontdoor.py
(``test_malformed_and_oversize_are_refused_before_kafka``)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.config import Settings
from gateway.keys import format_token
from gateway.models import digits_split, load_model
from modelgate import errors
from modelgate.client import AsyncClient
from tests.integration.frontdoor_helpers import bearer, serving, with_instance
from tests.integration.helpers import create_key, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

INFER = "/v2/models/digits/infer"
X_TEST = digits_split()[1].astype(np.float32)


def _body(rows: np.ndarray, rid: str) -> dict[str, Any]:
    return {
        "id": rid,
        "inputs": [
            {
                "name": "pixels",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ],
    }


async def test_two_clients_may_use_the_same_request_id_at_once(
    settings: Settings, models_dir: Any
) -> None:
    """Regression test: the front door's shared transport kept pending
    replies by request id alone, so while one client waited on id "1" (OIP
    clients often count from 1) every other client sending id "1" was refused
    409 DUPLICATE_REQUEST, although request ids are per client everywhere
    else (the workers dedupe per client)."""
    settings = with_instance(settings)
    tokens = {
        who: format_token(*await create_key(settings, who))
        for who in ("ada", "ben", "cy")
    }
    rows = {who: X_TEST[i : i + 1] for i, who in enumerate(tokens)}
    expected = {
        who: load_model(models_dir, "digits").predict_proba(r)[0]
        for who, r in rows.items()
    }
    async with (
        running_worker(settings),
        serving(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        answers = await asyncio.gather(
            *(
                http.post(INFER, json=_body(rows[who], "1"), headers=bearer(t))
                for who, t in tokens.items()
            )
        )
    for who, answer in zip(tokens, answers, strict=True):
        assert answer.status_code == 200, (who, answer.text)
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        got = np.asarray(outputs["probabilities"]["data"], dtype=np.float32)
        # Close, not equal: the worker predicts the three in one model call.
        np.testing.assert_allclose(got, expected[who], rtol=1e-4, atol=1e-7)


async def test_hostile_numbers_and_key_headers_get_their_codes(
    settings: Settings,
) -> None:
    """Numbers no float holds are NON_FINITE (a 400-digit integer used to
    answer 500), and API-key headers that are not tokens (non-ASCII bytes,
    a huge value, another scheme, a hash-tag key id) are 401s; nothing of
    it reaches Kafka, so no worker runs."""
    settings = with_instance(settings)
    row = [0.0] * 64
    body = _body(X_TEST[:1], "n")
    digits = (
        '{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","data":['
        + "9" * 400
        + ","
        + ",".join("0.0" for _ in row[1:])
        + "]}]}"
    ).encode()
    big_fp32 = {**body, "inputs": [{**body["inputs"][0], "data": [3.5e38, *row[1:]]}]}
    headers: list[list[tuple[bytes, bytes]]] = [
        [(b"authorization", b"Bearer mgk_\xe9\xe9.abc")],
        [(b"x-api-key", b"mgk_" + b"a" * 6000 + b".s")],
        [(b"authorization", b"Basic YWxpY2U6cHc=")],
        [(b"x-api-key", b"mgk_{c:alice}.abc")],
        [(b"authorization", b"Bearer")],
    ]
    token = format_token(*await create_key(settings, "dee"))
    async with (
        serving(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        huge = await http.post(
            INFER,
            content=digits,
            headers={**bearer(token), "Content-Type": "application/json"},
        )
        wide = await http.post(INFER, json=big_fp32, headers=bearer(token))
        odd = [
            await http.post(
                INFER,
                json=body,
                headers=[(b"content-type", b"application/json"), *h],
            )
            for h in headers
        ]
    for response in (huge, wide):
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "NON_FINITE", response.text
    for h, response in zip(headers, odd, strict=True):
        assert response.status_code == 401, (h[0][1][:40], response.text)
        assert response.json()["code"].startswith("AUTH_"), response.text


@pytest.mark.parametrize("token_bytes", [70_000, 300_000, 2_000_000])
async def test_an_oversize_authorization_header_gets_431_not_a_reset(
    settings: Settings, token_bytes: int
) -> None:
    """Regression test: a head past h11's buffer made uvicorn write a plain
    400 and close with the client's bytes unread, so the client saw the
    connection reset; a head of 64-128 KiB that arrived in one read was
    accepted. Now every head over 64 KiB is answered 431 HEADERS_TOO_LARGE,
    and one just under it is read as usual."""
    settings = with_instance(settings)
    body = _body(X_TEST[:1], "big-head")
    async with serving(settings) as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(INFER, json=body, headers=bearer("a" * token_bytes))
        under = await http.post(INFER, json=body, headers=bearer("a" * 60_000))
        # The client library reads the answer as its typed error.
        async with AsyncClient.http(
            url, "mgk_" + "0" * 12 + "." + "a" * token_bytes
        ) as client:
            with pytest.raises(errors.HeadersTooLargeError) as excinfo:
                await client.infer("digits", X_TEST[:1])

    assert answer.status_code == 431, answer.text
    assert answer.json()["code"] == "HEADERS_TOO_LARGE", answer.text
    assert "65536 bytes" in answer.json()["error"], answer.text
    assert under.status_code == 401, under.text
    assert under.json()["code"] == "AUTH_UNKNOWN_KEY", under.text
    assert excinfo.value.http_status == 431 and not excinfo.value.retriable


async def test_a_refused_head_is_answered_to_a_client_still_sending(
    settings: Settings,
) -> None:
    """A raw client that writes a 1 MB header line by line, then reads: the
    server must keep reading (and dropping) until the client is done, or the
    client's writes meet a reset before it can read the 431."""
    settings = with_instance(settings)
    async with serving(settings) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ".encode()
        )
        for _ in range(64):
            writer.write(b"a" * 16_384)
            await writer.drain()
        writer.write(b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()

    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"code":"HEADERS_TOO_LARGE"' in payload, answer[:400]
