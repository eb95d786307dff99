"""Real OIP servers on loopback for the backend tests: MLServer (own venv,
started through infra/mlserver/mlserver.sh) and a tiny stdlib server whose
latency and liveness a test controls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.backends.mlserver import export_digits_repository
from gateway.models import ServedModel

REPO = Path(__file__).resolve().parents[2]
MLSERVER_SH = REPO / "infra" / "mlserver" / "mlserver.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class MLServerInfo:
    url: str
    repo: Path


@pytest.fixture(scope="session")
def mlserver(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[MLServerInfo]:
    """A real MLServer serving the digits model on a free loopback port.

    ``make services`` installs its venv ahead of time; the first use installs
    it otherwise (a minute or so).
    """
    repo = export_digits_repository(tmp_path_factory.mktemp("mlserver"), models_dir)
    port = free_port()
    env = {
        **os.environ,
        "MODELGATE_MLSERVER_PORT": str(port),
        "MODELGATE_MLSERVER_GRPC_PORT": str(free_port()),
    }
    subprocess.run(
        [str(MLSERVER_SH), "start", str(repo)], env=env, check=True, timeout=600
    )
    try:
        yield MLServerInfo(url=f"http://127.0.0.1:{port}", repo=repo)
    finally:
        subprocess.run(
            [str(MLSERVER_SH), "stop", str(repo)], env=env, check=False, timeout=60
        )


class StubOip:
    """A minimal OIP v2 server for model ``digits`` answering with ``model``'s
    probabilities, after ``delay_s``; counts inference calls.

    ``stop`` closes the port (so calls get connection refused) and ``start``
    opens it again on the same port. The first ``unavailable_first``
    inference calls are answered 503 at once, as a server whose model is
    still loading would. With ``trickle_s`` set (it may be set while the
    server runs) an inference answer's body goes out one byte every
    ``trickle_s``; ``rows_per_call`` records each inference call's row count.
    """

    def __init__(
        self, model: ServedModel, *, delay_s: float = 0.0, unavailable_first: int = 0
    ) -> None:
        self.model = model
        self.delay_s = delay_s
        self.unavailable_first = unavailable_first
        self.infer_calls = 0
        self.trickle_s = 0.0
        self.rows_per_call: list[int] = []
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StubOip:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/v2/models/digits":
                    self._reply(404, {"error": "no such model"})
                    return
                spec = stub.model.signature.inputs[0]
                self._reply(
                    200,
                    {
                        "name": "digits",
                        "platform": "stub",
                        "inputs": [
                            {
                                "name": spec.name,
                                "datatype": spec.datatype,
                                "shape": list(spec.shape),
                            }
                        ],
                    },
                )

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with stub._lock:
                    stub.infer_calls += 1
                    refuse = stub.infer_calls <= stub.unavailable_first
                if refuse:
                    self._reply(503, {"error": "model loading"})
                    return
                # Interruptible, so stop() does not wait out a long delay.
                stub._stopping.wait(stub.delay_s)
                tensor = body["inputs"][0]
                rows = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
                with stub._lock:
                    stub.rows_per_call.append(len(rows))
                proba = stub.model.predict_proba(rows)
                output = {
                    "name": "predict_proba",
                    "datatype": "FP32",
                    "shape": list(proba.shape),
                    "data": proba.reshape(-1).tolist(),
                }
                self._reply(
                    200,
                    {"id": body.get("id"), "outputs": [output]},
                    trickle_s=stub.trickle_s,
                )

            def _reply(
                self, status: int, payload: dict[str, Any], trickle_s: float = 0.0
            ) -> None:
                raw = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(raw)))
                    self.end_headers()
                    if not trickle_s:
                        self.wfile.write(raw)
                        return
                    for i in range(len(raw)):
                        if stub._stopping.wait(trickle_s):
                            return
                        self.wfile.write(raw[i : i + 1])
                        self.wfile.flush()
                except OSError:
                    pass  # the client gave up (timed out) first

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            self._stopping.set()
            server.shutdown()
            server.server_close()


def mlserver_proba(url: str, rows: np.ndarray) -> np.ndarray:
    """MLServer's own answer for ``rows``, asked directly (no gateway)."""
    body = {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.reshape(-1).tolist(),
            }
        ],
        "outputs": [{"name": "predict_proba"}],
    }
    # trust_env=False: no proxy from the environment between us and loopback.
    with httpx.Client(trust_env=False, timeout=30) as client:
        response = client.post(f"{url}/v2/models/digits/infer", json=body)
    response.raise_for_status()
    (output,) = response.json()["outputs"]
    return np.asarray(output["data"], np.float64).reshape(output["shape"])


def wait_until(condition: Any, timeout_s: float, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval_s)
