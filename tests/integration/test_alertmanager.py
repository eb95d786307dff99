"""A rule firing for real, end to end: a real worker scraped by Debian's
Prometheus (infra/prometheus.sh), which sends to Debian's Alertmanager
(infra/alertmanager.sh), which notifies a webhook receiver this test runs,
all on free loopback ports. The worker is stopped, so ModelgateTargetDown
fires (its ``for:`` cut to 1 s in a copy of the rules) and arrives at the
webhook grouped by alertname and kind. The shipped inhibitions are checked
on the same Alertmanager through its API."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import Settings
from gateway.monitoring import ALERT_RULES
from tests.integration.helpers import running_worker
from tests.integration.oip_servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "infra" / "prometheus.sh"
ALERTMANAGER = ROOT / "infra" / "alertmanager.sh"


class Webhook:
    """Alertmanager's notifications, as POSTed to 127.0.0.1."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with webhook.changed:
                    webhook.payloads.append(body)
                    webhook.changed.notify_all()
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    async def wait_for(self, alertname: str, timeout_s: float) -> dict[str, Any]:
        """The first notification of a firing ``alertname``."""

        def found() -> dict[str, Any] | None:
            for payload in self.payloads:
                if (
                    payload["status"] == "firing"
                    and payload["groupLabels"].get("alertname") == alertname
                ):
                    return payload
            return None

        def wait() -> dict[str, Any] | None:
            with self.changed:
                self.changed.wait_for(lambda: found() is not None, timeout=timeout_s)
                return found()

        payload = await asyncio.to_thread(wait)
        assert payload is not None, f"no {alertname} notification: {self.payloads}"
        return payload


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    receiving = Webhook()
    yield receiving
    receiving.server.shutdown()
    receiving.server.server_close()


@pytest.fixture
def monitoring_env(tmp_path: Path, webhook: Webhook) -> Iterator[dict[str, str]]:
    """Environment for both scripts: one state directory, free ports, one-
    second intervals, the worker the only kind scraped, the webhook of the
    settings, and a copy of the rules whose ModelgateTargetDown waits 1 s."""
    document = yaml.safe_load(ALERT_RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "ModelgateTargetDown":
                rule["for"] = "1s"
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(document))
    env = {
        **os.environ,
        "MODELGATE_VAR": str(tmp_path),
        "MODELGATE_PROMETHEUS_PORT": str(free_port()),
        "MODELGATE_PROMETHEUS_INTERVAL_S": "1",
        "MODELGATE_PROMETHEUS_KINDS": "worker",
        "MODELGATE_PROMETHEUS_RULES": str(rules),
        "MODELGATE_ALERTMANAGER_PORT": str(free_port()),
        "MODELGATE_ALERTMANAGER_GROUP_WAIT_S": "1",
        "MODELGATE_ALERTMANAGER_GROUP_INTERVAL_S": "1",
        "MODELGATE_MONITORING__WEBHOOK_URL": webhook.url,
        "MODELGATE_WORKER__METRICS_PORT": str(free_port()),
    }
    env.pop("MODELGATE_CONFIG", None)
    yield env
    for script in (PROMETHEUS, ALERTMANAGER):
        subprocess.run([str(script), "stop"], env=env, check=False, timeout=60)


async def _run(script: Path, env: dict[str, str], *args: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


async def test_a_stopped_worker_reaches_the_webhook_through_alertmanager(
    settings: Settings, monitoring_env: dict[str, str], webhook: Webhook
) -> None:
    worker_port = int(monitoring_env["MODELGATE_WORKER__METRICS_PORT"])
    section = settings.worker.model_copy(update={"metrics_port": worker_port})
    with_metrics = settings.model_copy(update={"worker": section})
    await _run(ALERTMANAGER, monitoring_env, "start")
    prometheus = f"http://127.0.0.1:{monitoring_env['MODELGATE_PROMETHEUS_PORT']}"
    alertmanager = f"http://127.0.0.1:{monitoring_env['MODELGATE_ALERTMANAGER_PORT']}"
    # The generated configuration file holds the webhook URL: owner only.
    written = Path(monitoring_env["MODELGATE_VAR"]) / "alertmanager"
    assert (written / "alertmanager.yml").stat().st_mode & 0o077 == 0

    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        # Prometheus starts once the worker runs: a target down from the
        # first scrape would fire before the test stops anything.
        async with running_worker(with_metrics):
            await _run(PROMETHEUS, monitoring_env, "start")
            async with asyncio.timeout(30):
                # It knows its Alertmanager once discovery has synced.
                while True:
                    answer = await http.get(f"{prometheus}/api/v1/alertmanagers")
                    active = answer.json()["data"]["activeAlertmanagers"]
                    if active:
                        break
                    await asyncio.sleep(0.3)
            assert [a["url"] for a in active] == [f"{alertmanager}/api/v2/alerts"]
            async with asyncio.timeout(30):
                while True:
                    answer = await http.get(
                        f"{prometheus}/api/v1/query",
                        params={"query": 'up{job="modelgate-worker"}'},
                    )
                    result = answer.json()["data"]["result"]
                    if result and result[0]["value"][1] == "1":
                        break
                    await asyncio.sleep(0.3)
        # Nothing fired while the worker ran.
        assert webhook.payloads == []

        # The worker is stopped: its target goes down, the rule fires, and
        # Alertmanager notifies the webhook.
        payload = await webhook.wait_for("ModelgateTargetDown", timeout_s=30)
        assert payload["groupLabels"] == {
            "alertname": "ModelgateTargetDown",
            "kind": "worker",
        }
        (alert,) = payload["alerts"]
        assert alert["labels"]["job"] == "modelgate-worker"
        assert alert["labels"]["instance"] == f"127.0.0.1:{worker_port}"
        assert alert["labels"]["severity"] == "critical"

        # The shipped inhibitions: with the Redis breaker open on an
        # instance, the admissions decided without Redis there are held back;
        # on another instance they are not.
        def posted(name: str, instance: str) -> dict[str, Any]:
            return {"labels": {"alertname": name, "instance": instance}}

        answer = await http.post(
            f"{alertmanager}/api/v2/alerts",
            json=[
                posted("ModelgateRedisBreakerOpen", "w9"),
                posted("ModelgateDecisionsWithoutStore", "w9"),
                posted("ModelgateDecisionsWithoutStore", "w8"),
            ],
        )
        assert answer.status_code == 200, answer.text
        async with asyncio.timeout(15):
            while True:
                answer = await http.get(
                    f"{alertmanager}/api/v2/alerts",
                    params={"filter": 'alertname="ModelgateDecisionsWithoutStore"'},
                )
                states = {
                    a["labels"]["instance"]: a["status"]["state"] for a in answer.json()
                }
                if len(states) == 2 and "unprocessed" not in states.values():
                    break
                await asyncio.sleep(0.2)
        assert states == {"w9": "suppressed", "w8": "active"}
