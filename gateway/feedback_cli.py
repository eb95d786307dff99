"""``modelgate guard run`` and ``modelgate feedback send|rejected``.

``guard run`` is the poisoning guard service (gateway/feedback.py);
``feedback send`` signs and produces labelled rows from a file;
``feedback rejected`` prints the rejected topic. Registered in
``gateway/cli.py`` by :func:`register`. Imports typer and the gateway; Kafka
clients only inside the commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway import logs
from gateway.cli_common import (
    ConfigOption,
    LogLevel,
    exit_for,
    load_cli_settings,
    stop_on_signals,
    token_or_exit,
)
from gateway.config import Settings
from gateway.errors import ModelgateError

if TYPE_CHECKING:
    import numpy as np
    from aiokafka import ConsumerRecord

guard_app = typer.Typer(help="The poisoning guard that screens labelled feedback.")
feedback_app = typer.Typer(help="Send labelled feedback; read the guard's verdicts.")


def register(app: typer.Typer) -> None:
    """Add the ``guard`` and ``feedback`` groups to the ``modelgate`` app."""
    app.add_typer(guard_app, name="guard")
    app.add_typer(feedback_app, name="feedback")


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except ModelgateError as exc:
        raise exit_for(exc) from exc


# -- guard run ---------------------------------------------------------------------


@guard_app.command("run")
def guard_run(
    config: ConfigOption = None,
    shadow: Annotated[
        bool | None,
        typer.Option("--shadow/--enforce", help="Override feedback.shadow."),
    ] = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run the guard until SIGTERM or Ctrl-C; exits 0 after committing."""
    from threadpoolctl import threadpool_limits

    logs.configure(log_level)
    settings = load_cli_settings(config)
    if shadow is not None:
        settings = settings.model_copy(
            update={"feedback": settings.feedback.model_copy(update={"shadow": shadow})}
        )
    # Small matrix products per record: a threaded BLAS only adds wake-ups.
    threadpool_limits(1)
    _run(_guard_main(settings))


async def _guard_main(settings: Settings) -> None:
    from gateway.feedback import FeedbackGuard

    stop = stop_on_signals()  # before start: a stop during it is kept
    async with FeedbackGuard(settings) as guard:
        await guard.run(stop)


# -- feedback send -----------------------------------------------------------------


def read_rows(path: Path) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Rows and labels from ``.npz`` (arrays ``x`` and ``y``, no pickle) or
    ``.csv`` (numbers only, the label in the last column, no header).

    Raises
    ------
    ValueError
        The file cannot be read as either.
    """
    # Here, not at the top: `modelgate --help` imports this module.
    import numpy as np

    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
    else:
        with path.open(newline="") as handle:
            table = [[float(v) for v in row] for row in csv.reader(handle) if row]
        if not table or len({len(r) for r in table}) != 1 or len(table[0]) < 2:
            raise ValueError("a CSV needs rows of equal length: features, then label")
        array = np.asarray(table)
        x, y = array[:, :-1], array[:, -1]
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError("x must be (n, d) and y (n,)")
    if not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("labels must be whole numbers")
    # Checked after the cast: a value beyond FP32's range becomes infinite.
    # Sent as it was, NaN went out as JSON null and the guard's refusal
    # ("got `null`") did not name what was wrong in the file.
    with np.errstate(over="ignore"):
        features = x.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:
        raise ValueError(
            f"row {int(bad[0])} (counting from 0) holds NaN, an infinity or a "
            "value beyond FP32's range; every feature must be a finite number"
        )
    return features, y.astype(np.int64)


@feedback_app.command("send")
def feedback_send(
    path: Annotated[Path, typer.Argument(help=".npz (x, y) or .csv (label last).")],
    token: Annotated[
        str,
        typer.Option(envvar="MODELGATE_TOKEN", help="API key token <key_id>.<secret>."),
    ],
    client_id: Annotated[str, typer.Option(help="The key's client id.")],
    model: Annotated[str, typer.Option(help="Model the labels are for.")] = "digits",
    input_name: Annotated[str, typer.Option(help="The model's input tensor.")] = (
        "pixels"
    ),
    id_prefix: Annotated[
        str | None,
        typer.Option(
            help="Row i gets the feedback id PREFIX-i, so a rejection names "
            "its row; default: the file's name and the time."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Sign every row of PATH with its label and produce it to the feedback
    topic, keyed by the client id."""

    settings = load_cli_settings(config)
    try:
        x, y = read_rows(path)
    except (OSError, ValueError, KeyError) as exc:
        typer.echo(f"error: cannot read {path}: {exc}", err=True)
        raise typer.Exit(2) from exc
    key_id, secret = token_or_exit(settings, token)
    # Time-stamped by default: the guard counts a record with an id, label
    # and row it has seen once, so the same file sent twice must differ.
    prefix = id_prefix or f"{path.stem}-{time.strftime('%Y%m%dT%H%M%S')}"
    # Ids are at most 128 characters, the row index included.
    if not 1 <= len(prefix) <= 100:
        typer.echo("error: --id-prefix must be 1 to 100 characters", err=True)
        raise typer.Exit(2)
    sent = _run(
        _send(settings, key_id, secret, client_id, model, input_name, x, y, prefix)
    )
    typer.echo(
        f"sent {sent} feedback records to {settings.kafka.topics.feedback} "
        f"(ids {prefix}-0 to {prefix}-{sent - 1})"
    )


async def _send(
    settings: Settings,
    key_id: str,
    secret: bytes,
    client_id: str,
    model: str,
    input_name: str,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    id_prefix: str,
) -> int:
    from aiokafka import AIOKafkaProducer

    from gateway.feedback import feedback_topics
    from gateway.feedback_wire import build_feedback
    from gateway.topics import ensure_topics

    # Idempotent; lets a first submission precede the guard's first start
    # (the broker does not create topics by itself).
    await ensure_topics(settings, extra=feedback_topics(settings))
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", linger_ms=5
    )
    timeout_s = settings.kafka.request_timeout_s
    await asyncio.wait_for(producer.start(), timeout_s)
    try:
        futures = []
        for i, (row, label) in enumerate(zip(x, y, strict=True)):
            _, value, headers = build_feedback(
                key_id=key_id,
                secret=secret,
                model=model,
                input_name=input_name,
                row=row,
                label=int(label),
                feedback_id=f"{id_prefix}-{i}",
            )
            futures.append(
                await producer.send(
                    settings.kafka.topics.feedback,
                    value=value,
                    key=client_id.encode("utf-8"),
                    headers=headers,
                )
            )
        await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
    finally:
        await producer.stop()
    return len(futures)


# -- feedback rejected -------------------------------------------------------------


@feedback_app.command("rejected")
def feedback_rejected(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON per line.")] = (
        False
    ),
    limit: Annotated[
        int, typer.Option(min=1, help="Print at most this many (1 or more).")
    ] = 1000,
) -> None:
    """Print the stored rejected records, oldest first (by record timestamp,
    then partition and offset)."""
    settings = load_cli_settings(config)
    with contextlib.suppress(KeyboardInterrupt):
        _run(_rejected(settings, as_json, limit))


async def _rejected(settings: Settings, as_json: bool, limit: int) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from gateway.topics import partitions_of

    topic = settings.kafka.topics.feedback_rejected
    partitions = await partitions_of(settings, topic)
    if not partitions:
        typer.echo(f"error: no topic {topic} (has the guard run?)", err=True)
        raise typer.Exit(1)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False
    )
    await asyncio.wait_for(consumer.start(), settings.kafka.request_timeout_s)
    # (timestamp ms, partition, offset, line), gathered from every partition
    # and sorted, so that the order does not depend on which partition a
    # fetch happened to return first.
    found: list[tuple[int, int, int, str]] = []
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        # The oldest `limit` of the topic are among each partition's first
        # `limit` while a partition's timestamps rise with its offsets, as the
        # guards' clocks stamp them (a clock stepped back may misplace some).
        taken = dict.fromkeys(tps, 0)
        while True:
            reading = [
                tp
                for tp in tps
                if taken[tp] < limit and await consumer.position(tp) < end[tp]
            ]
            if not reading:
                break
            batch = await consumer.getmany(*reading, timeout_ms=500)
            for tp, records in batch.items():
                for record in records[: max(limit - taken[tp], 0)]:
                    taken[tp] += 1
                    found.append(
                        (
                            record.timestamp,
                            record.partition,
                            record.offset,
                            _rejected_line(record, as_json),
                        )
                    )
    finally:
        await consumer.stop()
    found.sort(key=lambda row: row[:3])
    printed = found[:limit]
    for *_, line in printed:
        typer.echo(line)
    shown = sum(1 for *_, line in printed if not line.startswith(_UNREADABLE))
    noun = "record" if shown == 1 else "records"
    typer.echo(f"{shown} rejected {noun} on {topic}", err=True)


_UNREADABLE = "(unreadable record"


def _rejected_line(record: ConsumerRecord[Any, bytes], as_json: bool) -> str:
    """One rejected record as printed, or a note that it cannot be read."""
    from gateway.feedback_wire import decode_rejected
    from gateway.protocol import DECODE_ERRORS

    value = record.value or b""
    try:
        rejected = decode_rejected(value)
    except DECODE_ERRORS:
        return f"{_UNREADABLE} at partition {record.partition} offset {record.offset})"
    if as_json:
        fields = {k: v for k, v in json.loads(value).items() if k != "value_b64"}
        return json.dumps(fields, sort_keys=True)
    return (
        f"{rejected.code:22s} {rejected.client_id or '-':16s} "
        f"{rejected.feedback_id or '-'}  "
        f"{rejected.evidence or rejected.message}"
    )
