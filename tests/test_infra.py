"""The Docker path and the no-Docker path describe the same stack.

No Docker engine runs here, so docker-compose.yml is checked by reading it against
the files the no-Docker path actually runs: infra/kafka/pom.xml (Kafka version),
infra/kafka/broker.properties (broker settings), infra/stack.sh (addresses) and
gateway.config (topics, default addresses). Also checks that every shell script
parses. Needs no services.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import KafkaConfig, RedisConfig, TopicsConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [
    ROOT / "infra" / "kafka" / "kafka.sh",
    ROOT / "infra" / "redis.sh",
    ROOT / "infra" / "stack.sh",
    ROOT / "infra" / "bootstrap.sh",
    ROOT / ".ci" / "run",
]
# Keys whose value must differ in containers: listeners, quorum and paths.
# broker.properties holds none of them except the protocol map, which the compose
# file extends with its DOCKER listener (checked separately below).
_SUPERSET_KEYS = {"listener.security.protocol.map"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    service = compose["services"][name]
    assert isinstance(service, dict)
    return service


def _env(compose: dict[str, Any], name: str) -> dict[str, str]:
    env = _service(compose, name).get("environment", {})
    # Compose accepts a mapping or a list of KEY=VALUE; this file uses a mapping,
    # and values are compared as strings because that is what containers see.
    assert isinstance(env, dict), f"{name}.environment should be a mapping"
    return {str(k): str(v) for k, v in env.items()}


def _broker_properties() -> dict[str, str]:
    props: dict[str, str] = {}
    for raw in (
        (ROOT / "infra" / "kafka" / "broker.properties").read_text().splitlines()
    ):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        props[key.strip()] = value.strip()
    return props


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _stack_env() -> dict[str, str]:
    """What infra/stack.sh reports as the addresses, with default ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELGATE_")}
    out = subprocess.run(
        ["bash", str(ROOT / "infra" / "stack.sh"), "env"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_compose_parses_and_has_the_services(compose: dict[str, Any]) -> None:
    assert {"kafka", "redis", "gateway"} <= set(compose["services"])
    assert _service(compose, "gateway").get("build"), (
        "gateway must build from Dockerfile"
    )
    assert (ROOT / "Dockerfile").is_file()
    assert _service(compose, "gateway")["command"] == ["modelgate", "worker"]


def test_kafka_image_is_the_version_the_pom_resolves(compose: dict[str, Any]) -> None:
    pom = (ROOT / "infra" / "kafka" / "pom.xml").read_text()
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    assert match, "infra/kafka/pom.xml has no <kafka.version>"
    image = _service(compose, "kafka")["image"]
    assert image == f"apache/kafka:{match.group(1)}", image
    assert match.group(1).startswith("4."), "the project runs Kafka 4.x (KRaft only)"


def test_addresses_agree_everywhere(compose: dict[str, Any]) -> None:
    stack = _stack_env()
    assert stack["KAFKA_BOOTSTRAP"] == KafkaConfig().bootstrap
    assert stack["REDIS_URL"] == RedisConfig().url

    kafka_port = _port(KafkaConfig().bootstrap)
    kafka = _service(compose, "kafka")
    assert f"127.0.0.1:{kafka_port}:{kafka_port}" in kafka["ports"], kafka["ports"]
    env = _env(compose, "kafka")
    assert f"PLAINTEXT://127.0.0.1:{kafka_port}" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert f"PLAINTEXT://0.0.0.0:{kafka_port}" in env["KAFKA_LISTENERS"]

    # Same controller port as infra/kafka/kafka.sh's default.
    script = (ROOT / "infra" / "kafka" / "kafka.sh").read_text()
    found = re.search(r"MODELGATE_KAFKA_CONTROLLER_PORT:-(\d+)", script)
    assert found
    assert f"CONTROLLER://0.0.0.0:{found.group(1)}" in env["KAFKA_LISTENERS"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"1@kafka:{found.group(1)}"

    redis_port = int(RedisConfig().url.rsplit(":", 1)[1].split("/")[0])
    redis = _service(compose, "redis")
    assert f"127.0.0.1:{redis_port}:{redis_port}" in redis["ports"], redis["ports"]
    command = [str(part) for part in redis["command"]]
    assert command[command.index("--port") + 1] == str(redis_port)


def test_gateway_reaches_kafka_through_an_advertised_listener(
    compose: dict[str, Any],
) -> None:
    gateway = _env(compose, "gateway")
    advertised = _env(compose, "kafka")["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{gateway['MODELGATE_KAFKA__BOOTSTRAP']}" in advertised, advertised
    assert gateway["MODELGATE_REDIS__URL"].startswith("redis://redis:")


def test_redis_settings_match_infra(compose: dict[str, Any]) -> None:
    command = [str(part) for part in _service(compose, "redis")["command"]]
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert _service(compose, "redis")["image"].startswith("redis:7")
    script = (ROOT / "infra" / "redis.sh").read_text()
    assert "--save ''" in script and "--appendonly no" in script
    assert '--bind "$HOST"' in script and "HOST=127.0.0.1" in script


def test_topics_match_the_config_defaults(compose: dict[str, Any]) -> None:
    env = _env(compose, "gateway")
    topics = TopicsConfig()
    for field, value in topics.model_dump().items():
        key = f"MODELGATE_KAFKA__TOPICS__{field.upper()}"
        assert key in env, f"gateway env lacks {key}"
        assert env[key] == str(value), f"{key}={env[key]!r}, config default {value!r}"
    assert set(topics.all_names()) <= set(env.values())


def test_broker_settings_match_infra(compose: dict[str, Any]) -> None:
    env = _env(compose, "kafka")
    props = _broker_properties()
    # The settings the project depends on must be present, not merely consistent.
    assert props["auto.create.topics.enable"] == "false"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["process.roles"] == "broker,controller"

    for key, value in props.items():
        name = "KAFKA_" + key.upper().replace(".", "_")
        assert name in env, f"docker-compose.yml kafka lacks {name} (= {key})"
        if key in _SUPERSET_KEYS:
            assert set(value.split(",")) <= set(env[name].split(",")), name
        else:
            assert env[name] == value, (
                f"{name}={env[name]!r}, broker.properties {value!r}"
            )


def test_kafka_sh_generates_loopback_listeners_only() -> None:
    script = (ROOT / "infra" / "kafka" / "kafka.sh").read_text()
    assert re.search(r"^HOST=127\.0\.0\.1$", script, re.MULTILINE)
    assert (
        "listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT"
        in script
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_parse_and_are_executable(script: Path) -> None:
    result = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_image_copies_every_package_the_project_installs() -> None:
    # `pip install .` in the image installs only what was copied: a package
    # left out installs silently as nothing, and fails at import in the image.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in patterns}
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, flags=re.MULTILINE))
    assert packages <= copied, sorted(packages - copied)
    assert "python -m detectors.warm" in dockerfile


def test_image_keeps_its_kernels_where_the_service_user_may_write() -> None:
    # numba uses no cache directory it cannot write (see detectors._jit): the
    # kernels compiled at build must land in one the runtime user owns.
    dockerfile = (ROOT / "Dockerfile").read_text()
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", dockerfile)
    user = re.search(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert cache is not None and user is not None
    assert f"chown -R {user.group(1)} {cache.group(1)}" in dockerfile
    assert dockerfile.index("python -m detectors.warm") < dockerfile.index(
        f"chown -R {user.group(1)} {cache.group(1)}"
    )
