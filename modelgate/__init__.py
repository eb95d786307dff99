"""modelgate's client library: send numpy arrays to models behind the gateway.

``Client`` (blocking) and ``AsyncClient`` (asyncio) over HTTP or Kafka, typed
errors in ``modelgate.errors``, retries in ``modelgate.retry``. See
``docs/client.md``.

The top-level ``modelgate`` command is ``gateway.cli``; this package holds
only the client and must not import the worker, Redis or the detectors.
"""

from __future__ import annotations

from modelgate.client import AsyncClient, Client
from modelgate.errors import (
    AuthError,
    BackendError,
    BlockedError,
    GatewayError,
    RateLimitedError,
    RefusedError,
    ServerError,
    TransportError,
    ValidationError,
)
from modelgate.results import InferResult, RateInfo
from modelgate.retry import RetryPolicy

__all__ = [
    "AsyncClient",
    "AuthError",
    "BackendError",
    "BlockedError",
    "Client",
    "GatewayError",
    "InferResult",
    "RateInfo",
    "RateLimitedError",
    "RefusedError",
    "RetryPolicy",
    "ServerError",
    "TransportError",
    "ValidationError",
]
