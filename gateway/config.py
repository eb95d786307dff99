"""Settings for every modelgate process, from a TOML file and ``MODELGATE_*``.

Precedence: keyword arguments, then environment (``MODELGATE_KAFKA__BOOTSTRAP``
for nested fields), then the TOML file named by ``MODELGATE_CONFIG`` (default
``modelgate.toml`` in the working directory, if present), then defaults. Unknown
keys are rejected so a typo fails at start instead of silently doing nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

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
    model_config = ConfigDict(frozen=True, extra="forbid")


class TopicsConfig(_Frozen):
    requests: str = Field("modelgate.requests", pattern=_TOPIC_PATTERN)
    responses: str = Field("modelgate.responses", pattern=_TOPIC_PATTERN)
    alerts: str = Field("modelgate.alerts", pattern=_TOPIC_PATTERN)
    decisions: str = Field("modelgate.decisions", pattern=_TOPIC_PATTERN)
    deadletter: str = Field("modelgate.deadletter", pattern=_TOPIC_PATTERN)
    requests_partitions: int = Field(6, ge=1, le=1024)
    other_partitions: int = Field(3, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1, le=16)

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
    # TODO: a password inside this URL would show in a repr of the settings;
    # a separate SecretStr password field (issue 4's production hardening)
    # would let Redis with AUTH be configured safely. Until then use a
    # loopback Redis without a password, as the local stack does.
    url: str = "redis://127.0.0.1:16379/0"
    key_prefix: str = Field("mg", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    socket_timeout_s: float = Field(2.0, gt=0, le=60)


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


class LimitsConfig(_Frozen):
    rate_per_s: float = Field(50.0, gt=0, le=1_000_000)
    burst: int = Field(100, ge=1, le=1_000_000)
    count_refused: bool = False


class PolicyConfig(_Frozen):
    """Risk is the largest detector score divided by its threshold (1.0 = at
    threshold). ``flag_at`` and ``block_at`` are levels of that ratio."""

    flag_at: float = Field(1.0, gt=0, le=100)
    block_at: float = Field(1.5, gt=0, le=100)
    block_after_flags: int = Field(3, ge=1, le=10_000)
    block_cooldown_s: float = Field(600.0, ge=1, le=30 * 86_400)
    shadow: bool = False

    @field_validator("block_at")
    @classmethod
    def _block_not_below_flag(cls, value: float, info: Any) -> float:
        flag_at = info.data.get("flag_at")
        if flag_at is not None and value < flag_at:
            raise ValueError("block_at must be >= flag_at")
        return value


class ModelsConfig(_Frozen):
    directory: Path = Path("var/models")
    serve: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]] = ["digits"]


class WorkerConfig(_Frozen):
    worker_id: str = Field(
        default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}",
        max_length=200,
    )
    metrics_port: int = Field(9464, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    reply_topic_prefix: str = Field("modelgate.responses", pattern=_TOPIC_PATTERN)


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
    ``<worker.reply_topic_prefix>.fd-<instance_id>``, created at start and
    kept at stop (a worker may still be answering into it). A stable
    ``instance_id`` per process slot reuses one topic across restarts; the
    default (host and pid) makes a new one per process.
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
    # does not know (``_UNKNOWN_REFRESH_S`` in gateway/worker.py) and answers
    # on the shared topic meanwhile; past that delay, the first request's
    # listing is sure to include this topic.
    reply_topic_settle_s: float = Field(2.5, ge=0, le=60)


class Settings(BaseSettings):
    """All configuration of one process. Frozen; build a new one to change it."""

    model_config = SettingsConfigDict(
        env_prefix="MODELGATE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
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
