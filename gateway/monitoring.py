"""Prometheus for modelgate: the scrape configuration a host's settings imply,
and the names of every metric the four kinds of process export.

``modelgate monitoring prometheus-config`` prints the configuration that
``infra/prometheus.sh`` runs Prometheus with: one job per kind of process
(worker, front door, admin API, poisoning guard) at the metrics address the
settings give it, and the alert rules of ``infra/prometheus/alerts.yml``.
``exported_metric_names`` is what the rules and the Grafana dashboard may
name (tests/test_monitoring.py checks both against it).

Imports the metrics and config modules only; serves nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from prometheus_client import CollectorRegistry

from gateway.cli_common import ConfigOption, load_cli_settings
from gateway.config import Settings

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
ALERT_RULES = REPO / "infra" / "prometheus" / "alerts.yml"

# Job name and settings section of each kind of process; the job names are
# the ones alerts.yml and the dashboard select on.
JOBS = (
    ("modelgate-worker", "worker"),
    ("modelgate-frontdoor", "frontdoor"),
    ("modelgate-admin", "admin"),
    ("modelgate-guard", "feedback"),
)


def _target(host: str, port: int) -> str:
    # A listener on every interface is scraped through loopback, which it
    # includes; an IPv6 literal needs brackets in host:port.
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def scrape_config(
    settings: Settings,
    *,
    rules: Iterable[Path] = (ALERT_RULES,),
    interval_s: float = 15.0,
) -> dict[str, Any]:
    """Prometheus's configuration for the processes of ``settings`` on this
    host; a kind whose metrics port is 0 (off) gets no job."""
    jobs = []
    for job, section in JOBS:
        config = getattr(settings, section)
        if config.metrics_port == 0:
            continue
        target = _target(config.metrics_host, config.metrics_port)
        jobs.append({"job_name": job, "static_configs": [{"targets": [target]}]})
    interval = f"{interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rules],
        "scrape_configs": jobs,
    }


def _registry_names(registry: CollectorRegistry) -> set[str]:
    """The sample names a registry exposes. A labelled family with no child
    yet is still collected, without samples, so its name comes from the
    family and its type."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def exported_metric_names() -> set[str]:
    """Every metric name a worker, front door, admin API or guard exports."""
    from gateway.admin.metrics import AdminMetrics
    from gateway.frontdoor.metrics import (
        PENDING_GAUGE,
        READY_GAUGE,
        FrontDoorMetrics,
    )
    from gateway.metrics import GuardMetrics, RedisBreakerCollector, WorkerMetrics
    from gateway.redis_breaker import RedisBreaker

    names = {"up", PENDING_GAUGE, READY_GAUGE}  # up: Prometheus's, per target
    for metrics in (
        WorkerMetrics(),
        GuardMetrics(),
        FrontDoorMetrics(),
        AdminMetrics(),
    ):
        names |= _registry_names(metrics.registry)
    # The Redis breakers' families exist once a client does; the front door
    # and admin API export the same names with a ``client`` label.
    registry = CollectorRegistry()
    registry.register(RedisBreakerCollector(RedisBreaker("redis", 1.0), "a"))
    names |= _registry_names(registry)
    return names


monitoring_app = typer.Typer(
    help="Prometheus configuration and alert rules for modelgate's metrics."
)


@monitoring_app.command("prometheus-config")
def prometheus_config(
    config: ConfigOption = None,
    rules: Annotated[
        list[Path] | None,
        typer.Option(help="Rule files to load (default: infra/prometheus/alerts.yml)."),
    ] = None,
    interval_s: Annotated[
        float, typer.Option(min=1.0, max=3600.0, help="Scrape and rule interval.")
    ] = 15.0,
) -> None:
    """Print a Prometheus configuration (JSON, which is YAML) scraping the
    metrics listeners these settings give each kind of process."""
    settings = load_cli_settings(config)
    chosen = [path.resolve() for path in rules] if rules else [ALERT_RULES]
    for path in chosen:
        if not path.is_file():
            typer.echo(f"error [CONFIG_INVALID]: no rule file at {path}", err=True)
            raise typer.Exit(2)
    document = scrape_config(settings, rules=chosen, interval_s=interval_s)
    typer.echo(json.dumps(document, indent=2))
