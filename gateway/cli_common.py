"""Options and settings loading shared by every ``modelgate`` command group.

Kept apart from ``gateway/cli.py`` so that command groups registered there
(front door, config, admin, limits) can use them without importing the
top-level app, which imports them.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.config import Settings, load_settings
from gateway.errors import AuthError, ConfigError, ModelgateError

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (else MODELGATE_CONFIG)."),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING.")]


def load_cli_settings(config: Path | None, **overrides: Any) -> Settings:
    """Settings for a command, or exit 2 with the reason on stderr.

    Parameters
    ----------
    config
        The ``--config`` file; when given it must exist and is exported as
        ``MODELGATE_CONFIG`` so that anything the command starts reads it too.
    **overrides
        Fields that win over the file and the environment.

    Raises
    ------
    typer.Exit
        Code 2 for a missing file or a setting that fails validation (named by
        field in the message).
    """
    if config is not None:
        if not config.is_file():
            typer.echo(f"error: config file {config} not found", err=True)
            raise typer.Exit(2)
        os.environ["MODELGATE_CONFIG"] = str(config)
    try:
        return load_settings(**overrides)
    except ModelgateError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        raise typer.Exit(2) from exc


def exit_for(exc: ModelgateError) -> typer.Exit:
    """Report ``exc`` on stderr and give the exit to raise: 2 for a bad
    configuration, whenever it shows (a setting refused at load, or a
    metrics port found taken as a service starts), 1 for anything else."""
    typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
    return typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def token_or_exit(settings: Settings, token: str) -> tuple[str, bytes]:
    """The key id and secret of ``--token``, or exit 2 with the reason.

    The code is the one the front door and the worker give the same token
    (``KeyStore.check_token``): a well-formed key id with a malformed secret
    is looked up in Redis, and is ``AUTH_UNKNOWN_KEY`` if no key has it.

    Raises
    ------
    typer.Exit
        Code 2 for an empty or malformed token (``AUTH_MISSING``,
        ``AUTH_UNKNOWN_KEY`` or ``AUTH_BAD_SIGNATURE``), 1 when Redis could
        not be asked about a malformed secret.
    """
    from gateway.keys import KeyStore
    from gateway.store import redis_from_settings

    if not token.strip():
        typer.echo(
            "error [AUTH_MISSING]: no API key token given: pass --token or set "
            "MODELGATE_TOKEN to the token `modelgate keys create` printed",
            err=True,
        )
        raise typer.Exit(2)

    async def check() -> tuple[str, bytes]:
        client = redis_from_settings(settings)
        try:
            return await KeyStore(client, settings).check_token(token)
        finally:
            await client.aclose()

    try:
        return KeyStore.parse_token(token)
    except ModelgateError as exc:
        if exc.code != "AUTH_BAD_SIGNATURE":
            typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
            raise typer.Exit(2) from exc
    # Only a malformed secret needs the store: whether its key id exists
    # decides the code.
    try:
        return asyncio.run(check())
    except AuthError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    except ModelgateError as exc:
        raise exit_for(exc) from exc


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets: what a long-running command
    (``worker``, ``guard run``) passes to its service's ``run`` so that a
    stop finishes the batch in hand and exits 0. Call inside the running
    loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
