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

Imports the gateway's client-side modules, never ``gateway.worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis

from evaluation.attacks.distributed import SpreadOracle
from evaluation.attacks.probing import preload_art
from evaluation.benign import draw_habits, draw_profiles, run_benign_stream
from evaluation.eval_report import EvalResult, write_eval_report
from evaluation.ledger import ClientLedger
from evaluation.observe import AlertCollector, DecisionCollector
from evaluation.oracle import DirectOracle, GatewayOracle, QueryFn, pacing_summary
from evaluation.process import WorkerProcess
from evaluation.runkit import (
    first_cause,
    own_run_settings,
    wait_for_answer,
)
from evaluation.scenarios import (
    PROBING_ATTACKS,
    Budgets,
    ModelTask,
    budget_of,
    build_task,
    honest_opening,
    run_attack,
    select_pairs,
)
from gateway.client import GatewayClient, GatewayRequestError, KafkaTransport
from gateway.config import Settings
from gateway.errors import BrokerError
from gateway.keys import KeyStore
from gateway.models import load_model
from gateway.topics import delete_topics, ensure_topics, run_topics
from gateway.zoo import ensure_model

logger = logging.getLogger(__name__)

ARRIVALS = ("paced", "poisson")
"""How attackers may space their queries (``EvalPlan.attacker_arrivals``)."""

Array = np.ndarray[Any, Any]
Progress = Callable[[str], None]

BENIGN = "benign"
SINGLE = "single"
DISTRIBUTED = "distributed"
N_DISTRIBUTED_KEYS = 10


@dataclass(frozen=True)
class EvalPlan:
    """Sizes and timings of one evaluation run.

    The full run (60 honest clients for at least 150 s, the default pairs,
    budgets of 600/300/500 queries) takes about 3.5 minutes on 2 shared cores;
    ``quick`` is the integration test's version (8 clients, a fifth of the
    budgets, honest traffic only while the attacks last).
    """

    n_benign: int
    benign_queries: tuple[int, int]
    benign_median_rate_per_s: float
    benign_spread_s: float
    budgets: Budgets
    attacker_rate_per_s: float
    parallel_attacks: int
    warmup_timeout_s: float
    grace_s: float
    progress_every_s: float
    near_duplicates: bool = True
    # Honest traffic lasts at least this long even when the attacks end
    # sooner (most are blocked within seconds), so that the false-positive
    # rates rest on a few hundred queries per client rather than a few dozen.
    min_benign_s: float = 0.0
    # The attacks begin once honest clients of every model have been answered
    # this many times, as they would strike a gateway in service: detectors
    # whose baselines learn from live honest traffic (margin's rank test
    # needs 512 answers) are blind on a worker that has served none.
    attack_lead_answers: int = 0
    attack_lead_timeout_s: float = 120.0
    # How attackers space their queries: "paced" exactly (a plain script) or
    # "poisson" (exponential gaps of the same mean, the honest clients' kind
    # of timing, so that timing alone does not give them away).
    attacker_arrivals: str = "paced"

    @classmethod
    def build(
        cls,
        *,
        quick: bool,
        n_benign: int,
        budget: int | None,
        rate_limit_per_s: float,
        near_duplicates: bool = True,
        attacker_arrivals: str = "paced",
    ) -> EvalPlan:
        """Attackers pace themselves at 80% of the per-key rate limit (at most
        40 per second), so that a plain rate limit is not what stops them; a
        distributed attacker keeps the same total pace over its 10 keys.

        Raises
        ------
        ValueError
            ``attacker_arrivals`` other than ``paced`` or ``poisson``.
        """
        if attacker_arrivals not in ARRIVALS:
            raise ValueError(
                f"attacker arrivals must be one of {', '.join(ARRIVALS)}, "
                f"not {attacker_arrivals!r}"
            )
        rate = min(40.0, 0.8 * rate_limit_per_s)
        if quick:
            return cls(
                n_benign=max(2, min(n_benign, 8)),
                benign_queries=(30, 60),
                benign_median_rate_per_s=4.0,
                benign_spread_s=3.0,
                budgets=Budgets().scaled(0.2)
                if budget is None
                else Budgets.flat(budget),
                attacker_rate_per_s=rate,
                parallel_attacks=4,
                warmup_timeout_s=60.0,
                grace_s=2.0,
                progress_every_s=3.0,
                near_duplicates=near_duplicates,
                attacker_arrivals=attacker_arrivals,
            )
        return cls(
            n_benign=n_benign,
            benign_queries=(300, 600),
            benign_median_rate_per_s=1.5,
            benign_spread_s=10.0,
            budgets=Budgets() if budget is None else Budgets.flat(budget),
            attacker_rate_per_s=rate,
            parallel_attacks=4,
            warmup_timeout_s=120.0,
            grace_s=3.0,
            progress_every_s=10.0,
            near_duplicates=near_duplicates,
            min_benign_s=150.0,
            attack_lead_answers=600,
            attacker_arrivals=attacker_arrivals,
        )


@dataclass
class AttackRun:
    """One attack on one model from one or from 10 keys."""

    attack: str
    model: str
    variant: str
    client_ids: list[str]
    ledger: ClientLedger
    budget: int
    status: str = "waiting"
    outcome: dict[str, Any] | None = None
    error: str | None = None
    pacing: dict[str, float] | None = None

    @property
    def name(self) -> str:
        return f"{self.attack}@{self.model}/{self.variant}"


@dataclass
class _Run:
    settings: Settings
    plan: EvalPlan
    run_id: str
    seed: int
    say: Progress
    loop: asyncio.AbstractEventLoop
    tasks: dict[str, ModelTask]
    cancel: threading.Event = field(default_factory=threading.Event)
    benign_stop: asyncio.Event = field(default_factory=asyncio.Event)
    ledgers: dict[str, ClientLedger] = field(default_factory=dict)
    by_client: dict[str, ClientLedger] = field(default_factory=dict)
    clients: dict[str, GatewayClient] = field(default_factory=dict)
    benign_models: dict[str, str] = field(default_factory=dict)
    benign_habits: dict[str, dict[str, bool]] = field(default_factory=dict)
    attacks: list[AttackRun] = field(default_factory=list)


class _RunningWorker:
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

    run = _Run(
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
    )
    transport = KafkaTransport(settings)
    worker: WorkerProcess | _RunningWorker = (
        _RunningWorker(out_dir / "worker.log")
        if external
        else WorkerProcess(settings, out_dir / "worker.log")
    )
    alerts: AlertCollector | None = None
    decisions: DecisionCollector | None = None
    traffic_s = 0.0
    load_at_end: float | None = None
    try:
        store = await loop.run_in_executor(None, KeyStore, redis, settings)
        await _provision(run, store, transport, pairs)
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
        await _wait_until_serving(run, worker)
        decisions.t0_ms = int(time.time() * 1000)

        traffic_started = time.monotonic()
        await _drive(run, worker, alerts)
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


async def _provision(
    run: _Run, store: KeyStore, transport: KafkaTransport, pairs: list[tuple[str, str]]
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


async def _wait_until_serving(
    run: _Run, worker: WorkerProcess | _RunningWorker
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


def _oracle_for(
    run: _Run, attack: AttackRun
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


def _attack_job(run: _Run, attack: AttackRun) -> None:
    """Run one attack through the gateway (in a thread)."""
    query, spread, oracles = _oracle_for(run, attack)
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


async def _drive(
    run: _Run, worker: WorkerProcess | _RunningWorker, alerts: AlertCollector
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
            await asyncio.to_thread(_attack_job, run, attack)

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
            group.create_task(_honest_lead(run, benign_ids, lead))
            group.create_task(_monitor(run, worker, alerts, attack_tasks))
    except BaseExceptionGroup as group_error:
        run.cancel.set()
        raise first_cause(group_error) from group_error


async def _honest_lead(run: _Run, benign_ids: list[str], lead: asyncio.Event) -> None:
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


async def _monitor(
    run: _Run,
    worker: WorkerProcess | _RunningWorker,
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


def _baselines(
    run: _Run, pairs: list[tuple[str, str]]
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


def _plan_dict(plan: EvalPlan, run: _Run) -> dict[str, Any]:
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
