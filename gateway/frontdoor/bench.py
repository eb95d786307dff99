"""``modelgate frontdoor bench``: the front door against the model served straight.

One run starts, each as its own process: a gateway worker, the front door, and
the baseline. With ``backend="skops"`` the worker runs the skops model
in-process and the baseline is ``gateway.frontdoor.baseline`` (the same skops
model behind a plain OIP v2 server). With ``backend="mlserver"`` a real
MLServer (``infra/mlserver/mlserver.sh``, its own venv) serves the model, the
worker's backend is that MLServer over OIP, and the baseline is the same
MLServer asked straight: the front door against the model server it protects.
A load-generator process (``gateway.frontdoor.loadgen``) then drives the
front door and the baseline in turn with the same digits rows, and the report
puts throughput and p50/p99 latency side by side with their ratios. The
machine is shared, so absolute figures move between runs; the ratios,
measured minutes apart in the same run, move less.

A run has its own topics, group, Redis key prefix and in-memory server key
(``gateway.bench.bench_settings``); its topics (the front door's reply topic
included) and Redis keys are deleted at the end.

Imports the gateway, aiokafka and redis; nothing from ``evaluation``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any

import httpx
from aiokafka.errors import KafkaError

from gateway.bench import bench_settings
from gateway.cleanup import delete_run_data
from gateway.config import BackendConfig, Settings, load_settings
from gateway.errors import BrokerError, ModelgateError
from gateway.frontdoor.service import reply_topic_for
from gateway.keys import KeyStore
from gateway.models import DIGITS, digits_split, ensure_digits_model
from gateway.store import redis_from_settings
from gateway.topics import run_topics

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# How long a child may take to come up (the worker joins its group, the
# front door connects to Kafka) before the run gives up.
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 20.0
_BENCH_ROWS = 200
MLSERVER_SH = PROJECT_ROOT / "infra" / "mlserver" / "mlserver.sh"
MLSERVER_BIN = PROJECT_ROOT / "var" / "mlserver-venv" / "bin" / "mlserver"
# MLServer's start waits up to 120 s for readiness itself (mlserver.sh).
_MLSERVER_TIMEOUT_S = 180.0
BACKENDS = ("auto", "skops", "mlserver")


class BenchError(ModelgateError):
    """A process of the benchmark failed to start or answer."""

    default_code = "BENCH_FAILED"


def _say(message: str) -> None:
    """Progress for a person watching; the table itself goes to stdout."""
    print(f"[bench http] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    # The port is free when we look; a race with another process taking it
    # before the child binds is possible and shows as a start failure.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(settings: Settings) -> dict[str, str]:
    """An environment that makes a child process load ``settings``: each
    section as one JSON ``MODELGATE_<SECTION>`` variable (secrets revealed,
    so never log it), inherited ``MODELGATE_*`` variables dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    dumped = settings.model_dump(mode="json")
    server_key = settings.auth.server_key
    if server_key is not None:
        dumped["auth"]["server_key"] = server_key.get_secret_value()
    if settings.redis.password is not None:
        dumped["redis"]["password"] = settings.redis.password_value()
    for section, value in dumped.items():
        env[f"MODELGATE_{section.upper()}"] = json.dumps(value)
    return env


class _Child:
    """One child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path):
        self.name = name
        self._args = args
        self._env = env
        self.log_path = log
        self._log: IO[bytes] | None = None
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self._args,
            env=self._env,
            cwd=str(PROJECT_ROOT),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
        )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise BenchError(
                f"{self.name} exited with code {self.proc.returncode}:\n"
                + "\n".join(tail)
            )

    async def stop(self) -> None:
        proc = self.proc
        try:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), _STOP_TIMEOUT_S)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


def mlserver_installed() -> bool:
    """True when MLServer's venv exists (``make services`` or
    ``infra/mlserver/mlserver.sh install`` made it)."""
    return MLSERVER_BIN.is_file()


def resolve_backend(name: str) -> str:
    """``skops`` or ``mlserver`` for a ``--backend`` value; ``auto`` is
    ``mlserver`` when it is installed, else ``skops``.

    Raises
    ------
    BenchError
        An unknown name, or ``mlserver`` asked for but not installed.
    """
    if name not in BACKENDS:
        raise BenchError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name == "auto":
        return "mlserver" if mlserver_installed() else "skops"
    if name == "mlserver" and not mlserver_installed():
        raise BenchError(
            f"MLServer is not installed ({MLSERVER_BIN} missing); run "
            "infra/mlserver/mlserver.sh install, or use --backend skops"
        )
    return name


class _MLServer:
    """A real MLServer on a free loopback port serving the digits model from
    a repository exported into the run's directory; started and stopped
    through ``infra/mlserver/mlserver.sh``."""

    def __init__(self, repo: Path, models_dir: Path) -> None:
        self.repo = repo
        self.models_dir = models_dir
        self.port = _free_port()
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MODELGATE_")},
            "MODELGATE_MLSERVER_PORT": str(self.port),
            "MODELGATE_MLSERVER_GRPC_PORT": str(_free_port()),
        }
        self._started = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _script(self, action: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            str(MLSERVER_SH),
            action,
            str(self.repo),
            env=self._env,
            cwd=str(PROJECT_ROOT),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), _MLSERVER_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return -1, f"mlserver.sh {action} timed out"
        return proc.returncode or 0, out.decode(errors="replace")

    async def start(self) -> None:
        # Exported by us from the skops file, so the launcher does not export
        # its default model directory's copy.
        from gateway.backends.mlserver import export_digits_repository

        await asyncio.get_running_loop().run_in_executor(
            None, export_digits_repository, self.repo, self.models_dir
        )
        self._started = True
        code, out = await self._script("start")
        if code != 0:
            tail = "\n".join(out.splitlines()[-15:])
            raise BenchError(f"MLServer did not start (exit {code}):\n{tail}")

    async def stop(self) -> None:
        if self._started:
            self._started = False
            code, out = await self._script("stop")
            if code != 0:
                logger.warning("MLServer stop failed: %s", out[-500:])


async def _wait_ready(child: _Child, url: str) -> None:
    """Poll ``url`` until it answers 200, the child dies, or time runs out."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            child.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise BenchError(f"{child.name} not ready within {_START_TIMEOUT_S:g} s")


async def _wait_served(worker: _Child, url: str, token: str, body: Any) -> None:
    """Send one inference until it is answered 200: the worker has joined
    its group and answers into the front door's reply topic."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=10.0) as client:
        while time.monotonic() < deadline:
            worker.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if (
                    await client.post(url, json=body, headers=headers)
                ).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise BenchError(f"no inference answered within {_START_TIMEOUT_S:g} s")


async def _load(
    url: str, bodies_file: Path, token: str, requests: int, concurrency: int
) -> dict[str, Any]:
    """Run the load generator in its own process and read its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.frontdoor.loadgen",
        "--url",
        url,
        "--bodies",
        str(bodies_file),
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
        "--warmup",
        str(min(200, max(requests // 10, concurrency))),
        cwd=str(PROJECT_ROOT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate((token + "\n").encode())
    if proc.returncode != 0:
        raise BenchError(f"load generator failed: {err.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(out)
    return result


async def _create_key(settings: Settings) -> str:
    redis = redis_from_settings(settings)
    try:
        _, token = await KeyStore(redis, settings).create("bench-http", models=[DIGITS])
    finally:
        await redis.aclose()
    return token


def _bodies(directory: Path) -> tuple[Path, dict[str, Any]]:
    """Held-out digits rows as OIP bodies (one row each, no id, so that every
    request gets a fresh one), written to a file for the load generator."""
    _, x_test, _, _ = digits_split()
    bodies = [
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "data": row.tolist(),
                }
            ]
        }
        for row in x_test[:_BENCH_ROWS]
    ]
    path = directory / "bodies.json"
    path.write_text(json.dumps(bodies))
    return path, bodies[0]


async def run_http_bench(
    settings: Settings,
    *,
    requests: int,
    concurrency: int,
    workdir: Path,
    backend: str = "skops",
) -> dict[str, Any]:
    """One run; returns ``{"meta", "frontdoor", "baseline", "ratios"}``.

    ``backend`` is ``skops`` (worker in-process, baseline the plain OIP
    server of the same model) or ``mlserver`` (worker and baseline both on
    one real MLServer); ``auto`` picks as :func:`resolve_backend`.

    Raises
    ------
    BenchError
        A process did not start or answer in time.
    BrokerError
        Kafka could not be reached.
    """
    run = bench_settings(settings, f"http-{uuid.uuid4().hex[:8]}")
    fd_port, base_port = _free_port(), _free_port()
    run = run.model_copy(
        update={
            "frontdoor": run.frontdoor.model_copy(
                # No metrics listener: its default port may be a real front
                # door's on this host.
                update={
                    "port": fd_port,
                    "instance_id": f"bench-{fd_port}",
                    "metrics_port": 0,
                }
            ),
            # Children run in the project root; a relative path would move.
            "models": run.models.model_copy(
                update={"directory": run.models.directory.resolve()}
            ),
        }
    )
    models_dir = run.models.directory
    await asyncio.get_running_loop().run_in_executor(
        None, ensure_digits_model, models_dir
    )
    backend = resolve_backend(backend)
    mlserver = (
        _MLServer(workdir / "mlserver", models_dir) if backend == "mlserver" else None
    )
    if mlserver is not None:
        # The worker's model is the MLServer; the straight baseline is the same
        # server, so the comparison is the front door against what it guards.
        run = run.model_copy(
            update={
                "models": run.models.model_copy(
                    update={
                        "backends": {
                            DIGITS: BackendConfig(kind="oip", url=mlserver.url)
                        }
                    }
                )
            }
        )
    bodies_file, first_body = _bodies(workdir)
    env = child_env(run)
    children = [
        _Child(
            "worker",
            ["-m", "gateway", "worker", "--log-level", "WARNING"],
            env,
            workdir / "worker.log",
        ),
        _Child(
            "front door",
            ["-m", "gateway", "frontdoor", "serve", "--log-level", "WARNING"],
            env,
            workdir / "frontdoor.log",
        ),
    ]
    if mlserver is None:
        children.append(
            _Child(
                "baseline",
                [
                    "-m",
                    "gateway.frontdoor.baseline",
                    "--models-dir",
                    str(models_dir),
                    "--port",
                    str(base_port),
                ],
                env,
                workdir / "baseline.log",
            )
        )
    worker, frontdoor = children[0], children[1]
    fd_url = f"http://127.0.0.1:{fd_port}"
    base_url = f"http://127.0.0.1:{base_port}" if mlserver is None else mlserver.url
    infer_path = f"/v2/models/{DIGITS}/infer"
    try:
        token = await _create_key(run)
        if mlserver is not None:
            # Before the worker, which reads the model's metadata at start.
            _say(f"starting MLServer on {mlserver.url}")
            await mlserver.start()
        _say(
            "starting worker, front door"
            + (" and baseline" if mlserver is None else "")
        )
        for child in children:
            await child.start()
        await _wait_ready(frontdoor, fd_url + "/v2/health/ready")
        if mlserver is None:
            await _wait_ready(children[2], base_url + "/v2/health/ready")
        await _wait_served(worker, fd_url + infer_path, token, first_body)

        _say(f"front door: {requests} requests, {concurrency} in flight")
        fd = await _load(fd_url + infer_path, bodies_file, token, requests, concurrency)
        _say(f"baseline: {requests} requests, {concurrency} in flight")
        base = await _load(
            base_url + infer_path, bodies_file, "", requests, concurrency
        )
        for child in children:
            child.check_alive()
    finally:
        for child in reversed(children):
            await child.stop()
        if mlserver is not None:
            await mlserver.stop()
        await delete_run_data(
            run,
            [*run_topics(run), reply_topic_for(run)],
        )

    return {
        "meta": {
            "requests": requests,
            "concurrency": concurrency,
            "cpus": os.cpu_count(),
            "model": DIGITS,
            "backend": backend,
            "baseline": "MLServer" if mlserver is not None else "plain OIP server",
        },
        "frontdoor": fd,
        "baseline": base,
        "ratios": {
            "throughput": _ratio(fd["throughput_rps"], base["throughput_rps"]),
            "p50": _ratio(fd["p50_ms"], base["p50_ms"]),
            "p99": _ratio(fd["p99_ms"], base["p99_ms"]),
        },
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def format_report(results: dict[str, Any]) -> str:
    """The side-by-side table: absolute figures, then front door / baseline."""
    fd, base, ratios = results["frontdoor"], results["baseline"], results["ratios"]
    meta = results["meta"]
    lines = [
        f"{meta['requests']} requests, {meta['concurrency']} in flight, "
        f"model {meta['model']}, {meta['cpus']} CPUs (shared)",
        f"worker backend {meta.get('backend', 'skops')}, model straight: "
        f"{meta.get('baseline', 'plain OIP server')}",
        f"{'':<22}{'front door':>12}{'model straight':>16}{'ratio':>8}",
    ]
    for label, key, ratio in (
        ("throughput (req/s)", "throughput_rps", ratios["throughput"]),
        ("latency p50 (ms)", "p50_ms", ratios["p50"]),
        ("latency p99 (ms)", "p99_ms", ratios["p99"]),
    ):
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"{label:<22}{fd[key]:>12,.1f}{base[key]:>16,.1f}{shown:>8}")
    lines.append(
        f"{'ok / requests':<22}{fd['ok']:>8}/{fd['requests']:<4}"
        f"{base['ok']:>11}/{base['requests']:<4}"
    )
    return "\n".join(lines)


def bench_http_command(
    requests: int, concurrency: int, out: Path | None, backend: str = "skops"
) -> int:
    """Hold the local stack, run :func:`run_http_bench`, print the table.

    Returns 0 if every measured request was answered 200 by both, else 1.
    """
    from gateway import stack

    base = load_settings()
    with (
        stack.hold(holder=f"bench-http-{os.getpid()}") as info,
        tempfile.TemporaryDirectory(prefix="bench-http-") as tmp,
    ):
        settings = base.model_copy(
            update={
                "kafka": base.kafka.model_copy(
                    update={"bootstrap": info.kafka_bootstrap}
                ),
                "redis": base.redis.model_copy(update={"url": info.redis_url}),
            }
        )
        try:
            results = asyncio.run(
                run_http_bench(
                    settings,
                    requests=requests,
                    concurrency=concurrency,
                    workdir=Path(tmp),
                    backend=backend,
                )
            )
        except (KafkaError, OSError) as exc:
            raise BrokerError(f"bench failed: {exc!r}") from exc
    print(format_report(results))
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
    clean = all(
        results[k]["ok"] == results[k]["requests"] for k in ("frontdoor", "baseline")
    )
    return 0 if clean else 1
