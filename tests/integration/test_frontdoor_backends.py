"""The HTTP front door in front of workers whose model is remote or whose
policy hides its suspicion: real uvicorn, worker, Kafka and Redis; a real
MLServer, or a loopback OIP stub that is slow or refuses first.

* An HTTP inference returns exactly what the model server returns.
* A slow backend gives 504 ``BACKEND_TIMEOUT`` and is called once (a read
  timeout is not safe to retry); a 503 is retried and served.
* Under ``hide_suspicion`` a client the rules would block gets a slow,
  degraded 200, not a refusal.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.config import Settings, load_settings
from gateway.models import digits_split, load_model
from tests.conftest import StackInfo
from tests.integration.frontdoor_helpers import bearer, serving, with_instance
from tests.integration.helpers import (
    create_token,
    isolated_settings,
    read_topic,
    running_worker,
)
from tests.integration.oip_servers import MLServerInfo, StubOip, mlserver_proba

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

INFER = "/v2/models/digits/infer"
X_TEST = digits_split()[1].astype(np.float32)
NOISE = np.random.default_rng(3).uniform(0, 16, size=(4, 64)).astype(np.float32)


def with_backend(settings: Settings, **backend: Any) -> Settings:
    data = settings.model_dump()
    data["models"]["backends"] = {"digits": backend}
    return with_instance(load_settings(**data))


def body(rows: np.ndarray, rid: str | None = None) -> dict[str, Any]:
    tensor = {
        "name": "pixels",
        "shape": list(rows.shape),
        "datatype": "FP32",
        "data": rows.reshape(-1).tolist(),
    }
    return {"inputs": [tensor], **({} if rid is None else {"id": rid})}


def output(response: httpx.Response, name: str = "probabilities") -> np.ndarray:
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    tensor = outputs[name]
    return np.asarray(tensor["data"]).reshape(tensor["shape"])


async def _token(settings: Settings, client_id: str = "alice") -> str:
    return await create_token(settings, client_id)


async def test_http_inference_returns_what_mlserver_returns(
    settings: Settings, mlserver: MLServerInfo
) -> None:
    remote = with_backend(settings, kind="oip", url=mlserver.url)
    token = await _token(remote)
    batches = [X_TEST[0:1], X_TEST[1:4], X_TEST[4:9]]
    async with (
        serving(remote) as url,
        running_worker(remote) as worker,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        assert worker._models is not None
        assert worker._models["digits"].kind == "oip"
        answers = [
            await http.post(INFER, json=body(rows), headers=bearer(token))
            for rows in batches
        ]
    for response, rows in zip(answers, batches, strict=True):
        assert response.status_code == 200, response.text
        got = output(response)
        # MLServer asked directly, for the same rows: the front door's
        # answer is its answer, to the last bit of the FP32 it sends.
        direct = mlserver_proba(mlserver.url, rows).astype(np.float32)
        assert got.shape == direct.shape
        np.testing.assert_array_equal(got.astype(np.float32), direct)
        assert output(response, "label").tolist() == direct.argmax(axis=1).tolist()


async def test_slow_backend_gives_504_and_is_called_once(
    settings: Settings, models_dir: Path
) -> None:
    stub = StubOip(load_model(models_dir, "digits"), delay_s=3.0).start()
    try:
        slow = with_backend(
            settings, kind="oip", url=stub.url, read_timeout_s=0.3, retries=3
        )
        token = await _token(slow)
        async with (
            serving(slow) as url,
            running_worker(slow),
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            # The worker asked the backend once at start (reference answers
            # for the answer-reading detectors); count from here.
            before = stub.infer_calls
            response = await http.post(
                INFER, json=body(X_TEST[:2], "slow-1"), headers=bearer(token)
            )
    finally:
        stub.stop()
    assert response.status_code == 504, response.text
    assert response.json() == {
        "error": response.json()["error"],
        "code": "BACKEND_TIMEOUT",
        "retriable": True,
    }
    # Three retries were allowed, but a read timeout is not safe to retry.
    assert stub.infer_calls - before == 1


async def test_backend_503_is_retried_and_served(
    settings: Settings, models_dir: Path
) -> None:
    model = load_model(models_dir, "digits")
    stub = StubOip(model, unavailable_first=1).start()
    try:
        loading = with_backend(
            settings, kind="oip", url=stub.url, retries=2, retry_backoff_s=0.05
        )
        token = await _token(loading)
        async with (
            serving(loading) as url,
            running_worker(loading),
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            # Refuse the next call, the request's first (the worker's start-up
            # call for reference answers came before).
            before = stub.infer_calls
            stub.unavailable_first = before + 1
            response = await http.post(
                INFER, json=body(X_TEST[:3]), headers=bearer(token)
            )
    finally:
        stub.stop()
    assert response.status_code == 200, response.text
    # Refused before any work was done, so retried: two calls, one answer.
    assert stub.infer_calls - before == 2
    np.testing.assert_array_equal(
        output(response).astype(np.float32), model.predict_proba(X_TEST[:3])
    )


async def test_hidden_suspicion_answers_200_slowly_instead_of_refusing(
    stack: StackInfo, models_dir: Path
) -> None:
    # Uniform noise is out of distribution for the digits model, and the ood
    # detector judges from the first query: the rule would block at once.
    hide_delay_s = 1.0
    settings = with_instance(
        isolated_settings(
            stack.kafka_bootstrap,
            stack.redis_url,
            models_dir,
            requests_partitions=1,
            policy={
                "rules": [{"action": "block", "risk_at": 1.0}],
                "hide_suspicion": True,
                "hide_delay_s": hide_delay_s,
                "hide_degrade": "label",
            },
            detectors={"ood": {"min_queries": 1, "window": 5, "threshold": 0.2}},
            limits={"rate_per_s": 10_000, "burst": 10_000},
        )
    )
    token = await _token(settings, "eve")
    async with (
        serving(settings) as url,
        running_worker(settings),
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        sent_at = time.monotonic()
        response = await http.post(
            INFER, json=body(NOISE[:1], "hidden-1"), headers=bearer(token)
        )
        took_s = time.monotonic() - sent_at
        decisions = await read_topic(
            settings,
            settings.kafka.topics.decisions,
            until=lambda found: any(d["request_id"] == "hidden-1" for d in found),
            timeout_s=10,
        )

    # An ordinary-looking answer: 200, action allow, no degrade marker, no
    # Retry-After; only slower and coarser (one-hot).
    assert response.status_code == 200, response.text
    assert response.json()["parameters"] == {"action": "allow"}
    assert "Retry-After" not in response.headers
    assert sorted(set(output(response).ravel().tolist())) == [0.0, 1.0]
    assert took_s >= hide_delay_s
    # The gateway knows the truth: it would have blocked.
    (decision,) = [d for d in decisions if d["request_id"] == "hidden-1"]
    assert decision["would_be_action"] == "block" and decision["hidden"], decision
