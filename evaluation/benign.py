"""Benign traffic: honest clients replaying held-out digits at uneven rates.

Each client draws a habit (``BenignProfile``): a mean rate from a lognormal
centred near 10 requests per second (most clients between 5 and 20), a number
of queries, a start delay, and how often it bursts or pauses. Arrivals are an
open-loop Poisson process (exponential gaps), so a slow reply does not slow the
client down, as with real independent users; a burst sends several queries at
once, a pause stands for a user reading a result. Queries are held-out rows in
random order, one row per request.

Imports the gateway's client library and numpy; nothing from the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.ledger import ClientLedger
from gateway.client import GatewayClient, GatewayRequestError
from gateway.protocol import new_request_id

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class BenignProfile:
    """One honest client's habits.

    Attributes
    ----------
    rate_per_s
        Mean arrival rate between bursts and pauses.
    n_queries
        Queries the client sends in total.
    start_delay_s
        When it starts, after the demo's traffic begins.
    burst_prob
        Chance that an arrival is a burst instead of a single query.
    burst_size
        Smallest and largest number of queries in a burst (inclusive).
    pause_prob
        Chance of a pause after an arrival.
    pause_s
        Shortest and longest pause.
    """

    rate_per_s: float
    n_queries: int
    start_delay_s: float
    burst_prob: float = 0.06
    burst_size: tuple[int, int] = (3, 8)
    pause_prob: float = 0.03
    pause_s: tuple[float, float] = (0.5, 3.0)


def draw_profiles(
    n_clients: int,
    rng: np.random.Generator,
    *,
    queries: tuple[int, int] = (40, 80),
    spread_s: float = 30.0,
    median_rate_per_s: float = 10.0,
    rate_bounds: tuple[float, float] = (3.0, 30.0),
) -> list[BenignProfile]:
    """Draw ``n_clients`` habits.

    Rates are lognormal with median ``median_rate_per_s`` and σ = 0.45 (so
    about 70% of clients fall between 5 and 20 requests per second), clipped
    to ``rate_bounds``; query counts are uniform in ``queries``; start delays
    are uniform over ``spread_s`` so that honest traffic overlaps the attacks.
    """
    profiles = []
    for _ in range(n_clients):
        rate = float(
            np.clip(rng.lognormal(np.log(median_rate_per_s), 0.45), *rate_bounds)
        )
        profiles.append(
            BenignProfile(
                rate_per_s=rate,
                n_queries=int(rng.integers(queries[0], queries[1] + 1)),
                start_delay_s=float(rng.uniform(0.0, spread_s)),
            )
        )
    return profiles


def arrival_plan(
    profile: BenignProfile, rng: np.random.Generator
) -> list[tuple[float, int]]:
    """The client's schedule: (seconds after its start, queries sent at once).

    Pure, so the traffic shape can be checked without a gateway.
    """
    plan: list[tuple[float, int]] = []
    at_s = 0.0
    left = profile.n_queries
    while left > 0:
        size = 1
        if rng.random() < profile.burst_prob:
            size = int(rng.integers(profile.burst_size[0], profile.burst_size[1] + 1))
        size = min(size, left)
        plan.append((at_s, size))
        left -= size
        at_s += float(rng.exponential(1.0 / profile.rate_per_s))
        if rng.random() < profile.pause_prob:
            at_s += float(rng.uniform(*profile.pause_s))
    return plan


async def _send(
    client: GatewayClient,
    ledger: ClientLedger,
    row: Array,
    request_id: str,
    timeout_s: float,
) -> None:
    """One query of one row; its answer or error code goes into ``ledger``."""
    try:
        response = await client.infer(
            row[None, :], request_id=request_id, timeout_s=timeout_s
        )
    except GatewayRequestError as exc:
        ledger.failed(exc.code, request_id)
        return
    ledger.answered(response)


async def run_benign_client(
    client: GatewayClient,
    profile: BenignProfile,
    rows: Array,
    ledger: ClientLedger,
    rng: np.random.Generator,
    *,
    timeout_s: float,
) -> None:
    """Replay ``rows`` (already in this client's order) on the profile's plan.

    Every reply or failure is counted in ``ledger``; nothing is raised for an
    error answer, because an honest client just carries on.
    """
    loop = asyncio.get_running_loop()
    plan = arrival_plan(profile, rng)
    await asyncio.sleep(profile.start_delay_s)
    started = loop.time()
    in_flight: set[asyncio.Task[None]] = set()
    position = 0

    async def one(row: Array) -> None:
        request_id = new_request_id()
        ledger.sent(request_id)
        await _send(client, ledger, row, request_id, timeout_s)

    try:
        for at_s, size in plan:
            delay_s = started + at_s - loop.time()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            for _ in range(size):
                row = rows[position % len(rows)]
                position += 1
                task = asyncio.create_task(one(row))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)
    finally:
        for task in in_flight:
            task.cancel()


@dataclass(frozen=True)
class BenignHabits:
    """The evaluation's extra habits of an honest client, on top of its
    ``BenignProfile`` (rate, bursts, pauses).

    Attributes
    ----------
    retry_prob
        Chance that a query is sent again under the same request id once its
        reply came back (a client that lost the reply, or retried on a slow
        network); the gateway answers the copy ``DUPLICATE_REQUEST``.
    retry_delay_s
        Shortest and longest wait before such a retry.
    near_duplicate_prob
        Chance that an arrival starts a run of near-identical inputs: the same
        held-out row again and again with tiny noise (a user re-submitting the
        same digit, or a sensor re-reading the same object).
    near_duplicate_run
        Shortest and longest such run, in queries.
    noise_share
        Noise of a near-duplicate (standard deviation), as a share of each
        feature's span in ``feature_spans`` (of the declared value range when
        not given), clipped back into the range.
    clip
        The model's declared value range.
    feature_spans
        Each feature's span (max - min) in the data the client replays. One
        declared range can cover features 0.02 and 4000 wide (breast cancer);
        0.5% of the whole range would move a narrow feature far outside its
        data, which is no near-duplicate but a different, out-of-distribution
        input.
    """

    retry_prob: float = 0.0
    retry_delay_s: tuple[float, float] = (0.05, 0.5)
    near_duplicate_prob: float = 0.0
    near_duplicate_run: tuple[int, int] = (3, 8)
    noise_share: float = 0.005
    clip: tuple[float, float] = (0.0, 16.0)
    feature_spans: tuple[float, ...] | None = None


def draw_habits(
    n_clients: int,
    rng: np.random.Generator,
    clip: tuple[float, float],
    *,
    near_duplicates: bool = True,
    feature_spans: tuple[float, ...] | None = None,
) -> list[BenignHabits]:
    """Habits for ``n_clients``: about a third retry now and then (3% of their
    queries), about a third send runs of near-identical inputs (5% of their
    arrivals start a run; none when ``near_duplicates`` is False), the rest do
    neither; the two habits mix freely."""
    habits = []
    for _ in range(n_clients):
        retries = rng.random() < 1 / 3
        duplicates = rng.random() < 1 / 3 and near_duplicates
        habits.append(
            BenignHabits(
                retry_prob=0.03 if retries else 0.0,
                near_duplicate_prob=0.05 if duplicates else 0.0,
                clip=clip,
                feature_spans=feature_spans,
            )
        )
    return habits


def query_stream(
    rows: Array, habits: BenignHabits, n_queries: int, rng: np.random.Generator
) -> Array:
    """The rows a client sends, in order: ``rows`` cycled, with runs of
    near-identical copies spliced in per ``habits``. Pure, for tests."""
    span: float | Array = habits.clip[1] - habits.clip[0]
    if habits.feature_spans is not None:
        span = np.asarray(habits.feature_spans, dtype=np.float64)
    out: list[Array] = []
    position = 0
    while len(out) < n_queries:
        row = rows[position % len(rows)]
        position += 1
        out.append(row)
        if rng.random() < habits.near_duplicate_prob:
            low, high = habits.near_duplicate_run
            for _ in range(int(rng.integers(low, high + 1)) - 1):
                noisy = row + rng.normal(0.0, habits.noise_share * span, row.shape)
                out.append(np.clip(noisy, *habits.clip).astype(np.float32))
    return np.asarray(out[:n_queries], dtype=np.float32)


async def run_benign_stream(
    client: GatewayClient,
    profile: BenignProfile,
    habits: BenignHabits,
    rows: Array,
    ledger: ClientLedger,
    rng: np.random.Generator,
    *,
    timeout_s: float,
    stop: asyncio.Event,
) -> None:
    """Replay ``rows`` (already shuffled) with the profile's timing and the
    habits' retries and near-duplicate runs, until the profile's query count
    is reached or ``stop`` is set. Errors are counted, never raised.
    """
    loop = asyncio.get_running_loop()
    plan = arrival_plan(profile, rng)
    stream = query_stream(rows, habits, profile.n_queries, rng)
    retry_rng = np.random.default_rng(rng.integers(2**32))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), profile.start_delay_s)
    started = loop.time()
    in_flight: set[asyncio.Task[None]] = set()
    position = 0

    async def one(row: Array) -> None:
        request_id = new_request_id()
        ledger.sent(request_id)
        await _send(client, ledger, row, request_id, timeout_s)
        if retry_rng.random() < habits.retry_prob and not stop.is_set():
            await asyncio.sleep(float(retry_rng.uniform(*habits.retry_delay_s)))
            ledger.retried()
            await _send(client, ledger, row, request_id, timeout_s)

    try:
        for at_s, size in plan:
            delay_s = started + at_s - loop.time()
            if delay_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay_s)
            if stop.is_set():
                break
            for _ in range(size):
                task = asyncio.create_task(one(stream[position]))
                position += 1
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)
    finally:
        for task in in_flight:
            task.cancel()
