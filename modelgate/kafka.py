"""The Kafka transport: signed requests straight onto the gateway's topics.

A thin layer over ``gateway.client.KafkaTransport`` (one producer, one reply
consumer): it signs each attempt with the API key, keys the record with the
key's client id (the worker refuses records keyed otherwise), waits for the
reply with the attempt's timeout and turns it into an ``InferResult`` or a
typed error. A retry is a new record with the same request id, a fresh
timestamp and a fresh signature.

Known shortcoming: the client id cannot be derived from the token (it lives
in the gateway's key store), so the caller must pass the one the key was
created for.

This module imports aiokafka (through ``gateway.client``), numpy and the
gateway's wire formats; never Redis or the worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from aiokafka.errors import KafkaError

from gateway import protocol
from gateway.client import GatewayRequestError, KafkaTransport
from gateway.config import Settings
from gateway.errors import BrokerError, ModelgateError
from gateway.keys import KeyStore
from modelgate.errors import (
    BadResponseError,
    ClientClosedError,
    ConnectionFailedError,
    RequestTimeoutError,
    error_for,
)
from modelgate.results import InferResult, RateInfo
from modelgate.tokens import split_token

logger = logging.getLogger(__name__)

# The mg-sig of a request whose token has a malformed secret.
_UNSIGNED = b"malformed-secret"


class KafkaClientTransport:
    """Requests for one API key over a (possibly shared) ``KafkaTransport``.

    Parameters
    ----------
    settings
        Bootstrap servers and topic names.
    token
        The API key token; its secret signs every request and never leaves
        this process.
    client_id
        The client the key belongs to: every record is keyed by it.
    transport
        A ``KafkaTransport`` to share (it is then neither started nor stopped
        here); by default this object owns one.
    reply_topic
        Reply topic of an owned transport (under
        ``worker.reply_topic_prefix``); defaults to the responses topic.

    Raises
    ------
    modelgate.errors.AuthMissingError
        The token is empty.
    modelgate.errors.UnknownKeyError
        The token does not start with a key id. A missing or malformed
        secret after a key id is the worker's to answer, at the first request
        (``AUTH_UNKNOWN_KEY`` if no key has that id, else
        ``AUTH_BAD_SIGNATURE``, as the front door answers it).
    """

    def __init__(
        self,
        settings: Settings,
        token: str,
        client_id: str,
        *,
        transport: KafkaTransport | None = None,
        reply_topic: str | None = None,
    ) -> None:
        self._key_id, _ = split_token(token)
        self._secret: bytes | None
        try:
            _, self._secret = KeyStore.parse_token(token)
        except ModelgateError:
            # A key id with a secret that cannot sign. Whether that id exists
            # decides the code, and only the gateway knows: the worker
            # answers each request (see infer), as the front door does.
            logger.warning(
                "the API key token's secret is malformed; the gateway will "
                "refuse every request",
                extra={"client": client_id},
            )
            self._secret = None
        self._client_id = client_id
        self._key = client_id.encode("utf-8")
        self._owned = transport is None
        self._transport = transport or KafkaTransport(settings, reply_topic=reply_topic)

    def __repr__(self) -> str:
        return (
            f"KafkaClientTransport(client_id={self._client_id!r}, "
            f"key_id={self._key_id!r})"
        )

    @property
    def pending_count(self) -> int:
        """Requests of the underlying transport still waiting for a reply."""
        return self._transport.pending_count

    async def start(self) -> None:
        """Start an owned transport (positions the reply consumer before any
        request can be sent).

        Raises
        ------
        ConnectionFailedError
            The broker or the reply topic could not be reached.
        """
        if not self._owned:
            return
        try:
            await self._transport.start()
        except BrokerError as exc:
            raise ConnectionFailedError(str(exc)) from exc

    async def close(self) -> None:
        if self._owned:
            await self._transport.stop()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        request_id: str,
        timeout_s: float,
    ) -> InferResult:
        """One attempt: sign, produce, wait at most ``timeout_s`` for the reply.

        Raises
        ------
        GatewayError
            The class of the reply's code; ``RequestTimeoutError`` when no
            reply came, ``ConnectionFailedError`` when the record could not be
            produced, ``ClientClosedError`` after ``close``.
        """
        _, value, headers = protocol.build_request(
            key_id=self._key_id,
            secret=self._secret or b"",
            model=model,
            inputs=dict(inputs),
            request_id=request_id,
            reply_to=self._transport.reply_topic,
        )
        if self._secret is None:
            # Not hex, so it can never verify: the worker refuses it by key id
            # alone, AUTH_UNKNOWN_KEY or AUTH_BAD_SIGNATURE.
            headers = [(protocol.SIGNATURE_HEADER, _UNSIGNED)]
        try:
            async with asyncio.timeout(timeout_s):
                delivery, reply = await self._transport.send(
                    key=self._key, value=value, headers=headers, request_id=request_id
                )
                try:
                    await delivery
                except KafkaError as exc:
                    raise ConnectionFailedError(
                        f"request not delivered: {exc!r}", request_id=request_id
                    ) from exc
                response = await reply
        except TimeoutError as exc:
            raise RequestTimeoutError(
                f"no reply within {timeout_s:.1f} s", request_id=request_id
            ) from exc
        except BrokerError as exc:
            raise ConnectionFailedError(str(exc), request_id=request_id) from exc
        except GatewayRequestError as exc:
            if exc.code == "TRANSPORT_CLOSED":
                raise ClientClosedError(exc.message, request_id=request_id) from exc
            raise error_for(
                exc.code, exc.message, retriable=exc.retriable, request_id=request_id
            ) from exc
        finally:
            # A late reply to this attempt is dropped; a retry registers anew.
            self._transport.forget(request_id)
        return result_of(response, model)


def result_of(response: protocol.InferResponse, model: str) -> InferResult:
    """The result of an ``ok`` reply; raise the typed error of any other."""
    if response.status != "ok":
        body = response.error
        retry_after_s = (
            None if response.retry_after_ms is None else response.retry_after_ms / 1000
        )
        raise error_for(
            body.code if body is not None else "UNKNOWN",
            body.message if body is not None else "error reply without a body",
            retriable=body.retriable if body is not None else None,
            request_id=response.request_id,
            retry_after_s=retry_after_s,
            rate=_rate(response),
        )
    outputs: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in response.outputs or ():
        try:
            outputs[tensor.name] = np.asarray(
                tensor.data, dtype=_NUMPY[tensor.datatype]
            ).reshape(tensor.shape)
        except (KeyError, ValueError) as exc:
            raise BadResponseError(
                f"unreadable output {tensor.name!r}: {exc}",
                request_id=response.request_id,
            ) from exc
    return InferResult(
        request_id=response.request_id,
        model=response.model or model,
        outputs=outputs,
        action=response.action or "allow",
        rate=_rate(response),
        replayed=bool(getattr(response, "replayed", False)),
        degrade=getattr(response, "degrade", None),
    )


_NUMPY: dict[str, Any] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT32": np.int32,
    "INT64": np.int64,
}


def _rate(response: protocol.InferResponse) -> RateInfo | None:
    # ``rate`` is the gateway's RateInfo (limit, remaining, reset_ms,
    # window_s); read by name so this works before and after the worker
    # reports it.
    rate = getattr(response, "rate", None)
    if rate is None:
        return None
    try:
        return RateInfo(
            limit=int(rate.limit),
            remaining=int(rate.remaining),
            reset_s=float(rate.reset_ms) / 1000,
            window_s=float(rate.window_s),
        )
    except (AttributeError, TypeError, ValueError):
        logger.debug("unreadable rate information ignored")
        return None
