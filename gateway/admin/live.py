"""The live configuration inside the admin API: the ``/config`` routes of
:mod:`gateway.admin_config` behind admin sessions, over one
:class:`~gateway.liveconfig.service.ConfigService` owned by the app.

Reads need the viewer role, changes the operator role; the author recorded in
the configuration history is ``admin:<user>``, and every change that reaches
the service, published or refused, is also an entry of the admin audit log
with the version before and after.

The service is started in the background when the app starts. Kafka being
unreachable then (or later) does not stop the app: the config routes answer
503 ``BROKER_UNAVAILABLE`` and the rest of the admin API keeps working; the
next call after ``START_RETRY_S`` tries to connect again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from gateway.admin.deps import Principal, audit, get_context, require_role
from gateway.admin.errors import AdminError
from gateway.admin_config import ChangeAttempt, make_config_router
from gateway.config import Settings
from gateway.errors import ModelgateError
from gateway.liveconfig.service import ConfigService

logger = logging.getLogger(__name__)

ACTOR_PREFIX = "admin:"
# After a failed start, calls within this many seconds get 503 at once rather
# than each waiting for another connection attempt.
START_RETRY_S = 5.0


class LiveConfigHandle:
    """One ConfigService for the app's life, started at most once at a time.

    Parameters
    ----------
    settings
        Kafka, Redis and ``live`` sections.
    retry_s
        Seconds after a failed start during which no new attempt is made.
    """

    def __init__(self, settings: Settings, *, retry_s: float = START_RETRY_S) -> None:
        self.service = ConfigService(settings)
        self._retry_s = retry_s
        self._started = False
        self._failed_at: float | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[bool] | None = None

    @property
    def started(self) -> bool:
        return self._started

    def start_soon(self) -> None:
        """Begin connecting without waiting (the app's startup)."""
        self._task = asyncio.create_task(self._try_start())

    async def _try_start(self) -> bool:
        async with self._lock:
            if self._started:
                return True
            now = time.monotonic()
            if self._failed_at is not None and now - self._failed_at < self._retry_s:
                return False
            try:
                await self.service.start()
            except ModelgateError as exc:
                self._failed_at = time.monotonic()
                logger.warning(
                    "live configuration unavailable: %s",
                    exc.message,
                    extra={"code": exc.code},
                )
                return False
            self._started = True
            logger.info("live configuration service started")
            return True

    async def get(self) -> ConfigService:
        """The started service.

        Raises
        ------
        AdminError
            ``BROKER_UNAVAILABLE`` while Kafka cannot be reached.
        """
        if self._started or await self._try_start():
            return self.service
        raise AdminError(
            "the live configuration is unavailable: Kafka cannot be reached",
            code="BROKER_UNAVAILABLE",
            retry_after_s=self._retry_s,
        )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._lock:
            self._started = False
            await self.service.stop()


async def config_service(request: Request) -> ConfigService:
    """Dependency: the app's started ConfigService (or 503).

    Runs after the caller's role check, so a change refused here for want
    of Kafka is audited under the operator's name.
    """
    handle: LiveConfigHandle = request.app.state.live_config
    try:
        return await handle.get()
    except AdminError as exc:
        user = getattr(request.state, "config_user", None)
        if user is not None:
            await audit(
                get_context(request),
                request,
                actor=user,
                outcome="failed",
                target="config",
                detail={"code": exc.code, "error": exc.message},
            )
        raise


async def config_actor(
    request: Request,
    principal: Annotated[Principal, Depends(require_role("operator"))],
) -> str:
    """Dependency: an operator's session, named as author of a change."""
    request.state.config_user = principal.user
    return f"{ACTOR_PREFIX}{principal.user}"


async def audit_change(request: Request, attempt: ChangeAttempt) -> None:
    """Write one configuration change attempt to the admin audit log."""
    detail = {
        "operation": attempt.operation,
        "version_before": _version(attempt.version_before),
        "version_after": _version(attempt.version_after),
        "summary": attempt.summary,
    }
    if attempt.code:
        detail["code"] = attempt.code
        detail["error"] = attempt.error
    await audit(
        get_context(request),
        request,
        actor=attempt.actor.removeprefix(ACTOR_PREFIX),
        outcome="ok" if attempt.accepted else "failed",
        target="config",
        detail=detail,
    )


def _version(version: int | None) -> str:
    return "unknown" if version is None else str(version)


def config_router() -> APIRouter:
    """The ``/config`` routes as the admin app mounts them."""
    return make_config_router(
        config_service,
        config_actor,
        reader_dependency=require_role("viewer"),
        on_change=audit_change,
    )
