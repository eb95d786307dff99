"""What ``run_demo`` says while it joins the local stack: the Kafka jars'
download is announced only when there will be one. No services: the stack
and the demo itself are replaced."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evaluation import demo
from gateway import stack
from gateway.config import load_settings


@pytest.mark.parametrize("fetches", [True, False])
async def test_the_jar_download_is_announced_only_when_it_will_happen(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fetches: bool
) -> None:
    @contextlib.contextmanager
    def hold(holder: str) -> Iterator[stack.StackInfo]:
        yield stack.StackInfo(
            kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0"
        )

    async def run(*args: Any) -> int:
        return 0

    async def no_topics(*args: Any) -> None:
        return None

    monkeypatch.setattr(stack, "hold", hold)
    monkeypatch.setattr(stack, "acquire_fetches_jars", lambda: fetches)
    monkeypatch.setattr(demo, "_run_demo", run)
    monkeypatch.setattr(demo, "delete_topics", no_topics)
    said: list[str] = []
    code = await demo.run_demo(load_settings(), tmp_path, progress=said.append)
    assert code == 0
    starting = [line for line in said if "starting the local Kafka" in line]
    assert len(starting) == 1, said
    assert ("Kafka jars" in starting[0]) is fetches, said


@pytest.mark.parametrize(
    ("fetched", "kafka", "fetches"),
    [
        (False, "stopped", True),
        (True, "stopped", False),
        # A broker already up (another holder's, or a foreign one) is used
        # as it is: nothing is fetched.
        (False, "running", False),
        (False, "foreign", False),
    ],
)
def test_acquire_fetches_jars_only_without_jars_and_without_a_broker(
    monkeypatch: pytest.MonkeyPatch, fetched: bool, kafka: str, fetches: bool
) -> None:
    monkeypatch.setattr(stack, "kafka_jars_fetched", lambda: fetched)
    monkeypatch.setattr(
        stack,
        "status",
        lambda: stack.StackStatus(holders=(), kafka=kafka, redis="running"),
    )
    assert stack.acquire_fetches_jars() is fetches
