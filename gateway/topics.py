"""Creation of the project's Kafka topics with explicit partition counts.

Auto-creation is off on the broker, so every process that needs a topic calls
``ensure_topics`` first; it is idempotent and safe to race.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from gateway.config import Settings
from gateway.errors import BrokerError

logger = logging.getLogger(__name__)


# The broker stamps each request with the time it appended it. A producer
# sets its own record times otherwise (CreateTime), and the detectors read
# these times as arrivals: a client producing straight to Kafka could pace
# its requests on paper (``traffic``) or stagger the starts of its keys
# (``margin``'s cohorts) without waiting.
REQUEST_TOPIC_CONFIGS = {"message.timestamp.type": "LogAppendTime"}


async def ensure_topics(
    settings: Settings, extra: dict[str, int] | None = None
) -> None:
    """Create the request, response, alert, decision and dead-letter topics
    (plus ``extra`` name → partitions) when missing.

    Raises
    ------
    BrokerError
        The broker could not be reached within ``kafka.request_timeout_s``.
    """
    topics = settings.kafka.topics
    wanted = {topics.requests: topics.requests_partitions}
    for name in (topics.responses, topics.alerts, topics.decisions, topics.deadletter):
        wanted[name] = topics.other_partitions
    wanted.update(extra or {})

    async with _admin(settings, "create topics") as admin:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name,
                n,
                topics.replication_factor,
                topic_configs=REQUEST_TOPIC_CONFIGS if name == topics.requests else {},
            )
            for name, n in wanted.items()
            if name not in existing
        ]
        if missing:
            # Another process may win the race; the topic is then what we wanted.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            logger.info("created topics", extra={"topics": [t.name for t in missing]})
            await _await_leaders(admin, [t.name for t in missing], settings)


# Pause between two looks at a new topic's metadata, in seconds.
_LEADER_POLL_S = 0.05


async def _await_leaders(
    admin: AIOKafkaAdminClient, names: list[str], settings: Settings
) -> None:
    """Return once every partition of ``names`` has a leader, or after
    ``kafka.request_timeout_s`` (then with a warning; producers wait on).

    The broker acknowledges a creation before every partition has a leader;
    a client that asks for the topic's partitions in between is told it does
    not exist, and aiokafka logs an ERROR for every retry. Waiting here keeps
    a fresh stack's first run free of those.
    """
    deadline = asyncio.get_running_loop().time() + settings.kafka.request_timeout_s
    pending = set(names)
    while pending:
        described = await admin.describe_topics(sorted(pending))
        for entry in described:
            partitions = entry.get("partitions") or []
            if (
                not entry.get("error_code")
                and partitions
                and all(p.get("leader", -1) >= 0 for p in partitions)
            ):
                pending.discard(entry.get("topic"))
        if not pending:
            return
        if asyncio.get_running_loop().time() >= deadline:
            logger.warning(
                "new topics have no leader yet", extra={"topics": sorted(pending)}
            )
            return
        await asyncio.sleep(_LEADER_POLL_S)


async def partitions_of(settings: Settings, topic: str) -> list[int]:
    """The partition ids of ``topic`` (empty if it does not exist).

    A plain consumer only knows partitions of topics it already has metadata
    for, and has no public call that waits for it; the admin client asks.
    """
    async with _admin(settings, f"describe {topic}") as admin:
        described = await admin.describe_topics([topic])
    for entry in described:
        if entry.get("topic") == topic and not entry.get("error_code"):
            return sorted(p["partition"] for p in entry.get("partitions", []))
    return []


# Pause between two looks for a topic another process is to create, in seconds.
_EXISTS_POLL_S = 0.25


async def wait_for_topic(settings: Settings, topic: str) -> None:
    """Return once ``topic`` exists and every partition has a leader.

    A producer or consumer asked about a missing topic retries every 100 ms
    and aiokafka logs an ERROR ("Topic ... not found in cluster metadata")
    for each retry: about 300 lines while a client waits out its timeout
    for a worker that is still loading its models. The admin client asks
    quietly, so a client calls this before it touches the topic.

    Raises
    ------
    BrokerError
        The broker could not be reached, or the topic did not appear within
        ``kafka.request_timeout_s`` (the message says who creates it).
    """
    timeout_s = settings.kafka.request_timeout_s
    deadline = asyncio.get_running_loop().time() + timeout_s
    said = False
    async with _admin(settings, f"describe {topic}") as admin:
        while True:
            described = await admin.describe_topics([topic])
            for entry in described:
                partitions = entry.get("partitions") or []
                if (
                    entry.get("topic") == topic
                    and not entry.get("error_code")
                    and partitions
                    and all(p.get("leader", -1) >= 0 for p in partitions)
                ):
                    return
            if asyncio.get_running_loop().time() >= deadline:
                raise BrokerError(
                    f"topic {topic} does not exist on {settings.kafka.bootstrap} "
                    f"after {timeout_s:g} s: a worker (modelgate worker) creates "
                    "the request path's topics when it starts"
                )
            if not said:
                logger.info("waiting for topic to be created", extra={"topic": topic})
                said = True
            await asyncio.sleep(_EXISTS_POLL_S)


def run_topics(settings: Settings) -> list[str]:
    """Every topic a run with topics of its own creates (the request path's
    and its live configuration topic), to delete at its end."""
    return [*settings.kafka.topics.all_names(), settings.live.topic]


async def delete_topics(settings: Settings, names: list[str]) -> None:
    """Delete ``names`` (missing ones are ignored); for runs that made topics
    of their own and should not leave them behind."""
    async with _admin(settings, "delete topics") as admin:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            await admin.delete_topics(doomed)


async def ensure_compacted_topic(settings: Settings, name: str) -> None:
    """Create ``name`` with one partition and ``cleanup.policy=compact`` when
    missing: records are then kept by key, never expired by age."""
    async with _admin(settings, f"create {name}") as admin:
        if name in set(await admin.list_topics()):
            return
        topic = NewTopic(
            name,
            1,
            settings.kafka.topics.replication_factor,
            topic_configs={"cleanup.policy": "compact"},
        )
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([topic])
        logger.info("created compacted topic", extra={"topics": [name]})
        await _await_leaders(admin, [name], settings)


@contextlib.asynccontextmanager
async def _admin(settings: Settings, doing: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed on exit; broker failures inside the block
    become ``BrokerError`` naming what was being done."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap,
        request_timeout_ms=int(settings.kafka.request_timeout_s * 1000),
    )
    try:
        await asyncio.wait_for(admin.start(), settings.kafka.request_timeout_s)
        yield admin
    except (KafkaError, TimeoutError, OSError) as exc:
        raise BrokerError(
            f"cannot {doing} on {settings.kafka.bootstrap}: {exc!r}"
        ) from exc
    finally:
        await admin.close()


async def ensure_audit_topic(settings: Settings) -> None:
    """Create the admin audit topic (``kafka.topics.audit``) when missing,
    with ``other_partitions`` partitions and ``audit_retention_ms`` as its
    ``retention.ms``: the broker's default retention (a day on the local
    stack) is far too short for an audit trail. An existing topic is left as
    it is, retention included.

    Raises
    ------
    BrokerError
        The broker could not be reached within ``kafka.request_timeout_s``.
    """
    topics = settings.kafka.topics
    async with _admin(settings, f"create {topics.audit}") as admin:
        if topics.audit in set(await admin.list_topics()):
            return
        topic = NewTopic(
            topics.audit,
            topics.other_partitions,
            topics.replication_factor,
            topic_configs={"retention.ms": str(topics.audit_retention_ms)},
        )
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([topic])
        logger.info("created audit topic", extra={"topics": [topics.audit]})
        await _await_leaders(admin, [topics.audit], settings)
