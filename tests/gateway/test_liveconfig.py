"""The live configuration document: validation, edits, diffs, records, and the
scorer taking a new version (pure logic, no services)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detectors.registry import DETECTORS
from gateway.batch import BatchItem
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.liveconfig.document import (
    ConfigRecord,
    LiveConfig,
    diff,
    get_path,
    record_key,
    validate_document,
    with_changes,
)
from gateway.liveconfig.service import load_document_file, parse_assignments
from gateway.metrics import WorkerMetrics
from gateway.models import ServedModel, ensure_digits_model, load_model
from gateway.scoring import Scorer


@pytest.mark.parametrize(
    ("changes", "field", "rule"),
    [
        ({"policy.flag_at": -1}, "policy.flag_at", "greater_than"),
        ({"policy.flag_at": "high"}, "policy.flag_at", "float_parsing"),
        ({"policy.block_at": 0.5}, "policy.block_at", "value_error"),
        ({"limits.burst": 0}, "limits.burst", "greater_than_equal"),
        ({"limits.rate_per_s": 0}, "limits.rate_per_s", "greater_than"),
        ({"detectors.similarity.eps": -0.1}, "detectors.similarity.eps", "rule"),
        ({"detectors.similarity.window": 5}, "detectors.similarity.window", "rule"),
        ({"detectors.similarity.nope": 1}, "detectors.similarity.nope", "unknown"),
        ({"detectors.nosuch.eps": 1}, "detectors.nosuch", "rule"),
        ({"detector_shadow.nosuch": True}, "detector_shadow.nosuch", "rule"),
        ({"detector_shadow.ood": "maybe"}, "detector_shadow.ood", "bool_parsing"),
        # Names that match no detector were published and changed nothing.
        ({"policy.shadow_detectors": ["odd"]}, "policy.shadow_detectors", "rule"),
        ({"policy.detector_weights": {"nope": 2}}, "weights.nope", "unknown"),
        (
            {"policy.models": {"digits": {"shadow_detectors": ["odd"]}}},
            "policy.models.digits.shadow_detectors",
            "unknown detector",
        ),
        # Lax pydantic read these booleans as 1 and published them.
        ({"limits.burst": True}, "limits.burst", "bool_not_number"),
        ({"policy.flag_at": True}, "policy.flag_at", "bool_not_number"),
        ({"detectors.ood.min_queries": True}, "detectors.ood.min_queries", "bool_not"),
        ({"policy.detector_weights": {"ood": False}}, "weights.ood", "bool_not"),
        (
            {"policy.rules": [{"action": "block", "risk_at": True}]},
            "policy.rules.0.risk_at",
            "bool_not_number",
        ),
        # Lax pydantic also read strings and 0/1 (a PATCH body's quoting).
        ({"limits.burst": "81"}, "limits.burst", "string_not_number"),
        ({"policy.flag_at": "1.2"}, "policy.flag_at", "string_not_number"),
        ({"policy.shadow": "yes"}, "policy.shadow", "string_not_boolean"),
        ({"policy.shadow": "true"}, "policy.shadow", "string_not_boolean"),
        ({"policy.shadow": 1}, "policy.shadow", "number_not_boolean"),
        ({"detector_shadow.ood": "true"}, "detector_shadow.ood", "string_not_bool"),
        (
            {"policy.rules": [{"action": "block", "risk_at": "2"}]},
            "policy.rules.0.risk_at",
            "string_not_number",
        ),
    ],
)
def test_refusal_names_field_and_rule(
    changes: dict[str, object], field: str, rule: str
) -> None:
    with pytest.raises(ConfigError) as info:
        with_changes(LiveConfig(), changes)
    assert info.value.code == "CONFIG_INVALID"
    assert field in info.value.message, info.value.message
    assert rule in info.value.message, info.value.message


def _float_fields() -> list[str]:
    """Every float leaf of the live document (limits, policy, every
    detector's live parameters, links), plus the optional floats that are
    unset by default."""
    doc = LiveConfig.from_settings(load_settings()).as_dict()
    found: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, float):
            found.append(path)

    walk(doc, "")
    return [*found, "detectors.ood.query_threshold", "detectors.knn.knn_threshold"]


def test_every_float_setting_says_nan_and_infinity_are_not_finite() -> None:
    """Regression: ``config set policy.flag_at=nan`` was refused as "should
    be less than or equal to 100", and an unbounded-above float such as
    ``limits.rate_per_s`` took ``inf``."""
    fields = _float_fields()
    assert {"policy.flag_at", "limits.rate_per_s", "detectors.similarity.eps"} <= set(
        fields
    ) and any(f.startswith("links.") for f in fields)
    document = LiveConfig.from_settings(load_settings())
    for field in fields:
        for text in ("nan", "inf", "-inf", "Infinity", "NaN"):
            # As `modelgate config set field=text` parses it.
            changes = parse_assignments([f"{field}={text}"])
            with pytest.raises(ConfigError) as info:
                with_changes(document, changes)
            message = info.value.message
            assert f"{field}: Input should be a finite number" in message, message
            assert "(rule: finite_number)" in message, message


@pytest.mark.parametrize("key", ["policy.flag_att", "policy", "limits.burst.x", ""])
def test_unknown_or_malformed_key_is_refused(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_changes(LiveConfig(), {key: 1})
    assert info.value.code == "CONFIG_INVALID"


def test_a_boolean_for_a_number_is_refused_as_the_cli_parses_it() -> None:
    """`modelgate config set limits.burst=true` published a burst of 1."""
    with pytest.raises(ConfigError) as info:
        with_changes(LiveConfig(), parse_assignments(["limits.burst=true"]))
    assert info.value.code == "CONFIG_INVALID"
    assert "limits.burst: Input should be a number" in info.value.message
    # Booleans where the field is one still pass.
    doc = with_changes(LiveConfig(), parse_assignments(["policy.shadow=false"]))
    assert doc.policy.shadow is False
    # The group risk is shadowed by the name "group".
    with pytest.raises(ConfigError) as info:
        with_changes(LiveConfig(), {"policy.shadow_detectors": ["odd"]})
    assert info.value.message == (
        "invalid configuration: policy.shadow_detectors: unknown detector 'odd' "
        "(rule: one of " + ", ".join(sorted(DETECTORS)) + " or group)"
    )
    doc = with_changes(LiveConfig(), {"policy.shadow_detectors": ["group", "ood"]})
    assert doc.policy.shadow_detectors == ["group", "ood"]


def test_the_cli_text_for_a_number_or_boolean_is_still_taken() -> None:
    """Strings are refused for numbers and booleans, but `config set` parses
    its text as JSON first, so the same settings typed there still work."""
    doc = with_changes(
        LiveConfig(),
        parse_assignments(
            ["limits.burst=81", "policy.shadow=true", "policy.flag_at=1.2"]
        ),
    )
    assert (doc.limits.burst, doc.policy.shadow, doc.policy.flag_at) == (81, True, 1.2)
    with pytest.raises(ConfigError, match="string_not_boolean"):
        with_changes(LiveConfig(), parse_assignments(["policy.shadow=yes"]))


def test_set_types_values_by_the_model() -> None:
    changes = parse_assignments(
        [
            "policy.flag_at=1.25",
            "policy.shadow=true",
            "limits.burst=7",
            "detectors.ood.min_queries=9",
            "detector_shadow.prada=true",
        ]
    )
    doc = with_changes(LiveConfig(), changes)
    assert doc.policy.flag_at == 1.25 and doc.policy.shadow is True
    assert doc.limits.burst == 7
    assert doc.detectors["ood"]["min_queries"] == 9
    assert doc.detector_shadow == {"prada": True}
    assert get_path(doc, "limits.burst") == 7
    with pytest.raises(ConfigError) as info:
        get_path(doc, "limits.nope")
    assert info.value.code == "CONFIG_NO_FIELD"
    with pytest.raises(ConfigError):
        parse_assignments(["policy.flag_at"])


def test_detectors_hold_every_live_parameter_and_only_those() -> None:
    doc = LiveConfig()
    # Every registered detector, not a fixed list: merged branches add some.
    assert set(doc.detectors) == set(DETECTORS)
    assert {"similarity", "ood", "prada"} <= set(doc.detectors)
    assert set(doc.detectors["similarity"]) == {"eps", "threshold", "min_queries"}


def test_from_settings_keeps_live_detector_values_only() -> None:
    settings = load_settings(
        policy={"flag_at": 1.1, "block_at": 2.0},
        limits={"burst": 3},
        detectors={"similarity": {"eps": 0.07, "window": 64}},
    )
    doc = LiveConfig.from_settings(settings)
    assert doc.policy.flag_at == 1.1 and doc.limits.burst == 3
    assert doc.detectors["similarity"]["eps"] == 0.07
    assert "window" not in doc.detectors["similarity"]


def test_diff_is_field_level() -> None:
    old = LiveConfig()
    new = with_changes(old, {"policy.flag_at": 1.3, "detector_shadow.ood": True})
    changes = diff(old, new)
    assert [(c.field, c.old, c.new) for c in changes] == [
        ("detector_shadow.ood", None, True),
        ("policy.flag_at", 1.0, 1.3),
    ]
    assert diff(new, new) == ()


def test_record_round_trip_and_refusal() -> None:
    doc = with_changes(LiveConfig(), {"limits.burst": 9})
    record = ConfigRecord(
        version=3, parent=2, author="cli:x", at_ms=1, kind="set", document=doc
    )
    assert ConfigRecord.decode(record.encode()) == record
    assert record_key(3) == b"v000000000003"
    bad = json.loads(record.encode())
    bad["document"]["policy"]["flag_at"] = -1
    with pytest.raises(ConfigError) as info:
        ConfigRecord.decode(json.dumps(bad).encode())
    assert "document.policy.flag_at" in info.value.message
    with pytest.raises(ConfigError):
        ConfigRecord.decode(b"\xff not json")


def test_document_files(tmp_path: Path) -> None:
    toml = tmp_path / "live.toml"
    toml.write_text("[policy]\nflag_at = 1.4\nblock_at = 2.0\n[limits]\nburst = 4\n")
    doc = validate_document(load_document_file(toml))
    assert doc.policy.flag_at == 1.4 and doc.limits.burst == 4
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError):
        load_document_file(bad)
    with pytest.raises(ConfigError):
        load_document_file(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def served_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    directory = tmp_path_factory.mktemp("models")
    ensure_digits_model(directory)
    return {"digits": load_model(directory, "digits")}


def _scorer(models: dict[str, ServedModel]) -> Scorer:
    return Scorer(load_settings(), models, WorkerMetrics())


def test_scorer_applies_all_or_nothing(served_models: dict[str, ServedModel]) -> None:
    scorer = _scorer(served_models)
    doc = with_changes(
        LiveConfig(),
        {
            "detectors.similarity.eps": 0.09,
            "policy.flag_at": 1.2,
            "policy.block_at": 2.0,
            "detector_shadow.ood": True,
        },
    )
    scorer.apply_live(doc.policy, doc.detectors, doc.detector_shadow)
    detectors = scorer._detectors["digits"]
    assert detectors["similarity"].params.eps == 0.09
    assert scorer.policy.config.flag_at == 1.2
    assert scorer.policy.config.shadow_detectors == ["ood"]

    # A structural parameter anywhere refuses the whole version: the prada
    # change named before it is not applied either.
    prada_eps = detectors["prada"].params.eps
    with pytest.raises(ValueError, match=r"similarity\.window"):
        scorer.apply_live(
            LiveConfig().policy,
            {"prada": {"eps": 0.2}, "similarity": {"eps": 0.01, "window": 64}},
            {},
        )
    assert detectors["prada"].params.eps == prada_eps
    assert detectors["similarity"].params.eps == 0.09
    assert scorer.policy.config.flag_at == 1.2
    assert scorer.policy.config.shadow_detectors == ["ood"]


def _probe_stream(scorer: Scorer, model: ServedModel) -> list[str]:
    """The actions policy takes on one client sending uniform noise, far from
    any digit: the out-of-distribution detector's textbook case."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(60):
        item = BatchItem(
            topic="t",
            partition=0,
            offset=i,
            value=b"",
            record_key="c",
            signature=None,
        )
        item.model = model
        item.rows = rng.uniform(0, 16, (1, model.reference.shape[1]))
        items.append(item)
    scorer._score(model, items)
    return [i.verdict.enforced if i.verdict else "none" for i in items]


def test_shadowed_detector_does_not_drive_policy(
    served_models: dict[str, ServedModel],
) -> None:
    model = served_models["digits"]
    assert {"flag", "block"} & set(_probe_stream(_scorer(served_models), model))

    scorer = _scorer(served_models)
    doc = LiveConfig()
    scorer.apply_live(doc.policy, doc.detectors, dict.fromkeys(doc.detectors, True))
    # Shadow enforces nothing: at most a flag, which only raises an alert
    # marked shadow (the would-be action goes to the decisions topic).
    assert set(_probe_stream(scorer, model)) <= {"allow", "flag"}


def test_a_record_published_before_the_name_check_stays_readable() -> None:
    """Workers must still read a version an older release published with a
    name the check now refuses, or they would drop the version in force."""
    document = LiveConfig().as_dict()
    document["policy"]["shadow_detectors"] = ["odd"]
    record = {
        "version": 2,
        "parent": 1,
        "author": "cli",
        "at_ms": 0,
        "kind": "set",
        "document": document,
    }
    decoded = ConfigRecord.decode(json.dumps(record).encode())
    assert decoded.document.policy.shadow_detectors == ["odd"]
