"""The evaluation (``modelgate eval``): every listed attack, single-key and
spread over 10 keys, through a real worker, beside an honest population.

Steps: hold the local stack (or use the given services), give the run its own
topics, build the models into ``models.directory``, create one API key per
honest client and per attacker key, start one worker serving the chosen
models, then drive at once

- at least 50 honest clients (``benign.run_benign_stream``) replaying each
  model's held-out data with uneven rates, bursts, retries of the same request
  and runs of near-identical inputs, for as long as the attacks last;
- every (attack, model) pair twice, from one key and from 10 keys
  (``attacks.distributed.SpreadOracle``), a few at a time;

while two consumers credit every alert and every decision record to its
client. Then each pair runs again straight against the model with the same
budget (the "without the gateway" baseline), and ``eval_report`` writes the
report. Everything goes through Kafka and the worker as an ordinary client's
traffic would; models are loaded here only for ground truth and baselines.

The plan and the run's shared state are in ``evaluation._evalplan``
(:class:`EvalPlan` re-exported here), the traffic (keys, honest clients,
attacks, progress) in ``evaluation._evaldrive``. Imports the gateway's
client-side modules, never ``gateway.worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis

from evaluation._evaldrive import RunningWorker, drive, provision, wait_until_serving
from evaluation._evalplan import N_DISTRIBUTED_KEYS, AttackRun, EvalRun, Progress
from evaluation._evalplan import EvalPlan as EvalPlan
from evaluation.eval_report import EvalResult, write_eval_report
from evaluation.observe import AlertCollector, DecisionCollector
from evaluation.oracle import DirectOracle
from evaluation.process import WorkerProcess
from evaluation.runkit import own_run_settings
from evaluation.scenarios import (
    PROBING_ATTACKS,
    ModelTask,
    budget_of,
    build_task,
    honest_opening,
    run_attack,
    select_pairs,
)
from gateway.client import KafkaTransport
from gateway.config import Settings
from gateway.errors import BrokerError
from gateway.keys import KeyStore
from gateway.models import load_model
from gateway.topics import delete_topics, ensure_topics, run_topics
from gateway.zoo import ensure_model

logger = logging.getLogger(__name__)
Array = np.ndarray[Any, Any]


def _say(line: str) -> None:
    logger.info("%s", line)


async def run_eval(
    settings: Settings,
    out_dir: Path,
    *,
    models: tuple[str, ...] | None = None,
    attacks: tuple[str, ...] | None = None,
    n_benign: int = 60,
    budget: int | None = None,
    quick: bool = False,
    seed: int = 0,
    use_stack: bool = True,
    progress: Progress | None = None,
    near_duplicates: bool = True,
    external_worker: bool = False,
    attacker_arrivals: str = "paced",
) -> int:
    """Run the evaluation and write its report; return the exit code.

    Parameters
    ----------
    settings
        Gateway settings; with ``use_stack`` the Kafka and Redis addresses are
        replaced by the local stack's. Topics are always this run's own.
    out_dir
        Receives report.md, report.json, the PNG plots and worker.log.
    models, attacks
        Restrict the run (see ``scenarios.select_pairs``); None means default.
    n_benign
        Honest clients (quick runs use at most 8).
    budget
        Queries per attack run, for every attack but equation solving (always
        d + 1); None keeps the plan's budgets (600 image extraction, 300
        tabular extraction, 500 probing; a fifth of that when quick).
    external_worker
        Use a worker that is already running on ``settings``' topics (it must
        serve the chosen models and share the server key) instead of starting
        one on topics of this run's own.
    quick
        The small version for the integration test.
    seed
        Seeds traffic habits, attack choices and surrogates.
    use_stack
        Start (or join) the local stack; False uses ``settings`` as given.
    progress
        Receives progress lines (logged at INFO by default).
    near_duplicates
        Whether some honest clients send runs of near-identical inputs (the
        habit today's similarity detector mistakes for probing; see
        docs/evaluation.md). On for the real measurement.
    attacker_arrivals
        ``paced`` (exact spacing) or ``poisson`` (see :class:`EvalPlan`).

    Returns
    -------
    int
        0 when no honest client was throttled or blocked, 1 otherwise. Missed
        detection targets do not fail the run: they are the measurement.

    Raises
    ------
    ValueError
        An unknown model or attack name.
    WorkerProcessError
        The worker did not start serving, or died during the run.
    """
    pairs = select_pairs(models, attacks)
    if not pairs:
        raise ValueError("no (attack, model) pair matches the selection")
    plan = EvalPlan.build(
        quick=quick,
        n_benign=n_benign,
        budget=budget,
        rate_limit_per_s=settings.limits.rate_per_s,
        near_duplicates=near_duplicates,
        attacker_arrivals=attacker_arrivals,
    )
    loop = asyncio.get_running_loop()
    say = progress or _say
    if external_worker:
        missing = sorted({m for _, m in pairs} - set(settings.models.serve))
        if missing:
            raise ValueError(f"the running worker does not serve {missing}")
        say(f"using the running worker on {settings.kafka.topics.requests}")
        return await _evaluate(
            settings, out_dir, pairs, plan, quick, seed, say, external=True
        )
    if not use_stack:
        return await _with_topics(settings, out_dir, pairs, plan, quick, seed, say)

    from gateway import stack

    holder = stack.hold(holder=f"eval-{os.getpid()}")
    say("starting (or joining) the local Kafka and Redis")
    info = await loop.run_in_executor(None, holder.__enter__)
    try:
        stack.warn_settings_replaced(settings, info, "eval")
        on_stack = settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(
                    update={"bootstrap": info.kafka_bootstrap}
                ),
                "redis": settings.redis.model_copy(update={"url": info.redis_url}),
            }
        )
        return await _with_topics(on_stack, out_dir, pairs, plan, quick, seed, say)
    finally:
        await loop.run_in_executor(None, holder.__exit__, None, None, None)


async def _with_topics(
    settings: Settings,
    out_dir: Path,
    pairs: list[tuple[str, str]],
    plan: EvalPlan,
    quick: bool,
    seed: int,
    say: Progress,
) -> int:
    # Own topics and group: a worker already running on the default topics
    # must not take this run's requests.
    own = own_run_settings(settings)
    served = sorted({model for _, model in pairs})
    own = own.model_copy(
        update={"models": own.models.model_copy(update={"serve": served})}
    )
    try:
        return await _evaluate(own, out_dir, pairs, plan, quick, seed, say)
    finally:
        with contextlib.suppress(BrokerError):
            await delete_topics(own, run_topics(own))


async def _evaluate(
    settings: Settings,
    out_dir: Path,
    pairs: list[tuple[str, str]],
    plan: EvalPlan,
    quick: bool,
    seed: int,
    say: Progress,
    *,
    external: bool = False,
) -> int:
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_at_start = _load_average()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: out_dir.mkdir(parents=True, exist_ok=True))

    # Step: the models, on disk for the worker and in memory for ground truth.
    say(f"building models {', '.join(settings.models.serve)}")

    def load_tasks() -> dict[str, ModelTask]:
        tasks = {}
        for name in settings.models.serve:
            ensure_model(settings.models.directory, name)
            model = load_model(settings.models.directory, name)
            tasks[name] = build_task(name, model, seed, plan.budgets.probing_targets)
        return tasks

    run = EvalRun(
        settings=settings,
        plan=plan,
        # Fresh client ids every run: blocks and detector state kept in Redis
        # from an earlier run must not carry over.
        run_id=datetime.now(UTC).strftime("%H%M%S") + "-" + secrets.token_hex(2),
        seed=seed,
        say=say,
        loop=loop,
        tasks=await loop.run_in_executor(None, load_tasks),
    )
    await ensure_topics(settings)

    redis = Redis.from_url(
        settings.redis.url,
        socket_timeout=settings.redis.socket_timeout_s,
        socket_connect_timeout=settings.redis.socket_timeout_s,
        password=settings.redis.password_value(),
    )
    transport = KafkaTransport(settings)
    worker: WorkerProcess | RunningWorker = (
        RunningWorker(out_dir / "worker.log")
        if external
        else WorkerProcess(settings, out_dir / "worker.log")
    )
    alerts: AlertCollector | None = None
    decisions: DecisionCollector | None = None
    traffic_s = 0.0
    load_at_end: float | None = None
    try:
        store = await loop.run_in_executor(None, KeyStore, redis, settings)
        await provision(run, store, transport, pairs)
        say(
            f"eval {run.run_id}: {plan.n_benign} honest clients, {len(run.attacks)}"
            f" attack runs ({len(pairs)} pairs x single/10 keys){' (quick)' * quick}"
        )
        if not external:
            say(f"starting a worker process (log: {worker.log_path})")
        await worker.start()
        await transport.start()
        t0_ms = int(time.time() * 1000)
        alerts = AlertCollector(transport, settings.kafka.topics.alerts, run.by_client)
        decisions = DecisionCollector(
            transport, settings.kafka.topics.decisions, run.by_client, t0_ms=t0_ms
        )
        await alerts.start()
        await decisions.start()
        await wait_until_serving(run, worker)
        decisions.t0_ms = int(time.time() * 1000)

        traffic_started = time.monotonic()
        await drive(run, worker, alerts)
        await asyncio.sleep(plan.grace_s)
        traffic_s = time.monotonic() - traffic_started
        load_at_end = _load_average()
    finally:
        run.cancel.set()
        run.benign_stop.set()
        for collector in (alerts, decisions):
            if collector is not None:
                await collector.stop()
        await transport.stop()
        worker_code = await worker.stop()
        await redis.aclose()

    # Step: the same attacks straight against the models, same budgets.
    say("running every attack again directly against its model (baseline)")
    direct = await loop.run_in_executor(None, _baselines, run, pairs)

    result = EvalResult(
        run_id=run.run_id,
        quick=quick,
        seed=seed,
        started_at=started_at,
        duration_s=time.monotonic() - started,
        machine={
            "cores": os.cpu_count(),
            "load_average_start": load_at_start,
            "load_average_end": load_at_end,
        },
        traffic_s=traffic_s,
        plan=_plan_dict(plan, run),
        policy=settings.policy.model_dump(mode="json"),
        detectors=dict(settings.detectors),
        attacks=[
            _attack_dict(
                a,
                direct[(a.attack, a.model)],
                run.tasks[a.model],
                honest_opening(
                    a.attack, run.tasks[a.model], run.plan.budgets, run.seed
                ),
            )
            for a in run.attacks
        ],
        clients=[
            {
                **ledger.summary(),
                "model": run.benign_models.get(ledger.client_id),
                "habits": run.benign_habits.get(ledger.client_id),
                "risk_series": list(ledger.risk_series),
            }
            for ledger in run.ledgers.values()
        ],
        alerts_by_detector={} if alerts is None else dict(alerts.by_detector),
        decisions_by_action={} if decisions is None else dict(decisions.by_action),
        worker_exit_code=worker_code,
    )
    paths = await loop.run_in_executor(None, write_eval_report, result, out_dir)
    say(f"report: {', '.join(str(p) for p in paths.values())}")
    return result.exit_code()


def _baselines(
    run: EvalRun, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each pair straight against its model, same budget (blocking; CPU)."""
    out = {}
    for attack, model in pairs:
        task = run.tasks[model]
        budget = budget_of(attack, task, run.plan.budgets)
        oracle = DirectOracle(
            task.model.predict_proba, budget, n_classes=task.n_classes
        )
        out[(attack, model)] = run_attack(
            attack, oracle, task, run.plan.budgets, run.seed
        )
    return out


def _attack_dict(
    attack: AttackRun, direct: dict[str, Any], task: ModelTask, opening: int
) -> dict[str, Any]:
    summary = attack.ledger.summary()
    counts = np.bincount(task.eval_labels)
    return {
        # Agreement of a copy that always answers the most common class.
        "majority_rate": round(float(counts.max() / counts.sum()), 4),
        # Opening queries that are rows of the honest population's data.
        "honest_opening": opening,
        "attack": attack.attack,
        "model": attack.model,
        "variant": attack.variant,
        "kind": "probing" if attack.attack in PROBING_ATTACKS else "extraction",
        "keys": len(attack.client_ids),
        "budget": attack.budget,
        "client": attack.ledger.client_id,
        "error": attack.error,
        "ledger": summary,
        "flagged": summary["first_flag_query"] is not None or summary["alerts"] > 0,
        "first_flag_query": summary["first_flag_query"],
        "first_enforced_query": summary["first_enforced_query"],
        "gateway": attack.outcome,
        "direct": direct,
        "pacing_lag_ms": attack.pacing,
    }


def _load_average() -> float | None:
    """The one-minute load average, or None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _plan_dict(plan: EvalPlan, run: EvalRun) -> dict[str, Any]:
    return {
        "n_benign": plan.n_benign,
        "benign_queries": list(plan.benign_queries),
        "benign_median_rate_per_s": plan.benign_median_rate_per_s,
        "benign_near_duplicates": plan.near_duplicates,
        "benign_min_s": plan.min_benign_s,
        "attack_lead_answers": plan.attack_lead_answers,
        "attacker_arrivals": plan.attacker_arrivals,
        "budgets": {
            "extraction_images": plan.budgets.extraction,
            "extraction_tabular": plan.budgets.tabular_extraction,
            "probing": plan.budgets.probing,
            "probing_targets": plan.budgets.probing_targets,
            "equation": "d + 1",
        },
        "attacker_rate_per_s": plan.attacker_rate_per_s,
        "distributed_keys": N_DISTRIBUTED_KEYS,
        "parallel_attacks": plan.parallel_attacks,
        "models": {
            name: {
                "features": task.n_features,
                "classes": task.n_classes,
                "range": list(task.clip),
                "pool": len(task.pool),
                "eval": len(task.eval_x),
            }
            for name, task in run.tasks.items()
        },
    }
