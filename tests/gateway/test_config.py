from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError


def test_defaults_are_valid() -> None:
    settings = load_settings()
    assert settings.kafka.topics.requests == "modelgate.requests"
    assert settings.policy.block_at >= settings.policy.flag_at


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"policy": {"flag_at": -1}}, "policy.flag_at"),
        ({"policy": {"flag_at": 2.0, "block_at": 1.0}}, "policy.block_at"),
        ({"limits": {"rate_per_s": 0}}, "limits.rate_per_s"),
        ({"kafka": {"topics": {"requests": "bad topic!"}}}, "kafka.topics.requests"),
        ({"kafka": {"no_such_key": 1}}, "kafka.no_such_key"),
        ({"redis": {"key_prefix": ""}}, "redis.key_prefix"),
        ({"auth": {"max_clock_skew_s": 600, "replay_window_s": 900}}, "auth"),
    ],
)
def test_rejection_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    assert info.value.code == "CONFIG_INVALID"
    assert field in info.value.message, info.value.message


def test_environment_overrides_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELGATE_KAFKA__BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("MODELGATE_LIMITS__BURST", "7")
    settings = load_settings()
    assert settings.kafka.bootstrap == "127.0.0.1:1"
    assert settings.limits.burst == 7


def test_toml_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "modelgate.toml"
    config.write_text('[limits]\nrate_per_s = 3.5\n[kafka]\ngroup_id = "g2"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.limits.rate_per_s == 3.5
    assert settings.kafka.group_id == "g2"


def test_bad_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELGATE_LIMITS__BURST", "many")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "limits.burst" in info.value.message


def test_config_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text("[limits]\nburst = 11\n")
    monkeypatch.setenv("MODELGATE_CONFIG", str(config))
    assert load_settings().limits.burst == 11
