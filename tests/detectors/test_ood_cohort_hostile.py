"""Forged cohort state in a stored ``ood`` state is refused whole.

A hand-over state carries each key's first query time (``first_s``) and the
window whose bits the cohort test sums as a young key's outlier count. A
forged one could date a key into a cohort with a time no clock gives, or make
a young key claim outliers it never sent and so carry them into an honest
cohort's pool. Every such state must raise ``ValueError`` and leave the
detector exactly as it was; every state the detector itself dumps, at any
age, must load again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detectors import OodParams, OutOfDistributionDetector
from detectors._state import StateBlob, decode_blob, encode_blob
from detectors.traffic import MAX_TIME_S
from tests.detectors.test_ood import continuous_reference, wide_queries

T0 = 1.7e9
WINDOW = 10


def _detector_with(n_queries: int) -> OutOfDistributionDetector:
    """Keys "a" and "b", ``n_queries`` each, every other one wide."""
    detector = OutOfDistributionDetector(OodParams(window=WINDOW))
    detector.learn_baseline(continuous_reference())
    rows = continuous_reference(seed=1)[: 2 * n_queries].copy()
    rows[::4] = wide_queries(len(rows[::4]), seed=3)
    rows[1::4] = wide_queries(len(rows[1::4]), seed=4)
    detector.score_batch(
        ["a", "b"] * n_queries,
        rows,
        learn=[False] * len(rows),
        arrival_s=T0 + np.repeat(np.arange(n_queries) * 0.25, 2),
    )
    return detector


def _forge(blob: bytes, **values: Any) -> bytes:
    decoded = decode_blob(blob)
    fields = dict(decoded.fields)
    dtypes = {"first_s": "<f8", "outlier": "u1", "has_outlier": "u1"}
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


def _bits(*set_at: int) -> list[int]:
    bits = [0] * WINDOW
    for at in set_at:
        bits[at] = 1
    return bits


# The forged key "a" has sent 3 queries: wide, ordinary, wide.
FORGED = {
    "first_s nan": {"first_s": np.nan},
    "first_s inf": {"first_s": np.inf},
    "first_s beyond any clock": {"first_s": 10 * MAX_TIME_S},
    "first_s before a first query": {
        "n_seen": 0,
        "n_wide": 0,
        "n_off_lattice": 0,
        "outlier": _bits(),
        "outlier_len": 0,
        "outlier_pos": 0,
    },
    # A young key claiming outliers it never sent.
    "outliers beyond its queries": {"outlier": _bits(0, 1, 2, 5, 6, 7)},
    "window longer than its queries": {"outlier_len": 6, "outlier_pos": 6},
    "window shorter than its queries": {"outlier_len": 2, "outlier_pos": 2},
    "window written elsewhere": {"outlier_pos": 5},
    "fewer outliers than wide queries": {"outlier": _bits(0)},
    # The repeat rule's base (the previous counted outlier): a flag that is
    # not one, a stored row without its flag, a flag with no outlier sent.
    "repeat flag not a flag": {"has_outlier": 2},
    "repeat row without its flag": {"has_outlier": 0},
    "repeat flag without an outlier": {"outlier": _bits(), "n_wide": 0},
}


@pytest.mark.parametrize("forged", list(FORGED.values()), ids=list(FORGED))
def test_forged_cohort_state_is_refused_and_changes_nothing(
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


@pytest.mark.parametrize("n_queries", [1, 2, 3, WINDOW - 1, WINDOW, WINDOW + 1, 25])
def test_every_state_the_detector_dumps_loads_again(n_queries: int) -> None:
    """The bounds are tight, not wrong: young keys (window = every query)
    and keys past their window (a wrapped ring) load again."""
    detector = _detector_with(n_queries)
    for key in ("a", "b"):
        blob = detector.dump_state(key)
        assert blob is not None
        other = OutOfDistributionDetector(OodParams(window=WINDOW))
        other.learn_baseline(continuous_reference())
        other.load_state(key, blob)
        assert other.dump_state(key) == blob


def test_extreme_but_real_times_load() -> None:
    detector = _detector_with(3)
    blob = detector.dump_state("a")
    assert blob is not None
    for first_s in (-MAX_TIME_S, 0.0, MAX_TIME_S):
        detector.load_state("c", _forge(blob, first_s=first_s))
