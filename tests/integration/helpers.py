"""Shared pieces of the integration tests: isolated settings per test, a worker
running in-process or as a subprocess, raw Kafka access for sending
arbitrary bytes and reading every topic the worker writes, and the honest
clients the detection tests run beside an attacker."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis
from redis.exceptions import RedisError

from evaluation.benign import BenignProfile, run_benign_client
from evaluation.ledger import ClientLedger
from evaluation.process import settings_env
from gateway import protocol
from gateway.client import GatewayClient, KafkaTransport
from gateway.config import Settings, load_settings
from gateway.errors import BrokerError
from gateway.keys import KeyStore, format_token
from gateway.store import CounterStore, redis_from_settings
from gateway.topics import delete_topics, ensure_topics, partitions_of, run_topics
from gateway.worker import Worker
from modelgate import errors
from modelgate.client import Transport
from modelgate.results import InferResult

if TYPE_CHECKING:
    # Only for annotations: the live-config service imports every detector.
    from gateway.liveconfig.service import ConfigService, WorkerAck
    from tests.conftest import StackInfo

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]

# The settings of every isolated run of this session, so that the session can
# delete their topics and keys when it ends (``drop_isolated_runs``): on a
# developer's long-lived broker each ``make test`` would otherwise leave about
# a hundred sets of topics behind.
_ISOLATED: list[Settings] = []


def isolated_settings(
    kafka_bootstrap: str, redis_url: str, models_dir: Path, **overrides: Any
) -> Settings:
    """Settings whose topics, group and Redis keys no other test or run shares.

    ``kafka``, ``worker`` and ``redis`` overrides are merged into the isolated
    values (``redis`` may set timeouts and the breaker, not the key prefix);
    ``frontdoor``, ``admin``, ``feedback`` and ``forward`` get
    ``metrics_port`` 0 unless they set it;
    other overrides go to :func:`~gateway.config.load_settings` as they are.
    ``kafka.topics`` and ``live`` overrides are merged into the isolated
    topics too.

    Raises
    ------
    ValueError
        An override names a topic (request path or live configuration) that
        is not this run's own.
    """
    tag = uuid.uuid4().hex[:10]
    kafka: dict[str, Any] = {
        "bootstrap": kafka_bootstrap,
        "group_id": f"test-{tag}",
        "poll_timeout_ms": 100,
        "topics": {
            "requests": f"test-{tag}.requests",
            "responses": f"modelgate.responses.test-{tag}",
            "alerts": f"test-{tag}.alerts",
            "decisions": f"test-{tag}.decisions",
            "deadletter": f"test-{tag}.deadletter",
            "audit": f"test-{tag}.audit",
            "requests_partitions": overrides.pop("requests_partitions", 2),
            "other_partitions": 1,
        },
    }
    kafka_overrides = dict(overrides.pop("kafka", {}))
    # ``topics`` is merged, not replaced: a test that only sets a partition
    # count must keep the isolated names. Replacing it once sent one test to
    # the default ``modelgate.*`` topics, where a second suite on the same
    # broker read the first one's records (and each session deleted them).
    kafka["topics"].update(kafka_overrides.pop("topics", {}))
    kafka.update(kafka_overrides)
    worker = {"metrics_port": 0, **overrides.pop("worker", {})}
    # No metrics listeners either: a fixed port is shared by every test run.
    for app in ("frontdoor", "admin", "feedback", "forward"):
        overrides[app] = {"metrics_port": 0, **overrides.get(app, {})}
    redis = {**overrides.pop("redis", {}), "url": redis_url, "key_prefix": f"t{tag}"}
    overrides["live"] = {"topic": f"test-{tag}.config", **overrides.get("live", {})}
    settings = load_settings(
        kafka=kafka,
        redis=redis,
        models={"directory": str(models_dir)},
        worker=worker,
        **overrides,
    )
    # Checked before the run is registered: the session's end deletes every
    # registered run's topics, and must never delete shared ones.
    shared = [name for name in isolated_topics(settings) if tag not in name]
    if shared:
        raise ValueError(
            f"isolated settings would use topics other runs share: {shared}"
        )
    _ISOLATED.append(settings)
    return settings


def isolated_topics(settings: Settings) -> list[str]:
    """A test run's topics: a run's (:func:`run_topics`) and the admin audit
    topic, which a real run's clean-up keeps but a test's must not."""
    return [*run_topics(settings), settings.kafka.topics.audit]


async def drop_isolated_runs() -> tuple[int, int]:
    """Delete the topics and Redis keys of every isolated run made so far this
    session (:func:`drop_runs`), and forget them."""
    runs = list(_ISOLATED)
    _ISOLATED.clear()
    return await drop_runs(runs)


async def drop_runs(runs: Sequence[Settings]) -> tuple[int, int]:
    """Delete the topics and Redis keys of ``runs`` (isolated settings);
    returns (topics asked to go, keys unlinked).

    Best effort, as :mod:`gateway.cleanup` is for the benchmarks: a broker or
    Redis failure is logged and the session's result stands.
    """
    if not runs:
        return 0, 0
    first = runs[0]
    topics = sorted({name for run in runs for name in isolated_topics(run)})
    try:
        async with asyncio.timeout(first.kafka.request_timeout_s * 2):
            await delete_topics(first, topics)
    except (BrokerError, TimeoutError) as exc:
        logger.warning(
            "test topics not deleted: %r", exc, extra={"topics": len(topics)}
        )
        topics = []
    prefixes = {run.redis.key_prefix for run in runs}
    unlinked = 0
    redis = redis_from_settings(first)
    try:
        async with asyncio.timeout(first.kafka.request_timeout_s * 2):
            doomed: list[bytes] = []
            # One pass over the keyspace for all runs: the fingerprint store's
            # keys start with "{prefix:fp}" (gateway/fingerprints.py).
            async for key in redis.scan_iter(count=1000):
                name = key.decode(errors="replace").lstrip("{")
                if name.split(":", 1)[0] in prefixes:
                    doomed.append(key)
            for start in range(0, len(doomed), 1000):
                unlinked += await redis.unlink(*doomed[start : start + 1000])
    except (RedisError, OSError, TimeoutError) as exc:
        logger.warning("test keys not all deleted: %r", exc)
    finally:
        await redis.aclose()
    return len(topics), unlinked


def request_path_settings(
    stack: StackInfo, models_dir: Path, **overrides: Any
) -> Settings:
    """Isolated settings on the shared stack for tests of the request path, not
    of detection: shadow policy, so that a detector flagging a test stream
    cannot turn answers into refusals, and limits high enough never to
    throttle. ``overrides`` as for :func:`isolated_settings`."""
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        policy={"shadow": True},
        limits={"rate_per_s": 10_000, "burst": 10_000},
        **overrides,
    )


def fail_open_settings(
    stack: StackInfo, redis_url: str, models_dir: Path, **overrides: Any
) -> Settings:
    """Isolated settings for a test that takes its own Redis (``redis_url``, a
    private redis-server, never the shared one) away: fail mode ``open`` for
    every plan, so the worker keeps answering without Redis, shadow policy
    and limits that never throttle. ``overrides`` as for
    :func:`isolated_settings` (``redis`` for timeouts and the breaker)."""
    return isolated_settings(
        stack.kafka_bootstrap,
        redis_url,
        models_dir,
        policy={"shadow": True},
        limits={
            "rate_per_s": 10_000,
            "burst": 10_000,
            "fail_mode": "open",
            "plans": {"default": {"fail_mode": "open"}},
        },
        **overrides,
    )


def start_worker_process(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "worker", "--log-level", "INFO"],
        env=settings_env(settings),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """An in-process worker consuming until the block exits."""
    worker = Worker(settings)
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        # Requests sent before the group forms would still be served (the
        # consumer starts from the earliest offset), but the test's own
        # timeouts should not include the group's formation.
        await asyncio.wait_for(worker.assigned.wait(), 60)
        yield worker
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await worker.stop()


async def create_key(
    settings: Settings, client_id: str, **kwargs: Any
) -> tuple[str, bytes]:
    redis = redis_from_settings(settings)
    try:
        _, token = await KeyStore(redis, settings).create(client_id, **kwargs)
    finally:
        await redis.aclose()
    return KeyStore.parse_token(token)


class RawKafka:
    """A producer for arbitrary bytes and readers for the worker's topics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap)

    async def __aenter__(self) -> RawKafka:
        # Create the topics first: a worker subprocess may not have yet, and a
        # produce to a missing topic only retries until it appears.
        await ensure_topics(self.settings)
        await asyncio.wait_for(self.producer.start(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send_raw(
        self,
        value: bytes,
        *,
        key: str = "raw",
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        await self.producer.send_and_wait(
            self.settings.kafka.topics.requests,
            value,
            key=key.encode(),
            headers=headers or [],
        )

    async def send_request(
        self,
        key_id: str,
        secret: bytes,
        rows: np.ndarray,
        *,
        client_id: str = "c",
        request_id: str | None = None,
        model: str = "digits",
        ts_ms: int | None = None,
    ) -> str:
        request, value, headers = protocol.build_request(
            key_id=key_id,
            secret=secret,
            model=model,
            inputs={"pixels": rows.astype(np.float32)},
            request_id=request_id,
            ts_ms=ts_ms,
        )
        await self.producer.send(
            self.settings.kafka.topics.requests,
            value,
            key=client_id.encode(),
            headers=headers,
        )
        return request.request_id

    async def flush(self) -> None:
        await self.producer.flush()


async def read_topic(
    settings: Settings,
    topic: str,
    *,
    until: Any = None,
    timeout_s: float = 30.0,
) -> list[dict[str, Any]]:
    """Every JSON record on ``topic`` from the beginning, read until
    ``until(records)`` is true or ``timeout_s`` passes."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False
    )
    await asyncio.wait_for(consumer.start(), 30)
    records: list[dict[str, Any]] = []
    try:
        partitions: Iterable[int] = await partitions_of(settings, topic)
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            await consumer.stop()
            return records
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                records.extend(json.loads(m.value) for m in messages)
            if until is not None and until(records):
                break
        return records
    finally:
        await consumer.stop()


async def responses_for(
    settings: Settings, request_ids: Iterable[str], timeout_s: float = 30.0
) -> dict[str, dict[str, Any]]:
    """The first response to each of ``request_ids`` (fails if any is missing)."""
    wanted = set(request_ids)

    def done(records: list[dict[str, Any]]) -> bool:
        return wanted <= {r.get("request_id") for r in records}

    records = await read_topic(
        settings, settings.kafka.topics.responses, until=done, timeout_s=timeout_s
    )
    found: dict[str, dict[str, Any]] = {}
    for record in records:
        found.setdefault(record["request_id"], record)
    missing = wanted - set(found)
    assert not missing, (
        f"{len(missing)} requests unanswered, e.g. {sorted(missing)[:3]}"
    )
    return {rid: found[rid] for rid in wanted}


async def delete_prefix(settings: Settings) -> None:
    """Delete every Redis key under the settings' isolated prefix, the
    fingerprint and region stores' hash-tagged ``{prefix:fp}`` and
    ``{prefix:rg}`` keys included."""
    redis = redis_from_settings(settings)
    try:
        prefix = settings.redis.key_prefix
        for pattern in (f"{{{prefix}:fp}}*", f"{prefix}:*", f"{{{prefix}:rg}}*"):
            keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
            # Several DELs of at most 500 keys each keep every call short.
            for start in range(0, len(keys), 500):
                await redis.delete(*keys[start : start + 500])
    finally:
        await redis.aclose()


async def create_token(settings: Settings, client_id: str, **kwargs: Any) -> str:
    """A new API key for ``client_id``, as the token a client presents."""
    return format_token(*await create_key(settings, client_id, **kwargs))


class LosesFirstAnswer:
    """A real client transport whose first answer is lost on the way back, as
    when a client times out just before the answer arrives.

    ``ids`` holds the request id of every attempt; ``first`` the lost answer.
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.ids: list[str] = []
        self.first: InferResult | None = None

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        request_id: str,
        timeout_s: float,
    ) -> InferResult:
        self.ids.append(request_id)
        result = await self.inner.infer(model, inputs, request_id, timeout_s)
        if len(self.ids) == 1:
            self.first = result
            raise errors.RequestTimeoutError("answer lost", request_id=request_id)
        return result


async def assert_answered_from_kept_copy(
    settings: Settings,
    transport: LosesFirstAnswer,
    result: InferResult,
    client_id: str,
) -> None:
    """Check that the retry after a lost answer took the first, kept answer
    (same request id, ``replayed``, the same outputs) and was counted once:
    it used up no rate and did not show as a refusal."""
    assert transport.ids == [result.request_id] * 2
    assert result.attempts == 2 and result.replayed
    assert transport.first is not None and not transport.first.replayed
    for name in ("probabilities", "label"):
        np.testing.assert_array_equal(result[name], transport.first[name])
    redis = redis_from_settings(settings)
    try:
        counters = await CounterStore(redis, settings).client_counters(client_id)
    finally:
        await redis.aclose()
    assert (counters["requests"], counters["refused"]) == (1, 0), counters


async def answer_codes(
    kafka: RawKafka,
    settings: Settings,
    key: tuple[str, bytes],
    client_id: str,
    rows: np.ndarray[Any, Any],
) -> list[str]:
    """Send one request per row of ``rows`` at once, signed with ``key`` (id,
    secret) on ``client_id``'s partition; the code of each answer, in order
    (``ok`` for a prediction). Waits at most 60 s for the answers."""
    key_id, secret = key
    ids = [
        await kafka.send_request(key_id, secret, rows[i : i + 1], client_id=client_id)
        for i in range(len(rows))
    ]
    await kafka.flush()
    answers = await responses_for(settings, ids, timeout_s=60)
    return [
        answers[i]["error"]["code"] if answers[i]["status"] == "error" else "ok"
        for i in ids
    ]


async def wait_for_acks(
    service: ConfigService,
    done: Callable[[dict[str, WorkerAck]], bool],
    timeout_s: float,
    interval_s: float,
) -> dict[str, WorkerAck]:
    """Poll the workers' configuration acknowledgements every ``interval_s``
    until ``done`` holds; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        acks = {a.worker_id: a for a in await service.status()}
        if done(acks):
            return acks
        if loop.time() > deadline:
            raise AssertionError(f"acknowledgements after {timeout_s} s: {acks}")
        await asyncio.sleep(interval_s)


async def delete_matching(redis_url: str, pattern: str) -> None:
    """Delete the keys matching ``pattern`` (a test module's own prefix) on the
    Redis at ``redis_url``."""
    client = Redis.from_url(redis_url)
    try:
        async for name in client.scan_iter(match=pattern, count=1000):
            await client.delete(name)
    finally:
        await client.aclose()


def clients_of(
    transport: KafkaTransport,
    keys: Mapping[str, tuple[str, str]],
    model: str = "digits",
) -> Callable[[str], GatewayClient]:
    """A factory of gateway clients by client id, over ``keys`` (client id to
    ``(key_id, secret)``, as ``create_key`` returns them)."""

    def client(name: str) -> GatewayClient:
        key_id, secret = keys[name]
        return GatewayClient(transport, key_id, secret, name, model)

    return client


def honest_clients(
    client: Callable[[str], GatewayClient],
    names: Iterable[str],
    x: np.ndarray,
    n_queries: int,
) -> list[Coroutine[Any, Any, None]]:
    """One honest client per name (``evaluation.benign``), each replaying its
    own ``n_queries`` rows of ``x`` at 20 queries/s; seeded, so every run
    sends the same rows in the same order."""
    order = np.random.default_rng(1).permutation(len(x))
    return [
        run_benign_client(
            client(name),
            BenignProfile(rate_per_s=20.0, n_queries=n_queries, start_delay_s=0.0),
            x[order[i * n_queries : (i + 1) * n_queries]],
            ClientLedger(name, "benign"),
            np.random.default_rng(i),
            timeout_s=30,
        )
        for i, name in enumerate(names)
    ]
