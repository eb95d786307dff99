"""The guard's screening step against a model that breaks its contract: the
batch's records get ``BACKEND_ERROR`` verdicts instead of the exception
ending the run loop. No broker needed: ``_screen`` is the step under test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition

from gateway.config import Settings
from gateway.feedback import FeedbackGuard, _Item, build_guard, guard_params
from gateway.feedback_data import calibration_rows
from gateway.feedback_wire import build_feedback
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


def _items(n: int) -> list[_Item]:
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
        item = _Item(TopicPartition("t", 0), i, value, "c", None, record=record)
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
