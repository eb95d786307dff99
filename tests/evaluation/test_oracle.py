"""Query functions and bookkeeping, with a stand-in for the gateway client."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, cast

import numpy as np
import pytest

from evaluation.ledger import ClientLedger
from evaluation.observe import AlertCollector
from evaluation.oracle import (
    BudgetExhausted,
    DirectOracle,
    GatewayOracle,
    Pacer,
    QueryRefused,
    pacing_summary,
)
from gateway.client import GatewayClient, KafkaTransport
from gateway.protocol import ErrorBody, InferResponse, Tensor

Array = np.ndarray[Any, Any]

pytestmark = pytest.mark.timeout(30)


def _proba(rows: Array) -> Array:
    out = np.zeros((len(rows), 3), dtype=np.float32)
    out[np.arange(len(rows)), np.asarray(rows)[:, 0].astype(int) % 3] = 1.0
    return out


def test_direct_oracle_enforces_the_budget_and_keeps_partial_answers() -> None:
    oracle = DirectOracle(_proba, budget=5)
    assert oracle(np.array([[0.0], [1.0], [2.0]])).shape == (3, 3)
    with pytest.raises(BudgetExhausted) as info:
        oracle(np.array([[1.0], [2.0], [0.0]]))
    assert info.value.answered.tolist() == [True, True, False]
    np.testing.assert_array_equal(
        info.value.probabilities[:2], _proba(np.array([[1.0], [2.0]]))
    )
    assert oracle.used == 5


class _FakeClient:
    """Answers like the gateway: ok until ``refuse_after`` requests, then
    BLOCKED."""

    client_id = "fake"

    def __init__(self, refuse_after: int) -> None:
        self.refuse_after = refuse_after
        self.sent: list[str] = []

    async def infer(
        self, rows: Array, *, request_id: str | None = None, timeout_s: float = 1.0
    ) -> InferResponse:
        assert request_id is not None
        self.sent.append(request_id)
        await asyncio.sleep(0.001)
        if len(self.sent) > self.refuse_after:
            return InferResponse(
                v=1,
                request_id=request_id,
                status="error",
                ts_ms=0,
                error=ErrorBody(code="BLOCKED", message="cool-down"),
                retry_after_ms=1000,
            )
        proba = _proba(rows)
        return InferResponse(
            v=1,
            request_id=request_id,
            status="ok",
            ts_ms=0,
            action="flag" if len(self.sent) == self.refuse_after else "allow",
            outputs=[
                Tensor("probabilities", [1, 3], "FP32", proba.ravel().tolist()),
                Tensor("label", [1], "INT64", [int(proba.argmax())]),
            ],
        )


async def test_gateway_oracle_bridges_threads_and_stops_at_refusal() -> None:
    fake = _FakeClient(refuse_after=4)
    ledger = ClientLedger("fake", "extraction")
    oracle = GatewayOracle(
        cast(GatewayClient, fake),
        ledger,
        asyncio.get_running_loop(),
        budget=100,
        rate_per_s=1000.0,
        concurrency=1,
    )
    rows = np.arange(8, dtype=np.float32)[:, None]

    first = await asyncio.to_thread(oracle, rows[:3])
    np.testing.assert_array_equal(first, _proba(rows[:3]))
    with pytest.raises(QueryRefused) as info:
        await asyncio.to_thread(oracle, rows[3:])

    stop = info.value
    assert stop.reason == "BLOCKED"
    # One more answer, then the refusal; nothing after it is sent.
    assert stop.answered.tolist() == [True, False, False, False, False]
    assert len(fake.sent) == 5
    assert oracle.used == 5
    summary = ledger.summary()
    assert summary["requests"] == 5
    assert summary["allowed"] == 4
    assert summary["flagged"] == 1
    assert summary["blocked"] == 1
    assert summary["first_refusal_query"] == 5


async def test_gateway_oracle_honours_cancel() -> None:
    cancel = threading.Event()
    cancel.set()
    oracle = GatewayOracle(
        cast(GatewayClient, _FakeClient(100)),
        ClientLedger("fake", "probing"),
        asyncio.get_running_loop(),
        budget=10,
        rate_per_s=100.0,
        cancel=cancel,
    )
    with pytest.raises(Exception, match="CANCELLED"):
        await asyncio.to_thread(oracle, np.zeros((2, 1)))


def test_pacer_gaps_are_exact_or_exponential_with_the_same_mean() -> None:
    """Paced gaps are the interval itself (what `traffic`'s regularity picks
    out); Poisson gaps keep the mean but spread like an honest client's
    (coefficient of variation 1)."""
    paced = Pacer(rate_per_s=40.0)
    assert {paced.next_gap() for _ in range(100)} == {0.025}
    poisson = Pacer(rate_per_s=40.0, rng=np.random.default_rng(0))
    gaps = np.array([poisson.next_gap() for _ in range(20_000)])
    assert gaps.mean() == pytest.approx(0.025, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)


async def test_pacer_spaces_calls() -> None:
    pacer = Pacer(rate_per_s=100.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(6):
        await pacer.wait()
    assert loop.time() - started >= 0.045


async def test_pacer_records_how_late_each_sleeping_wait_woke() -> None:
    """A wait that slept records its lag (never negative); a call arriving
    after its slot, as after an attacker's retraining, records none."""
    pacer = Pacer(rate_per_s=200.0)
    for _ in range(5):
        await pacer.wait()
    assert len(pacer.lags_s) == 4  # the first call's slot is "now": no sleep
    assert all(lag >= 0.0 for lag in pacer.lags_s)
    await asyncio.sleep(0.05)  # idle past the next slot
    await pacer.wait()
    assert len(pacer.lags_s) == 4


async def test_pacing_lag_shows_a_blocked_event_loop() -> None:
    """A loop held busy past a paced request's slot shows as lag, the way a
    loaded machine spreads a metronome's gaps."""
    pacer = Pacer(rate_per_s=100.0)
    await pacer.wait()

    async def hog() -> None:
        await asyncio.sleep(0.001)
        threading.Event().wait(0.05)  # blocks the loop, as a busy CPU does

    await asyncio.gather(pacer.wait(), hog())
    summary = pacing_summary([pacer])
    assert summary is not None
    assert summary["gap_ms"] == 10.0
    assert summary["max_ms"] >= 30.0
    assert pacing_summary([Pacer(rate_per_s=1.0)]) is None


def test_ledger_places_alerts_on_the_clients_own_timeline() -> None:
    ledger = ClientLedger("c", "probing")
    ids = [f"r{i}" for i in range(5)]
    for request_id in ids:
        ledger.sent(request_id)
    ledger.alerted({"detector": "similarity", "request_id": "r3", "query_index": 99})
    ledger.alerted({"detector": "ood", "request_id": "r1", "evidence": "odd"})
    ledger.alerted({"detector": "ood", "request_id": "elsewhere", "query_index": 7})
    summary = ledger.summary()
    assert summary["alerts"] == 3
    assert summary["first_alert_query"] == 2
    assert summary["first_alert_detector"] == "ood"
    assert summary["alert_detectors"] == {"similarity": 1, "ood": 2}


def test_ledger_sorts_failures_by_code() -> None:
    ledger = ClientLedger("c", "benign")
    for code in ("RATE_LIMITED", "BLOCKED", "TIMEOUT", "OUT_OF_RANGE"):
        ledger.sent(code)
        ledger.failed(code, code)
    summary = ledger.summary()
    assert (summary["throttled"], summary["blocked"], summary["errors"]) == (1, 1, 2)
    assert summary["error_codes"] == {"TIMEOUT": 1, "OUT_OF_RANGE": 1}
    assert summary["first_refusal_query"] == 1


def test_alert_collector_credits_clients_and_counts_the_rest() -> None:
    ledgers = {"a": ClientLedger("a", "extraction")}
    ledgers["a"].sent("req-1")
    first: list[str] = []
    collector = AlertCollector(
        cast(KafkaTransport, None),
        "alerts",
        ledgers,
        on_first_alert=lambda ledger, data: first.append(ledger.client_id),
    )
    event = {
        "specversion": "1.0",
        "subject": "a",
        "data": {"client_id": "a", "detector": "ood", "request_id": "req-1"},
    }
    collector.handle(json.dumps(event).encode())
    collector.handle(json.dumps(event).encode())
    collector.handle(json.dumps({"subject": "b", "data": {"client_id": "b"}}).encode())
    collector.handle(b"not json")
    collector.handle(None)

    assert collector.total == 3
    assert collector.foreign == 1
    assert collector.undecodable == 2
    assert collector.by_detector == {"ood": 2, "?": 1}
    assert ledgers["a"].alerts == 2
    assert first == ["a"]
    assert ledgers["a"].first_alert_query == 1
