"""Forged cohort sums in a stored ``margin`` state are refused whole.

A key's opening and young-stretch S and variance, and its three rank sums,
are pooled with every key that started in the same quarter second at its
pace. They were bounded only by what the longest stream gives (S up to
2,016 and rank weights up to 100,000 whatever the key's answer count), so
one forged state of a key with 10 answers could carry the trend of 64
climbing answers, or the ranks of 100,000 doubtful ones, into an honest
cohort's pool, the weight of a crowd of hostile keys in one state. A key's
sums are now bounded by its own answer count, as ``traffic`` bounds its
pairs; every state the detector itself dumps, at any age, still loads. A
first query time beyond any record time (1e16 s) is refused too, as
``traffic`` and ``ood`` refuse theirs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detectors._state import StateBlob, decode_blob, encode_blob
from detectors.margin import MarginDetector, MarginParams
from tests.detectors.test_margin_cohort import answers

T0 = 1.7e9


def _detector() -> MarginDetector:
    detector = MarginDetector(MarginParams())
    rng = np.random.default_rng(0)
    x = rng.random((600, 4))
    margins = rng.random(600)
    detector.learn_baseline(x)
    detector.learn_output_baseline(x, answers(margins))
    ids = [f"w{i}" for i in range(600)]
    detector.score_batch(ids, x, arrival_s=np.full(600, T0 - 100.0))
    detector.observe_outputs(ids, x, answers(margins))
    return detector


def _feed(detector: MarginDetector, key: str, n: int, rng: np.random.Generator) -> None:
    for step in range(n):
        row = rng.random((1, 4))
        detector.score_batch([key], row, learn=[False], arrival_s=[T0 + 0.25 * step])
        margin = np.array([min(1.0, 0.02 * step)])
        detector.observe_outputs([key], row, answers(margin), learn=[False])


def _forge(blob: bytes, **values: Any) -> bytes:
    decoded = decode_blob(blob)
    fields = dict(decoded.fields)
    for name, value in values.items():
        dtype = "<i8" if name == "n_answers" else "<f8"
        fields[name] = np.array(value, dtype=dtype).tobytes()
    return encode_blob(
        StateBlob(
            decoded.format, decoded.detector, decoded.n_features, decoded.layout, fields
        )
    )


@pytest.mark.parametrize(
    "forged",
    [
        # 10 answers give at most 45 concordant pairs.
        {"young_s": 2016.0, "young_v": 1.0},
        {"young_s": 46.0},
        {"open_s": -46.0},
        {"young_v": 10.0 * 9.0 * 25.0 / 18.0 + 1.0},
        # Each answer weighs at most 1, the newest exactly 1.
        {"rank_w": 11.0, "rank_w2": 1.0, "rank_wu": 0.0},
        {"rank_w": 100_000.0, "rank_w2": 1.0, "rank_wu": 0.0},
        {"rank_w2": 5e-324},
        {"rank_w": 0.5, "rank_w2": 0.25, "rank_wu": 0.0},
        # Later than any record time (traffic's and ood's bound).
        {"first_s": 1e308},
        {"first_s": 1.0000001e16},
    ],
)
def test_sums_beyond_the_keys_own_answers_are_refused(forged: dict[str, float]) -> None:
    detector = _detector()
    _feed(detector, "a", 10, np.random.default_rng(1))
    blob = detector.dump_state("a")
    assert blob is not None
    with pytest.raises(ValueError, match="beyond"):
        detector.load_state("b", _forge(blob, **forged))
    assert detector.dump_state("b") is None
    detector.load_state("b", blob)


def test_every_state_the_detector_dumps_loads_again() -> None:
    detector = _detector()
    rng = np.random.default_rng(2)
    for step in range(80):
        row = rng.random((1, 4))
        if step % 7 == 3:
            row = np.array([[0.5, 0.5, 0.5, 0.5]])  # re-sends, not ranked again
        detector.score_batch(["a"], row, learn=[False], arrival_s=[T0 + 0.25 * step])
        margin = rng.random(1) if step % 3 else np.zeros(1)
        detector.observe_outputs(["a"], row, answers(margin), learn=[False])
        blob = detector.dump_state("a")
        assert blob is not None
        detector.load_state("copy", blob)
    # One huge batch pushes a key past window at once.
    rows = rng.random((200, 4))
    detector.score_batch(["big"] * 200, rows, arrival_s=np.full(200, T0))
    detector.observe_outputs(["big"] * 200, rows, answers(rng.random(200)))
    blob = detector.dump_state("big")
    assert blob is not None
    detector.load_state("copy", blob)
