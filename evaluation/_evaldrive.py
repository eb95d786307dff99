"""The traffic of one evaluation run (:mod:`evaluation.harness`): an API key
per client (:func:`provision`), waiting for the worker to serve
(:func:`wait_until_serving`), then the honest clients and the attacks at
once (:func:`drive`), with the attacks held back until honest traffic has
warmed the gateway (:func:`honest_lead`) and a progress line every few
seconds (:func:`monitor`).

Imports the gateway's client-side modules and the evaluation's own; never
``gateway.worker``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from pathlib import Path

import numpy as np

from evaluation._evalplan import (
    BENIGN,
    DISTRIBUTED,
    N_DISTRIBUTED_KEYS,
    SINGLE,
    AttackRun,
    EvalRun,
)
from evaluation.attacks.distributed import SpreadOracle
from evaluation.attacks.probing import preload_art
from evaluation.benign import draw_habits, draw_profiles, run_benign_stream
from evaluation.ledger import ClientLedger
from evaluation.observe import AlertCollector
from evaluation.oracle import GatewayOracle, QueryFn, pacing_summary
from evaluation.process import WorkerProcess
from evaluation.runkit import first_cause, wait_for_answer
from evaluation.scenarios import PROBING_ATTACKS, budget_of, run_attack
from gateway.client import GatewayClient, GatewayRequestError, KafkaTransport
from gateway.keys import KeyStore

logger = logging.getLogger(__name__)


class RunningWorker:
    """Stands in for ``WorkerProcess`` when the worker was started elsewhere:
    nothing to start, stop or watch (its log is wherever it was sent)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    async def start(self) -> None:
        """Nothing to start."""

    def check_alive(self) -> None:
        """A worker elsewhere cannot be watched; a dead one shows as timeouts."""

    def log_tail(self) -> str:
        return "(the worker runs elsewhere; see its own log)"

    async def stop(self) -> int | None:
        return None


async def provision(
    run: EvalRun,
    store: KeyStore,
    transport: KafkaTransport,
    pairs: list[tuple[str, str]],
) -> None:
    """One API key per honest client, per single-key attacker and per key of a
    distributed attacker (all 10 keys of one attacker share one ledger, so its
    query positions count its whole stream)."""
    models = list(run.tasks)

    async def key(client_id: str, model: str) -> None:
        _, token = await store.create(client_id, models=(model,))
        key_id, secret = KeyStore.parse_token(token)
        run.clients[client_id] = GatewayClient(
            transport,
            key_id,
            secret,
            client_id,
            model,
            input_name=run.tasks[model].input_name,
        )

    for model in models:
        await key(f"eval-{run.run_id}-warmup-{model}", model)
    for i in range(run.plan.n_benign):
        model = models[i % len(models)]
        client_id = f"eval-{run.run_id}-benign-{i:02d}"
        await key(client_id, model)
        ledger = ClientLedger(client_id, BENIGN)
        run.ledgers[client_id] = run.by_client[client_id] = ledger
        run.benign_models[client_id] = model
    for attack, model in pairs:
        for variant, n_keys in ((SINGLE, 1), (DISTRIBUTED, N_DISTRIBUTED_KEYS)):
            base = f"eval-{run.run_id}-{attack}-{model}-{variant}".replace("_", "-")
            ids = [base] if n_keys == 1 else [f"{base}-k{k}" for k in range(n_keys)]
            ledger = ClientLedger(base, f"{attack}/{variant}")
            for client_id in ids:
                await key(client_id, model)
                run.by_client[client_id] = ledger
            run.ledgers[base] = ledger
            run.attacks.append(
                AttackRun(
                    attack=attack,
                    model=model,
                    variant=variant,
                    client_ids=ids,
                    ledger=ledger,
                    budget=budget_of(attack, run.tasks[model], run.plan.budgets),
                )
            )
    run.say(f"provisioned {len(run.clients)} API keys")


async def wait_until_serving(
    run: EvalRun, worker: WorkerProcess | RunningWorker
) -> None:
    """Send a probe per model until the worker answers each one."""
    deadline = time.monotonic() + run.plan.warmup_timeout_s
    for name, task in run.tasks.items():
        client = run.clients[f"eval-{run.run_id}-warmup-{name}"]
        await wait_for_answer(
            client,
            task.eval_x[:1],
            worker,
            deadline,
            run.plan.warmup_timeout_s,
            what=f" for {name}",
        )
    run.say("worker is serving every model")


def oracle_for(
    run: EvalRun, attack: AttackRun
) -> tuple[QueryFn, SpreadOracle | None, list[GatewayOracle]]:
    task = run.tasks[attack.model]
    timeout_s = run.settings.kafka.request_timeout_s
    rate = run.plan.attacker_rate_per_s / len(attack.client_ids)
    poisson = run.plan.attacker_arrivals == "poisson"
    # One generator per key, seeded by the run and the key's name.
    oracles = [
        GatewayOracle(
            run.clients[client_id],
            attack.ledger,
            run.loop,
            budget=attack.budget,
            rate_per_s=rate,
            concurrency=8,
            timeout_s=timeout_s,
            cancel=run.cancel,
            n_classes=task.n_classes,
            arrival_rng=np.random.default_rng(
                [run.seed, zlib.crc32(client_id.encode())]
            )
            if poisson
            else None,
        )
        for client_id in attack.client_ids
    ]
    if len(oracles) == 1:
        return oracles[0], None, oracles
    spread = SpreadOracle(
        oracles, budget=attack.budget, seed=run.seed, n_classes=task.n_classes
    )
    return spread, spread, oracles


def attack_job(run: EvalRun, attack: AttackRun) -> None:
    """Run one attack through the gateway (in a thread)."""
    query, spread, oracles = oracle_for(run, attack)
    attack.status = "running"
    try:
        attack.outcome = run_attack(
            attack.attack, query, run.tasks[attack.model], run.plan.budgets, run.seed
        )
        attack.status = f"done ({attack.outcome.get('stopped_by') or 'finished'})"
    except GatewayRequestError as exc:
        # A timeout or a validation error is the harness's fault, not the
        # attacker being stopped: record it and let the others go on.
        attack.error = f"{exc.code}: {exc}"
        attack.status = f"failed ({exc.code})"
        logger.warning("attack failed", extra={"attack": attack.name, "code": exc.code})
    except Exception as exc:  # a bug in one attack must not lose the other runs
        attack.error = f"{type(exc).__name__}: {exc}"
        attack.status = "failed"
        logger.exception("attack crashed", extra={"attack": attack.name})
    finally:
        if spread is not None:
            spread.close()
        attack.pacing = pacing_summary([oracle.pacer for oracle in oracles])
    run.say(
        f"{attack.name}: {attack.status}; first flag at query "
        f"{attack.ledger.first_flag_query}, enforcement at "
        f"{attack.ledger.first_enforced_query}"
    )


async def drive(
    run: EvalRun, worker: WorkerProcess | RunningWorker, alerts: AlertCollector
) -> None:
    """Honest clients for as long as the attacks last; the attacks a few at a
    time; a progress line every few seconds."""
    plan, rng = run.plan, np.random.default_rng(run.seed)
    benign_ids = [c for c, ledger in run.ledgers.items() if ledger.role == BENIGN]
    profiles = draw_profiles(
        len(benign_ids),
        rng,
        queries=plan.benign_queries,
        spread_s=plan.benign_spread_s,
        median_rate_per_s=plan.benign_median_rate_per_s,
        rate_bounds=(0.3, 10.0),
    )
    child_rngs = rng.spawn(len(benign_ids))
    gate = asyncio.Semaphore(plan.parallel_attacks)
    timeout_s = run.settings.kafka.request_timeout_s

    async def benign(index: int, client_id: str) -> None:
        model = run.benign_models[client_id]
        task = run.tasks[model]
        crng = child_rngs[index]
        spans = tuple(float(v) for v in np.ptp(task.replay, axis=0))
        habits = draw_habits(
            1,
            crng,
            task.clip,
            near_duplicates=plan.near_duplicates,
            feature_spans=spans,
        )[0]
        run.benign_habits[client_id] = {
            "retries": habits.retry_prob > 0,
            "near_duplicates": habits.near_duplicate_prob > 0,
        }
        rows = task.replay[crng.permutation(len(task.replay))]
        await run_benign_stream(
            run.clients[client_id],
            profiles[index],
            habits,
            rows,
            run.ledgers[client_id],
            crng,
            timeout_s=timeout_s,
            stop=run.benign_stop,
        )

    lead = asyncio.Event()

    async def attack_task(attack: AttackRun) -> None:
        await lead.wait()
        async with gate:
            await asyncio.to_thread(attack_job, run, attack)

    if any(a.attack in PROBING_ATTACKS for a in run.attacks):
        await asyncio.to_thread(preload_art)
    # Probing and equation solving first: short runs, and their flags are the
    # ones with tight targets.
    order = sorted(
        run.attacks,
        key=lambda a: (a.attack not in PROBING_ATTACKS and a.attack != "equation",),
    )
    try:
        async with asyncio.TaskGroup() as group:
            for i, client_id in enumerate(benign_ids):
                group.create_task(benign(i, client_id))
            attack_tasks = [group.create_task(attack_task(a)) for a in order]
            group.create_task(honest_lead(run, benign_ids, lead))
            group.create_task(monitor(run, worker, alerts, attack_tasks))
    except BaseExceptionGroup as group_error:
        run.cancel.set()
        raise first_cause(group_error) from group_error


async def honest_lead(run: EvalRun, benign_ids: list[str], lead: asyncio.Event) -> None:
    """Set ``lead`` once honest clients of every model have been answered
    ``attack_lead_answers`` times, or after ``attack_lead_timeout_s`` (with a
    warning: the run then measures a colder gateway than planned)."""
    plan = run.plan
    wanted = set(run.benign_models[c] for c in benign_ids)
    deadline = time.monotonic() + plan.attack_lead_timeout_s
    while plan.attack_lead_answers > 0 and wanted:
        served = dict.fromkeys(wanted, 0)
        for client_id in benign_ids:
            served[run.benign_models[client_id]] += run.ledgers[client_id].allowed
        if min(served.values()) >= plan.attack_lead_answers:
            run.say(
                f"honest clients answered {min(served.values())}+ times per "
                f"model; the attacks begin"
            )
            break
        if time.monotonic() > deadline:
            logger.warning(
                "honest lead not reached; the attacks begin anyway",
                extra={"served": served, "wanted": plan.attack_lead_answers},
            )
            break
        await asyncio.sleep(0.2)
    lead.set()


async def monitor(
    run: EvalRun,
    worker: WorkerProcess | RunningWorker,
    alerts: AlertCollector,
    attack_tasks: list[asyncio.Task[None]],
) -> None:
    """Progress lines until every attack is done and the plan's minimum of
    honest traffic has run; then stop the honest clients. Fails the run at
    once if the worker dies."""
    started = time.monotonic()
    last = started
    shown = False
    while (
        not shown
        or not all(task.done() for task in attack_tasks)
        or (time.monotonic() - started < run.plan.min_benign_s)
    ):
        await asyncio.sleep(0.5)
        worker.check_alive()
        # At least one line even when every attack is refused at once and
        # the run is over before the first interval.
        finished = all(task.done() for task in attack_tasks) and (
            time.monotonic() - started >= run.plan.min_benign_s
        )
        if time.monotonic() - last < run.plan.progress_every_s and not finished:
            continue
        last = time.monotonic()
        shown = True
        benign = [ledger for ledger in run.ledgers.values() if ledger.role == BENIGN]
        done = sum(task.done() for task in attack_tasks)
        running = [a.name for a in run.attacks if a.status == "running"]
        run.say(
            f"[{time.monotonic() - started:5.0f}s] attacks {done}/{len(attack_tasks)}"
            f" done, running: {', '.join(running) or '-'} | honest queries "
            f"{sum(b.requests for b in benign)}, flagged clients "
            f"{sum(b.first_flag_query is not None for b in benign)} | alerts "
            f"{alerts.total}"
        )
    run.benign_stop.set()
