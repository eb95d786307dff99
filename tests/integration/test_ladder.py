"""The policy ladder end to end: real Kafka, real Redis, a real worker.

Detection is made deterministic by configuration: the out-of-distribution
detector judges every query from the first one (``min_queries`` 1), and uniform
noise images are outliers to a digits model while test digits are not. Each
test drives one client over the ladder a query at a time and checks what it
sees (responses) against what the gateway knows (decisions).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from gateway.config import Settings
from gateway.models import digits_split
from gateway.topics import partitions_of
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    isolated_settings,
    read_topic,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

X_TEST = digits_split()[1]
NOISE = np.random.default_rng(3).uniform(0, 16, size=(40, 64)).astype(np.float32)
ANSWER_S = 25.0
DETECTORS = {"ood": {"min_queries": 1, "window": 5, "threshold": 0.2}}
LADDER: list[dict[str, Any]] = [
    {"action": "flag", "risk_at": 1.0},
    {"action": "degrade", "after_flags": 2, "degrade": "rounded"},
    {"action": "block", "after_flags": 4},
]


def _settings(stack: StackInfo, models_dir: Path, **policy: Any) -> Settings:
    return isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        requests_partitions=1,
        policy=policy,
        detectors=DETECTORS,
        limits={"rate_per_s": 10_000, "burst": 10_000},
    )


class Answers:
    """One consumer on the responses topic for the whole test, so that each
    answer is waited for without re-reading the topic."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False
        )
        self.seen: dict[str, tuple[float, dict[str, Any]]] = {}

    async def start(self) -> None:
        await asyncio.wait_for(self._consumer.start(), 30)
        topic = self._settings.kafka.topics.responses
        tps = [
            TopicPartition(topic, p) for p in await partitions_of(self._settings, topic)
        ]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def get(self, request_id: str) -> tuple[float, dict[str, Any]]:
        """The answer and the monotonic time it was read."""
        deadline = time.monotonic() + ANSWER_S
        while request_id not in self.seen:
            assert time.monotonic() < deadline, f"no answer to {request_id}"
            batch = await self._consumer.getmany(timeout_ms=100)
            for messages in batch.values():
                for m in messages:
                    record = json.loads(m.value)
                    self.seen.setdefault(
                        record["request_id"], (time.monotonic(), record)
                    )
        return self.seen[request_id]


class Client:
    """One API key's client: send a query, or send it and wait for its answer."""

    def __init__(
        self, kafka: RawKafka, answers: Answers, client_id: str, key: tuple[str, bytes]
    ) -> None:
        self.kafka, self.answers, self.client_id = kafka, answers, client_id
        self._key_id, self._secret = key

    async def send(self, rows: np.ndarray) -> str:
        return await self.kafka.send_request(
            self._key_id, self._secret, rows, client_id=self.client_id
        )

    async def ask(self, rows: np.ndarray) -> dict[str, Any]:
        rid = await self.send(rows)
        await self.kafka.flush()
        return (await self.answers.get(rid))[1]


@asynccontextmanager
async def clients(settings: Settings, *client_ids: str) -> AsyncIterator[list[Client]]:
    keys = [await create_key(settings, c) for c in client_ids]
    answers = Answers(settings)
    async with RawKafka(settings) as kafka:
        await answers.start()
        try:
            yield [
                Client(kafka, answers, c, k)
                for c, k in zip(client_ids, keys, strict=True)
            ]
        finally:
            await answers.stop()


async def _decisions(settings: Settings, count: int) -> list[dict[str, Any]]:
    records = await read_topic(
        settings,
        settings.kafka.topics.decisions,
        until=lambda r: len(r) >= count,
        timeout_s=ANSWER_S,
    )
    assert len(records) >= count, records
    return records


async def _committed(settings: Settings) -> int:
    """The group's committed offset on the one requests partition (-1: none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await asyncio.wait_for(admin.start(), 30)
    try:
        offsets = await admin.list_consumer_group_offsets(settings.kafka.group_id)
    finally:
        await admin.close()
    found = offsets.get(TopicPartition(settings.kafka.topics.requests, 0))
    return -1 if found is None else int(found.offset)


def _probabilities(answer: dict[str, Any]) -> np.ndarray:
    (tensor,) = [t for t in answer["outputs"] if t["name"] == "probabilities"]
    return np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])


async def test_client_climbs_flag_degrade_block_and_is_released(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = _settings(stack, models_dir, rules=LADDER, block_cooldown_s=3.0)
    async with running_worker(settings) as worker, clients(settings, "mallory") as [c]:
        seen = [await c.ask(NOISE[i : i + 1]) for i in range(5)]
        # Released by the cool-down alone: poll, do not sleep a guess.
        deadline = time.monotonic() + ANSWER_S
        while True:
            again = await c.ask(X_TEST[:1])
            if again["status"] == "ok" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        blocks = worker.metrics.registry.get_sample_value(
            "modelgate_policy_actions_total", {"action": "block", "shadow": "false"}
        )

    assert [a.get("action") for a in seen] == [
        "flag",
        "degrade",
        "degrade",
        "block",
        "block",
    ], seen
    for answer in seen[1:3]:
        assert answer["status"] == "ok" and answer["degrade"] == "rounded", answer
        p = _probabilities(answer)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(p * 10, np.round(p * 10), atol=1e-5)
    assert [a["error"]["code"] for a in seen[3:]] == ["BLOCKED", "BLOCKED"]
    assert 0 < seen[4]["retry_after_ms"] <= 3000, seen[4]
    assert again["status"] == "ok", again
    assert blocks == 1.0

    decisions = {d["request_id"]: d for d in await _decisions(settings, 6)}
    ours = [decisions[a["request_id"]] for a in seen]
    assert [d.get("would_be_action") for d in ours[:4]] == [
        "flag",
        "degrade",
        "degrade",
        "block",
    ]
    assert [d["enforced_action"] for d in ours[:4]] == [
        "flag",
        "degrade",
        "degrade",
        "block",
    ]
    assert ours[1]["degrade"] == "rounded"
    # The fifth was refused by the Redis block at admission, before scoring.
    assert ours[4]["action"] == "block" and ours[4]["error_code"] == "BLOCKED"
    assert not any(d.get("shadow") for d in ours)


async def test_shadow_mode_enforces_nothing_and_records_everything(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = _settings(stack, models_dir, rules=LADDER, shadow=True)
    async with running_worker(settings) as worker, clients(settings, "sam") as [c]:
        seen = [await c.ask(NOISE[i : i + 1]) for i in range(6)]
        shadow_blocks = worker.metrics.registry.get_sample_value(
            "modelgate_policy_actions_total", {"action": "block", "shadow": "true"}
        )

    assert all(a["status"] == "ok" and "degrade" not in a for a in seen), seen
    assert {a["action"] for a in seen} == {"flag"}
    decisions = {d["request_id"]: d for d in await _decisions(settings, 6)}
    ours = [decisions[a["request_id"]] for a in seen]
    assert [d["would_be_action"] for d in ours] == [
        "flag",
        "degrade",
        "degrade",
        "block",
        "block",  # the would-be cool-down
        "block",
    ]
    assert all(d["shadow"] for d in ours[1:]) and all(
        d["enforced_action"] == "flag" for d in ours
    )
    assert shadow_blocks == 3.0


async def test_hidden_suspicion_answers_late_and_coarse_but_records_the_truth(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = _settings(
        stack,
        models_dir,
        rules=[{"action": "block", "risk_at": 1.0}],
        hide_suspicion=True,
        hide_delay_s=1.5,
        hide_degrade="label",
    )
    async with (
        running_worker(settings),
        clients(settings, "eve", "henry") as [
            eve,
            henry,
        ],
    ):
        sent_at = time.monotonic()
        rid = await eve.send(NOISE[:1])
        honest = await henry.send(X_TEST[:1])
        await eve.kafka.flush()
        honest_at, honest_answer = await eve.answers.get(honest)
        # While eve's answer is held back, the group must not commit past her
        # record (offset 0): a crash now would redeliver it, not lose it.
        deadline = time.monotonic() + ANSWER_S
        while (held_commit := await _committed(settings)) < 0:
            assert time.monotonic() < deadline, "the batch was never committed"
            await asyncio.sleep(0.05)
        hidden_at, hidden = await eve.answers.get(rid)
        # Once it is sent, the next batch commits everything.
        await henry.ask(X_TEST[1:2])
        deadline = time.monotonic() + ANSWER_S
        while (final_commit := await _committed(settings)) < 3:
            assert time.monotonic() < deadline, final_commit
            await asyncio.sleep(0.1)

    # Ordinary-looking: ok, action allow, no degrade marker; but label only.
    assert hidden["status"] == "ok" and hidden["action"] == "allow", hidden
    assert "degrade" not in hidden
    assert sorted(set(_probabilities(hidden).ravel().tolist())) == [0.0, 1.0]
    assert hidden_at - sent_at >= 1.5
    # The held-back answer did not hold the worker: the next client was served.
    assert honest_answer["status"] == "ok"
    assert honest_at < hidden_at
    assert held_commit == 0, held_commit

    decisions = {d["request_id"]: d for d in await _decisions(settings, 2)}
    truth = decisions[rid]
    assert truth["would_be_action"] == "block"
    assert truth["enforced_action"] == "degrade"
    assert truth["hidden"] is True and truth["delay_ms"] == 1500
    assert truth["degrade"] == "label"


async def test_throttled_client_gets_a_reduced_rate(
    stack: StackInfo, models_dir: Path
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        requests_partitions=1,
        policy={
            "rules": [{"action": "throttle", "risk_at": 1.0}],
            "throttle_factor": 1000,
            "throttle_s": 60,
        },
        detectors=DETECTORS,
        limits={"rate_per_s": 100, "burst": 50},
    )
    async with running_worker(settings), clients(settings, "tom") as [tom]:
        first = await tom.ask(NOISE[:1])
        rids = [await tom.send(X_TEST[i : i + 1]) for i in range(5)]
        await tom.kafka.flush()
        later = [(await tom.answers.get(r))[1] for r in rids]

    assert first["status"] == "ok" and first["action"] == "throttle", first
    # Penalised: rate 100/1000 = one per 10 s, burst 50/1000 -> 1. Five at
    # once: the first passes, the rest are refused with a retry-after of
    # up to 10 s.
    statuses = [a["status"] for a in later]
    assert statuses[0] == "ok" and statuses.count("ok") == 1, later
    refused = [a for a in later if a["status"] == "error"]
    assert all(a["error"]["code"] == "RATE_LIMITED" for a in refused), refused
    assert all(a["action"] == "throttle" for a in refused), refused
    assert all(0 < a["retry_after_ms"] <= 10_000 for a in refused), refused


async def test_throttle_divides_the_plans_slowest_rule(
    stack: StackInfo, models_dir: Path
) -> None:
    # The plan allows 100 a second but only 600 a minute (10 a second in the
    # long run), and the limits section's legacy rate (1,000/s) is not in
    # force. A factor of 100 must give one request per 10 s, not per 0.1 s.
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        requests_partitions=1,
        policy={
            "rules": [{"action": "throttle", "risk_at": 1.0}],
            "throttle_factor": 100,
            "throttle_s": 60,
        },
        detectors=DETECTORS,
        limits={
            "rate_per_s": 1000,
            "burst": 1000,
            "plans": {
                "default": {
                    "rules": [
                        {"limit": 100, "window_s": 1, "burst": 50},
                        {"limit": 600, "window_s": 60, "burst": 60},
                    ]
                }
            },
        },
    )
    async with running_worker(settings), clients(settings, "una") as [una]:
        first = await una.ask(NOISE[:1])
        rids = [await una.send(X_TEST[i : i + 1]) for i in range(3)]
        await una.kafka.flush()
        later = [(await una.answers.get(r))[1] for r in rids]

    assert first["status"] == "ok" and first["action"] == "throttle", first
    refused = [a for a in later if a["status"] == "error"]
    assert len(refused) >= 2, later
    assert all(a["error"]["code"] == "RATE_LIMITED" for a in refused), refused
    # 10/s divided by 100: the next cell is about 10 s away; the legacy
    # rate would have said at most 1 ms.
    assert all(5_000 < a["retry_after_ms"] <= 10_000 for a in refused), refused
