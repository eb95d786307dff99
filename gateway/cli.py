"""The ``modelgate`` command line (Typer).

Each command loads settings the same way (TOML file named by ``--config`` or
``MODELGATE_CONFIG``, then ``MODELGATE_*`` variables) and reports a bad
setting by field name with exit code 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway import limits_cli, logs
from gateway.admin import cli as admin_cli
from gateway.alert_forward import register as register_alert_forward
from gateway.alerts import SeenAlerts
from gateway.calibrate_cli import calibrate as calibrate_command
from gateway.cli_common import (
    ConfigOption,
    LogLevel,
    exit_for,
    load_cli_settings,
    stop_on_signals,
    token_or_exit,
)
from gateway.cli_config import config_app
from gateway.cli_eval import evaluate
from gateway.config import Settings
from gateway.errors import ModelgateError
from gateway.feedback_cli import register as register_feedback
from gateway.frontdoor.cli import frontdoor_app
from gateway.monitoring import monitoring_app

app = typer.Typer(
    help="modelgate: a streaming inference gateway that catches model theft.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Create, list and revoke client API keys.")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
limits_cli.register(keys_app)
app.add_typer(frontdoor_app, name="frontdoor")
app.add_typer(monitoring_app, name="monitoring")

# Command groups import these too; ``_settings`` keeps its old name for them.
_settings = load_cli_settings


def _run(coro: Any) -> Any:
    from aiokafka.errors import KafkaError

    try:
        return asyncio.run(coro)
    except ModelgateError as exc:
        raise exit_for(exc) from exc
    except ValueError as exc:
        # Arguments the stores refuse (a bad client id, a negative TTL).
        typer.echo(f"error [BAD_ARGUMENT]: {exc}", err=True)
        raise typer.Exit(2) from exc
    except (KafkaError, TimeoutError, OSError) as exc:
        typer.echo(f"error [BROKER_UNAVAILABLE]: {exc!r}", err=True)
        raise typer.Exit(1) from exc


# -- stack ---------------------------------------------------------------------


@app.command()
def up() -> None:
    """Start the local Kafka broker and Redis (no Docker) and leave them running."""
    from gateway import stack

    info = stack.up()
    typer.echo(f"kafka {info.kafka_bootstrap}  redis {info.redis_url}")


@app.command()
def down() -> None:
    """Stop the local stack started by ``modelgate up`` (once no run uses it)."""
    from gateway import stack

    stack.down()


@app.command()
def status() -> None:
    """Say whether the local Kafka and Redis are running."""
    from gateway import stack

    found = stack.status()
    typer.echo(f"kafka: {found.kafka}")
    typer.echo(f"redis: {found.redis}")
    typer.echo(f"holders: {', '.join(found.holders) or 'none'}")


# -- worker --------------------------------------------------------------------


@app.command()
def worker(config: ConfigOption = None, log_level: LogLevel = "INFO") -> None:
    """Run one gateway worker until SIGTERM or Ctrl-C; exits 0 after committing."""
    from threadpoolctl import threadpool_limits

    logs.configure(log_level)
    settings = _settings(config)
    # The detectors' matrix products are small (a batch against 128 stored
    # queries); a threaded BLAS spends more time waking threads than working
    # on them (10 ms against 0.2 ms measured on this 2-core machine).
    threadpool_limits(1)
    _run(_worker_main(settings))


async def _worker_main(settings: Settings) -> None:
    from gateway.worker import Worker

    stop = stop_on_signals()  # before start: a stop during it is kept
    async with Worker(settings) as w:
        await w.run(stop)


# -- demo ----------------------------------------------------------------------


@app.command()
def demo(
    config: ConfigOption = None,
    report_dir: Annotated[
        Path, typer.Option(help="Where report.md, report.json and plots go.")
    ] = Path("report"),
    benign: Annotated[int, typer.Option(help="Benign clients (at least 20).")] = 20,
    quick: Annotated[bool, typer.Option(help="A smaller, faster run.")] = False,
    log_level: LogLevel = "WARNING",
) -> None:
    """Run real traffic and two real attacks through the gateway and report.

    Exits 1 if a benign client was blocked or an attacker went unflagged.
    """
    from evaluation.demo import run_demo

    logs.configure(log_level)
    settings = _settings(config)
    code = _run(run_demo(settings, report_dir, n_benign=benign, quick=quick))
    raise typer.Exit(int(code))


# -- bench ---------------------------------------------------------------------


bench_app = typer.Typer(
    help="Measure the hot path (no subcommand), or the detectors alone.",
    invoke_without_command=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option(help="A smaller run: 1,000 requests end to end.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write the results as JSON to FILE.")
    ] = None,
    config: ConfigOption = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Measure the hot path and print absolute figures beside ratios.

    Redis admission per message and batched, decoding and validation, HMAC
    verify, the detectors, and one worker end to end through Kafka. Holds the
    local stack while it runs. Exits 1 if a request went unanswered or was
    refused, since the figures would then measure something else.
    """
    if ctx.invoked_subcommand is not None:
        return
    from gateway.bench import bench_command

    logs.configure(log_level)
    _settings(config)  # a bad setting is reported by field name, exit 2
    try:
        code = bench_command(quick, out)
    except ModelgateError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


@bench_app.command("detectors")
def bench_detectors(
    clients: Annotated[int, typer.Option(help="Clients sending at once.")] = 100,
    queries: Annotated[int, typer.Option(help="Queries per client.")] = 200,
    budget_us: Annotated[
        float, typer.Option(help="Per-query budget of all detectors together.")
    ] = 20.0,
    runs: Annotated[
        int, typer.Option(min=1, help="Timed runs; figures are their medians.")
    ] = 3,
    redis: Annotated[
        bool,
        typer.Option(
            help="Also time the cross-worker fingerprint store against the "
            "local stack's Redis (holds the stack while it runs)."
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """CPU µs per query and bytes of state per client, for every detector.

    Runs in-process on replayed digits (no Kafka or Redis unless ``--redis``).
    Exits 1 when the detectors together exceed ``--budget-us`` per query or
    together keep more than 32 KB for one client.
    """
    from detectors.base import MAX_STATE_BYTES
    from detectors.bench import measure

    found = measure(n_clients=clients, n_queries=queries, runs=runs)
    typer.echo(f"{'detector':<12}{'µs/query':>10}{'state B/client':>16}")
    for name, row in found["detectors"].items():
        state = int(row["state_bytes_per_client"])
        typer.echo(f"{name:<12}{row['us_per_query']:>10.2f}{state:>16,}")
    total = float(found["total_us_per_query"])
    total_state = int(found["total_state_bytes"])
    fast = total <= budget_us
    small = total_state <= MAX_STATE_BYTES and all(
        row["within_budget"] for row in found["detectors"].values()
    )
    typer.echo(f"{'total':<12}{total:>10.2f}{total_state:>16,}")
    typer.echo(
        f"time:  {total:.2f} µs/query (median of {runs} runs) against "
        f"{budget_us:g} µs: {'met' if fast else 'NOT met'}"
    )
    typer.echo(
        f"state: {total_state:,} B/client against {MAX_STATE_BYTES:,} B: "
        f"{'met' if small else 'NOT met'}"
    )
    if redis:
        from gateway.fingerprint_bench import fingerprint_store_command

        store = fingerprint_store_command(_settings(config))
        typer.echo(
            f"redis fingerprint store, ms/query (batches of {store['batch_size']}):"
        )
        for stream in ("honest", "probing"):
            row = store[stream]
            typer.echo(
                f"  {stream:<8} all rows {row['all_rows_ms_per_query']:.3f}, "
                f"selected {row['selected_ms_per_query']:.3f} "
                f"({row['selected_share']:.0%} of rows sent, longest batch "
                f"{row['max_batch_ms']:.1f} ms)"
            )
    raise typer.Exit(0 if fast and small else 1)


# -- send ----------------------------------------------------------------------


@app.command()
def send(
    token: Annotated[
        str,
        typer.Option(envvar="MODELGATE_TOKEN", help="API key token from keys create."),
    ],
    model: Annotated[str, typer.Option(help="Model name.")] = "digits",
    data: Annotated[
        str | None, typer.Option(help="JSON list of one row's values.")
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option(
            help="Send image number N (0-898) of the held-out digits instead; "
            "N is a position in that set, not the digit's class."
        ),
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option(help="The key's client (looked up in Redis when omitted)."),
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="Seconds to wait.")] = 30.0,
    config: ConfigOption = None,
) -> None:
    """Send one request through Kafka and print the response as JSON."""
    import numpy as np

    settings = _settings(config)
    if (data is None) == (sample is None):
        typer.echo("error: give exactly one of --data or --sample", err=True)
        raise typer.Exit(2)
    if sample is not None:
        from gateway.models import held_out_digits

        held_out = held_out_digits(settings.models.directory)
        if not 0 <= sample < len(held_out):
            typer.echo(f"error: --sample must be 0..{len(held_out) - 1}", err=True)
            raise typer.Exit(2)
        rows = held_out[sample : sample + 1]
    else:
        try:
            # Overflow to infinity is refused below; numpy's warning would
            # only repeat it.
            with np.errstate(over="ignore"):
                values = np.asarray(json.loads(data or ""), dtype=np.float32)
            rows = values.reshape(1, -1)
        except (ValueError, TypeError) as exc:
            typer.echo(f"error: --data is not a JSON list of numbers: {exc}", err=True)
            raise typer.Exit(2) from exc
        if not np.isfinite(rows).all():
            # Python's json reads NaN and Infinity, and 1e39 is infinite as
            # FP32, but a request cannot carry them: they would go as null
            # and come back SCHEMA_INVALID.
            typer.echo(
                "error: --data holds NaN or infinity (or a value beyond FP32), "
                "which a request cannot carry",
                err=True,
            )
            raise typer.Exit(2)
    key_id, secret = token_or_exit(settings, token)
    if client_id is None:
        client_id = _run(_client_of(settings, key_id))
    response = _run(
        _send_one(settings, key_id, secret, client_id, model, rows, timeout_s)
    )
    typer.echo(json.dumps(response, indent=2))
    raise typer.Exit(0 if response.get("status") == "ok" else 1)


async def _client_of(settings: Settings, key_id: str) -> str:
    """The client a key belongs to: answers are keyed by it, and the client
    library only accepts answers under its own client id."""
    async with _key_store(settings) as store:
        key = await store.get(key_id)
    # An unknown key still gets sent, so the gateway can say AUTH_UNKNOWN_KEY.
    return key_id if key is None else str(key.client_id)


async def _send_one(
    settings: Settings,
    key_id: str,
    secret: bytes,
    client_id: str,
    model: str,
    rows: Any,
    timeout_s: float,
) -> dict[str, Any]:
    import msgspec

    from gateway.client import GatewayClient, KafkaTransport

    async with KafkaTransport(settings) as transport:
        client = GatewayClient(transport, key_id, secret, client_id, model)
        response = await client.infer(rows, timeout_s=timeout_s)
    result: dict[str, Any] = msgspec.to_builtins(response)
    return result


# -- alerts --------------------------------------------------------------------


@app.command()
def alerts(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new alerts.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Raw CloudEvents.")] = False,
    config: ConfigOption = None,
) -> None:
    """Print alerts: without --follow, all stored ones; with it, new ones live.

    A copy of an alert already printed (same CloudEvents id: a worker
    produced it again after a retried batch) is not printed again.
    """
    settings = _settings(config)
    with contextlib.suppress(KeyboardInterrupt):
        _run(_alerts(settings, follow, as_json))


async def _alerts(settings: Settings, follow: bool, as_json: bool) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from gateway.alerts import format_alert
    from gateway.topics import partitions_of

    topic = settings.kafka.topics.alerts
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False
    )
    await asyncio.wait_for(consumer.start(), settings.kafka.request_timeout_s)
    try:
        partitions = await partitions_of(settings, topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            typer.echo(f"error: no topic {topic} (no worker has run yet?)", err=True)
            raise typer.Exit(1)
        consumer.assign(tps)
        if follow:
            await consumer.seek_to_end(*tps)
            # seek_to_end is lazy; once every position is known, no alert
            # produced from now on can be missed, and we say so.
            for tp in tps:
                await consumer.position(tp)
            typer.echo(f"following {topic} (Ctrl-C to stop)", err=True)
        else:
            await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        # Stored alerts come partition by partition; printed in time order
        # (record time, then partition and offset) once all are read.
        stored: list[tuple[int, int, int, bytes | None]] = []
        seen = SeenAlerts()
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    if follow:
                        _print_alert(record.value, as_json, format_alert, seen)
                    else:
                        stored.append(
                            (
                                record.timestamp,
                                record.partition,
                                record.offset,
                                record.value,
                            )
                        )
            if not follow:
                positions = {tp: await consumer.position(tp) for tp in tps}
                if all(positions[tp] >= end[tp] for tp in tps):
                    if not stored:
                        # On stderr: stdout stays the (empty) list of alerts.
                        typer.echo(f"no alerts in {topic}", err=True)
                        return
                    # The earliest copy of an alert is the one printed.
                    for *_, value in sorted(stored, key=lambda r: r[:3]):
                        _print_alert(value, as_json, format_alert, seen)
                    if seen.dropped:
                        typer.echo(
                            f"({seen.dropped} duplicate alert(s) not shown: "
                            "same id as one printed)",
                            err=True,
                        )
                    return
    finally:
        await consumer.stop()


def _print_alert(
    value: bytes | None, as_json: bool, fmt: Any, seen: SeenAlerts | None = None
) -> None:
    try:
        event = json.loads(value or b"")
    except ValueError:
        typer.echo("(unreadable alert record)", err=True)
        return
    if seen is not None and isinstance(event, dict) and not seen.first(event):
        return
    typer.echo(json.dumps(event) if as_json else fmt(event))
    sys.stdout.flush()


# -- keys ----------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    client_id: Annotated[str, typer.Argument(help="The client this key belongs to.")],
    model: Annotated[
        list[str] | None, typer.Option(help="Restrict to this model (repeatable).")
    ] = None,
    ttl_days: Annotated[
        float | None, typer.Option(help="Expire after this many days.")
    ] = None,
    config: ConfigOption = None,
    plan: Annotated[str, typer.Option(help="Limits plan (limits.plans).")] = "default",
    overrides: limits_cli.OverridesOption = None,
) -> None:
    """Create an API key and print its token once; it is not stored in clear."""
    settings = _settings(config)
    parsed = limits_cli.overrides_or_exit(overrides)
    limits_cli.plan_or_exit(settings, plan)

    async def create() -> str:
        async with _key_store(settings) as store:
            key, token = await store.create(
                client_id,
                models=tuple(model or ()),
                ttl_s=None if ttl_days is None else ttl_days * 86_400,
                plan=plan,
                limit_overrides=parsed,
            )
            return f"key_id={key.key_id} client={key.client_id}\ntoken={token}"

    typer.echo(_run(create()))
    typer.echo("Store the token now: it cannot be shown again.", err=True)


@keys_app.command("list")
def keys_list(config: ConfigOption = None) -> None:
    """List API keys (ids, clients, scopes, status; never secrets)."""
    settings = _settings(config)

    async def listing() -> list[dict[str, Any]]:
        async with _key_store(settings) as store:
            return list(await store.list())

    for row in _run(listing()):
        typer.echo(json.dumps(row))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id to revoke.")],
    config: ConfigOption = None,
) -> None:
    """Revoke a key; every worker refuses it within auth.key_cache_ttl_s."""
    settings = _settings(config)

    async def revoke() -> bool:
        async with _key_store(settings) as store:
            return bool(await store.revoke(key_id))

    if not _run(revoke()):
        typer.echo(f"error [NOT_FOUND]: no key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@contextlib.asynccontextmanager
async def _key_store(settings: Settings) -> AsyncIterator[Any]:
    from gateway.keys import KeyStore
    from gateway.store import redis_from_settings

    client = redis_from_settings(settings)
    try:
        yield KeyStore(client, settings)
    finally:
        await client.aclose()


app.add_typer(admin_cli.admin_app, name="admin")
app.add_typer(admin_cli.clients_app, name="clients")
app.command("login")(admin_cli.login)
app.command("eval")(evaluate)
app.command("calibrate")(calibrate_command)
register_feedback(app)
register_alert_forward(app)


def main() -> None:
    app()
