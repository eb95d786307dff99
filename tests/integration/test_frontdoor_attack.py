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
