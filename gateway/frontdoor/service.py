"""The front door's one long-lived object: key checks, signing, Kafka round trip.

``FrontDoor`` loads the served models' signatures, checks each caller's API
key against the key store in Redis, signs the request with the caller's own
secret (taken from the token it presented) and sends it through Kafka like
any other client, reading the answer on a reply topic that belongs to this
process alone. It holds no detection or policy logic: the workers decide.

Imports the gateway's client, keys, models, protocol and topics modules and
redis; nothing from FastAPI, so it can be driven without HTTP.

Known shortcoming: checking a key means decrypting its secret, so the front
door needs the server key (``auth.server_key``), like a worker. It signs only
with the secret the caller presented, so a front door never acts for a
client who did not show their own token; but a compromised front door host
exposes every key's secret, as a compromised worker host does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka.errors import KafkaError

from gateway import protocol
from gateway.client import KafkaTransport, cancel_and_wait
from gateway.config import Settings
from gateway.errors import (
    AuthError,
    BrokerError,
    ConfigError,
    ModelgateError,
    ValidationError,
)
from gateway.frontdoor import metrics as fd_metrics
from gateway.frontdoor.errors import ErrorLogThrottle
from gateway.keys import ApiKey, KeyStore, authenticate, load_server_key
from gateway.models import ModelSignature
from gateway.store import RedisClient, redis_from_settings
from gateway.topics import delete_topics, ensure_topics

logger = logging.getLogger(__name__)

# How long to wait between attempts to reach Kafka while starting.
_START_RETRY_S = 2.0
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# Bound on deleting the reply topic at stop, so that a broker gone away
# cannot hold up the process's exit.
_DELETE_TIMEOUT_S = 10.0


class GatewayTimeout(ModelgateError):
    """No reply from the workers within ``frontdoor.reply_timeout_s``."""

    default_code = "GATEWAY_TIMEOUT"
    default_retriable = True


def reply_topic_for(settings: Settings) -> str:
    """This process's reply topic, under the prefix the workers answer to."""
    instance = _TOPIC_UNSAFE.sub("-", settings.frontdoor.instance_id)
    return f"{settings.worker.reply_topic_prefix}.fd-{instance}"


class ModelNotBuilt(ConfigError):
    """A served model's signature file does not exist (yet): a worker builds
    the demo models at its first start, so a front door started beside it
    waits for the file instead of failing."""


def load_signatures(directory: Path, names: list[str]) -> dict[str, ModelSignature]:
    """The signature of every served model, read from ``directory``.

    Raises
    ------
    ModelNotBuilt
        A signature file is missing.
    ConfigError
        A signature file cannot be read or does not parse.
    """
    found: dict[str, ModelSignature] = {}
    for name in names:
        path = directory / f"{name}.signature.json"
        try:
            signature = ModelSignature.from_json(path.read_text())
        except FileNotFoundError as exc:
            raise ModelNotBuilt(
                f"model {name}: no signature at {path} yet; a worker started "
                "with the same settings and working directory builds it"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"model {name}: cannot read {path}: {exc}") from exc
        if signature.name != name:
            raise ConfigError(f"model {name}: its signature names {signature.name!r}")
        found[name] = signature
    return found


# What the early key check signs with the presented secret: the worker's own
# check (``authenticate``) wants signed bytes, and the request's are not built
# before the body is read.
_KEY_PROBE = b"modelgate front door key check"


@dataclass(frozen=True)
class CheckedKey:
    """A presented token whose key was found live for a model: its id, the
    presented secret (which signs the request) and the key's record."""

    key_id: str
    secret: bytes
    key: ApiKey


class FrontDoor:
    """Key checks and the Kafka round trip for HTTP requests.

    Parameters
    ----------
    settings
        Kafka, Redis, auth, models and ``frontdoor`` sections.
    server_key
        The Fernet key that decrypts key secrets; loaded from settings if
        omitted.
    metrics
        Where the Kafka round trips are timed; ``None`` keeps none.

    Examples
    --------
    >>> async with FrontDoor(settings) as door:  # doctest: +SKIP
    ...     response = await door.infer(token, "digits", {"pixels": rows}, None)
    """

    def __init__(
        self,
        settings: Settings,
        *,
        server_key: bytes | None = None,
        metrics: fd_metrics.FrontDoorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.reply_topic = reply_topic_for(settings)
        # None until start has read them: no model is known served or not.
        self.signatures: dict[str, ModelSignature] | None = None
        # One per front door, so that one outage is summarised, not logged per request.
        self.error_log = ErrorLogThrottle()
        self._server_key = server_key
        self._transport = KafkaTransport(settings, reply_topic=self.reply_topic)
        self._redis: RedisClient | None = None
        self._keys: KeyStore | None = None
        self._starter: asyncio.Task[None] | None = None
        # Monotonic time from which workers know the reply topic; see
        # ``frontdoor.reply_topic_settle_s``.
        self._settled_at = math.inf
        # A generated instance id (host and pid) names a topic no later
        # process will reuse, so this process removes it at a clean stop; a
        # configured one is kept for the next process in the same slot.
        self.owns_reply_topic = "instance_id" not in settings.frontdoor.model_fields_set
        self._created_topic = False

    @property
    def ready(self) -> bool:
        """True once the producer and this process's reply consumer are up and
        the workers are sure to answer on this process's reply topic."""
        return (
            self._keys is not None
            and self._transport.started
            and time.monotonic() >= self._settled_at
        )

    @property
    def redis(self) -> RedisClient | None:
        """The Redis client, once started (for its breaker's metrics)."""
        return self._redis

    @property
    def pending_count(self) -> int:
        """Requests sent through Kafka whose answer is still awaited."""
        return self._transport.pending_count

    async def start(self) -> None:
        """Load signatures, create the reply topic, connect Redis and Kafka.

        Idempotent. Raises ``ConfigError`` for a bad model directory or server
        key, ``BrokerError`` if Kafka cannot be reached in time.
        """
        if self.ready:
            return
        loop = asyncio.get_running_loop()
        models = self.settings.models
        # File reads off the loop.
        self.signatures = await loop.run_in_executor(
            None, load_signatures, models.directory, list(models.serve)
        )
        server_key = self._server_key or await loop.run_in_executor(
            None, load_server_key, self.settings
        )
        await ensure_topics(self.settings, extra={self.reply_topic: 1})
        self._created_topic = True
        self._settled_at = (
            time.monotonic() + self.settings.frontdoor.reply_topic_settle_s
        )
        await self._transport.start()
        if self._redis is None:
            self._redis = redis_from_settings(self.settings)
        self._keys = KeyStore(self._redis, self.settings, server_key=server_key)
        logger.info("front door started", extra={"topic": self.reply_topic})

    def start_in_background(self) -> None:
        """Keep trying ``start`` until it succeeds, so that the process serves
        liveness (and a not-ready readiness) while Kafka is still coming up
        or a worker is still building the models. Any other configuration
        error ends the attempts and is logged."""
        if self._starter is None or self._starter.done():
            self._starter = asyncio.create_task(self._start_until_up())

    async def _start_until_up(self) -> None:
        while True:
            try:
                await self.start()
                return
            except (BrokerError, ModelNotBuilt) as exc:
                logger.warning("front door not ready yet: %s", exc.message)
                await asyncio.sleep(_START_RETRY_S)
            except ModelgateError as exc:
                logger.error("front door cannot start: %s", exc.message)
                return

    async def stop(self) -> None:
        """Stop the start attempts, the transport and Redis. Idempotent.

        The reply topic is deleted when this process's instance id was
        generated (``owns_reply_topic``) and no request was still waiting
        for its answer; otherwise it is kept, because a worker may still be
        answering into it. A configured instance id keeps its topic for the
        next process in the same slot.

        Known shortcoming: a worker that answers a request which already got
        504 after the topic is gone waits one producer timeout
        (``kafka.request_timeout_s``) on that answer before sending it to the
        shared responses topic instead (``gateway/produce.py``); the answer
        is not lost, but that worker's batch is slowed once.
        """
        starter, self._starter = self._starter, None
        if starter is not None:
            await cancel_and_wait(starter)
        self._keys = None
        waiting = self._transport.pending_count
        await self._transport.stop()
        if self.owns_reply_topic and self._created_topic:
            if waiting:
                logger.info(
                    "reply topic kept: requests still waited for answers",
                    extra={"topic": self.reply_topic, "waiting": waiting},
                )
            else:
                await self._delete_reply_topic()
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()
        logger.info("front door stopped", extra={"topic": self.reply_topic})

    async def _delete_reply_topic(self) -> None:
        try:
            async with asyncio.timeout(_DELETE_TIMEOUT_S):
                await delete_topics(self.settings, [self.reply_topic])
        except (ModelgateError, KafkaError, OSError, TimeoutError) as exc:
            # Left behind, as before this existed; nothing else depends on it.
            logger.warning(
                "could not delete reply topic: %r",
                exc,
                extra={"topic": self.reply_topic},
            )
            return
        self._created_topic = False
        logger.info("reply topic deleted", extra={"topic": self.reply_topic})

    async def __aenter__(self) -> FrontDoor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def signature(self, model: str, version: str | None = None) -> ModelSignature:
        """The served model's signature.

        Raises
        ------
        ValidationError
            ``UNKNOWN_MODEL`` when the model (or that version) is not served.
        BrokerError
            ``NOT_READY`` before the signatures are read: no model can be
            told served or not yet.
        """
        if self.signatures is None:
            raise BrokerError("front door is not ready", code="NOT_READY")
        signature = self.signatures.get(model)
        if signature is None or (version is not None and version != signature.version):
            shown = model if version is None else f"{model} version {version}"
            raise ValidationError(
                f"model {shown[:140]!r} is not served", code="UNKNOWN_MODEL"
            )
        return signature

    async def check_key(self, token: str | None, model: str) -> CheckedKey:
        """The worker's key check for ``model``, before any body is read.

        The route runs it first, so that a caller without a live key learns
        nothing about the request schema or the model's inputs from the
        answer (only the body size limit comes earlier).

        Raises
        ------
        AuthError
            The key is missing, malformed, unknown, revoked, expired or not
            scoped to ``model``.
        BrokerError
            ``NOT_READY`` before the front door is started.
        StoreError
            Redis could not be reached.
        """
        keys = self._keys
        if keys is None or not self.ready:
            raise BrokerError("front door is not ready", code="NOT_READY")
        if not token:
            raise AuthError("no API key presented", code="AUTH_MISSING")
        # A key id with a malformed secret is answered as the worker would:
        # unknown for an id no key has, else a bad secret.
        key_id, secret = await keys.check_token(token)
        record = (await keys.get_many([key_id])).get(key_id)
        now_ms = protocol.now_ms()
        key = authenticate(
            record,
            _KEY_PROBE,
            protocol.sign(secret, _KEY_PROBE),
            now_ms,
            model,
            now_ms,
            int(self.settings.auth.max_clock_skew_s * 1000),
        )
        return CheckedKey(key_id, secret, key)

    async def infer(
        self,
        token: str | None,
        model: str,
        inputs: dict[str, np.ndarray[Any, Any]],
        request_id: str | None,
        *,
        checked: CheckedKey | None = None,
    ) -> protocol.InferResponse:
        """Check the key, send the request through Kafka, wait for the answer.

        ``checked`` is :meth:`check_key`'s answer when the caller already
        asked it (the key is then not looked up again; the signed bytes are
        still checked as the worker will).

        Returns
        -------
        protocol.InferResponse
            The workers' answer, errors included.

        Raises
        ------
        AuthError
            The key is missing, malformed, unknown, revoked, expired or not
            scoped to ``model`` (nothing was sent).
        ValidationError
            ``PAYLOAD_TOO_LARGE``: the request would exceed the workers'
            message limit (nothing was sent).
        GatewayTimeout
            No reply within ``frontdoor.reply_timeout_s``.
        BrokerError, StoreError
            Kafka or Redis could not be reached.
        """
        if checked is None:
            checked = await self.check_key(token, model)

        # Step: build and sign exactly what the workers will check.
        request, value, headers = protocol.build_request(
            key_id=checked.key_id,
            secret=checked.secret,
            model=model,
            inputs=inputs,
            request_id=request_id,
            reply_to=self.reply_topic,
        )
        if len(value) > self.settings.kafka.max_message_bytes:
            raise ValidationError(
                f"request is {len(value)} bytes once encoded; the limit is "
                f"{self.settings.kafka.max_message_bytes}",
                code="PAYLOAD_TOO_LARGE",
            )

        # Step: the key check the worker makes, on the exact bytes, so that
        # the two always agree (the key's expiry may have passed meanwhile).
        signature = headers[0][1].decode("ascii")
        auth = self.settings.auth
        key = authenticate(
            checked.key,
            value,
            signature,
            request.ts_ms,
            model,
            protocol.now_ms(),
            int(auth.max_clock_skew_s * 1000),
        )

        # Step: the round trip; the record is keyed by the key's client.
        delivery, reply = await self._transport.send(
            key=key.client_id.encode("utf-8"),
            value=value,
            headers=headers,
            request_id=request.request_id,
        )
        timeout_s = self.settings.frontdoor.reply_timeout_s
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                await delivery
                answer = await reply
            self._observe_round_trip(fd_metrics.ANSWERED, sent)
            return answer
        except KafkaError as exc:
            self._observe_round_trip(fd_metrics.BROKER_ERROR, sent)
            raise BrokerError(f"request not delivered: {exc!r}") from exc
        except TimeoutError as exc:
            self._observe_round_trip(fd_metrics.TIMEOUT, sent)
            logger.info(
                "no reply in time",
                extra={"client": key.client_id, "request": request.request_id},
            )
            raise GatewayTimeout(
                f"no reply from the workers within {timeout_s:g} s; retry with "
                "the same request id"
            ) from exc
        finally:
            self._transport.forget(request.request_id, key.client_id.encode("utf-8"))

    def _observe_round_trip(self, outcome: str, sent: float) -> None:
        if self.metrics is not None:
            self.metrics.round_trip.labels(outcome).observe(time.perf_counter() - sent)
