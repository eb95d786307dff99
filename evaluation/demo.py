"""The demo (``modelgate demo``): real traffic and two real attacks, one report.

Steps: hold the local stack, create the topics and the digits model, give every
client its own API key, start one worker process, then drive at once

- honest clients replaying held-out digits at uneven rates (``benign``),
- a model-extraction attacker, Papernot et al.'s Jacobian-based augmentation
  (``attacks.extraction``),
- a probing attacker, ART's HopSkipJump (``attacks.probing``),

while an alert consumer credits every alert to its client. Each attack is then
run again straight against the model, with the same budget, for comparison.
The report (``report.md``, ``report.json``, ``surrogate.png``) and the worker's
log land in the report folder.

Everything goes through Kafka and the worker as an ordinary client would; the
model is loaded in this process only for ground truth and the baselines. This
module imports the gateway's client-side modules, never ``gateway.worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from redis.asyncio import Redis

from evaluation.attacks.extraction import (
    ExtractionResult,
    JacobianParams,
    pick_seed_set,
    run_jacobian_extraction,
)
from evaluation.attacks.probing import (
    HopSkipJumpParams,
    ProbingResult,
    run_hopskipjump,
)
from evaluation.benign import draw_profiles, run_benign_client
from evaluation.ledger import ClientLedger
from evaluation.observe import AlertCollector
from evaluation.oracle import DirectOracle, GatewayOracle
from evaluation.process import WorkerProcess
from evaluation.report import (
    BENIGN,
    EXTRACTION,
    PROBING,
    DemoResult,
    exit_code,
    render_markdown,
    write_report,
)
from evaluation.runkit import (
    first_cause,
    own_run_settings,
    wait_for_answer,
)
from gateway.client import GatewayClient, KafkaTransport
from gateway.config import Settings
from gateway.errors import BrokerError
from gateway.keys import KeyStore
from gateway.models import (
    DIGITS,
    ServedModel,
    digits_split,
    ensure_digits_model,
    load_model,
)
from gateway.topics import delete_topics, ensure_topics, run_topics

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
T = TypeVar("T")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and timings of one demo run.

    On 2 cores the full run takes about a minute of traffic (about 65 s in all
    with the stack already up); ``quick`` is the integration test's version,
    about 30 s. Both stay far inside the 10-minute bound.
    """

    n_benign: int
    benign_queries: tuple[int, int]
    benign_spread_s: float
    attack_delay_s: float
    attacker_rate_per_s: float
    attacker_concurrency: int
    extraction: JacobianParams
    probing: HopSkipJumpParams
    progress_every_s: float
    alert_grace_s: float
    warmup_timeout_s: float

    @classmethod
    def build(
        cls, *, n_benign: int, quick: bool, seed: int, rate_limit_per_s: float
    ) -> DemoPlan:
        """The plan for a full or quick run.

        Attackers pace themselves at 80% of the gateway's per-client rate limit
        (at most 40 per second) so that the plain rate limit is not what stops
        them.
        """
        rate = min(40.0, 0.8 * rate_limit_per_s)
        if quick:
            return cls(
                n_benign=max(1, min(n_benign, 6)),
                benign_queries=(30, 50),
                benign_spread_s=6.0,
                attack_delay_s=1.0,
                attacker_rate_per_s=rate,
                attacker_concurrency=8,
                extraction=JacobianParams(budget=600, seed=seed),
                probing=HopSkipJumpParams(
                    budget=400, n_targets=2, max_iter=5, seed=seed
                ),
                progress_every_s=3.0,
                alert_grace_s=2.0,
                warmup_timeout_s=60.0,
            )
        return cls(
            n_benign=n_benign,
            benign_queries=(40, 80),
            benign_spread_s=30.0,
            attack_delay_s=3.0,
            attacker_rate_per_s=rate,
            attacker_concurrency=8,
            extraction=JacobianParams(budget=1500, seed=seed),
            probing=HopSkipJumpParams(budget=1200, n_targets=5, seed=seed),
            progress_every_s=5.0,
            alert_grace_s=3.0,
            warmup_timeout_s=120.0,
        )


@dataclass
class _Run:
    """State shared by the steps of one run."""

    settings: Settings
    plan: DemoPlan
    run_id: str
    seed: int
    quick: bool
    say: Progress
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    ledgers: dict[str, ClientLedger] = field(default_factory=dict)
    clients: dict[str, GatewayClient] = field(default_factory=dict)
    extraction_status: str = "waiting"
    probing_status: str = "waiting"
    benign_done: int = 0
    benign_planned: int = 0

    def of_role(self, role: str) -> list[ClientLedger]:
        return [ledger for ledger in self.ledgers.values() if ledger.role == role]


def _say(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


async def run_demo(
    settings: Settings,
    report_dir: Path,
    *,
    n_benign: int = 20,
    quick: bool = False,
    seed: int = 0,
    use_stack: bool = True,
    progress: Progress | None = None,
) -> int:
    """Run the demo and write its report; return the exit code.

    Parameters
    ----------
    settings
        Gateway settings; with ``use_stack`` the Kafka and Redis addresses are
        replaced by those of the local stack.
    report_dir
        Receives report.md, report.json, surrogate.png and worker.log.
    n_benign
        Honest clients (quick runs use at most 6).
    quick
        A smaller run for the integration test.
    seed
        Seeds traffic habits, attack choices and substitutes.
    use_stack
        Start (or join) the local stack through ``gateway.stack.hold``; False
        uses the services ``settings`` names as they are.
    progress
        Receives progress lines; printed to stdout by default.

    Returns
    -------
    int
        0 when no benign client was blocked and both attackers drew an alert,
        1 otherwise.

    Raises
    ------
    WorkerProcessError
        The worker did not start serving, or died during the run.
    BrokerError, StoreError
        Kafka or Redis could not be reached.
    """
    loop = asyncio.get_running_loop()
    say = progress or _say
    if not use_stack:
        return await _run_demo(settings, report_dir, n_benign, quick, seed, say)

    from gateway import stack

    # hold() blocks while the services start (seconds, or minutes on a first
    # run that fetches the Kafka jars), so it runs off the event loop.
    holder = stack.hold(holder=f"demo-{os.getpid()}")
    try:
        fetches = await loop.run_in_executor(None, stack.acquire_fetches_jars)
    except stack.StackError:
        fetches = False  # hold() below runs the same scripts and says why
    say(
        "starting the local Kafka and Redis"
        + (" (fetching the Kafka jars first, about 45 MB)" if fetches else "")
    )
    info = await loop.run_in_executor(None, holder.__enter__)
    try:
        stack.warn_settings_replaced(settings, info, "demo")
        on_stack = own_run_settings(
            settings.model_copy(
                update={
                    "kafka": settings.kafka.model_copy(
                        update={"bootstrap": info.kafka_bootstrap}
                    ),
                    "redis": settings.redis.model_copy(update={"url": info.redis_url}),
                }
            )
        )
        topics = on_stack.kafka.topics
        say(f"topics of this run: {topics.requests} ... (alerts on {topics.alerts})")
        try:
            return await _run_demo(on_stack, report_dir, n_benign, quick, seed, say)
        finally:
            with contextlib.suppress(BrokerError):
                await delete_topics(on_stack, run_topics(on_stack))
    finally:
        await loop.run_in_executor(None, holder.__exit__, None, None, None)


async def _run_demo(
    settings: Settings,
    report_dir: Path,
    n_benign: int,
    quick: bool,
    seed: int,
    say: Progress,
) -> int:
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    loop = asyncio.get_running_loop()
    plan = DemoPlan.build(
        n_benign=n_benign,
        quick=quick,
        seed=seed,
        rate_limit_per_s=settings.limits.rate_per_s,
    )
    run = _Run(
        settings=settings,
        plan=plan,
        # Fresh client ids every run: blocks and detector state from an earlier
        # run (kept in Redis) must not carry over to this one.
        run_id=datetime.now(UTC).strftime("%H%M%S") + "-" + secrets.token_hex(2),
        seed=seed,
        quick=quick,
        say=say,
        loop=loop,
    )
    await loop.run_in_executor(
        None, lambda: report_dir.mkdir(parents=True, exist_ok=True)
    )
    say(
        f"demo {run.run_id}: {plan.n_benign} benign clients, 1 extraction and "
        f"1 probing attacker{' (quick)' if quick else ''}"
    )

    # Step: topics, the model, and the data split the model was not trained on.
    await ensure_topics(settings)
    model = await loop.run_in_executor(None, _load_digits, settings.models.directory)
    _, x_test, _, y_test = await loop.run_in_executor(None, digits_split)
    true_labels = model.predict_proba(x_test).argmax(axis=1)

    # Step: one API key per client.
    redis = Redis.from_url(
        settings.redis.url,
        socket_timeout=settings.redis.socket_timeout_s,
        socket_connect_timeout=settings.redis.socket_timeout_s,
        password=settings.redis.password_value(),
    )
    transport = KafkaTransport(settings)
    worker = WorkerProcess(settings, report_dir / "worker.log")
    collector: AlertCollector | None = None
    traffic_s = 0.0
    try:
        # KeyStore reads (or creates) the server key file: blocking I/O.
        store = await loop.run_in_executor(None, KeyStore, redis, settings)
        await _provision(run, store, transport)

        # Step: the worker, the transport and the alert watcher; then wait until
        # the worker answers, so start-up time is not counted as traffic.
        say(f"starting a worker process (log: {worker.log_path})")
        await worker.start()
        await transport.start()
        collector = AlertCollector(
            transport,
            settings.kafka.topics.alerts,
            run.ledgers,
            on_first_alert=lambda ledger, data: say(
                f"first alert for {ledger.role} client {ledger.client_id}: "
                f"{data.get('detector')} (action {data.get('action')}): "
                f"{data.get('evidence')}"
            ),
        )
        await collector.start()
        await _wait_until_serving(run, worker, x_test[0])

        # Step: all traffic at once.
        traffic_started = time.monotonic()
        extraction, probing, seeds, targets = await _drive(
            run, worker, collector, x_test, y_test, true_labels
        )
        # Alerts are produced with the replies, but on another topic; give the
        # last ones a moment to arrive.
        await asyncio.sleep(plan.alert_grace_s)
        traffic_s = time.monotonic() - traffic_started
    finally:
        run.cancel.set()
        if collector is not None:
            await collector.stop()
        await transport.stop()
        worker_code = await worker.stop()
        await redis.aclose()

    # Step: the same attacks without the gateway, same budgets.
    say("running both attacks again directly against the model (baseline)")
    eval_mask = np.ones(len(x_test), dtype=bool)
    eval_mask[seeds] = False
    direct_extraction = await loop.run_in_executor(
        None,
        lambda: run_jacobian_extraction(
            DirectOracle(model.predict_proba, plan.extraction.budget),
            x_test[seeds],
            x_test[eval_mask],
            true_labels[eval_mask],
            plan.extraction,
        ),
    )
    direct_probing = await loop.run_in_executor(
        None,
        lambda: run_hopskipjump(
            DirectOracle(model.predict_proba, plan.probing.budget),
            x_test,
            targets,
            true_labels,
            plan.probing,
        ),
    )

    # Step: the report.
    result = _result(
        run,
        started_at=started_at,
        duration_s=time.monotonic() - started,
        traffic_s=traffic_s,
        extraction=(extraction, direct_extraction),
        probing=(probing, direct_probing),
        collector=collector,
        worker_code=worker_code,
    )
    paths = await loop.run_in_executor(None, write_report, result, report_dir)
    say("")
    say(render_markdown(result))
    say(f"report: {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return exit_code(result)


def _load_digits(directory: Path) -> ServedModel:
    ensure_digits_model(directory)
    return load_model(directory, DIGITS)


async def _provision(run: _Run, store: KeyStore, transport: KafkaTransport) -> None:
    """Create one API key and one client per participant."""
    names = [(f"demo-{run.run_id}-warmup", "warmup")]
    names += [(f"demo-{run.run_id}-extractor", EXTRACTION)]
    names += [(f"demo-{run.run_id}-prober", PROBING)]
    names += [
        (f"demo-{run.run_id}-benign-{i:02d}", BENIGN) for i in range(run.plan.n_benign)
    ]
    for client_id, role in names:
        _, token = await store.create(client_id, models=(DIGITS,))
        key_id, secret = KeyStore.parse_token(token)
        run.clients[client_id] = GatewayClient(
            transport, key_id, secret, client_id, DIGITS
        )
        if role != "warmup":
            run.ledgers[client_id] = ClientLedger(client_id, role, key_id)
    run.say(f"provisioned {len(names)} API keys")


async def _wait_until_serving(run: _Run, worker: WorkerProcess, row: Array) -> None:
    """Send probe requests until the worker answers one.

    Raises ``WorkerProcessError`` if the worker exits, answers with an error
    that waiting will not fix, or stays silent past the plan's warm-up timeout.
    """
    client = run.clients[f"demo-{run.run_id}-warmup"]
    timeout_s = run.plan.warmup_timeout_s
    await wait_for_answer(
        client, row[None, :], worker, time.monotonic() + timeout_s, timeout_s
    )
    run.say("worker is serving")


async def _drive(
    run: _Run,
    worker: WorkerProcess,
    collector: AlertCollector,
    x_test: Array,
    y_test: Array,
    true_labels: Array,
) -> tuple[ExtractionResult, ProbingResult, Array, Array]:
    """Run benign clients and both attackers concurrently, with progress."""
    plan, rng = run.plan, np.random.default_rng(run.seed)
    settings = run.settings
    timeout_s = settings.kafka.request_timeout_s

    # The extraction attacker's public seed set: one digit per class, left out
    # of the agreement measurement. Probing targets: correctly classified
    # held-out digits outside the seed set.
    seeds = pick_seed_set(x_test, true_labels, 1, rng)
    eval_mask = np.ones(len(x_test), dtype=bool)
    eval_mask[seeds] = False
    candidates = np.flatnonzero(eval_mask & (true_labels == y_test))
    targets = rng.choice(candidates, size=plan.probing.n_targets, replace=False)

    extractor_id = f"demo-{run.run_id}-extractor"
    prober_id = f"demo-{run.run_id}-prober"

    def attacker_oracle(client_id: str, budget: int) -> GatewayOracle:
        return GatewayOracle(
            run.clients[client_id],
            run.ledgers[client_id],
            run.loop,
            budget=budget,
            rate_per_s=plan.attacker_rate_per_s,
            concurrency=plan.attacker_concurrency,
            timeout_s=timeout_s,
            cancel=run.cancel,
        )

    def on_round(rho: int, queries: int, agreement: float) -> None:
        run.extraction_status = f"round {rho + 1}, agreement {agreement:.2f}"

    def extraction_job() -> ExtractionResult:
        oracle = attacker_oracle(extractor_id, plan.extraction.budget)
        result = run_jacobian_extraction(
            oracle,
            x_test[seeds],
            x_test[eval_mask],
            true_labels[eval_mask],
            plan.extraction,
            on_round=on_round,
        )
        run.extraction_status = f"done ({result.stopped_by})"
        return result

    def probing_job() -> ProbingResult:
        oracle = attacker_oracle(prober_id, plan.probing.budget)
        result = run_hopskipjump(oracle, x_test, targets, true_labels, plan.probing)
        run.probing_status = f"done ({result.stopped_by or 'all inputs'})"
        return result

    async def in_thread(job: Callable[[], T]) -> T:
        await asyncio.sleep(plan.attack_delay_s)
        return await asyncio.to_thread(job)

    async def benign(client_id: str, profile_rng: np.random.Generator) -> None:
        profile = profiles.pop()
        order = profile_rng.permutation(len(x_test))[: profile.n_queries]
        await run_benign_client(
            run.clients[client_id],
            profile,
            x_test[order],
            run.ledgers[client_id],
            profile_rng,
            timeout_s=timeout_s,
        )
        run.benign_done += 1

    benign_ids = [ledger.client_id for ledger in run.of_role(BENIGN)]
    profiles = draw_profiles(
        len(benign_ids),
        rng,
        queries=plan.benign_queries,
        spread_s=plan.benign_spread_s,
    )
    run.benign_planned = sum(p.n_queries for p in profiles)
    child_rngs = rng.spawn(len(benign_ids))

    run.say(
        f"traffic: {len(benign_ids)} benign clients ({run.benign_planned} queries),"
        f" extraction budget {plan.extraction.budget},"
        f" probing budget {plan.probing.budget},"
        f" attackers paced at {plan.attacker_rate_per_s:.0f} req/s"
    )
    try:
        async with asyncio.TaskGroup() as group:
            work: list[asyncio.Task[Any]] = [
                group.create_task(benign(cid, crng))
                for cid, crng in zip(benign_ids, child_rngs, strict=True)
            ]
            extraction_task = group.create_task(in_thread(extraction_job))
            probing_task = group.create_task(in_thread(probing_job))
            work += [extraction_task, probing_task]
            group.create_task(_monitor(run, worker, collector, work))
    except BaseExceptionGroup as group_error:
        # Attack threads cannot be cancelled; this makes their next query stop.
        run.cancel.set()
        raise first_cause(group_error) from group_error
    return extraction_task.result(), probing_task.result(), seeds, targets


async def _monitor(
    run: _Run,
    worker: WorkerProcess,
    collector: AlertCollector,
    work: list[asyncio.Task[Any]],
) -> None:
    """Print a progress line every few seconds until the work is done; fail the
    run at once if the worker process dies."""
    started = time.monotonic()
    last = started
    while not all(task.done() for task in work):
        await asyncio.sleep(0.5)
        worker.check_alive()
        if time.monotonic() - last < run.plan.progress_every_s:
            continue
        last = time.monotonic()
        run.say(_progress_line(run, collector, time.monotonic() - started))


def _progress_line(run: _Run, collector: AlertCollector, elapsed_s: float) -> str:
    benign = run.of_role(BENIGN)
    (extractor,) = run.of_role(EXTRACTION)
    (prober,) = run.of_role(PROBING)
    alerts = {
        role: sum(ledger.alerts for ledger in run.of_role(role))
        for role in (BENIGN, EXTRACTION, PROBING)
    }
    return (
        f"[{elapsed_s:5.0f}s] benign {sum(b.requests for b in benign)}"
        f"/{run.benign_planned} sent ({run.benign_done}/{len(benign)} done)"
        f" | extraction {extractor.requests} sent, {run.extraction_status}"
        f" | probing {prober.requests} sent, {run.probing_status}"
        f" | alerts {collector.total}: extraction {alerts[EXTRACTION]},"
        f" probing {alerts[PROBING]}, benign {alerts[BENIGN]}"
    )


def _result(
    run: _Run,
    *,
    started_at: str,
    duration_s: float,
    traffic_s: float,
    extraction: tuple[ExtractionResult, ExtractionResult],
    probing: tuple[ProbingResult, ProbingResult],
    collector: AlertCollector | None,
    worker_code: int | None,
) -> DemoResult:
    (extractor,) = run.of_role(EXTRACTION)
    (prober,) = run.of_role(PROBING)
    notes = []
    if worker_code not in (0, None):
        notes.append(f"the worker exited with code {worker_code} on SIGTERM")
    if collector is not None and collector.foreign:
        notes.append(
            f"{collector.foreign} alerts named clients outside this run "
            "(another process on the same topics)"
        )
    return DemoResult(
        run_id=run.run_id,
        quick=run.quick,
        seed=run.seed,
        started_at=started_at,
        duration_s=duration_s,
        traffic_s=traffic_s,
        clients=[ledger.summary() for ledger in run.ledgers.values()],
        extraction={
            "client": extractor.client_id,
            "budget": run.plan.extraction.budget,
            "first_alert_query": extractor.first_alert_query,
            "first_refusal_query": extractor.first_refusal_query,
            "gateway": extraction[0].to_dict(),
            "direct": extraction[1].to_dict(),
        },
        probing={
            "client": prober.client_id,
            "budget": run.plan.probing.budget,
            "first_alert_query": prober.first_alert_query,
            "first_refusal_query": prober.first_refusal_query,
            "gateway": probing[0].to_dict(),
            "direct": probing[1].to_dict(),
        },
        alerts={
            "total": 0 if collector is None else collector.total,
            "foreign": 0 if collector is None else collector.foreign,
            "by_detector": {} if collector is None else dict(collector.by_detector),
        },
        worker_exit_code=worker_code,
        notes=notes,
    )
