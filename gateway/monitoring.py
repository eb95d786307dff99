"""Prometheus for modelgate: the scrape configuration a host's settings imply,
and the names of every metric the four kinds of process export.

``modelgate monitoring prometheus-config`` prints the configuration that
``infra/prometheus.sh`` runs Prometheus with: one job per kind of process
(worker, front door, admin API, poisoning guard; the alert forwarder when
asked for) at the metrics address the settings give it, the alert rules of
``infra/prometheus/alerts.yml`` and the Alertmanager they go to.
``modelgate monitoring alertmanager-config`` prints the one
``infra/alertmanager.sh`` runs Alertmanager with: the shipped
``infra/alertmanager/alertmanager.yml`` and the settings' webhook.
``exported_metric_names`` is what the rules and the Grafana dashboard may
name (tests/test_monitoring.py checks both against it).

Imports the metrics and config modules only; serves nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from gateway.cli_common import ConfigOption, load_cli_settings
from gateway.config import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
ALERT_RULES = REPO / "infra" / "prometheus" / "alerts.yml"
ALERTMANAGER_CONFIG = REPO / "infra" / "alertmanager" / "alertmanager.yml"
# The receiver of the shipped Alertmanager file that gets the settings' webhook.
RECEIVER = "modelgate"

# Job name and settings section of each kind of process; the job names are
# the ones alerts.yml and the dashboard select on.
JOBS = (
    ("modelgate-worker", "worker"),
    ("modelgate-frontdoor", "frontdoor"),
    ("modelgate-admin", "admin"),
    ("modelgate-guard", "feedback"),
    ("modelgate-forwarder", "forward"),
)
# What --kind names them, in JOBS's order; also the ``kind`` label each
# job's targets get, which Alertmanager groups by.
KINDS = ("worker", "frontdoor", "admin", "guard", "forwarder")
# What is scraped unless kinds are named: the gateway's own processes. The
# alert forwarder is an add-on, run only where alerts go on to an HTTP
# endpoint (``modelgate alerts-forward``, whose URL is a command-line option,
# not a setting); scraping it by default fired ModelgateTargetDown on every
# host that runs none, so it is scraped only when named.
DEFAULT_KINDS = ("worker", "frontdoor", "admin", "guard")


class MonitoringError(ValueError):
    """Settings that give Prometheus nothing sensible to scrape."""


def _target(setting: str, host: str, port: int) -> str:
    # A listener on every interface is scraped through loopback, which it
    # includes; an IPv6 literal needs brackets in host:port (and may come
    # with them already).
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if not host or any(c.isspace() or c in "[]/@" for c in host):
        raise MonitoringError(f"{setting}.metrics_host {host!r} is not a host")
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def scrape_config(
    settings: Settings,
    *,
    rules: Iterable[Path] = (ALERT_RULES,),
    interval_s: float = 15.0,
    kinds: Iterable[str] = DEFAULT_KINDS,
    alertmanager: str | None = None,
) -> dict[str, Any]:
    """Prometheus's configuration for the processes of ``settings`` on this
    host, of ``kinds`` only (``worker``, ``frontdoor``, ``admin``,
    ``guard``, ``forwarder``; by default all but the forwarder, see
    :data:`DEFAULT_KINDS`); a kind whose metrics port is 0 (off) gets no
    job. Firing alerts go to the Alertmanager at ``alertmanager``
    (``host:port``); None sends them nowhere (Prometheus still shows them).

    Raises
    ------
    MonitoringError
        An unknown kind, a host that is not one, two kinds on one address,
        or nothing left to scrape.
    """
    wanted = set(kinds)
    unknown = sorted(wanted - set(KINDS))
    if unknown:
        raise MonitoringError(
            f"unknown kind {', '.join(unknown)}; one of {', '.join(KINDS)}"
        )
    jobs = []
    seen: dict[str, str] = {}
    for (job, section), kind in zip(JOBS, KINDS, strict=True):
        config = getattr(settings, section)
        if kind not in wanted or config.metrics_port == 0:
            continue
        target = _target(section, config.metrics_host, config.metrics_port)
        if target in seen:
            raise MonitoringError(
                f"{section}.metrics_port and {seen[target]}.metrics_port are both "
                f"{target}: give each kind of process its own port"
            )
        seen[target] = section
        jobs.append(
            {
                "job_name": job,
                "static_configs": [{"targets": [target], "labels": {"kind": kind}}],
            }
        )
    if not jobs:
        raise MonitoringError(
            "nothing to scrape: every chosen kind's metrics port is 0"
        )
    interval = f"{interval_s:g}s"
    document: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rules],
        "scrape_configs": jobs,
    }
    if alertmanager is not None:
        host, sep, port = alertmanager.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise MonitoringError(f"alertmanager {alertmanager!r} is not host:port")
        target = _target("alertmanager", host, int(port))
        document["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [target]}]}]
        }
    return document


def alertmanager_config(
    settings: Settings,
    *,
    group_wait_s: int | None = None,
    group_interval_s: int | None = None,
    repeat_interval_s: int | None = None,
) -> dict[str, Any]:
    """The shipped Alertmanager configuration with the webhook of
    ``settings.monitoring.webhook_url`` on the ``modelgate`` receiver (none
    when unset) and, where given, the route's timings in whole seconds.

    The result holds the webhook URL in clear: write it where only its
    owner reads it.

    Raises
    ------
    MonitoringError
        The shipped file has no ``modelgate`` receiver (it was edited).
    """
    document: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = [r for r in document["receivers"] if r["name"] == RECEIVER]
    if not receivers:
        raise MonitoringError(f"{ALERTMANAGER_CONFIG} has no receiver {RECEIVER!r}")
    url = settings.monitoring.webhook_url
    if url is not None:
        # send_resolved: the receiver learns when a process is back.
        receivers[0]["webhook_configs"] = [
            {"url": url.get_secret_value(), "send_resolved": True}
        ]
    timings = {
        "group_wait": group_wait_s,
        "group_interval": group_interval_s,
        "repeat_interval": repeat_interval_s,
    }
    for key, seconds in timings.items():
        if seconds is not None:
            document["route"][key] = f"{seconds}s"
    return document


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
    """Every metric name a worker, front door, admin API, guard or alert
    forwarder exports."""
    from gateway.admin.metrics import AdminMetrics
    from gateway.frontdoor.metrics import (
        PENDING_GAUGE,
        READY_GAUGE,
        FrontDoorMetrics,
    )
    from gateway.metrics import (
        ForwarderMetrics,
        GuardMetrics,
        RedisBreakerCollector,
        WorkerMetrics,
    )
    from gateway.redis_breaker import RedisBreaker

    names = {"up", PENDING_GAUGE, READY_GAUGE}  # up: Prometheus's, per target
    for metrics in (
        WorkerMetrics(),
        GuardMetrics(),
        FrontDoorMetrics(),
        AdminMetrics(),
        ForwarderMetrics(),
    ):
        names |= _registry_names(metrics.registry)
    # The Redis breakers' families exist once a client does; the front door
    # and admin API export the same names with a ``client`` label.
    from prometheus_client import CollectorRegistry

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
    kind: Annotated[
        list[str] | None,
        typer.Option(
            help="Scrape only this kind (repeatable): worker, frontdoor, admin, "
            "guard, forwarder. Default: worker, frontdoor, admin and guard; the "
            "alert forwarder only when named. A kind you do not run would fire "
            "ModelgateTargetDown."
        ),
    ] = None,
    alertmanager: Annotated[
        str | None,
        typer.Option(help="Send firing alerts to the Alertmanager at HOST:PORT."),
    ] = None,
) -> None:
    """Print a Prometheus configuration (JSON, which is YAML) scraping the
    metrics listeners these settings give each kind of process."""
    settings = load_cli_settings(config)
    chosen = [path.resolve() for path in rules] if rules else [ALERT_RULES]
    for path in chosen:
        if not path.is_file():
            typer.echo(f"error [CONFIG_INVALID]: no rule file at {path}", err=True)
            raise typer.Exit(2)
    try:
        document = scrape_config(
            settings,
            rules=chosen,
            interval_s=interval_s,
            kinds=kind or DEFAULT_KINDS,
            alertmanager=alertmanager,
        )
    except MonitoringError as exc:
        typer.echo(f"error [CONFIG_INVALID]: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(document, indent=2))


_Seconds = Annotated[int | None, typer.Option(min=1, max=7 * 86_400)]


@monitoring_app.command("alertmanager-config")
def alertmanager_config_command(
    config: ConfigOption = None,
    group_wait_s: _Seconds = None,
    group_interval_s: _Seconds = None,
    repeat_interval_s: _Seconds = None,
) -> None:
    """Print an Alertmanager configuration (JSON, which is YAML): the shipped
    infra/alertmanager/alertmanager.yml with the webhook of these settings
    (monitoring.webhook_url) and any timing given here. It holds the
    webhook URL in clear."""
    settings = load_cli_settings(config)
    try:
        document = alertmanager_config(
            settings,
            group_wait_s=group_wait_s,
            group_interval_s=group_interval_s,
            repeat_interval_s=repeat_interval_s,
        )
    except MonitoringError as exc:
        typer.echo(f"error [CONFIG_INVALID]: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(document, indent=2))
