"""A real Prometheus (Debian's, started by infra/prometheus.sh on a free
loopback port) scraping a real worker on the real broker and Redis: the
configuration `modelgate monitoring prometheus-config` writes reaches the
worker, the worker's series arrive, and every alert rule evaluates without
error against them."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Settings
from tests.integration.helpers import running_worker
from tests.integration.oip_servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "prometheus.sh"


@pytest.fixture
def prometheus_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for infra/prometheus.sh: its own state directory and port,
    a one-second interval, and every metrics port but the worker's off (so
    nothing is aimed at a port this test did not open)."""
    worker_port = free_port()
    env = {
        **os.environ,
        "MODELGATE_VAR": str(tmp_path),
        "MODELGATE_PROMETHEUS_PORT": str(free_port()),
        "MODELGATE_PROMETHEUS_INTERVAL_S": "1",
        "MODELGATE_WORKER__METRICS_PORT": str(worker_port),
        "MODELGATE_FRONTDOOR__METRICS_PORT": "0",
        "MODELGATE_ADMIN__METRICS_PORT": "0",
        "MODELGATE_FEEDBACK__METRICS_PORT": "0",
        "MODELGATE_FORWARD__METRICS_PORT": "0",
        # No Alertmanager here: firing alerts go nowhere.
        "MODELGATE_ALERTMANAGER_PORT": "0",
    }
    env.pop("MODELGATE_CONFIG", None)
    yield env
    subprocess.run([str(SCRIPT), "stop"], env=env, check=False, timeout=60)


async def _query(http: httpx.AsyncClient, path: str, **params: str) -> Any:
    answer = await http.get(path, params=params)
    answer.raise_for_status()
    body = answer.json()
    assert body["status"] == "success", body
    return body["data"]


async def test_prometheus_scrapes_a_worker_and_evaluates_every_rule(
    settings: Settings, prometheus_env: dict[str, str]
) -> None:
    worker_port = int(prometheus_env["MODELGATE_WORKER__METRICS_PORT"])
    section = settings.worker.model_copy(update={"metrics_port": worker_port})
    with_metrics = settings.model_copy(update={"worker": section})
    started = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "start"],
        env=prometheus_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    url = f"http://127.0.0.1:{prometheus_env['MODELGATE_PROMETHEUS_PORT']}"
    async with (
        running_worker(with_metrics),
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as http,
    ):
        async with asyncio.timeout(60):
            # Targets appear once service discovery has synced (seconds).
            while True:
                targets = (await _query(http, "/api/v1/targets"))["activeTargets"]
                if targets:
                    break
                await asyncio.sleep(0.5)
            assert [t["labels"]["job"] for t in targets] == ["modelgate-worker"]
            assert targets[0]["scrapeUrl"] == (
                f"http://127.0.0.1:{worker_port}/metrics"
            )
            while True:
                up = await _query(
                    http, "/api/v1/query", query='up{job="modelgate-worker"}'
                )
                version = await _query(
                    http, "/api/v1/query", query="modelgate_config_version"
                )
                if (
                    up["result"]
                    and up["result"][0]["value"][1] == "1"
                    and version["result"]
                ):
                    break
                await asyncio.sleep(0.5)
            # A rule not evaluated yet has health "unknown".
            while True:
                groups = (await _query(http, "/api/v1/rules"))["groups"]
                rules = [r for g in groups for r in g["rules"]]
                if all(r["health"] != "unknown" for r in rules):
                    break
                await asyncio.sleep(0.5)
    assert len(rules) >= 16
    assert {r["health"] for r in rules} == {"ok"}, [
        (r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"
    ]
    # A healthy worker sets nothing off.
    assert [r["name"] for r in rules if r["state"] == "firing"] == []
    # stop finds its Prometheus by state directory, without being told the port.
    portless = {
        k: v for k, v in prometheus_env.items() if k != "MODELGATE_PROMETHEUS_PORT"
    }
    stopped = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "stop"],
        env=portless,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "stopped" in stopped.stderr, stopped.stderr
    status = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "status"],
        env=portless,
        capture_output=True,
        timeout=30,
    )
    assert status.returncode == 3
