"""The benchmark runs and reports cost and state for every detector."""

from __future__ import annotations

import pytest

from detectors import DETECTORS, MAX_STATE_BYTES
from detectors.bench import measure


def test_measure_reports_every_detector() -> None:
    result = measure(n_clients=4, n_queries=30, batch_size=50)
    assert result["n_clients"] == 4 and result["n_queries"] == 30
    assert set(result["detectors"]) == set(DETECTORS)
    for entry in result["detectors"].values():
        assert entry["us_per_query"] > 0
        assert entry["wall_us_per_query"] > 0
        assert 0 < entry["state_bytes_per_client"] <= MAX_STATE_BYTES
        assert 0 < entry["dump_bytes_per_client"] <= MAX_STATE_BYTES
        assert entry["within_budget"]
    assert result["total_us_per_query"] == pytest.approx(
        sum(e["us_per_query"] for e in result["detectors"].values())
    )
    assert result["total_state_bytes"] == sum(
        e["state_bytes_per_client"] for e in result["detectors"].values()
    )
    # The whole suite keeps at most 32 KB for one client (issue 3).
    assert result["total_state_bytes"] <= MAX_STATE_BYTES


def test_measure_takes_the_median_of_runs() -> None:
    result = measure(n_clients=2, n_queries=10, batch_size=7, runs=3)
    for entry in result["detectors"].values():
        assert len(entry["runs_us_per_query"]) == 3
        assert min(entry["runs_us_per_query"]) <= entry["us_per_query"]
        assert entry["us_per_query"] <= max(entry["runs_us_per_query"])


def test_measure_refuses_empty_runs() -> None:
    with pytest.raises(ValueError):
        measure(n_clients=0, n_queries=10)
