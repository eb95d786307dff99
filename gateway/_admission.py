"""What admission decides, apart from Redis: the request to admit
(:class:`AdmitItem`), the decision (:class:`Admission`, parsed from the
script's reply by :func:`parse_reply`), the GCRA step the script takes
(:func:`gcra`, a Python reference) and a plan with a key's overrides turned
into script arguments (:func:`compile_plan`, :func:`apply_overrides`).

Re-exported from :mod:`gateway.store`, whose :class:`~gateway.store.CounterStore`
runs the admission script. Imports the gateway's config and errors only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from gateway.config import FailMode, LimitsConfig, PlanConfig
from gateway.errors import StoreError

# Client ids become part of key names: no ':' or braces, so a client id cannot
# forge another client's hash tag or key path.
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")

Outcome = Literal[
    "ok",
    "redelivery",
    "duplicate",
    "rate_limited",
    "blocked",
    "quota_exceeded",
    "too_many_in_flight",
    "store_unavailable",
]
_OUTCOMES: dict[str, Outcome] = {
    "ok": "ok",
    "redelivery": "redelivery",
    "duplicate": "duplicate",
    "rate_limited": "rate_limited",
    "blocked": "blocked",
    "quota_exceeded": "quota_exceeded",
    "too_many_in_flight": "too_many_in_flight",
}


def check_client_id(client_id: str) -> None:
    """Raise ``ValueError`` unless ``client_id`` may appear in Redis keys."""
    if not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise ValueError(f"client_id must match {CLIENT_ID_PATTERN.pattern}")


@dataclass(frozen=True, slots=True)
class AdmitItem:
    """One request to admit.

    Parameters
    ----------
    client_id
        The client, from its API key (never from the payload).
    request_id
        The client's request id; repeated ids are duplicates.
    delivery
        Identifies the Kafka record (``"partition:offset"``), to tell a
        redelivery of the same record from a client resending the same id.
    rate_per_s, burst
        A single 1 s GCRA rule (``burst`` requests at once, then
        ``rate_per_s``) that replaces the plan, for callers that set the
        limit themselves (the benchmark); both or neither.
    cost
        Cells this request uses in each GCRA window, ``1 <= cost <= burst``
        of every rule (a larger cost could never be admitted).
    plan
        The key's plan (``ApiKey.plan``), looked up in the store's current
        :class:`~gateway.config.LimitsConfig`.
    overrides
        The key's own overrides of that plan (``ApiKey.limit_overrides``):
        canonical JSON of some :class:`~gateway.config.PlanConfig` fields,
        or ``""`` for none.
    sent_us
        When the request reached Kafka by the broker's clock (epoch us), or
        None. The rate windows judge the request at that instant, not when
        a worker gets to it, so that requests queued while no worker ran
        (a restart, a Redis pause) are not refused for arriving together.
        Clamped to ``[now - auth.replay_window_s, now]``. Only a broker's
        timestamp may be passed: a producer's is the client's to choose.
    """

    client_id: str
    request_id: str
    delivery: str
    rate_per_s: float | None = None
    burst: int | None = None
    cost: int = 1
    plan: str = "default"
    overrides: str = ""
    sent_us: float | None = None

    def __post_init__(self) -> None:
        check_client_id(self.client_id)
        if self.sent_us is not None and not (
            self.sent_us > 0 and math.isfinite(self.sent_us)
        ):
            raise ValueError("sent_us must be positive and finite")
        if (self.rate_per_s is None) != (self.burst is None):
            raise ValueError("give both rate_per_s and burst, or neither")
        if self.rate_per_s is not None and not (
            self.rate_per_s > 0 and math.isfinite(self.rate_per_s)
        ):
            raise ValueError("rate_per_s must be positive and finite")
        if self.burst is not None and self.burst < 1:
            raise ValueError("burst must be at least 1")
        if self.cost < 1 or (self.burst is not None and self.cost > self.burst):
            raise ValueError("cost must be between 1 and burst")


HiddenAction = Literal["block", "throttle"]
_HIDDEN: dict[str, HiddenAction | None] = {"block": "block", "throttle": "throttle"}


@dataclass(frozen=True, slots=True)
class Admission:
    """What the store decided for one item.

    ``outcome`` is ``ok`` (admitted and counted), ``redelivery`` (this Kafka
    record was admitted before, e.g. before a crash: answer it again, it is
    not counted again), ``duplicate`` (another record with this request id was
    admitted), ``rate_limited``, ``blocked``, ``quota_exceeded`` (the UTC
    day's quota is used up), ``too_many_in_flight`` or ``store_unavailable``
    (Redis unreachable and a rule in ``closed`` fail mode).
    ``retry_after_ms`` is the wait the refusal implies (0 when unknown or
    not refused). ``client_requests`` is the client's total of admitted
    requests after this item.

    ``limit``, ``remaining``, ``reset_ms`` and ``window_s`` describe the
    binding window after this decision: the GCRA rule (or daily quota) with
    the fewest requests left. ``limit`` is what that window lets through at
    once (a rule's burst, the quota), ``remaining`` how many more would pass
    now, ``reset_ms`` when it is full again, ``window_s`` its length. All 0
    when the plan has neither rules nor quota, or Redis was not consulted.
    ``in_flight`` says the item holds an in-flight slot (release it with
    :meth:`CounterStore.release_in_flight` once answered); ``without_store``
    that the decision was made without Redis (fail mode ``open``/``closed``).

    ``hidden`` and ``hidden_ms`` are the client's hidden record
    (:meth:`CounterStore.record_hidden`): ``"block"`` or ``"throttle"`` and
    the ms left of it, or ``None`` and 0; ``released`` says a release marker
    waits for the worker (``gateway.clientview``). They describe the client,
    not the item, and are read in the same script call, so that the worker
    applies them before scoring without a round trip of its own.
    """

    outcome: Outcome
    retry_after_ms: int
    client_requests: int
    limit: int = 0
    remaining: int = 0
    reset_ms: int = 0
    window_s: float = 0.0
    in_flight: bool = False
    without_store: bool = False
    hidden: HiddenAction | None = None
    hidden_ms: int = 0
    released: bool = False

    @property
    def serve(self) -> bool:
        """Whether the request should be answered with a prediction."""
        return self.outcome in ("ok", "redelivery")


@dataclass(frozen=True, slots=True)
class GcraDecision:
    allowed: bool
    tat_us: float
    retry_after_us: float


def gcra(
    tat_us: float | None,
    now_us: float,
    rate_per_s: float,
    burst: int,
    cost: int = 1,
    at_us: float | None = None,
) -> GcraDecision:
    """The GCRA step ``admit.lua`` performs, in Python, as a reference.

    Emission interval ``T = 1e6 / rate_per_s`` us and tolerance
    ``tau = T * (burst - 1)``. A request is allowed iff
    ``now >= max(TAT, now) + T * cost - T * burst`` (for ``cost`` 1:
    ``now >= TAT - tau``); then ``TAT = max(TAT, now) + T * cost``. A refusal
    leaves the TAT alone and waits ``TAT - tau - now`` (cost 1).

    ``at_us`` (at most ``now_us``) judges the request at that earlier
    instant instead, when it was sent (see :class:`AdmitItem`'s
    ``sent_us``); the wait of a refusal still counts from ``now_us``, and
    is at least 1 us.

    Examples
    --------
    >>> d = gcra(None, 0.0, rate_per_s=10, burst=5)
    >>> d.allowed, d.tat_us
    (True, 100000.0)
    >>> gcra(500_000.0, 0.0, rate_per_s=10, burst=5).retry_after_us
    100000.0
    """
    interval = 1e6 / rate_per_s
    at = now_us if at_us is None else min(at_us, now_us)
    base = at if tat_us is None else max(tat_us, at)
    new_tat = base + interval * cost
    allow_at = new_tat - interval * burst
    if at < allow_at:
        unchanged = at if tat_us is None else tat_us
        return GcraDecision(False, unchanged, max(allow_at - now_us, 1.0))
    return GcraDecision(True, new_tat, 0.0)


# eq=False: compared and hashed by identity, which is what grouping a batch by
# plan needs, and cheap (hashing the nested PlanConfig per item is not).
@dataclass(frozen=True, slots=True, eq=False)
class CompiledPlan:
    """A plan with a key's overrides applied, ready to be script arguments.

    ``tat_suffixes`` name the rules' TAT keys (one per window, so a rule keeps
    its state when its limit changes); ``rule_args`` are the script's
    per-rule arguments; ``fail_modes`` the effective fail mode of each rule,
    then the quota's and the in-flight cap's (when the plan has them).
    """

    plan: PlanConfig
    count_refused: bool
    tat_suffixes: tuple[str, ...]
    rule_args: tuple[Any, ...]
    fail_modes: tuple[FailMode, ...]


def compile_plan(limits: LimitsConfig, plan: PlanConfig) -> CompiledPlan:
    """Resolve ``plan``'s defaults against ``limits`` into script arguments."""
    default_mode = plan.fail_mode or limits.fail_mode
    count_refused = (
        limits.count_refused if plan.count_refused is None else plan.count_refused
    )
    rule_args: list[Any] = []
    for rule in plan.rules:
        rule_args.extend(
            (repr(float(rule.limit)), rule.effective_burst, rule.window_ms)
        )
    modes: list[FailMode] = [rule.fail_mode or default_mode for rule in plan.rules]
    if plan.quota is not None:
        modes.append(plan.quota.fail_mode or default_mode)
    if plan.in_flight is not None:
        modes.append(plan.in_flight.fail_mode or default_mode)
    if not modes:
        # A plan without limits still needs an answer to "and without Redis?"
        modes.append(default_mode)
    return CompiledPlan(
        plan=plan,
        count_refused=count_refused,
        tat_suffixes=tuple(f"tat:{rule.window_ms}" for rule in plan.rules),
        rule_args=tuple(rule_args),
        fail_modes=tuple(modes),
    )


def apply_overrides(plan: PlanConfig, overrides: str) -> PlanConfig:
    """``plan`` with the fields in ``overrides`` (a JSON object of
    :class:`~gateway.config.PlanConfig` fields) replacing its own.

    Raises
    ------
    ValueError
        ``overrides`` is not a JSON object of valid PlanConfig fields
        (pydantic's ValidationError is a ValueError).
    """
    if not overrides:
        return plan
    changes = json.loads(overrides)
    if not isinstance(changes, dict):
        raise ValueError("limit overrides must be a JSON object")
    return PlanConfig.model_validate(plan.model_dump(exclude_unset=True) | changes)


def parse_reply(reply: str) -> list[Admission]:
    """The admission script's reply for one client: its first line (the
    client's hidden record and release marker), then one line per item."""
    head, *lines = reply.split("\n")
    hidden_ms, hidden, released = head.split(" ")
    action = _HIDDEN.get(hidden)
    return [
        parse_admission(
            line,
            hidden=action,
            hidden_ms=int(hidden_ms) if action is not None else 0,
            released=released == "1",
        )
        for line in lines
    ]


def parse_admission(
    line: str,
    *,
    hidden: HiddenAction | None = None,
    hidden_ms: int = 0,
    released: bool = False,
) -> Admission:
    """One item's line of the admission script's reply as an
    :class:`Admission`, with the client's fields of the reply's first line."""
    name, retry_ms, requests, limit, remaining, reset_ms, window_ms, held = line.split(
        " "
    )
    outcome = _OUTCOMES.get(name)
    if outcome is None:
        raise StoreError(f"redis admit: unexpected outcome {name!r}", retriable=False)
    # Positional, in field order: keywords cost a measurable share of the
    # parse at 500 items a batch.
    return Admission(
        outcome,
        int(retry_ms),
        int(requests),
        int(limit),
        int(remaining),
        int(reset_ms),
        int(window_ms) / 1000,
        held == "1",
        False,
        hidden,
        hidden_ms,
        released,
    )
