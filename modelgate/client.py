"""The modelgate client: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak to the gateway over HTTP (the front door's Open Inference Protocol
v2 REST API) or straight over Kafka, send numpy arrays, return numpy arrays,
raise one typed exception per error code (``modelgate.errors``) and retry
retriable failures under the **same request id** (``modelgate.retry``), so a
retry of a request that was in fact served gets the first answer back
instead of being scored and counted twice.

Examples
--------
>>> from modelgate.client import Client
>>> with Client.http("http://127.0.0.1:8080", token) as c:  # doctest: +SKIP
...     proba = c.predict("digits", x)          # (n, 10) for x of shape (n, 64)
...     result = c.infer("digits", x)           # outputs, action, rate, id
>>> async with AsyncClient.kafka(token, "alice") as c:  # doctest: +SKIP
...     proba = await c.predict("digits", x[0])  # one row in, one row out

This module imports the transports (httpx; aiokafka through
``gateway.client``) and numpy; the Kafka transport is imported only when used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import CancelledError, Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, overload

import httpx
import numpy as np

from gateway import protocol
from modelgate.errors import ClientClosedError, GatewayError, NonFiniteError
from modelgate.http import HttpTransport
from modelgate.results import InferResult, as_inputs
from modelgate.retry import RetryPolicy, call_with_retries

if TYPE_CHECKING:
    from gateway.client import KafkaTransport
    from gateway.config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

Inputs = np.ndarray[Any, Any] | Mapping[str, np.ndarray[Any, Any]]
TransportName = Literal["http", "kafka"]
# Longer than the front door's default reply timeout (10 s), so that its
# GATEWAY_TIMEOUT answer arrives before the client gives up on the attempt.
DEFAULT_TIMEOUT_S = 15.0


class Transport(Protocol):
    """What a client needs of a transport: one attempt at a time."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        request_id: str,
        timeout_s: float,
    ) -> InferResult: ...


class AsyncClient:
    """An asyncio client for one API key. Build it with :meth:`http` or
    :meth:`kafka`; use it as ``async with`` (or call ``start``/``close``).

    Parameters
    ----------
    transport
        How requests travel (``HttpTransport``, ``KafkaClientTransport`` or
        anything with the same three methods).
    timeout_s
        Timeout of one attempt: from sending until the answer is read.
    retry
        Retry policy (attempts, backoff, overall deadline); the default
        retries up to 3 times within 60 s. ``RetryPolicy(max_attempts=1)``
        disables retries.
    input_name
        The input tensor's name when ``infer``/``predict`` get one array.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        input_name: str = "pixels",
    ) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self.transport = transport
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.input_name = input_name
        self._started = False
        self._closed = False
        self._lock = asyncio.Lock()

    @classmethod
    def connect(cls, transport: TransportName, **options: Any) -> AsyncClient:
        """``AsyncClient.http(**options)`` or ``AsyncClient.kafka(**options)``
        by name, for code that reads the transport from configuration."""
        if transport == "http":
            return cls.http(**options)
        if transport == "kafka":
            return cls.kafka(**options)
        raise ValueError(f"transport must be 'http' or 'kafka', not {transport!r}")

    @classmethod
    def http(
        cls,
        url: str,
        token: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = 5.0,
        max_connections: int = 16,
        retry: RetryPolicy | None = None,
        input_name: str = "pixels",
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> AsyncClient:
        """A client of the HTTP front door at ``url`` (``http://host:port``).

        ``http_transport`` replaces the network (``httpx.MockTransport`` in
        tests); connections are pooled (``max_connections``) and kept alive.
        """
        transport = HttpTransport(
            url,
            token,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
            transport=http_transport,
        )
        return cls(transport, timeout_s=timeout_s, retry=retry, input_name=input_name)

    @classmethod
    def kafka(
        cls,
        token: str,
        client_id: str,
        *,
        settings: Settings | None = None,
        transport: KafkaTransport | None = None,
        reply_topic: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        input_name: str = "pixels",
    ) -> AsyncClient:
        """A client sending signed requests straight to Kafka.

        Parameters
        ----------
        token
            The API key token.
        client_id
            The client the key was created for (records are keyed by it).
        settings
            Broker address and topic names; by default ``load_settings()``
            (``MODELGATE_*`` environment, ``modelgate.toml``).
        transport
            A started-by-its-owner ``KafkaTransport`` to share between
            clients of several keys; by default the client owns one.
        reply_topic
            Reply topic of an owned transport.
        """
        # Imported here so that HTTP-only users need neither aiokafka nor
        # the gateway's settings at import time.
        from gateway.config import load_settings
        from modelgate.kafka import KafkaClientTransport

        kafka = KafkaClientTransport(
            settings or load_settings(),
            token,
            client_id,
            transport=transport,
            reply_topic=reply_topic,
        )
        return cls(kafka, timeout_s=timeout_s, retry=retry, input_name=input_name)

    def __repr__(self) -> str:
        return f"AsyncClient({self.transport!r})"

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the transport. Idempotent; ``infer`` calls it when needed.

        Raises
        ------
        ConnectionFailedError
            The broker could not be reached (Kafka; HTTP connects lazily).
        ClientClosedError
            The client was closed.
        """
        async with self._lock:
            if self._closed:
                raise ClientClosedError("the client is closed")
            if not self._started:
                await self.transport.start()
                self._started = True

    async def close(self) -> None:
        """Close the transport's connections. Idempotent."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._started:
                await self.transport.close()

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> InferResult:
        """Run ``model`` on ``inputs``, retrying as the policy allows.

        Parameters
        ----------
        model
            Model name, e.g. ``"digits"``.
        inputs
            One array (sent as ``input_name``; a 1-D array is one row) or a
            mapping of input names to arrays. Floating arrays go as FP32.
        request_id
            The id to send under; a new one by default. Every retry reuses
            it; reuse it yourself only to repeat this same request.
        timeout_s
            Timeout of each attempt (default: the client's ``timeout_s``).
        retry
            Policy for this call instead of the client's.

        Returns
        -------
        InferResult
            Outputs as numpy arrays, the policy action, request id, rate
            information and the number of attempts.

        Raises
        ------
        modelgate.errors.GatewayError
            A subclass per error code (``RateLimitedError``,
            ``UnknownModelError``, ``RevokedKeyError``...), after any retries;
            its ``attempts`` says how many sends were made.
        """
        await self.start()
        named, _ = as_inputs(inputs, self.input_name)
        rid = request_id or protocol.new_request_id()
        _check_finite(named, rid)
        per_attempt_s = self.timeout_s if timeout_s is None else timeout_s
        attempts = 0

        async def once(attempt: int, remaining_s: float | None) -> InferResult:
            nonlocal attempts
            attempts = attempt
            wait_s = per_attempt_s
            if remaining_s is not None:
                wait_s = max(min(per_attempt_s, remaining_s), 0.001)
            return await self.transport.infer(model, named, rid, wait_s)

        result = await call_with_retries(once, retry or self.retry)
        return (
            result if attempts == 1 else dataclasses.replace(result, attempts=attempts)
        )

    async def predict(
        self,
        model: str,
        x: np.ndarray[Any, Any],
        *,
        output: str | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> np.ndarray[Any, Any]:
        """The model's output for ``x``: one row (1-D) gives one row back,
        a batch (n, features) gives n rows.

        ``output`` names the output to return; by default ``probabilities``
        when the model has it, else its first output. Raises what ``infer``
        raises, and ``KeyError`` for an output the model does not have.
        """
        single_row = np.ndim(x) == 1
        result = await self.infer(model, x, request_id=request_id, timeout_s=timeout_s)
        array = result.output(output)
        return array[0] if single_row and array.ndim >= 1 else array

    @overload
    async def infer_many(
        self,
        model: str,
        batch: Iterable[Inputs],
        *,
        concurrency: int = ...,
        timeout_s: float | None = ...,
        retry: RetryPolicy | None = ...,
        return_errors: Literal[False] = ...,
    ) -> list[InferResult]: ...

    @overload
    async def infer_many(
        self,
        model: str,
        batch: Iterable[Inputs],
        *,
        concurrency: int = ...,
        timeout_s: float | None = ...,
        retry: RetryPolicy | None = ...,
        return_errors: Literal[True],
    ) -> list[InferResult | GatewayError]: ...

    async def infer_many(
        self,
        model: str,
        batch: Iterable[Inputs],
        *,
        concurrency: int = 16,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        return_errors: bool = False,
    ) -> list[InferResult] | list[InferResult | GatewayError]:
        """``infer`` for each item of ``batch``, at most ``concurrency`` in
        flight; the results in ``batch``'s order.

        Each item is a request of its own (its own request id and retries),
        so the gateway scores and may refuse each one separately. Every
        item's inputs are checked before anything is sent.

        Parameters
        ----------
        concurrency
            Requests in flight at once. The HTTP transport pools 16
            connections by default; more in flight than that only queue.
        return_errors
            False: the first ``GatewayError`` (after its retries) cancels
            the requests not yet answered and is raised. True: each failed
            item's place holds its ``GatewayError`` and every item is tried.

        Raises
        ------
        ValueError
            An item's inputs cannot be sent (naming the item), or
            ``concurrency`` is below 1. Nothing was sent.
        modelgate.errors.GatewayError
            Unless ``return_errors``, as ``infer`` raises.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        items = list(batch)
        for index, inputs in enumerate(items):
            try:
                as_inputs(inputs, self.input_name)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"batch item {index}: {exc}") from exc
        gate = asyncio.Semaphore(concurrency)

        async def one(inputs: Inputs) -> InferResult:
            async with gate:
                return await self.infer(model, inputs, timeout_s=timeout_s, retry=retry)

        if return_errors:

            async def kept(inputs: Inputs) -> InferResult | GatewayError:
                try:
                    return await one(inputs)
                except GatewayError as exc:
                    return exc

            return list(await asyncio.gather(*(kept(i) for i in items)))
        tasks = [asyncio.ensure_future(one(inputs)) for inputs in items]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # gather leaves the others running when one fails: nobody would
            # read their answers, and a closed client must not find them.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


def _check_finite(named: Mapping[str, np.ndarray[Any, Any]], request_id: str) -> None:
    """Refuse NaN and infinities (and floats beyond FP32, infinite once
    converted) with the gateway's own code, NON_FINITE, before anything is
    sent: JSON cannot carry them, so over HTTP the encoder would fail with a
    bare ValueError and over Kafka they would arrive as null, refused as
    SCHEMA_INVALID. Either way the caller would not see what the gateway
    answers to such a value.

    Raises
    ------
    modelgate.errors.NonFiniteError
        The first input holding such a value.
    """
    for name, array in named.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise NonFiniteError(
                f"input {name!r}: NaN or infinity (JSON cannot carry it)",
                request_id=request_id,
            )


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _LoopThread:
    """An event loop running in a daemon thread, for the blocking client."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="modelgate-client", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._stopping = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it. An interrupt (Ctrl-C)
        while waiting cancels it there, then propagates; a ``stop`` from
        another thread meanwhile raises ``ClientClosedError``."""
        with self._lock:
            if self._stopping:
                coro.close()
                raise ClientClosedError("the client is closed")
            future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except CancelledError:
            if self._stopping:
                raise ClientClosedError(
                    "the client was closed while this call waited"
                ) from None
            raise
        except BaseException:
            future.cancel()
            raise

    def stop(self, timeout_s: float) -> None:
        with self._lock:
            self._stopping = True
        if not self._loop.is_running():
            return
        # Calls other threads still wait on are cancelled, and their clean-up
        # runs, before the loop stops: they would otherwise wait for good on a
        # loop that no longer runs. Their callers get ClientClosedError.
        ended = asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop)
        with contextlib.suppress(TimeoutError, CancelledError):
            ended.result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._loop.close()


class Client:
    """A blocking client for one API key; same API as :class:`AsyncClient`
    without ``await``. It runs an event loop in a background thread, which
    ``close`` (or leaving ``with``) stops. Safe to call from several threads.

    Examples
    --------
    >>> with Client.http("http://127.0.0.1:8080", token) as c:  # doctest: +SKIP
    ...     labels = c.infer("digits", x)["label"]
    """

    # Bound on stopping the background loop at close, in seconds.
    _STOP_TIMEOUT_S = 10.0

    def __init__(self, make: Coroutine[Any, Any, AsyncClient]) -> None:
        self._thread = _LoopThread()
        self._closed = False
        try:
            # Built on the loop it will run on: asyncio objects inside the
            # transports belong to that loop.
            self._async = self._thread.run(make)
        except BaseException:
            self._thread.stop(self._STOP_TIMEOUT_S)
            raise

    @classmethod
    def http(cls, url: str, token: str, **options: Any) -> Client:
        """A blocking client of the HTTP front door; ``options`` as
        :meth:`AsyncClient.http`."""

        async def make() -> AsyncClient:
            return AsyncClient.http(url, token, **options)

        return cls(make())

    @classmethod
    def kafka(cls, token: str, client_id: str, **options: Any) -> Client:
        """A blocking client over Kafka; ``options`` as :meth:`AsyncClient.kafka`
        except ``transport``: a shared ``KafkaTransport`` belongs to its own
        event loop, and this client runs on another."""
        if "transport" in options:
            raise ValueError("a blocking client cannot share a KafkaTransport")

        async def make() -> AsyncClient:
            return AsyncClient.kafka(token, client_id, **options)

        return cls(make())

    @classmethod
    def connect(cls, transport: TransportName, **options: Any) -> Client:
        """``Client.http(**options)`` or ``Client.kafka(**options)`` by name."""
        if transport == "http":
            return cls.http(**options)
        if transport == "kafka":
            return cls.kafka(**options)
        raise ValueError(f"transport must be 'http' or 'kafka', not {transport!r}")

    def __repr__(self) -> str:
        return f"Client({self._async.transport!r})"

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def async_client(self) -> AsyncClient:
        return self._async

    def start(self) -> None:
        """Open the transport (``infer`` does it when needed)."""
        self._check_open()
        self._thread.run(self._async.start())

    def close(self) -> None:
        """Close the transport and stop the background loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._thread.run(self._async.close())
        finally:
            self._thread.stop(self._STOP_TIMEOUT_S)

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> InferResult:
        """See :meth:`AsyncClient.infer`."""
        self._check_open()
        return self._thread.run(
            self._async.infer(
                model, inputs, request_id=request_id, timeout_s=timeout_s, retry=retry
            )
        )

    def predict(
        self,
        model: str,
        x: np.ndarray[Any, Any],
        *,
        output: str | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> np.ndarray[Any, Any]:
        """See :meth:`AsyncClient.predict`."""
        self._check_open()
        return self._thread.run(
            self._async.predict(
                model, x, output=output, request_id=request_id, timeout_s=timeout_s
            )
        )

    @overload
    def infer_many(
        self,
        model: str,
        batch: Iterable[Inputs],
        *,
        concurrency: int = ...,
        timeout_s: float | None = ...,
        retry: RetryPolicy | None = ...,
        return_errors: Literal[False] = ...,
    ) -> list[InferResult]: ...

    @overload
    def infer_many(
        self,
        model: str,
        batch: Iterable[Inputs],
        *,
        concurrency: int = ...,
        timeout_s: float | None = ...,
        retry: RetryPolicy | None = ...,
        return_errors: Literal[True],
    ) -> list[InferResult | GatewayError]: ...

    def infer_many(
        self,
        model: str,
        batch: Iterable[Inputs],
        *,
        concurrency: int = 16,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        return_errors: bool = False,
    ) -> list[InferResult] | list[InferResult | GatewayError]:
        """See :meth:`AsyncClient.infer_many`."""
        self._check_open()
        items = list(batch)
        if return_errors:
            return self._thread.run(
                self._async.infer_many(
                    model,
                    items,
                    concurrency=concurrency,
                    timeout_s=timeout_s,
                    retry=retry,
                    return_errors=True,
                )
            )
        return self._thread.run(
            self._async.infer_many(
                model, items, concurrency=concurrency, timeout_s=timeout_s, retry=retry
            )
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the client is closed")
