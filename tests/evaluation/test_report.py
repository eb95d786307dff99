"""The verdict and the report files, from a fixed result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evaluation.ledger import ClientLedger
from evaluation.report import (
    DemoResult,
    exit_code,
    failures,
    render_markdown,
    write_report,
)


def _client(
    name: str, role: str, *, blocked: int = 0, alerts: int = 0, first: int | None = None
) -> dict[str, Any]:
    ledger = ClientLedger(name, role)
    summary = ledger.summary()
    summary.update(
        requests=100,
        allowed=100 - blocked,
        blocked=blocked,
        alerts=alerts,
        first_alert_query=first,
        first_alert_detector="ood" if alerts else None,
        first_alert_evidence="40 of the last 50 queries look unlike normal traffic"
        if alerts
        else None,
    )
    return summary


def _result(**changes: Any) -> DemoResult:
    clients = [
        _client("benign-00", "benign"),
        _client("benign-01", "benign"),
        _client("extractor", "extraction", blocked=10, alerts=3, first=55),
        _client("prober", "probing", blocked=1, alerts=2, first=12),
    ]
    result = DemoResult(
        run_id="run-1",
        quick=False,
        seed=0,
        started_at="2026-01-01T00:00:00+00:00",
        duration_s=200.0,
        traffic_s=120.0,
        clients=clients,
        extraction={
            "client": "extractor",
            "budget": 1500,
            "first_alert_query": 55,
            "first_refusal_query": 90,
            "gateway": {
                "queries": 89,
                "rounds": 4,
                "agreement": 0.5,
                "curve": [[10, 0.4], [20, 0.45], [40, 0.48], [89, 0.5]],
                "stopped_by": "BLOCKED",
            },
            "direct": {
                "queries": 1500,
                "rounds": 9,
                "agreement": 0.8,
                "curve": [[10, 0.4], [20, 0.45], [40, 0.48], [80, 0.6], [1500, 0.8]],
                "stopped_by": "BUDGET",
            },
        },
        probing={
            "client": "prober",
            "budget": 1200,
            "first_alert_query": 12,
            "first_refusal_query": 13,
            "gateway": {
                "queries": 12,
                "attempted": 1,
                "found": 1,
                "median_l2": 5.2,
                "stopped_by": "BLOCKED",
            },
            "direct": {
                "queries": 1150,
                "attempted": 5,
                "found": 5,
                "median_l2": 0.4,
                "stopped_by": None,
            },
        },
        alerts={"total": 5, "foreign": 0, "by_detector": {"ood": 3, "similarity": 2}},
    )
    for name, value in changes.items():
        setattr(result, name, value)
    return result


def test_passing_result_has_no_failures() -> None:
    result = _result()
    assert failures(result) == []
    assert exit_code(result) == 0


def test_blocked_benign_client_fails_the_demo() -> None:
    result = _result()
    result.clients[0]["blocked"] = 2
    assert exit_code(result) == 1
    assert failures(result) == ["benign client benign-00 was blocked 2 time(s)"]


@pytest.mark.parametrize("role", ["extraction", "probing"])
def test_unflagged_attacker_fails_the_demo(role: str) -> None:
    result = _result()
    for client in result.clients:
        if client["role"] == role:
            client["alerts"] = 0
    assert exit_code(result) == 1
    assert any("never flagged" in f and role in f for f in failures(result))


def test_missing_attacker_fails_the_demo() -> None:
    result = _result()
    result.clients = [c for c in result.clients if c["role"] != "probing"]
    assert "no probing attacker ran" in failures(result)


def test_markdown_has_the_client_table_and_the_comparison() -> None:
    text = render_markdown(_result())

    assert "**Result: PASS**" in text
    header = (
        "| client | role | requests | allowed | flagged | throttled | blocked |"
        " errors | alerts | first alert at query |"
    )
    assert header in text
    # Attackers first, then benign clients; missing values as a dash.
    assert "| extractor | extraction | 100 | 90 | 0 | 0 | 10 | 0 | 3 | 55 |" in text
    assert "| benign-00 | benign | 100 | 100 | 0 | 0 | 0 | 0 | 0 | – |" in text
    assert text.index("| extractor |") < text.index("| benign-00 |")
    assert "| through the gateway | 89 | 4 | 0.500 | BLOCKED |" in text
    assert "| without the gateway | 1500 | 9 | 0.800 | BUDGET |" in text
    assert "62% of what the same attack reaches without the gateway" in text
    assert "ood 3, similarity 2" in text
    assert "got *worse*" not in text


def test_markdown_says_why_it_failed_and_notes_a_falling_curve() -> None:
    result = _result()
    result.clients[1]["blocked"] = 1
    result.extraction["direct"]["curve"] = [[10, 0.6], [1500, 0.4]]
    text = render_markdown(result)
    assert "**Result: FAIL**: benign client benign-01 was blocked 1 time(s)" in text
    assert "got *worse*" in text


def test_write_report_writes_markdown_json_and_plot(tmp_path: Path) -> None:
    result = _result()
    paths = write_report(result, tmp_path / "out")

    assert paths["markdown"].read_text() == render_markdown(result)
    data = json.loads(paths["json"].read_text())
    assert data["exit_code"] == 0
    assert data["failures"] == []
    assert data["extraction"]["gateway"]["stopped_by"] == "BLOCKED"
    assert {c["client"] for c in data["clients"]} == {
        "benign-00",
        "benign-01",
        "extractor",
        "prober",
    }
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_copes_with_missing_curves(tmp_path: Path) -> None:
    result = _result()
    result.extraction = {"budget": 10, "gateway": {}, "direct": {}}
    paths = write_report(result, tmp_path)
    assert paths["plot"].stat().st_size > 0
