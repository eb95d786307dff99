"""Fingerprint hashing, the in-memory shared store and the detector."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from detectors import fingerprint
from detectors.fingerprint import (
    FingerprintDetector,
    FingerprintMatch,
    FingerprintParams,
    HashArray,
    InMemoryFingerprintStore,
    input_keys,
    top_hashes,
    window_hashes,
)
from tests.detectors.conftest import Digits


def test_hashes_are_deterministic_positional_and_never_zero() -> None:
    x = np.zeros((1, 10))
    x[0, 2] = 1.0
    first = window_hashes(x, levels=4, width=3)
    assert first.shape == (1, 8)
    assert np.array_equal(first, window_hashes(x, levels=4, width=3))
    # All-zero windows at different positions hash differently.
    assert len(set(first[0].tolist())) == 8
    assert (first != 0).all()
    # Changing a feature within a quantisation level changes nothing.
    y = x.copy()
    y[0, 5] = 0.2
    assert np.array_equal(window_hashes(y, levels=4, width=3), first)
    # Another seed, other values.
    assert not np.array_equal(window_hashes(x, levels=4, width=3, seed=1), first)


def test_input_keys_tell_exact_copies_apart() -> None:
    x = np.random.default_rng(0).random((3, 64))
    x[1] = x[0]
    x[2] = x[0]
    x[2, 10] += 0.01  # a change far below a fingerprint's quantisation step
    keys = input_keys(x)
    assert keys[0] == keys[1] != keys[2]
    assert (keys != 0).all()


def test_top_hashes_keeps_the_largest_and_drops_common_ones() -> None:
    hashes = np.array([[5, 9, 1, 7, 3]], dtype=np.uint64)
    assert top_hashes(hashes, 3).tolist() == [[9, 7, 5]]
    common = np.array([7, 9], dtype=np.uint64)
    assert top_hashes(hashes, 3, common).tolist() == [[5, 3, 1]]
    assert top_hashes(hashes, 7).tolist() == [[9, 7, 5, 3, 1, 0, 0]]
    big = np.array([[2**63 + 1, 3, 2**64 - 1]], dtype=np.uint64)
    assert top_hashes(big, 2).tolist() == [[2**64 - 1, 2**63 + 1]]


def _sets(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.uint64)


def test_store_reports_near_duplicates_by_client() -> None:
    store = InMemoryFingerprintStore(match_threshold=3)
    found = store.observe(
        ["a", "b", "c", "a", "d"],
        _sets(
            [1, 2, 3, 4],
            [1, 2, 3, 9],  # shares 3 with a's: near
            [1, 2, 7, 8],  # shares 2 with each: not near
            [1, 2, 3, 4],  # own repeat (another input), and near b's
            [1, 2, 3, 4],  # a copy of a's first input: its matches are
        ),  # counted as identical, not as evidence against d
        input_keys=np.array([10, 11, 12, 13, 10], dtype=np.uint64),
    )
    assert [m.own for m in found] == [0, 0, 0, 1, 0]
    assert [dict(m.others) for m in found] == [{}, {"a": 1}, {}, {"b": 1}, {}]
    assert [m.identical for m in found] == [0, 0, 0, 0, 3]


def test_rows_not_remembered_are_compared_but_not_stored() -> None:
    store = InMemoryFingerprintStore(match_threshold=2)
    first = store.observe(["a", "b"], _sets([1, 2, 3], [1, 2, 3]), [False, True])
    assert first[1].others == {}
    second = store.observe(["c"], _sets([1, 2, 5]))
    assert dict(second[0].others) == {"b": 1}


def test_store_stays_bounded() -> None:
    store = InMemoryFingerprintStore(
        match_threshold=2, horizon=100, max_hashes=1000, entries_per_hash=4
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
        store.observe(
            [f"c{i}" for i in range(200)],
            rng.integers(1, 2**40, (200, 8)).astype(np.uint64),
        )
    assert len(store) <= 1000
    assert len(store._slots) <= 1000 and len(store._entry_client) == 100
    # A hash sent by everyone keeps only the last entries_per_hash entries:
    # the eleventh query is near only the last four.
    found = store.observe([f"x{i}" for i in range(11)], _sets(*[[7, 8]] * 11))
    assert [sum(m.others.values()) for m in found] == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    # An entry beyond the horizon no longer counts.
    old = InMemoryFingerprintStore(match_threshold=2, horizon=2)
    old.observe(["a", "b", "c"], _sets([1, 2], [5, 6], [7, 8]))
    assert old.observe(["d"], _sets([1, 2]))[0].others == {}


def test_detector_sees_an_attack_spread_over_keys(digits: Digits) -> None:
    detector = FingerprintDetector()
    detector.learn_baseline(digits.train)
    rng = np.random.default_rng(1)
    base = digits.test[3]
    X = np.clip(base + rng.normal(0, 0.01, (100, base.size)), 0, 1)
    keys = [f"key-{i % 10}" for i in range(100)]
    scores = detector.score_batch(keys, X)
    # Each key sent only 10 queries, yet almost all matched another key's.
    assert all(s.flagged for s in scores[-10:])
    assert all(m.others for m in detector.last_matches[20:])
    assert detector.last_hashes.shape == (100, detector.params.k)


def test_parameters_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError, match="match_threshold"):
        FingerprintDetector(FingerprintParams(k=4, match_threshold=5))
    with pytest.raises(ValueError, match="2\\*\\*48"):
        FingerprintDetector(FingerprintParams(levels=256, width=7))
    detector = FingerprintDetector(FingerprintParams(width=8))
    with pytest.raises(ValueError, match="width"):
        detector.score_batch(["a"], np.zeros((1, 4)))


class _DelegatingStore:
    """A store that is not an InMemoryFingerprintStore (as a shared store
    elsewhere would be), answering through one."""

    def __init__(self) -> None:
        self.inner = InMemoryFingerprintStore(match_threshold=8, entries_per_hash=4)

    def observe(
        self,
        client_ids: Sequence[str],
        hash_sets: HashArray,
        remember: Sequence[bool] | None = None,
        input_keys: npt.NDArray[np.uint64] | None = None,
    ) -> list[FingerprintMatch]:
        return self.inner.observe(client_ids, hash_sets, remember, input_keys)


def test_detector_scores_the_same_through_any_store(digits: Digits) -> None:
    rng = np.random.default_rng(5)
    base = digits.test[rng.integers(0, len(digits.test), 40)]
    X = np.clip(np.repeat(base, 5, axis=0) + rng.normal(0, 0.01, (200, 64)), 0, 1)
    ids = [f"key-{i}" for i in rng.integers(0, 6, 200)]
    default = FingerprintDetector()
    other = FingerprintDetector(store=_DelegatingStore())
    for detector in (default, other):
        detector.learn_baseline(digits.train)
    for start in range(0, 200, 64):
        a = default.score_batch(ids[start : start + 64], X[start : start + 64])
        b = other.score_batch(ids[start : start + 64], X[start : start + 64])
        assert a == b
        assert default.last_matches == other.last_matches
    assert any(s.score > 0 for s in a)


def test_compiled_window_hashes_equal_the_numpy_ones(
    digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compiled loop (bitmap of common windows) and numpy's hashing with
    # a search among common hashes, used beyond the bitmap's size, agree.
    X = np.vstack([digits.test[:50], np.clip(digits.test[:50] * 1.7 - 0.2, 0, 1)])
    compiled = FingerprintDetector(seed=3)
    compiled.learn_baseline(digits.train)
    monkeypatch.setattr(fingerprint, "_MAX_COMMON_BITS", 0)
    plain = FingerprintDetector(seed=3)
    plain.learn_baseline(digits.train)
    assert plain._common_table is None and compiled._common_table is not None
    assert np.array_equal(compiled.fingerprints(X), plain.fingerprints(X))
    assert len(compiled._common) and (compiled.fingerprints(X) == 0).any()
