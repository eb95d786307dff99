"""``modelgate frontdoor``: run the HTTP front door, or benchmark it.

Registered in ``gateway/cli.py`` with one line. Imports Typer only at module
level; uvicorn, FastAPI and the benchmark load inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gateway import logs
from gateway.cli_common import ConfigOption, LogLevel, load_cli_settings
from gateway.errors import ModelgateError

frontdoor_app = typer.Typer(
    help="The HTTP front door (Open Inference Protocol v2).", no_args_is_help=True
)


@frontdoor_app.command("serve")
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (else frontdoor.host).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind (else frontdoor.port).")
    ] = None,
    config: ConfigOption = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve the OIP v2 REST API under uvicorn until SIGTERM or Ctrl-C.

    Inference requests go through Kafka to the workers; run at least one
    ``modelgate worker`` on the same settings. Prometheus metrics are on
    ``frontdoor.metrics_host:metrics_port`` (0: none), never on this port.
    """
    import uvicorn

    from gateway.frontdoor.app import create_app
    from gateway.frontdoor.http_server import server_options

    logs.configure(log_level)
    settings = load_cli_settings(config)
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if overrides:
        try:
            section = settings.frontdoor.model_validate(
                # Unset fields stay unset, so that a default instance id is
                # still known as generated (its reply topic is removed at stop).
                {**settings.frontdoor.model_dump(exclude_unset=True), **overrides}
            )
        except ValueError as exc:
            typer.echo(f"error [CONFIG_INVALID]: {exc}", err=True)
            raise typer.Exit(2) from exc
        settings = settings.model_copy(update={"frontdoor": section})
    app = create_app(settings)
    section = settings.frontdoor
    metrics = app.state.metrics
    try:
        # Before the app takes its public port, so that a taken metrics port
        # fails the command at once rather than after the app is up.
        metrics.serve(section.metrics_host, section.metrics_port, beside=section.port)
    except ModelgateError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    try:
        uvicorn.run(
            app,
            host=section.host,
            port=section.port,
            log_level=log_level.lower(),
            # Our own logging setup stays in force; uvicorn's access log would
            # add one line per request at INFO.
            log_config=None,
            access_log=False,
            # A request head over 64 KiB gets a 431 it can read, not a reset.
            **server_options(),
        )
    finally:
        metrics.close()


@frontdoor_app.command("bench")
def bench(
    requests: Annotated[int, typer.Option(help="Requests per target.")] = 1000,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 32,
    out: Annotated[
        Path | None, typer.Option(help="Also write the results as JSON to FILE.")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="Model behind the worker and the straight baseline: mlserver "
            "(a real MLServer, both), skops (in-process; baseline a plain OIP "
            "server of the same model), or auto (mlserver when installed)."
        ),
    ] = "auto",
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Front door against the same model served straight over HTTP.

    Starts a worker, the front door and the model server (MLServer when
    installed, else a plain OIP v2 server of the same skops model), drives
    the front door and the model server from a separate load-generator
    process, and prints throughput and p50/p99 latency side by side with
    their ratios. Exits 1 if any request failed (the figures would measure
    something else).
    """
    from gateway.frontdoor.bench import BACKENDS, bench_http_command

    logs.configure(log_level)
    if requests < 1 or concurrency < 1:
        typer.echo("error [BAD_ARGUMENT]: requests and concurrency must be >= 1")
        raise typer.Exit(2)
    if backend not in BACKENDS:
        typer.echo(f"error [BAD_ARGUMENT]: --backend must be one of {BACKENDS}")
        raise typer.Exit(2)
    load_cli_settings(config)  # a bad setting is reported by field name, exit 2
    try:
        code = bench_http_command(requests, concurrency, out, backend)
    except ModelgateError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)
