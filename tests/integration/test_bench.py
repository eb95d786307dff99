"""``modelgate bench`` against the real broker and Redis: one quick run, checked
for structure only. The machine is shared, so no timing is asserted except the
one the batching design rests on: batched admission beats one round trip per
message."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.bench import STAGES, run_bench
from tests.conftest import StackInfo
from tests.integration.helpers import isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SECTIONS = {"meta", "admission", "codec", "auth", "detectors", "end_to_end", "budget"}
# Counts that a healthy run leaves at zero; every other number is a measurement.
ZERO_COUNTS = {"admission.refused"}


def _numbers(tree: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every int or float leaf (not bools) with its dotted path."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, float(tree)


async def test_quick_bench_measures_every_section(
    stack: StackInfo,
    models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = isolated_settings(stack.kafka_bootstrap, stack.redis_url, models_dir)
    out = tmp_path / "bench.json"

    results = await run_bench(settings, quick=True, out=out)

    # Every section, and the same results on disk and in the printed table.
    assert set(results) == SECTIONS, sorted(results)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    table = capsys.readouterr().out
    for label in ("admission", "decode + validate", "HMAC", "detector", "end to end"):
        assert label in table, table
    assert results["detectors"]["detectors"], results["detectors"]
    assert set(results["end_to_end"]["stages"]) == set(STAGES), results["end_to_end"]

    # Every measurement finite and positive; nothing refused.
    numbers = dict(_numbers(results))
    bad = {
        path: value
        for path, value in numbers.items()
        if path not in ZERO_COUNTS and not (math.isfinite(value) and value > 0)
    }
    assert not bad, f"not finite and positive: {bad}"
    assert results["admission"]["refused"] == 0, results["admission"]

    # The design's premise: one round trip per 500 messages beats one per message.
    admission = results["admission"]
    assert (
        admission["batched"]["us_per_msg"] < admission["per_message"]["us_per_msg"]
    ), admission
    assert admission["batched_speedup"] > 1, admission

    # End to end: every request answered, and answered with a prediction.
    e2e = results["end_to_end"]
    assert e2e["answered"] == e2e["requests"] == e2e["ok"], e2e
    assert e2e["errors"] == {}, e2e
