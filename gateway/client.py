"""Kafka client library: send signed inference requests and await their replies.

``KafkaTransport`` owns one producer and one reply consumer and may be shared by
any number of ``GatewayClient`` objects (one per API key) in the same process.
Replies are matched to requests by ``request_id``, so several transports may
share one reply topic; each ignores the replies it did not ask for.

This module imports aiokafka, numpy and the gateway's wire formats; it never
imports the worker, the detectors or Redis, because it runs in client processes.

Known shortcoming: every transport on a reply topic reads every reply on it and
discards the ones that are not its own. That is cheap for one demo or one front
door, but N front doors sharing ``modelgate.responses`` each read N times the
traffic; give each process its own ``reply_topic`` (the worker accepts any topic
under ``worker.reply_topic_prefix``) when that matters.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.config import Settings
from gateway.errors import BrokerError, ModelgateError
from gateway.protocol import (
    DECODE_ERRORS,
    InferResponse,
    build_request,
    decode_response,
)
from gateway.topics import wait_for_topic

logger = logging.getLogger(__name__)

# How long an unauthenticated error answer waits for an authenticated answer
# to the same request id to overtake it; the worker answers a batch in far less.
_UNAUTHENTICATED_GRACE_S = 1.0

# Codes a caller may retry with the same request id after waiting. The worker
# also sets ``retriable`` per response; this is the fallback when it does not.
_RETRIABLE_CODES = frozenset(
    {"RATE_LIMITED", "BACKEND_ERROR", "STORE_UNAVAILABLE", "TIMEOUT"}
)


class GatewayRequestError(ModelgateError):
    """The gateway answered a request with an error, or did not answer in time.

    ``code`` is the stable error code from the response (``RATE_LIMITED``,
    ``BLOCKED``, ``SCHEMA_INVALID``, ``AUTH_*`` ...) or ``TIMEOUT`` when no reply
    arrived. Match on ``code``, never on the message.

    Parameters
    ----------
    message
        What went wrong, for a person.
    code
        Stable error code.
    retriable
        Whether sending the same request again later may succeed.
    retry_after_ms
        How long the gateway asked the client to wait, when it said.
    request_id
        The request this error answers.
    """

    default_code = "REQUEST_FAILED"

    def __init__(
        self,
        message: str,
        *,
        code: str,
        retriable: bool = False,
        retry_after_ms: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code, retriable=retriable)
        self.retry_after_ms = retry_after_ms
        self.request_id = request_id


def error_of(response: InferResponse) -> GatewayRequestError | None:
    """The error a response carries, as an exception object, or None if ``ok``."""
    if response.status == "ok":
        return None
    body = response.error
    code = body.code if body is not None else "UNKNOWN"
    return GatewayRequestError(
        body.message if body is not None else "error response without a body",
        code=code,
        retriable=(body.retriable if body is not None else False)
        or code in _RETRIABLE_CODES,
        retry_after_ms=response.retry_after_ms,
        request_id=response.request_id,
    )


def output_array(response: InferResponse, name: str) -> np.ndarray[Any, Any]:
    """One named output tensor of an ``ok`` response as a numpy array.

    Raises
    ------
    GatewayRequestError
        The response is an error (its code), or lacks the output
        (``MISSING_OUTPUT``).
    """
    error = error_of(response)
    if error is not None:
        raise error
    for tensor in response.outputs or ():
        if tensor.name == name:
            dtype = np.int64 if tensor.datatype in ("INT64", "INT32") else np.float32
            return np.asarray(tensor.data, dtype=dtype).reshape(tensor.shape)
    raise GatewayRequestError(
        f"response has no output named {name!r}",
        code="MISSING_OUTPUT",
        request_id=response.request_id,
    )


def probabilities(response: InferResponse) -> np.ndarray[Any, Any]:
    """Class probabilities of an ``ok`` response, float32 of shape (n, classes).

    A degraded answer may carry rounded or perturbed probabilities; they are
    returned as the gateway sent them.

    Raises
    ------
    GatewayRequestError
        The response is an error; ``code``, ``retriable`` and
        ``retry_after_ms`` come from it.

    Examples
    --------
    >>> rows = np.zeros((1, 64), dtype=np.float32)
    >>> proba = probabilities(await client.infer(rows))  # doctest: +SKIP
    """
    return output_array(response, "probabilities")


class KafkaTransport:
    """One producer and one reply consumer shared by many clients.

    The reply consumer is assigned every partition of the reply topic by hand
    (no consumer group, nothing committed) and positioned at the end of each
    partition during ``start``, before any request can be sent, so no reply to
    this transport's requests can land before the position and be missed.

    Parameters
    ----------
    settings
        Bootstrap servers, topic names and timeouts.
    reply_topic
        Where the worker should send replies; defaults to the responses topic.
        It must exist and start with ``worker.reply_topic_prefix``.

    Examples
    --------
    >>> async with KafkaTransport(settings) as transport:  # doctest: +SKIP
    ...     client = GatewayClient(transport, key_id, secret, "alice", "digits")
    ...     response = await client.infer(rows)
    """

    def __init__(self, settings: Settings, *, reply_topic: str | None = None) -> None:
        self._settings = settings
        self.reply_topic = reply_topic or settings.kafka.topics.responses
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        # (the record key its answer must carry, request id) -> reply future.
        # Request ids are per client (the workers dedupe per client), so two
        # clients sharing this transport may wait on the same id at once.
        self._pending: dict[tuple[bytes, str], asyncio.Future[InferResponse]] = {}
        self._lock = asyncio.Lock()
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    @property
    def settings(self) -> Settings:
        return self._settings

    async def start(self) -> None:
        """Connect, assign the reply partitions and seek to their end.

        Idempotent. Raises ``BrokerError`` if the broker cannot be reached or the
        reply topic does not exist within ``kafka.request_timeout_s``.
        """
        async with self._lock:
            if self._started:
                return
            kafka = self._settings.kafka
            timeout_s = kafka.request_timeout_s
            timeout_ms = int(timeout_s * 1000)
            producer = AIOKafkaProducer(
                bootstrap_servers=kafka.bootstrap,
                request_timeout_ms=timeout_ms,
                acks="all",
                linger_ms=1,
            )
            consumer: AIOKafkaConsumer | None = None
            try:
                await asyncio.wait_for(producer.start(), timeout_s)
                consumer = await _open_tail(producer, self._settings, self.reply_topic)
            except (KafkaError, TimeoutError, OSError) as exc:
                await _quiet_stop(consumer, producer, timeout_s)
                raise BrokerError(
                    f"cannot start transport on {kafka.bootstrap} "
                    f"(reply topic {self.reply_topic}): {exc!r}"
                ) from exc
            except BaseException:
                await _quiet_stop(consumer, producer, timeout_s)
                raise

            self._producer = producer
            self._consumer = consumer
            self._dispatcher = asyncio.create_task(
                self._dispatch_replies(), name=f"replies:{self.reply_topic}"
            )
            self._started = True
            logger.info("transport started", extra={"topic": self.reply_topic})

    async def stop(self) -> None:
        """Cancel the reply task, fail pending requests, close both clients.

        Idempotent; safe to call after a failed ``start``.
        """
        async with self._lock:
            if not self._started:
                return
            self._started = False
            dispatcher, self._dispatcher = self._dispatcher, None
            if dispatcher is not None:
                await cancel_and_wait(dispatcher)
            for (_, request_id), future in self._pending.items():
                if not future.done():
                    future.set_exception(
                        GatewayRequestError(
                            "transport stopped before the reply arrived",
                            code="TRANSPORT_CLOSED",
                            request_id=request_id,
                        )
                    )
            self._pending.clear()
            consumer, self._consumer = self._consumer, None
            producer, self._producer = self._producer, None
            await _quiet_stop(
                consumer, producer, self._settings.kafka.request_timeout_s
            )
            logger.info("transport stopped", extra={"topic": self.reply_topic})

    async def __aenter__(self) -> KafkaTransport:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def tail(self, topic: str) -> AIOKafkaConsumer:
        """A started consumer on every partition of ``topic``, at its end.

        Only records produced after this returns are read, which is what an
        observer of alerts or decisions started before the traffic wants. The
        caller owns the consumer and must ``stop`` it.

        Raises
        ------
        BrokerError
            The topic's partitions or end offsets could not be read in time.
        """
        producer = self._producer
        if not self._started or producer is None:
            raise GatewayRequestError(
                "transport is not started", code="TRANSPORT_CLOSED"
            )
        try:
            return await _open_tail(producer, self._settings, topic)
        except (KafkaError, TimeoutError, OSError) as exc:
            raise BrokerError(f"cannot tail {topic}: {exc!r}") from exc

    async def send(
        self,
        *,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]],
        request_id: str,
    ) -> tuple[asyncio.Future[Any], asyncio.Future[InferResponse]]:
        """Enqueue one request; return (delivery future, reply future).

        The reply future is registered before the record is enqueued, because a
        fast worker may answer before ``send`` returns. Neither future is awaited
        here, so a caller can enqueue many requests and gather them. A caller that
        gives up on the reply must call ``forget(request_id, key)``.

        Raises
        ------
        GatewayRequestError
            ``TRANSPORT_CLOSED`` if the transport is not started,
            ``DUPLICATE_REQUEST`` if ``request_id`` is already pending under
            this ``key`` (another key's request with the same id is no
            conflict).
        BrokerError
            The producer refused the record (buffer full past the timeout).
        """
        producer = self._producer
        if not self._started or producer is None:
            raise GatewayRequestError(
                "transport is not started", code="TRANSPORT_CLOSED"
            )
        if (key, request_id) in self._pending:
            raise GatewayRequestError(
                f"request {request_id} is already pending",
                code="DUPLICATE_REQUEST",
                request_id=request_id,
            )
        reply: asyncio.Future[InferResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[key, request_id] = reply
        try:
            delivery = await asyncio.wait_for(
                producer.send(
                    self._settings.kafka.topics.requests,
                    value=value,
                    key=key,
                    headers=headers,
                ),
                self._settings.kafka.request_timeout_s,
            )
        except (KafkaError, TimeoutError) as exc:
            self.forget(request_id, key)
            raise BrokerError(f"cannot enqueue request: {exc!r}") from exc
        except BaseException:
            self.forget(request_id, key)
            raise
        return delivery, reply

    def forget(self, request_id: str, key: bytes | None = None) -> None:
        """Stop waiting for a reply; a late reply is then ignored.

        Parameters
        ----------
        key
            The record key the request was sent with; ``None`` forgets the
            request id under every key (for callers that send for one client
            only).
        """
        for entry in [e for e in self._pending if e[1] == request_id]:
            if key is None or entry[0] == key:
                future = self._pending.pop(entry)
                if not future.done():
                    future.cancel()

    @property
    def pending_count(self) -> int:
        """Requests sent through this transport still waiting for a reply."""
        return len(self._pending)

    async def _dispatch_replies(self) -> None:
        consumer = self._consumer
        assert consumer is not None  # set before this task is created
        poll_timeout_ms = self._settings.kafka.poll_timeout_ms
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=poll_timeout_ms)
            except KafkaError as exc:
                # The consumer reconnects by itself; pending requests time out on
                # their own deadline, so this task only has to keep polling.
                logger.warning("reply poll failed: %r", exc)
                await asyncio.sleep(poll_timeout_ms / 1000)
                continue
            for records in batches.values():
                for record in records:
                    self._deliver(record.key, record.value)

    def _deliver(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:
            return
        try:
            response = decode_response(value)
        except DECODE_ERRORS as exc:
            # Anything on a shared topic may be hostile; one bad record must
            # not end the task that delivers everyone's replies.
            logger.warning("undecodable reply skipped: %s", exc)
            return
        if key is not None and (key, response.request_id) in self._pending:
            # The worker keys an answer with the client id it authenticated.
            future = self._pending.pop((key, response.request_id))
            if not future.done():
                future.set_result(response)
        elif key is None and response.status == "error":
            # An answer to a request the worker could not authenticate carries
            # no key. Anyone can provoke one by sending an unsigned copy of our
            # request id, so it only counts if no authenticated answer comes
            # within a short grace period.
            asyncio.get_running_loop().call_later(
                _UNAUTHENTICATED_GRACE_S, self._settle, response
            )
        else:
            logger.debug("reply for %s under another key ignored", response.request_id)

    def _settle(self, response: InferResponse) -> None:
        # Every client still waiting on this id: the unauthenticated answer
        # does not say whose request it refuses.
        for entry in [e for e in self._pending if e[1] == response.request_id]:
            future = self._pending.pop(entry)
            if not future.done():
                future.set_result(response)


async def _open_tail(
    producer: AIOKafkaProducer, settings: Settings, topic: str
) -> AIOKafkaConsumer:
    """Start a group-less consumer assigned all partitions of ``topic`` and
    positioned at their current end. The producer supplies the partition list
    because aiokafka's consumer has no public call that waits for it."""
    kafka = settings.kafka
    timeout_s = kafka.request_timeout_s
    # Quietly first: the producer logs an ERROR per retry on a missing topic.
    await wait_for_topic(settings, topic)
    partitions = await asyncio.wait_for(producer.partitions_for(topic), timeout_s)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        request_timeout_ms=int(timeout_s * 1000),
        # Replies are latency-bound: hand back a fetch as soon as any byte
        # arrives rather than after the default 500 ms wait.
        fetch_max_wait_ms=100,
    )
    try:
        await asyncio.wait_for(consumer.start(), timeout_s)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await asyncio.wait_for(consumer.seek_to_end(*tps), timeout_s)
        # seek_to_end only schedules the reset; position() returns once the end
        # offset is known, and only then is "nothing produced later is missed"
        # true.
        for tp in tps:
            await asyncio.wait_for(consumer.position(tp), timeout_s)
    except BaseException:
        await _quiet_stop(consumer, None, timeout_s)
        raise
    return consumer


async def _quiet_stop(
    consumer: AIOKafkaConsumer | None,
    producer: AIOKafkaProducer | None,
    timeout_s: float,
) -> None:
    # Stop both even if one fails or hangs: a half-closed transport leaks
    # sockets, and a producer flushing to a dead broker would wait forever.
    for client in (consumer, producer):
        if client is None:
            continue
        try:
            await asyncio.wait_for(client.stop(), timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            logger.warning("error while closing kafka client: %r", exc)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a background task and wait until it has finished.

    ``asyncio.wait`` neither raises the task's ``CancelledError`` nor swallows
    a new cancellation of the caller, and it still waits when the caller is
    already being cancelled and is cleaning up in a ``finally`` block.
    """
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        logger.warning("background task %s had failed: %r", task, task.exception())


class GatewayClient:
    """Send inference requests for one API key through a shared transport.

    Parameters
    ----------
    transport
        A started (or soon started) ``KafkaTransport``.
    key_id, secret
        The API key id and its secret; the secret signs each request and never
        leaves this process.
    client_id
        Record key, so one client's requests stay ordered on one partition. The
        gateway takes the client's identity from the key, not from this.
    model
        Model name to query.
    """

    def __init__(
        self,
        transport: KafkaTransport,
        key_id: str,
        secret: bytes,
        client_id: str,
        model: str,
        *,
        input_name: str = "pixels",
    ) -> None:
        self.transport = transport
        self.key_id = key_id
        self._secret = secret
        self.client_id = client_id
        self.model = model
        self.input_name = input_name
        self._key = client_id.encode("utf-8")

    def __repr__(self) -> str:
        # The secret stays out of reprs, logs and tracebacks.
        return f"GatewayClient(client_id={self.client_id!r}, key_id={self.key_id!r})"

    async def infer(
        self,
        rows: np.ndarray[Any, Any],
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> InferResponse:
        """Send one request holding ``rows`` and wait for its reply.

        Parameters
        ----------
        rows
            Array of shape (n, features); sent as FP32.
        request_id
            Reuse an id to retry the same request; a new one is made otherwise.
        timeout_s
            How long to wait for delivery plus reply; defaults to
            ``kafka.request_timeout_s``.

        Returns
        -------
        InferResponse
            Whatever the gateway answered, errors included; use
            ``probabilities`` to get the array or raise the error.

        Raises
        ------
        GatewayRequestError
            ``TIMEOUT`` when no reply arrived in time (retriable with the same
            ``request_id``), ``TRANSPORT_CLOSED`` when the transport stopped.
        BrokerError
            The request could not be produced.
        """
        delivery, reply, rid = await self._enqueue(rows, request_id)
        return await self._await_reply(delivery, reply, rid, timeout_s)

    async def infer_many(
        self,
        rows: np.ndarray[Any, Any],
        concurrency: int = 32,
        *,
        timeout_s: float | None = None,
    ) -> list[InferResponse]:
        """Send one request per row, at most ``concurrency`` in flight.

        Returns the responses in row order. A timeout on any row raises
        ``GatewayRequestError`` (``TIMEOUT``) after every row has finished.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        matrix = np.atleast_2d(rows)
        gate = asyncio.Semaphore(concurrency)

        async def one(row: np.ndarray[Any, Any]) -> InferResponse:
            async with gate:
                return await self.infer(row[None, :], timeout_s=timeout_s)

        results = await asyncio.gather(
            *(one(row) for row in matrix), return_exceptions=True
        )
        responses: list[InferResponse] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            responses.append(result)
        return responses

    async def _enqueue(
        self, rows: np.ndarray[Any, Any], request_id: str | None
    ) -> tuple[asyncio.Future[Any], asyncio.Future[InferResponse], str]:
        matrix = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        request, value, headers = build_request(
            key_id=self.key_id,
            secret=self._secret,
            model=self.model,
            inputs={self.input_name: matrix},
            request_id=request_id,
            reply_to=self.transport.reply_topic,
        )
        delivery, reply = await self.transport.send(
            key=self._key, value=value, headers=headers, request_id=request.request_id
        )
        return delivery, reply, request.request_id

    async def _await_reply(
        self,
        delivery: asyncio.Future[Any],
        reply: asyncio.Future[InferResponse],
        request_id: str,
        timeout_s: float | None,
    ) -> InferResponse:
        wait_s = (
            self.transport.settings.kafka.request_timeout_s
            if timeout_s is None
            else timeout_s
        )
        try:
            async with asyncio.timeout(wait_s):
                try:
                    await delivery
                except KafkaError as exc:
                    raise BrokerError(f"request not delivered: {exc!r}") from exc
                return await reply
        except TimeoutError as exc:
            raise GatewayRequestError(
                f"no reply within {wait_s:.1f} s",
                code="TIMEOUT",
                retriable=True,
                request_id=request_id,
            ) from exc
        finally:
            self.transport.forget(request_id, self._key)
