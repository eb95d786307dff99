"""Admin HTTP API for the live configuration: one FastAPI router.

The router does not authenticate: whoever mounts it passes the dependency
that names the actor (and refuses the request when nobody is logged in or the
role is wrong), so the audit trail records the same name the admin session
has. The ConfigService comes from a second dependency, usually one
long-lived instance started with the admin app.

Errors use the project's body ``{"error", "code", "retriable"}``: invalid
values 422 (the message names the field and rule), a stale parent version
409, an unknown version 404, Kafka or Redis unreachable 503.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
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
    """
    # Defaults rather than Annotated aliases: with postponed annotations,
    # FastAPI resolves names in the module, where a local alias is unknown.
    service_dep: Any = Depends(service_dependency)
    actor_dep: Any = Depends(actor_dependency)
    router = APIRouter(prefix="/config", tags=["config"], responses=_ERRORS)

    @router.get("", response_model=CurrentConfig, summary="Current document")
    async def get_config(
        service: ConfigService = service_dep, _actor: str = actor_dep
    ) -> Any:
        try:
            version, document = await service.current()
        except ModelgateError as exc:
            return _error(exc)
        return CurrentConfig(version=version, document=document.as_dict())

    @router.get("/fields/{key}", response_model=FieldValue, summary="One field")
    async def get_field(
        key: str, service: ConfigService = service_dep, _actor: str = actor_dep
    ) -> Any:
        try:
            version, _ = await service.current()
            value = await service.get(key)
        except ModelgateError as exc:
            return _error(exc)
        return FieldValue(version=version, key=key, value=value)

    @router.patch("", response_model=PublishResult, summary="Set fields")
    async def set_fields(
        body: SetRequest, service: ConfigService = service_dep, actor: str = actor_dep
    ) -> Any:
        try:
            record = await service.set(body.changes, actor, parent=body.parent_version)
        except ModelgateError as exc:
            return _error(exc)
        return PublishResult(published=record is not None, record=record)

    @router.put("", response_model=PublishResult, summary="Replace the document")
    async def apply_document(
        body: ApplyRequest, service: ConfigService = service_dep, actor: str = actor_dep
    ) -> Any:
        try:
            record = await service.apply(
                body.document, actor, parent=body.parent_version, source="api"
            )
        except ModelgateError as exc:
            return _error(exc)
        return PublishResult(published=record is not None, record=record)

    @router.post("/diff", response_model=list[FieldChange], summary="Preview")
    async def diff_config(
        body: DiffRequest, service: ConfigService = service_dep, _actor: str = actor_dep
    ) -> Any:
        try:
            return list(await service.diff(body.document or body.version))
        except ModelgateError as exc:
            return _error(exc)

    @router.get("/history", response_model=list[ConfigRecord], summary="History")
    async def history(
        service: ConfigService = service_dep,
        _actor: str = actor_dep,
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
        version: int, service: ConfigService = service_dep, _actor: str = actor_dep
    ) -> Any:
        try:
            return await service.record(version)
        except ModelgateError as exc:
            return _error(exc)

    @router.post("/rollback", response_model=PublishResult, summary="Roll back")
    async def rollback(
        body: RollbackRequest,
        service: ConfigService = service_dep,
        actor: str = actor_dep,
    ) -> Any:
        try:
            record = await service.rollback(
                body.version, actor, parent=body.parent_version
            )
        except ModelgateError as exc:
            return _error(exc)
        return PublishResult(published=record is not None, record=record)

    @router.get("/status", response_model=ConfigStatus, summary="Worker versions")
    async def status(
        service: ConfigService = service_dep, _actor: str = actor_dep
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
