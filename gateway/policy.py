"""The policy ladder: from detector scores to an action per request.

Pure logic with per-client memory; no I/O. The worker applies the verdict
(alerts, a Redis block with its cool-down, the throttle bucket, shaping and the
hidden-suspicion delay); the policy never sees Kafka or Redis.

Risk is the largest warm detector's score divided by its threshold, so 1.0
means "at threshold" whatever the detector's own scale. The ladder is ordered
``allow < flag < throttle < degrade < block``; each rule fires on the query's
risk (``risk_at``) or on the client's remembered flags (``after_flags``) and the
most severe fired rule wins. See docs/policy.md.

Each client is followed on two tracks with the same rules: the *would-be*
track sees every detector and every rule, shadowed or not, and is what the
decisions topic records as the truth; the *live* track sees only the detectors
and rules not in shadow, and is what is enforced. In shadow the two differ and
nothing beyond an alert is enforced.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, cast

import msgspec
import numpy as np
import numpy.typing as npt

from detectors import DetectorScore
from detectors.fusion import contributions, decay, fuse, risk_without
from gateway.config import LadderRule, PolicyConfig

logger = logging.getLogger(__name__)

ACTIONS = ("allow", "flag", "throttle", "degrade", "block")
SEVERITY = {name: rank for rank, name in enumerate(ACTIONS)}
_DEGRADE_RANK = {"full": 0, "top_k": 1, "rounded": 2, "label": 3}


class _Track(msgspec.Struct):
    # Remembered flags, decayed to ``flags_at_s`` (wall clock, seconds).
    flags: float = 0.0
    flags_at_s: float = 0.0
    blocked_until_s: float = 0.0
    throttled_until_s: float = 0.0
    # Rate divisor while throttled; 0 when the throttle is hidden (the client
    # is slowed by a delay instead of refused by a bucket).
    throttle_factor: float = 0.0


class _ClientPolicyState(msgspec.Struct):
    queries: int = 0
    # Flagged queries ever (would-be track, never decayed): a client with any
    # may no longer teach the detectors what normal traffic looks like.
    lifetime_flags: int = 0
    live: _Track = msgspec.field(default_factory=_Track)
    would: _Track = msgspec.field(default_factory=_Track)
    # The flag count of a snapshot from before the ladder (its field "flags").
    legacy_flags: int = msgspec.field(default=0, name="flags")
    # Fusion memory: each detector's decayed contribution, as of fused_at_s.
    fused: dict[str, float] = msgspec.field(default_factory=dict)
    fused_at_s: float = 0.0
    # The client's linked group (another key is linked to it) and the group's
    # risk when last seen, as of group_at_s.
    group_id: str | None = None
    group_risk: float = 0.0
    group_at_s: float = 0.0


@dataclass(frozen=True, slots=True)
class _Step:
    action: str
    degrade: str | None
    reasons: tuple[str, ...]
    # When a block or throttle this step stands in ends (wall clock, s).
    until_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What policy decided for one query.

    ``action`` is the would-be action (every rule and detector, shadow
    included): the truth recorded on the decisions topic. ``enforced`` is what
    the client experiences. ``shadow`` says the two differ because something
    is in shadow. Under hidden suspicion a refusal becomes a slowed, degraded
    answer (``delay_s``, ``degrade``) and ``hidden`` says the response must
    not name the action, so that it cannot serve as an oracle.
    """

    action: str
    enforced: str
    risk: float
    flagged: tuple[DetectorScore, ...] = ()
    reasons: tuple[str, ...] = field(default=())
    shadow: bool = False
    enforced_risk: float = 0.0
    degrade: str | None = None
    delay_s: float = 0.0
    hidden: bool = False
    cooldown_s: float = 0.0
    top: tuple[tuple[str, float], ...] = ()
    """Up to three detectors contributing most to ``risk`` (fused, decayed),
    with their contributions in threshold units; ``group`` when the linked
    group's risk is what drives it."""
    hidden_action: str | None = None
    """The enforced block or throttle a hidden answer stands for (``None``
    when the answer hides none), and ``hidden_s`` the seconds left of it:
    what the worker records in Redis (``CounterStore.record_hidden``) so that
    losing the policy's memory does not lift it."""
    hidden_s: float = 0.0


GROUP = "group"
"""Name under which a linked group's risk enters a verdict (and can be put
in ``shadow_detectors``)."""


class Policy:
    """Maps each query's detector scores to a rung of the ladder.

    Parameters
    ----------
    config
        The ladder, with per-model and per-plan overrides.
    clock
        Wall-clock seconds; injectable so tests control decay and cool-downs.
        Wall clock rather than monotonic because the state moves between
        workers in snapshots.
    """

    def __init__(
        self, config: PolicyConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self._clock = clock
        self._clients: dict[str, _ClientPolicyState] = {}
        self._resolved: dict[tuple[str | None, str | None], PolicyConfig] = {}
        # Every rule list and its live part, per resolved config (by identity:
        # resolve() caches them), so that a query does not rebuild the ladder.
        self._ladders: dict[
            int, tuple[list[LadderRule], list[LadderRule], frozenset[str]]
        ] = {}

    def reconfigure(self, config: PolicyConfig) -> None:
        """Swap the rules at run time; every client's memory (flags, blocks,
        throttles) is kept and judged by the new rules from the next query.

        Call it between batches (the worker scores in an executor thread): a
        batch being scored may otherwise mix the old and the new rules."""
        self.config = config
        self._resolved = {}
        self._ladders = {}
        logger.info("policy reconfigured")

    def _rules(
        self, cfg: PolicyConfig
    ) -> tuple[list[LadderRule], list[LadderRule], frozenset[str]]:
        """Every rule, the live ones, and the shadowed detectors of ``cfg``."""
        found = self._ladders.get(id(cfg))
        if found is None:
            rules = cfg.ladder()
            live = [] if cfg.shadow else [r for r in rules if not r.shadow]
            shadowed = frozenset(cfg.shadow_detectors)
            found = self._ladders[id(cfg)] = (rules, live, shadowed)
        return found

    def resolve(self, model: str | None, plan: str | None) -> PolicyConfig:
        """The effective policy of a model and plan, cached."""
        key = (model, plan)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolved[key] = self.config.resolve(model, plan)
        return found

    def good_standing(self, client_id: str) -> bool:
        """True while a client has never been flagged (shadow included): only
        such clients may teach the detectors what normal traffic looks like."""
        state = self._clients.get(client_id)
        return state is None or state.lifetime_flags == 0

    def rate_factor(self, client_id: str) -> float:
        """The divisor of this client's rate while it is throttled (not
        hidden), else 1.0. The worker checks a throttled client's requests
        against a bucket at ``rate / factor`` before scoring them."""
        state = self._clients.get(client_id)
        if state is None or state.live.throttled_until_s <= self._clock():
            return 1.0
        return max(state.live.throttle_factor, 1.0)

    def decide(
        self,
        client_id: str,
        scores: Sequence[DetectorScore],
        *,
        model: str | None = None,
        plan: str | None = None,
    ) -> Verdict:
        cfg = self.resolve(model, plan)
        current = contributions(scores, cfg.detector_weights)
        flagged = tuple(s for s in scores if s.flagged)
        return self._judge(client_id, cfg, current, flagged)

    def decide_batch(
        self,
        client_ids: Sequence[str],
        per_detector: Sequence[Sequence[DetectorScore]],
        *,
        model: str | None = None,
        plans: Sequence[str | None],
    ) -> list[Verdict]:
        """:meth:`decide` for every row of a batch, in row order, each row
        seeing the memory the rows before it left (the ladder counts flags
        query by query).

        The same verdicts as calling :meth:`decide` per row with
        ``[column[row] for column in per_detector]``, but each detector's
        contributions are computed for all rows at once with numpy and no
        per-row list of scores is built unless a row is flagged.

        Parameters
        ----------
        client_ids
            One client per row.
        per_detector
            One column of scores per detector, each with one score per row.
        model
            The model every row is for.
        plans
            One plan per row (``None``: the default plan).
        """
        n = len(client_ids)
        columns = [list(column) for column in per_detector]
        names = [column[0].detector for column in columns if column]
        if (
            any(len(column) != n for column in columns)
            or len(set(names)) != len(columns)
            or any(len(set(map(itemgetter(0), column))) > 1 for column in columns)
        ):
            # A detector named twice or a ragged column: the per-row path
            # merges and checks them as it always did.
            return [
                self.decide(
                    client_ids[row],
                    [column[row] for column in columns],
                    model=model,
                    plan=plans[row],
                )
                for row in range(n)
            ]

        # Every detector's scores, thresholds, warmth and flags as (d, n).
        score = _column_matrix(columns, 1, np.float64, n)
        threshold = _column_matrix(columns, 2, np.float64, n)
        warm = _column_matrix(columns, 5, np.bool_, n)
        flagged = _column_matrix(columns, 3, np.bool_, n)
        counted = warm & (threshold > 0)
        safe_threshold = np.where(threshold > 0, threshold, 1.0)
        any_flagged: list[bool] = (
            cast(list[bool], flagged.any(axis=0).tolist()) if columns else [False] * n
        )

        # Contributions per resolved config (weights differ by plan), as the
        # per-row dicts fuse() takes. A contribution of 0 or less can never
        # enter the memory (fuse keeps the larger of memory and current, and
        # memory is positive), so it is left out of the dict.
        current_by_cfg: dict[int, list[dict[str, float]]] = {}
        cfgs = [self.resolve(model, plan) for plan in plans]
        for cfg in cfgs:
            if id(cfg) in current_by_cfg:
                continue
            weights = np.array(
                [cfg.detector_weights.get(name, 1.0) for name in names],
                dtype=np.float64,
            ).reshape(-1, 1)
            values = np.where(counted, weights * score / safe_threshold, 0.0)
            rows: list[dict[str, float]] = [
                {names[j]: v for j, v in enumerate(row) if v > 0}
                for row in values.T.tolist()
            ]
            current_by_cfg[id(cfg)] = rows

        verdicts: list[Verdict] = []
        for row in range(n):
            cfg = cfgs[row]
            flagged_row = (
                tuple(column[row] for column in columns if column[row].flagged)
                if any_flagged[row]
                else ()
            )
            verdicts.append(
                self._judge(
                    client_ids[row], cfg, current_by_cfg[id(cfg)][row], flagged_row
                )
            )
        return verdicts

    def _judge(
        self,
        client_id: str,
        cfg: PolicyConfig,
        current: Mapping[str, float],
        flagged: tuple[DetectorScore, ...],
    ) -> Verdict:
        """One query's verdict from its contributions and flagged scores."""
        now_s = self._clock()
        state = self._clients.get(client_id)
        if state is None:
            state = self._clients[client_id] = _ClientPolicyState()
        state.queries += 1

        # Risk twice: every detector (would-be), and those not in shadow
        # (live); each the fused, decaying risk of detectors/fusion.py.
        rules, live_rules, shadowed = self._rules(cfg)
        elapsed_s = now_s - state.fused_at_s if state.fused_at_s else 0.0
        fused = fuse(state.fused, elapsed_s, current, half_life_s=cfg.risk_half_life_s)
        state.fused, state.fused_at_s = fused.memory, now_s
        risk, top = fused.risk, fused.top
        live_risk = risk_without(fused.memory, shadowed) if shadowed else risk
        live_flagged = (
            tuple(s for s in flagged if s.detector not in shadowed)
            if shadowed and flagged
            else flagged
        )

        # A linked group is judged as one attacker: its risk is the client's
        # when larger, and counts as a flag when at flag_at.
        group = self._group_score(state, cfg, now_s)
        if group is not None and group.score > risk:
            risk, top = group.score, ((GROUP, group.score), *top[:2])
            if group.flagged and not flagged:
                flagged = (group,)
        if group is not None and GROUP not in shadowed and group.score > live_risk:
            live_risk = group.score
            if group.flagged and not live_flagged:
                live_flagged = (group,)

        would = _step(state.would, risk, bool(flagged), rules, cfg, now_s)
        live = _step(state.live, live_risk, bool(live_flagged), live_rules, cfg, now_s)
        if flagged and SEVERITY[would.action] >= SEVERITY["flag"]:
            state.lifetime_flags += 1
        verdict = _verdict(cfg, would, live, risk, live_risk, flagged, now_s, top)
        if verdict.action != "allow":
            logger.debug(
                "policy verdict %s (enforced %s)",
                verdict.action,
                verdict.enforced,
                extra={"client": client_id, "risk": risk, "shadow": verdict.shadow},
            )
        return verdict

    def note_group(
        self, client_id: str, group_id: str | None, group_risk: float
    ) -> None:
        """Remember the client's linked group and its risk (gateway/groups.py
        computes both after a batch), for the client's next queries. ``None``
        when the client is alone."""
        state = self._clients.setdefault(client_id, _ClientPolicyState())
        now_s = self._clock()
        half_life_s = self.config.risk_half_life_s
        own = max(
            (
                decay(v, now_s - state.fused_at_s, half_life_s) if half_life_s else v
                for v in state.fused.values()
            ),
            default=0.0,
        )
        # The group's risk is its largest member's; when that is the client
        # itself, the group adds nothing and must not count its flag twice.
        if group_id is None or group_risk <= own + 1e-9:
            group_id, group_risk = None, 0.0
        state.group_id = group_id
        state.group_risk = group_risk
        state.group_at_s = now_s

    def _group_score(
        self, state: _ClientPolicyState, cfg: PolicyConfig, now_s: float
    ) -> DetectorScore | None:
        """The group's remembered risk as a score (threshold ``flag_at``), or
        None when the client is alone or group risk is off."""
        if not cfg.group_risk or state.group_id is None or state.group_risk <= 0:
            return None
        value = state.group_risk
        if cfg.risk_half_life_s > 0:
            value = decay(value, now_s - state.group_at_s, cfg.risk_half_life_s)
        # In threshold units already; flagged like a detector at flag_at.
        return DetectorScore(
            detector=GROUP,
            score=value,
            threshold=cfg.flag_at,
            flagged=value >= cfg.flag_at,
            evidence=f"linked group {state.group_id} has risk {value:.2f}",
            warm=True,
        )

    def standing(
        self, client_id: str, *, model: str | None = None, plan: str | None = None
    ) -> Verdict | None:
        """What the client's memory alone (a cool-down, a throttle, flags past
        an ``after_flags`` rule) says about a query, without counting one.

        For a redelivered record: it was scored the first time and must not be
        scored again, but its answer must not escape a degrade, a block or a
        hidden delay the client earned. None when the memory says allow.
        """
        state = self._clients.get(client_id)
        if state is None:
            return None
        cfg = self.resolve(model, plan)
        now_s = self._clock()
        rules, live_rules, _ = self._rules(cfg)
        # On copies: looking must change nothing.
        would = _step(
            msgspec.structs.replace(state.would), 0.0, False, rules, cfg, now_s
        )
        live = _step(
            msgspec.structs.replace(state.live), 0.0, False, live_rules, cfg, now_s
        )
        if would.action == live.action == "allow":
            return None
        # cooldown_s 0: a block seen again is not a new block to store.
        return dataclasses.replace(
            _verdict(cfg, would, live, 0.0, 0.0, (), now_s), cooldown_s=0.0
        )

    def forget(self, client_id: str) -> None:
        self._clients.pop(client_id, None)

    def restore_hidden(self, client_id: str, action: str, left_s: float) -> None:
        """Make the client's memory hold a hidden block or throttle for at
        least ``left_s`` more seconds, as its Redis record says.

        The record (``CounterStore.record_hidden``) outlives what can happen
        to the policy's part of a snapshot (refused, deleted, never saved):
        a client whose memory lost a hidden block is put back in its
        cool-down on both tracks, so it keeps being served late and coarse,
        never refused, until the cool-down ends. A memory that already holds
        as much is left alone. Marks the client as flagged: a client under a
        hidden block must not teach the detectors what normal looks like.

        Raises
        ------
        ValueError
            ``action`` is neither ``"block"`` nor ``"throttle"``, or
            ``left_s`` is not positive and finite.
        """
        if action not in ("block", "throttle"):
            raise ValueError(f"no hidden action {action!r}")
        if not (left_s > 0 and math.isfinite(left_s)):
            raise ValueError("left_s must be positive and finite")
        state = self._clients.get(client_id)
        if state is None:
            state = self._clients[client_id] = _ClientPolicyState()
        until_s = self._clock() + left_s
        for track in (state.live, state.would):
            if action == "block":
                track.blocked_until_s = max(track.blocked_until_s, until_s)
            elif track.throttled_until_s < until_s:
                if track.throttled_until_s <= self._clock():
                    # 0: hidden, a delay rather than a bucket.
                    track.throttle_factor = 0.0
                track.throttled_until_s = until_s
        state.lifetime_flags = max(state.lifetime_flags, 1)

    def dump_state(self, client_id: str) -> bytes | None:
        state = self._clients.get(client_id)
        return None if state is None else msgspec.msgpack.encode(state)

    def load_state(self, client_id: str, blob: bytes) -> None:
        """Take a client's state from ``dump_state``, possibly another worker's.

        Raises
        ------
        ValueError
            The blob is not a policy state (``msgspec.DecodeError`` and
            ``ValidationError`` are ValueErrors), or a value in it is one no
            release writes: not finite, negative, a time in the future, a
            cool-down or throttle longer than any configurable one, a throttle
            factor outside its bounds. Nothing is kept for the client then.
        """
        state = msgspec.msgpack.decode(blob, type=_ClientPolicyState)
        _check_state(state, self._clock())
        if state.legacy_flags:
            # A snapshot from before the ladder: its flags count on both tracks.
            state.lifetime_flags = max(state.lifetime_flags, state.legacy_flags)
            state.live.flags = state.would.flags = float(state.legacy_flags)
            state.legacy_flags = 0
        self._clients[client_id] = state


def _config_max(name: str) -> float:
    """The largest value ``PolicyConfig.<name>`` accepts (its ``le`` bound)."""
    for constraint in PolicyConfig.model_fields[name].metadata:
        bound = getattr(constraint, "le", None)
        if bound is not None:
            return float(bound)
    raise LookupError(f"PolicyConfig.{name} has no upper bound")


# Wall clocks of the workers that write and read a snapshot disagree (NTP keeps
# them within seconds); an hour of slack is far beyond that and still refuses a
# time that would freeze decay or hold a block for good.
_CLOCK_SLACK_S = 3600.0
_MAX_BLOCK_S = _config_max("block_cooldown_s")
_MAX_THROTTLE_S = _config_max("throttle_s")
_MAX_THROTTLE_FACTOR = _config_max("throttle_factor")
# A group id is its smallest member's client id (detectors/linking.py), and
# client ids are 1-128 characters (CLIENT_ID_REGEX, gateway/admin/schemas.py).
_MAX_GROUP_ID_CHARS = 128


def _check_range(what: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{what} is {value!r}, outside [{low:g}, {high:g}]")


def _check_state(state: _ClientPolicyState, now_s: float) -> None:
    """Refuse a restored state whose values no release writes.

    The policy acts on these numbers without further checks: a NaN flag
    count never reaches an ``after_flags`` rule (the client is never blocked
    for its flags), a block end decades away blocks for good, a time in the
    future stops decay until the clock reaches it, and a throttled client's
    NaN throttle factor is passed on to the throttle's Redis script. A
    corrupt snapshot must reset the client's policy state instead
    (``Scorer.restore``).

    Raises
    ------
    ValueError
        Naming the first field out of range.
    """
    latest_s = now_s + _CLOCK_SLACK_S
    for name, count in (
        ("queries", state.queries),
        ("lifetime_flags", state.lifetime_flags),
        ("flags", state.legacy_flags),
    ):
        if count < 0:
            raise ValueError(f"{name} is {count}, below 0")
    for track_name, track in (("live", state.live), ("would", state.would)):
        _check_range(f"{track_name}.flags", track.flags, 0.0, math.inf)
        _check_range(f"{track_name}.flags_at_s", track.flags_at_s, 0.0, latest_s)
        _check_range(
            f"{track_name}.blocked_until_s",
            track.blocked_until_s,
            0.0,
            latest_s + _MAX_BLOCK_S,
        )
        _check_range(
            f"{track_name}.throttled_until_s",
            track.throttled_until_s,
            0.0,
            latest_s + _MAX_THROTTLE_S,
        )
        # 0 while no throttle is set or the throttle is hidden (a delay, not a
        # bucket); else a factor PolicyConfig accepts.
        if track.throttle_factor != 0.0:
            _check_range(
                f"{track_name}.throttle_factor",
                track.throttle_factor,
                1.0,
                _MAX_THROTTLE_FACTOR,
            )
    for detector, value in state.fused.items():
        _check_range(f"fused[{detector[:64]!r}]", value, 0.0, math.inf)
    _check_range("fused_at_s", state.fused_at_s, 0.0, latest_s)
    _check_range("group_risk", state.group_risk, 0.0, math.inf)
    _check_range("group_at_s", state.group_at_s, 0.0, latest_s)
    if state.group_id is not None and not (
        0 < len(state.group_id) <= _MAX_GROUP_ID_CHARS
    ):
        raise ValueError(f"group_id has {len(state.group_id)} characters")


def _verdict(
    cfg: PolicyConfig,
    would: _Step,
    live: _Step,
    risk: float,
    live_risk: float,
    flagged: tuple[DetectorScore, ...],
    now_s: float,
    top: tuple[tuple[str, float], ...] = (),
) -> Verdict:
    """Join the two tracks' steps into what is recorded and what is enforced."""
    # What shadow changes: a query some detector flagged is at most flagged
    # (the alert, marked shadow, is an observation, not an enforcement).
    enforced, degrade = live.action, live.degrade
    shadow = (would.action, would.degrade) != (live.action, live.degrade)
    if (
        shadow
        and flagged
        and SEVERITY[enforced] < SEVERITY["flag"] <= SEVERITY[would.action]
    ):
        enforced = "flag"

    # Hidden suspicion: a refusal (block, throttle) would tell an adaptive
    # attacker which queries gave it away. Serve it late and coarse.
    delay_s = 0.0
    hidden_action: str | None = None
    hidden_s = 0.0
    if cfg.hide_suspicion and enforced in ("block", "throttle"):
        # What the worker records so that the policy's memory is not its
        # only record (enforced is the live track's action here).
        hidden_action, hidden_s = enforced, max(live.until_s - now_s, 0.0)
        enforced = "degrade"
        degrade = _stronger(degrade, cfg.hide_degrade)
        delay_s = cfg.hide_delay_s
    # Under hide_suspicion no answer names its action (a visible "flag"
    # or "degrade" would be the oracle too); the decision record does.
    hidden = cfg.hide_suspicion and enforced != "allow"

    reasons = tuple(f"{s.detector}: {s.evidence}" for s in flagged) + would.reasons
    verdict = Verdict(
        action=would.action,
        enforced=enforced,
        risk=risk,
        flagged=flagged,
        reasons=reasons,
        shadow=shadow,
        enforced_risk=live_risk,
        degrade=degrade if enforced == "degrade" else None,
        delay_s=delay_s,
        hidden=hidden,
        cooldown_s=cfg.block_cooldown_s if enforced == "block" else 0.0,
        top=top,
        hidden_action=hidden_action if hidden_s > 0 else None,
        hidden_s=hidden_s,
    )
    return verdict


def _step(
    track: _Track,
    risk: float,
    flagged: bool,
    rules: list[LadderRule],
    cfg: PolicyConfig,
    now_s: float,
) -> _Step:
    """Advance one track by one query and return its action."""
    # 1. A block in its cool-down stays a block; it lifts by itself.
    if track.blocked_until_s > now_s:
        left_s = track.blocked_until_s - now_s
        return _Step(
            "block",
            None,
            (f"cool-down: {left_s:.1f} s left",),
            until_s=track.blocked_until_s,
        )

    # 2. Forget flags with the configured half-life.
    if cfg.flag_half_life_s > 0 and track.flags > 0:
        elapsed_s = max(now_s - track.flags_at_s, 0.0)
        track.flags *= 0.5 ** (elapsed_s / cfg.flag_half_life_s)
    track.flags_at_s = now_s

    # 3. Rules on this query's risk; a flagged query is remembered.
    fired = [
        r for r in rules if r.risk_at is not None and flagged and risk >= r.risk_at
    ]
    if any(SEVERITY[r.action] >= SEVERITY["flag"] for r in fired):
        track.flags += 1.0

    # 4. Rules on the client's memory, with this query counted.
    fired += [
        r
        for r in rules
        if r.after_flags is not None and track.flags >= r.after_flags - 1e-9
    ]
    action, degrade = "allow", None
    for rule in fired:
        if SEVERITY[rule.action] > SEVERITY[action]:
            action = rule.action
        if rule.action == "degrade":
            degrade = _stronger(degrade, rule.degrade)
    reasons: tuple[str, ...] = ()
    if track.throttled_until_s > now_s and SEVERITY[action] < SEVERITY["throttle"]:
        action = "throttle"
        reasons = (f"throttled: {track.throttled_until_s - now_s:.1f} s left",)

    # 5. Effects that outlive the query.
    if action == "block":
        # The cool-down pays for the flags: after it, escalation starts over.
        track.blocked_until_s = now_s + cfg.block_cooldown_s
        track.flags = 0.0
    elif action == "throttle" and track.throttled_until_s <= now_s:
        track.throttled_until_s = now_s + cfg.throttle_s
        track.throttle_factor = 0.0 if cfg.hide_suspicion else cfg.throttle_factor
    if action == "block":
        until_s = track.blocked_until_s
    elif action == "throttle":
        until_s = track.throttled_until_s
    else:
        until_s = 0.0
    return _Step(
        action, degrade if action == "degrade" else None, reasons, until_s=until_s
    )


def _stronger(a: str | None, b: str) -> str:
    if a is None or _DEGRADE_RANK[b] > _DEGRADE_RANK[a]:
        return b
    return a


def _column_matrix(
    columns: list[list[DetectorScore]], field_index: int, dtype: Any, n: int
) -> npt.NDArray[Any]:
    """One field of every score as a (detectors, rows) array, read by tuple
    index (a DetectorScore is a tuple; its properties cost a call each)."""
    out = np.empty((len(columns), n), dtype=dtype)
    for j, column in enumerate(columns):
        out[j] = np.fromiter(map(itemgetter(field_index), column), dtype, n)
    return out
