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


class _NonFiniteModel:
    """The served digits model, except that it answers NaN for rows whose
    first pixel is 16 (as a broken or overflowing model might)."""

    def __init__(self, model: ServedModel) -> None:
        self._model = model

    def __getattr__(self, name: str) -> object:
        return getattr(self._model, name)

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        proba = np.array(self._model.predict_proba(rows), dtype=np.float32)
        proba[rows[:, 0] == 16] = np.nan
        return proba


def test_non_finite_answers_fail_their_request_only(
    served: dict[str, ServedModel],
) -> None:
    model = _NonFiniteModel(served["digits"])
    scorer = Scorer(load_settings(), {"digits": model}, WorkerMetrics())  # type: ignore[dict-item]
    rows = digits_split()[1][:5].copy()
    rows[:, 0] = 0
    rows[2, 0] = 16
    rows[4, 0] = 16
    batch = [item(model, f"c{i}", rows[i], 1.7e9 + i) for i in range(4)]  # type: ignore[arg-type]
    # c3 sends two rows in one request, the second answered NaN: the
    # request fails whole, and its good first row is not observed either.
    batch[3].rows = rows[3:5].astype(np.float32)
    scorer.score_and_predict(batch)
    broken = batch[2]
    assert broken.probabilities is None and broken.error is not None
    assert broken.error.code == "BACKEND_ERROR"
    assert batch[3].probabilities is None and batch[3].error is not None
    for good in (batch[0], batch[1]):
        assert good.error is None and good.probabilities is not None
        assert np.isfinite(good.probabilities).all()
    # The detectors saw the good answers and not the broken one.
    margin = scorer._detectors["digits"]["margin"]
    assert margin._arena is not None
    for client, want in (("c0", 1), ("c1", 1), ("c2", 0), ("c3", 0)):
        slot = margin._arena.get(client)
        got = 0 if slot is None else int(margin._arena.arrays["n_answers"][slot])
        assert got == want, client
