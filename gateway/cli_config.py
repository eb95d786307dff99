"""``modelgate config``: read and change the live configuration.

The actor recorded in the audit trail is ``cli:<os user>``. The CLI trusts
whoever can reach Kafka and Redis from this host: it has no login of its own.
The admin HTTP API (gateway.admin_config) adds authenticated sessions.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from gateway.cli_common import ConfigOption, load_cli_settings
from gateway.config import Settings
from gateway.errors import ModelgateError

if TYPE_CHECKING:
    # Imported where used: the detectors they pull in cost seconds at start,
    # which every other modelgate command would pay.
    from gateway.liveconfig.document import ConfigRecord, FieldChange
    from gateway.liveconfig.service import ConfigService

config_app = typer.Typer(
    help="Read and change the live configuration (limits, policy, detectors).",
    no_args_is_help=True,
)

T = TypeVar("T")

ParentOption = Annotated[
    int | None,
    typer.Option(
        "--parent",
        help="Refuse the change unless this is still the current version.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def actor() -> str:
    """Who the audit trail names for a change made from this shell."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


def _settings(config: Path | None) -> Settings:
    return load_cli_settings(config)


def _with_service(
    config: Path | None, action: Callable[[ConfigService], Awaitable[T]]
) -> T:
    from gateway.liveconfig.service import ConfigService

    settings = _settings(config)

    async def main() -> T:
        async with ConfigService(settings) as service:
            return await action(service)

    try:
        return asyncio.run(main())
    except ModelgateError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        # Refused input is a usage error (2); an unreachable service is not (1).
        raise typer.Exit(2 if exc.code.startswith("CONFIG") else 1) from exc


def _when(at_ms: int) -> str:
    return (
        datetime.datetime.fromtimestamp(at_ms / 1000, datetime.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def _print_changes(changes: tuple[FieldChange, ...]) -> None:
    if not changes:
        typer.echo("no differences")
    for change in changes:
        typer.echo(
            f"  {change.field}: {json.dumps(change.old)} -> {json.dumps(change.new)}"
        )


def _published(record: ConfigRecord | None) -> None:
    if record is None:
        typer.echo("no change: nothing published")
        return
    typer.echo(f"published version {record.version} (parent {record.parent})")
    _print_changes(record.changes)


@config_app.command("get")
def get(
    key: Annotated[
        str | None, typer.Argument(help="Dotted field, e.g. policy.flag_at")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Print the current document (JSON) or one field, and its version."""

    async def run(service: ConfigService) -> tuple[int, Any]:
        version, _ = await service.current()
        return version, await service.get(key)

    version, value = _with_service(config, run)
    typer.echo(json.dumps(value, indent=2, sort_keys=True))
    typer.echo(f"# version {version}", err=True)


@config_app.command("set")
def set_(
    assignments: Annotated[list[str], typer.Argument(help="KEY=VALUE pairs.")],
    parent: ParentOption = None,
    config: ConfigOption = None,
) -> None:
    """Change fields, e.g. ``policy.flag_at=1.2 limits.burst=50``."""
    from gateway.liveconfig.service import parse_assignments

    try:
        changes = parse_assignments(assignments)
    except ModelgateError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    record = _with_service(
        config, lambda service: service.set(changes, actor(), parent=parent)
    )
    _published(record)


@config_app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(help="Whole document, .toml or .json.")],
    parent: ParentOption = None,
    config: ConfigOption = None,
) -> None:
    """Replace the whole document with FILE (omitted fields take defaults)."""
    from gateway.liveconfig.service import load_document_file

    async def run(service: ConfigService) -> ConfigRecord | None:
        document = load_document_file(file)
        return await service.apply(document, actor(), parent=parent, source=file.name)

    _published(_with_service(config, run))


@config_app.command("diff")
def diff(
    against: Annotated[
        str | None, typer.Argument(help="A document file or a version number.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Differences from the current version to FILE or VERSION; with neither,
    what the current version changed."""
    from gateway.liveconfig.service import load_document_file

    async def run(service: ConfigService) -> tuple[FieldChange, ...]:
        if against is None:
            return await service.diff()
        if against.isdigit():
            return await service.diff(int(against))
        return await service.diff(load_document_file(Path(against)))

    _print_changes(_with_service(config, run))


@config_app.command("history")
def history(
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 20,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Published versions, oldest first: who, when, from which version, what
    (--json: one JSON array of the records, `[]` before the first change)."""
    records = _with_service(config, lambda service: service.history(limit))
    if as_json:
        # One JSON array, so that no change yet is `[]`, still JSON to a
        # parser, rather than an empty stdout.
        typer.echo(
            "["
            + ",\n".join(r.model_dump_json(exclude={"document"}) for r in records)
            + "]"
        )
    if not records:
        # Not an error: every deployment starts here. On stderr under --json,
        # so that stdout stays JSON.
        typer.echo(
            "no change published yet: the workers run their settings files "
            "(version 0). The first `modelgate config set` or `apply` publishes "
            "those settings as version 1 and the change as version 2.",
            err=as_json,
        )
        return
    if as_json:
        return
    for record in records:
        typer.echo(
            f"v{record.version}  {_when(record.at_ms)}  {record.author}  "
            f"{record.kind} from v{record.parent}"
        )
        if record.kind == "initial":
            # Its "changes" are every field of the document from nothing
            # (about 120 "null -> value" lines), which buries the history.
            typer.echo(
                f"  the whole document, {len(record.changes)} fields "
                f"(modelgate config get prints it; --json lists them)"
            )
            continue
        _print_changes(record.changes)


@config_app.command("rollback")
def rollback(
    version: Annotated[int, typer.Argument(help="Version whose document returns.")],
    parent: ParentOption = None,
    config: ConfigOption = None,
) -> None:
    """Publish VERSION's document again as a new version."""
    record = _with_service(
        config, lambda service: service.rollback(version, actor(), parent=parent)
    )
    _published(record)


@config_app.command("status")
def status(config: ConfigOption = None) -> None:
    """Which worker runs which version."""

    async def run(service: ConfigService) -> tuple[int, Any]:
        version, _ = await service.current()
        return version, await service.status()

    version, acks = _with_service(config, run)
    settings = _settings(config)
    typer.echo(f"current version {version}")
    if not acks:
        typer.echo("no worker has acknowledged a version")
    for ack in acks:
        state = "stale" if ack.is_stale(settings.live.ack_ttl_s) else "live"
        line = (
            f"  {ack.worker_id}  v{ack.version}  applied {_when(ack.applied_at_ms)}"
            f"  seen {_when(ack.seen_at_ms)}  {state}"
        )
        if ack.version != version:
            line += "  BEHIND"
        if ack.refused_version is not None:
            line += f"  refused v{ack.refused_version}: {ack.refused_reason}"
        typer.echo(line)
