"""Run a gateway worker as a child process, configured from a ``Settings``.

The demo and the integration tests talk to a real worker the way a deployment
would: ``python -m gateway worker`` in its own process, configured only through
``MODELGATE_*`` environment variables. ``settings_env`` turns a ``Settings``
into those variables; ``WorkerProcess`` starts, watches and stops the child.

Imports the standard library and the gateway's config; never the worker itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, SecretStr
from pydantic_core import to_jsonable_python

import gateway
from gateway.config import Settings
from gateway.errors import ModelgateError

logger = logging.getLogger(__name__)

ENV_PREFIX = "MODELGATE_"
# Each worker makes its own id (host and pid); copying ours would give two
# processes the same name in logs, metrics and decision records.
_NOT_PASSED = frozenset({"worker.worker_id"})
PROJECT_ROOT = Path(gateway.__file__).resolve().parent.parent


class WorkerProcessError(ModelgateError):
    """The worker child could not start, or died while it was needed."""

    default_code = "WORKER_DIED"


def _leaf_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        # The child may resolve relative paths against another directory;
        # absolute ones mean both processes use the same key file and models.
        return str(value.resolve())
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        # Models inside (limits.plans) become their JSON form, as pydantic
        # reads them back.
        return json.dumps(value, default=to_jsonable_python)
    return str(value)


def _flatten(model: BaseModel, path: tuple[str, ...], out: dict[str, str]) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        dotted = ".".join((*path, name))
        if dotted in _NOT_PASSED or value is None:
            continue
        if isinstance(value, BaseModel):
            _flatten(value, (*path, name), out)
            continue
        if isinstance(value, dict) and not value:
            continue
        key = ENV_PREFIX + "__".join((*path, name)).upper()
        out[key] = _leaf_value(value)


def settings_env(
    settings: Settings, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment that makes a child process load exactly ``settings``.

    Every field becomes one ``MODELGATE_SECTION__FIELD`` variable (nested
    sections joined with ``__``, lists and dicts as JSON, paths made absolute),
    and any ``MODELGATE_*`` variable inherited from ``base`` is dropped so a
    stale one cannot override a field. The result holds secrets (the server
    key, when configured inline): never log it.

    Examples
    --------
    >>> env = settings_env(load_settings(kafka={"bootstrap": "127.0.0.1:1"}), {})
    >>> env["MODELGATE_KAFKA__BOOTSTRAP"]
    '127.0.0.1:1'
    """
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith(ENV_PREFIX)
    }
    _flatten(settings, (), env)
    return env


class WorkerProcess:
    """One ``python -m gateway worker`` child.

    Parameters
    ----------
    settings
        Passed to the child through its environment.
    log_path
        Receives the child's stdout and stderr.
    stop_timeout_s
        How long ``stop`` waits after SIGTERM before killing.

    Examples
    --------
    >>> async with WorkerProcess(settings, Path("w.log")):  # doctest: +SKIP
    ...     ...
    """

    def __init__(
        self, settings: Settings, log_path: Path, *, stop_timeout_s: float = 30.0
    ) -> None:
        self._settings = settings
        self.log_path = log_path
        self._stop_timeout_s = stop_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Spawn the child; idempotent while it runs."""
        if self.running():
            return
        env = settings_env(self._settings)
        # The child imports ``gateway`` from this checkout even when the package
        # is not installed into the interpreter.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "worker",
            env=env,
            cwd=str(PROJECT_ROOT),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
        )
        logger.info(
            "worker process started",
            extra={"pid": self._proc.pid, "log": str(self.log_path)},
        )

    def check_alive(self) -> None:
        """Raise ``WorkerProcessError`` (with the log's tail) if the child exited."""
        if self._proc is not None and self._proc.returncode is not None:
            raise WorkerProcessError(
                f"worker exited with code {self._proc.returncode}; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> int | None:
        """SIGTERM, wait up to ``stop_timeout_s``, then SIGKILL. Idempotent.

        Returns the exit code (0 after a clean shutdown).
        """
        proc = self._proc
        try:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), self._stop_timeout_s)
                except TimeoutError:
                    logger.warning("worker ignored SIGTERM; killing", extra={})
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            code = None if proc is None else proc.returncode
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return code

    async def __aenter__(self) -> WorkerProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
