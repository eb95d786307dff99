"""The alert forwarder on the real broker, posting to a receiver on a free
loopback port: alerts arrive once each, in order, as CloudEvents; a refused
event is passed over; a restart resumes after what was committed; an alert
left undelivered when the forwarder stopped is delivered by the next one."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from gateway.alert_forward import (
    BATCH_CONTENT_TYPE,
    CONTENT_TYPE,
    AlertForwarder,
    ForwardOptions,
)
from gateway.config import Settings
from gateway.topics import ensure_topics
from tests.gateway.test_alert_forward import alert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class LoopbackReceiver:
    """An HTTP receiver on 127.0.0.1: answers ``status`` (settable while it
    runs), 400 to the alert ids in ``refuse``, and keeps what it accepted."""

    def __init__(self) -> None:
        self.status = 200
        self.refuse: set[str] = set()
        self.accepted: list[dict[str, Any]] = []
        self.content_types: list[str] = []
        self.posts = 0
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                # A CloudEvents batch is an array of events.
                events = body if isinstance(body, list) else [body]
                with receiver.changed:
                    receiver.posts += 1
                    refused = any(e["id"] in receiver.refuse for e in events)
                    status = 400 if refused else receiver.status
                    if status == 200:
                        receiver.accepted.extend(events)
                        receiver.content_types.append(self.headers["content-type"])
                    receiver.changed.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> list[str]:
        with self.changed:
            return [event["id"] for event in self.accepted]

    async def wait_for(self, count: int, *, posts: bool = False) -> None:
        def reached() -> bool:
            with self.changed:
                return self.changed.wait_for(
                    lambda: (self.posts if posts else len(self.accepted)) >= count,
                    timeout=30,
                )

        # The receiver's threads notify the condition; wait off the loop.
        assert await asyncio.to_thread(reached), "the receiver never got them"


@pytest.fixture
def receiver() -> Iterator[LoopbackReceiver]:
    receiving = LoopbackReceiver()
    yield receiving
    receiving.server.shutdown()
    receiving.server.server_close()


async def produce(settings: Settings, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap)
    await producer.start()
    try:
        for value in values:
            # One key: one partition, so the order below is the topic's.
            await producer.send_and_wait(settings.kafka.topics.alerts, value, key=b"c")
    finally:
        await producer.stop()


class Running:
    """A forwarder running in this loop until ``stop``."""

    def __init__(
        self, settings: Settings, url: str, group: str, batch_max: int = 1
    ) -> None:
        options = ForwardOptions(
            url=url,
            group_id=group,
            from_beginning=True,
            first_backoff_s=0.05,
            batch_max=batch_max,
        )
        self.forwarder = AlertForwarder(settings, options)
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(self.forwarder.run(self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 30)


async def test_alerts_arrive_once_each_in_order_and_a_restart_resumes(
    settings: Settings, receiver: LoopbackReceiver
) -> None:
    await ensure_topics(settings)
    group = f"{settings.kafka.group_id}-forward"
    receiver.refuse = {"refused"}
    await produce(
        settings,
        [alert("a1"), alert("a1"), b"garbage", alert("refused"), alert("a2")],
    )
    first = Running(settings, receiver.url, group)
    await receiver.wait_for(2)
    # The receiver saw the refused one once and moved on (no retry loop).
    await receiver.wait_for(3, posts=True)
    await first.stop()
    assert receiver.ids() == ["a1", "a2"]
    assert set(receiver.content_types) == {CONTENT_TYPE}
    assert first.forwarder.stats.refused == 1
    assert first.forwarder.stats.duplicates == 1
    assert first.forwarder.stats.unreadable == 1

    # A second forwarder of the group starts after what was committed.
    await produce(settings, [alert("a3")])
    second = Running(settings, receiver.url, group)
    await receiver.wait_for(3)
    await second.stop()
    assert receiver.ids() == ["a1", "a2", "a3"]
    assert receiver.posts == 4


async def test_an_alert_pending_when_the_forwarder_stops_is_delivered_later(
    settings: Settings, receiver: LoopbackReceiver
) -> None:
    await ensure_topics(settings)
    group = f"{settings.kafka.group_id}-forward"
    receiver.status = 503  # the receiver is down
    await produce(settings, [alert("b1"), alert("b2")])
    first = Running(settings, receiver.url, group)
    await receiver.wait_for(3, posts=True)  # b1 tried, and retried
    # What an operator scraping it sees: both alerts wait (fetched or not,
    # none settled), retries on the status, nothing ever delivered.
    stuck = first.forwarder.metrics.registry.get_sample_value
    lag = {"topic": settings.kafka.topics.alerts, "partition": "0"}
    assert stuck("modelgate_consumer_lag", lag) == 2
    assert stuck("modelgate_forward_pending") in (1, 2)  # one fetch, or two
    assert (stuck("modelgate_forward_retries_total", {"cause": "status"}) or 0) >= 2
    assert stuck("modelgate_forward_last_success_timestamp_seconds") == 0
    await first.stop()
    assert receiver.ids() == [] and first.forwarder.stats.delivered == 0

    receiver.status = 200
    second = Running(settings, receiver.url, group)
    await receiver.wait_for(2)
    caught_up = second.forwarder.metrics.registry.get_sample_value
    # The receiver has b2 a moment before the forwarder has its answer; a
    # stop in between would leave b2 unsettled (and sent again later).
    async with asyncio.timeout(10):
        while True:
            if caught_up("modelgate_consumer_lag", lag) == 0:
                break
            await asyncio.sleep(0.05)
    await second.stop()
    assert receiver.ids() == ["b1", "b2"]
    assert caught_up("modelgate_forward_pending") == 0
    assert caught_up("modelgate_forward_alerts_total", {"outcome": "delivered"}) == 2
    assert (caught_up("modelgate_forward_last_success_timestamp_seconds") or 0) > 0


async def test_batches_carry_the_alerts_in_order_and_a_refusal_is_pinned_down(
    settings: Settings, receiver: LoopbackReceiver
) -> None:
    await ensure_topics(settings)
    group = f"{settings.kafka.group_id}-forward"
    receiver.refuse = {"refused"}
    await produce(
        settings, [alert("c1"), alert("c1"), alert("refused"), alert("c2"), alert("c3")]
    )
    first = Running(settings, receiver.url, group, batch_max=10)
    await receiver.wait_for(3)
    settled = first.forwarder.metrics.registry.get_sample_value
    lag = {"topic": settings.kafka.topics.alerts, "partition": "0"}
    async with asyncio.timeout(10):
        while True:
            if settled("modelgate_consumer_lag", lag) == 0:
                break
            await asyncio.sleep(0.05)
    await first.stop()
    # The batch with the refused event was sent again one by one: only that
    # event is lost, the others arrive once each, in the topic's order.
    assert receiver.ids() == ["c1", "c2", "c3"]
    assert set(receiver.content_types) == {BATCH_CONTENT_TYPE}
    assert first.forwarder.stats.refused == 1
    assert first.forwarder.stats.duplicates == 1

    # What was settled was committed: a restart sends only the new alert.
    await produce(settings, [alert("c4")])
    second = Running(settings, receiver.url, group, batch_max=10)
    await receiver.wait_for(4)
    await second.stop()
    assert receiver.ids() == ["c1", "c2", "c3", "c4"]
