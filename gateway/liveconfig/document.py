"""The live configuration document, its versioned records, and edits to it.

Pure logic: pydantic models, dotted-path edits and field-level diffs. No Kafka,
Redis or FastAPI import, so the worker, the CLI and the admin API validate a
document the same way.

The document holds the existing settings models by reference
(:class:`~gateway.config.LimitsConfig`, :class:`~gateway.config.PolicyConfig`),
so a field added there is live-tunable at once. Detector parameters are limited
to each detector's ``_mutable_params``: the others shape per-client state and
need a restart with a new settings file. Cross-client link parameters
(``links``) are limited to :data:`LIVE_LINK_FIELDS` of
:class:`~gateway.config.CrossClientConfig`, validated by that model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from detectors.registry import DETECTORS
from gateway.config import CrossClientConfig, LimitsConfig, PolicyConfig, Settings
from gateway.errors import ConfigError

logger = logging.getLogger(__name__)

ChangeKind = Literal["initial", "set", "apply", "rollback"]


class ConfigConflict(ConfigError):
    """A change was based on a version that is no longer the current one."""

    default_code = "CONFIG_CONFLICT"


class UnknownVersion(ConfigError):
    """A version that was never published (or a malformed version number)."""

    default_code = "CONFIG_UNKNOWN_VERSION"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_detectors(value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every registered detector with all its live parameters, validated
    through the detector's own ``Params`` model on top of its defaults."""
    unknown = sorted(set(value) - set(DETECTORS))
    if unknown:
        raise ValueError(
            f"detectors.{unknown[0]}: unknown detector "
            f"(rule: one of {', '.join(sorted(DETECTORS))})"
        )
    full: dict[str, dict[str, Any]] = {}
    for name, cls in DETECTORS.items():
        given = dict(value.get(name, {}))
        for key in given:
            if key not in cls.Params.model_fields:
                raise ValueError(f"detectors.{name}.{key}: unknown parameter")
            if key not in cls._mutable_params:
                raise ValueError(
                    f"detectors.{name}.{key}: cannot change while running "
                    "(rule: it shapes stored per-client state; set it in the "
                    "settings file and restart the workers)"
                )
        try:
            params = cls.Params.model_validate({**cls.Params().model_dump(), **given})
        except pydantic.ValidationError as exc:
            raise ValueError(
                "; ".join(
                    f"detectors.{name}.{'.'.join(str(p) for p in err['loc'])}: "
                    f"{err['msg']} (rule: {err['type']})"
                    for err in exc.errors()
                )
            ) from exc
        dumped = params.model_dump(mode="json")
        full[name] = {k: dumped[k] for k in sorted(cls._mutable_params)}
    return full


# Cross-client fields that are thresholds, windows or per-batch budgets read
# afresh for every batch. The others shape what is stored in Redis or fitted
# at start (fingerprint_ttl_s and entries_per_hash size the shared fingerprint
# lists every worker reads, region_components and region_cell_sd define the
# region map fitted on the reference, region_entries sizes the shared region
# lists): they stay in the settings file.
LIVE_LINK_FIELDS: tuple[str, ...] = (
    "enabled",
    "link_min_shared",
    "link_window_s",
    "link_ttl_s",
    "risk_ttl_s",
    "store_sample_every",
    "store_max_rows",
    "region_enabled",
    "region_min_shared",
    "region_rare_share",
    "region_min_client_share",
    "region_max_rows",
)


def live_links(config: CrossClientConfig) -> dict[str, Any]:
    """The live part of a ``[cross_client]`` table, as plain data."""
    dumped = config.model_dump(mode="json")
    return {k: dumped[k] for k in LIVE_LINK_FIELDS}


def _check_links(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """All live cross-client fields, validated by ``CrossClientConfig`` on top
    of its defaults; restart-only and unknown fields refused by name."""
    if value is None:
        return None
    for key in value:
        if key not in CrossClientConfig.model_fields:
            raise ValueError(f"links.{key}: unknown field")
        if key not in LIVE_LINK_FIELDS:
            raise ValueError(
                f"links.{key}: cannot change while running (rule: it shapes "
                "the shared Redis store or the fitted region map; set it in "
                "[cross_client] of the settings file and restart the workers)"
            )
    try:
        config = CrossClientConfig.model_validate(value)
    except pydantic.ValidationError as exc:
        raise ValueError(
            "; ".join(
                f"links.{'.'.join(str(p) for p in err['loc'])}: "
                f"{err['msg']} (rule: {err['type']})"
                for err in exc.errors()
            )
        ) from exc
    return live_links(config)


class LiveConfig(_Frozen):
    """Everything an operator may change while the workers run.

    ``policy.shadow`` is the global shadow flag (rules recorded, nothing
    enforced); ``detector_shadow`` puts single detectors in shadow: they are
    still scored and recorded but their flags do not drive policy.
    """

    limits: LimitsConfig = LimitsConfig()
    policy: PolicyConfig = PolicyConfig()
    detectors: dict[str, dict[str, Any]] = Field(
        default_factory=dict, validate_default=True
    )
    detector_shadow: dict[str, bool] = Field(default_factory=dict)
    # None: the section is absent (a version published before it existed, or
    # a document applied without it) and every worker runs the live
    # cross-client fields of its own settings file.
    links: dict[str, Any] | None = None

    @field_validator("links")
    @classmethod
    def _links_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_links(value)

    @field_validator("detectors")
    @classmethod
    def _detectors_valid(
        cls, value: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        return _check_detectors(value)

    @field_validator("detector_shadow")
    @classmethod
    def _shadow_names_known(cls, value: dict[str, bool]) -> dict[str, bool]:
        unknown = sorted(set(value) - set(DETECTORS))
        if unknown:
            raise ValueError(
                f"detector_shadow.{unknown[0]}: unknown detector "
                f"(rule: one of {', '.join(sorted(DETECTORS))})"
            )
        return dict(sorted(value.items()))

    @classmethod
    def from_settings(cls, settings: Settings) -> LiveConfig:
        """Version 1's document: this process's settings, keeping only the
        detector parameters and cross-client fields that may change while
        running."""
        detectors = {
            name: {
                k: v
                for k, v in settings.detectors.get(name, {}).items()
                if k in DETECTORS[name]._mutable_params
            }
            for name in settings.detectors
            if name in DETECTORS
        }
        return validate_document(
            {
                "limits": settings.limits.model_dump(mode="json"),
                "policy": settings.policy.model_dump(mode="json"),
                "detectors": detectors,
                "links": live_links(settings.cross_client),
            }
        )

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class FieldChange(_Frozen):
    """One leaf of the document that changed; ``None`` for absent."""

    field: str
    old: Any = None
    new: Any = None


class ConfigRecord(_Frozen):
    """One published version: the full document and its audit trail."""

    version: int = Field(ge=1)
    parent: int = Field(ge=0)
    author: str = Field(min_length=1, max_length=200)
    at_ms: int = Field(ge=0)
    kind: ChangeKind
    document: LiveConfig
    changes: tuple[FieldChange, ...] = ()
    summary: str = Field("", max_length=4000)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, blob: bytes) -> ConfigRecord:
        """Raises ``ConfigError`` naming the field when ``blob`` is not a valid
        record (a worker then keeps its running version)."""
        try:
            return cls.model_validate_json(blob)
        except pydantic.ValidationError as exc:
            raise ConfigError(
                f"invalid configuration record: {_describe(exc)}"
            ) from exc


def record_key(version: int) -> bytes:
    """Kafka key of a version: one key per version, so compaction keeps every
    version (and collapses only a retried publish of the same one)."""
    return f"v{version:012d}".encode()


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if loc and msg.startswith(loc.split(".")[0] + "."):
            # Our own validators already name the full path and the rule.
            parts.append(msg)
        else:
            parts.append(f"{loc or '(document)'}: {msg} (rule: {err['type']})")
    return "; ".join(parts)


def _mismatch(path: str, wanted: str, given: str, rule: str) -> str:
    return f"{path}: Input should be {wanted}, not {given} (rule: {rule})"


def _scalar_type_mismatch(given: Any, kept: Any, path: str) -> str | None:
    """Where ``given`` (plain data) holds a scalar that validation converted
    to a number or boolean from another JSON type, as ``"<path>: <message>
    (rule: <rule>)"``, else None.

    Pydantic's lax mode reads ``true`` as 1 for an int or float field, the
    string ``"81"`` as 81 and ``"yes"`` or ``1`` as true for a boolean, so
    ``config set limits.burst=true`` published a burst of 1 and a PATCH with
    ``"policy.shadow": "yes"`` turned shadow mode on: a typo or a client's
    quoting that silently retunes every worker. Strict mode would also refuse
    the strings a settings file's environment variables carry, hence this
    walk over the documents made here only. The CLI parses its text values
    as JSON first (:func:`parse_value`), so ``limits.burst=81`` stays a number.
    """
    if isinstance(kept, bool):
        if isinstance(given, str):
            return _mismatch(path, "a boolean", "a string", "string_not_boolean")
        if isinstance(given, int | float) and not isinstance(given, bool):
            return _mismatch(path, "a boolean", "a number", "number_not_boolean")
        return None
    if isinstance(kept, int | float):
        if isinstance(given, bool):
            return _mismatch(path, "a number", "a boolean", "bool_not_number")
        if isinstance(given, str):
            return _mismatch(path, "a number", "a string", "string_not_number")
        return None
    if isinstance(given, Mapping) and isinstance(kept, Mapping):
        pairs: list[tuple[str, Any, Any]] = [
            (str(k), v, kept[k]) for k, v in given.items() if k in kept
        ]
    elif isinstance(given, list) and isinstance(kept, list):
        pairs = [
            (str(i), g, k) for i, (g, k) in enumerate(zip(given, kept, strict=False))
        ]
    else:
        return None
    for key, value, counterpart in pairs:
        found = _scalar_type_mismatch(
            value, counterpart, f"{path}.{key}" if path else key
        )
        if found is not None:
            return found
    return None


def _unknown_policy_name(policy: PolicyConfig) -> str | None:
    """Why a detector named in ``policy`` is none, else None.

    A misspelt name matched no detector and changed nothing, yet was
    published as if it had (``policy.shadow_detectors=["odd"]``). Judged when
    a document is made, not when a record is read, so versions published
    before this check stay readable. "group" shadows the linked-group risk
    (``gateway.policy.GROUP``).
    """
    known = ", ".join(sorted(DETECTORS))
    listed = [("policy.shadow_detectors", policy.shadow_detectors)]
    for kind, overrides in (("models", policy.models), ("plans", policy.plans)):
        listed += [
            (f"policy.{kind}.{name}.shadow_detectors", o.shadow_detectors or [])
            for name, o in overrides.items()
        ]
    for where, names in listed:
        unknown = sorted(set(names) - set(DETECTORS) - {"group"})
        if unknown:
            return (
                f"{where}: unknown detector {unknown[0]!r} "
                f"(rule: one of {known} or group)"
            )
    unknown = sorted(set(policy.detector_weights) - set(DETECTORS))
    if unknown:
        return (
            f"policy.detector_weights.{unknown[0]}: unknown detector "
            f"(rule: one of {known})"
        )
    return None


def validate_document(data: Mapping[str, Any]) -> LiveConfig:
    """A ``LiveConfig`` from plain data, or a ``ConfigError`` naming each bad
    field and the rule it breaks."""
    try:
        document = LiveConfig.model_validate(dict(data))
    except pydantic.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_describe(exc)}") from exc
    unknown = _unknown_policy_name(document.policy)
    if unknown is not None:
        raise ConfigError(f"invalid configuration: {unknown}")
    mismatch = _scalar_type_mismatch(dict(data), document.as_dict(), "")
    if mismatch is not None:
        raise ConfigError(f"invalid configuration: {mismatch}")
    return document


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, booleans, lists),
    else the text itself. Pydantic then checks it against the field's type."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def get_path(document: LiveConfig, key: str) -> Any:
    """The value at dotted ``key`` (``policy.flag_at``), or ``ConfigError``."""
    node: Any = document.as_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{key}: no such field", code="CONFIG_NO_FIELD")
        node = node[part]
    return node


def with_changes(document: LiveConfig, changes: Mapping[str, Any]) -> LiveConfig:
    """``document`` with each dotted key set to its value, validated as a whole.

    Only the dict-valued sections (``detectors.<name>``, ``detector_shadow``,
    ``links``) accept new keys, which their validators then judge (so a
    restart-only ``links`` field is refused with its rule); anywhere else an
    unknown key is refused by name. An absent ``links`` section starts from
    ``CrossClientConfig``'s defaults: :meth:`ConfigService.set
    <gateway.liveconfig.service.ConfigService.set>` fills it from the
    publisher's settings first.
    """
    data = document.as_dict()
    if data.get("links") is None and any(k.split(".")[0] == "links" for k in changes):
        data["links"] = {}
    for key, value in changes.items():
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"{key!r}: not a dotted field name")
        node = data
        open_section = parts[0] in ("detectors", "detector_shadow", "links")
        for depth, part in enumerate(parts[:-1]):
            if open_section and depth > 0 and parts[0] != "links":
                # A detector not yet named: the validator judges the name.
                node.setdefault(part, {})
            child = node.get(part)
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"{where}: no such section")
            node = child
        leaf = parts[-1]
        if leaf not in node and not open_section:
            raise ConfigError(f"{key}: no such field")
        node[leaf] = value
    return validate_document(data)


def _leaves(data: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(data, dict):
        # An empty table has no leaves: it differs from a full one key by key.
        for key, value in data.items():
            _leaves(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = data


def diff(old: LiveConfig | None, new: LiveConfig) -> tuple[FieldChange, ...]:
    """Leaf-level differences from ``old`` to ``new``, sorted by field."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    if old is not None:
        _leaves(old.as_dict(), "", before)
    _leaves(new.as_dict(), "", after)
    return tuple(
        FieldChange(field=k, old=before.get(k), new=after.get(k))
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    )


def summarize(changes: tuple[FieldChange, ...], limit: int = 20) -> str:
    """``policy.flag_at: 1.0 -> 1.2; ...`` for logs and history listings."""
    parts = [
        f"{c.field}: {json.dumps(c.old)} -> {json.dumps(c.new)}"
        for c in changes[:limit]
    ]
    if len(changes) > limit:
        parts.append(f"... {len(changes) - limit} more")
    return "; ".join(parts) or "no change"
