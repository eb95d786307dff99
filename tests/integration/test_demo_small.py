"""The demo, small: real clients, a real worker process and both real attacks
through the real broker, checked by its own report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.demo import run_demo
from tests.conftest import StackInfo
from tests.integration.helpers import isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def test_quick_demo_flags_the_attackers_and_blocks_no_honest_client(
    stack: StackInfo, tmp_path: Path
) -> None:
    # Unique topics, consumer group and Redis prefix (isolated_settings adds a
    # fresh suffix to each), so nothing from another run can leak in.
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        tmp_path / "models",
        auth={"server_key_file": str(tmp_path / "server.key")},
    )
    lines: list[str] = []

    code = await run_demo(
        settings,
        tmp_path / "report",
        quick=True,
        seed=0,
        use_stack=False,
        progress=lines.append,
    )

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    context = "\n".join(lines[-60:])
    by_role: dict[str, list[dict[str, object]]] = {}
    for client in report["clients"]:
        by_role.setdefault(str(client["role"]), []).append(client)
    (extractor,) = by_role["extraction"]
    assert extractor["alerts"], context
    assert all(c["blocked"] == 0 for c in by_role["benign"]), context
    assert code == 0, context
    assert report["exit_code"] == 0
    assert any(line.startswith("[") for line in lines), "no progress was shown"
    for name in ("report.md", "surrogate.png", "worker.log"):
        assert (tmp_path / "report" / name).stat().st_size > 0
