"""Settings for every modelgate process, from a TOML file and ``MODELGATE_*``.

Precedence: keyword arguments, then environment (``MODELGATE_KAFKA__BOOTSTRAP``
for nested fields), then the TOML file named by ``MODELGATE_CONFIG`` (default
``modelgate.toml`` in the working directory, if present), then defaults. Unknown
keys are rejected so a typo fails at start instead of silently doing nothing.
"""

from __future__ import annotations

import ipaddress
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.errors import ConfigError

_TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"


class _Frozen(BaseModel):
    # hide_input_in_errors: a refused value (a Redis URL with a password in
    # it) must not reach logs through the chained ValidationError's text.
    # allow_inf_nan=False: NaN and infinity are refused as "not a finite
    # number" before any bound is checked; otherwise NaN failed whichever
    # bound came first ("should be <= 100") and an unbounded-above float
    # took infinity.
    model_config = ConfigDict(
        frozen=True, extra="forbid", hide_input_in_errors=True, allow_inf_nan=False
    )


class TopicsConfig(_Frozen):
    requests: str = Field("modelgate.requests", pattern=_TOPIC_PATTERN)
    responses: str = Field("modelgate.responses", pattern=_TOPIC_PATTERN)
    alerts: str = Field("modelgate.alerts", pattern=_TOPIC_PATTERN)
    decisions: str = Field("modelgate.decisions", pattern=_TOPIC_PATTERN)
    deadletter: str = Field("modelgate.deadletter", pattern=_TOPIC_PATTERN)
    requests_partitions: int = Field(6, ge=1, le=1024)
    other_partitions: int = Field(3, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1, le=16)
    # Labelled feedback and the poisoning guard's verdicts (gateway/feedback.py,
    # docs/feedback-guard.md). Not in all_names(): only the guard creates them
    # (other_partitions each), and a run's clean-up must not delete them.
    feedback: str = Field("modelgate.feedback", pattern=_TOPIC_PATTERN)
    feedback_accepted: str = Field(
        "modelgate.feedback.accepted", pattern=_TOPIC_PATTERN
    )
    feedback_rejected: str = Field(
        "modelgate.feedback.rejected", pattern=_TOPIC_PATTERN
    )
    # The admin audit log's copy (gateway/admin/audit_topic.py, docs/admin.md).
    # Not in all_names() either: the admin API creates it (other_partitions),
    # and a run's clean-up must not delete an audit trail.
    audit: str = Field("modelgate.audit", pattern=_TOPIC_PATTERN)
    # How long the broker keeps audit records, in ms (the topic's retention.ms,
    # set when the topic is created); -1 keeps them for ever. 400 days: a
    # yearly review still finds the previous year's entries. The broker's
    # default (log.retention.hours=24 in infra/kafka) would keep a day.
    audit_retention_ms: int = Field(400 * 86_400_000, ge=-1, le=100 * 365 * 86_400_000)

    def all_names(self) -> list[str]:
        return [
            self.requests,
            self.responses,
            self.alerts,
            self.decisions,
            self.deadletter,
        ]


class KafkaConfig(_Frozen):
    bootstrap: str = "127.0.0.1:19092"
    group_id: str = Field("modelgate-workers", min_length=1, max_length=200)
    topics: TopicsConfig = TopicsConfig()
    request_timeout_s: float = Field(30.0, gt=0, le=600)
    poll_timeout_ms: int = Field(200, ge=1, le=60_000)
    max_batch_records: int = Field(500, ge=1, le=100_000)
    # Worker rejects anything larger before decoding; Kafka's own limit is 1 MiB.
    max_message_bytes: int = Field(262_144, ge=1024, le=1_048_576)
    session_timeout_ms: int = Field(10_000, ge=1000, le=300_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100, le=60_000)


class RedisConfig(_Frozen):
    # Never with a password in it: a URL is a plain string that shows in any
    # repr or log of the settings, so one carrying a password is refused at
    # start (_no_password_in_url); the password goes in ``password``.
    url: str = "redis://127.0.0.1:16379/0"
    # Redis AUTH password (``requirepass``), sent by every connection, one
    # node or each node of a cluster; also MODELGATE_REDIS__PASSWORD. A
    # SecretStr: reprs, ``model_dump`` and logs show ``**********``.
    password: SecretStr | None = None
    key_prefix: str = Field("mg", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    socket_timeout_s: float = Field(2.0, gt=0, le=60)
    # True: ``url`` names one node of a Redis Cluster and the gateway finds
    # the others from it (docs/limits.md, "Redis Cluster").
    cluster: bool = False
    # After a Redis call times out or cannot connect, every Redis call of this
    # client fails at once for this long, then one call probes (docs/redis.md).
    breaker_cooldown_s: float = Field(5.0, gt=0, le=300)
    # Failed Redis calls in a row that open that breaker: a one-off blip then
    # costs no cool-down, a hung Redis at most this many timeouts per outage
    # (docs/redis.md; the trade-off in gateway/redis_breaker.py).
    breaker_failures: int = Field(3, ge=1, le=100)
    # Those failures count only while each call began within this many
    # seconds of the failure before it; 0 counts them however far apart
    # (docs/redis.md; the semantics in gateway/redis_breaker.py).
    breaker_window_s: float = Field(10.0, ge=0, le=3600)

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, url: str) -> str:
        # Refused rather than given a precedence: the point of ``password``
        # is that the secret is never in a plain string; a URL that carries
        # one would leak it whichever of the two won.
        try:
            parsed = urlsplit(url)
            has_password = parsed.password is not None
        except ValueError as exc:
            raise ValueError("not a valid Redis URL") from exc
        if has_password:
            raise ValueError(
                "the URL carries a password, which would show wherever the "
                "settings are printed; put it in redis.password "
                "(MODELGATE_REDIS__PASSWORD) and leave it out of the URL"
            )
        return url

    def password_value(self) -> str | None:
        """The password in clear, for the Redis client only; never log it."""
        return None if self.password is None else self.password.get_secret_value()


class AuthConfig(_Frozen):
    # A Fernet key (urlsafe base64, 32 bytes). Encrypts API-key secrets at rest
    # in Redis because the worker must recover them to check HMAC signatures.
    server_key: SecretStr | None = None
    server_key_file: Path = Path("var/server.key")
    max_clock_skew_s: float = Field(300.0, gt=0, le=86_400)
    key_cache_ttl_s: float = Field(1.0, ge=0, le=60)
    replay_window_s: float = Field(900.0, gt=0, le=7 * 86_400)

    @model_validator(mode="after")
    def _window_covers_skew(self) -> AuthConfig:
        # A request stamped max_clock_skew_s in the future stays acceptable
        # until 2 x skew after it was sent; its request id must be remembered
        # at least that long or it could be replayed.
        if self.replay_window_s < 2 * self.max_clock_skew_s:
            raise ValueError("replay_window_s must be at least 2 x max_clock_skew_s")
        return self


FailMode = Literal["retry", "open", "closed"]
_PLAN_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Longest GCRA window: a TAT key lives at most about one window (times
# burst / limit), so this also bounds how long a TAT key can live.
_MAX_WINDOW_S = 31 * 86_400


class RateRule(_Frozen):
    """One GCRA window: ``limit`` requests per ``window_s`` seconds, at most
    ``burst`` at once (default: ``limit``, rounded up).

    The emission interval is ``window_s / limit``; the burst tolerance is
    ``interval * (burst - 1)``. Unlike a fixed window, the allowance refills
    continuously, so no window edge lets twice the limit through.
    ``fail_mode`` (``None``: the plan's) says what happens to a request this
    rule judges while Redis cannot be reached; ``local_fraction`` scales the
    rule for the per-worker bucket used in ``open`` mode.
    """

    limit: float = Field(gt=0, le=1_000_000_000)
    window_s: float = Field(gt=0, le=_MAX_WINDOW_S)
    burst: int | None = Field(None, ge=1, le=1_000_000_000)
    fail_mode: FailMode | None = None
    local_fraction: float = Field(1.0, gt=0, le=1)

    @property
    def window_ms(self) -> int:
        return max(1, round(self.window_s * 1000))

    @property
    def effective_burst(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.limit))


class QuotaRule(_Frozen):
    """At most ``daily`` admitted requests per calendar day (UTC); the count
    resets at midnight UTC."""

    daily: int = Field(ge=1, le=1_000_000_000)
    fail_mode: FailMode | None = None
    local_fraction: float = Field(1.0, gt=0, le=1)


class InFlightRule(_Frozen):
    """At most ``limit`` requests admitted but not yet answered. A slot left
    by a worker that died before answering frees itself after
    ``ttl_s`` seconds."""

    limit: int = Field(ge=1, le=1_000_000)
    ttl_s: float = Field(300.0, ge=1, le=86_400)
    fail_mode: FailMode | None = None


class PlanConfig(_Frozen):
    """A named tier: GCRA windows, a daily quota and an in-flight cap, each
    optional. ``count_refused`` and ``fail_mode`` of ``None`` take the
    ``limits`` section's values."""

    rules: tuple[RateRule, ...] = ()
    quota: QuotaRule | None = None
    in_flight: InFlightRule | None = None
    count_refused: bool | None = None
    fail_mode: FailMode | None = None

    @field_validator("rules")
    @classmethod
    def _distinct_windows(cls, rules: tuple[RateRule, ...]) -> tuple[RateRule, ...]:
        # A rule's TAT key is named after its window, so two rules with one
        # window would share (and corrupt) one TAT.
        windows = [rule.window_ms for rule in rules]
        if len(set(windows)) != len(windows):
            raise ValueError("two rules of a plan have the same window_s")
        if len(rules) > 16:
            raise ValueError("at most 16 rules per plan")
        return rules


class LimitsConfig(_Frozen):
    rate_per_s: float = Field(50.0, gt=0, le=1_000_000)
    burst: int = Field(100, ge=1, le=1_000_000)
    count_refused: bool = False
    # What a rule without its own fail_mode does while Redis is unreachable:
    # "retry" rewinds the batch and serves it when Redis is back (no answer
    # until then), "open" admits up to a per-worker local cap, "closed"
    # answers STORE_UNAVAILABLE.
    fail_mode: FailMode = "retry"
    # Named tiers. "default" (used by keys without a plan, or naming a plan
    # that does not exist) is one 1 s rule of rate_per_s, burst, unless
    # defined here.
    plans: dict[Annotated[str, Field(pattern=_PLAN_NAME_PATTERN)], PlanConfig] = {}

    def plan(self, name: str) -> PlanConfig:
        """The plan called ``name``, or the default plan if there is none."""
        found = self.plans.get(name)
        if found is not None:
            return found
        return self.plans.get("default") or self.legacy_plan()

    def legacy_plan(self) -> PlanConfig:
        """The default plan when none is configured: ``rate_per_s`` per
        second, ``burst`` at once (the gateway's limit before plans)."""
        return PlanConfig(
            rules=(RateRule(limit=self.rate_per_s, window_s=1.0, burst=self.burst),)
        )


ActionName = Literal["allow", "flag", "throttle", "degrade", "block"]
# Output shaping, mildest first; see gateway/shaping.py.
DegradeLevel = Literal["full", "top_k", "rounded", "label"]


class LadderRule(_Frozen):
    """One rung of the policy ladder: when it fires and what it does.

    A rule fires when the query's risk reaches ``risk_at`` (and some detector
    flagged the query), or when the client's remembered flag count reaches
    ``after_flags``; set one or both. A ``shadow`` rule is evaluated and
    recorded as the would-be action but never enforced beyond an alert.
    """

    action: ActionName
    risk_at: float | None = Field(None, gt=0, le=100)
    after_flags: float | None = Field(None, gt=0, le=10_000)
    degrade: DegradeLevel = "top_k"
    shadow: bool = False

    @model_validator(mode="after")
    def _has_trigger(self) -> LadderRule:
        if self.risk_at is None and self.after_flags is None:
            raise ValueError("a ladder rule needs risk_at or after_flags")
        return self


class DegradeConfig(_Frozen):
    """How each degrade level shapes probabilities (gateway/shaping.py)."""

    top_k: int = Field(3, ge=1, le=1000)
    decimals: int = Field(1, ge=0, le=6)
    noise: Literal["none", "laplace", "gaussian"] = "none"
    # Scale of the noise added to each probability before renormalising
    # (Laplace b, or Gaussian sigma), in probability units.
    noise_scale: float = Field(0.0, ge=0, le=1)


class PolicyOverride(_Frozen):
    """Fields of :class:`PolicyConfig` a model or a plan may override; None
    (absent) keeps the less specific value."""

    rules: list[LadderRule] | None = None
    flag_at: float | None = Field(None, gt=0, le=100)
    block_at: float | None = Field(None, gt=0, le=100)
    block_after_flags: int | None = Field(None, ge=1, le=10_000)
    block_cooldown_s: float | None = Field(None, gt=0, le=30 * 86_400)
    flag_half_life_s: float | None = Field(None, ge=0, le=30 * 86_400)
    throttle_factor: float | None = Field(None, ge=1, le=1_000_000)
    throttle_s: float | None = Field(None, gt=0, le=30 * 86_400)
    hide_suspicion: bool | None = None
    hide_delay_s: float | None = Field(None, ge=0, le=30)
    hide_degrade: DegradeLevel | None = None
    degrade: DegradeConfig | None = None
    shadow: bool | None = None
    shadow_detectors: list[str] | None = None


class PolicyConfig(_Frozen):
    """Risk is the largest detector score divided by its threshold (1.0 = at
    threshold). ``flag_at`` and ``block_at`` are levels of that ratio."""

    flag_at: float = Field(1.0, gt=0, le=100)
    block_at: float = Field(1.5, gt=0, le=100)
    block_after_flags: int = Field(3, ge=1, le=10_000)
    block_cooldown_s: float = Field(600.0, ge=1, le=30 * 86_400)
    shadow: bool = False
    # The ladder (gateway/policy.py, docs/policy.md). ``rules`` None means the
    # three rules flag_at / block_at / block_after_flags spell out.
    rules: list[LadderRule] | None = None
    # Remembered flags halve every this many seconds; 0 = never forgotten.
    flag_half_life_s: float = Field(0.0, ge=0, le=30 * 86_400)
    # Throttle: the client's rate is divided by this factor for throttle_s.
    throttle_factor: float = Field(4.0, ge=1, le=1_000_000)
    throttle_s: float = Field(60.0, gt=0, le=30 * 86_400)
    # Hidden suspicion: a would-be block or throttle is served late (by
    # hide_delay_s) and shaped at hide_degrade instead of refused.
    hide_suspicion: bool = False
    hide_delay_s: float = Field(0.0, ge=0, le=30)
    hide_degrade: DegradeLevel = "rounded"
    degrade: DegradeConfig = DegradeConfig()
    # Detectors whose scores count toward the recorded would-be risk only.
    # ``coverage`` was in shadow until it scored in honest standard
    # deviations (its ratio score flagged 22 of 60 honest clients in a
    # `modelgate eval` run on 2026-12-04); see docs/extraction-detectors.md.
    shadow_detectors: list[str] = []
    models: dict[str, PolicyOverride] = {}
    plans: dict[str, PolicyOverride] = {}
    # Fusion (detectors/fusion.py): each detector's contribution to a client's
    # risk halves every risk_half_life_s seconds unless renewed; 0 = the
    # query's own scores alone (no memory).
    risk_half_life_s: float = Field(120.0, ge=0, le=30 * 86_400)
    # Per-detector weight on its score/threshold (default 1.0 each).
    detector_weights: dict[str, Annotated[float, Field(ge=0, le=100)]] = {}
    # A client in a linked group (gateway/groups.py) is judged on the larger
    # of its risk and its group's; "group" in shadow_detectors shadows this.
    group_risk: bool = True

    @field_validator("block_at")
    @classmethod
    def _block_not_below_flag(cls, value: float, info: Any) -> float:
        flag_at = info.data.get("flag_at")
        if flag_at is not None and value < flag_at:
            raise ValueError("block_at must be >= flag_at")
        return value

    @model_validator(mode="after")
    def _overrides_resolve(self) -> PolicyConfig:
        # Check every model-and-plan combination now, so that a bad override
        # fails at start rather than on the first query that needs it.
        for model in [None, *self.models]:
            for plan in [None, *self.plans]:
                self.resolve(model, plan)
        return self

    def ladder(self) -> list[LadderRule]:
        """The rules in force: ``rules``, or the three the scalar fields
        describe (flag at ``flag_at``, block at ``block_at`` or after
        ``block_after_flags`` flags), which is the behaviour before the
        ladder existed."""
        if self.rules is not None:
            return list(self.rules)
        return [
            LadderRule(action="flag", risk_at=self.flag_at),
            LadderRule(action="block", risk_at=self.block_at),
            LadderRule(action="block", after_flags=self.block_after_flags),
        ]

    def resolve(self, model: str | None, plan: str | None) -> PolicyConfig:
        """The policy for one model and plan: these defaults, overridden by
        ``plans[plan]``, then by ``models[model]`` (the most specific: a
        model's sensitivity is a property of the asset being protected)."""
        update: dict[str, Any] = {}
        for override in (self.plans.get(plan or ""), self.models.get(model or "")):
            if override is not None:
                update.update(override.model_dump(exclude_none=True))
        if "degrade" in update:
            update["degrade"] = DegradeConfig(**update["degrade"])
        if "rules" in update:
            update["rules"] = [LadderRule(**r) for r in update["rules"]]
        resolved = self.model_copy(update={**update, "models": {}, "plans": {}})
        if resolved.block_at < resolved.flag_at:
            raise ValueError("block_at must be >= flag_at")
        return resolved


class BackendConfig(_Frozen):
    """Where one served model runs (see docs/backends.md).

    ``skops`` and ``onnx`` run in the worker from ``models.directory``;
    ``oip`` calls an Open Inference Protocol v2 server over HTTP at ``url``.
    The timeouts, retries and breaker settings apply to ``oip`` only.
    """

    kind: Literal["skops", "onnx", "oip"] = "skops"
    # No default on purpose: a remote backend is always named explicitly.
    url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    # The model's name (and version) on the remote server; default: ours.
    remote_name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,200}$")
    remote_version: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,200}$")
    # The output tensor holding class probabilities; default "probabilities"
    # for onnx (skl2onnx's name) and "predict_proba" for oip (MLServer's).
    output: str | None = Field(None, min_length=1, max_length=200)
    connect_timeout_s: float = Field(1.0, gt=0, le=60)
    read_timeout_s: float = Field(5.0, gt=0, le=600)
    retries: int = Field(2, ge=0, le=10)
    retry_backoff_s: float = Field(0.05, ge=0, le=10)
    max_connections: int = Field(8, ge=1, le=1024)
    # A batch is sent in calls of at most this many rows, one after another,
    # so a server with a request-size limit still serves large batches.
    max_batch_rows: int = Field(1024, ge=1, le=1_000_000)
    # The longest one batch waits for the model, every call, retry, back-off
    # and byte of every answer included: ``read_timeout_s`` bounds each
    # socket read only, so a server trickling its answer would otherwise hold
    # the batch for as long as it likes.
    call_timeout_s: float = Field(30.0, gt=0, le=3600)
    breaker_failures: int = Field(5, ge=1, le=10_000)
    breaker_cooldown_s: float = Field(10.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _oip_has_url(self) -> BackendConfig:
        if self.kind == "oip" and self.url is None:
            raise ValueError("an oip backend needs a url")
        return self


class ModelsConfig(_Frozen):
    directory: Path = Path("var/models")
    serve: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]] = ["digits"]
    # Per-model backend; a served model not named here runs in-process (skops).
    backends: dict[str, BackendConfig] = {}

    @model_validator(mode="after")
    def _backends_are_served(self) -> ModelsConfig:
        # A backend for a model not served is almost surely a typo in a name.
        unknown = sorted(set(self.backends) - set(self.serve))
        if unknown:
            raise ValueError(f"backends configured for models not served: {unknown}")
        return self


class WorkerConfig(_Frozen):
    worker_id: str = Field(
        default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}",
        max_length=200,
    )
    metrics_port: int = Field(9464, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    reply_topic_prefix: str = Field("modelgate.responses", pattern=_TOPIC_PATTERN)
    # Largest answer kept for client retries (gateway/replay.py), in bytes;
    # 0 keeps none. The digits model's answers are about 400 bytes.
    replay_max_bytes: int = Field(65_536, ge=0, le=1_048_576)
    # How often, in seconds, the detector state of clients seen since the
    # last save goes to Redis, so a crashed worker's successor loses at most
    # this much history; 0 saves at hand-over and stop only.
    checkpoint_interval_s: float = Field(30.0, ge=0, le=86_400)
    # A client silent this long, in seconds, is saved and dropped from
    # memory (it is loaded again when it returns), so a worker's memory
    # follows its active clients rather than every client it has ever seen.
    client_idle_s: float = Field(900.0, gt=0, le=7 * 86_400)
    # At most this many clients are saved per batch, so a checkpoint of many
    # clients is spread over batches instead of stalling one.
    checkpoint_max_clients: int = Field(2_000, ge=1, le=1_000_000)
    # How often, in seconds, the detectors' live baselines (what they learnt
    # from honest traffic, gateway/baselines.py) go to Redis; they are also
    # saved at a clean stop. 0 saves at stop only.
    baseline_save_interval_s: float = Field(30.0, ge=0, le=86_400)
    # A saved live baseline older than this, in seconds, is ignored at start
    # (and expires from Redis): honest traffic of a day ago may no longer be
    # what honest looks like.
    baseline_max_age_s: float = Field(86_400.0, gt=0, le=30 * 86_400)


class LiveSettings(_Frozen):
    """Where the live configuration document travels (see gateway.liveconfig)."""

    topic: str = Field("modelgate.config", pattern=_TOPIC_PATTERN)
    # A worker whose acknowledgement is older than this is shown as stale.
    ack_ttl_s: float = Field(30.0, gt=0, le=86_400)
    # How often a worker re-states the version it runs.
    heartbeat_s: float = Field(5.0, gt=0, le=3_600)
    # Longest a publisher may hold the change lock (a crashed one frees it then).
    lock_ttl_s: float = Field(30.0, gt=0, le=600)


class AdminConfig(_Frozen):
    """The admin plane: API address, sessions, login protection, audit and the
    per-client view the workers keep for ``modelgate clients``."""

    host: str = "127.0.0.1"
    port: int = Field(8780, ge=0, le=65535)
    # Sessions are absolute, not sliding: a stolen token is useful for this
    # long at most.
    session_ttl_s: float = Field(900.0, ge=0.05, le=86_400)
    max_sessions_per_user: int = Field(20, ge=1, le=1000)
    # N failed logins (wrong password or code) within lockout_s lock the
    # account name for lockout_s.
    max_failures: int = Field(5, ge=1, le=1000)
    lockout_s: float = Field(900.0, ge=0.05, le=86_400)
    # Login attempts per source address per window, counted before any check.
    login_attempts_per_window: int = Field(20, ge=1, le=100_000)
    login_window_s: float = Field(60.0, ge=0.05, le=86_400)
    totp_issuer: str = Field("modelgate", min_length=1, max_length=64)
    # Argon2id cost: argon2-cffi's defaults (RFC 9106's second recommended
    # option: 3 passes over 64 MiB). Lower only where speed matters more than
    # resistance to offline guessing (tests).
    argon2_time_cost: int = Field(3, ge=1, le=20)
    argon2_memory_kib: int = Field(65_536, ge=8_192, le=4_194_304)
    audit_max_entries: int = Field(100_000, ge=100, le=10_000_000)
    # Each audit entry is also produced to kafka.topics.audit; an action waits
    # at most this long for the broker's acknowledgement, then proceeds
    # (the entry is in the Redis stream; the miss is logged at ERROR and
    # counted). See docs/admin.md, "Audit".
    audit_kafka_timeout_s: float = Field(2.0, gt=0, le=60)
    # HMAC-SHA256 key of the audit entries' chain (docs/admin.md, "Tamper
    # evidence"); unset: entries are hash-chained but not signed.
    audit_key: SecretStr | None = Field(None, min_length=16)
    # Keys audit_key held before, so that --verify still checks entries they
    # signed (each entry names its key's id); the admin API signs with none.
    audit_retired_keys: tuple[Annotated[SecretStr, Field(min_length=16)], ...] = Field(
        (), max_length=32
    )
    # How often the admin API re-sends audit entries that missed the topic.
    audit_forward_interval_s: float = Field(2.0, gt=0, le=3600)
    # Client view written by the workers.
    clients_top_max: int = Field(10_000, ge=10, le=1_000_000)
    client_history_max: int = Field(200, ge=1, le=100_000)
    client_history_interval_s: float = Field(10.0, ge=0, le=3600)
    client_view_ttl_s: float = Field(7 * 86_400.0, ge=1, le=90 * 86_400)
    # Prometheus /metrics on a listener of its own, never on ``port``
    # (docs/metrics.md); 0 turns it off, as ``worker.metrics_port``.
    metrics_port: int = Field(9466, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Addresses or networks of reverse proxies whose X-Forwarded-For is
    # believed (docs/admin.md, "Behind a proxy"). Empty: the header is
    # ignored and the source is the peer's address, whoever sends it.
    trusted_proxies: list[str] = Field(default_factory=list, max_length=256)
    # Request bodies above this get 413 before they are read whole: the
    # login route takes bodies from anyone. The largest a legitimate call
    # sends is a whole configuration document (PUT /config), a few KiB.
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, proxies: list[str]) -> list[str]:
        # uvicorn takes a name it cannot parse as a literal to compare with
        # the peer's text and never says so; an address or a network is
        # checked here so a typo fails at start instead of trusting no one.
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address or network") from None
        return proxies


class CrossClientConfig(_Frozen):
    """The fingerprint store shared by all workers and the links between keys
    (``gateway.groups``)."""

    enabled: bool = True
    # How long a stored fingerprint counts; also the expiry of its Redis keys.
    fingerprint_ttl_s: float = Field(600.0, gt=0, le=7 * 86_400)
    entries_per_hash: int = Field(4, ge=1, le=1024)
    # Near-duplicate reports between two keys within link_window_s that link
    # them. Honest digit replays share a handful at most (docs/detectors.md).
    link_min_shared: int = Field(10, ge=1, le=1_000_000)
    link_window_s: float = Field(600.0, gt=0, le=7 * 86_400)
    link_ttl_s: float = Field(3600.0, gt=0, le=30 * 86_400)
    # How long a client's latest risk is kept for its group's risk.
    risk_ttl_s: float = Field(600.0, gt=0, le=7 * 86_400)
    # Rows of a batch sent to the shared store: those whose worker-local
    # fingerprint found a near-duplicate, plus one in store_sample_every of
    # the others (by input key, so every worker samples the same inputs), at
    # most store_max_rows; 1 and a large cap send every row.
    store_sample_every: int = Field(8, ge=1, le=1_000_000)
    store_max_rows: int = Field(128, ge=1, le=100_000)
    # Region links (docs/region-links.md): keys whose unusual queries land in
    # the same rare coarse region of the input space (detectors.region).
    # Live but for the map and store sizes (docs/live-config.md).
    # A row is stored only when ood judged it an
    # outlier and at most region_rare_share of the reference falls in its
    # region; two keys get a report per such row of one in a region the
    # other stored a row in within link_window_s, and region_min_shared
    # reports in link_window_s link them (measured honest pairs: see the doc).
    region_enabled: bool = True
    region_min_shared: int = Field(10, ge=1, le=1_000_000)
    region_components: int = Field(4, ge=1, le=16)
    region_cell_sd: float = Field(1.0, gt=0, le=100)
    region_rare_share: float = Field(0.05, ge=0, le=1)
    # ... and only while at least this share of its client's recent queries
    # (ood's window) are outliers: honest keys sit near 2%.
    region_min_client_share: float = Field(0.1, ge=0, le=1)
    # Newest rows kept per region, and rows of a batch sent to Redis at most.
    region_entries: int = Field(32, ge=1, le=1024)
    region_max_rows: int = Field(128, ge=1, le=100_000)


class FeedbackConfig(_Frozen):
    """The poisoning guard (``modelgate guard run``, docs/feedback-guard.md).

    ``params`` are :class:`detectors.poisoning.PoisoningParams` fields, checked
    when the guard starts. ``calibration_files`` names, per model outside the
    zoo, a ``.npz`` of clean labelled rows (``x``, ``y``) to calibrate on.
    """

    group_id: str = Field("modelgate-guard", min_length=1, max_length=200)
    # Score and record every verdict, but accept every valid record.
    shadow: bool = False
    # Models whose feedback is screened; empty: models.serve.
    models: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]] = []
    params: dict[str, Any] = {}
    calibration_files: dict[str, Path] = {}
    max_batch_records: int = Field(200, ge=1, le=10_000)
    # Per-submitter state is saved to Redis after every batch and expires
    # after this long without feedback from the submitter.
    state_ttl_s: float = Field(30 * 86_400.0, ge=60, le=365 * 86_400)
    # Prometheus /metrics of the guard (docs/metrics.md); the port follows
    # the worker's, front door's and admin API's (9464-9466) so all four can
    # run on one host. 0 turns it off, as ``worker.metrics_port``.
    metrics_port: int = Field(9467, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"


class ForwardConfig(_Frozen):
    """The alert forwarder (``modelgate alerts-forward``, docs/alerts.md)."""

    # Prometheus /metrics of the forwarder; after the guard's 9467, so all
    # five kinds of process can run on one host. 0 turns it off, as
    # ``worker.metrics_port``.
    metrics_port: int = Field(9468, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"


class MonitoringConfig(_Frozen):
    """Where Alertmanager sends notifications (infra/alertmanager.sh,
    ``modelgate monitoring alertmanager-config``, docs/monitoring.md).

    ``webhook_url``: Alertmanager POSTs each notification there (its webhook
    format, not CloudEvents); None (the default) sends none, and alerts are
    only shown by Alertmanager itself. A SecretStr: chat and incident
    webhooks carry their credential in the URL.
    """

    webhook_url: SecretStr | None = None

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value()
        # Alertmanager refuses its whole configuration over a control
        # character in a URL, so `make monitor` would not start; a space is
        # no URL either. Refused here, where the setting is named.
        if any(c.isspace() or not c.isprintable() for c in url):
            raise ValueError("webhook_url holds a space or a control character")
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises on a port out of range
        except ValueError:
            raise ValueError("webhook_url has an invalid port") from None
        # The URL itself stays out of the message: it may hold the secret.
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook_url must be an http or https URL")
        return value


def _default_instance_id() -> str:
    """Host name and pid, reduced to what a topic name allows: every process
    loads this section, so the default must validate on any host."""
    host = "".join(
        c if c.isascii() and (c.isalnum() or c in "._-") else "-"
        for c in os.uname().nodename
    )
    return f"{host[:28] or 'host'}-{os.getpid()}"


class FrontDoorConfig(_Frozen):
    """The HTTP front door (``modelgate frontdoor serve``).

    Each process reads replies on its own topic,
    ``<worker.reply_topic_prefix>.fd-<instance_id>``, created at start. A
    stable ``instance_id`` per process slot reuses one topic across restarts
    and keeps it at stop (a worker may still be answering into it); the
    default (host and pid) makes a new one per process, deleted at a clean
    stop since no later process reads it.
    """

    # Loopback by default: exposing the front door is a deliberate choice.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    instance_id: str = Field(
        default_factory=_default_instance_id,
        pattern=r"^[A-Za-z0-9._-]{1,40}$",
    )
    # Request bodies above this are refused with 413 before being read whole;
    # JSON numbers take ~10 bytes each, so 1 MiB holds about 100k values.
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    # How long an inference waits for the workers' reply before a 504.
    reply_timeout_s: float = Field(10.0, gt=0, le=600)
    # Longest ``parameters`` object passed through, as encoded JSON bytes.
    max_parameters_bytes: int = Field(4096, ge=0, le=65_536)
    # Not ready until this long after the reply topic exists. A worker lists
    # topics again at most every 2 s when a request names a reply topic it
    # does not know (``_UNKNOWN_REFRESH_S`` in gateway/answers.py) and answers
    # on the shared topic meanwhile; past that delay, the first request's
    # listing is sure to include this topic.
    reply_topic_settle_s: float = Field(2.5, ge=0, le=60)
    # Prometheus /metrics on a listener of its own, never on the client-facing
    # ``port`` (docs/metrics.md); 0 turns it off, as ``worker.metrics_port``.
    metrics_port: int = Field(9465, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"


class Settings(BaseSettings):
    """All configuration of one process. Frozen; build a new one to change it."""

    model_config = SettingsConfigDict(
        env_prefix="MODELGATE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    policy: PolicyConfig = PolicyConfig()
    models: ModelsConfig = ModelsConfig()
    worker: WorkerConfig = WorkerConfig()
    frontdoor: FrontDoorConfig = FrontDoorConfig()
    # Per-detector parameter overrides, validated by each detector's Params model.
    detectors: dict[str, dict[str, Any]] = {}
    live: LiveSettings = LiveSettings()
    admin: AdminConfig = AdminConfig()
    cross_client: CrossClientConfig = CrossClientConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    forward: ForwardConfig = ForwardConfig()
    monitoring: MonitoringConfig = MonitoringConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file is named at load time, not import time, so that a command's
        # --config option (which sets MODELGATE_CONFIG) takes effect.
        toml_file = os.environ.get("MODELGATE_CONFIG", "modelgate.toml")
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )


def load_settings(**overrides: Any) -> Settings:
    """Load and validate settings, turning pydantic's error into a ConfigError
    whose message names each bad field."""
    try:
        return Settings(**overrides)
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
