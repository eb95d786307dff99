"""Known answers for ``ood``'s ``lattice_block``: a run of off-lattice
queries is refused on its count, however many real inputs sit beside it.

Papernot et al.'s Jacobian augmentation opens with real digits (its seed
set) and then sends synthetic steps; before the rule its share of outliers
grew one query at a time from behind those real inputs, and the policy
ladder refused it one query after the extraction bound was passed.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from detectors import OodParams, OutOfDistributionDetector
from detectors._state import StateBlob, decode_blob, encode_blob
from tests.detectors.conftest import Digits

Rows = npt.NDArray[np.float64]
THRESHOLD = OodParams().threshold
BLOCK_SHARE = 1.5 * THRESHOLD


def _fresh(digits: Digits, **params: object) -> OutOfDistributionDetector:
    detector = OutOfDistributionDetector(OodParams.model_validate(params))
    detector.learn_baseline(digits.train)
    return detector


def _ordinary(detector: OutOfDistributionDetector, digits: Digits, n: int) -> Rows:
    """Held-out digits that are no outlier of any kind."""
    forest = detector._forest
    assert forest is not None and detector.query_threshold is not None
    rows = digits.test[
        (forest.score(digits.test) < 0.9 * detector.query_threshold)
        & (detector.outside_range(digits.test) == 0)
        & (detector.off_lattice(digits.test) == 0)
    ]
    assert len(rows) >= n
    return rows[:n]


def _stepped(rows: Rows, seed: int) -> Rows:
    """Jacobian-like steps: each row moved 0.1 along a random sign pattern,
    clipped to the pixel range, as the evaluation's Papernot attack does."""
    rng = np.random.default_rng(seed)
    signs = np.sign(rng.normal(size=rows.shape))
    return np.clip(rows + 0.1 * signs, 0.0, 1.0)


def _papernot_like(
    detector: OutOfDistributionDetector, digits: Digits, n_synthetic: int
) -> Rows:
    seeds = _ordinary(detector, digits, 10)
    synthetic = _stepped(seeds[:n_synthetic], seed=3)
    assert (detector.off_lattice(synthetic) > 0).all()
    return np.concatenate([seeds, synthetic])


def test_a_third_off_lattice_query_scores_the_block_level(digits: Digits) -> None:
    detector = _fresh(digits)
    rows = _papernot_like(detector, digits, 3)
    scores = detector.score_batch(["p"] * len(rows), rows, learn=[False] * len(rows))
    second, third = scores[-2], scores[-1]
    # Two synthetic queries among ten real ones: a share of 2/12, judged (an
    # off-lattice client is judged at once) but under the flag.
    assert second.score == pytest.approx(2 / 12)
    assert not second.flagged
    assert third.score == pytest.approx(BLOCK_SHARE)
    assert third.flagged
    assert "3 of the last 13 queries hold values between the levels" in third.evidence


def test_off_turns_the_rule_off(digits: Digits) -> None:
    detector = _fresh(digits, lattice_block=0)
    rows = _papernot_like(detector, digits, 3)
    scores = detector.score_batch(["p"] * len(rows), rows, learn=[False] * len(rows))
    assert scores[-1].score == pytest.approx(3 / 13)
    assert not scores[-1].flagged


def test_the_level_and_count_are_parameters_changed_live(digits: Digits) -> None:
    detector = _fresh(digits)
    rows = _papernot_like(detector, digits, 2)
    detector.set_params(lattice_block=2, lattice_block_level=2.0)
    scores = detector.score_batch(["p"] * len(rows), rows, learn=[False] * len(rows))
    assert scores[-1].score == pytest.approx(2.0 * THRESHOLD)
    # Capped at a share of 1, whatever the level asks.
    capped = _fresh(digits, lattice_block=2, lattice_block_level=10.0)
    got = capped.score_batch(["p"] * len(rows), rows, learn=[False] * len(rows))
    assert got[-1].score == pytest.approx(1.0)


def test_a_run_that_leaves_the_window_no_longer_counts(digits: Digits) -> None:
    detector = _fresh(digits, significance=1.0)
    rows = _papernot_like(detector, digits, 3)
    window = OodParams().window
    later = _ordinary(detector, digits, window)
    stream = np.concatenate([rows, later])
    scores = detector.score_batch(
        ["p"] * len(stream), stream, learn=[False] * len(stream)
    )
    assert scores[len(rows) - 1].score == pytest.approx(BLOCK_SHARE)
    # While 3 stay in the last 50 the level holds; after, the share rules.
    last_with_three = len(rows) - 3 + window - 1
    assert scores[last_with_three].score == pytest.approx(BLOCK_SHARE)
    assert scores[last_with_three + 1].score < THRESHOLD
    assert scores[-1].score == 0.0


def test_a_batch_scores_as_its_rows_one_at_a_time(digits: Digits) -> None:
    one = _fresh(digits)
    many = _fresh(digits)
    rows = _papernot_like(one, digits, 5)
    clients = (["a", "b"] * len(rows))[: len(rows)]
    learn = [False] * len(rows)
    batch = many.score_batch(clients, rows, learn=learn)
    single = [
        one.score_batch([c], rows[i : i + 1], learn=[False])[0]
        for i, c in enumerate(clients)
    ]
    assert batch == single


def test_the_run_is_handed_over(digits: Digits) -> None:
    detector = _fresh(digits)
    rows = _papernot_like(detector, digits, 3)
    head, last = rows[:-1], rows[-1:]
    detector.score_batch(["p"] * len(head), head, learn=[False] * len(head))
    blob = detector.dump_state("p")
    assert blob is not None
    restored = _fresh(digits)
    restored.load_state("p", blob)
    assert restored.dump_state("p") == blob
    got = restored.score_batch(["p"], last, learn=[False])[0]
    assert got.score == pytest.approx(BLOCK_SHARE)
    assert got == detector.score_batch(["p"], last, learn=[False])[0]


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


def _ring(blob: bytes, name: str) -> npt.NDArray[np.uint8]:
    decoded = decode_blob(blob)
    return np.frombuffer(decoded.fields[name], dtype="u1").copy()


@pytest.mark.parametrize("case", ["bit-without-outlier", "pos", "len", "young-count"])
def test_a_forged_off_lattice_ring_is_refused(digits: Digits, case: str) -> None:
    detector = _fresh(digits)
    rows = _papernot_like(detector, digits, 2)
    detector.score_batch(["p"] * len(rows), rows, learn=[False] * len(rows))
    blob = detector.dump_state("p")
    assert blob is not None
    ring = _ring(blob, "off_lattice")
    outliers = _ring(blob, "outlier")
    if case == "bit-without-outlier":
        ring[int(np.flatnonzero(outliers == 0)[0])] = 1
        forged = _forge(blob, off_lattice=ring)
    elif case == "pos":
        forged = _forge(blob, off_lattice_pos=np.array(0, dtype="<i8"))
    elif case == "len":
        forged = _forge(blob, off_lattice_len=np.array(3, dtype="<i8"))
    else:
        # Emptied: a young key whose ring forgets the off-lattice queries its
        # counters still hold would be spared the rule.
        forged = _forge(blob, off_lattice=np.zeros_like(ring))
    with pytest.raises(ValueError, match=r"off_lattice|young key"):
        _fresh(digits).load_state("p", forged)


def test_evidence_says_when_the_chance_played_no_part(digits: Digits) -> None:
    detector = _fresh(digits)
    rows = _papernot_like(detector, digits, 1)
    scores = detector.score_batch(["p"] * len(rows), rows, learn=[False] * len(rows))
    # One off-lattice query among ten real ones: judged on its share (1/11)
    # although one outlier in 11 is an ordinary chance for an honest key.
    assert scores[-1].score == pytest.approx(1 / 11)
    assert "judged on the share alone, the chance aside" in scores[-1].evidence
    # An honest key's window, never off the lattice, keeps the plain wording.
    honest = _fresh(digits).score_batch(["h"] * 10, rows[:10], learn=[False] * 10)
    assert "the chance aside" not in honest[-1].evidence
    assert "chance" in honest[-1].evidence
