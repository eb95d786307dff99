"""Start and stop the local Kafka + Redis stack from Python.

A thin wrapper over ``infra/stack.sh``, which does the work: it fetches the Kafka
jars on first use, installs ``redis-server`` if missing, starts both on loopback,
and counts holders so that two runs at once (two pytest sessions, a demo beside
``modelgate up``) never stop the services under each other. ``modelgate up`` /
``down``, ``modelgate demo`` and the pytest ``stack`` fixture all come through here.

This module imports only ``gateway.errors`` and the standard library: the test
harness and the CLI call it before any settings are loaded.

It needs a source checkout (the scripts are not packaged); modelgate is installed
editable, so the repository root is two levels above this file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ModelgateError

logger = logging.getLogger(__name__)

# The first acquire on a fresh machine may apt-get install redis-server and fetch
# about 45 MB of Kafka jars from Maven Central; later ones take seconds.
ACQUIRE_TIMEOUT_S = 1800.0
RELEASE_TIMEOUT_S = 300.0
STATUS_TIMEOUT_S = 60.0

MANUAL_HOLDER = "manual"


class StackError(ModelgateError):
    """The local stack could not be started, stopped or inspected.

    Never reaches a client: it is raised to the CLI and the test harness only.
    """

    default_code = "STACK_UNAVAILABLE"


@dataclass(frozen=True)
class StackInfo:
    """Where the local services listen.

    Parameters
    ----------
    kafka_bootstrap
        ``host:port`` of the Kafka broker, for ``bootstrap_servers``.
    redis_url
        ``redis://`` URL of the Redis instance, database 0.
    """

    kafka_bootstrap: str
    redis_url: str


@dataclass(frozen=True)
class StackStatus:
    """What ``infra/stack.sh status`` reports.

    Parameters
    ----------
    holders
        Names of the live holders (dead process holders already pruned).
    kafka, redis
        ``running``, ``starting``, ``foreign`` (something this stack did not start
        answers on the port) or ``stopped``.
    """

    holders: tuple[str, ...]
    kafka: str
    redis: str

    @property
    def running(self) -> bool:
        """True if both services answer, whoever started them."""
        return self.kafka in ("running", "foreign") and self.redis in (
            "running",
            "foreign",
        )


def repo_root() -> Path:
    """Return the source checkout that holds ``infra/stack.sh``.

    Raises
    ------
    StackError
        If the package is not running from a checkout (a wheel install).
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "infra" / "stack.sh").is_file():
        raise StackError(
            f"infra/stack.sh not found under {root}; the local stack needs a source "
            "checkout with modelgate installed editable (pip install -e .)"
        )
    return root


def _run(args: list[str], *, timeout_s: float) -> str:
    """Run ``infra/stack.sh`` with ``args`` and return its stdout.

    Its stderr (progress: downloads, starts, waits) goes straight to ours, so a
    person sees a first-run download as it happens instead of a silent minute.
    """
    script = repo_root() / "infra" / "stack.sh"
    try:
        proc = subprocess.run(
            ["bash", str(script), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(
            f"infra/stack.sh {' '.join(args)} did not finish in {timeout_s:.0f}s",
            retriable=True,
        ) from exc
    except OSError as exc:
        raise StackError(f"could not run {script}: {exc}") from exc
    if proc.returncode != 0:
        raise StackError(
            f"infra/stack.sh {' '.join(args)} failed with exit code "
            f"{proc.returncode}; its error output above says why"
        )
    return proc.stdout


def _parse_info(stdout: str) -> StackInfo:
    values: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    try:
        return StackInfo(
            kafka_bootstrap=values["KAFKA_BOOTSTRAP"], redis_url=values["REDIS_URL"]
        )
    except KeyError as exc:
        raise StackError(
            f"infra/stack.sh printed no {exc.args[0]}; got {stdout!r}"
        ) from exc


def acquire(
    holder: str, *, persistent: bool = False, timeout_s: float = ACQUIRE_TIMEOUT_S
) -> StackInfo:
    """Start Kafka and Redis if needed and register ``holder``.

    Parameters
    ----------
    holder
        A name for this user of the stack, 1-100 characters of
        ``[A-Za-z0-9._@:+-]``, unique among concurrent users.
    persistent
        If False (the default) the holder is tied to this process: should the
        process die without releasing, the next stack operation prunes it. If
        True the holder stays until :func:`release`, as ``up`` needs.
    timeout_s
        Bound on the whole operation, first-run downloads included.

    Returns
    -------
    StackInfo
        The addresses to connect to.

    Raises
    ------
    StackError
        If a service did not start (the script's output above says why).
    """
    args = ["acquire", holder]
    if not persistent:
        args += ["--pid", str(os.getpid())]
    logger.info("acquiring local Kafka + Redis for holder %s", holder)
    started = time.monotonic()
    info = _parse_info(_run(args, timeout_s=timeout_s))
    logger.info(
        "local stack ready for %s in %.1fs: kafka %s, redis %s",
        holder,
        time.monotonic() - started,
        info.kafka_bootstrap,
        info.redis_url,
    )
    return info


def release(holder: str, *, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
    """Unregister ``holder``; stop the services if it was the last one.

    Services are stopped only if this stack started them; ones that were already
    running when the first holder arrived are left alone.

    Raises
    ------
    StackError
        If the script failed.
    """
    logger.info("releasing local stack for holder %s", holder)
    _run(["release", holder], timeout_s=timeout_s)


@contextmanager
def hold(holder: str) -> Iterator[StackInfo]:
    """Hold the local stack for the duration of a ``with`` block.

    Examples
    --------
    >>> with hold(f"demo-{os.getpid()}") as info:  # doctest: +SKIP
    ...     print(info.kafka_bootstrap)
    127.0.0.1:19092
    """
    info = acquire(holder)
    try:
        yield info
    finally:
        release(holder)


def warn_settings_replaced(settings: Any, info: StackInfo, command: str) -> list[str]:
    """Log, and return, each address the settings gave explicitly
    (``kafka.bootstrap``, ``redis.url``) that ``command`` replaces with the
    held stack's.

    ``demo``, ``eval`` and ``bench`` run on the stack they hold, whose ports
    come from ``MODELGATE_KAFKA_PORT`` and ``MODELGATE_REDIS_PORT``: a
    ``modelgate.toml`` pointing elsewhere was ignored without a word, and a
    run meant for a private broker went to the shared one. Defaults are not
    reported: nobody asked for them.
    """
    found = []
    for section, field, used in (
        ("kafka", "bootstrap", info.kafka_bootstrap),
        ("redis", "url", info.redis_url),
    ):
        config = getattr(settings, section)
        given = getattr(config, field)
        if field in config.model_fields_set and given != used:
            found.append(f"{section}.{field}")
            logger.warning(
                "%s ignores %s.%s from the settings and uses the local stack's "
                "address (set MODELGATE_KAFKA_PORT / MODELGATE_REDIS_PORT to move it)",
                command,
                section,
                field,
                extra={
                    "command": command,
                    "setting": f"{section}.{field}",
                    "given": given,
                    "used": used,
                },
            )
    return found


def up() -> StackInfo:
    """Start the stack and keep it running until :func:`down` (``modelgate up``)."""
    return acquire(MANUAL_HOLDER, persistent=True)


def down() -> None:
    """Drop the ``up`` holder; the stack stops once no other holder remains."""
    release(MANUAL_HOLDER)


def info() -> StackInfo:
    """The addresses the stack uses, without starting anything."""
    return _parse_info(_run(["env"], timeout_s=STATUS_TIMEOUT_S))


def kafka_jars_fetched() -> bool:
    """Whether this checkout holds the Kafka jars its pom names
    (``infra/kafka/kafka.sh installed``), so that starting Kafka here
    downloads nothing.

    Raises
    ------
    StackError
        The script could not be run.
    """
    script = repo_root() / "infra" / "kafka" / "kafka.sh"
    try:
        proc = subprocess.run(
            ["bash", str(script), "installed"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=STATUS_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"could not run {script} installed: {exc}") from exc
    return proc.returncode == 0


def acquire_fetches_jars() -> bool:
    """Whether :func:`acquire` would now download the Kafka jars: no broker
    is running on the stack's port (ours or another's) and this checkout has
    not fetched them.

    Raises
    ------
    StackError
        A script could not be run.
    """
    if kafka_jars_fetched():
        return False
    return status().kafka == "stopped"


def status() -> StackStatus:
    """Report holders and service states without changing anything."""
    holders: list[str] = []
    states: dict[str, str] = {}
    for line in _run(
        ["status", "--porcelain"], timeout_s=STATUS_TIMEOUT_S
    ).splitlines():
        key, _, value = line.partition("=")
        if key == "holder":
            holders.append(value)
        elif key in ("kafka", "redis"):
            states[key] = value
    return StackStatus(
        holders=tuple(holders),
        kafka=states.get("kafka", "unknown"),
        redis=states.get("redis", "unknown"),
    )
