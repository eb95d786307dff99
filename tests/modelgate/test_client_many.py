"""``infer_many``'s own logic over an in-memory transport: order, the bound on
requests in flight, errors kept or raised, inputs checked before any send.
The same calls through a real worker and broker are in
tests/integration/test_modelgate_client.py."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from modelgate import errors
from modelgate.client import AsyncClient, Client
from modelgate.results import InferResult
from modelgate.retry import RetryPolicy

NO_RETRY = RetryPolicy(max_attempts=1)


class Held:
    """Answers each request with its first feature as its label, once
    ``release`` is set; a request whose first feature is negative is refused
    as unknown at once. Counts requests in flight and those cancelled."""

    def __init__(self, full_at: int = 0) -> None:
        self.release = asyncio.Event()
        # Set once ``full_at`` requests are in flight together.
        self.full = asyncio.Event()
        self.full_at = full_at
        self.in_flight = 0
        self.peak = 0
        self.sent: list[str] = []
        self.cancelled = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        request_id: str,
        timeout_s: float,
    ) -> InferResult:
        self.sent.append(request_id)
        first = float(inputs["pixels"][0, 0])
        if first < 0:
            raise errors.UnknownModelError("no", request_id=request_id)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.in_flight == self.full_at:
            self.full.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        label = np.asarray([int(first)])
        return InferResult(request_id, model, {"label": label})


def rows(*firsts: float) -> list[np.ndarray[Any, Any]]:
    return [np.full(4, value) for value in firsts]


async def test_results_come_in_order_with_at_most_concurrency_in_flight() -> None:
    transport = Held(full_at=3)
    client = AsyncClient(transport, retry=NO_RETRY)
    call = asyncio.ensure_future(
        client.infer_many("m", rows(*range(10)), concurrency=3)
    )
    await asyncio.wait_for(transport.full.wait(), 10)
    for _ in range(20):  # give a fourth request every chance to start
        await asyncio.sleep(0)
    assert transport.in_flight == 3
    transport.release.set()
    results = await call
    assert [int(r["label"][0]) for r in results] == list(range(10))
    assert transport.peak == 3
    assert len(set(transport.sent)) == 10  # a request id each


async def test_errors_are_kept_in_place_when_asked() -> None:
    transport = Held()
    transport.release.set()
    client = AsyncClient(transport, retry=NO_RETRY)
    results = await client.infer_many("m", rows(1, -1, 2), return_errors=True)
    assert isinstance(results[0], InferResult) and isinstance(results[2], InferResult)
    assert isinstance(results[1], errors.UnknownModelError)
    assert len(transport.sent) == 3


async def test_the_first_error_is_raised_and_the_rest_cancelled() -> None:
    transport = Held()
    client = AsyncClient(transport, retry=NO_RETRY)
    # Item 1 waits for an answer that never comes; item 0 is refused at once.
    with pytest.raises(errors.UnknownModelError):
        await client.infer_many("m", rows(1, -1, 2, 3, 4), concurrency=2)
    # Whatever had started was cancelled, not left waiting behind the caller.
    assert transport.in_flight == 0
    assert transport.cancelled == len(transport.sent) - 1 >= 1


async def test_a_bad_item_is_named_and_nothing_is_sent() -> None:
    transport = Held()
    client = AsyncClient(transport, retry=NO_RETRY)
    with pytest.raises(ValueError, match="batch item 1: no inputs given"):
        await client.infer_many("m", [np.zeros(4), {}])
    with pytest.raises(ValueError, match="concurrency"):
        await client.infer_many("m", rows(1), concurrency=0)
    assert transport.sent == []
    assert await client.infer_many("m", []) == []


def test_the_blocking_client_fans_out_too() -> None:
    transport = Held()

    async def make() -> AsyncClient:
        transport.release = asyncio.Event()
        transport.release.set()
        return AsyncClient(transport, retry=NO_RETRY)

    with Client(make()) as client:
        results = client.infer_many("m", rows(5, 6), concurrency=1)
        kept = client.infer_many("m", rows(-1), return_errors=True)
    assert [int(r["label"][0]) for r in results] == [5, 6]
    assert transport.peak == 1
    assert isinstance(kept[0], errors.UnknownModelError)


def test_closing_the_client_ends_calls_other_threads_wait_on() -> None:
    import threading

    transport = Held()  # never released: every call waits

    async def make() -> AsyncClient:
        return AsyncClient(transport, retry=NO_RETRY)

    client = Client(make())
    client.start()
    outcomes: list[BaseException] = []

    def call() -> None:
        try:
            client.infer_many("m", rows(1, 2))
        except BaseException as exc:  # the outcome is what the test checks
            outcomes.append(exc)

    waiting = threading.Thread(target=call)
    waiting.start()
    while not transport.sent:
        threading.Event().wait(0.01)
    client.close()
    waiting.join(10)
    assert not waiting.is_alive(), "the call still waits on a stopped loop"
    (outcome,) = outcomes
    assert isinstance(outcome, errors.ClientClosedError), outcome
    with pytest.raises(errors.ClientClosedError):
        client.infer("m", rows(1)[0])


@pytest.mark.parametrize(
    "bad", [np.nan, np.inf, -np.inf, 1e39], ids=["nan", "inf", "-inf", "fp32-overflow"]
)
async def test_a_value_json_cannot_carry_is_non_finite_on_every_transport(
    bad: float,
) -> None:
    # JSON has no NaN or infinity: over HTTP the encoder raised a bare
    # ValueError, over Kafka the value went as null and came back
    # SCHEMA_INVALID ("got null"). The gateway's code for such a value is
    # NON_FINITE; the client gives it before sending anything, whatever the
    # transport (1e39 is infinite once sent as FP32).
    transport = Held()
    transport.release.set()
    client = AsyncClient(transport, retry=NO_RETRY)
    row = np.full(64, 3.0)
    row[5] = bad
    with pytest.raises(errors.NonFiniteError) as raised:
        await client.infer("digits", row, request_id="r-bad")
    assert raised.value.code == "NON_FINITE" and raised.value.request_id == "r-bad"
    assert "pixels" in str(raised.value)
    # In a batch the bad item gets its own error; the others are answered.
    results = await client.infer_many(
        "digits", [np.full(64, 1.0), row, np.full(64, 2.0)], return_errors=True
    )
    first, middle, last = results
    assert isinstance(middle, errors.NonFiniteError)
    assert isinstance(first, InferResult) and isinstance(last, InferResult)
    assert (first["label"][0], last["label"][0]) == (1, 2)
    assert transport.sent[0] != "r-bad" and len(transport.sent) == 2
