from __future__ import annotations

from typer.testing import CliRunner

from detectors import DETECTORS
from gateway.cli import app


def test_bench_detectors_reports_every_detector() -> None:
    # A budget no machine misses: this checks the report, not the speed.
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "detectors",
            "--clients",
            "5",
            "--queries",
            "40",
            "--budget-us",
            "1e9",
            "--runs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in DETECTORS:
        assert name in result.output, result.output
    assert "total" in result.output
    assert "time:" in result.output and "µs/query" in result.output
    assert "against 1e+09 µs: met" in result.output
    assert "state:" in result.output and "B/client against 32,768 B: met" in (
        result.output
    )


def test_bench_detectors_fails_over_budget() -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "detectors",
            "--clients",
            "5",
            "--queries",
            "40",
            "--budget-us",
            "0.001",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "against 0.001 µs: NOT met" in result.output
