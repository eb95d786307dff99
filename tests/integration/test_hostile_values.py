"""Values at the edges of what validation lets through, and hostile Kafka
record times, through a real worker to the compiled detector kernels.

The request topic stamps records with the broker's time (LogAppendTime,
``gateway.topics``), so the forged record times below no longer reach the
detectors; they stay to show a producer that sends them is served as any
other. Hostile times at the kernels themselves are covered by
``tests/detectors/test_hostile_state.py``.

numba checks no index: a kernel reading out of bounds would corrupt state or
kill the worker (here, the test process, since the worker runs in it). Every
record must get a score and an answer or a stable error code, and the worker
must answer a plain query afterwards. Run it with ``NUMBA_BOUNDSCHECK=1`` (and
a throwaway ``NUMBA_CACHE_DIR``: the flag is not part of numba's cache key) to
turn a bad index into an error instead of silent corruption.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.config import Settings
from tests.conftest import StackInfo
from tests.integration.helpers import (
    RawKafka,
    create_key,
    read_topic,
    request_path_settings,
    running_worker,
)
from tests.integration.test_adversarial import _body, _signed, _valid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_AHEAD_MS = 30 * 60 * 1000
"""How far ahead of the broker's clock a record time is sent, in ms: the
broker refuses times more than an hour ahead (``InvalidTimestampError``,
Kafka 4's ``log.message.timestamp.after.max.ms``), not times long past."""


@pytest.fixture
def settings(stack: StackInfo, models_dir: Path) -> Settings:
    """The request-path settings (shadow policy, limits that never throttle)
    with one partition, so every record below shares one batch stream."""
    return request_path_settings(stack, models_dir, requests_partitions=1)


def _rows(values: list[float] | np.ndarray, n: int = 1) -> list[float]:
    """``n`` rows of the 64 digit pixels, cycling through ``values``."""
    cycle = np.resize(np.asarray(values, dtype=np.float64), n * 64)
    return [float(v) for v in cycle]


async def test_edge_values_and_record_times_reach_the_kernels(
    settings: Settings, kafka: RawKafka
) -> None:
    key_id, secret = await create_key(settings, "edge")
    other_id, other_secret = await create_key(settings, "edge2")
    topics = settings.kafka.topics
    expected: dict[str, str] = {}  # request id -> code ("" for ok)
    sent = 0

    async def send(
        rid: str,
        data: list[float],
        code: str,
        *,
        rows: int = 1,
        timestamp_ms: int | None = None,
        raw: bytes | None = None,
        who: tuple[str, bytes, str] = (key_id, secret, "edge"),
    ) -> None:
        nonlocal sent
        body: dict[str, Any] = _body(who[0], request_id=rid, data=data)
        body["inputs"][0]["shape"] = [rows, 64]
        value = raw if raw is not None else json.dumps(body).encode()
        await kafka.producer.send_and_wait(
            topics.requests,
            value,
            key=who[2].encode(),
            headers=_signed(who[1], value),
            timestamp_ms=timestamp_ms,
        )
        expected[rid] = code
        sent += 1

    # Values validation accepts (the declared range is 0..16): the exact
    # ends, -0.0, a float32 subnormal, and full batches of them.
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    for name, values in {
        "zeros": [0.0],
        "top": [16.0],
        "negzero": [-0.0],
        "subnormal": [tiny],
        "mixed": [0.0, 16.0, -0.0, tiny, 8.0, 15.999999],
    }.items():
        await send(f"ok-{name}", _rows(values), "")
        await send(f"ok-{name}-full", _rows(values, 32), "", rows=32)
    # Just outside, and beyond float32: refused before any detector.
    above = float(np.nextafter(np.float32(16.0), np.float32(np.inf)))
    for name, value, code in [
        ("above", above, "OUT_OF_RANGE"),
        ("below", -1e-7, "OUT_OF_RANGE"),
        ("f32max", float(np.finfo(np.float32).max), "OUT_OF_RANGE"),
        ("beyond-f32", 1e39, "NON_FINITE"),
        ("e300", 1e300, "NON_FINITE"),
    ]:
        await send(f"bad-{name}", _rows([value]), code)
    huge_literal = json.dumps(
        _body(key_id, request_id="bad-literal", data=_rows([1.0]))
    ).replace('"data": [1.0', '"data": [1' + "0" * 400, 1)
    await send("bad-literal", [], "NON_FINITE", raw=huge_literal.encode())
    await send("bad-rows", _rows([1.0], 33), "SHAPE_MISMATCH", rows=33)

    # Record times the traffic detector reads as arrivals: the smallest and
    # the latest the broker allows, jumping back and forth, then equal.
    ahead = int(time.time() * 1000) + _AHEAD_MS
    for i, ts in enumerate([1, ahead, 1, ahead - 1, 2, 2, 2]):
        await send(f"time-{i}", _rows([4.0 + i]), "", timestamp_ms=ts)
    for i in range(40):
        await send(
            f"steady-{i}",
            _rows([float(i % 16)]),
            "",
            timestamp_ms=1_700_000_000_000 - 1000 * i,
            who=(other_id, other_secret, "edge2"),
        )
    last = await _valid(kafka, key_id, secret, "edge")

    async with running_worker(settings):
        records = await read_topic(
            settings,
            topics.responses,
            until=lambda r: {x["request_id"] for x in r} >= {*expected, last},
            timeout_s=60,
        )
    by_id = {r["request_id"]: r for r in records}
    for rid, code in expected.items():
        got = by_id[rid]
        assert (got.get("error") or {}).get("code", "") == code, (rid, got)
    assert by_id[last]["status"] == "ok"
    assert sent == len(expected)
