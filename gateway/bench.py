"""Hot-path benchmark: what one worker pays per message, as ratios and µs.

The development machine is shared (2 cores), so absolute figures move from run
to run; each section also reports a ratio of two figures measured interleaved
in the same run. Sections: Redis admission (``CounterStore.admit_batch``, one
item per call against 500 from 50 clients); decode + validate (msgspec against
stdlib ``json`` with the same checks); HMAC verify; the detectors
(``detectors.bench.measure``); and end to end, one in-process ``Worker`` on
pre-produced signed requests, with its per-stage histograms.

A run has its own topics, consumer group, Redis key prefix and in-memory
API-key server key; its topics and Redis keys are deleted at the end. The
group's committed offsets stay until the broker expires them: aiokafka's admin
client cannot delete a group.

Imports the gateway, ``detectors.bench``, aiokafka and redis; nothing from
``evaluation`` or FastAPI.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import sys
import time
import timeit
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cryptography.fernet import Fernet
from pydantic import BaseModel, SecretStr
from threadpoolctl import threadpool_limits

from detectors.bench import measure as measure_detectors
from gateway import protocol
from gateway.bench_baseline import stdlib_decode_request
from gateway.cleanup import delete_run_data
from gateway.config import Settings, load_settings
from gateway.errors import BrokerError
from gateway.keys import KeyStore
from gateway.models import DIGITS, ModelSignature, digits_split, ensure_digits_model
from gateway.store import AdmitItem, CounterStore, redis_from_settings
from gateway.topics import ensure_topics, partitions_of, run_topics
from gateway.validation import validate_request
from gateway.worker import Worker

logger = logging.getLogger(__name__)

# Issue 2's shape of a worker's poll: up to 500 records (kafka.max_batch_records)
# from 50 interleaved clients.
CLIENT_IDS = tuple(f"bench-{i:02d}" for i in range(50))
BATCH_ITEMS = 500
# The worker's stages, in the order ``Worker.process_records`` times them.
STAGES = (
    "decode",
    "auth",
    "validate",
    "admit",
    "detect_predict",
    "cross_client",
    "record",
    "produce",
)
# Limits no bench client reaches: a refusal would be timed instead of the work.
_NO_LIMIT_RATE_PER_S = 1_000_000.0
_NO_LIMIT_BURST = 1_000_000
# Written to the worker's output topics before it starts; readers skip it.
_WARM_UP = b'{"bench": "warm-up"}'


@dataclass(frozen=True, slots=True)
class _Plan:
    """Sizes of one run; ``rounds`` interleave the two admission modes."""

    rounds: int
    per_message_items: int  # per round
    batches: int  # per round, of BATCH_ITEMS each
    codec_loops: int
    auth_loops: int
    repeats: int  # timeit repeats; the fastest is kept
    detector_clients: int
    detector_queries: int
    e2e_requests: int
    e2e_timeout_s: float


# Measuring takes about 8 s (full) or 3 s (quick) on the 2-core development
# machine, plus a second or two of worker start-up.
FULL = _Plan(8, 1_000, 10, 2_000, 20_000, 5, 100, 200, 5_000, 60.0)
QUICK = _Plan(3, 300, 4, 500, 5_000, 3, 50, 40, 1_000, 40.0)


def _say(message: str) -> None:
    """Progress for a person watching; the table itself goes to stdout."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# Step: settings of one run -----------------------------------------------------


def bench_settings(settings: Settings, tag: str | None = None) -> Settings:
    """Settings for one run: the same broker, Redis and models; topics, group,
    key prefix and live configuration topic named after ``tag`` (random if
    omitted); an in-memory server
    key (``var/server.key`` untouched); limits no client reaches; shadow policy
    (a detector flagging the replayed digits must not refuse answers); no
    metrics endpoint (the histograms are read in-process)."""
    tag = tag or uuid.uuid4().hex[:10]
    names = ("requests", "responses", "alerts", "decisions", "deadletter")
    topics = _patched(
        settings.kafka.topics, **{name: f"bench-{tag}.{name}" for name in names}
    )
    server_key = SecretStr(Fernet.generate_key().decode("ascii"))
    return settings.model_copy(
        update={
            "kafka": _patched(settings.kafka, group_id=f"bench-{tag}", topics=topics),
            "redis": _patched(settings.redis, key_prefix=f"bench{tag}"),
            "auth": _patched(settings.auth, server_key=server_key),
            "limits": _patched(
                settings.limits, rate_per_s=_NO_LIMIT_RATE_PER_S, burst=_NO_LIMIT_BURST
            ),
            "policy": _patched(settings.policy, shadow=True),
            "worker": _patched(settings.worker, metrics_port=0),
            # A deployment's live changes must not reach the run's worker.
            "live": _patched(settings.live, topic=f"bench-{tag}.config"),
        }
    )


_Model = TypeVar("_Model", bound=BaseModel)


def _patched(model: _Model, **changes: Any) -> _Model:
    """A copy of a frozen config section with ``changes``, validated again."""
    return type(model).model_validate(model.model_dump() | changes)


# Step 1: Redis admission ---------------------------------------------------------


async def bench_admission(settings: Settings, plan: _Plan = FULL) -> dict[str, Any]:
    """Admission throughput with one item per call against 500 per call, the
    two alternating ``plan.rounds`` times so drifting load slows both alike.

    Returns
    -------
    dict
        ``per_message`` and ``batched``, each with ``msgs``, ``seconds``,
        ``msgs_per_s``, ``us_per_msg`` and ``client_cpu_us_per_msg`` (this
        process's share: building, packing and parsing; the rest is the network
        and the Lua script in Redis); ``batched_speedup`` (batched msgs/s over
        per-message msgs/s, higher is better), ``batched_cpu_speedup`` (the
        same in client CPU, which waits on no scheduler) and ``refused``
        (items not admitted: 0 unless something is wrong).
    """
    serial = itertools.count()

    def items(count: int) -> list[AdmitItem]:
        return [
            AdmitItem(
                client_id=CLIENT_IDS[i % len(CLIENT_IDS)],
                request_id=f"adm-{n}",
                delivery=f"0:{n}",
                rate_per_s=_NO_LIMIT_RATE_PER_S,
                burst=_NO_LIMIT_BURST,
            )
            for i, n in zip(range(count), serial, strict=False)
        ]

    redis = redis_from_settings(settings)
    wall = {"per_message": 0.0, "batched": 0.0}
    cpu = {"per_message": 0.0, "batched": 0.0}
    msgs = {"per_message": 0, "batched": 0}
    refused = 0
    try:
        store = CounterStore(redis, settings)
        await store.load_scripts()
        # Warm up: connection, script cache, every client's keys.
        await store.admit_batch(items(BATCH_ITEMS))
        for round_no in range(plan.rounds):
            # One round trip per message, as a worker without batching would;
            # then one per 500 messages from 50 clients, as the worker does.
            singles = [[item] for item in items(plan.per_message_items)]
            batches = [items(BATCH_ITEMS) for _ in range(plan.batches)]
            for mode, calls in (("per_message", singles), ("batched", batches)):
                began, began_cpu = time.perf_counter(), time.process_time()
                for call in calls:
                    admissions = await store.admit_batch(call)
                    refused += sum(a.outcome != "ok" for a in admissions)
                wall[mode] += time.perf_counter() - began
                cpu[mode] += time.process_time() - began_cpu
                msgs[mode] += sum(len(call) for call in calls)
            _say(f"admission round {round_no + 1}/{plan.rounds}")
    finally:
        await redis.aclose()

    if refused:
        logger.warning("admission refused %d bench items; figures are off", refused)
    result: dict[str, Any] = {
        mode: {
            "msgs": msgs[mode],
            "seconds": wall[mode],
            "msgs_per_s": msgs[mode] / wall[mode],
            "us_per_msg": wall[mode] / msgs[mode] * 1e6,
            "client_cpu_us_per_msg": cpu[mode] / msgs[mode] * 1e6,
        }
        for mode in wall
    }
    one, many = result["per_message"], result["batched"]
    result["batched_speedup"] = many["msgs_per_s"] / one["msgs_per_s"]
    result["batched_cpu_speedup"] = (
        one["client_cpu_us_per_msg"] / many["client_cpu_us_per_msg"]
    )
    return result | {"refused": refused}


# Step 2: codec and validation ------------------------------------------------------


def _best_us(
    calls: dict[str, Callable[[], object]], loops: int, repeats: int
) -> dict[str, float]:
    """µs per call of each function: the fastest of ``repeats`` runs of
    ``loops`` calls (the least disturbed by other work, as ``timeit`` advises),
    the functions interleaved within each repeat."""
    best = dict.fromkeys(calls, math.inf)
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best[name], timeit.Timer(call).timeit(loops) / loops)
    return {name: seconds * 1e6 for name, seconds in best.items()}


def _sample_request() -> tuple[bytes, bytes, str]:
    """A signed one-row digits request: value bytes, secret, signature."""
    secret = bytes(range(32))
    _, value, headers = protocol.build_request(
        key_id="mgk_000000000000",
        secret=secret,
        model=DIGITS,
        inputs={"pixels": digits_split()[1][:1]},
    )
    return value, secret, headers[0][1].decode("ascii")


def bench_codec(signature: ModelSignature, plan: _Plan = FULL) -> dict[str, Any]:
    """µs per message to decode and validate a one-row digits request
    (synchronous CPU work: call it in an executor).

    Returns
    -------
    dict
        ``value_bytes``; ``msgspec`` and ``stdlib``, each with ``decode_us``
        and ``decode_validate_us``; ``speedup`` (stdlib µs over msgspec µs for
        decode + validate: above 1, msgspec is faster) and ``decode_speedup``
        (the same for decoding alone).
    """
    value, _, _ = _sample_request()
    decoders = {"msgspec": protocol.decode_request, "stdlib": stdlib_decode_request}
    ours, theirs = (validate_request(d(value), signature) for d in decoders.values())
    if not np.array_equal(ours, theirs):  # the two paths must do the same work
        raise AssertionError("stdlib and msgspec decoding disagree")

    calls: dict[str, Callable[[], object]] = {
        "msgspec.decode": lambda: protocol.decode_request(value),
        "msgspec.full": lambda: validate_request(
            protocol.decode_request(value), signature
        ),
        "stdlib.decode": lambda: stdlib_decode_request(value),
        "stdlib.full": lambda: validate_request(
            stdlib_decode_request(value), signature
        ),
    }
    best = _best_us(calls, plan.codec_loops, plan.repeats)
    return {
        "value_bytes": len(value),
        **{
            name: {
                "decode_us": best[f"{name}.decode"],
                "decode_validate_us": best[f"{name}.full"],
            }
            for name in decoders
        },
        "speedup": best["stdlib.full"] / best["msgspec.full"],
        "decode_speedup": best["stdlib.decode"] / best["msgspec.decode"],
    }


# Step 3: authentication ----------------------------------------------------------


def bench_auth(plan: _Plan = FULL) -> dict[str, Any]:
    """µs per ``protocol.verify`` of a one-row request (HMAC-SHA256 over the
    value, constant-time compare). Synchronous, like :func:`bench_codec`."""
    value, secret, signature = _sample_request()
    if not protocol.verify(secret, value, signature):
        raise AssertionError("the sample request's signature does not verify")
    best = _best_us(
        {"verify": lambda: protocol.verify(secret, value, signature)},
        plan.auth_loops,
        plan.repeats,
    )
    return {"value_bytes": len(value), "verify_us": best["verify"]}


# Step 5: end to end through Kafka ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Signed:
    client_id: str
    request_id: str
    value: bytes
    headers: list[tuple[str, bytes]]


async def _create_keys(settings: Settings) -> list[tuple[str, str, bytes]]:
    """One API key per bench client: (client id, key id, secret)."""
    redis = redis_from_settings(settings)
    try:
        store = KeyStore(redis, settings)
        created = []
        for client_id in CLIENT_IDS:
            key, _ = await store.create(client_id, models=(DIGITS,))
            created.append((client_id, key.key_id, key.secret))
        return created
    finally:
        await redis.aclose()


def _signed_requests(keys: list[tuple[str, str, bytes]], count: int) -> list[_Signed]:
    """``count`` signed one-row requests, round-robin over the clients, each
    client replaying held-out digits without repeating a row as benign clients
    do. Synchronous (numpy and HMAC work): call it in an executor."""
    held_out = digits_split()[1]
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(held_out)) for _ in keys]
    signed = []
    for n in range(count):
        client_id, key_id, secret = keys[n % len(keys)]
        row = held_out[orders[n % len(keys)][n // len(keys) % len(held_out)]]
        request, value, headers = protocol.build_request(
            key_id=key_id, secret=secret, model=DIGITS, inputs={"pixels": row[None]}
        )
        signed.append(_Signed(client_id, request.request_id, value, headers))
    return signed


async def _produce(settings: Settings, signed: list[_Signed]) -> None:
    """Produce the requests, after a warm-up record to every partition of the
    topics the worker writes: a partition the broker has only just created
    refuses the first writes (``NotLeaderForPartition``) and the producer backs
    off, which would be timed as the worker's first batch."""
    topics = settings.kafka.topics
    timeout_s = settings.kafka.request_timeout_s
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap,
        linger_ms=5,
        request_timeout_ms=int(timeout_s * 1000),
    )
    await asyncio.wait_for(producer.start(), timeout_s)
    try:
        outputs = (topics.responses, topics.alerts, topics.decisions, topics.deadletter)
        warm_ups = [
            await producer.send(topic, _WARM_UP, partition=partition)
            for topic in outputs
            for partition in range(topics.other_partitions)
        ]
        await asyncio.wait_for(asyncio.gather(*warm_ups), timeout_s)

        pending = []
        for n, request in enumerate(signed, 1):
            key = request.client_id.encode()
            pending.append(
                await producer.send(
                    topics.requests, request.value, key=key, headers=request.headers
                )
            )
            if n % 1000 == 0 or n == len(signed):
                _say(f"produced {n}/{len(signed)} requests")
        await asyncio.wait_for(asyncio.gather(*pending), timeout_s)
    finally:
        await producer.stop()


@dataclass(slots=True)
class _Replies:
    answered: int = 0
    ok: int = 0
    last_at: float = 0.0  # perf_counter when the last expected answer was read
    errors: Counter[str] = field(default_factory=Counter)


async def _read_responses(
    settings: Settings, expected: set[str], timeout_s: float
) -> _Replies:
    """Read the responses topic from the beginning until every expected request
    id has an answer or ``timeout_s`` passes; the first answer per id counts."""
    topic = settings.kafka.topics.responses
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False
    )
    await asyncio.wait_for(consumer.start(), settings.kafka.request_timeout_s)
    replies = _Replies()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        waiting = set(expected)
        deadline = time.perf_counter() + timeout_s
        while waiting and time.perf_counter() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for record in itertools.chain.from_iterable(batch.values()):
                if record.value == _WARM_UP:
                    continue
                response = protocol.decode_response(record.value or b"")
                if response.request_id not in waiting:
                    continue
                waiting.discard(response.request_id)
                replies.answered += 1
                replies.last_at = time.perf_counter()
                if response.status == "ok":
                    replies.ok += 1
                elif response.error is not None:
                    replies.errors[response.error.code] += 1
        return replies
    finally:
        await consumer.stop()


def _histogram_totals(histogram: Any) -> dict[str, tuple[float, float]]:
    """``{stage label: (sum, count)}`` of a prometheus Histogram ('' unlabelled)."""
    totals: dict[str, list[float]] = {}
    for family in histogram.collect():
        for sample in family.samples:
            slot = totals.setdefault(sample.labels.get("stage", ""), [0.0, 0.0])
            if sample.name.endswith("_sum"):
                slot[0] = sample.value
            elif sample.name.endswith("_count"):
                slot[1] = sample.value
    return {label: (total, count) for label, (total, count) in totals.items()}


async def bench_end_to_end(settings: Settings, plan: _Plan = FULL) -> dict[str, Any]:
    """Throughput of one in-process worker on pre-produced signed requests,
    from its partition assignment (model load and group join are start-up) to
    the last answer read. ``busy`` figures count only the time inside the six
    timed stages (poll, commit and idle excluded).

    Returns
    -------
    dict
        ``requests``, ``answered``, ``ok``, ``errors`` (count per code),
        ``seconds``, ``msgs_per_s``, ``busy_msgs_per_s``,
        ``batches``, ``mean_batch_records`` and ``stages``: per stage,
        ``ms_per_batch`` (mean of one batch) and ``us_per_msg`` (total time
        over the requests).

    Raises
    ------
    BrokerError
        The worker stopped early, or answered nothing.
    """
    count = plan.e2e_requests
    await ensure_topics(settings)
    keys = await _create_keys(settings)
    signed = await asyncio.to_thread(_signed_requests, keys, count)
    await _produce(settings, signed)

    # The reader gives up on its own, after start-up time plus the plan's bound.
    expected = {s.request_id for s in signed}
    reader = asyncio.create_task(
        _read_responses(settings, expected, plan.e2e_timeout_s + 30)
    )
    worker = Worker(settings)
    stop = asyncio.Event()
    run: asyncio.Task[None] | None = None
    try:
        _say("starting a worker (model load, group join)")
        await worker.start()
        run = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(worker.assigned.wait(), plan.e2e_timeout_s)
        began = time.perf_counter()
        _say(f"worker consuming; waiting for {count} responses")
        done, _ = await asyncio.wait({reader, run}, return_when=asyncio.FIRST_COMPLETED)
        if reader not in done:
            run.result()  # raises the worker's error, if it had one
            raise BrokerError("the bench worker stopped before answering")
        replies = reader.result()
    finally:
        stop.set()
        try:
            if run is not None:
                await asyncio.wait_for(run, settings.kafka.request_timeout_s)
        finally:
            await worker.stop()
            if not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    if replies.answered < count:
        logger.warning("%d of %d bench requests answered", replies.answered, count)
    if replies.answered == 0:
        raise BrokerError("no bench request was answered; is the worker stuck?")
    seconds = replies.last_at - began
    stages = _histogram_totals(worker.metrics.stage_seconds)
    records, batches = _histogram_totals(worker.metrics.batch_size)[""]
    busy_s = sum(stages.get(s, (0.0, 0.0))[0] for s in STAGES)
    return {
        "requests": count,
        "answered": replies.answered,
        "ok": replies.ok,
        "errors": dict(replies.errors),
        "seconds": seconds,
        "msgs_per_s": replies.answered / seconds,
        "busy_msgs_per_s": replies.answered / busy_s,
        "batches": int(batches),
        "mean_batch_records": records / max(batches, 1),
        "stages": {
            stage: {
                "ms_per_batch": total / max(n, 1) * 1e3,
                "us_per_msg": total / count * 1e6,
            }
            for stage in STAGES
            for total, n in [stages.get(stage, (0.0, 0.0))]
        },
    }


# Step: clean-up --------------------------------------------------------------------


# The whole run ----------------------------------------------------------------------


async def run_bench(
    settings: Settings, *, quick: bool = False, out: Path | None = None
) -> dict[str, Any]:
    """Measure the hot path, print a table, and optionally write JSON.

    Parameters
    ----------
    settings
        Where Kafka, Redis and the models are; the run names its own topics,
        group and key prefix (:func:`bench_settings`).
    quick
        Fewer messages and loops: about 3 s of measuring instead of 8 s.
    out
        Where to write the results as JSON too, if given.

    Returns
    -------
    dict
        ``meta``, ``admission``, ``codec``, ``auth``, ``detectors``,
        ``end_to_end`` and ``budget`` (the per-message costs summed, and they
        and the worker's msg/s against one Redis round trip per message).
        Ratios compare two figures of this run; µs and msg/s move with load.

    Raises
    ------
    StoreError, BrokerError
        Redis or Kafka could not be reached.
    """
    plan = QUICK if quick else FULL
    run_settings = bench_settings(settings)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    section_s: dict[str, float] = {}
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "cpus": os.cpu_count() or 1,
        "section_seconds": section_s,
    }
    results: dict[str, Any] = {"meta": meta}
    _say(f"{'quick' if quick else 'full'} run {run_settings.kafka.group_id}")

    try:
        directory = run_settings.models.directory
        await loop.run_in_executor(None, ensure_digits_model, directory)
        signature = ModelSignature.from_json(
            await asyncio.to_thread((directory / f"{DIGITS}.signature.json").read_text)
        )
        sizes = (plan.detector_clients, plan.detector_queries)
        steps: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            "admission": lambda: bench_admission(run_settings, plan),
            "codec": lambda: loop.run_in_executor(None, bench_codec, signature, plan),
            "auth": lambda: loop.run_in_executor(None, bench_auth, plan),
            "detectors": lambda: loop.run_in_executor(None, measure_detectors, *sizes),
            "end_to_end": lambda: bench_end_to_end(run_settings, plan),
        }
        # One BLAS thread, as ``modelgate worker`` runs: threaded BLAS on the
        # detectors' small products costs far more than it saves here.
        with threadpool_limits(limits=1):
            for name, step in steps.items():
                _say(f"{name} ...")
                began = time.perf_counter()
                results[name] = await step()
                section_s[name] = time.perf_counter() - began
    finally:
        await delete_run_data(run_settings, run_topics(run_settings))

    results["budget"] = _budget(results)
    meta["seconds"] = time.perf_counter() - started
    print(format_table(results), flush=True)
    if out is not None:
        await asyncio.to_thread(out.write_text, json.dumps(results, indent=2) + "\n")
        _say(f"wrote {out}")
    return results


def _budget(results: dict[str, Any]) -> dict[str, Any]:
    """Per-message costs of the stages against one Redis round trip per message."""
    admission, e2e = results["admission"], results["end_to_end"]
    round_trip_us = admission["per_message"]["us_per_msg"]
    stages_us = {
        "decode_validate": results["codec"]["msgspec"]["decode_validate_us"],
        "verify": results["auth"]["verify_us"],
        "detectors": results["detectors"]["total_us_per_query"],
        "admission_batched": admission["batched"]["us_per_msg"],
    }
    total_us = sum(stages_us.values())
    cap = admission["per_message"]["msgs_per_s"]
    return {
        "round_trip_us": round_trip_us,
        "stages_us": stages_us,
        "total_us": total_us,
        "total_share_of_round_trip": total_us / round_trip_us,
        "worker_vs_per_message_cap": e2e["msgs_per_s"] / cap,
        "busy_worker_vs_per_message_cap": e2e["busy_msgs_per_s"] / cap,
    }


# Output -------------------------------------------------------------------------------


def _n(value: float) -> str:
    """Three significant figures or so, with thousands separators."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """The results as a fixed-width table: measurement, absolute, ratio."""
    meta, adm, codec = results["meta"], results["admission"], results["codec"]
    det, e2e, budget = results["detectors"], results["end_to_end"], results["budget"]
    rows: list[tuple[str, str, str]] = []

    def add(label: str, absolute: str, ratio: str = "", us: float = 0.0) -> None:
        share = f"{us / budget['round_trip_us']:.1%} of a round trip" if us else ""
        rows.append((label, absolute, ratio or share))

    for mode, calls, ratio in (
        ("per_message", "1 per call", "1"),
        (
            "batched",
            f"{BATCH_ITEMS} per call",
            f"{_n(adm['batched_speedup'])}x (CPU {_n(adm['batched_cpu_speedup'])}x)",
        ),
    ):
        entry = adm[mode]
        add(
            f"admission, {calls} ({entry['msgs']:,} msgs, {len(CLIENT_IDS)} clients)",
            f"{_n(entry['msgs_per_s'])} msg/s, {_n(entry['us_per_msg'])} µs/msg "
            f"(client CPU {_n(entry['client_cpu_us_per_msg'])})",
            ratio,
        )
    for name, ratio in (("stdlib", "1"), ("msgspec", f"{_n(codec['speedup'])}x")):
        entry = codec[name]
        add(
            f"decode + validate, {name}",
            f"{_n(entry['decode_validate_us'])} µs/msg "
            f"(decode alone {_n(entry['decode_us'])})",
            ratio,
        )
    verify_us = results["auth"]["verify_us"]
    add("HMAC-SHA256 verify", f"{_n(verify_us)} µs/msg", us=verify_us)
    for name, entry in det["detectors"].items():
        add(
            f"detector {name} ({det['n_clients']} clients)",
            f"{_n(entry['us_per_query'])} µs/query CPU, "
            f"{entry['state_bytes_per_client']:,} B/client",
            us=entry["us_per_query"],
        )
    total_us = budget["total_us"]
    add(
        "sum: msgspec, verify, detectors, batched admission", _us(total_us), us=total_us
    )
    add(
        f"end to end, 1 worker ({e2e['answered']:,} of {e2e['requests']:,} "
        f"answered, {e2e['ok']:,} ok)",
        f"{_n(e2e['msgs_per_s'])} msg/s ({_n(e2e['seconds'])} s, "
        f"{e2e['batches']} batches of {_n(e2e['mean_batch_records'])})",
        f"{_n(budget['worker_vs_per_message_cap'])}x the per-message cap",
    )
    add(
        "end to end, time inside the stages only",
        f"{_n(e2e['busy_msgs_per_s'])} msg/s",
        f"{_n(budget['busy_worker_vs_per_message_cap'])}x the per-message cap",
    )
    for stage, entry in e2e["stages"].items():
        add(
            f"  stage {stage}",
            f"{_us(entry['us_per_msg'])}, {_n(entry['ms_per_batch'])} ms/batch",
            us=entry["us_per_msg"],
        )

    width = [max(len(row[i]) for row in rows) for i in (0, 1)]
    lines = [
        f"modelgate bench, {meta['date']}, {'quick' if meta['quick'] else 'full'} "
        f"run, {meta['cpus']} CPUs, {_n(meta['seconds'])} s. Absolute figures "
        "move with the machine's load; ratios compare figures of this run.",
        "",
        f"{'measurement':<{width[0]}}  {'absolute':<{width[1]}}  ratio",
        *(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}".rstrip() for a, b, c in rows),
    ]
    if e2e["errors"]:
        lines.append(f"end-to-end errors by code: {e2e['errors']}")
    return "\n".join(lines)


def _us(value: float) -> str:
    return f"{_n(value)} µs/msg"


# CLI hook ---------------------------------------------------------------------


def bench_command(quick: bool, out: Path | None) -> int:
    """``modelgate bench [--quick] [--out FILE]``: hold the local stack, run
    :func:`run_bench` on it (settings as every command loads them, with the
    held stack's addresses) and return the exit code.

    Returns
    -------
    int
        0 if every end-to-end request was answered ok and admission refused
        nothing; else 1 (the figures then measure something else).

    Raises
    ------
    ModelgateError
        Bad configuration, or the stack or a service failed.
    """
    from gateway import stack

    base = load_settings()
    with stack.hold(holder=f"bench-{os.getpid()}") as info:
        stack.warn_settings_replaced(base, info, "bench")
        settings = base.model_copy(
            update={
                "kafka": _patched(base.kafka, bootstrap=info.kafka_bootstrap),
                "redis": _patched(base.redis, url=info.redis_url),
            }
        )
        results = asyncio.run(run_bench(settings, quick=quick, out=out))
    e2e = results["end_to_end"]
    clean = results["admission"]["refused"] == 0 and e2e["ok"] == e2e["requests"]
    return 0 if clean else 1
