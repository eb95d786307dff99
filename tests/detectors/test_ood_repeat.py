"""Known answers for ``ood``'s repeat rule: an honest client re-sending one
unusual input is one outlier, not one per copy.

An on-lattice outlier (HST or wide) within ``range_repeat_eps`` (RMS per
feature, on the stored 8-bit grid) of its client's previous counted outlier
is not counted; off-lattice rows always are. Before the rule covered HST
outliers, eight copies of one unusual held-out digit counted as eight.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from detectors import OodParams, OutOfDistributionDetector
from detectors._state import StateBlob, decode_blob, encode_blob
from tests.detectors import ood_repeat_sim
from tests.detectors.conftest import Digits

Rows = npt.NDArray[np.float64]


def _fresh(digits: Digits) -> OutOfDistributionDetector:
    detector = OutOfDistributionDetector()
    detector.learn_baseline(digits.train)
    return detector


def _unusual(detector: OutOfDistributionDetector, digits: Digits) -> Rows:
    """Held-out digits the trees find unusual but that are neither wide nor
    off the lattice: real inputs an honest client may send."""
    forest = detector._forest
    assert forest is not None and detector.query_threshold is not None
    scores = forest.score(digits.test)
    rows = digits.test[
        (scores > detector.query_threshold)
        & (detector.outside_range(digits.test) < 3)
        & (detector.off_lattice(digits.test) == 0)
    ]
    assert len(rows) >= 3
    return rows


def _ordinary(detector: OutOfDistributionDetector, digits: Digits, n: int) -> Rows:
    forest = detector._forest
    assert forest is not None and detector.query_threshold is not None
    scores = forest.score(digits.test)
    return digits.test[scores < 0.9 * detector.query_threshold][:n]


def _copies(row: Rows, n: int, seed: int) -> Rows:
    """``n`` near-duplicates of ``row``: the evaluation's 0.5% noise."""
    rng = np.random.default_rng(seed)
    return np.clip(row + rng.normal(0.0, 0.005, (n, row.shape[-1])), 0.0, 1.0)


def _wide(row: Rows) -> Rows:
    """``row`` with three pixels that are 0 in every reference digit set to
    3/16: outside the range, on the lattice, an RMS step of 0.04 from it."""
    out = row.copy()
    out[[0, 24, 32]] = 3 / 16
    return out


def test_a_run_of_copies_of_one_unusual_digit_counts_once(digits: Digits) -> None:
    detector = _fresh(digits)
    row = _unusual(detector, digits)[0]
    rows = np.concatenate([[row], _copies(row, 7, seed=1)])
    scores = detector.score_batch(["h"] * 8, rows)
    assert "1 of the last 8" in scores[-1].evidence
    assert not any(s.flagged for s in scores)
    assert all(s.score == 0.0 for s in scores)


def test_distinct_unusual_digits_still_count(digits: Digits) -> None:
    detector = _fresh(digits)
    unusual = _unusual(detector, digits)[:3]
    ordinary = _ordinary(detector, digits, 3)
    # Unusual and ordinary in turn, so each unusual one is compared with the
    # previous unusual one, not with its neighbour.
    rows = np.stack([unusual[0], ordinary[0], unusual[1], ordinary[1], unusual[2]])
    scores = detector.score_batch(["t"] * 5, rows)
    assert "3 of the last 5" in scores[-1].evidence


def test_only_the_previous_counted_outlier_is_a_repeat_base(digits: Digits) -> None:
    detector = _fresh(digits)
    a, b = _unusual(detector, digits)[:2]
    # a, b, a again: the third is 2 steps back, not a repeat of b.
    rows = np.stack([a, b, a, a])
    scores = detector.score_batch(["t"] * 4, rows)
    assert "3 of the last 4" in scores[-1].evidence


def test_wide_and_unusual_repeats_interplay(digits: Digits) -> None:
    detector = _fresh(digits)
    a, b = _unusual(detector, digits)[:2]
    assert (detector.outside_range(_wide(a)[None]) >= 3).all()
    # A wide copy of a counted HST outlier is a repeat: neither an outlier
    # nor a counted wide query.
    first = detector.score_batch(["x"] * 2, np.stack([a, _wide(a)]))
    assert "1 of the last 2" in first[-1].evidence
    assert "0 outside" in first[-1].evidence
    # An HST copy of a counted wide query is a repeat too.
    # (A fresh detector each time: keys started together would pool their
    # counts in the cohort test.)
    second = _fresh(digits).score_batch(["y"] * 2, np.stack([_wide(a), a]))
    assert "1 of the last 2" in second[-1].evidence
    assert "1 outside" in second[-1].evidence
    # With another outlier between them, both count.
    third = _fresh(digits).score_batch(["z"] * 3, np.stack([_wide(a), b, a]))
    assert "3 of the last 3" in third[-1].evidence
    assert "1 outside" in third[-1].evidence


def test_off_lattice_copies_all_count_and_are_no_repeat_base(digits: Digits) -> None:
    detector = _fresh(digits)
    a, b = _unusual(detector, digits)[:2]
    synthetic = b.copy()
    synthetic[8:16] = np.clip(synthetic[8:16] + 0.03, 0.0, 1.0)
    assert detector.off_lattice(synthetic[None])[0] >= 4
    rows = np.stack([synthetic, synthetic, synthetic])
    scores = detector.score_batch(["s"] * 3, rows)
    assert "3 of the last 3" in scores[-1].evidence
    assert "3 so far off them" in scores[-1].evidence
    # An off-lattice row (far from it) between two copies of an unusual
    # digit leaves the digit the repeat base: the second copy does not count.
    other = _fresh(digits)
    rows = np.stack([a, synthetic, a])
    scores = other.score_batch(["u"] * 3, rows)
    assert "2 of the last 3" in scores[-1].evidence


def test_a_batch_counts_as_its_rows_one_at_a_time(digits: Digits) -> None:
    one = _fresh(digits)
    many = _fresh(digits)
    a, b = _unusual(one, digits)[:2]
    rows = np.concatenate([_copies(a, 3, 5), [_wide(b)], _copies(b, 2, 6), [a]])
    clients = (["p", "q"] * len(rows))[: len(rows)]
    learn = [False] * len(rows)
    batch = many.score_batch(clients, rows, learn=learn)
    single = [
        one.score_batch([c], rows[i : i + 1], learn=[False])[0]
        for i, c in enumerate(clients)
    ]
    assert batch == single


def test_the_repeat_base_is_handed_over(digits: Digits) -> None:
    detector = _fresh(digits)
    a = _unusual(detector, digits)[0]
    detector.score_batch(["h"], a[None], learn=[False])
    blob = detector.dump_state("h")
    assert blob is not None
    restored = _fresh(digits)
    restored.load_state("h", blob)
    assert restored.dump_state("h") == blob
    # Again: a repeat only if the handed-over state says what came before.
    got = restored.score_batch(["h"], a[None], learn=[False])[0]
    assert got == detector.score_batch(["h"], a[None], learn=[False])[0]
    assert "1 of the last 2" in got.evidence


def _forge(blob: bytes, **values: npt.NDArray[np.generic]) -> bytes:
    decoded = decode_blob(blob)
    fields = dict(decoded.fields)
    for name, value in values.items():
        fields[name] = value.tobytes()
    return encode_blob(
        StateBlob(
            decoded.format,
            decoded.detector,
            decoded.n_features,
            decoded.layout,
            fields,
        )
    )


def test_a_key_before_its_first_query_has_no_repeat_base(digits: Digits) -> None:
    detector = _fresh(digits)
    detector.score_batch(["h"], digits.test[:1], learn=[False])
    blob = detector.dump_state("h")
    assert blob is not None
    empty = _forge(
        blob,
        n_seen=np.array(0, dtype="<i8"),
        first_s=np.array(0.0, dtype="<f8"),
        outlier=np.zeros(50, dtype="u1"),
        outlier_len=np.array(0, dtype="<i8"),
        outlier_pos=np.array(0, dtype="<i8"),
        ewma=np.array(0.0, dtype="<f8"),
        has_outlier=np.array(1, dtype="u1"),
    )
    with pytest.raises(ValueError, match="has_outlier"):
        detector.load_state("new", empty)


def test_repeat_eps_zero_counts_every_copy(digits: Digits) -> None:
    detector = OutOfDistributionDetector(OodParams(range_repeat_eps=0.0))
    detector.learn_baseline(digits.train)
    row = _unusual(detector, digits)[0]
    # Only an exact copy (on the 8-bit grid) is a repeat at 0.
    rows = np.stack([row, row, _wide(row)])
    scores = detector.score_batch(["h"] * 3, rows)
    assert "2 of the last 3" in scores[-1].evidence


def test_the_evaluations_seed_1_honest_clients_are_not_flagged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The case found in ``modelgate eval --models digits --seed 1``: honest
    client 16 re-sends one unusual digit, and 4 of its first 8 queries were
    HST outliers, which blocked it at its 8th (the replay showed the same
    before the rule covered HST outliers)."""
    monkeypatch.setattr(ood_repeat_sim, "CALIBRATE", False)
    arrivals = ood_repeat_sim.honest_arrivals(1)
    detector = OutOfDistributionDetector()
    detector.learn_baseline(ood_repeat_sim.reference()[0])
    forest = detector._forest
    assert forest is not None and detector.query_threshold is not None
    first = np.stack([row for _, c, row in arrivals if c == 16][:8]) / 16.0
    assert (forest.score(first) > detector.query_threshold).sum() >= 4
    got = ood_repeat_sim.replay(1, OutOfDistributionDetector)
    assert got.flagged == []
    assert got.blocked == []
