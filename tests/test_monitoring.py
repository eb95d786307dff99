"""The monitoring files: alert rules, their cases, the Grafana dashboard and
the Prometheus and Alertmanager configurations, checked by Prometheus's own
promtool and amtool (Debian's packages, installed by ``make services``) and
against the metrics the code exports. A running Prometheus scraping a real
worker, and one whose alert reaches a webhook through Alertmanager, are in
tests/integration/test_monitoring.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.monitoring import (
    ALERT_RULES,
    ALERTMANAGER_CONFIG,
    DEFAULT_KINDS,
    JOBS,
    KINDS,
    MonitoringError,
    alertmanager_config,
    exported_metric_names,
    scrape_config,
)

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "monitoring" / "alert_cases.yml"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "modelgate.json"
DOCKER_CONFIG = ROOT / "infra" / "prometheus" / "prometheus.yml"
# A metric name in PromQL: what is not a function, keyword or label.
METRIC = re.compile(r"\b(modelgate_[a-z0-9_]+|up)\b")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: run `make services` (infra/prometheus.sh)")
    return subprocess.run(
        [binary, *map(str, args)], capture_output=True, text=True, timeout=120
    )


def amtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("amtool")
    if binary is None:
        pytest.fail("amtool is missing: run `make services` (infra/alertmanager.sh)")
    return subprocess.run(
        [binary, *map(str, args)], capture_output=True, text=True, timeout=60
    )


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERT_RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", ())]


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", ALERT_RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_and_stays_silent_as_its_cases_say(tmp_path: Path) -> None:
    # promtool compares annotations too; the cases check when alerts fire and
    # with which labels, so the rules run here without their texts.
    document = yaml.safe_load(ALERT_RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    bare = tmp_path / "alerts.yml"
    bare.write_text(yaml.safe_dump(document))
    cases = yaml.safe_load(CASES.read_text())
    cases["rule_files"] = [str(bare)]
    spec = tmp_path / "cases.yml"
    spec.write_text(yaml.safe_dump(cases))
    result = promtool("test", "rules", spec)
    assert result.returncode == 0, result.stdout + result.stderr

    firing: set[str] = set()
    silent: set[str] = set()
    for test in cases["tests"]:
        for check in test["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never shown to fire"
    assert names - silent == set(), "alerts never shown to stay silent"


# What ModelgateConsumerLagHigh's description says for each kind that exports
# modelgate_consumer_lag: (job, its topic, the text). Changing a text here
# and in alerts.yml together is the point: each must name what waits.
LAG_DESCRIPTIONS = {
    "worker": (
        "modelgate-worker",
        "modelgate.requests",
        "Requests wait in Kafka before they are judged. Add workers (up to the "
        "requests topic's partitions) or look at modelgate_stage_seconds for the "
        "slow stage.",
    ),
    "guard": (
        "modelgate-guard",
        "modelgate.feedback",
        "Feedback waits in Kafka before the poisoning guard screens it. Add guards "
        "(up to the feedback topic's partitions) or look at modelgate_batch_seconds "
        "for slow batches.",
    ),
    "forwarder": (
        "modelgate-forwarder",
        "modelgate.alerts",
        "Alerts wait in Kafka before they are sent on (the lag counts alerts not "
        "yet delivered or passed over): the receiver is slow or refusing. See "
        "modelgate_forward_retries_total and modelgate_forward_backoff_seconds; "
        "ModelgateForwarderStuck fires if none is delivered at all.",
    ),
}


def test_consumer_lag_is_described_for_the_kind_that_lags(tmp_path: Path) -> None:
    """The rule covers workers, the guard and the alert forwarder; promtool
    renders its real annotations for each (the cases above run without)."""
    series = []
    expected = []
    for job, topic, description in LAG_DESCRIPTIONS.values():
        series.append(
            {
                "series": f'modelgate_consumer_lag{{job="{job}", instance="i", '
                f'topic="{topic}", partition="0"}}',
                "values": "6000x10",
            }
        )
        expected.append(
            {
                "exp_labels": {
                    "severity": "warning",
                    "job": job,
                    "instance": "i",
                    "topic": topic,
                },
                "exp_annotations": {
                    "summary": f"{job} i is 6000 records behind on {topic}",
                    "description": description,
                },
            }
        )
    spec = tmp_path / "lag.yml"
    spec.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(ALERT_RULES)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": series,
                        "alert_rule_test": [
                            {
                                "eval_time": "6m",
                                "alertname": "ModelgateConsumerLagHigh",
                                "exp_alerts": expected,
                            }
                        ],
                    }
                ],
            }
        )
    )
    result = promtool("test", "rules", spec)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_and_panel_names_a_metric_modelgate_exports() -> None:
    exported = exported_metric_names()
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    named = {name for query in queries for name in METRIC.findall(query)}
    assert named - exported == set()
    # A description that sends the reader to a metric must name a real one
    # (a histogram by its family's name).
    texts = [rule["annotations"]["description"] for rule in alert_rules()]
    told = {name for text in texts for name in METRIC.findall(text)}
    assert {n for n in told if f"{n}_count" not in exported} - exported == set()
    # The check can fail: a name the code does not export is caught.
    assert "modelgate_no_such_metric_total" not in exported


def test_every_panel_query_parses(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    # Grafana's own variable is the only one the dashboard uses.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": q.replace("$__rate_interval", "5m")}
        for i, q in enumerate(queries)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    panels = json.loads(DASHBOARD.read_text())["panels"]
    datasource = {p["datasource"]["uid"] for p in panels if "datasource" in p}
    provisioned = yaml.safe_load(
        (
            ROOT
            / "infra"
            / "grafana"
            / "provisioning"
            / "datasources"
            / "prometheus.yml"
        ).read_text()
    )
    assert datasource == {provisioned["datasources"][0]["uid"]}


def test_the_generated_configuration_follows_the_settings(tmp_path: Path) -> None:
    settings = load_settings(
        worker={"metrics_port": 19564, "metrics_host": "0.0.0.0"},
        frontdoor={"metrics_port": 0},
        admin={"metrics_port": 19566, "metrics_host": "[::1]"},
        feedback={"metrics_port": 19567},
        forward={"metrics_port": 19568},
    )
    document = scrape_config(
        settings,
        rules=[ALERT_RULES],
        interval_s=5,
        kinds=KINDS,
        alertmanager="127.0.0.1:19593",
    )
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"]
        for job in document["scrape_configs"]
    }
    assert targets == {
        "modelgate-worker": ["127.0.0.1:19564"],
        "modelgate-admin": ["[::1]:19566"],
        "modelgate-guard": ["127.0.0.1:19567"],
        "modelgate-forwarder": ["127.0.0.1:19568"],
    }
    # Alertmanager groups by this label.
    kinds = {
        job["job_name"]: job["static_configs"][0]["labels"]["kind"]
        for job in document["scrape_configs"]
    }
    assert kinds == {
        "modelgate-worker": "worker",
        "modelgate-admin": "admin",
        "modelgate-guard": "guard",
        "modelgate-forwarder": "forwarder",
    }
    assert document["alerting"]["alertmanagers"] == [
        {"static_configs": [{"targets": ["127.0.0.1:19593"]}]}
    ]
    assert document["global"]["scrape_interval"] == "5s"
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(document))
    result = promtool("check", "config", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_forwarder_is_scraped_only_when_named() -> None:
    """The forwarder is an add-on most hosts do not run: scraped by default,
    it fired ModelgateTargetDown there. Named, it is scraped like any kind."""
    settings = load_settings()
    assert set(DEFAULT_KINDS) == set(KINDS) - {"forwarder"}
    jobs = [job["job_name"] for job in scrape_config(settings)["scrape_configs"]]
    assert "modelgate-forwarder" not in jobs and len(jobs) == 4, jobs
    result = CliRunner().invoke(app, ["monitoring", "prometheus-config"])
    assert result.exit_code == 0, result.output
    assert "modelgate-forwarder" not in result.stdout
    named = CliRunner().invoke(
        app,
        ["monitoring", "prometheus-config", "--kind", "worker", "--kind", "forwarder"],
    )
    assert named.exit_code == 0, named.output
    jobs = [job["job_name"] for job in json.loads(named.stdout)["scrape_configs"]]
    assert jobs == ["modelgate-worker", "modelgate-forwarder"]


def test_kinds_and_settings_that_give_nothing_sensible_are_refused() -> None:
    settings = load_settings()
    only = scrape_config(settings, kinds=["worker", "guard"])
    assert [j["job_name"] for j in only["scrape_configs"]] == [
        "modelgate-worker",
        "modelgate-guard",
    ]
    with pytest.raises(MonitoringError, match="unknown kind gaurd"):
        scrape_config(settings, kinds=["gaurd"])
    for bad in ("19093", "127.0.0.1:", "127.0.0.1:70000", "a b:1"):
        with pytest.raises(MonitoringError, match="host"):
            scrape_config(settings, alertmanager=bad)
    # Without an Alertmanager, alerts are evaluated and sent nowhere.
    assert "alerting" not in only
    with pytest.raises(MonitoringError, match="is not a host"):
        scrape_config(load_settings(worker={"metrics_host": "1.2.3.4 x"}))
    with pytest.raises(MonitoringError, match="its own port"):
        scrape_config(load_settings(admin={"metrics_port": 9464}))
    off = {"metrics_port": 0}
    with pytest.raises(MonitoringError, match="nothing to scrape"):
        scrape_config(
            load_settings(worker=off, feedback=off), kinds=["worker", "guard"]
        )
    result = CliRunner().invoke(app, ["monitoring", "prometheus-config", "--kind", "x"])
    assert result.exit_code == 2 and "unknown kind x" in result.output


def test_the_command_prints_a_configuration_promtool_accepts(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["monitoring", "prometheus-config"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "prometheus.yml"
    path.write_text(result.stdout)
    checked = promtool("check", "config", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    jobs = [job["job_name"] for job in json.loads(result.stdout)["scrape_configs"]]
    assert jobs == [job for job, _ in JOBS if job != "modelgate-forwarder"]
    assert len(KINDS) == len(JOBS) == 5
    missing = CliRunner().invoke(
        app, ["monitoring", "prometheus-config", "--rules", str(tmp_path / "none.yml")]
    )
    assert missing.exit_code == 2 and "no rule file" in missing.output


def test_the_docker_configuration_scrapes_the_compose_services(tmp_path: Path) -> None:
    config = yaml.safe_load(DOCKER_CONFIG.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    mounts = services["prometheus"]["volumes"]
    # The rule file the configuration names is the one compose mounts there.
    (rules,) = config["rule_files"]
    assert f"./infra/prometheus/alerts.yml:{rules}:ro" in mounts
    known = {job for job, _ in JOBS}
    for job in config["scrape_configs"]:
        assert job["job_name"] in known
        (target,) = job["static_configs"][0]["targets"]
        host, port = target.split(":")
        # Each target is a compose service, at the port it publishes.
        assert f"127.0.0.1:{port}:{port}" in services[host]["ports"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    # Alerts go to the compose Alertmanager, which runs the shipped file.
    (alerting,) = config["alerting"]["alertmanagers"]
    (target,) = alerting["static_configs"][0]["targets"]
    assert target == "alertmanager:9093"
    alertmanager = services["alertmanager"]
    assert alertmanager["profiles"] == ["monitoring"]
    assert alertmanager["image"].startswith("prom/alertmanager:v")
    assert "127.0.0.1:19095:9093" in alertmanager["ports"]
    flag = next(c for c in alertmanager["command"] if c.startswith("--config.file="))
    mounted = flag.split("=", 1)[1]
    assert (
        f"./infra/alertmanager/alertmanager.yml:{mounted}:ro"
        in (alertmanager["volumes"])
    )
    # Gossip off: Alertmanager would otherwise listen on 9094 everywhere.
    assert "--cluster.listen-address=" in alertmanager["command"]
    # promtool reads the rule file at the path the container sees.
    config["rule_files"] = [str(ALERT_RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_accepts_the_shipped_alertmanager_configuration() -> None:
    result = amtool("check-config", ALERTMANAGER_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    document = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert document["route"]["group_by"] == ["alertname", "kind"]
    # As shipped, no notification is aimed anywhere.
    (receiver,) = document["receivers"]
    assert set(receiver) == {"name"}
    # Every alert an inhibition names is one of the rules.
    names = {rule["alert"] for rule in alert_rules()}
    equal_to = re.compile(r"^alertname = (\w+)$")
    named = {
        found.group(1)
        for rule in document["inhibit_rules"]
        for side in ("source_matchers", "target_matchers")
        for matcher in rule[side]
        if (found := equal_to.match(matcher))
    }
    assert named and named <= names
    routed = amtool(
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_CONFIG}",
        "--verify.receivers=modelgate",
        "alertname=ModelgateTargetDown",
        "kind=worker",
    )
    assert routed.returncode == 0, routed.stdout + routed.stderr


def test_the_generated_alertmanager_configuration_has_the_settings_webhook(
    tmp_path: Path,
) -> None:
    url = "https://hooks.example.test/T0/secret"
    settings = load_settings(monitoring={"webhook_url": url})
    document = alertmanager_config(settings, group_wait_s=1, repeat_interval_s=60)
    (receiver,) = document["receivers"]
    assert receiver["webhook_configs"] == [{"url": url, "send_resolved": True}]
    assert document["route"]["group_wait"] == "1s"
    assert document["route"]["repeat_interval"] == "60s"
    assert document["route"]["group_interval"] == "5m"  # the shipped one
    path = tmp_path / "alertmanager.yml"
    path.write_text(json.dumps(document))
    result = amtool("check-config", path)
    assert result.returncode == 0, result.stdout + result.stderr
    # No URL in the settings: no webhook.
    (bare,) = alertmanager_config(load_settings())["receivers"]
    assert "webhook_configs" not in bare
    # The settings secret is not echoed in its own error.
    with pytest.raises(ConfigError) as refused:
        load_settings(monitoring={"webhook_url": "ftp://secret@host/x"})
    assert refused.value.code == "CONFIG_INVALID"
    assert "secret" not in str(refused.value)
    # amtool refused the generated file over a newline in the URL.
    for bad in ("http://127.0.0.1:1/a\nb", "http://127.0.0.1:1/a b", "http://h/\x7f"):
        with pytest.raises(ConfigError, match="control character"):
            load_settings(monitoring={"webhook_url": bad})

    printed = CliRunner().invoke(
        app,
        ["monitoring", "alertmanager-config", "--group-wait-s", "2"],
        env={"MODELGATE_MONITORING__WEBHOOK_URL": "http://127.0.0.1:1/hook"},
    )
    assert printed.exit_code == 0, printed.output
    document = json.loads(printed.stdout)
    assert document["route"]["group_wait"] == "2s"
    assert document["receivers"][0]["webhook_configs"][0]["url"] == (
        "http://127.0.0.1:1/hook"
    )
    zero = CliRunner().invoke(
        app, ["monitoring", "alertmanager-config", "--group-wait-s", "0"]
    )
    assert zero.exit_code == 2
