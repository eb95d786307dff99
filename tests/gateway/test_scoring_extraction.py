"""The scorer feeds the extraction and traffic detectors what they need:
arrival times before scoring, the model's answers after it (not those of
redelivered records), and how each request ended."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors.margin import MarginDetector
from detectors.traffic import TrafficDetector
from gateway.batch import BatchItem
from gateway.config import load_settings
from gateway.errors import ValidationError
from gateway.keys import ApiKey
from gateway.metrics import WorkerMetrics
from gateway.models import ServedModel, digits_split, ensure_digits_model, load_model
from gateway.scoring import Scorer
from gateway.store import Admission


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    directory: Path = tmp_path_factory.mktemp("models")
    ensure_digits_model(directory)
    return {"digits": load_model(directory, "digits")}


def item(
    model: ServedModel, client: str, row: np.ndarray, t_s: float, outcome: str = "ok"
) -> BatchItem:
    it = BatchItem("t", 0, 0, b"", "", None)
    it.key = ApiKey("k-" + client, client, b"s", (), "active", 0)  # type: ignore[arg-type]
    it.model = model
    it.rows = row[None, :].astype(np.float32)
    it.arrived_s = t_s
    it.admission = Admission(outcome, 0, 1)  # type: ignore[arg-type]
    return it


def test_scorer_shows_answers_times_and_outcomes(
    served: dict[str, ServedModel],
) -> None:
    scorer = Scorer(load_settings(), served, WorkerMetrics())
    model = served["digits"]
    rows = digits_split()[1]
    detectors = scorer._detectors["digits"]
    margin, traffic = detectors["margin"], detectors["traffic"]
    assert isinstance(margin, MarginDetector) and isinstance(traffic, TrafficDetector)
    # Seeded at start with the model's answers to its reference sample.
    assert margin.baseline_share is not None

    batch = [item(model, "c", rows[i], 1.7e9 + i) for i in range(5)]
    scorer.score_and_predict(batch)
    assert all(i.probabilities is not None for i in batch)
    blob = margin.dump_state("c")
    assert blob is not None
    answers = margin._arena.arrays["n_answers"][margin._arena.get("c")]  # type: ignore[union-attr]
    assert int(answers) == 5
    times = traffic._arena.arrays["times"][traffic._arena.get("c")]  # type: ignore[union-attr]
    assert sorted(times[:5].tolist()) == [1.7e9 + i for i in range(5)]

    # A redelivered record is answered but its answer is not counted again;
    # a failed request counts as an error for the traffic detector.
    again = [item(model, "c", rows[0], 1.7e9 + 10, outcome="redelivery")]
    bad = item(model, "c", rows[1], 1.7e9 + 11)
    bad.fail(ValidationError("nope", code="SCHEMA_INVALID"))
    scorer.score_and_predict([*again, bad])
    answers = margin._arena.arrays["n_answers"][margin._arena.get("c")]  # type: ignore[union-attr]
    assert int(answers) == 5
    slot = traffic._arena.get("c")  # type: ignore[union-attr]
    errored = traffic._arena.arrays["errored"][slot]  # type: ignore[union-attr]
    assert int(errored.sum()) == 1
