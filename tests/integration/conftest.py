"""Fixtures shared by the integration tests (the ``stack`` fixture itself is
in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.models import ensure_digits_model
from tests.conftest import StackInfo
from tests.integration.helpers import RawKafka, request_path_settings
from tests.integration.oip_servers import mlserver

# The real MLServer, one per session for every module that asks for it.
__all__ = ["mlserver"]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, trained once per session."""
    directory = tmp_path_factory.mktemp("models")
    ensure_digits_model(directory)
    return directory


@pytest.fixture
def settings(stack: StackInfo, models_dir: Path) -> Settings:
    """Isolated settings for tests of the request path, not of detection
    (:func:`~tests.integration.helpers.request_path_settings`)."""
    return request_path_settings(stack, models_dir)


@pytest.fixture
async def kafka(settings: Settings) -> AsyncIterator[RawKafka]:
    async with RawKafka(settings) as raw:
        yield raw
