"""``demo``, ``eval`` and ``bench`` say when they replace an address the
settings gave with the local stack's (pure logic, no services)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.stack import StackInfo, warn_settings_replaced

STACK = StackInfo(
    kafka_bootstrap="127.0.0.1:19092", redis_url="redis://127.0.0.1:16379/0"
)


def test_an_address_from_the_settings_file_that_is_replaced_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fresh user's modelgate.toml said 29092 and eval ran on 19092."""
    toml = tmp_path / "modelgate.toml"
    toml.write_text('[kafka]\nbootstrap = "127.0.0.1:29092"\n')
    monkeypatch.delenv("MODELGATE_KAFKA__BOOTSTRAP", raising=False)
    monkeypatch.setenv("MODELGATE_CONFIG", str(toml))
    settings = load_settings()
    with caplog.at_level("WARNING", logger="gateway.stack"):
        found = warn_settings_replaced(settings, STACK, "eval")
    assert found == ["kafka.bootstrap"]
    (record,) = caplog.records
    assert record.__dict__["given"] == "127.0.0.1:29092"
    assert record.__dict__["used"] == "127.0.0.1:19092"
    assert "MODELGATE_KAFKA_PORT" in record.getMessage()


def test_defaults_and_matching_addresses_are_not_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELGATE_KAFKA__BOOTSTRAP", raising=False)
    monkeypatch.delenv("MODELGATE_REDIS__URL", raising=False)
    monkeypatch.setenv("MODELGATE_CONFIG", str(tmp_path / "none.toml"))
    assert warn_settings_replaced(load_settings(), STACK, "demo") == []
    toml = tmp_path / "modelgate.toml"
    toml.write_text('[redis]\nurl = "redis://127.0.0.1:16379/0"\n')
    monkeypatch.setenv("MODELGATE_CONFIG", str(toml))
    assert warn_settings_replaced(load_settings(), STACK, "bench") == []
