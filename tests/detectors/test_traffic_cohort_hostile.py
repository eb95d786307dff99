"""Forged cohort counts in a stored ``traffic`` state are refused whole.

A hand-over state carries each key's cohort counts (``first_s``,
``last_gap``, ``pairs``, ``matches``). A forged one could make a young key
claim a metronome it never sent (30 of 30 matching pairs after 3 requests),
join a cohort it never started with, or carry a gap no clock gives into the
next pair. Every such state must raise ``ValueError`` and leave the detector
exactly as it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detectors._state import StateBlob, decode_blob, encode_blob
from detectors.traffic import MAX_TIME_S, TrafficDetector

T0 = 1.7e9


def _detector_with(n_requests: int) -> TrafficDetector:
    """Two keys, ``n_requests`` each, paced at 4 per second."""
    detector = TrafficDetector(seed=0)
    times = T0 + np.repeat(np.arange(n_requests) * 0.25, 2)
    detector.score_batch(
        ["a", "b"] * n_requests, np.zeros((2 * n_requests, 3)), arrival_s=times
    )
    return detector


def _forge(blob: bytes, **values: Any) -> bytes:
    decoded = decode_blob(blob)
    fields = dict(decoded.fields)
    dtypes = {"first_s": "<f8", "last_gap": "<f8", "pairs": "<i8", "matches": "<i8"}
    for name, value in values.items():
        fields[name] = np.array(value, dtype=dtypes.get(name, "<i8")).tobytes()
    return encode_blob(
        StateBlob(
            decoded.format,
            decoded.detector,
            decoded.n_features,
            decoded.layout,
            fields,
        )
    )


FORGED = {
    "first_s nan": {"first_s": np.nan},
    "first_s inf": {"first_s": np.inf},
    "first_s -inf": {"first_s": -np.inf},
    "first_s beyond any clock": {"first_s": 10 * MAX_TIME_S},
    "last_gap nan": {"last_gap": np.nan},
    "last_gap inf": {"last_gap": np.inf},
    "last_gap negative": {"last_gap": -0.25},
    "last_gap beyond two clocks": {"last_gap": 3 * MAX_TIME_S},
    "pairs negative": {"pairs": -1},
    "matches negative": {"matches": -1, "pairs": 0},
    "matches above pairs": {"matches": 3, "pairs": 2},
    "pairs beyond the window": {"pairs": 31, "matches": 31},
    # 3 requests give at most one pair: a young key claiming a metronome.
    "pairs beyond its requests": {"pairs": 30, "matches": 30},
    "a pair before two gaps": {"n_seen": 2, "pairs": 1, "matches": 1},
    # One request has no gap yet: a forged one would pair with its second.
    "a gap before two requests": {"n_seen": 1, "last_gap": 0.25},
}


@pytest.mark.parametrize("forged", list(FORGED.values()), ids=list(FORGED))
def test_forged_cohort_counts_are_refused_and_change_nothing(
    forged: dict[str, Any],
) -> None:
    detector = _detector_with(3)
    blob = detector.dump_state("a")
    assert blob is not None
    before = {key: detector.dump_state(key) for key in ("a", "b")}
    hostile = _forge(blob, **forged)
    for key in ("a", "b", "new"):
        with pytest.raises(ValueError, match="state"):
            detector.load_state(key, hostile)
    assert {key: detector.dump_state(key) for key in ("a", "b")} == before
    assert detector.dump_state("new") is None


@pytest.mark.parametrize("n_requests", [1, 2, 3, 16, 32, 33, 40])
def test_every_state_the_detector_dumps_loads_again(n_requests: int) -> None:
    """The bounds are tight, not wrong: a key's own counts at any age (its
    pairs at their most, ``min(n_seen, window) - 2``, for a metronome)
    survive a hand-over."""
    detector = _detector_with(n_requests)
    blob = detector.dump_state("a")
    assert blob is not None
    pairs = int(np.frombuffer(decode_blob(blob).fields["pairs"], "<i8")[0])
    assert pairs == max(0, min(n_requests, 32) - 2)
    other = TrafficDetector(seed=0)
    other.load_state("a", blob)
    assert other.dump_state("a") == blob


def test_extreme_but_real_counts_load() -> None:
    """A key first seen at Kafka's earliest representable time, and a gap
    of twice the largest time, are values the kernels produce."""
    detector = _detector_with(3)
    blob = detector.dump_state("a")
    assert blob is not None
    for forged in (
        {"first_s": -MAX_TIME_S},
        {"first_s": 0.0},
        {"last_gap": 2 * MAX_TIME_S},
        {"pairs": 1, "matches": 0},
    ):
        detector.load_state("c", _forge(blob, **forged))
