"""What one evaluation run (:mod:`evaluation.harness`) is made of: its plan
(sizes, budgets, timings: :class:`EvalPlan`), its attack runs
(:class:`AttackRun`) and the state the run's steps share (:class:`EvalRun`).

``EvalPlan`` is re-exported from :mod:`evaluation.harness`. Imports the
gateway's client-side modules and the evaluation's own; never
``gateway.worker``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evaluation.ledger import ClientLedger
from evaluation.scenarios import Budgets, ModelTask
from gateway.client import GatewayClient
from gateway.config import Settings

ARRIVALS = ("paced", "poisson")
"""How attackers may space their queries (``EvalPlan.attacker_arrivals``)."""

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
class EvalRun:
    """What the steps of one run share: its settings, plan and models, the
    API keys and ledgers of its clients, its attack runs, and the events that
    stop its traffic."""

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
