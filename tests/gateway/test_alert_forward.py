"""The alert forwarder's delivery rules over httpx's in-memory transport:
which answers deliver, refuse or retry an alert, the back-off, filters and
copies. The whole path through the real broker and a loopback receiver is in
tests/integration/test_alert_forward.py."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway import logs
from gateway.alert_forward import (
    AUTHORIZATION_ENV,
    BATCH_CONTENT_TYPE,
    CONTENT_TYPE,
    AlertForwarder,
    ForwardOptions,
    _headers,
    endpoint_label,
    retry_after_s,
)
from gateway.alerts import build_alert
from gateway.config import load_settings

URL = "http://127.0.0.1:9/hooks/secret-token?key=abc"


def alert(event_id: str, action: str = "block") -> bytes:
    event = build_alert(
        worker_id="w",
        client_id="mallory",
        key_id="k",
        model="digits",
        detector="ood",
        score=2.0,
        threshold=1.0,
        action=action,
        evidence="e",
        request_id="r",
        query_index=1,
        shadow=False,
        event_id=event_id,
    )
    return json.dumps(event).encode()


class Receiver:
    """Answers POSTs from a list of statuses (then 200), or raises an
    exception given in the list; keeps what it was sent."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, Exception):
            raise answer
        self.bodies.append(json.loads(request.content))
        self.headers.append(request.headers)
        if isinstance(answer, tuple):
            return httpx.Response(answer[0], headers=answer[1])
        return httpx.Response(answer)


def forwarder(receiver: Receiver, waits: list[float], **options: Any) -> AlertForwarder:
    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    client = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    return AlertForwarder(
        load_settings(),
        ForwardOptions(url=URL, first_backoff_s=0.5, max_backoff_s=4.0, **options),
        client=client,
        sleep=sleep,
    )


async def test_a_delivered_alert_is_one_cloudevent_post() -> None:
    receiver = Receiver([])
    forward = forwarder(receiver, [], headers={"X-Team": "ml"})
    assert await forward._settle(alert("a1"), asyncio.Event())
    (body,) = receiver.bodies
    assert body["id"] == "a1" and body["specversion"] == "1.0"
    assert receiver.headers[0]["content-type"] == CONTENT_TYPE
    assert receiver.headers[0]["x-team"] == "ml"
    assert forward.stats.delivered == 1


@pytest.fixture
def command_logging() -> Iterator[None]:
    """The logging a command sets up (gateway.logs.configure), undone after
    the test so that pytest's own handlers come back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {
        name: logging.getLogger(name).level
        for name in ("httpx", "httpcore", "aiokafka", "kafka")
    }
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_no_log_line_names_the_webhook_path(
    command_logging: None, level: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # httpx logs every request's whole URL at INFO ("HTTP Request: POST
    # http://.../hooks/secret-token?key=abc"); a webhook's path and query
    # are often its secret, and the forwarder promises to log only scheme,
    # host and port.
    logs.configure(level)
    receiver = Receiver([503, 200])
    forward = forwarder(receiver, [])
    assert await forward._settle(alert("a1"), asyncio.Event())
    err = capsys.readouterr().err
    assert "alert not delivered, retrying" in err  # the forwarder's own line
    assert "secret-token" not in err and "key=abc" not in err, err


async def test_server_and_auth_failures_are_retried_with_a_doubling_back_off() -> None:
    refused = httpx.ConnectError("refused")
    receiver = Receiver([503, refused, 401, 500, 502, 200])
    waits: list[float] = []
    forward = forwarder(receiver, waits)
    assert await forward._settle(alert("a1"), asyncio.Event())
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0]  # capped at max_backoff_s
    assert forward.stats.delivered == 1 and forward.stats.retries == 5


async def test_retry_after_is_honoured_up_to_the_cap() -> None:
    receiver = Receiver([(429, {"retry-after": "3"}), (503, {"retry-after": "600"})])
    waits: list[float] = []
    assert await forwarder(receiver, waits)._settle(alert("a1"), asyncio.Event())
    assert waits == [3.0, 4.0]
    assert retry_after_s("Wed, 21 Oct 2026 07:28:00 GMT") is None
    assert retry_after_s("-1") is None


@pytest.mark.parametrize("status", [400, 409, 413, 415, 422])
async def test_an_event_the_receiver_refuses_is_passed_over(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver([status])
    waits: list[float] = []
    forward = forwarder(receiver, waits)
    assert await forward._settle(alert("bad"), asyncio.Event())
    assert waits == [] and forward.stats.refused == 1
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.alert_id == "bad" and record.status == status  # type: ignore[attr-defined]
    # The URL's path and query (often the webhook's secret) are not logged.
    assert record.endpoint == "http://127.0.0.1:9"  # type: ignore[attr-defined]


async def test_a_stop_during_retries_leaves_the_alert_unsettled() -> None:
    stop = asyncio.Event()
    receiver = Receiver([503] * 10)

    async def sleep(seconds: float) -> None:
        stop.set()

    client = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    forward = AlertForwarder(
        load_settings(), ForwardOptions(url=URL), client=client, sleep=sleep
    )
    assert await forward._settle(alert("a1"), stop) is False
    assert forward.stats.delivered == 0


async def test_copies_filters_and_unreadable_records_are_not_sent() -> None:
    receiver = Receiver([])
    forward = forwarder(receiver, [], actions=frozenset({"block", "throttle"}))
    stop = asyncio.Event()
    for value in (
        alert("a1"),
        alert("a1"),  # a copy a worker produced again
        alert("a2", action="flag"),
        b"not json",
        b"[1, 2]",
        None,
        alert("a3", action="throttle"),
    ):
        assert await forward._settle(value, stop)
    assert [b["id"] for b in receiver.bodies] == ["a1", "a3"]
    stats = forward.stats
    assert (stats.duplicates, stats.filtered, stats.unreadable) == (1, 1, 3)


def test_options_and_headers_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("ftp://host/x", "http://", "127.0.0.1:8080"):
        with pytest.raises(ValueError, match="http or https"):
            ForwardOptions(url=bad)
    assert endpoint_label("https://hooks.example:8443/T0/B1/xyz?t=1") == (
        "https://hooks.example:8443"
    )
    monkeypatch.setenv(AUTHORIZATION_ENV, "Bearer s3cret")
    assert _headers(["X-A: 1", "X-B:two"]) == {
        "X-A": "1",
        "X-B": "two",
        "Authorization": "Bearer s3cret",
    }
    import typer

    with pytest.raises(typer.BadParameter):
        _headers(["no colon"])


async def test_a_deeply_nested_record_is_passed_over_not_fatal() -> None:
    receiver = Receiver([])
    forward = forwarder(receiver, [])
    assert await forward._settle(b"[" * 200_000, asyncio.Event())
    assert await forward._settle(alert("after"), asyncio.Event())
    assert forward.stats.unreadable == 1
    assert [b["id"] for b in receiver.bodies] == ["after"]


async def test_a_post_is_bounded_as_a_whole_and_a_stop_ends_it() -> None:
    calls = 0

    async def slow_then_fine(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(60)  # a receiver that never finishes answering
        return httpx.Response(200)

    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    client = httpx.AsyncClient(transport=httpx.MockTransport(slow_then_fine))
    forward = AlertForwarder(
        load_settings(),
        ForwardOptions(url=URL, timeout_s=0.2),
        client=client,
        sleep=sleep,
    )
    async with asyncio.timeout(10):
        assert await forward._settle(alert("a1"), asyncio.Event())
    assert calls == 2 and waits == [0.5] and forward.stats.delivered == 1

    calls = 0
    stop = asyncio.Event()
    patient = AlertForwarder(
        load_settings(),
        ForwardOptions(url=URL, timeout_s=120.0),
        client=httpx.AsyncClient(transport=httpx.MockTransport(slow_then_fine)),
    )
    asyncio.get_running_loop().call_later(0.1, stop.set)
    async with asyncio.timeout(10):  # not the 120 s of the POST's own bound
        assert await patient._settle(alert("a2"), stop) is False
    assert patient.stats.delivered == 0


def test_unknown_actions_bad_ports_and_ipv6_endpoints() -> None:
    with pytest.raises(ValueError, match="unknown action blok"):
        ForwardOptions(url=URL, actions=frozenset({"blok"}))
    with pytest.raises(ValueError, match="invalid port"):
        ForwardOptions(url="http://127.0.0.1:99999/x")
    with pytest.raises(ValueError, match="control character"):
        ForwardOptions(url="http://127.0.0.1:29900/a\nb")
    assert endpoint_label("http://[::1]:29900/hook") == "http://[::1]:29900"


def sample(forward: AlertForwarder, name: str, **labels: str) -> float | None:
    return forward.metrics.registry.get_sample_value(name, labels)


async def test_metrics_count_outcomes_retries_by_cause_and_the_last_success() -> None:
    timeout = httpx.ReadTimeout("slow")
    refused = httpx.ConnectError("refused")
    receiver = Receiver([503, timeout, refused, 200, 400])
    backoffs: list[float | None] = []
    forward = AlertForwarder(
        load_settings(),
        ForwardOptions(url=URL, first_backoff_s=0.5, max_backoff_s=4.0),
        client=httpx.AsyncClient(transport=httpx.MockTransport(receiver)),
        clock=lambda: 1_700_000_000.0,
    )

    async def sleep(seconds: float) -> None:
        # What a scrape during the wait sees.
        backoffs.append(sample(forward, "modelgate_forward_backoff_seconds"))

    forward._sleep = sleep
    assert sample(forward, "modelgate_forward_last_success_timestamp_seconds") == 0
    stop = asyncio.Event()
    for value in (alert("a1"), alert("a2"), alert("a2"), b"junk"):
        assert await forward._settle(value, stop)
    outcomes = {
        outcome: sample(forward, "modelgate_forward_alerts_total", outcome=outcome)
        for outcome in ("delivered", "refused", "duplicate", "filtered", "unreadable")
    }
    assert outcomes == {
        "delivered": 1,
        "refused": 1,
        "duplicate": 1,
        "filtered": 0,
        "unreadable": 1,
    }
    causes = {
        cause: sample(forward, "modelgate_forward_retries_total", cause=cause)
        for cause in ("status", "timeout", "transport")
    }
    assert causes == {"status": 1, "timeout": 1, "transport": 1}
    assert backoffs == [0.5, 1.0, 2.0]
    assert sample(forward, "modelgate_forward_backoff_seconds") == 0
    assert sample(
        forward, "modelgate_forward_last_success_timestamp_seconds"
    ) == pytest.approx(1_700_000_000.0)


class FakeConsumer:
    """What the lag export asks of aiokafka's consumer."""

    def __init__(self, highwater: dict[Any, int], positions: dict[Any, int]) -> None:
        self.highwaters = highwater
        self.positions = positions

    def assignment(self) -> set[Any]:
        return set(self.highwaters)

    def highwater(self, tp: Any) -> int | None:
        return self.highwaters.get(tp)

    async def position(self, tp: Any) -> int:
        return self.positions[tp]


class Record:
    def __init__(self, offset: int, value: bytes | None = None) -> None:
        self.offset = offset
        self.value = value


async def test_lag_counts_alerts_not_yet_settled_and_drops_revoked_partitions() -> None:
    from aiokafka import TopicPartition

    p0, p1 = TopicPartition("alerts", 0), TopicPartition("alerts", 1)
    consumer = FakeConsumer({p0: 10, p1: 7}, {p1: 7})
    forward = forwarder(Receiver([]), [])

    def lag(tp: TopicPartition) -> float | None:
        return sample(
            forward,
            "modelgate_consumer_lag",
            topic="alerts",
            partition=str(tp.partition),
        )

    # A batch of offsets 6..9 in hand on p0; p1 idle at its committed offset.
    await forward._export_lag(consumer, {p0: [Record(6), Record(7)]})
    assert (lag(p0), lag(p1)) == (4, 0)
    forward._advance(consumer, p0, 7)  # offset 6 settled
    assert lag(p0) == 3
    # p1 revoked: its series goes rather than staying frozen.
    del consumer.highwaters[p1]
    await forward._export_lag(consumer, {})
    assert lag(p0) == 3 and lag(p1) is None


def test_the_metrics_listener_serves_and_a_taken_port_is_a_config_error() -> None:
    from gateway.errors import ConfigError
    from gateway.metrics import ForwarderMetrics
    from tests.integration.oip_servers import free_port

    metrics = ForwarderMetrics()
    port = metrics.serve("127.0.0.1", free_port())
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
        assert 'modelgate_forward_alerts_total{outcome="delivered"} 0.0' in body
        assert "modelgate_forward_pending 0.0" in body
        with pytest.raises(ConfigError) as taken:
            ForwarderMetrics().serve("127.0.0.1", port)
        assert taken.value.code == "CONFIG_INVALID"
        assert "forward.metrics_port" in str(taken.value)
    finally:
        metrics.close()
    assert ForwarderMetrics().serve("127.0.0.1", 0) == 0


async def test_a_batch_holds_up_to_batch_max_alerts_of_one_fetch_in_order() -> None:
    from aiokafka import TopicPartition

    tp = TopicPartition("alerts", 0)
    consumer = FakeConsumer({tp: 6}, {})
    receiver = Receiver([])
    forward = forwarder(receiver, [], batch_max=3)
    values = [alert("a1"), b"junk", alert("a2"), alert("a3"), alert("a4"), b"junk"]
    records = [Record(i, value) for i, value in enumerate(values)]
    settled = await forward._settle_records(consumer, tp, records, asyncio.Event())
    assert settled == 5
    assert [[e["id"] for e in body] for body in receiver.bodies] == [
        ["a1", "a2", "a3"],
        ["a4"],
    ]
    assert {h["content-type"] for h in receiver.headers} == {BATCH_CONTENT_TYPE}
    assert forward.stats.delivered == 4 and forward.stats.unreadable == 2
    assert sample(forward, "modelgate_consumer_lag", topic="alerts", partition="0") == 0


async def test_a_refused_batch_is_sent_again_one_by_one() -> None:
    receiver = Receiver([400, 200, 422])
    forward = forwarder(receiver, [], batch_max=10)
    events = [json.loads(alert("good")), json.loads(alert("bad"))]
    assert await forward._deliver(events, asyncio.Event())
    assert [[e["id"] for e in body] for body in receiver.bodies] == [
        ["good", "bad"],
        ["good"],
        ["bad"],
    ]
    assert (forward.stats.delivered, forward.stats.refused) == (1, 1)


async def test_a_stop_mid_batch_settles_none_of_it() -> None:
    from aiokafka import TopicPartition

    tp = TopicPartition("alerts", 0)
    stop = asyncio.Event()
    receiver = Receiver([503] * 5)

    async def sleep(seconds: float) -> None:
        stop.set()

    forward = AlertForwarder(
        load_settings(),
        ForwardOptions(url=URL, batch_max=2),
        client=httpx.AsyncClient(transport=httpx.MockTransport(receiver)),
        sleep=sleep,
    )
    records = [Record(i, alert(name)) for i, name in enumerate(("a1", "a2", "a3"))]
    consumer = FakeConsumer({tp: 3}, {})
    assert await forward._settle_records(consumer, tp, records, stop) is None
    assert forward.stats.delivered == 0
    with pytest.raises(ValueError, match="batch-max"):
        ForwardOptions(url=URL, batch_max=0)
