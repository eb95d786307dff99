"""``modelgate keys create --plan/--overrides`` and ``keys set-plan`` as a
user runs them, against the shared Redis under an isolated key prefix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.process import settings_env
from gateway.config import Settings
from tests.conftest import StackInfo
from tests.integration.helpers import REPO, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_plan_commands(stack: StackInfo, models_dir: Path) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        models_dir,
        limits={"plans": {"pro": {"quota": {"daily": 100}}}},
    )
    created = _cli(
        settings,
        "keys", "create", "plan-client", "--plan", "pro",
        "--overrides", '{"quota": {"daily": 500}}',
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split("key_id=")[1].split()[0]

    def row() -> dict[str, object]:
        listed = _cli(settings, "keys", "list")
        (found,) = [json.loads(line) for line in listed.stdout.splitlines()]
        return dict(found)

    first = row()
    assert (first["plan"], first["limit_overrides"]) == (
        "pro",
        {"quota": {"daily": 500}},
    )

    changed = _cli(settings, "keys", "set-plan", key_id, "default")
    assert changed.returncode == 0, changed.stderr
    assert (row()["plan"], row()["limit_overrides"]) == ("default", {})

    # A plan the running configuration does not define is refused (it was
    # stored with a warning, and the key ran on the default plan).
    ghost = _cli(settings, "keys", "set-plan", key_id, "ghost")
    assert ghost.returncode == 2, ghost.stderr
    assert "no plan 'ghost'" in ghost.stderr, ghost.stderr
    assert "the plans are: default, pro" in ghost.stderr, ghost.stderr
    assert row()["plan"] == "default"
    ghost_key = _cli(settings, "keys", "create", "ghost-client", "--plan", "ghost")
    assert ghost_key.returncode == 2 and "no plan 'ghost'" in ghost_key.stderr

    # Defined live, it is known at once.
    defined = _cli(
        settings,
        "config",
        "set",
        'limits.plans={"pro": {"quota": {"daily": 100}}, '
        '"ghost": {"quota": {"daily": 7}}}',
    )
    assert defined.returncode == 0, defined.stderr
    ghost = _cli(settings, "keys", "set-plan", key_id, "ghost")
    assert ghost.returncode == 0, ghost.stderr
    assert row()["plan"] == "ghost"

    bad = _cli(settings, "keys", "set-plan", key_id, "pro", "--overrides", "[1]")
    assert bad.returncode == 2 and "BAD_ARGUMENT" in bad.stderr, bad.stderr
    # One clear line per bad field, not pydantic's report.
    fields = _cli(
        settings, "keys", "set-plan", key_id, "pro", "--overrides",
        '{"in_flight": {"limit": 0}, "quota": {"daily": "lots"}, "speed": 9}',
    )  # fmt: skip
    assert fields.returncode == 2, fields.stderr
    assert fields.stderr.splitlines() == [
        'error [BAD_ARGUMENT]: --overrides quota.daily = "lots": Input should be '
        "a valid integer, unable to parse string as an integer",
        "error [BAD_ARGUMENT]: --overrides in_flight.limit = 0: Input should be "
        "greater than or equal to 1",
        "error [BAD_ARGUMENT]: --overrides speed = 9: not a plan field (a plan has "
        "rules, quota, in_flight, count_refused, fail_mode)",
    ], fields.stderr
    missing = _cli(settings, "keys", "set-plan", "mgk_000000000000", "pro")
    # The stable code every other refusal of the CLI carries.
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error [NOT_FOUND]: no key mgk_000000000000"
    assert row()["plan"] == "ghost"
