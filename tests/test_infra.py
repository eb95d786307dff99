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

from gateway.config import (
    AdminConfig,
    FeedbackConfig,
    KafkaConfig,
    ModelsConfig,
    RedisConfig,
    TopicsConfig,
    WorkerConfig,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [
    ROOT / "infra" / "kafka" / "kafka.sh",
    ROOT / "infra" / "redis.sh",
    ROOT / "infra" / "prometheus.sh",
    ROOT / "infra" / "alertmanager.sh",
    ROOT / "infra" / "lib.sh",
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


# The services built from the Dockerfile, and the CLI command each runs.
_APP_SERVICES = {
    "gateway": ["modelgate", "worker"],
    "guard": ["modelgate", "guard", "run"],
    "admin": ["modelgate", "admin", "serve"],
}


def test_compose_parses_and_has_the_services(compose: dict[str, Any]) -> None:
    assert {"kafka", "redis", *_APP_SERVICES} <= set(compose["services"])
    assert (ROOT / "Dockerfile").is_file()
    for name, command in _APP_SERVICES.items():
        service = _service(compose, name)
        assert service.get("build") == ".", f"{name} must build from Dockerfile"
        assert service["command"] == command, service["command"]
    # One image: the guard runs the worker's code and settings.
    assert _service(compose, "guard")["image"] == _service(compose, "gateway")["image"]
    assert _service(compose, "admin")["image"] == _service(compose, "gateway")["image"]


@pytest.mark.parametrize("name", sorted(_APP_SERVICES))
def test_app_services_run_a_real_command(name: str) -> None:
    # The command exists in this code's CLI (a typo would only show in a
    # container's restart loop).
    from typer.testing import CliRunner

    from gateway.cli import app

    result = CliRunner().invoke(app, [*_APP_SERVICES[name][1:], "--help"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", sorted(_APP_SERVICES))
def test_app_services_start_after_kafka_and_redis_are_healthy(
    compose: dict[str, Any], name: str
) -> None:
    depends = _service(compose, name)["depends_on"]
    for dependency in ("kafka", "redis"):
        assert depends[dependency] == {"condition": "service_healthy"}, depends
        assert _service(compose, dependency).get("healthcheck"), dependency


def test_the_guard_shares_the_workers_settings_and_volume(
    compose: dict[str, Any],
) -> None:
    gateway, guard = _env(compose, "gateway"), _env(compose, "guard")
    # Same brokers, Redis and topic names: the guard authenticates with the
    # worker's API keys and creates the same topics.
    shared = {
        k: v
        for k, v in gateway.items()
        if k.startswith(("MODELGATE_KAFKA__", "MODELGATE_REDIS__"))
    }
    assert shared and {k: guard.get(k) for k in shared} == shared
    # The server key that decrypts API keys' secrets and the models directory
    # live in the worker's volume, at the path the image's relative paths
    # resolve to (Dockerfile: WORKDIR /app, var/ under it).
    volume = next(
        v for v in _service(compose, "gateway")["volumes"] if v.endswith(":/app/var")
    )
    assert volume in _service(compose, "guard")["volumes"]
    assert volume.split(":")[0] in compose["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and 'VOLUME ["/app/var"]' in dockerfile
    assert str(ModelsConfig().directory).startswith("var/")
    assert _service(compose, "guard").get("stop_signal") == "SIGTERM"


@pytest.mark.parametrize(
    ("name", "section"), [("gateway", "WORKER"), ("guard", "FEEDBACK")]
)
def test_app_services_publish_their_metrics_on_loopback_only(
    compose: dict[str, Any], name: str, section: str
) -> None:
    # The container listens on all its interfaces so the port can be published;
    # the host side is bound to loopback, at the port the settings default to.
    env = _env(compose, name)
    port = env[f"MODELGATE_{section}__METRICS_PORT"]
    assert env[f"MODELGATE_{section}__METRICS_HOST"] == "0.0.0.0"
    defaults = {
        "WORKER": WorkerConfig().metrics_port,
        "FEEDBACK": FeedbackConfig().metrics_port,
    }
    assert int(port) == defaults[section]
    assert _service(compose, name)["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_admin_service_publishes_api_and_metrics_on_loopback_only(
    compose: dict[str, Any],
) -> None:
    env = _env(compose, "admin")
    defaults = AdminConfig()
    assert env["MODELGATE_ADMIN__HOST"] == "0.0.0.0"
    assert env["MODELGATE_ADMIN__METRICS_HOST"] == "0.0.0.0"
    assert int(env["MODELGATE_ADMIN__METRICS_PORT"]) == defaults.metrics_port
    # Same volume as the worker: the server key that encrypts API keys.
    assert (
        _service(compose, "admin")["volumes"] == _service(compose, "gateway")["volumes"]
    )
    assert sorted(_service(compose, "admin")["ports"]) == sorted(
        f"127.0.0.1:{p}:{p}" for p in (defaults.port, defaults.metrics_port)
    )


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


@pytest.mark.parametrize("service", sorted(_APP_SERVICES))
def test_app_services_reach_kafka_through_an_advertised_listener(
    compose: dict[str, Any], service: str
) -> None:
    env = _env(compose, service)
    advertised = _env(compose, "kafka")["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{env['MODELGATE_KAFKA__BOOTSTRAP']}" in advertised, advertised
    assert env["MODELGATE_REDIS__URL"].startswith("redis://redis:")


def test_redis_settings_match_infra(compose: dict[str, Any]) -> None:
    command = [str(part) for part in _service(compose, "redis")["command"]]
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert _service(compose, "redis")["image"].startswith("redis:7")
    script = (ROOT / "infra" / "redis.sh").read_text()
    assert "--save ''" in script and "--appendonly no" in script
    assert '--bind "$HOST"' in script and "HOST=127.0.0.1" in script


@pytest.mark.parametrize("service", sorted(_APP_SERVICES))
def test_topics_match_the_config_defaults(
    compose: dict[str, Any], service: str
) -> None:
    env = _env(compose, service)
    topics = TopicsConfig()
    for field, value in topics.model_dump().items():
        key = f"MODELGATE_KAFKA__TOPICS__{field.upper()}"
        assert key in env, f"{service} env lacks {key}"
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


def test_kafka_sh_installed_follows_the_jar_stamp(tmp_path: Path) -> None:
    """`kafka.sh installed` (what `make demo` asks before saying it will
    download) is true only for jars fetched for this pom's exact content."""
    import hashlib

    def installed() -> int:
        env = {**os.environ, "MODELGATE_VAR": str(tmp_path)}
        script = ROOT / "infra" / "kafka" / "kafka.sh"
        return subprocess.run(
            ["bash", str(script), "installed"], env=env, check=False, timeout=30
        ).returncode

    assert installed() == 1
    pom = (ROOT / "infra" / "kafka" / "pom.xml").read_bytes()
    match = re.search(rb"<kafka.version>(.*)</kafka.version>", pom)
    assert match is not None
    libs = tmp_path / "kafka" / "libs"
    libs.mkdir(parents=True)
    stamp = libs / ".installed"
    digest = hashlib.sha256(pom).hexdigest()[:16]
    stamp.write_text(f"kafka={match[1].decode()} pom={digest}\n")
    assert installed() == 0
    # Jars fetched for another pom (another Kafka version) are fetched again.
    stamp.write_text(f"kafka=0.0.1 pom={digest}\n")
    assert installed() == 1


def _default_ports_in_scripts() -> dict[str, int]:
    """Each ``MODELGATE_*PORT`` default the infra scripts fall back to."""
    found: dict[str, int] = {}
    for script in SCRIPTS:
        for name, value in re.findall(
            r"\$\{(MODELGATE_[A-Z_]*PORT):-(\d+)\}", script.read_text()
        ):
            # One variable read by two scripts must default the same in both,
            # or the two would look for each other on different ports.
            assert found.setdefault(name, int(value)) == int(value), (script, name)
    return found


def _default_ports_in_settings() -> dict[str, int]:
    from gateway.config import Settings

    settings = Settings()
    ports: dict[str, int] = {}
    for section_name, section in settings:
        for field_name, value in section if hasattr(section, "__iter__") else []:
            if field_name.endswith("port") and isinstance(value, int) and value:
                ports[f"{section_name}.{field_name}"] = value
    return ports


def test_every_default_loopback_port_is_different() -> None:
    # Alertmanager once defaulted to Kafka's controller port: each process
    # alone started, but `make monitor` beside a running stack could not.
    ports = {**_default_ports_in_scripts(), **_default_ports_in_settings()}
    assert "MODELGATE_KAFKA_CONTROLLER_PORT" in ports
    assert "worker.metrics_port" in ports
    by_port: dict[int, list[str]] = {}
    for name, port in ports.items():
        by_port.setdefault(port, []).append(name)
    shared = {port: names for port, names in by_port.items() if len(names) > 1}
    # The stack script and the Kafka and Redis scripts name the same
    # services' ports under the same variables; those are one entry each.
    assert not shared, shared


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "client=19092 controller=19093"),
        # A private client port alone must not leave the controller on the shared
        # stack's 19093: the second broker would fail to bind it.
        ({"MODELGATE_KAFKA_PORT": "29192"}, "client=29192 controller=29193"),
        (
            {
                "MODELGATE_KAFKA_PORT": "29192",
                "MODELGATE_KAFKA_CONTROLLER_PORT": "29500",
            },
            "client=29192 controller=29500",
        ),
        ({"MODELGATE_KAFKA_CONTROLLER_PORT": "29500"}, "client=19092 controller=29500"),
    ],
)
def test_kafka_controller_port_follows_a_moved_client_port(
    env: dict[str, str], expected: str
) -> None:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MODELGATE_KAFKA_PORT", "MODELGATE_KAFKA_CONTROLLER_PORT")
    }
    result = subprocess.run(
        ["bash", str(ROOT / "infra" / "kafka" / "kafka.sh"), "ports"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == expected
