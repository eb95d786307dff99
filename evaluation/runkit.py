"""Steps shared by the demo (evaluation/demo.py) and the evaluation harness
(evaluation/harness.py): giving a run its own topics, waiting for the worker to
serve, and unwrapping the error that ended a task group.

Like the rest of ``evaluation``, it imports the gateway's client-side modules,
never ``gateway.worker``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from evaluation.process import WorkerProcessError
from gateway.client import GatewayClient, GatewayRequestError, error_of
from gateway.config import Settings

Array = np.ndarray[Any, Any]

# How long one warm-up request waits for its answer, in seconds.
_PROBE_TIMEOUT_S = 3.0


class WatchedWorker(Protocol):
    """A worker a run can watch: ``WorkerProcess``, or a stand-in for one
    started elsewhere."""

    log_path: Path

    def check_alive(self) -> None: ...

    def log_tail(self) -> str: ...


def own_run_settings(settings: Settings) -> Settings:
    """The same settings with topics, consumer group, Redis key prefix, live
    configuration topic and metrics port of this run alone.

    Any ``modelgate worker`` already running on the default topics (or another
    run) would otherwise take this run's requests, and answer them under a
    different server key. The key prefix keeps what an earlier run left in
    Redis out of this one: the detectors' saved live baselines above all
    (``gateway.baselines``), which a worker loads at start, so that each run
    measures its detectors from the same start. The live topic keeps a
    deployment's live changes (``modelgate config set``) out of the run's
    worker, which would otherwise apply them over the settings the report
    prints. The metrics port becomes 0 (any free port).
    """
    tag = "demo-" + datetime.now(UTC).strftime("%H%M%S") + "-" + secrets.token_hex(2)
    kafka = settings.kafka
    topics = kafka.topics.model_copy(
        update={
            "requests": f"modelgate.{tag}.requests",
            "responses": f"{settings.worker.reply_topic_prefix}.{tag}",
            "alerts": f"modelgate.{tag}.alerts",
            "decisions": f"modelgate.{tag}.decisions",
            "deadletter": f"modelgate.{tag}.deadletter",
        }
    )
    return settings.model_copy(
        update={
            "kafka": kafka.model_copy(
                update={"topics": topics, "group_id": f"modelgate-{tag}"}
            ),
            "worker": settings.worker.model_copy(update={"metrics_port": 0}),
            "live": settings.live.model_copy(
                update={"topic": f"modelgate.{tag}.config"}
            ),
            "redis": settings.redis.model_copy(
                update={"key_prefix": f"{settings.redis.key_prefix[:15]}-{tag}"}
            ),
        }
    )


async def wait_for_answer(
    client: GatewayClient,
    x: Array,
    worker: WatchedWorker,
    deadline: float,
    timeout_s: float,
    *,
    what: str = "",
) -> None:
    """Send warm-up requests until the worker answers one.

    Parameters
    ----------
    client
        The warm-up client (its own API key, so its queries count for no one).
    x
        One batch of model input, shape ``(1, n_features)``.
    worker
        Checked between tries, so a dead worker fails the run at once.
    deadline
        ``time.monotonic()`` value after which a silent worker fails the run.
    timeout_s
        The run's warm-up timeout, in seconds, that set ``deadline`` (named in
        the error).
    what
        Named in the refusal message (``" for digits"``); may be empty.

    Raises
    ------
    WorkerProcessError
        The worker exited, refused the request with an error that waiting will
        not fix, or stayed silent past ``deadline``.
    """
    while True:
        worker.check_alive()
        try:
            response = await client.infer(x, timeout_s=_PROBE_TIMEOUT_S)
        except GatewayRequestError as exc:
            if exc.code != "TIMEOUT":
                raise
            if time.monotonic() > deadline:
                raise WorkerProcessError(
                    f"worker did not answer within {timeout_s:.0f} s;"
                    f" last lines of {worker.log_path}:\n{worker.log_tail()}"
                ) from exc
            continue
        error = error_of(response)
        if error is not None and not error.retriable:
            raise WorkerProcessError(
                f"worker refused the warm-up request{what}: "
                f"{error.code}: {error.message}"
            )
        return


def first_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of a task group that is not a cancellation (the one that
    made the group cancel the others), searching nested groups depth first."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return first_cause(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return group.exceptions[0]
