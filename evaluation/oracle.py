"""Query functions: how an attack asks a model for predictions.

An attack sees one signature, ``QueryFn`` (rows in, class probabilities out),
so the same attack code runs through the gateway (``GatewayOracle``) or straight
against the model in this process (``DirectOracle``), with the same query
budget. Both are synchronous because the attacks are (ART's are); the gateway
oracle runs its requests on the event loop from the attack's thread.

When the oracle stops answering part-way through a batch (the gateway refused,
or the budget ran out) it raises a ``QueryStopped`` that carries the rows it did
answer, because an attacker keeps what it already paid for.

Imports the gateway's client library and numpy; nothing from the worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from evaluation.ledger import BLOCK_CODES, THROTTLE_CODES, ClientLedger
from gateway.client import GatewayClient, GatewayRequestError, error_of, probabilities
from gateway.protocol import new_request_id

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

# Refusals that end an attack: the gateway said no, so the attacker stops and
# keeps what it has (the demo's rule; a patient attacker could wait and retry).
STOP_CODES = THROTTLE_CODES | BLOCK_CODES


class QueryFn(Protocol):
    """Rows of shape (n, features) in, probabilities of shape (n, classes) out.

    Raises ``QueryStopped`` when it stops answering before the last row.
    """

    def __call__(self, rows: Array) -> Array: ...


class QueryStopped(Exception):
    """The oracle stopped answering; ``answered`` marks the rows it did answer
    and ``probabilities`` holds their answers (zeros elsewhere).

    Parameters
    ----------
    reason
        ``BUDGET``, ``CANCELLED`` or the gateway's refusal code.
    answered
        Boolean mask over the rows of the call that raised.
    probabilities
        Answers for the rows where ``answered`` is true.
    """

    def __init__(self, reason: str, answered: Array, probabilities: Array) -> None:
        super().__init__(f"oracle stopped: {reason}")
        self.reason = reason
        self.answered = answered
        self.probabilities = probabilities


class QueryRefused(QueryStopped):
    """The gateway refused a query (``reason`` is its error code)."""


class BudgetExhausted(QueryStopped):
    """The attack's query budget is spent."""


class _Budget:
    """A thread-safe count of queries left."""

    def __init__(self, total: int) -> None:
        if total < 0:
            raise ValueError("budget must be non-negative")
        self.total = total
        self._used = 0
        self._lock = threading.Lock()

    def take(self, wanted: int) -> int:
        with self._lock:
            granted = max(0, min(wanted, self.total - self._used))
            self._used += granted
            return granted

    def give_back(self, unused: int) -> None:
        with self._lock:
            self._used -= unused

    @property
    def used(self) -> int:
        with self._lock:
            return self._used


class DirectOracle:
    """The model called in this process: the "without the gateway" baseline.

    Parameters
    ----------
    predict_proba
        The model's probability function (``ServedModel.predict_proba``).
    budget
        Queries (rows) allowed in total.
    n_classes
        Width of the answers, for the zero rows of a call the budget cut short.
    """

    def __init__(
        self,
        predict_proba: Callable[[Array], Array],
        budget: int,
        *,
        n_classes: int = 10,
    ) -> None:
        self._predict = predict_proba
        self._budget = _Budget(budget)
        self._n_classes = n_classes

    @property
    def used(self) -> int:
        """Rows answered so far."""
        return self._budget.used

    def __call__(self, rows: Array) -> Array:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        granted = self._budget.take(len(rows))
        # A model refuses an empty batch, so a spent budget asks it nothing.
        proba = (
            np.asarray(self._predict(rows[:granted]), dtype=np.float32)
            if granted
            else np.zeros((0, self._n_classes), dtype=np.float32)
        )
        if granted == len(rows):
            return proba
        full = np.zeros((len(rows), proba.shape[1] if granted else self._n_classes))
        full[:granted] = proba
        answered = np.arange(len(rows)) < granted
        raise BudgetExhausted("BUDGET", answered, full.astype(np.float32))


class Pacer:
    """Spaces calls ``1 / rate_per_s`` apart on average.

    Attackers in the demo pace themselves under the gateway's published rate
    limit, as a careful thief would, so that what stops them is detection and
    not a plain rate limit.

    ``rng`` None spaces calls exactly (a metronome: what a simple script
    does, and what the ``traffic`` detector's regularity picks out); with a
    generator the gaps are exponential with the same mean (Poisson arrivals,
    as honest clients' are), which a thief hiding its timing would use.

    ``lags_s`` keeps how late each wait woke after its slot: the event loop's
    delay, which on a loaded machine makes a metronome's gaps irregular and
    hides it from the timing detectors (the evaluation report states it).
    """

    def __init__(
        self, rate_per_s: float, rng: np.random.Generator | None = None
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self.interval_s = 1.0 / rate_per_s
        self._rng = rng
        self._next = 0.0
        self.lags_s: list[float] = []

    def next_gap(self) -> float:
        """Seconds from this call's slot to the next one's."""
        if self._rng is None:
            return self.interval_s
        return float(self._rng.exponential(self.interval_s))

    async def wait(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.next_gap()
        if slot > now:
            await asyncio.sleep(slot - now)
            # Only waits that slept count: a call arriving after its slot (the
            # attacker was retraining) is idle time, not the loop's lag.
            self.lags_s.append(time.monotonic() - slot)


def pacing_summary(pacers: Sequence[Pacer]) -> dict[str, float] | None:
    """How late the pacers of one attack run woke, in milliseconds.

    Returns ``None`` when none of them slept (nothing was paced). ``gap_ms`` is
    a key's mean gap; ``p50_ms``, ``p99_ms`` and ``max_ms`` are quantiles of
    every wait's lag, pooled over the keys.
    """
    lags = [lag for pacer in pacers for lag in pacer.lags_s]
    if not lags:
        return None
    ms = np.asarray(lags) * 1000.0
    return {
        "waits": float(len(ms)),
        "gap_ms": round(1000.0 * float(np.mean([p.interval_s for p in pacers])), 2),
        "p50_ms": round(float(np.quantile(ms, 0.5)), 2),
        "p99_ms": round(float(np.quantile(ms, 0.99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


class GatewayOracle:
    """Queries through the gateway, one request per row, from any thread.

    Call it from a worker thread (the attack's); it schedules the requests on
    ``loop`` and blocks until they are answered. ``query`` is the same thing for
    code already on the loop.

    Parameters
    ----------
    client
        The attacker's gateway client (its own API key).
    ledger
        Where every request and reply is counted.
    loop
        The event loop the client's transport runs on.
    budget
        Queries (rows) allowed in total.
    rate_per_s
        Pace of requests; keep it under the gateway's rate limit.
    concurrency
        Requests in flight at once.
    timeout_s
        Reply deadline per request.
    cancel
        Set it to make every later call raise ``QueryStopped("CANCELLED")``.
    n_classes
        Width of the answers, for rows left unanswered when none was answered.
    arrival_rng
        Poisson arrivals drawn from it instead of exact spacing (see
        :class:`Pacer`).
    """

    def __init__(
        self,
        client: GatewayClient,
        ledger: ClientLedger,
        loop: asyncio.AbstractEventLoop,
        *,
        budget: int,
        rate_per_s: float,
        concurrency: int = 16,
        timeout_s: float = 30.0,
        cancel: threading.Event | None = None,
        n_classes: int = 10,
        arrival_rng: np.random.Generator | None = None,
    ) -> None:
        self.client = client
        self._n_classes = n_classes
        self.ledger = ledger
        self._loop = loop
        self._budget = _Budget(budget)
        self._pacer = Pacer(rate_per_s, arrival_rng)
        self._rate_per_s = rate_per_s
        self._concurrency = concurrency
        self._timeout_s = timeout_s
        self._cancel = cancel or threading.Event()
        self._refused: str | None = None

    @property
    def used(self) -> int:
        """Requests sent so far."""
        return self._budget.used

    @property
    def pacer(self) -> Pacer:
        """The pacer spacing this key's requests (its lags, its mean gap)."""
        return self._pacer

    def __call__(self, rows: Array) -> Array:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        if self._cancel.is_set():
            raise QueryStopped(
                "CANCELLED",
                np.zeros(len(rows), dtype=bool),
                np.zeros((len(rows), self._n_classes)),
            )
        future = asyncio.run_coroutine_threadsafe(self.query(rows), self._loop)
        # Pacing alone takes len/rate seconds; the reply deadline comes on top.
        deadline_s = len(rows) / self._rate_per_s + self._timeout_s + 5.0
        try:
            return future.result(timeout=deadline_s)
        except TimeoutError:
            future.cancel()
            raise

    async def query(self, rows: Array) -> Array:
        """Send one request per row, paced and concurrent; gather the answers.

        Raises
        ------
        QueryRefused
            The gateway refused a row (``BLOCKED``, ``RATE_LIMITED``); rows not
            yet sent are not sent.
        BudgetExhausted
            Fewer rows were left in the budget than asked for.
        GatewayRequestError
            Any other error (a timeout, a validation error): the harness is
            broken, not the attacker stopped.
        """
        n_rows = len(rows)
        granted = self._budget.take(n_rows) if self._refused is None else 0
        answers: list[Array | None] = [None] * n_rows
        faults: list[GatewayRequestError] = []
        gate = asyncio.Semaphore(self._concurrency)
        not_sent = 0

        async def one(index: int) -> None:
            nonlocal not_sent
            async with gate:
                # Checked before and after pacing: rows queued behind a refusal
                # must neither be sent nor hold pacing slots.
                if self._refused is None and not self._cancel.is_set():
                    await self._pacer.wait()
                if self._refused is not None or self._cancel.is_set():
                    not_sent += 1
                    return
                request_id = new_request_id()
                self.ledger.sent(request_id)
                try:
                    response = await self.client.infer(
                        rows[index : index + 1],
                        request_id=request_id,
                        timeout_s=self._timeout_s,
                    )
                except GatewayRequestError as exc:
                    self.ledger.failed(exc.code, request_id)
                    faults.append(exc)
                    return
                self.ledger.answered(response)
                error = error_of(response)
                if error is None:
                    answers[index] = probabilities(response)[0]
                elif error.code in STOP_CODES:
                    if self._refused is None:
                        logger.info(
                            "attacker refused",
                            extra={"client": self.client.client_id, "code": error.code},
                        )
                    self._refused = self._refused or error.code
                else:
                    faults.append(error)

        await asyncio.gather(*(one(i) for i in range(granted)))
        # Rows skipped after a refusal were never sent; they do not count.
        self._budget.give_back(not_sent)

        answered = np.array([a is not None for a in answers], dtype=bool)
        n_classes = next((len(a) for a in answers if a is not None), self._n_classes)
        proba = np.zeros((n_rows, n_classes), dtype=np.float32)
        for index, answer in enumerate(answers):
            if answer is not None:
                proba[index] = answer
        if self._refused is not None:
            raise QueryRefused(self._refused, answered, proba)
        if faults:
            raise faults[0]
        if self._cancel.is_set() and not answered.all():
            raise QueryStopped("CANCELLED", answered, proba)
        if granted < n_rows:
            raise BudgetExhausted("BUDGET", answered, proba)
        return proba
