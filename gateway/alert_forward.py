"""Forward alerts to an HTTP endpoint as CloudEvents: a SIEM's collector, an
incident tool or a chat webhook (docs/alerts.md, "Forwarding alerts").

``modelgate alerts-forward --url URL`` reads the alerts topic in a consumer
group of its own and POSTs each alert in CloudEvents' structured HTTP mode
(``Content-Type: application/cloudevents+json``, the event as the body), in
the topic's order within each partition; with ``--batch-max N`` (N > 1),
up to N alerts of one fetch in one POST in CloudEvents' batched mode
(``application/cloudevents-batch+json``, a JSON array of events), with no
waiting for a batch to fill. Offsets are committed only for
alerts already settled (delivered, or refused for good), so a forwarder
stopped or killed mid-way resumes where it left off: every alert arrives at
least once. Copies a worker produced again (same ``id``) are forwarded once
while this process remembers the id (``SeenAlerts``).

How an answer settles an alert:

- 2xx: delivered.
- 400, 409, 413, 415 or 422: the receiver refuses this event as it is, and
  sending it again would not change that. Logged at ERROR with the alert's
  id and the status, counted, and passed over, so one event the receiver
  cannot take does not hold every later alert. A refused batch is sent
  again one event at a time, so only the event refused alone is passed over.
- anything else (401 and 403 too: a credential is wrong, not the event),
  a timeout or a connection failure: retried with a doubling back-off
  (``Retry-After`` honoured, up to ``max_backoff_s``) until delivered or the
  process stops. The partition waits rather than lose an alert.

The process serves Prometheus metrics on ``forward.metrics_port`` (9468):
how alerts settled, retries, the last delivery's time, what is pending and
the back-off (``gateway.metrics.ForwarderMetrics``); the rule
ModelgateForwarderStuck fires when alerts wait and none is delivered.

Imports aiokafka, httpx and the gateway's alerts, config and metrics modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer

from gateway import logs
from gateway.alerts import SeenAlerts
from gateway.cli_common import (
    ConfigOption,
    LogLevel,
    load_cli_settings,
    stop_on_signals,
)
from gateway.config import Settings
from gateway.errors import ConfigError

if TYPE_CHECKING:
    import httpx

    from gateway.metrics import ForwarderMetrics

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/cloudevents+json"
# CloudEvents' batched HTTP mode: a JSON array of structured-mode events.
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
# Statuses that refuse the event itself (RFC 9110): resending it is useless.
REFUSED_STATUSES = frozenset({400, 409, 413, 415, 422})
# Longest wait for an idle partition's position, for its lag gauge only.
_POSITION_WAIT_S = 1.0
# Read from the environment, not the command line, where `ps` would show it.
AUTHORIZATION_ENV = "MODELGATE_FORWARD_AUTHORIZATION"
# The policy's actions an alert can name (gateway.policy).
ACTIONS = frozenset({"allow", "flag", "throttle", "degrade", "block"})


@dataclass(frozen=True)
class ForwardOptions:
    """Where and what to forward.

    ``actions``: forward only alerts whose policy action is one of these
    (``flag``, ``throttle``, ``degrade``, ``block``); empty forwards all.
    ``timeout_s`` bounds one POST as a whole, from connecting to the
    receiver's status line: a receiver that answers a byte at a time holds
    an alert no longer than that.
    """

    url: str
    group_id: str = "modelgate-alerts-forward"
    headers: Mapping[str, str] = field(default_factory=dict)
    actions: frozenset[str] = frozenset()
    from_beginning: bool = False
    timeout_s: float = 10.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 60.0
    # 1: one structured-mode POST per alert. More: up to this many alerts in
    # one batched-mode POST (BATCH_CONTENT_TYPE), even a batch of one.
    batch_max: int = 1

    def __post_init__(self) -> None:
        # httpx refuses such a URL only at the first POST, which ended the
        # command in a traceback.
        if any(c.isspace() or not c.isprintable() for c in self.url):
            raise ValueError(
                f"--url holds a space or a control character: {self.url!r}"
            )
        parts = urlsplit(self.url)
        try:
            parts.port  # noqa: B018 - raises on a port out of range
        except ValueError:
            raise ValueError(f"--url has an invalid port: {self.url!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must be an http or https URL, got {self.url!r}")
        unknown = sorted(self.actions - ACTIONS)
        if unknown:
            known = ", ".join(sorted(ACTIONS))
            raise ValueError(f"unknown action {', '.join(unknown)}; one of {known}")
        if not 0 < self.first_backoff_s <= self.max_backoff_s:
            raise ValueError("back-off: 0 < first_backoff_s <= max_backoff_s")
        if not 1 <= self.batch_max <= 1000:
            raise ValueError("--batch-max must be between 1 and 1000")


@dataclass
class ForwardStats:
    delivered: int = 0
    refused: int = 0
    duplicates: int = 0
    filtered: int = 0
    unreadable: int = 0
    retries: int = 0


def endpoint_label(url: str) -> str:
    """``scheme://host:port`` of ``url``, for logs: webhook URLs often carry
    their secret in the path or the query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds; an HTTP date
    or garbage gives None (the forwarder's own back-off applies)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class AlertForwarder:
    """One forwarder process: consume, deliver, commit.

    ``metrics`` is where counters and gauges go (a fresh registry if
    None; the caller serves it). ``client``, ``sleep`` and ``clock`` are
    for tests (an in-memory transport, a wait that does not wait, the time
    of a delivery).
    """

    def __init__(
        self,
        settings: Settings,
        options: ForwardOptions,
        *,
        client: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Any] | None = None,
        metrics: ForwarderMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Here, not at the top: `modelgate --help` imports this module for
        # its command, and httpx and the metrics (Redis, prometheus_client)
        # cost most of its start.
        import httpx

        from gateway.metrics import ForwarderMetrics

        self._settings = settings
        self._options = options
        self._client = client or httpx.AsyncClient(
            timeout=options.timeout_s,
            # Alerts go to the configured URL and nowhere else.
            trust_env=False,
            follow_redirects=False,
        )
        self._owns_client = client is None
        self._sleep = sleep
        self._seen = SeenAlerts()
        self.stats = ForwardStats()
        self.metrics = metrics or ForwarderMetrics()
        self._clock = clock
        self._endpoint = endpoint_label(options.url)
        # Next offset to settle per partition, and the partitions whose lag
        # is exported (a revoked one's series is removed, not left frozen).
        self._next: dict[Any, int] = {}
        self._lag_partitions: set[Any] = set()

    def _count(self, outcome: str) -> None:
        """One record settled as ``outcome`` (a FORWARD_OUTCOMES value)."""
        field_name = {"duplicate": "duplicates"}.get(outcome, outcome)
        setattr(self.stats, field_name, getattr(self.stats, field_name) + 1)
        self.metrics.alerts.labels(outcome).inc()

    async def run(self, stop: asyncio.Event) -> None:
        """Forward until ``stop`` is set; what was settled is committed."""
        from aiokafka import AIOKafkaConsumer

        topic = self._settings.kafka.topics.alerts
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self._settings.kafka.bootstrap,
            group_id=self._options.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if self._options.from_beginning else "latest",
        )
        await asyncio.wait_for(consumer.start(), self._settings.kafka.request_timeout_s)
        logger.info(
            "forwarding alerts",
            extra={
                "topic": topic,
                "endpoint": self._endpoint,
                "group": self._options.group_id,
            },
        )
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=500, max_records=200)
                await self._export_lag(consumer, batch)
                self.metrics.pending.set(sum(map(len, batch.values())))
                for tp, records in batch.items():
                    settled = await self._settle_records(consumer, tp, records, stop)
                    if settled is not None:
                        await self._commit(consumer, tp, settled)
                    if stop.is_set():
                        break
        finally:
            await consumer.stop()
            if self._owns_client:
                await self._client.aclose()
            logger.info(
                "alert forwarder stopped",
                extra={"endpoint": self._endpoint, **vars(self.stats)},
            )

    async def _export_lag(self, consumer: Any, batch: Mapping[Any, Any]) -> None:
        """Set each assigned partition's lag: alerts up to its high watermark
        not yet settled (a fetched batch counts until settled)."""
        from aiokafka.errors import KafkaError

        assigned = set(consumer.assignment())
        for tp in self._lag_partitions - assigned:
            self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
            self._next.pop(tp, None)
        self._lag_partitions &= assigned
        for tp in assigned:
            records = batch.get(tp)
            if records:
                self._next[tp] = records[0].offset
            elif tp not in self._next:
                # Where the group's committed offset (or the reset) put us;
                # aiokafka's fetcher sets it on its own, position() only waits
                # for that. Only for the gauge, so the wait is short: alerts
                # must not wait on it. A partition revoked meanwhile, or a
                # position not known yet, leaves the gauge unset until the
                # next batch.
                try:
                    self._next[tp] = await asyncio.wait_for(
                        consumer.position(tp), _POSITION_WAIT_S
                    )
                except (KafkaError, TimeoutError):  # IllegalStateError is one
                    continue
            self._advance(consumer, tp, self._next[tp])

    def _advance(self, consumer: Any, tp: Any, next_offset: int) -> None:
        self._next[tp] = next_offset
        highwater = consumer.highwater(tp)
        if highwater is None:  # no fetch answered for it yet
            return
        self._lag_partitions.add(tp)
        self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
            max(highwater - next_offset, 0)
        )

    async def _commit(self, consumer: Any, tp: Any, offset: int) -> None:
        from aiokafka.errors import CommitFailedError, KafkaError

        try:
            await consumer.commit({tp: offset + 1})
        except (CommitFailedError, KafkaError) as exc:
            # The partition moved to another forwarder (or the broker hiccupped):
            # it reads these alerts again and its receiver gets them twice, as
            # at-least-once allows.
            logger.warning(
                "alert offsets not committed",
                extra={"partition": tp.partition, "offset": offset, "error": repr(exc)},
            )

    async def _settle_records(
        self, consumer: Any, tp: Any, records: list[Any], stop: asyncio.Event
    ) -> int | None:
        """Settle one partition's records in order, up to ``batch_max``
        alerts per POST; the offset of the last one settled (None: none).

        A record passed over (unreadable, filtered, a copy) behind alerts
        still to be sent settles with them: offsets are committed in order
        only, so it waits for the POST as they do."""
        settled: int | None = None
        group: list[dict[str, Any]] = []
        span = 0  # records since the last settled one, group's included

        async def flush(last: int) -> bool:
            nonlocal settled, group, span
            if group and not await self._deliver(group, stop):
                return False
            settled, group = last, []
            self.metrics.pending.dec(span)
            span = 0
            self._advance(consumer, tp, last + 1)
            return True

        for record in records:
            event = self._accept(record.value)
            span += 1
            if event is not None:
                group.append(event)
            if group and len(group) < self._options.batch_max:
                continue  # room for more: this fetch's later alerts join it
            if not await flush(record.offset):
                return settled
        if span:
            await flush(records[-1].offset)
        return settled

    async def _settle(self, value: bytes | None, stop: asyncio.Event) -> bool:
        """Deliver, refuse or pass over one record; False only when ``stop``
        came before it was settled (it is then not committed)."""
        event = self._accept(value)
        return event is None or await self._deliver([event], stop)

    def _accept(self, value: bytes | None) -> dict[str, Any] | None:
        """The alert of a record, to be delivered; None for one passed over
        (unreadable, an action not forwarded, a copy), counted as such."""
        try:
            event = json.loads(value or b"")
        except (ValueError, RecursionError):
            # RecursionError: deeply nested arrays exhaust the decoder's stack;
            # passed over like any record that is not an alert.
            event = None
        if not isinstance(event, dict):
            self._count("unreadable")
            logger.error(
                "unreadable alert record passed over",
                extra={"endpoint": self._endpoint},
            )
            return None
        data = _data(event)
        if self._options.actions and data.get("action") not in self._options.actions:
            self._count("filtered")
            return None
        if not self._seen.first(event):
            self._count("duplicate")
            return None
        return event

    async def _deliver(self, events: list[dict[str, Any]], stop: asyncio.Event) -> bool:
        """POST ``events`` (one structured-mode event, or a batch) until
        delivered or refused; False when ``stop`` came first.

        A batch the receiver refuses is sent again one event at a time, so
        that only the event it cannot take is passed over."""
        if self._options.batch_max == 1:
            (event,) = events
            body = json.dumps(event).encode()
            content_type = CONTENT_TYPE
        else:
            body = json.dumps(events).encode()
            content_type = BATCH_CONTENT_TYPE
        headers = {**self._options.headers, "content-type": content_type}
        first = _data(events[0])
        fields = {
            "alert_id": events[0].get("id"),
            "alerts": len(events),
            "client": first.get("client_id"),
            "detector": first.get("detector"),
            "endpoint": self._endpoint,
        }
        backoff = self._options.first_backoff_s
        while True:
            wait: float | None = None
            post = asyncio.ensure_future(self._post(body, headers))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait(
                    {post, stopping}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stopping.cancel()
            if not post.done():
                # Stopped mid-POST: the alert is left uncommitted for the next
                # forwarder, which may deliver it a second time.
                post.cancel()
                await asyncio.gather(post, return_exceptions=True)
                return False
            import httpx

            try:
                status, retry_after = post.result()
            except (httpx.HTTPError, TimeoutError) as exc:
                reason = type(exc).__name__
                timed_out = isinstance(exc, TimeoutError | httpx.TimeoutException)
                cause = "timeout" if timed_out else "transport"
            else:
                if 200 <= status < 300:
                    for _ in events:
                        self._count("delivered")
                    self.metrics.last_success.set(self._clock())
                    return True
                if status in REFUSED_STATUSES and len(events) > 1:
                    logger.warning(
                        "alert batch refused, sending its alerts one by one",
                        extra={**fields, "status": status},
                    )
                    for event in events:
                        if not await self._deliver([event], stop):
                            return False
                    return True
                if status in REFUSED_STATUSES:
                    self._count("refused")
                    logger.error(
                        "alert refused by the receiver, passed over",
                        extra={**fields, "status": status},
                    )
                    return True
                reason = f"HTTP {status}"
                cause = "status"
                wait = retry_after_s(retry_after)
            delay = min(
                wait if wait is not None else backoff, self._options.max_backoff_s
            )
            self.stats.retries += 1
            self.metrics.retries.labels(cause).inc()
            logger.warning(
                "alert not delivered, retrying",
                extra={**fields, "reason": reason, "delay_s": delay},
            )
            self.metrics.backoff_seconds.set(delay)
            try:
                if await self._wait(delay, stop):
                    return False
            finally:
                self.metrics.backoff_seconds.set(0)
            backoff = min(backoff * 2, self._options.max_backoff_s)

    async def _post(
        self, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, str | None]:
        """One POST within ``timeout_s`` as a whole; the status and any
        ``Retry-After``. The body of the answer is never read: only its
        status matters, and a receiver must not fill this process's memory."""
        async with asyncio.timeout(self._options.timeout_s):
            async with self._client.stream(
                "POST", self._options.url, content=body, headers=headers
            ) as answer:
                return answer.status_code, answer.headers.get("retry-after")

    async def _wait(self, delay_s: float, stop: asyncio.Event) -> bool:
        """Sleep ``delay_s`` or until ``stop``; True when stopped."""
        if self._sleep is not None:
            await self._sleep(delay_s)
            return stop.is_set()
        try:
            await asyncio.wait_for(stop.wait(), delay_s)
        except TimeoutError:
            return False
        return True


def _data(event: Mapping[str, Any]) -> Mapping[str, Any]:
    raw = event.get("data")
    return raw if isinstance(raw, dict) else {}


def _headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise typer.BadParameter(f"--header wants NAME: VALUE, got {value!r}")
        headers[name.strip()] = content.strip()
    token = os.environ.get(AUTHORIZATION_ENV)
    if token:
        headers["Authorization"] = token
    return headers


def register(app: typer.Typer) -> None:
    """Add ``alerts-forward`` to the ``modelgate`` app."""

    @app.command("alerts-forward")
    def alerts_forward(
        url: Annotated[
            str, typer.Option(help="Where to POST each alert (http or https).")
        ],
        header: Annotated[
            list[str] | None,
            typer.Option(
                help=(
                    "Extra header NAME: VALUE (repeatable). Put a secret in "
                    f"{AUTHORIZATION_ENV} instead: it becomes the Authorization "
                    "header."
                )
            ),
        ] = None,
        action: Annotated[
            list[str] | None,
            typer.Option(help="Forward only alerts with this action (repeatable)."),
        ] = None,
        group: Annotated[
            str,
            typer.Option(
                help="Consumer group: a restart resumes at its committed offsets."
            ),
        ] = "modelgate-alerts-forward",
        from_beginning: Annotated[
            bool,
            typer.Option(
                help=(
                    "A group with no committed offsets starts at the oldest "
                    "stored alert (else at new ones)."
                )
            ),
        ] = False,
        timeout_s: Annotated[
            float,
            typer.Option(min=0.1, max=300.0, help="Timeout of one POST, as a whole."),
        ] = 10.0,
        batch_max: Annotated[
            int,
            typer.Option(
                min=1,
                max=1000,
                help=(
                    "Up to this many alerts per POST, as a CloudEvents batch "
                    f"({BATCH_CONTENT_TYPE}); 1 (default) posts each alone."
                ),
            ),
        ] = 1,
        config: ConfigOption = None,
        log_level: LogLevel = "INFO",
    ) -> None:
        """Forward alerts to an HTTP endpoint as CloudEvents until SIGTERM or
        Ctrl-C; every alert arrives at least once (docs/alerts.md)."""
        settings = load_cli_settings(config)
        logs.configure(log_level)
        try:
            options = ForwardOptions(
                url=url,
                group_id=group,
                headers=_headers(header or []),
                actions=frozenset(action or ()),
                from_beginning=from_beginning,
                timeout_s=timeout_s,
                batch_max=batch_max,
            )
        except ValueError as exc:
            typer.echo(f"error [CONFIG_INVALID]: {exc}", err=True)
            raise typer.Exit(2) from exc

        from gateway.metrics import ForwarderMetrics

        metrics = ForwarderMetrics()
        try:
            metrics.serve(settings.forward.metrics_host, settings.forward.metrics_port)
        except ConfigError as exc:
            typer.echo(f"error [{exc.code}]: {exc}", err=True)
            raise typer.Exit(2) from exc

        async def main() -> ForwardStats:
            stop = stop_on_signals()
            forwarder = AlertForwarder(settings, options, metrics=metrics)
            await forwarder.run(stop)
            return forwarder.stats

        try:
            stats = asyncio.run(main())
        finally:
            metrics.close()
        typer.echo(
            f"forwarded {stats.delivered}, refused {stats.refused}, "
            f"duplicates {stats.duplicates}, filtered {stats.filtered}, "
            f"unreadable {stats.unreadable}",
            err=True,
        )
