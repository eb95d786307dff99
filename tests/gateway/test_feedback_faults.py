"""The guard's decode, validate and screen steps against hostile values and a
model that breaks its contract: each record gets one coded verdict and the
exception never ends the run loop. No broker needed: the steps are called
directly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition

from gateway.config import Settings
from gateway.feedback import FeedbackGuard, build_guard, guard_params
from gateway.feedback_data import calibration_rows
from gateway.feedback_steps import FeedbackItem, decode, rejected_message, validate
from gateway.feedback_wire import (
    FEEDBACK_CODES,
    build_feedback,
    decode_feedback,
    decode_rejected,
)
from gateway.models import ServedModel, load_model
from gateway.zoo import ensure_model


class Misbehaving:
    """A served model whose answers can be replaced by a fault."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.signature = model.signature
        self.reference = model.reference
        self.fault: str | None = None

    def predict_proba(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self.fault == "raises":
            raise RuntimeError("estimator exploded")
        proba = self.model.predict_proba(rows)
        if self.fault == "short":
            return proba[:-1]
        return proba


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeedbackGuard, Any]:
    directory: Path = tmp_path_factory.mktemp("zoo")
    ensure_model(directory, "digits")
    model = Misbehaving(load_model(directory, "digits"))
    settings = Settings()
    guard = FeedbackGuard(settings, {"digits": model})  # type: ignore[dict-item]
    guard._guards["digits"] = build_guard(
        settings,
        "digits",
        model,  # type: ignore[arg-type]
        guard_params(settings),
    )
    return guard, model


def _items(n: int) -> list[FeedbackItem]:
    _, (x, y) = calibration_rows("digits")
    items = []
    for i in range(n):
        record, value, _ = build_feedback(
            key_id="k",
            secret=b"s",
            model="digits",
            input_name="pixels",
            row=x[i],
            label=int(y[i]),
        )
        item = FeedbackItem(TopicPartition("t", 0), i, value, "c", None, record=record)
        item.client_id = "c"
        item.row = x[i].astype(np.float32)
        item.label_index = int(y[i])
        items.append(item)
    return items


@pytest.mark.parametrize("fault", ["raises", "short"])
def test_a_model_breaking_its_contract_fails_the_records_not_the_guard(
    service: tuple[FeedbackGuard, Any], fault: str
) -> None:
    guard, model = service
    model.fault = fault
    try:
        items = _items(3)
        guard._screen(items)
    finally:
        model.fault = None
    assert [i.error.code if i.error else None for i in items] == ["BACKEND_ERROR"] * 3
    assert all(i.error is not None and i.error.retriable for i in items)
    # The same guard goes on judging once the model answers again.
    items = _items(3)
    guard._screen(items)
    assert all(i.error is None and i.verdict is not None for i in items)


def _value(**changes: Any) -> bytes:
    record: dict[str, Any] = {
        "v": 1,
        "feedback_id": "f",
        "key_id": "k",
        "ts_ms": 1,
        "model": "digits",
        "inputs": [
            {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
        ],
        "label": 0,
    }
    tensor = changes.pop("tensor", {})
    record["inputs"][0].update(tensor)
    record.update(changes)
    return json.dumps(record, separators=(",", ":")).encode()


_HOSTILE = [
    (b"", "MALFORMED_JSON"),
    (b"null", "SCHEMA_INVALID"),
    (b"[" * 100_000 + b"]" * 100_000, "SCHEMA_INVALID"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "PAYLOAD_TOO_LARGE"),
    (_value().replace(b"0.0", b"NaN", 1), "MALFORMED_JSON"),
    (_value().replace(b"0.0", b"Infinity", 1), "MALFORMED_JSON"),
    (_value().replace(b"0.0", b"1e999", 1), "NON_FINITE"),
    (_value(label=2**80), "UNKNOWN_LABEL"),
    (_value(label=True), "SCHEMA_INVALID"),
    (_value(label="1"), "SCHEMA_INVALID"),
    (_value(v=2**70), "UNSUPPORTED_VERSION"),
    (_value(feedback_id="x" * 200), "SCHEMA_INVALID"),
    (_value().replace(b'"f"', b'"\\ud800"'), "MALFORMED_JSON"),
    (b"\xef\xbb\xbf" + _value(), "MALFORMED_JSON"),
    (_value() + _value(), "MALFORMED_JSON"),
    (_value(inputs=[]), "TENSOR_NAME"),
    (_value(tensor={"shape": [10**18, 64]}), "SHAPE_MISMATCH"),
    (_value(tensor={"shape": [1, 8, 8]}), "SHAPE_MISMATCH"),
    (_value(tensor={"data": [True] * 64}), "SCHEMA_INVALID"),
    (_value(tensor={"datatype": "INT64"}), "DTYPE_MISMATCH"),
    (_value(tensor={"data": [-1e30] * 64}), "OUT_OF_RANGE"),
    (_value(tensor={"data": [0.0] * 10**6}), "PAYLOAD_TOO_LARGE"),
    (
        json.dumps(
            {"v": 1, "request_id": "r", "key_id": "k", "ts_ms": 1, "model": "digits"}
        ).encode(),
        "SCHEMA_INVALID",
    ),
]


@pytest.mark.parametrize(("value", "code"), _HOSTILE)
def test_hostile_values_become_one_coded_rejection(
    service: tuple[FeedbackGuard, Any], value: bytes, code: str
) -> None:
    guard, model = service

    record = SimpleNamespace(key=b"c", headers=[], offset=0, value=value)
    item = decode(
        TopicPartition("t", 0), record, guard.settings.kafka.max_message_bytes
    )
    if item.error is None:
        item.client_id = "c"
        validate([item], {"digits": model}, guard._guards)
    assert item.error is not None and item.error.code == code, item.error
    assert code in FEEDBACK_CODES


def test_a_rejection_stays_small_whatever_the_record_quotes(
    service: tuple[FeedbackGuard, Any],
) -> None:
    # A shape of 400,000 zeros fits a 1 MiB message limit (800 KB) and was
    # quoted whole in the SHAPE_MISMATCH message: a rejected record of
    # 1.2 MB, over the producer's 1 MiB request limit, so the produce failed
    # and the batch was retried forever.
    guard, model = service
    value = _value(tensor={"shape": [0] * 400_000})
    assert len(value) < 1_048_576
    item = FeedbackItem(
        TopicPartition("t", 0), 0, value, "c", None, record=decode_feedback(value)
    )
    item.client_id = "c"
    validate([item], {"digits": model}, guard._guards)
    assert item.error is not None and item.error.code == "SHAPE_MISMATCH"
    _, rejected = rejected_message(item, 0)
    # The kept value (its first 64 KiB, base64) and a clipped message.
    assert len(rejected) < 100_000, len(rejected)


def test_an_oversize_record_is_rejected_under_its_feedback_id(
    service: tuple[FeedbackGuard, Any],
) -> None:
    """Regression: an oversize record's rejection named neither its feedback
    id nor its key id, so its sender could not find it (the worker answers an
    oversize request under its request id since e2f92df)."""
    guard, _ = service
    value = _value(feedback_id="fb-big", key_id="mgk_0123456789ab",
                   tensor={"data": [0.0] * 10**6})  # fmt: skip
    limit = guard.settings.kafka.max_message_bytes
    assert len(value) > limit
    record = SimpleNamespace(key=b"c", headers=[], offset=7, value=value)
    item = decode(TopicPartition("t", 0), record, limit)
    assert item.error is not None and item.error.code == "PAYLOAD_TOO_LARGE"
    key, raw = rejected_message(item, 0)
    rejected = decode_rejected(raw)
    assert rejected.code == "PAYLOAD_TOO_LARGE"
    assert rejected.feedback_id == "fb-big"
    assert rejected.key_id == "mgk_0123456789ab"
    assert rejected.offset == 7
    # Not authenticated: the record names no client and is not keyed by one.
    assert rejected.client_id is None and key is None


@pytest.mark.parametrize("second", [b"0" * 64, None, "same"])
def test_a_feedback_record_with_several_signatures_is_refused(
    second: bytes | str | None,
) -> None:
    """The guard read the last ``mg-sig`` header, as the worker did: several
    are ambiguous, AUTH_BAD_SIGNATURE before the key is looked up."""
    _, value, headers = build_feedback(
        key_id="mgk_0123456789ab",
        secret=b"s" * 32,
        model="digits",
        input_name="pixels",
        row=np.zeros(64),
        label=3,
    )
    extra = headers[0][1] if second == "same" else second
    record = SimpleNamespace(
        key=b"c", headers=[*headers, ("mg-sig", extra)], offset=0, value=value
    )
    item = decode(TopicPartition("t", 0), record, 1_048_576)
    assert item.error is not None and item.error.code == "AUTH_BAD_SIGNATURE"
    assert "2 mg-sig headers" in item.error.message
    assert item.record is not None  # still decoded, so the rejection names it
