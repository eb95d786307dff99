"""Remote backend: an Open Inference Protocol v2 server over HTTP.

One pooled, synchronous ``httpx.Client`` per model (the scorer calls the model
from an executor thread, so a blocking client is the simple fit), with:

- connect and read timeouts from ``BackendConfig``, and a deadline for the
  whole batch (``call_timeout_s``) checked as each piece of an answer
  arrives; a timeout answers BACKEND_TIMEOUT;
- batches split into calls of at most ``max_batch_rows`` rows;
- answers read as they stream in and refused past a size cap, so a
  misbehaving server can neither hold a batch nor fill the worker's memory;
- retries only where the request cannot have been processed (see ``_send``);
- a circuit breaker (``gateway.backends.breaker``): after N consecutive
  failures the backend is not called for a cool-down and every call answers
  BACKEND_UNAVAILABLE at once.

At start the server's model metadata (``GET /v2/models/{name}``) gives the
input names, shapes and datatypes; our ``<name>.signature.json`` adds the value
ranges (OIP metadata has none) and the classes. A disagreement between the two
is a ``ConfigError``, so the worker stops before serving a model it would
validate wrongly.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import numpy as np

from gateway.backends.breaker import STATE_LEVEL, BreakerState, CircuitBreaker
from gateway.config import BackendConfig
from gateway.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
)
from gateway.models import ModelSignature, TensorSpec

if TYPE_CHECKING:
    from gateway.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = "predict_proba"
# Responses larger than this are refused: a misbehaving server must not make
# the worker buffer without bound. 64 MiB is far above any batch we send.
_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class OipBackend:
    """A model served by a remote OIP v2 server.

    Build with ``connect``, which reads the remote metadata; the constructor
    takes an already merged signature (tests use it with a fake transport).
    """

    kind = "oip"

    def __init__(
        self,
        name: str,
        config: BackendConfig,
        signature: ModelSignature,
        reference: np.ndarray,
        *,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if config.url is None:
            raise ConfigError(f"model {name}: an oip backend needs a url")
        if len(signature.inputs) != 1:
            raise ConfigError(f"model {name}: exactly one input tensor is supported")
        self.signature = signature
        self.reference = reference
        self._name = name
        self._config = config
        self._clock = clock
        self._output = config.output or DEFAULT_OUTPUT
        remote = quote(config.remote_name or name, safe="")
        self._model_path = f"/v2/models/{remote}"
        if config.remote_version is not None:
            self._model_path += f"/versions/{quote(config.remote_version, safe='')}"
        gauge = None if metrics is None else metrics.backend_breaker_state.labels(name)

        def on_change(state: BreakerState) -> None:
            if gauge is not None:
                gauge.set(STATE_LEVEL[state])

        if gauge is not None:
            gauge.set(STATE_LEVEL["closed"])
        self.breaker = CircuitBreaker(
            name,
            config.breaker_failures,
            config.breaker_cooldown_s,
            clock=clock,
            on_change=on_change,
        )
        self._client = httpx.Client(
            base_url=config.url,
            timeout=httpx.Timeout(
                connect=config.connect_timeout_s,
                read=config.read_timeout_s,
                write=config.read_timeout_s,
                pool=config.connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
            ),
            # Never route through a proxy named by the environment: the
            # configured URL is the only place model inputs may go.
            trust_env=False,
            follow_redirects=False,
            transport=transport,
        )

    @classmethod
    def connect(
        cls,
        directory: Path,
        name: str,
        config: BackendConfig,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> OipBackend:
        """Read our signature and reference sample, then the server's metadata,
        and merge them.

        Raises
        ------
        ConfigError
            Our declaration and the server's disagree.
        BackendError
            The server could not be reached or answered the metadata badly;
            the worker does not start on a backend it cannot describe.
        """
        from gateway.backends import read_reference, read_signature

        local = read_signature(directory, name)
        backend = cls(
            name, config, local, read_reference(directory, name), metrics=metrics
        )
        try:
            backend.signature = merge_signature(
                local, backend.metadata(), output=backend._output
            )
        except BaseException:
            backend.close()
            raise
        logger.info(
            "remote model backend connected",
            extra={
                "model": name,
                "url": config.url,
            },
        )
        return backend

    @property
    def name(self) -> str:
        return self._name

    def metadata(self) -> dict[str, Any]:
        """The server's model metadata (``GET /v2/models/{name}``).

        Raises ``ConfigError`` when the server does not know the model: the
        name (or version) in our configuration is wrong.
        """
        deadline = self._clock() + self._config.call_timeout_s
        response = self._send(
            "GET", self._model_path, None, deadline, accept=(200, 404)
        )
        if response.status == 404:
            raise ConfigError(
                f"model {self._name}: the remote backend at {self._config.url} "
                f"does not serve {self._model_path.removeprefix('/v2/models/')!r}"
            )
        return self._json(response)

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """Probabilities for ``rows``, in calls of at most ``max_batch_rows``.

        The calls go one after another under one deadline. If any fails, the
        whole batch fails: the worker answers every request of a batch with
        the backend's error, so the rows already answered are wasted.
        """
        n = len(rows)
        if n == 0:
            return np.zeros((0, len(self.signature.classes)), np.float32)
        deadline = self._clock() + self._config.call_timeout_s
        step = self._config.max_batch_rows
        parts = [
            self._predict_chunk(rows[start : start + step], deadline)
            for start in range(0, n, step)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _predict_chunk(self, rows: np.ndarray, deadline: float) -> np.ndarray:
        spec = self.signature.inputs[0]
        n = len(rows)
        body = {
            # A fresh id per call: the gateway's request ids are per client
            # request, and one call carries the rows of many requests.
            "id": uuid.uuid4().hex,
            "inputs": [
                {
                    "name": spec.name,
                    "shape": [n, *spec.shape[1:]],
                    "datatype": spec.datatype,
                    "data": rows.reshape(-1).tolist(),
                }
            ],
            "outputs": [{"name": self._output}],
        }
        answer = self._json(
            self._send("POST", f"{self._model_path}/infer", body, deadline)
        )
        return self._probabilities(answer, n)

    def close(self) -> None:
        self._client.close()

    # -- internals -----------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        deadline: float,
        *,
        accept: tuple[int, ...] = (200,),
    ) -> _Answer:
        """One logical call through the breaker, with the retries that are safe.

        Retried (up to ``retries`` times, with exponential back-off):

        - connect errors and connect timeouts: no connection, so the server
          never saw the request;
        - 503 Service Unavailable: the server refused before doing the work
          (MLServer and most OIP servers answer 503 while a model loads).

        Not retried:

        - read (and write) timeouts. Inference has no side effects, so a
          second call would be harmless to the model, but the first one may
          still be running: a retry doubles the load on a server that is
          already too slow and stretches the batch (every request in it
          waits) to a multiple of the timeout. BACKEND_TIMEOUT is answered as
          retriable, so the client decides whether to try again;
        - other transport errors after the request was sent (reset, protocol
          error): the server may have processed it;
        - any other status code. A status outside ``accept`` below 500 is a
          BACKEND_ERROR but not a breaker failure: the server is alive.

        No retry, back-off or read goes past ``deadline`` (on ``clock``):
        past it the call is a BACKEND_TIMEOUT, counted by the breaker.
        """
        self.breaker.acquire()
        config = self._config
        content = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if content else None
        attempt = 0
        try:
            while True:
                try:
                    response = self._exchange(method, path, content, headers, deadline)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    if attempt < config.retries and self._back_off(
                        attempt, exc, deadline
                    ):
                        attempt += 1
                        continue
                    raise BackendUnavailableError(
                        f"model backend for {self._name} cannot be reached "
                        f"after {attempt + 1} attempts: {type(exc).__name__}"
                    ) from exc
                except httpx.TimeoutException as exc:
                    raise BackendTimeoutError(
                        f"model backend for {self._name} did not answer in time "
                        f"(read_timeout_s {config.read_timeout_s}, call_timeout_s "
                        f"{config.call_timeout_s}): {type(exc).__name__}"
                    ) from exc
                except httpx.TransportError as exc:
                    raise BackendError(
                        f"model backend for {self._name} failed mid-call: "
                        f"{type(exc).__name__}"
                    ) from exc
                if (
                    response.status == 503
                    and attempt < config.retries
                    and self._back_off(attempt, None, deadline)
                ):
                    attempt += 1
                    continue
                if response.status >= 500:
                    error = (
                        BackendUnavailableError
                        if response.status == 503
                        else BackendError
                    )
                    raise error(
                        f"model backend for {self._name} answered HTTP "
                        f"{response.status}: {response.excerpt()}"
                    )
                break
        except BackendError:
            self.breaker.record_failure()
            raise
        except BaseException:
            # Anything unforeseen still settles the breaker, so a half-open
            # probe can never stay "in flight" for good.
            self.breaker.record_failure()
            raise
        # The server answered: it is alive, whatever it thought of the request.
        self.breaker.record_success()
        if response.status not in accept:
            raise BackendError(
                f"model backend for {self._name} answered HTTP "
                f"{response.status}: {response.excerpt()}"
            )
        return response

    def _exchange(
        self,
        method: str,
        path: str,
        content: bytes | None,
        headers: dict[str, str] | None,
        deadline: float,
    ) -> _Answer:
        """One HTTP exchange, its answer read as it streams in.

        httpx's timeouts bound each socket operation, not an exchange, so the
        deadline is checked after every piece of the body (and each read is
        given no more than the time left): a server trickling a byte at a
        time is cut off at most one read after the deadline. The size cap is
        checked on the decoded bytes as they come, so neither a large
        ``content-length`` nor a compressed bomb is ever buffered whole.
        """
        config = self._config
        left = deadline - self._clock()
        if left <= 0:
            raise BackendTimeoutError(self._late_message())
        timeout = httpx.Timeout(
            connect=min(config.connect_timeout_s, left),
            read=min(config.read_timeout_s, left),
            write=min(config.read_timeout_s, left),
            pool=min(config.connect_timeout_s, left),
        )
        with self._client.stream(
            method, path, content=content, headers=headers, timeout=timeout
        ) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > _MAX_RESPONSE_BYTES:
                raise BackendError(
                    f"model backend for {self._name}: response too large "
                    f"({declared} bytes declared)"
                )
            pieces: list[bytes] = []
            size = 0
            for piece in response.iter_bytes():
                size += len(piece)
                if size > _MAX_RESPONSE_BYTES:
                    raise BackendError(
                        f"model backend for {self._name}: response too large"
                    )
                pieces.append(piece)
                if self._clock() > deadline:
                    raise BackendTimeoutError(self._late_message())
            return _Answer(response.status_code, b"".join(pieces))

    def _late_message(self) -> str:
        return (
            f"model backend for {self._name} did not finish within call_timeout_s "
            f"{self._config.call_timeout_s} s"
        )

    def _back_off(self, attempt: int, exc: Exception | None, deadline: float) -> bool:
        """Sleep before retry ``attempt + 1``; False (no sleep) when the
        back-off would end past ``deadline``, so the last error stands."""
        delay_s = self._config.retry_backoff_s * (2**attempt)
        if self._clock() + delay_s >= deadline:
            return False
        logger.info(
            "retrying model backend call",
            extra={
                "model": self._name,
                "attempt": attempt + 1,
                "reason": type(exc).__name__ if exc else "HTTP 503",
                "delay_s": delay_s,
            },
        )
        time.sleep(delay_s)
        return True

    def _json(self, response: _Answer) -> dict[str, Any]:
        try:
            answer = json.loads(response.body)
        except ValueError as exc:
            raise BackendError(
                f"model backend for {self._name} answered invalid JSON"
            ) from exc
        if not isinstance(answer, dict):
            raise BackendError(f"model backend for {self._name}: answer not an object")
        return answer

    def _probabilities(self, answer: dict[str, Any], n: int) -> np.ndarray:
        classes = len(self.signature.classes)
        for output in answer.get("outputs") or ():
            if isinstance(output, dict) and output.get("name") == self._output:
                break
        else:
            raise BackendError(
                f"model backend for {self._name}: no output {self._output!r}"
            )
        try:
            proba = np.asarray(output["data"], dtype=np.float32)
            proba = proba.reshape(n, classes)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(
                f"model backend for {self._name}: output {self._output!r} is not "
                f"{n} rows of {classes} probabilities"
            ) from exc
        return proba


@dataclass(frozen=True)
class _Answer:
    """A server's answer, read whole (within the size cap and the deadline)."""

    status: int
    body: bytes

    def excerpt(self) -> str:
        return self.body[:200].decode("utf-8", "replace").replace("\n", " ")


def merge_signature(
    local: ModelSignature, metadata: dict[str, Any], *, output: str
) -> ModelSignature:
    """Our signature with the remote's input declarations, checked against it.

    The remote server is the authority on names, shapes and datatypes; we add
    the value ranges and classes. Both must declare the same inputs with the
    same datatypes and shapes (-1, a variable dimension, matches only -1).
    Metadata that lists no inputs (OIP makes them optional in practice:
    MLServer lists only what model-settings.json declares) leaves our
    declaration as it is.

    Raises
    ------
    ConfigError
        A name, shape or datatype disagrees, or the output we read is missing
        or has the wrong number of classes.
    """
    name = local.name
    remote_inputs = metadata.get("inputs") or []
    if remote_inputs:
        try:
            remote = [_remote_spec(raw) for raw in remote_inputs]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"model {name}: unreadable input in remote metadata: {exc!r}"
            ) from exc
        ours = {s.name: s for s in local.inputs}
        theirs = {s.name: s for s in remote}
        if set(ours) != set(theirs):
            raise ConfigError(
                f"model {name}: local signature declares inputs {sorted(ours)}, "
                f"the remote backend declares {sorted(theirs)}"
            )
        merged = []
        for spec in remote:
            mine = ours[spec.name]
            if spec.datatype != mine.datatype:
                raise ConfigError(
                    f"model {name}: input {spec.name!r} is {mine.datatype} locally "
                    f"but {spec.datatype} on the remote backend"
                )
            if spec.shape != mine.shape:
                raise ConfigError(
                    f"model {name}: input {spec.name!r} has shape "
                    f"{list(mine.shape)} locally but {list(spec.shape)} on the "
                    "remote backend"
                )
            merged.append(replace(spec, min=mine.min, max=mine.max))
        local = replace(local, inputs=tuple(merged))

    remote_outputs = metadata.get("outputs") or []
    if remote_outputs:
        found = [
            o for o in remote_outputs if isinstance(o, dict) and o.get("name") == output
        ]
        if not found:
            names = [o.get("name") for o in remote_outputs if isinstance(o, dict)]
            raise ConfigError(
                f"model {name}: the remote backend declares no output {output!r} "
                f"(it declares {names})"
            )
        shape = found[0].get("shape") or []
        if shape and int(shape[-1]) not in (-1, len(local.classes)):
            raise ConfigError(
                f"model {name}: remote output {output!r} has {shape[-1]} classes, "
                f"the local signature {len(local.classes)}"
            )
    return local


def _remote_spec(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=str(raw["name"]),
        datatype=str(raw["datatype"]),
        shape=tuple(int(d) for d in raw["shape"]),
    )
