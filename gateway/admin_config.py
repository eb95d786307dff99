"""Admin HTTP API for the live configuration: one FastAPI router.

The router does not authenticate: whoever mounts it passes the dependency
that names the actor (and refuses the request when nobody is logged in or the
role is wrong), so the audit trail records the same name the admin session
has; reads may take a second, laxer dependency. The ConfigService comes from
another dependency, usually one long-lived instance started with the admin
app (``gateway.admin.app`` mounts it that way). An optional hook hears about
every change attempt that reached the service, published or refused, so the
mounting app can audit it.

Errors use the project's body ``{"error", "code", "retriable"}``: invalid
values 422 (the message names the field and rule), a stale parent version
409, an unknown version 404, Kafka or Redis unreachable 503.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import ModelgateError
from gateway.liveconfig.document import (
    ConfigConflict,
    ConfigRecord,
    FieldChange,
    UnknownVersion,
)
from gateway.liveconfig.service import ConfigService, WorkerAck

logger = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    error: str
    code: str
    retriable: bool


class CurrentConfig(BaseModel):
    version: int = Field(description="0 before anything was published.")
    document: dict[str, Any]


class FieldValue(BaseModel):
    version: int
    key: str
    value: Any


class SetRequest(_Body):
    changes: dict[str, Any] = Field(
        min_length=1,
        description='Dotted field to new value, e.g. {"policy.flag_at": 1.2}.',
        examples=[{"policy.flag_at": 1.2, "limits.burst": 50}],
    )
    parent_version: int | None = Field(
        None, ge=0, description="Refuse unless this is still the current version."
    )


class ApplyRequest(_Body):
    document: dict[str, Any] = Field(
        description="The whole document; omitted fields take their defaults."
    )
    parent_version: int | None = Field(None, ge=0)


class RollbackRequest(_Body):
    version: int = Field(ge=1, description="Version whose document returns.")
    parent_version: int | None = Field(None, ge=0)


class DiffRequest(_Body):
    document: dict[str, Any] | None = None
    version: int | None = Field(None, ge=1)


class PublishResult(BaseModel):
    published: bool = Field(description="False when the change changed nothing.")
    record: ConfigRecord | None = None


class WorkerStatus(WorkerAck):
    stale: bool = Field(description="No heartbeat within live.ack_ttl_s.")


class ConfigStatus(BaseModel):
    version: int
    workers: list[WorkerStatus]


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown version or field."},
    409: {"model": ErrorBody, "description": "Stale parent version."},
    422: {"model": ErrorBody, "description": "Invalid value (field and rule named)."},
    503: {"model": ErrorBody, "description": "Kafka or Redis unreachable."},
}


@dataclass(frozen=True, slots=True)
class ChangeAttempt:
    """One change request that reached the service, for the mounting app's
    audit log.

    ``version_before`` is the version the change was computed from (the
    published record's parent; for the very first change that is the
    baseline version 1 published with it), or for a refusal the version
    current afterwards (``None`` when even that could not be read).
    ``version_after`` is the new version, or ``version_before`` when nothing
    was published. ``summary`` is the published record's summary, else what
    was asked (``set limits.burst=0``, ``rollback to 99``).
    """

    operation: str
    actor: str
    accepted: bool
    version_before: int | None
    version_after: int | None
    summary: str
    code: str = ""
    error: str = ""


ChangeHook = Callable[[Request, ChangeAttempt], Awaitable[None]]


def _error(exc: ModelgateError) -> JSONResponse:
    if isinstance(exc, ConfigConflict):
        status = 409
    elif isinstance(exc, UnknownVersion) or exc.code == "CONFIG_NO_FIELD":
        status = 404
    elif exc.code.startswith("CONFIG"):
        status = 422
    else:
        status = 503
        logger.warning("configuration API: %s", exc.message)
    body = ErrorBody(error=exc.message, code=exc.code, retriable=exc.retriable)
    return JSONResponse(body.model_dump(), status_code=status)


def make_config_router(
    service_dependency: Callable[..., Any],
    actor_dependency: Callable[..., Any],
    *,
    reader_dependency: Callable[..., Any] | None = None,
    on_change: ChangeHook | None = None,
) -> APIRouter:
    """The ``/config`` routes.

    Parameters
    ----------
    service_dependency
        FastAPI dependency giving a started :class:`ConfigService`.
    actor_dependency
        FastAPI dependency giving the name recorded as author of a change
        (for example the logged-in operator); it should refuse the request
        itself when the caller may not change configuration.
    reader_dependency
        FastAPI dependency guarding the reads (get, diff, history, versions,
        status), e.g. a lower role; ``None``: ``actor_dependency`` guards
        them too. Its value is ignored.
    on_change
        Awaited after every set, apply or rollback that passed the
        dependencies, published or refused by the service.
    """
    # Defaults rather than Annotated aliases: with postponed annotations,
    # FastAPI resolves names in the module, where a local alias is unknown.
    # The caller's dependency comes before the service's in every route, so
    # an anonymous call is refused before it can make the service connect.
    service_dep: Any = Depends(service_dependency)
    actor_dep: Any = Depends(actor_dependency)
    reader_dep: Any = Depends(reader_dependency or actor_dependency)
    router = APIRouter(prefix="/config", tags=["config"], responses=_ERRORS)

    async def report(
        request: Request,
        service: ConfigService,
        operation: str,
        actor: str,
        outcome: ConfigRecord | ModelgateError | None,
        asked: str,
    ) -> None:
        if on_change is None:
            return
        if isinstance(outcome, ConfigRecord):
            attempt = ChangeAttempt(
                operation,
                actor,
                True,
                outcome.parent,
                outcome.version,
                outcome.summary,
            )
        else:
            try:
                version: int | None = (await service.current())[0]
            except ModelgateError:
                version = None
            attempt = ChangeAttempt(
                operation,
                actor,
                outcome is None,
                version,
                version,
                f"{asked} (nothing changed)" if outcome is None else asked,
                code="" if outcome is None else outcome.code,
                error="" if outcome is None else outcome.message,
            )
        await on_change(request, attempt)

    async def publish(
        request: Request,
        service: ConfigService,
        operation: str,
        actor: str,
        change: Awaitable[ConfigRecord | None],
        asked: str,
    ) -> Any:
        # Every change handler reports its outcome, success or refusal, the
        # same way; ``change`` is the service call, not yet awaited.
        try:
            record = await change
        except ModelgateError as exc:
            await report(request, service, operation, actor, exc, asked)
            return _error(exc)
        await report(request, service, operation, actor, record, asked)
        return PublishResult(published=record is not None, record=record)

    @router.get("", response_model=CurrentConfig, summary="Current document")
    async def get_config(
        _reader: Any = reader_dep, service: ConfigService = service_dep
    ) -> Any:
        try:
            version, document = await service.current()
        except ModelgateError as exc:
            return _error(exc)
        return CurrentConfig(version=version, document=document.as_dict())

    @router.get("/fields/{key}", response_model=FieldValue, summary="One field")
    async def get_field(
        key: str, _reader: Any = reader_dep, service: ConfigService = service_dep
    ) -> Any:
        try:
            version, _ = await service.current()
            value = await service.get(key)
        except ModelgateError as exc:
            return _error(exc)
        return FieldValue(version=version, key=key, value=value)

    @router.patch("", response_model=PublishResult, summary="Set fields")
    async def set_fields(
        body: SetRequest,
        request: Request,
        actor: str = actor_dep,
        service: ConfigService = service_dep,
    ) -> Any:
        asked = "set " + ", ".join(
            f"{k}={json.dumps(v)}" for k, v in body.changes.items()
        )
        change = service.set(body.changes, actor, parent=body.parent_version)
        return await publish(request, service, "set", actor, change, asked)

    @router.put("", response_model=PublishResult, summary="Replace the document")
    async def apply_document(
        body: ApplyRequest,
        request: Request,
        actor: str = actor_dep,
        service: ConfigService = service_dep,
    ) -> Any:
        change = service.apply(
            body.document, actor, parent=body.parent_version, source="api"
        )
        return await publish(
            request, service, "apply", actor, change, "apply a document"
        )

    @router.post("/diff", response_model=list[FieldChange], summary="Preview")
    async def diff_config(
        body: DiffRequest,
        _reader: Any = reader_dep,
        service: ConfigService = service_dep,
    ) -> Any:
        try:
            return list(await service.diff(body.document or body.version))
        except ModelgateError as exc:
            return _error(exc)

    @router.get("/history", response_model=list[ConfigRecord], summary="History")
    async def history(
        _reader: Any = reader_dep,
        service: ConfigService = service_dep,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
    ) -> Any:
        try:
            return await service.history(limit)
        except ModelgateError as exc:
            return _error(exc)

    @router.get(
        "/versions/{version}", response_model=ConfigRecord, summary="One version"
    )
    async def get_version(
        version: int, _reader: Any = reader_dep, service: ConfigService = service_dep
    ) -> Any:
        try:
            return await service.record(version)
        except ModelgateError as exc:
            return _error(exc)

    @router.post("/rollback", response_model=PublishResult, summary="Roll back")
    async def rollback(
        body: RollbackRequest,
        request: Request,
        actor: str = actor_dep,
        service: ConfigService = service_dep,
    ) -> Any:
        asked = f"rollback to {body.version}"
        change = service.rollback(body.version, actor, parent=body.parent_version)
        return await publish(request, service, "rollback", actor, change, asked)

    @router.get("/status", response_model=ConfigStatus, summary="Worker versions")
    async def status(
        _reader: Any = reader_dep, service: ConfigService = service_dep
    ) -> Any:
        try:
            version, _ = await service.current()
            acks = await service.status()
        except ModelgateError as exc:
            return _error(exc)
        ttl_s = service.settings.live.ack_ttl_s
        return ConfigStatus(
            version=version,
            workers=[
                WorkerStatus(**ack.model_dump(), stale=ack.is_stale(ttl_s))
                for ack in acks
            ],
        )

    return router
