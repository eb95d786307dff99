"""The Kubernetes manifests (infra/k8s) read against the Kubernetes schema and
against the code: no cluster runs here, so every object is validated with
kubernetes-validate (the API's published schemas, strict: an unknown field
fails), and each workload's command, ports, probes and settings are checked
against the CLI, the settings model and the apps' routes."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
KUBERNETES = "1.30.0"
# Workload, the settings section whose metrics listener it serves, and its
# client-facing port's section (None: it has none).
WORKLOADS = {
    "modelgate-worker": ("worker", None),
    "modelgate-guard": ("feedback", None),
    "modelgate-frontdoor": ("frontdoor", "frontdoor"),
    "modelgate-admin": ("admin", "admin"),
}


def _documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = []
    for name in kustomization["resources"]:
        documents += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return documents


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] == "Deployment"}


def _settings() -> Settings:
    data = tomllib.loads((K8S / "settings.toml").read_text())
    return load_settings(**data)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def test_every_object_is_valid_against_the_kubernetes_schema() -> None:
    documents = _documents()
    assert {d["kind"] for d in documents} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    for document in documents:
        try:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = document["metadata"]["name"]
            pytest.fail(f"{document['kind']} {name}: {exc.message} at {exc.path}")
    # The check can fail: a misspelt field is refused.
    broken = _deployments()["modelgate-worker"]
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_four_workloads_run_real_commands() -> None:
    deployments = _deployments()
    assert set(deployments) == set(WORKLOADS)
    for deployment in deployments.values():
        command = _container(deployment)["command"]
        assert command[0] == "modelgate"
        result = CliRunner().invoke(app, [*command[1:], "--help"])
        assert result.exit_code == 0, (command, result.output)


def test_the_settings_file_loads_and_the_ports_agree_with_it() -> None:
    settings = _settings()
    for name, deployment in _deployments().items():
        metrics_section, app_section = WORKLOADS[name]
        container = _container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        metrics = getattr(settings, metrics_section)
        # Listening beyond loopback, or probes and Prometheus could not reach it.
        assert metrics.metrics_host == "0.0.0.0"
        assert ports["metrics"] == metrics.metrics_port
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics.metrics_port)
        if app_section is not None:
            section = getattr(settings, app_section)
            assert section.host == "0.0.0.0" and ports["http"] == section.port
        env = {e["name"]: e["value"] for e in container["env"]}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["MODELGATE_CONFIG"] in mounts
        assert str(settings.auth.server_key_file.parent) in mounts
        kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
        (generated,) = kustomization["configMapGenerator"]
        volumes = {
            v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]
        }
        assert volumes["settings"]["configMap"]["name"] == generated["name"]
        assert generated["files"] == ["settings.toml"]
        # The image's user (Dockerfile: uid 10001) writes var/ and the kernels.
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001
        assert "--uid 10001" in (ROOT / "Dockerfile").read_text()


def test_services_and_probes_point_at_what_the_apps_serve() -> None:
    from gateway.frontdoor.app import create_app

    routes = set(create_app(load_settings()).openapi()["paths"])
    deployments = _deployments()
    for deployment in deployments.values():
        container = _container(deployment)
        names = {p["name"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            action = container[probe]
            target = action.get("httpGet") or action["tcpSocket"]
            assert target["port"] in names
            if "httpGet" in action:
                assert action["httpGet"]["path"] in routes
    services = [d for d in _documents() if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {
        "modelgate-frontdoor",
        "modelgate-admin",
    }
    for service in services:
        selected = service["spec"]["selector"]["app.kubernetes.io/name"]
        container = _container(deployments[selected])
        names = {p["name"] for p in container["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
        # ClusterIP (the default): nothing is exposed outside the cluster.
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
