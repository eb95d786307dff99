"""Producing a finished batch: answers, decisions, alerts and dead letters.

``Answers.produce`` sends every message of a batch without waiting per
message, then waits for all of them (gateway/produce.py sorts the failures),
and only then keeps the served answers for replays (gateway/replay.py). An
answer goes to the client's own reply topic when it names one that exists
under ``worker.reply_topic_prefix``, else to the shared responses topic; an
answer policy holds back is handed to ``HeldAnswers`` (gateway/held.py).

Pure message building lives in gateway/batch.py; this module owns the sends.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway import protocol
from gateway.batch import (
    BatchItem,
    alerts_for,
    deadletter_for,
    decision_for,
    response_for,
)
from gateway.config import Settings
from gateway.held import HeldAnswers
from gateway.metrics import WorkerMetrics
from gateway.produce import Sends, internal_answer
from gateway.replay import ReplayCache

logger = logging.getLogger(__name__)

# How old the list of existing topics may grow, in seconds; and how often, at
# most, a request naming a reply topic not on the list makes us list again.
_TOPIC_REFRESH_S = 30.0
_UNKNOWN_REFRESH_S = 2.0


def _under_prefix(topic: str, prefix: str) -> bool:
    return topic == prefix or topic.startswith(prefix + ".")


class Answers:
    """Produces the messages of a worker's batches.

    Parameters
    ----------
    metrics
        The worker's metrics: request, alert and dead-letter counts.
    held
        Where answers that policy delays wait for their time.
    """

    def __init__(self, metrics: WorkerMetrics, held: HeldAnswers) -> None:
        self._metrics = metrics
        self._held = held
        self._reply_topics: set[str] = set()
        self._reply_topics_at = 0.0

    async def produce(
        self,
        items: list[BatchItem],
        *,
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
        replays: ReplayCache,
        settings: Settings,
    ) -> None:
        """Produce every answer, decision, alert and dead-letter record of the
        batch without waiting per message, then wait for all of them.

        A send the broker refuses for good (a record too large, a reply topic
        that rejects it) must not stall the partition: an answer bound for a
        client's own reply topic goes to the shared responses topic instead,
        anything else is logged as lost.

        Raises
        ------
        BrokerError
            A send failed in a way worth retrying (the batch is then served
            again).
        """
        now_ms = protocol.now_ms()
        reply_topics = await self._known_reply_topics(items, consumer, settings)
        sends = Sends(producer, self._metrics)

        kept: list[tuple[BatchItem, bytes]] = []
        # Request counts per label set, added once per batch: a label lookup
        # per record cost more than the count.
        counted: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for item in items:
            counted[
                (
                    item.model.name if item.model is not None else "-",
                    item.action,
                    item.error.code if item.error else "",
                )
            ] += 1
        for labels, count in counted.items():
            self._metrics.requests.labels(*labels).inc(count)
        for item in items:
            try:
                await self._produce_item(
                    item, sends, reply_topics, now_ms, kept, settings
                )
            except Exception:
                # A fault building one record's messages costs that record's
                # answer (INTERNAL), not the batch and not the worker.
                logger.exception(
                    "could not build the answers of a record",
                    extra={"partition": item.partition, "offset": item.offset},
                )
                if item.request_id is not None:
                    await sends.send(
                        settings.kafka.topics.responses,
                        internal_answer(item, now_ms),
                        item.client_id,
                    )

        await sends.wait(settings.kafka.request_timeout_s)
        # Only once every answer is out, before the commit: a batch served
        # again after a failure finds its own answers kept and repeats them.
        await replays.keep(kept)

    async def _produce_item(
        self,
        item: BatchItem,
        sends: Sends,
        reply_topics: set[str],
        now_ms: int,
        kept: list[tuple[BatchItem, bytes]],
        settings: Settings,
    ) -> None:
        topics = settings.kafka.topics
        worker_id = settings.worker.worker_id
        block_cooldown_ms = int(settings.policy.block_cooldown_s * 1000)
        if item.verdict is not None and item.verdict.cooldown_s > 0:
            # The cool-down of the rule that blocked (per model or plan).
            block_cooldown_ms = int(item.verdict.cooldown_s * 1000)
        # Only an authenticated client's id keys its answers: a record's
        # own key is the sender's claim and must not let it pose as a
        # client (a reader matching answers by record key would be fooled).
        key = item.client_id

        # The answer, wherever a request id tells us who is waiting.
        if item.request_id is not None:
            reply_to = self._reply_topic(item, reply_topics, settings)
            fallback = topics.responses if reply_to != topics.responses else None
            if item.delay_s > 0 and item.error is None:
                self._held.send_later(item, reply_to, fallback, block_cooldown_ms)
            else:
                response = response_for(item, now_ms, block_cooldown_ms)
                # Encoded once, for the replay cache and the send alike.
                value = protocol.encode(response)
                if response.status == "ok" and item.replay is None:
                    kept.append((item, value))
                await sends.send(reply_to, msgspec.Raw(value), key, fallback=fallback)

        # Audit: one decision per record, answered or not.
        await sends.send(topics.decisions, decision_for(item, now_ms, worker_id), key)

        for event in alerts_for(item, worker_id):
            self._metrics.alerts.labels(event["data"]["detector"]).inc()
            logger.info(
                "alert",
                extra={
                    "client": item.client_id,
                    "detector": event["data"]["detector"],
                    "request": item.request_id,
                },
            )
            await sends.send(topics.alerts, event, key)

        # Bad messages keep (the head of) their bytes on the dead-letter topic.
        dead = deadletter_for(item, now_ms, worker_id)
        if dead is not None:
            self._metrics.deadletters.labels(dead.code).inc()
            logger.info(
                "dead-lettered %s",
                dead.code,
                extra={
                    "partition": item.partition,
                    "offset": item.offset,
                    "request": item.request_id,
                },
            )
            await sends.send(topics.deadletter, dead, key)

    @staticmethod
    def _reply_topic(item: BatchItem, known: set[str], settings: Settings) -> str:
        """Where the answer goes. A client may name its own reply topic under the
        configured prefix; an unknown or foreign name falls back to the shared
        responses topic, because producing to a missing topic would stall the
        whole batch waiting for its metadata."""
        default = settings.kafka.topics.responses
        wanted = item.reply_to
        if wanted and _under_prefix(wanted, settings.worker.reply_topic_prefix):
            return wanted if wanted in known else default
        return default

    async def _known_reply_topics(
        self, items: list[BatchItem], consumer: AIOKafkaConsumer, settings: Settings
    ) -> set[str]:
        """Topics that exist, refreshed every 30 s, or sooner (at most every
        2 s) when a request names a reply topic not yet known."""
        prefix = settings.worker.reply_topic_prefix
        age_s = time.monotonic() - self._reply_topics_at
        unknown = any(
            i.reply_to
            and _under_prefix(i.reply_to, prefix)
            and i.reply_to not in self._reply_topics
            for i in items
        )
        if age_s > _TOPIC_REFRESH_S or (unknown and age_s > _UNKNOWN_REFRESH_S):
            try:
                self._reply_topics = set(
                    await asyncio.wait_for(
                        consumer.topics(), settings.kafka.request_timeout_s
                    )
                )
            except (KafkaError, TimeoutError):
                logger.warning("could not refresh topic list; keeping the old one")
            self._reply_topics_at = time.monotonic()
        return self._reply_topics
