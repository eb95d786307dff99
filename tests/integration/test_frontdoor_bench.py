"""``modelgate frontdoor bench`` at a tiny size: every process starts, every
request is answered, and the report has its figures and ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.frontdoor.bench import (
    BenchError,
    format_report,
    resolve_backend,
    run_http_bench,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


async def test_bench_report_shape(settings: Settings, tmp_path: Path) -> None:
    results = await run_http_bench(
        settings, requests=30, concurrency=3, workdir=tmp_path
    )
    assert set(results) == {"meta", "frontdoor", "baseline", "ratios"}
    for target in ("frontdoor", "baseline"):
        row = results[target]
        assert row["requests"] == 30 and row["ok"] == 30, row
        assert row["statuses"] == {"200": 30}, row
        assert row["throughput_rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"], row
    ratios = results["ratios"]
    assert set(ratios) == {"throughput", "p50", "p99"}
    assert all(v is not None and v > 0 for v in ratios.values()), ratios
    table = format_report(results)
    assert "front door" in table and "model straight" in table
    assert "latency p99 (ms)" in table


async def test_bench_against_mlserver(settings: Settings, tmp_path: Path) -> None:
    # MLServer's venv is installed by `make services` (as for the mlserver
    # fixture); the run starts and stops its own MLServer.
    assert resolve_backend("auto") == "mlserver"
    results = await run_http_bench(
        settings, requests=20, concurrency=2, workdir=tmp_path, backend="mlserver"
    )
    assert results["meta"]["backend"] == "mlserver"
    assert results["meta"]["baseline"] == "MLServer"
    for target in ("frontdoor", "baseline"):
        row = results[target]
        assert row["statuses"] == {"200": 20}, row
    assert "model straight: MLServer" in format_report(results)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(BenchError, match="backend must be one of"):
        resolve_backend("triton")
