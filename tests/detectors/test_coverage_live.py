"""``coverage``'s live (cell, class) table: honest held-out traffic judged
against what honest answers look like live, not against the model's answers
to its training data; flagged clients never teach it; it travels as a live
baseline and hostile ones are refused; its cost stays bounded."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from detectors import coverage
from detectors.baselines import BaselineRefused, decode_baseline, encode_baseline
from detectors.coverage import CoverageDetector, CoverageParams

Rows = npt.NDArray[np.float64]

FLIP = 0.4
"""Share of held-out rows the stand-in model answers with another class than
the true one: it is right on its training data, less so on new data (the
defect's cause, exaggerated so the reference-only expectation fails)."""


def one_hot(labels: npt.NDArray[np.int64], classes: int = 10) -> Rows:
    return np.eye(classes)[labels]


def held_out_answers(test: Rows, y_test: npt.NDArray[np.int64]) -> Rows:
    """The stand-in model's answers to the held-out rows: the true class, or
    for a fixed ``FLIP`` share of rows another fixed one."""
    rng = np.random.default_rng(11)
    flip = rng.random(len(test)) < FLIP
    labels = np.where(flip, (y_test + rng.integers(1, 10, len(test))) % 10, y_test)
    return one_hot(labels)


def prepared(digits: Any, **params: Any) -> CoverageDetector:
    detector = CoverageDetector(CoverageParams(**params), seed=0)
    detector.learn_baseline(digits.train)
    detector.learn_output_baseline(digits.train, one_hot(digits.y_train))
    return detector


def serve(
    detector: CoverageDetector,
    digits: Any,
    clients: int,
    queries: int,
    seed: int,
    *,
    learn: bool = True,
    prefix: str = "honest",
) -> dict[str, list[bool]]:
    """``clients`` honest clients replaying held-out rows, interleaved in
    batches of one query each; per client, whether each query was flagged."""
    proba = held_out_answers(digits.test, digits.y_test)
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(digits.test), size=(queries, clients))
    ids = [f"{prefix}-{c}" for c in range(clients)]
    mask = np.full(clients, learn)
    flags: dict[str, list[bool]] = {k: [] for k in ids}
    for row in picks:
        X = digits.test[row]
        for k, s in zip(ids, detector.score_batch(ids, X, learn=mask), strict=True):
            flags[k].append(s.flagged)
        detector.observe_outputs(ids, X, proba[row], learn=mask)
    return flags


def test_held_out_honest_clients_stay_under_threshold_once_the_live_table_is_in(
    digits: Any,
) -> None:
    # Control: against the reference answers alone, honest held-out replay
    # is flagged (so this test fails on the reference-only code).
    reference_only = prepared(digits, live_min_answers=2**53)
    flags = serve(reference_only, digits, 20, 120, seed=1)
    assert sum(any(f) for f in flags.values()) >= 5
    assert reference_only.decision_baseline == "reference"

    live = prepared(digits)
    serve(live, digits, 20, 40, seed=2, prefix="warm")  # 800 live answers
    assert live.decision_baseline == "live" and live.live_answers == 800
    flags = serve(live, digits, 20, 120, seed=1)
    assert not any(any(f) for f in flags.values())

    # Uniform random queries are still flagged against the live table.
    rng = np.random.default_rng(3)
    X = rng.random((120, 64))
    random_proba = one_hot(rng.integers(0, 10, 120))
    hit = False
    for i in range(120):
        hit |= live.score_batch(["thief"], X[i : i + 1], learn=[False])[0].flagged
        live.observe_outputs(
            ["thief"], X[i : i + 1], random_proba[i : i + 1], learn=[False]
        )
    assert hit


def test_live_table_keeps_the_reference_expectation_until_min_answers(
    digits: Any,
) -> None:
    detector = prepared(digits, live_min_answers=600)
    before = (detector._expected_dec, detector._sd_dec)
    serve(detector, digits, 10, 59, seed=4)
    assert detector.live_answers == 590
    assert detector.decision_baseline == "reference"
    assert detector._expected_dec is before[0] and detector._sd_dec is before[1]
    serve(detector, digits, 10, 1, seed=5)
    assert detector.decision_baseline == "live"


def test_live_table_ignores_rows_that_may_not_learn(digits: Any) -> None:
    quiet, noisy = prepared(digits), prepared(digits)
    for detector in (quiet, noisy):
        serve(detector, digits, 10, 60, seed=6)
    # A flagged client (learn=False) sends 400 random rows with random
    # answers to one of them only.
    rng = np.random.default_rng(7)
    X = rng.random((400, 64))
    noisy.score_batch(["flagged"] * 400, X, learn=np.zeros(400, dtype=bool))
    noisy.observe_outputs(
        ["flagged"] * 400, X, one_hot(rng.integers(0, 10, 400)), learn=[False] * 400
    )
    assert noisy.live_answers == quiet.live_answers == 600
    assert noisy.export_baseline() == quiet.export_baseline()
    np.testing.assert_array_equal(noisy._expected_dec, quiet._expected_dec)

    # The same rows with learn=True (from a client with no answers yet, as
    # each teaches only its first) do change it: the check can fail.
    noisy.observe_outputs(
        ["fresh"] * 400, X, one_hot(rng.integers(0, 10, 400)), learn=[True] * 400
    )
    assert noisy.export_baseline() != quiet.export_baseline()


def test_export_import_round_trip_restores_the_live_expectation(
    digits: Any,
) -> None:
    source = prepared(digits)
    serve(source, digits, 14, 50, seed=8)
    blob = source.export_baseline()
    assert blob is not None
    decoded = decode_baseline(blob)
    assert (decoded.samples, decoded.ready) == (700, True)

    fresh = prepared(digits)
    assert fresh.decision_baseline == "reference"
    assert fresh.import_baseline(blob) == 700
    assert fresh.decision_baseline == "live" and fresh.live_answers == 700
    assert fresh.export_baseline() == blob
    # The source last recomputed at 512 answers; the import recomputes from
    # all 700 at once.
    counts = source._live_counts()
    window = source.params.window
    assert fresh._expected_dec is not None and fresh._sd_dec is not None
    np.testing.assert_array_equal(
        fresh._expected_dec, coverage.expected_coverage(counts, window)
    )
    np.testing.assert_array_equal(fresh._sd_dec, coverage.coverage_sd(counts, window))

    # Counts add to a table's own (a catch-up of a not-ready worker).
    own = prepared(digits)
    serve(own, digits, 5, 20, seed=9)
    own.import_baseline(blob)
    assert own.live_answers == 800 and own.decision_baseline == "live"

    # An empty table exports samples 0, not ready, and imports as nothing.
    empty = prepared(digits).export_baseline()
    assert empty is not None
    assert (decode_baseline(empty).samples, decode_baseline(empty).ready) == (0, False)
    assert prepared(digits).import_baseline(empty) == 0


def coverage_blob(samples: int, **fields: bytes) -> bytes:
    blob = decode_baseline(_good_blob())
    merged = {**blob.fields, **fields}
    return encode_baseline(
        type(blob)(
            format=blob.format,
            detector=blob.detector,
            n_features=blob.n_features,
            samples=samples,
            ready=False,
            fields={k: v for k, v in merged.items() if v != b"drop"},
        )
    )


_GOOD: list[bytes] = []


def _good_blob() -> bytes:
    """A detector's live baseline of 3 answers in 2 pairs (cached)."""
    if not _GOOD:
        from sklearn.datasets import load_digits

        X = np.asarray(load_digits().data, dtype=np.float64) / 16.0
        detector = CoverageDetector(seed=0)
        detector.learn_baseline(X[:600])
        keys = np.array([3 * 256 + 1, 5 * 256 + 9], dtype="<i4")
        fields = {
            "keys": keys.tobytes(),
            "counts": np.array([2, 1], dtype="<i8").tobytes(),
            "clients": np.array([0b101, 0b10], dtype="<u8").tobytes(),
            "partition": detector._partition_digest(),
        }
        empty = detector.export_baseline()
        assert empty is not None
        blob = decode_baseline(empty)
        _GOOD.append(
            encode_baseline(
                type(blob)(
                    format=blob.format,
                    detector="coverage",
                    n_features=64,
                    samples=3,
                    ready=False,
                    fields=fields,
                )
            )
        )
    return _GOOD[0]


def _keys(*values: int) -> bytes:
    return np.array(values, dtype="<i4").tobytes()


def _counts(*values: int) -> bytes:
    return np.array(values, dtype="<i8").tobytes()


def _clients(*values: int) -> bytes:
    return np.array(values, dtype="<u8").tobytes()


HOSTILE = [
    pytest.param(4, {}, id="count-not-sum"),
    pytest.param(3, {"keys": _keys(3 * 256 + 1, 16 * 256)}, id="key-beyond-cells"),
    pytest.param(3, {"keys": _keys(-1, 5 * 256 + 9)}, id="negative-key"),
    pytest.param(3, {"keys": _keys(5 * 256 + 9, 3 * 256 + 1)}, id="not-ascending"),
    pytest.param(3, {"keys": _keys(7, 7)}, id="repeated-key"),
    pytest.param(3, {"counts": _counts(3, 0)}, id="zero-count"),
    pytest.param(3, {"counts": _counts(4, -1)}, id="negative-count"),
    pytest.param(2, {"counts": _counts(2)}, id="counts-not-keys"),
    pytest.param(3, {"keys": b"\x00" * 7}, id="ragged-keys"),
    pytest.param(3, {"clients": _clients(1, 0)}, id="pair-without-client"),
    pytest.param(3, {"clients": _clients(1)}, id="clients-not-keys"),
    pytest.param(3, {"partition": b"\x00" * 8}, id="other-partition"),
    pytest.param(3, {"partition": b"drop"}, id="missing-field"),
    pytest.param(3, {"extra": b"\x00"}, id="unknown-field"),
    pytest.param(
        2**62 + 3,
        {"counts": _counts(2**62 + 2, 1)},
        id="huge-count",
    ),
]


def test_a_well_formed_blob_is_accepted(digits: Any) -> None:
    detector = CoverageDetector(seed=0)
    from sklearn.datasets import load_digits

    detector.learn_baseline(
        np.asarray(load_digits().data, dtype=np.float64)[:600] / 16.0
    )
    assert detector.import_baseline(coverage_blob(3)) == 3
    assert detector.live_answers == 3
    assert detector._live_pairs[3, 1] == 2 and detector._live_pairs[5, 9] == 1
    assert detector._live_clients[3, 1] == 0b101


@pytest.mark.parametrize(("samples", "fields"), HOSTILE)
def test_hostile_live_tables_are_refused_and_change_nothing(
    samples: int, fields: dict[str, bytes]
) -> None:
    from sklearn.datasets import load_digits

    detector = CoverageDetector(seed=0)
    detector.learn_baseline(
        np.asarray(load_digits().data, dtype=np.float64)[:600] / 16.0
    )
    before = detector.export_baseline()
    with pytest.raises(BaselineRefused) as info:
        detector.import_baseline(coverage_blob(samples, **fields))
    assert info.value.code == "invalid"
    assert detector.export_baseline() == before and detector.live_answers == 0


def test_import_without_a_partition_is_refused() -> None:
    detector = CoverageDetector(seed=0)
    detector._ensure_arena(64)
    with pytest.raises(BaselineRefused) as info:
        detector.import_baseline(coverage_blob(3))
    assert info.value.code == "invalid"


def test_cost_is_bounded_table_and_refreshes(
    digits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = coverage.coverage_sd

    def counted(counts: Rows, horizon: int) -> Rows:
        calls.append(int((counts > 0).sum()))
        return real(counts, horizon)

    monkeypatch.setattr(coverage, "coverage_sd", counted)
    detector = prepared(
        digits,
        live_min_answers=512,
        live_refresh_answers=1024,
        live_answers_per_client=10_000,
    )
    calls.clear()
    rng = np.random.default_rng(10)
    # 10,000 answers in batches of 50, of 300 classes (beyond the 256 slots;
    # mostly the first ten, so that each recomputation is quick).
    for _ in range(200):
        X = digits.test[rng.integers(len(digits.test), size=50)]
        labels = np.where(rng.random(50) < 0.02, 299, rng.integers(0, 10, 50))
        ids = [f"k{i}" for i in rng.integers(0, 40, 50)]
        detector.score_batch(ids, X)
        detector.observe_outputs(ids, X, one_hot(labels, 300))
    # Once past 512, then every 1,024 (an eighth of the table once that is
    # more): 9 recomputations in 10,000 answers, not one per batch (200).
    assert 8 <= len(calls) <= 10
    assert detector._live_pairs.shape == (16, 256)
    assert detector._live_clients.shape == (16, 256)
    assert detector.live_answers == 10_000
    # Every pair of the export fits in cells * class slots.
    blob = detector.export_baseline()
    assert blob is not None
    keys = np.frombuffer(decode_baseline(blob).fields["keys"], dtype="<i4")
    assert len(keys) <= 16 * 256 and keys.max() < 16 * 256


def test_pairs_one_unflagged_client_alone_taught_do_not_count(digits: Any) -> None:
    detector = prepared(digits)
    serve(detector, digits, 20, 40, seed=12, prefix="warm")
    # A thief in good standing (learn=True) whose answers land in pairs no
    # honest client produced: they are counted, but the expectation uses the
    # reference's share for them (0 here) until three clients vouch.
    rng = np.random.default_rng(13)
    X = rng.random((200, 64))
    answers = one_hot(np.full(200, 7))
    detector.observe_outputs(["thief"] * 200, X, answers, learn=[True] * 200)
    # It teaches its first 64 answers (live_answers_per_client).
    thief_keys = np.unique(detector._region_keys(X[:64], answers[:64]))
    cell, label = np.divmod(thief_keys, 256)
    alone = detector._live_clients[cell, label] == detector._live_clients[
        cell, label
    ] & np.uint64(1 << (detector._arena.slots(["thief"])[0] % 64))  # type: ignore[union-attr]
    assert alone.any()
    counts = detector._live_counts().reshape(detector._live_pairs.shape)
    fallback = detector._ref_share * detector._live_pairs.sum()
    np.testing.assert_array_equal(
        counts[cell, label][alone], fallback[cell, label][alone]
    )
    assert (detector._live_pairs[cell, label][alone] > 0).all()


def test_each_client_teaches_only_its_first_answers(digits: Any) -> None:
    detector = prepared(digits, live_answers_per_client=64)
    X = digits.test[:500]
    proba = held_out_answers(digits.test, digits.y_test)[:500]
    # In batches of mixed sizes, with another client's rows between.
    for part in (slice(0, 1), slice(1, 40), slice(40, 300), slice(300, 500)):
        n = part.stop - part.start
        ids = ["busy"] * n + ["other"]
        rows = np.vstack([X[part], X[:1]])
        detector.observe_outputs(ids, rows, np.vstack([proba[part], proba[:1]]))
    assert detector.live_answers == 64 + 4
