"""Session fixtures shared by every test package.

The ``stack`` fixture gives integration tests a real Kafka broker and a real
Redis: it starts them through ``gateway.stack`` (the same code ``modelgate up``
uses) unless ``MODELGATE_TEST_EXTERNAL_STACK=1`` says to use the addresses in
``MODELGATE_KAFKA__BOOTSTRAP`` and ``MODELGATE_REDIS__URL`` as they are.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class StackInfo:
    kafka_bootstrap: str
    redis_url: str


@pytest.fixture(scope="session")
def stack() -> Iterator[StackInfo]:
    if os.environ.get("MODELGATE_TEST_EXTERNAL_STACK") == "1":
        yield StackInfo(
            kafka_bootstrap=os.environ["MODELGATE_KAFKA__BOOTSTRAP"],
            redis_url=os.environ["MODELGATE_REDIS__URL"],
        )
        _drop_isolated_runs()
        return

    from gateway import stack as stack_mod

    with stack_mod.hold(holder=f"pytest-{os.getpid()}") as info:
        yield StackInfo(kafka_bootstrap=info.kafka_bootstrap, redis_url=info.redis_url)
        _drop_isolated_runs()


def _drop_isolated_runs() -> None:
    """Delete what this session's isolated runs left on the broker and Redis,
    before the stack is released (see ``tests.integration.helpers``)."""
    from tests.integration.helpers import drop_isolated_runs

    asyncio.run(drop_isolated_runs())
