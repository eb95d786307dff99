"""The poisoning guard through the real Kafka and Redis: records in, verdicts
out with stable codes, a malformed record does not stall its partition,
shadow mode, and a guard killed mid-batch loses nothing on restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from gateway import protocol
from gateway.config import Settings
from gateway.feedback import FeedbackGuard
from gateway.feedback_data import calibration_rows
from gateway.feedback_wire import FEEDBACK_CODES, build_feedback
from gateway.store import redis_from_settings
from gateway.topics import delete_topics
from tests.conftest import StackInfo
from tests.integration.helpers import (
    REPO,
    create_key,
    isolated_settings,
    read_topic,
)
from tests.integration.test_adversarial import OwnRedis, _free_port

pytestmark = pytest.mark.timeout(90)

CLIENT = "fb-alice"


@contextlib.contextmanager
def _guard_settings(
    stack: StackInfo,
    models_dir: Path,
    redis_url: str,
    params: dict[str, Any] | None = None,
    **overrides: Any,
) -> Iterator[Settings]:
    """Isolated settings with feedback topics and a guard group of their own
    (and the guard's ``params``, if given), deleted at the end (the
    session's clean-up knows the request path's)."""
    tag = uuid.uuid4().hex[:10]
    settings = isolated_settings(
        stack.kafka_bootstrap,
        redis_url,
        models_dir,
        kafka={
            "topics": {
                "feedback": f"test-{tag}.feedback",
                "feedback_accepted": f"test-{tag}.feedback.accepted",
                "feedback_rejected": f"test-{tag}.feedback.rejected",
            }
        },
        feedback={
            "group_id": f"test-{tag}-guard",
            "max_batch_records": 10,
            **({"params": params} if params is not None else {}),
        },
        **overrides,
    )
    try:
        yield settings
    finally:
        topics = settings.kafka.topics
        names = [topics.feedback, topics.feedback_accepted, topics.feedback_rejected]
        asyncio.run(delete_topics(settings, names))


@pytest.fixture
def guard_settings(stack: StackInfo, models_dir: Path) -> Iterator[Settings]:
    with _guard_settings(stack, models_dir, stack.redis_url) as settings:
        yield settings


@pytest.fixture(scope="module")
def held() -> tuple[np.ndarray, np.ndarray]:
    """Clean digits the guard did not calibrate on."""
    _, (x, y) = calibration_rows("digits")
    return x.astype(np.float32), y


class Sender:
    """Produces feedback values (signed or not) to the feedback topic."""

    def __init__(self, settings: Settings, key_id: str, secret: bytes) -> None:
        self.settings = settings
        self.key_id, self.secret = key_id, secret
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap)

    async def raw(self, value: bytes, *, key: str = CLIENT, sign: bool = True) -> None:
        headers = []
        if sign:
            signature = protocol.sign(self.secret, value).encode("ascii")
            headers = [(protocol.SIGNATURE_HEADER, signature)]
        await self.producer.send_and_wait(
            self.settings.kafka.topics.feedback,
            value,
            key=key.encode(),
            headers=headers,
        )

    async def row(self, row: np.ndarray, label: int, **kwargs: Any) -> str:
        record, value, _ = build_feedback(
            key_id=self.key_id,
            secret=self.secret,
            model="digits",
            input_name="pixels",
            row=row,
            label=label,
        )
        await self.raw(value, **kwargs)
        return record.feedback_id

    def record(self, **changes: Any) -> dict[str, Any]:
        """A feedback record as a dict, to break on purpose."""
        base = {
            "v": 1,
            "feedback_id": uuid.uuid4().hex,
            "key_id": self.key_id,
            "ts_ms": protocol.now_ms(),
            "model": "digits",
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "data": [0.0] * 64,
                }
            ],
            "label": 0,
        }
        base.update(changes)
        return base


@contextlib.asynccontextmanager
async def sender(settings: Settings) -> AsyncIterator[Sender]:
    key_id, secret = await create_key(settings, CLIENT)
    s = Sender(settings, key_id, secret)
    from gateway.feedback import feedback_topics
    from gateway.topics import ensure_topics

    await ensure_topics(settings, extra=feedback_topics(settings))
    await asyncio.wait_for(s.producer.start(), 30)
    try:
        yield s
    finally:
        await s.producer.stop()


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[FeedbackGuard]:
    guard = FeedbackGuard(settings)
    await guard.start()
    stop = asyncio.Event()
    task = asyncio.create_task(guard.run(stop))
    try:
        yield guard
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await guard.stop()


async def verdicts(
    settings: Settings, ids: set[str], timeout_s: float = 45.0
) -> dict[str, list[dict[str, Any]]]:
    """Every verdict on the accepted and rejected topics, by feedback id
    (``None``-keyed for records without one), once each of ``ids`` has one."""
    topics = settings.kafka.topics
    found: dict[str, list[dict[str, Any]]] = {}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        found = {}
        for name, topic in (
            ("accepted", topics.feedback_accepted),
            ("rejected", topics.feedback_rejected),
        ):
            for record in await read_topic(settings, topic, timeout_s=1.0):
                record["_topic"] = name
                found.setdefault(str(record.get("feedback_id")), []).append(record)
        if ids <= set(found):
            return found
    missing = ids - set(found)
    raise AssertionError(f"{len(missing)} records without a verdict: {missing}")


async def test_records_get_verdicts_with_stable_codes(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = held
    async with sender(guard_settings) as s:
        # A malformed record first: everything behind it on the partition
        # must still be judged.
        await s.raw(b"\xff{ not json at all")
        expected: dict[str, tuple[str, str]] = {}
        for i in range(5):
            expected[await s.row(x[i], int(y[i]))] = ("accepted", "")
        expected[await s.row(x[5], 10)] = ("rejected", "UNKNOWN_LABEL")
        expected[await s.row(np.zeros(65, np.float32), 0)] = (
            "rejected",
            "SHAPE_MISMATCH",
        )
        two_rows = s.record()
        two_rows["inputs"][0].update(shape=[2, 64], data=[0.0] * 128)
        await s.raw(json.dumps(two_rows).encode())
        expected[two_rows["feedback_id"]] = ("rejected", "SHAPE_MISMATCH")
        extra_tensor = s.record()
        extra_tensor["inputs"].append(
            {"name": "trigger", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}
        )
        await s.raw(json.dumps(extra_tensor).encode())
        expected[extra_tensor["feedback_id"]] = ("rejected", "TENSOR_NAME")
        extra_field = s.record(note="an innocent-looking extra column")
        await s.raw(json.dumps(extra_field).encode())
        expected[extra_field["feedback_id"]] = ("rejected", "SCHEMA_INVALID")
        huge = s.record()
        value = json.dumps(huge).encode().replace(b"[0.0, 0.0", b"[1e999, 0.0", 1)
        await s.raw(value)
        expected[huge["feedback_id"]] = ("rejected", "NON_FINITE")
        future = s.record(v=2)
        await s.raw(json.dumps(future).encode())
        expected[future["feedback_id"]] = ("rejected", "UNSUPPORTED_VERSION")
        expected[await s.row(x[6], int(y[6]), sign=False)] = (
            "rejected",
            "AUTH_MISSING",
        )
        forged = s.record()
        await s.producer.send_and_wait(
            guard_settings.kafka.topics.feedback,
            json.dumps(forged).encode(),
            key=CLIENT.encode(),
            headers=[(protocol.SIGNATURE_HEADER, b"0" * 64)],
        )
        expected[forged["feedback_id"]] = ("rejected", "AUTH_BAD_SIGNATURE")
        expected[await s.row(x[7], int(y[7]), key="someone-else")] = (
            "rejected",
            "AUTH_WRONG_PARTITION",
        )
        trigger = x[8].copy()
        trigger[[0, 7, 56, 63]] = 16.0
        expected[await s.row(trigger, 0)] = ("rejected", "POISON_TRIGGER")

        async with running(guard_settings):
            found = await verdicts(guard_settings, set(expected) | {"None"})

    for feedback_id, (topic, code) in expected.items():
        records = found[feedback_id]
        body = json.dumps(records)[:600]
        assert {r["_topic"] for r in records} == {topic}, body
        if code:
            assert {r["code"] for r in records} >= {code}, body
            assert all(r["code"] in FEEDBACK_CODES for r in records), body
    malformed = found["None"]
    assert {r["code"] for r in malformed} == {"MALFORMED_JSON"}, malformed
    poison = found[next(k for k, v in expected.items() if v[1] == "POISON_TRIGGER")]
    assert poison[0]["detector"] == "rarity" and poison[0]["client_id"] == CLIENT
    assert "index 0, 7, 56, 63" in poison[0]["evidence"], poison
    accepted = found[next(iter(expected))][0]
    assert accepted["client_id"] == CLIENT and accepted["label"] == int(y[0])
    assert set(accepted["scores"]) >= {"rarity", "spectral", "flip_tail"}

    # The submitter's state outlives the batch, in Redis.
    redis = redis_from_settings(guard_settings)
    try:
        key = f"{guard_settings.redis.key_prefix}:fbguard:digits:{{{CLIENT}}}"
        raw = await redis.get(key)
        assert isinstance(raw, bytes), raw
        state = msgspec.json.decode(raw)
    finally:
        await redis.aclose()
    assert state["seen"] == 6  # the five clean records and the trigger


async def test_shadow_mode_accepts_what_it_would_refuse(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray]
) -> None:
    settings = guard_settings.model_copy(
        update={"feedback": guard_settings.feedback.model_copy(update={"shadow": True})}
    )
    x, _ = held
    # A damaged saved state costs the submitter its history, not the batch.
    redis = redis_from_settings(settings)
    try:
        key = f"{settings.redis.key_prefix}:fbguard:digits:{{{CLIENT}}}"
        await redis.set(key, b'{"format": 1, "window": 200, "seen": -5}')
    finally:
        await redis.aclose()
    async with sender(settings) as s:
        trigger = x[0].copy()
        trigger[[0, 7, 56, 63]] = 16.0
        poisoned = await s.row(trigger, 0)
        invalid = await s.row(x[1], 42)
        async with running(settings):
            found = await verdicts(settings, {poisoned, invalid})
    shadowed = found[poisoned][0]
    assert shadowed["_topic"] == "accepted" and shadowed["shadow"] is True
    assert shadowed["would_reject"] == "POISON_TRIGGER", shadowed
    # Shadow mode is about judgement: an invalid record is still refused.
    assert found[invalid][0]["code"] == "UNKNOWN_LABEL"


class _GuardParkedBeforeCommit(FeedbackGuard):
    """A guard whose offset commit waits for ever once ``park_after`` records
    are judged (their verdicts saved and produced, offsets not committed), so
    a test kills it at that moment, not wherever its batches happen to be."""

    def __init__(self, settings: Settings, park_after: int) -> None:
        super().__init__(settings)
        self.park_after = park_after
        self.parked = asyncio.Event()

    async def start(self) -> None:
        await super().start()
        assert self._consumer is not None
        commit = self._consumer.commit

        async def parking_commit(*args: Any, **kwargs: Any) -> None:
            if self.records_done >= self.park_after:
                self.parked.set()
                await asyncio.Event().wait()
            await commit(*args, **kwargs)

        self._consumer.commit = parking_commit  # type: ignore[method-assign]


async def test_a_guard_killed_mid_stream_loses_nothing(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = held
    n = 60
    labels = y[:n].copy()
    labels[::4] = (labels[::4] + 1) % 10  # a flipper: its history must survive
    async with sender(guard_settings) as s:
        ids = {await s.row(x[i], int(labels[i])) for i in range(n)}

        # First guard: killed between saving a batch's verdicts and committing
        # it, the hardest moment (its records come again to the second one),
        # once it has judged some and before it could judge them all.
        first = _GuardParkedBeforeCommit(guard_settings, park_after=20)
        await first.start()
        task = asyncio.create_task(first.run(asyncio.Event()))
        try:
            await asyncio.wait_for(first.parked.wait(), timeout=45)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=30)
        finally:
            await first.stop()
        done_first = first.records_done
        assert 20 <= done_first < n, done_first

        async with running(guard_settings) as second:
            found = await verdicts(guard_settings, ids)
            state = second._guards["digits"].dump_state(CLIENT)

    assert ids <= set(found)
    assert state is not None
    # The second guard read the first one's history from Redis: it has seen
    # every record, not only its own share, and a record redelivered after
    # the kill (judged and saved, not committed) is counted once.
    assert msgspec.json.decode(state)["seen"] == n


def test_cli_sends_a_file_and_reads_the_rejections(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from evaluation.process import settings_env
    from gateway.cli import app
    from gateway.keys import format_token

    x, y = held
    rows = np.column_stack([x[:3], [int(y[0]), int(y[1]), 11]])
    path = tmp_path / "feedback.csv"
    np.savetxt(path, rows, delimiter=",", fmt="%g")
    key_id, secret = asyncio.run(create_key(guard_settings, CLIENT))
    env = settings_env(guard_settings)
    runner = CliRunner()

    send = ["feedback", "send", str(path), "--client-id", CLIENT, "--model", "digits"]
    bogus = runner.invoke(app, send, env={**env, "MODELGATE_TOKEN": "bogus"})
    assert bogus.exit_code == 2, bogus.output
    assert "error [AUTH_UNKNOWN_KEY]" in bogus.output, bogus.output
    sent = runner.invoke(
        app,
        [*send, "--id-prefix", "batch1"],
        env={**env, "MODELGATE_TOKEN": format_token(key_id, secret)},
    )
    assert sent.exit_code == 0, sent.output
    assert "sent 3 feedback records" in sent.output
    assert "(ids batch1-0 to batch1-2)" in sent.output, sent.output

    # The guard as an operator runs it: its own process, stopped by SIGTERM.
    log_path = tmp_path / "guard.log"
    with log_path.open("ab") as log:
        guard = subprocess.Popen(
            [sys.executable, "-m", "gateway", "guard", "run"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        topics = guard_settings.kafka.topics

        def judged() -> int:
            return sum(
                len(asyncio.run(read_topic(guard_settings, t, timeout_s=0.5)))
                for t in (topics.feedback_accepted, topics.feedback_rejected)
            )

        deadline = time.monotonic() + 60
        while judged() < 3:
            assert guard.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
    finally:
        guard.send_signal(signal.SIGTERM)
        code = guard.wait(timeout=30)
    assert code == 0, log_path.read_text()[-2000:]
    read = runner.invoke(app, ["feedback", "rejected"], env=env)
    assert read.exit_code == 0, read.output
    assert "UNKNOWN_LABEL" in read.output and CLIENT in read.output, read.output
    assert read.output.count("UNKNOWN_LABEL") == 1, read.output
    # The rejection names the row it came from.
    assert "batch1-2" in read.output, read.output


@pytest.fixture
def hung_redis_settings(
    stack: StackInfo, models_dir: Path, tmp_path: Path
) -> Iterator[tuple[Settings, OwnRedis]]:
    """Settings on a redis-server of this test's own (never the shared one)."""
    server = OwnRedis(tmp_path, _free_port(16599))
    server.start()
    try:
        with _guard_settings(
            stack, models_dir, server.url, redis={"socket_timeout_s": 1.0}
        ) as settings:
            yield settings, server
    finally:
        server.kill()


async def test_a_redis_outage_holds_the_batch_and_judges_it_once_on_recovery(
    hung_redis_settings: tuple[Settings, OwnRedis],
    held: tuple[np.ndarray, np.ndarray],
) -> None:
    settings, server = hung_redis_settings
    x, y = held
    async with sender(settings) as s, running(settings) as guard:
        before = {await s.row(x[i], int(y[i])) for i in range(3)}
        await verdicts(settings, before)

        server.signal(signal.SIGSTOP)  # hung: every call times out
        try:
            during = {await s.row(x[i], int(y[i])) for i in range(3, 6)}
            # While Redis hangs the guard saves no state, so it produces and
            # commits nothing: sampled for three seconds, no verdict appears.
            deadline = asyncio.get_running_loop().time() + 3
            while asyncio.get_running_loop().time() < deadline:
                seen = await verdicts_now(settings)
                assert not during & set(seen), seen
        finally:
            server.signal(signal.SIGCONT)

        found = await verdicts(settings, during)
        state = guard._guards["digits"].dump_state(CLIENT)
    assert all(len(found[i]) == 1 for i in during), found
    assert {found[i][0]["_topic"] for i in during} == {"accepted"}
    assert state is not None
    # Each record counted once, though the batch was judged several times.
    assert msgspec.json.decode(state)["seen"] == 6


async def verdicts_now(settings: Settings) -> set[str]:
    """Feedback ids with a verdict so far."""
    topics = settings.kafka.topics
    ids: set[str] = set()
    for topic in (topics.feedback_accepted, topics.feedback_rejected):
        for record in await read_topic(settings, topic, timeout_s=0.3):
            ids.add(str(record.get("feedback_id")))
    return ids


async def test_a_state_key_of_another_type_does_not_stall_the_partition(
    guard_settings: Settings, held: tuple[np.ndarray, np.ndarray]
) -> None:
    # Hostile or stray data under the guard's own prefix: a hash where the
    # submitter's state belongs. GET answered WRONGTYPE, which failed the
    # batch; the batch was retried forever and nothing behind it was judged.
    x, y = held
    key = f"{guard_settings.redis.key_prefix}:fbguard:digits:{{{CLIENT}}}"
    redis = redis_from_settings(guard_settings)
    try:
        await redis.hset(key, mapping={"format": "1", "seen": "0"})
        async with sender(guard_settings) as s, running(guard_settings):
            ids = {await s.row(x[i], int(y[i])) for i in range(2)}
            found = await verdicts(guard_settings, ids, timeout_s=20.0)
        raw = await redis.get(key)
    finally:
        await redis.aclose()
    assert {found[i][0]["_topic"] for i in ids} == {"accepted"}, found
    # The foreign value is replaced by the submitter's fresh state.
    assert isinstance(raw, bytes) and msgspec.json.decode(raw)["seen"] == 2
