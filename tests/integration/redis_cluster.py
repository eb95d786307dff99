"""A private three-primary Redis Cluster on loopback for the tests that need one.

Started once per session from Debian's ``redis-server`` on free ports in a
temporary directory, joined with ``redis-cli --cluster create``, and stopped
and removed at the end. It never touches the shared Redis of the stack.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

PRIMARIES = 3
# The cluster bus listens on port + 10000, so data ports stay below 55536.
_PORT_RANGE = (20_000, 45_000)
_START_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class RedisClusterInfo:
    """Where the private cluster listens."""

    ports: tuple[int, ...]

    @property
    def url(self) -> str:
        """A startup node; the client finds the other primaries from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` ports whose cluster-bus twin (+10000) is free as well."""
    chosen: list[int] = []
    rng = random.Random()
    while len(chosen) < count:
        port = rng.randrange(*_PORT_RANGE)
        if port not in chosen and _free(port) and _free(port + 10_000):
            chosen.append(port)
    return chosen


def _wait(condition_name: str, check: object, timeout_s: float) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis cluster: {condition_name} after {timeout_s} s")
        time.sleep(0.05)  # polling interval of the condition


def _ping(port: int, password: str | None = None) -> bool:
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=1.0, password=password
    )
    try:
        return bool(client.ping())
    finally:
        client.close()


def _cluster_ok(ports: list[int], password: str | None = None) -> bool:
    for port in ports:
        client = redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=1.0, password=password
        )
        try:
            info = client.cluster("info")
        finally:
            client.close()
        if info.get("cluster_state") != "ok":
            return False
    return True


@contextlib.contextmanager
def private_cluster(
    root: Path, password: str | None = None
) -> Iterator[RedisClusterInfo]:
    """Start, join and finally stop a three-primary cluster under ``root``;
    with ``password``, every node has ``requirepass`` (and ``masterauth``)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed (make services)")
    ports = _free_ports(PRIMARIES)
    auth = (
        []
        if password is None
        else ["--requirepass", password, "--masterauth", password]
    )
    # redis-cli reads the password from the environment, not its command line,
    # so it does not show in a process listing.
    cli_env = None if password is None else {**os.environ, "REDISCLI_AUTH": password}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node_dir = root / str(port)
            node_dir.mkdir()
            with (node_dir / "redis.log").open("ab") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            "redis-server",
                            "--port",
                            str(port),
                            "--bind",
                            "127.0.0.1",
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            str(node_dir / "nodes.conf"),
                            "--cluster-node-timeout",
                            "5000",
                            "--dir",
                            str(node_dir),
                            "--save",
                            "",
                            "--appendonly",
                            "no",
                            *auth,
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for port in ports:
            _wait(
                f"node {port} answering",
                lambda port=port: _ping(port, password),
                _START_TIMEOUT_S,
            )
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT_S,
            env=cli_env,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create: {created.stdout}")
        _wait(
            "cluster_state ok", lambda: _cluster_ok(ports, password), _START_TIMEOUT_S
        )
        yield RedisClusterInfo(tuple(ports))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterInfo]:
    """A running three-primary Redis Cluster, private to this test session."""
    root = tmp_path_factory.mktemp("redis-cluster")
    try:
        with private_cluster(root) as info:
            yield info
    finally:
        shutil.rmtree(Path(root), ignore_errors=True)
