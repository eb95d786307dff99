"""Exit codes of the long-running commands: a bad configuration is 2 for
every command (the documented contract of ``CONFIG_INVALID``), including one
that only shows once the service starts, such as a taken metrics port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from gateway.cli import app
from gateway.metrics import start_metrics_server


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


class _OpensItsMetricsFirst:
    """Stands in for the worker or the guard: both open their metrics listener
    while starting, before they join their consumer group, so the real
    listener's error on a taken port is what the command meets."""

    setting = "worker"
    owner = "worker"
    port = 0

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    async def __aenter__(self) -> _OpensItsMetricsFirst:
        start_metrics_server(
            CollectorRegistry(), "127.0.0.1", self.port, self.setting, self.owner
        )
        raise AssertionError("the taken port was bound")

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(
    ("argv", "module", "name", "setting", "owner"),
    [
        (["worker"], "gateway.worker", "Worker", "worker", "worker"),
        (["guard", "run"], "gateway.feedback", "FeedbackGuard", "feedback", "guard"),
    ],
)
def test_a_taken_metrics_port_exits_2_like_the_serve_commands(
    monkeypatch: pytest.MonkeyPatch,
    taken_port: int,
    argv: list[str],
    module: str,
    name: str,
    setting: str,
    owner: str,
) -> None:
    import importlib

    import threadpoolctl

    # The commands cap BLAS threads for the whole process; not in the test's.
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", lambda *a, **k: None)
    attrs = {"setting": setting, "owner": owner, "port": taken_port}
    fake = type(name, (_OpensItsMetricsFirst,), attrs)
    monkeypatch.setattr(importlib.import_module(module), name, fake)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert f"error [CONFIG_INVALID]: {setting}.metrics_port {taken_port}" in (
        result.output
    )


def test_a_taken_metrics_port_stops_the_alert_forwarder_before_kafka(
    monkeypatch: pytest.MonkeyPatch, taken_port: int
) -> None:
    import gateway.alert_forward as forward

    class NeverRuns:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("the forwarder started with its port taken")

    monkeypatch.setattr(forward, "AlertForwarder", NeverRuns)
    monkeypatch.setenv("MODELGATE_FORWARD__METRICS_PORT", str(taken_port))
    result = CliRunner().invoke(
        app, ["alerts-forward", "--url", "http://127.0.0.1:9/hook"]
    )
    assert result.exit_code == 2, result.output
    assert f"error [CONFIG_INVALID]: forward.metrics_port {taken_port}" in (
        result.output
    )


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_feedback_rejected_refuses_a_limit_under_one(limit: str) -> None:
    """``--limit 0`` printed "0 rejected records" whatever the topic held."""
    result = CliRunner().invoke(app, ["feedback", "rejected", "--limit", limit])
    assert result.exit_code == 2, result.output
    assert "--limit" in result.output, result.output


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "--token", "", "--sample", "0"],
        ["feedback", "send", "rows.csv", "--token", " ", "--client-id", "c"],
    ],
)
def test_an_empty_token_says_none_was_given(
    argv: list[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--token ""`` was called malformed; it is missing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text("1,2,0\n3,4,1\n")
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "error [AUTH_MISSING]: no API key token given" in result.output
    assert "malformed" not in result.output


@pytest.mark.parametrize("data", ["[NaN, 1]", "[1, Infinity]", "[1e39, 1]"])
def test_send_refuses_values_json_cannot_carry(
    data: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--data '[NaN]'`` went out as null and came back SCHEMA_INVALID "got
    null"; 1e39 is infinite as FP32. Refused before anything is sent."""
    # Nothing listens here: were the request sent, the command would fail
    # on the broker, not on the data.
    monkeypatch.setenv("MODELGATE_KAFKA__BOOTSTRAP", "127.0.0.1:1")
    token = "mgk_000000000000." + "A" * 43
    argv = ["send", "--token", token, "--client-id", "c", "--timeout-s", "1"]
    result = CliRunner().invoke(app, [*argv, "--data", data])
    assert result.exit_code == 2, result.output
    assert "NaN or infinity" in result.output, result.output
