"""``modelgate eval --quick`` on a subset: honest clients and real attacks
(single-key and over 10 keys) through the real broker and a worker process,
checked by its own report.

The honest clients here do not send runs of near-identical inputs: today's
similarity detector flags and blocks such runs (the full evaluation measures
and reports it; see docs/evaluation.md), and this test asserts what the
gateway already guarantees, not what it does not yet."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from evaluation.harness import run_eval
from tests.conftest import StackInfo
from tests.integration.helpers import isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


async def test_quick_eval_flags_the_caught_attacks_and_blocks_no_honest_client(
    stack: StackInfo, tmp_path: Path
) -> None:
    settings = isolated_settings(
        stack.kafka_bootstrap,
        stack.redis_url,
        tmp_path / "models",
        auth={"server_key_file": str(tmp_path / "server.key")},
    )
    out = tmp_path / "report"
    lines: list[str] = []
    started = time.monotonic()

    code = await run_eval(
        settings,
        out,
        models=("digits",),
        attacks=("hopskipjump", "papernot", "nes"),
        n_benign=8,
        quick=True,
        use_stack=False,
        progress=lines.append,
        near_duplicates=False,
    )

    elapsed_s = time.monotonic() - started
    context = "\n".join(lines[-40:])
    report = json.loads((out / "report.json").read_text())
    honest = [c for c in report["clients"] if c["role"] == "benign"]
    assert len(honest) == 8
    refused = [c for c in honest if c["blocked"] or c["throttled"]]
    assert not refused, (refused, context)
    assert sum(c["requests"] for c in honest) > 0
    assert code == 0 == report["exit_code"], context

    # Every pair ran from one key and from ten.
    runs = {(a["attack"], a["variant"]): a for a in report["attacks"]}
    assert set(runs) == {
        (attack, variant)
        for attack in ("hopskipjump", "papernot", "nes")
        for variant in ("single", "distributed")
    }
    assert runs[("papernot", "distributed")]["keys"] == 10
    # What today's detectors catch from a single key (HopSkipJump's near
    # duplicates, Papernot's synthetic points, NES's off-lattice samples) must
    # be flagged.
    for attack in ("hopskipjump", "papernot", "nes"):
        single = runs[(attack, "single")]
        assert single["flagged"], (attack, single["ledger"], context)
        assert single["direct"], attack  # the unhindered baseline ran

    # The report's structure.
    assert {"targets", "attacks", "benign_summary", "plan", "clients"} <= set(report)
    for row in report["targets"]:
        assert set(row) == {"target", "measured", "goal", "met", "missed_by"}
    markdown = (out / "report.md").read_text()
    assert "## Targets" in markdown and "## Honest population" in markdown
    # The machine's load and how late paced requests left are on record, so a
    # timing result from a loaded machine can be told from a quiet one.
    assert report["machine"]["cores"] and "Machine:" in markdown
    paced = [r for r in runs.values() if r["pacing_lag_ms"]]
    assert paced and all(r["pacing_lag_ms"]["p99_ms"] >= 0 for r in paced)
    for name in ("agreement.png", "risk.png", "worker.log"):
        assert (out / name).stat().st_size > 0
    assert any(line.startswith("[") for line in lines), "no progress was shown"
    assert elapsed_s < 90, f"quick eval took {elapsed_s:.0f} s"
