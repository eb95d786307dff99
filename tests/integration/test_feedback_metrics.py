"""The poisoning guard's Prometheus metrics after real runs through Kafka and
Redis: the endpoint on ``feedback.metrics_port`` counts exactly the verdicts
that reached the accepted and rejected topics, by model, verdict, code and
check; shadow mode counts what it would have refused; the loop's lag, batch
time and the Redis breaker are exported."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Settings
from gateway.feedback_data import calibration_rows
from tests.conftest import StackInfo
from tests.integration.test_adversarial import _free_port
from tests.integration.test_feedback_guard import (
    _guard_settings,
    running,
    sender,
    verdicts,
)
from tests.integration.test_worker import _http_get

pytestmark = pytest.mark.timeout(90)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _scrape(port: int) -> Samples:
    """Every sample of the /metrics page on ``port``, by name and labels."""
    body = await asyncio.get_running_loop().run_in_executor(
        None, lambda: _http_get(f"http://127.0.0.1:{port}/metrics")
    )
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def _counts(samples: Samples, name: str) -> Counter[tuple[tuple[str, str], ...]]:
    """The non-zero samples of counter ``name``, by sorted label pairs."""
    return Counter(
        {
            tuple(sorted(labels)): int(value)
            for (sample, labels), value in samples.items()
            if sample == name and value
        }
    )


@pytest.fixture
def guard_settings(stack: StackInfo, models_dir: Path) -> Iterator[Settings]:
    """The guard test's isolated settings, with the metrics endpoint on."""
    with _guard_settings(stack, models_dir, stack.redis_url) as settings:
        update = {"metrics_port": _free_port(0)}
        yield settings.model_copy(
            update={"feedback": settings.feedback.model_copy(update=update)}
        )


@pytest.fixture(scope="module")
def held() -> tuple[np.ndarray, np.ndarray]:
    """Clean digits the guard did not calibrate on."""
    _, (x, y) = calibration_rows("digits")
    return x.astype(np.float32), y


async def test_the_guard_counts_exactly_the_verdicts_it_produced(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray]
) -> None:
    settings = guard_settings
    x, y = held
    async with sender(settings) as s:
        await s.raw(b"\xff{ not json")
        ids = {await s.row(x[i], int(y[i])) for i in range(6)}
        ids.add(await s.row(x[6], 10))  # UNKNOWN_LABEL
        ids.add(await s.row(x[7], int(y[7]), sign=False))  # AUTH_MISSING
        trigger = x[8].copy()
        trigger[[0, 7, 56, 63]] = 16.0
        ids.add(await s.row(trigger, 0))  # POISON_TRIGGER, by rarity
        async with running(settings) as guard:
            found = await verdicts(settings, ids | {"None"})
            samples = await _scrape(guard.metrics_port)
            batches = guard.batches_done

    # What the topics hold, in the metric's labels: a rejected record names
    # its model only once authenticated, and so does the metric.
    expected: Counter[tuple[tuple[str, str], ...]] = Counter()
    for records in found.values():
        for r in records:
            accepted = r["_topic"] == "accepted"
            labels = {
                "model": r.get("model") or "",
                "verdict": r["_topic"],
                "code": "" if accepted else r["code"],
                "detector": "" if accepted else (r.get("detector") or ""),
            }
            expected[tuple(sorted(labels.items()))] += 1
    body = json.dumps({str(k): v for k, v in samples.items()})[:3000]
    assert sum(expected.values()) == 10, found
    assert _counts(samples, "modelgate_feedback_records_total") == expected, body
    codes = {dict(k)["code"] for k in expected}
    assert codes == {
        "",
        "MALFORMED_JSON",
        "UNKNOWN_LABEL",
        "AUTH_MISSING",
        "POISON_TRIGGER",
    }, expected
    # Screened: the records the checks judged (six clean ones and the trigger).
    assert _counts(samples, "modelgate_feedback_screened_total") == Counter(
        {(("model", "digits"),): 7}
    ), body
    assert not _counts(samples, "modelgate_feedback_would_reject_total"), body

    # The loop's own: every batch timed, none rewound, nothing left behind.
    assert samples[("modelgate_batch_seconds_count", frozenset())] == batches
    assert batches >= 1
    assert not _counts(samples, "modelgate_batch_rewinds_total"), body
    lag = {
        (dict(labels)["topic"], dict(labels)["partition"]): value
        for (name, labels), value in samples.items()
        if name == "modelgate_consumer_lag"
    }
    assert lag == {(settings.kafka.topics.feedback, "0"): 0.0}, lag
    assert samples[("modelgate_redis_breaker_state", frozenset())] == 0.0, body


async def test_shadow_mode_counts_what_it_would_have_refused(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray]
) -> None:
    shadow = guard_settings.feedback.model_copy(update={"shadow": True})
    settings = guard_settings.model_copy(update={"feedback": shadow})
    x, y = held
    async with sender(settings) as s:
        trigger = x[0].copy()
        trigger[[0, 7, 56, 63]] = 16.0
        ids = {await s.row(trigger, 0), await s.row(x[1], int(y[1]))}
        async with running(settings) as guard:
            found = await verdicts(settings, ids)
            samples = await _scrape(guard.metrics_port)
    assert {r["_topic"] for v in found.values() for r in v} == {"accepted"}, found
    accepted = (("code", ""), ("detector", ""), ("model", "digits"))
    assert _counts(samples, "modelgate_feedback_records_total") == Counter(
        {(*accepted, ("verdict", "accepted")): 2}
    )
    assert _counts(samples, "modelgate_feedback_would_reject_total") == Counter(
        {(("code", "POISON_TRIGGER"), ("detector", "rarity"), ("model", "digits")): 1}
    )
