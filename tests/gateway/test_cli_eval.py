"""``modelgate eval`` refuses bad arguments before touching any service."""

from __future__ import annotations

from typer.testing import CliRunner

from gateway.cli import app


def test_eval_refuses_an_unknown_model_with_a_stable_code() -> None:
    result = CliRunner().invoke(app, ["eval", "--models", "mnist", "--quick"])
    assert result.exit_code == 2, result.output
    assert "BAD_ARGUMENT" in result.output and "mnist" in result.output


def test_eval_needs_fifty_honest_clients_for_a_full_run() -> None:
    result = CliRunner().invoke(app, ["eval", "--benign", "10"])
    assert result.exit_code == 2, result.output
    assert "50" in result.output


def test_eval_refuses_a_non_positive_budget() -> None:
    result = CliRunner().invoke(app, ["eval", "--budget", "0", "--quick"])
    assert result.exit_code == 2, result.output
