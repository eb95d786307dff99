"""Model backends through the real request path: a worker on the real broker
and Redis whose model is served by ONNX in-process, by a real MLServer over
HTTP, or by a tiny loopback OIP server that is slow or dead on demand."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.backends.oip import OipBackend
from gateway.backends.onnx import OnnxBackend, ensure_digits_onnx
from gateway.config import BackendConfig, Settings, load_settings
from gateway.errors import ConfigError
from gateway.models import digits_split, load_model
from tests.integration.helpers import (
    RawKafka,
    create_key,
    responses_for,
    running_worker,
)
from tests.integration.oip_servers import MLServerInfo, StubOip, mlserver_proba

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

X_TEST = digits_split()[1]


def with_backend(settings: Settings, **backend: Any) -> Settings:
    data = settings.model_dump()
    data["models"]["backends"] = {"digits": backend}
    return load_settings(**data)


def probabilities(answer: dict[str, Any]) -> np.ndarray:
    outputs = {o["name"]: o for o in answer["outputs"]}
    return np.asarray(outputs["probabilities"]["data"], np.float32)


async def ask(
    settings: Settings, kafka: RawKafka, key: tuple[str, bytes], rows: np.ndarray
) -> dict[str, Any]:
    """Send one request and wait for its answer."""
    request_id = await kafka.send_request(key[0], key[1], rows, client_id="alice")
    await kafka.flush()
    return (await responses_for(settings, [request_id]))[request_id]


def test_onnx_probabilities_match_sklearn(models_dir: Path) -> None:
    ensure_digits_onnx(models_dir)
    onnx = OnnxBackend.load(models_dir, "digits").predict_proba(X_TEST)
    sklearn = load_model(models_dir, "digits").predict_proba(X_TEST)
    assert onnx.shape == sklearn.shape == (len(X_TEST), 10)
    np.testing.assert_allclose(onnx, sklearn, rtol=0, atol=1e-5)


async def test_onnx_backend_through_a_worker(
    settings: Settings, kafka: RawKafka, models_dir: Path
) -> None:
    onnx_settings = with_backend(settings, kind="onnx")
    key = await create_key(settings, "alice")
    rows = X_TEST[:3]
    async with running_worker(onnx_settings) as worker:
        assert worker._models is not None
        assert worker._models["digits"].kind == "onnx"
        answer = await ask(onnx_settings, kafka, key, rows)
    assert answer["status"] == "ok", answer
    expected = OnnxBackend.load(models_dir, "digits").predict_proba(rows)
    np.testing.assert_array_equal(probabilities(answer), expected.reshape(-1))


def test_signature_is_read_from_mlserver_metadata(
    mlserver: MLServerInfo, models_dir: Path, tmp_path: Path
) -> None:
    backend = OipBackend.connect(
        models_dir, "digits", BackendConfig(kind="oip", url=mlserver.url)
    )
    try:
        (spec,) = backend.signature.inputs
        # Name, datatype and shape from MLServer; the range from our file.
        assert (spec.name, spec.datatype, spec.shape) == ("pixels", "FP32", (-1, 64))
        assert (spec.min, spec.max) == (0.0, 16.0)
    finally:
        backend.close()

    # Our declaration disagreeing with MLServer's stops the start.
    for suffix in (".signature.json", ".reference.npy"):
        shutil.copy(models_dir / f"digits{suffix}", tmp_path / f"digits{suffix}")
    path = tmp_path / "digits.signature.json"
    path.write_text(path.read_text().replace('"FP32"', '"FP64"', 1))
    with pytest.raises(ConfigError, match="FP64 locally but FP32 on the remote"):
        OipBackend.connect(
            tmp_path, "digits", BackendConfig(kind="oip", url=mlserver.url)
        )
    with pytest.raises(ConfigError, match="does not serve 'nosuch'"):
        OipBackend.connect(
            models_dir,
            "digits",
            BackendConfig(kind="oip", url=mlserver.url, remote_name="nosuch"),
        )


async def test_worker_on_mlserver_answers_what_mlserver_answers(
    settings: Settings, kafka: RawKafka, mlserver: MLServerInfo
) -> None:
    remote = with_backend(settings, kind="oip", url=mlserver.url)
    key = await create_key(settings, "alice")
    batches = [X_TEST[0:1], X_TEST[1:3], X_TEST[3:6]]
    async with running_worker(remote) as worker:
        request_ids = [
            await kafka.send_request(key[0], key[1], rows, client_id="alice")
            for rows in batches
        ]
        await kafka.flush()
        answers = await responses_for(remote, request_ids)
        calls = worker.metrics.registry.get_sample_value(
            "modelgate_backend_seconds_count", {"model": "digits", "kind": "oip"}
        )
    assert calls is not None and calls >= 1
    for request_id, rows in zip(request_ids, batches, strict=True):
        answer = answers[request_id]
        assert answer["status"] == "ok", answer
        direct = mlserver_proba(mlserver.url, rows).astype(np.float32)
        np.testing.assert_allclose(
            probabilities(answer), direct.reshape(-1), rtol=0, atol=1e-7
        )


async def test_slow_backend_times_out_and_is_not_retried(
    settings: Settings, kafka: RawKafka, models_dir: Path
) -> None:
    stub = StubOip(load_model(models_dir, "digits"), delay_s=3.0).start()
    try:
        slow = with_backend(
            settings, kind="oip", url=stub.url, read_timeout_s=0.3, retries=3
        )
        key = await create_key(settings, "alice")
        async with running_worker(slow) as worker:
            # The worker asked once at start (reference answers for the
            # answer-reading detectors); count the request's calls from here.
            before = stub.infer_calls
            answer = await ask(slow, kafka, key, X_TEST[:2])
            errors = worker.metrics.registry.get_sample_value(
                "modelgate_backend_errors_total",
                {"model": "digits", "kind": "oip", "code": "BACKEND_TIMEOUT"},
            )
    finally:
        stub.stop()
    assert answer["status"] == "error"
    assert answer["error"]["code"] == "BACKEND_TIMEOUT", answer
    assert answer["error"]["retriable"] is True
    # Three retries were allowed, but a read timeout is never retried.
    assert stub.infer_calls - before == 1
    assert errors == 1


async def test_a_trickling_backend_is_cut_off_at_the_call_deadline(
    settings: Settings, kafka: RawKafka, models_dir: Path
) -> None:
    """Every read is quick, so ``read_timeout_s`` never fires: only the
    deadline on the whole call stops a server sending a byte at a time."""
    stub = StubOip(load_model(models_dir, "digits")).start()
    try:
        trickled = with_backend(
            settings, kind="oip", url=stub.url, read_timeout_s=1.0, call_timeout_s=1.0
        )
        key = await create_key(settings, "alice")
        async with running_worker(trickled):
            # ~400 bytes at 20 ms each: about 8 s to answer two rows in full.
            stub.trickle_s = 0.02
            answer = await ask(trickled, kafka, key, X_TEST[:2])
    finally:
        stub.stop()
    assert answer["status"] == "error", answer
    assert answer["error"]["code"] == "BACKEND_TIMEOUT", answer
    assert "call_timeout_s 1.0" in answer["error"]["message"]


async def test_a_batch_larger_than_max_batch_rows_goes_in_pieces(
    settings: Settings, kafka: RawKafka, models_dir: Path
) -> None:
    model = load_model(models_dir, "digits")
    stub = StubOip(model).start()
    try:
        small = with_backend(settings, kind="oip", url=stub.url, max_batch_rows=3)
        key = await create_key(settings, "alice")
        async with running_worker(small):
            # At start the worker asked for its reference answers, in pieces.
            assert stub.rows_per_call and max(stub.rows_per_call) == 3
            stub.rows_per_call.clear()
            answer = await ask(small, kafka, key, X_TEST[:7])
    finally:
        stub.stop()
    assert answer["status"] == "ok", answer
    assert stub.rows_per_call == [3, 3, 1]
    # The stub's model ran on pieces of 3 rows: equal up to BLAS rounding.
    np.testing.assert_allclose(
        probabilities(answer),
        model.predict_proba(X_TEST[:7]).reshape(-1),
        rtol=0,
        atol=1e-6,
    )


async def test_dead_backend_opens_the_breaker_and_recovers(
    settings: Settings, kafka: RawKafka, models_dir: Path
) -> None:
    model = load_model(models_dir, "digits")
    stub = StubOip(model).start()
    flaky = with_backend(
        settings,
        kind="oip",
        url=stub.url,
        retries=0,
        breaker_failures=2,
        breaker_cooldown_s=1.0,
        connect_timeout_s=0.5,
    )
    key = await create_key(settings, "alice")
    rows = X_TEST[:1]
    try:
        async with running_worker(flaky) as worker:

            def breaker() -> float | None:
                return worker.metrics.registry.get_sample_value(
                    "modelgate_backend_breaker_state", {"model": "digits"}
                )

            assert (await ask(flaky, kafka, key, rows))["status"] == "ok"
            assert breaker() == 0
            stub.stop()
            for _ in range(2):  # connection refused, twice: the breaker opens
                answer = await ask(flaky, kafka, key, rows)
                assert answer["error"]["code"] == "BACKEND_UNAVAILABLE", answer
                assert "cannot be reached" in answer["error"]["message"]
            assert breaker() == 2
            answer = await ask(flaky, kafka, key, rows)
            assert answer["error"]["code"] == "BACKEND_UNAVAILABLE", answer
            assert "circuit open" in answer["error"]["message"]

            stub.start()  # same port
            calls_before = stub.infer_calls
            deadline = time.monotonic() + 20.0
            while True:
                answer = await ask(flaky, kafka, key, rows)
                if answer["status"] == "ok":
                    break
                assert answer["error"]["code"] == "BACKEND_UNAVAILABLE", answer
                assert time.monotonic() < deadline, "the breaker never closed"
            assert breaker() == 0
            assert stub.infer_calls == calls_before + 1  # exactly the probe
            np.testing.assert_array_equal(
                probabilities(answer), model.predict_proba(rows).reshape(-1)
            )
    finally:
        stub.stop()
