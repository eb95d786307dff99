"""The poisoning guard on the zoo's real models and data: clean feedback
passes at the stated rate, flips, targeted flips and a BadNets trigger are
caught, state round-trips, hostile parameters and state are refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pydantic
import pytest
import scipy.linalg

from detectors._poisoncalib import FLOOR_SHRINK
from detectors.poisoning import (
    MAX_STATE_BYTES,
    PoisoningGuard,
    PoisoningParams,
    calibrate,
    record_digest,
    spectral_scores,
)
from gateway.feedback_data import calibration_rows
from gateway.models import ServedModel, load_model
from gateway.zoo import ensure_model

Array = np.ndarray[Any, Any]
PARAMS = PoisoningParams()
# The guard without the distance check, for tests of what it would hide: the
# spectral windows' own workings (trigger carriers the distance check refuses
# from the first) and flip counting (a "correction" here is a held-out record
# given a wrong label, which the distance check refuses on its own; true
# labels of records the model gets wrong pass it: 0 of 26 refused on digits).
SPECTRAL_ONLY = PoisoningParams(distance_check=False)
# The stated false-rejection rate is 1%; the held-out half it is measured on
# is 450 digits, so allow for sampling error (binomial sd about 0.5%).
CLEAN_LIMIT = 0.025


@dataclass(frozen=True)
class Zoo:
    model: ServedModel
    x_cal: Array
    y_cal: Array
    x_held: Array
    y_held: Array

    def guard(self, params: PoisoningParams = PARAMS) -> PoisoningGuard:
        return PoisoningGuard.fit(
            params,
            self.model.reference.astype(np.float64),
            self.x_cal,
            self.y_cal,
            self.model.predict_proba(self.x_cal),
        )


def _zoo(directory: Path, name: str) -> Zoo:
    ensure_model(directory, name)
    (x_cal, y_cal), (x_held, y_held) = calibration_rows(name)
    return Zoo(load_model(directory, name), x_cal, y_cal, x_held, y_held)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return _zoo(tmp_path_factory.mktemp("zoo"), "digits_lr")


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return _zoo(tmp_path_factory.mktemp("zoo"), "breast_cancer")


@pytest.fixture(scope="module")
def phishing(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return _zoo(tmp_path_factory.mktemp("zoo"), "phishing")


def _stream(
    guard: PoisoningGuard,
    zoo: Zoo,
    x: Array,
    y: Array,
    who: list[str],
    order: Array,
) -> list[Any]:
    proba = zoo.model.predict_proba(x.astype(np.float32))
    verdicts: list[Any] = [None] * len(x)
    for i in order:
        verdicts[i] = guard.screen(who[i], x[i], int(y[i]), proba[i], f"r{i}")
    return verdicts


def _rejected(verdicts: list[Any], mask: Array) -> float:
    picked = [v for v, m in zip(verdicts, mask, strict=True) if m]
    return sum(not v.accepted for v in picked) / max(len(picked), 1)


# -- clean feedback ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["digits", "cancer"])
def test_clean_feedback_is_accepted_at_the_stated_rate(
    which: str, request: pytest.FixtureRequest
) -> None:
    zoo: Zoo = request.getfixturevalue(which)
    guard = zoo.guard()
    n = len(zoo.x_held)
    who = [f"honest-{i % 4}" for i in range(n)]
    verdicts = _stream(guard, zoo, zoo.x_held, zoo.y_held, who, np.arange(n))
    rate = _rejected(verdicts, np.ones(n, dtype=bool))
    assert rate <= CLEAN_LIMIT, [v.evidence for v in verdicts if not v.accepted]
    assert guard.calibration.clean_rejected <= PARAMS.false_rejection_rate


@pytest.mark.parametrize("which", ["digits", "cancer"])
def test_record_checks_meet_their_stated_rate_on_held_out_rows(
    which: str, request: pytest.FixtureRequest
) -> None:
    # The thresholds are split-conformal order statistics of the calibration
    # half, so the rows kept out of it (same distribution) must see at most
    # the stated rate. The in-sample quantiles used before measured 1.3% on
    # digits for the stated 1%.
    zoo: Zoo = request.getfixturevalue(which)
    guard = zoo.guard()
    proba = zoo.model.predict_proba(zoo.x_held)
    verdicts = [
        guard.screen(f"honest-{i % 4}", row, int(label), p, learn=False)
        for i, (row, label, p) in enumerate(
            zip(zoo.x_held, zoo.y_held, proba, strict=True)
        )
    ]
    rejected = [v.detector for v in verdicts if v.detector in ("rarity", "spectral")]
    assert len(rejected) / len(verdicts) <= PARAMS.false_rejection_rate, rejected


def test_one_honest_correction_passes(digits: Zoo) -> None:
    guard = digits.guard()
    proba = digits.model.predict_proba(digits.x_held)
    confident = np.flatnonzero(proba.max(axis=1) >= 0.99)
    i = int(confident[0])
    wrong = (int(proba[i].argmax()) + 1) % 10
    verdict = guard.screen("honest", digits.x_held[i], wrong, proba[i], "fix-1")
    assert verdict.disagreement
    assert verdict.accepted, verdict.evidence
    assert 0 < verdict.scores["flip_tail"] < 1


def test_a_replayed_correction_is_counted_once(digits: Zoo) -> None:
    # A captured record can be produced again within the clock skew (or is
    # redelivered after a crash). Counted each time, ten replays of a
    # victim's one honest correction made the victim a flipper, and its next
    # honest correction was refused.
    guard = digits.guard(SPECTRAL_ONLY)
    proba = digits.model.predict_proba(digits.x_held)
    confident = np.flatnonzero(proba.max(axis=1) >= 0.99)
    for n, i in enumerate(confident[:30]):
        guard.screen(
            "victim", digits.x_held[i], int(proba[i].argmax()), proba[i], f"ok-{n}"
        )
    i, j = int(confident[30]), int(confident[31])
    wrong_i, wrong_j = (
        (int(proba[i].argmax()) + 1) % 10,
        (int(proba[j].argmax()) + 1) % 10,
    )
    replays = [
        guard.screen("victim", digits.x_held[i], wrong_i, proba[i], "fix-1")
        for _ in range(11)
    ]
    assert all(v.accepted for v in replays), [v.evidence for v in replays]
    assert replays[-1].evidence == "accepted (a repeat, counted once)"
    later = guard.screen("victim", digits.x_held[j], wrong_j, proba[j], "fix-2")
    assert later.accepted, later.evidence
    state = msgspec.json.decode(guard.dump_state("victim") or b"")
    assert state["seen"] == 32 and sum(state["disagree"]) == 2
    # Nor does a replay enter the class window twice.
    window = guard._classes[wrong_i]
    assert list(window.ids).count("fix-1") == 1
    # A repeat is the same record, not the same id: a flipper reusing one id
    # for different records has each of them counted.
    reused = [
        guard.screen(
            "reuser",
            digits.x_held[k],
            (int(proba[k].argmax()) + 1) % 10,
            proba[k],
            "same-id",
        )
        for k in confident[:5]
    ]
    assert [v.evidence for v in reused].count("accepted (a repeat, counted once)") == 0
    reuser = msgspec.json.decode(guard.dump_state("reuser") or b"")
    assert reuser["seen"] == 5


# -- label flips -------------------------------------------------------------------


def _flip_run(zoo: Zoo, share: float, seed: int = 0) -> tuple[list[Any], Array, Array]:
    """Three honest submitters and one flipping ``share`` of its labels."""
    rng = np.random.default_rng(seed)
    n = len(zoo.x_held)
    who = [f"honest-{i % 3}" if i % 5 else "flipper" for i in range(n)]
    y = zoo.y_held.copy()
    attacker = np.array([w == "flipper" for w in who])
    flipped = attacker & (rng.random(n) < share)
    y[flipped] = (y[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    verdicts = _stream(zoo.guard(), zoo, zoo.x_held, y, who, rng.permutation(n))
    return verdicts, flipped, attacker


def test_a_submitter_flipping_a_fifth_of_its_labels_is_caught(digits: Zoo) -> None:
    verdicts, flipped, attacker = _flip_run(digits, 0.2)
    # Measured 0.45-0.6 over seeds at this stream length (90 records of the
    # attacker); the first flips pass until the count is significant.
    assert _rejected(verdicts, flipped) >= 0.35
    assert _rejected(verdicts, ~attacker) <= CLEAN_LIMIT
    codes = {v.code for v, f in zip(verdicts, flipped, strict=True) if f}
    assert codes & {"POISON_FLIP_RATE", "POISON_TARGETED_FLIP"}
    caught = next(
        v for v, f in zip(verdicts, flipped, strict=True) if f and not v.accepted
    )
    assert "submitter" in caught.evidence and "tail" in caught.evidence


def test_targeted_flips_are_caught_by_their_pair(digits: Zoo) -> None:
    guard = digits.guard()
    proba = digits.model.predict_proba(digits.x_held)
    sevens = np.flatnonzero((digits.y_held == 7) & (proba[:, 7] >= 0.9))[:12]
    others = np.flatnonzero(digits.y_held != 7)[:60]
    verdicts = []
    # Mostly correct labels, every confident 7 labelled 1: 12 flips in 72
    # records, well under what the total rate test needs.
    for i in np.concatenate([others[:30], sevens, others[30:]]):
        label = 1 if digits.y_held[i] == 7 else int(digits.y_held[i])
        verdicts.append(guard.screen("targeter", digits.x_held[i], label, proba[i]))
    flips = verdicts[30:42]
    assert sum(not v.accepted for v in flips) >= 8
    assert {v.code for v in flips if not v.accepted} == {"POISON_TARGETED_FLIP"}
    assert "labelled 1 where the model says 7" in next(
        v.evidence for v in flips if not v.accepted
    )


# -- triggers ----------------------------------------------------------------------


def test_a_badnets_corner_trigger_is_caught(digits: Zoo) -> None:
    rng = np.random.default_rng(3)
    n = len(digits.x_held)
    x = digits.x_held.copy()
    y = digits.y_held.copy()
    who = [f"honest-{i % 3}" if i % 4 else "badnets" for i in range(n)]
    attacker = np.array([w == "badnets" for w in who])
    triggered = attacker & (rng.random(n) < 0.5)
    # Gu et al.'s BadNets: a small bright patch in a corner, every carrier
    # labelled the target class.
    x[np.ix_(triggered, np.array([54, 55, 62, 63]))] = 16.0
    y[triggered] = 0
    verdicts = _stream(digits.guard(), digits, x, y, who, rng.permutation(n))
    assert _rejected(verdicts, triggered) >= 0.8
    assert _rejected(verdicts, ~triggered) <= CLEAN_LIMIT
    detectors = {v.detector for v, t in zip(verdicts, triggered, strict=True) if t}
    assert "spectral" in detectors


def test_pixels_no_digit_ever_lights_are_a_trigger_on_their_own(digits: Zoo) -> None:
    guard = digits.guard()
    row = digits.x_held[0].copy()
    row[[0, 7, 56, 63]] = 16.0
    proba = digits.model.predict_proba(row[None, :])[0]
    verdict = guard.screen("s", row, int(digits.y_held[0]), proba)
    assert verdict.code == "POISON_TRIGGER" and verdict.detector == "rarity"
    assert "index 0, 7, 56, 63" in verdict.evidence


def test_a_window_flooded_at_the_class_centre_does_not_frame_honest_records(
    digits: Zoo,
) -> None:
    # Framing: one key sends records near the centre of the clean 3s; the
    # model agrees and each scores near 0, so all are accepted and fill the
    # class window. Scored against the window's own mean (Tran et al.), that
    # window then rejected every honest 3 (100% of them, measured in
    # evaluation.poisoning_evasion).
    rng = np.random.default_rng(5)
    guard = digits.guard()
    clean = digits.x_cal[digits.y_cal == 3]
    centre, spread = clean.mean(axis=0), clean.std(axis=0)
    flood = np.clip(
        centre + rng.normal(size=(300, 64)) * spread * 0.1, 0.0, 16.0
    ).astype(np.float32)
    proba = digits.model.predict_proba(flood)
    accepted = [
        guard.screen("framer", r, 3, p).accepted
        for r, p in zip(flood, proba, strict=True)
    ]
    assert np.mean(accepted) >= 0.95  # the flood is accepted: it is the attack
    threes = digits.x_held[digits.y_held == 3]
    honest = [
        guard.screen(f"honest-{i % 3}", r, 3, p)
        for i, (r, p) in enumerate(
            zip(threes, digits.model.predict_proba(threes), strict=True)
        )
    ]
    assert np.mean([not v.accepted for v in honest]) <= 0.1, [v.code for v in honest]


PATCH = np.array([54, 55, 62, 63])


def _drag_stream(
    zoo: Zoo, guard: PoisoningGuard, steps: int, *, dragged: bool, top: float = 16.0
) -> tuple[list[Any], list[Any]]:
    """The drag of evaluation.poisoning_evasion: four keys send real 0s
    labelled 0 whose bottom-right 2x2 pixels rise from 0 to 16 in ``steps``
    equal steps, two honest records of any class between them. Undragged,
    the same stream with the 0s sent as they are. Returns the verdicts of
    the four keys' records and of the honest records."""
    rng = np.random.default_rng(7)
    zeros = np.flatnonzero(zoo.y_held == 0)
    proba_held = zoo.model.predict_proba(zoo.x_held)
    own, honest = [], []
    for k in range(steps):
        for _ in range(2):
            i = int(rng.integers(len(zoo.x_held)))
            honest.append(
                guard.screen(
                    f"honest-{i % 3}", zoo.x_held[i], int(zoo.y_held[i]), proba_held[i]
                )
            )
        row = zoo.x_held[int(rng.choice(zeros))].copy()
        if dragged:
            row[PATCH] = top * (k + 1) / steps
        proba = zoo.model.predict_proba(row[None, :])[0]
        own.append(guard.screen(f"dragger-{k % 4}", row, 0, proba, f"drag-{k}"))
    return own, honest


def test_a_dragged_window_is_judged_against_the_clean_rows(digits: Zoo) -> None:
    # Session 11's drag: each step is ordinary against the window before it,
    # so 96% of 256 steps were accepted, the window's own spread along the
    # patch set the denominator, and every carrier (a real 0 with the full
    # patch, label 0) then passed (this stream too). Undragged, 96% of
    # carriers were refused.
    guard = digits.guard(SPECTRAL_ONLY)
    drag, _ = _drag_stream(digits, guard, 256, dragged=True)
    zeros = digits.x_held[digits.y_held == 0][:40].copy()
    zeros[:, PATCH] = 16.0
    carriers = [
        guard.screen(f"carrier-{i % 4}", r, 0, p)
        for i, (r, p) in enumerate(
            zip(zeros, digits.model.predict_proba(zeros), strict=True)
        )
    ]
    assert np.mean([v.accepted for v in carriers]) <= 0.1, [v.scores for v in carriers]
    bound = guard.calibration.drift_threshold
    crossed = [v.scores["window_drift"] >= bound for v in drag]
    assert any(crossed)
    # The drag rows themselves start being refused once the window is
    # judged dragged, so it stops moving.
    after = drag[crossed.index(True) :]
    assert np.mean([not v.accepted for v in after]) >= 0.3
    refused = next(v for v in carriers if not v.accepted)
    assert refused.code == "POISON_SPECTRAL"
    assert "a dragged window" in refused.evidence
    assert "'drag-" in refused.evidence  # it names drag rows among those beyond


def test_a_drag_kept_under_the_bound_does_not_carry_the_patch(digits: Zoo) -> None:
    # A drag to a quarter of the patch's height stays under the drift bound,
    # so the spectral test judges the carriers against the dragged window:
    # 27.8% of them passed (evaluation.poisoning_evasion, 3 seeds; this
    # stream, without the distance check, lets 19 of the 40 through). The
    # distance check reads only the clean rows, which the drag cannot move.
    guard = digits.guard()
    drag, _ = _drag_stream(digits, guard, 256, dragged=True, top=4.0)
    assert max(v.scores["window_drift"] for v in drag) < (
        guard.calibration.drift_threshold
    )
    zeros = digits.x_held[digits.y_held == 0][:40].copy()
    zeros[:, PATCH] = 16.0
    carriers = [
        guard.screen(f"carrier-{i % 4}", r, 0, p)
        for i, (r, p) in enumerate(
            zip(zeros, digits.model.predict_proba(zeros), strict=True)
        )
    ]
    assert not any(v.accepted for v in carriers), [v.scores for v in carriers]
    first = carriers[0]
    assert first.code == "POISON_OFF_CLASS" and first.detector == "distance"
    assert "class 0's 45 clean records" in first.evidence


def test_true_labels_the_model_gets_wrong_pass_the_distance_check(
    digits: Zoo, cancer: Zoo, phishing: Zoo
) -> None:
    # An honest correction: the model is wrong and the submitter gives the
    # true label. Its record lies among its class's clean rows however
    # unsure the model is, so the check refuses it no more than any record.
    judged = 0
    for zoo in (digits, cancer, phishing):
        guard = zoo.guard()
        proba = zoo.model.predict_proba(zoo.x_held)
        wrong = np.flatnonzero(proba.argmax(axis=1) != zoo.y_held)
        verdicts = [
            guard.screen(f"s{i}", zoo.x_held[i], int(zoo.y_held[i]), proba[i])
            for i in wrong
        ]
        judged += len(verdicts)
        assert all(v.code != "POISON_OFF_CLASS" for v in verdicts), [
            v.scores["distance"] for v in verdicts
        ]
        assert all(v.scores["distance"] > 0.0 for v in verdicts)  # it ran
        on = guard.calibration
        off = zoo.guard(PoisoningParams(distance_check=False)).calibration
        assert on.distance_threshold < float("inf") == off.distance_threshold
        # Its quarter of the budget comes from the spectral check's half.
        assert on.spectral_threshold >= off.spectral_threshold
    assert judged >= 20, judged


def test_a_clean_stream_as_long_as_the_drag_never_crosses(digits: Zoo) -> None:
    guard = digits.guard()
    own, honest = _drag_stream(digits, guard, 256, dragged=False)
    bound = guard.calibration.drift_threshold
    drifts = [v.scores["window_drift"] for v in own + honest]
    assert max(drifts) < bound
    assert max(drifts) > 0.0  # the check ran (the class windows filled)
    verdicts = own + honest
    assert np.mean([not v.accepted for v in verdicts]) <= CLEAN_LIMIT


@pytest.mark.parametrize(
    ("which", "step"),
    [("digits", 1.0), ("digits", 2.5), ("cancer", 2.5), ("phishing", 2.5)],
)
@pytest.mark.parametrize("shrink", [1e-3, FLOOR_SHRINK])
def test_a_framer_spreading_the_window_where_clean_rows_are_thin_frames_no_one(
    request: pytest.FixtureRequest, which: str, step: float, shrink: float
) -> None:
    # Session 12's attack pass: the clean rows of a class (about 45 for
    # digits) are fewer than its features, so along some directions they
    # hardly vary while honest records do (18 to 48 times more). A framer
    # who knows the calibration split spread accepted rows along such a
    # direction, alternating sides, set off the dragged-window check, and
    # 33% to 45% of honest 0s were then refused against the clean rows.
    # The direction is the framer's best against the clean spread as the
    # guard floors it (``shrink`` FLOOR_SHRINK) and against the raw one.
    # Breast cancer's class 0 has more clean rows (53) than features (30)
    # but a direction along which honest records still vary 35 times more
    # than the clean ones (0.7 floored); phishing's best is about 2 times
    # (0.24 floored; 9 features, 175 clean rows): little thin to exploit,
    # and inside the data's range the framer cannot reach phishing's bound.
    # Without the floor, the session 12 framer (``step`` 1.0) had 20% of
    # these digits refused; with it, it stays under the bound (drift 0.95).
    # Stepping up to 2.5, it pushes the window to the bound, where its own
    # rows start being refused. On breast cancer even the unfloored guard
    # refused at most 2% of the victims (its clean rows outnumber its
    # features), so there the test checks the guard but does not single out
    # the floor.
    zoo: Zoo = request.getfixturevalue(which)
    guard = zoo.guard()
    rng = np.random.default_rng(3)
    proba_held = zoo.model.predict_proba(zoo.x_held)
    for _ in range(600):
        i = int(rng.integers(len(zoo.x_held)))
        guard.screen(
            f"honest-{i % 3}", zoo.x_held[i], int(zoo.y_held[i]), proba_held[i]
        )
    clean = guard._anchors[0]
    zeros = zoo.x_held[zoo.y_held == 0]
    centre = clean.mean(axis=0)
    sc, sh = clean - centre, guard._scale(zeros.astype(np.float64)) - centre
    d = guard.n_features
    thin = sc.T @ sc / len(sc) + shrink * float((sc**2).mean()) * np.eye(d)
    _, vectors = scipy.linalg.eigh(sh.T @ sh / len(sh), thin)
    direction = vectors[:, -1] / np.linalg.norm(vectors[:, -1])
    span, low = guard._span, guard._low
    # Inside the reference's range, which validation accepts.
    reference = zoo.model.reference.astype(np.float64)
    lowest, highest = reference.min(axis=0), reference.max(axis=0)
    drift = 0.0
    for k in range(256):
        t = step * (k + 1) / 256 * (1 if k % 2 == 0 else -1)
        row = np.clip((centre + t * direction) * span + low, lowest, highest)
        proba = zoo.model.predict_proba(row[None, :].astype(np.float32))[0]
        drift = max(drift, guard.screen("framer", row, 0, proba).scores["window_drift"])
    verdicts = [
        guard.screen("victim", r, 0, p)
        for r, p in zip(zeros, zoo.model.predict_proba(zeros), strict=True)
    ]
    # The stronger framer pushed the window to the bound, except on phishing.
    bound = guard.calibration.drift_threshold
    if step > 1.0:
        assert (drift >= 0.9 * bound) == (which != "phishing"), (drift, bound)
    refused = np.mean([not v.accepted for v in verdicts])
    assert refused <= 0.1, refused


def test_the_drift_check_is_calibrated_on_every_model(digits: Zoo, cancer: Zoo) -> None:
    for zoo in (digits, cancer):
        cal = zoo.guard().calibration
        assert 1.0 < cal.drift_threshold < 20.0
        assert 1.0 <= cal.anchored_threshold < float("inf")
        # Every guard of a deployment judges the shared windows alike.
        again = zoo.guard().calibration
        assert (again.drift_threshold, again.anchored_threshold) == (
            cal.drift_threshold,
            cal.anchored_threshold,
        )
    # Too few clean rows per class for the halvings: the check is off.
    rows = digits.x_cal[:40]
    labels = np.arange(40) % 10
    tiny = calibrate(
        PARAMS,
        digits.model.reference.astype(np.float64),
        rows,
        labels,
        np.eye(10)[labels],
    )
    assert tiny.drift_threshold == float("inf")


def test_spectral_scores_single_out_a_shared_pattern() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, 20))
    rows[:12, 3] += 8.0
    scores, direction = spectral_scores(rows)
    assert scores[:12].min() > np.sort(scores[12:])[-1]
    assert abs(direction[3]) > 0.95
    # Warm-started from an unrelated direction, the same answer.
    again, _ = spectral_scores(rows, np.eye(20)[0])
    np.testing.assert_allclose(again, scores, rtol=1e-6)
    assert spectral_scores(np.ones((10, 4)))[0].tolist() == [0.0] * 10


# -- state -------------------------------------------------------------------------


def test_state_round_trips_and_continues_identically(digits: Zoo) -> None:
    y = digits.y_held.copy()
    y[::7] = (y[::7] + 3) % 10
    proba = digits.model.predict_proba(digits.x_held)
    whole, split = digits.guard(), digits.guard()
    for i in range(100):
        whole.screen("s", digits.x_held[i], int(y[i]), proba[i])
        split.screen("s", digits.x_held[i], int(y[i]), proba[i])
    blob = split.dump_state("s")
    assert blob is not None and len(blob) <= MAX_STATE_BYTES
    split.forget("s")
    assert split.dump_state("s") is None
    split.load_state("s", blob)
    assert split.dump_state("s") == blob
    for i in range(100, 200):
        a = whole.screen("s", digits.x_held[i], int(y[i]), proba[i])
        b = split.screen("s", digits.x_held[i], int(y[i]), proba[i])
        assert (a.accepted, a.code, a.scores) == (b.accepted, b.code, b.scores)


def test_submitters_held_are_bounded(digits: Zoo) -> None:
    guard = digits.guard(PoisoningParams(max_submitters=3))
    proba = digits.model.predict_proba(digits.x_held[:5])
    for i in range(5):
        guard.screen(f"s{i}", digits.x_held[i], int(digits.y_held[i]), proba[i])
    assert guard.submitters() == ["s2", "s3", "s4"]


def _state(**changes: Any) -> bytes:
    base: dict[str, Any] = {
        "format": 1,
        "window": PARAMS.window,
        "seen": 2,
        "labels": [1, 2],
        "predicted": [1, 3],
        "disagree": [False, True],
    }
    base.update(changes)
    return msgspec.json.encode(base)


def test_a_state_saved_before_record_ids_still_loads(digits: Zoo) -> None:
    guard = digits.guard()
    guard.load_state("s", _state())  # no "ids": written by the first release
    proba = digits.model.predict_proba(digits.x_held[:1])[0]
    guard.screen("s", digits.x_held[0], int(digits.y_held[0]), proba, "f-1")
    state = msgspec.json.decode(guard.dump_state("s") or b"")
    assert state["seen"] == 3 and len(state["ids"]) == 1


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\xff\x00 not json", "malformed"),
        (b"[" * 100_000, "over"),
        (_state(extra=1), "malformed"),
        (_state(format=2), "format"),
        (_state(window=10), "window"),
        (_state(labels=[1]), "length"),
        (_state(labels=[1, 10]), "unknown class"),
        (_state(predicted=[1, -1]), "unknown class"),
        (_state(seen=1), "seen fewer"),
        (_state(ids=["x" * 13, "y"]), "record ids"),
        (_state(ids=["a"] * (PARAMS.window + 1)), "record ids"),
        (_state(seen=-1, labels=[], predicted=[], disagree=[]), "seen fewer"),
        (_state(disagree=[True, True]), "its own label"),
        (
            _state(labels=[1] * 201, predicted=[1] * 201, disagree=[False] * 201),
            "length",
        ),
        (_state(seen="2"), "malformed"),
    ],
)
def test_hostile_state_is_refused(digits: Zoo, blob: bytes, match: str) -> None:
    guard = digits.guard()
    with pytest.raises(ValueError, match=match):
        guard.load_state("s", blob)
    assert guard.submitters() == []
    guard.load_state("s", _state())
    assert guard.submitters() == ["s"]


@pytest.mark.parametrize(
    "params",
    [
        {"confidence": 1.0},
        {"confidence": 0.2},
        {"false_rejection_rate": 0},
        {"significance": 0.5},
        {"window": 5},
        {"window": 10**9},
        {"spectral_window": 10**9},
        {"max_submitters": 0},
        {"rare_share": float("nan")},
        {"no_such_knob": 1},
    ],
)
def test_hostile_params_are_refused(params: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        PoisoningParams.model_validate(params)
    with pytest.raises(pydantic.ValidationError):
        PARAMS.confidence = 0.6  # type: ignore[misc]  # frozen on purpose


def test_bad_records_and_calibration_data_are_refused(digits: Zoo) -> None:
    guard = digits.guard()
    row, proba = digits.x_held[0], digits.model.predict_proba(digits.x_held[:1])[0]
    for bad_row, label, p in [
        (row[:10], 1, proba),
        (np.full(64, np.nan), 1, proba),
        (row, 10, proba),
        (row, -1, proba),
        (row, 1, proba[:5]),
        (row, 1, np.full(10, np.inf)),
    ]:
        with pytest.raises(ValueError):
            guard.screen("s", bad_row, label, p)
    ref = digits.model.reference.astype(np.float64)
    proba_cal = digits.model.predict_proba(digits.x_cal)
    with pytest.raises(ValueError, match="at least 20"):
        calibrate(PARAMS, ref, digits.x_cal[:5], digits.y_cal[:5], proba_cal[:5])
    with pytest.raises(ValueError, match="class indices"):
        calibrate(PARAMS, ref, digits.x_cal, digits.y_cal + 10, proba_cal)
    with pytest.raises(ValueError, match="one d"):
        calibrate(PARAMS, ref[:, :10], digits.x_cal, digits.y_cal, proba_cal)


def test_a_restored_snapshot_judges_a_batch_again_as_the_first_time(
    digits: Zoo,
) -> None:
    """A batch judged, then not committed, is judged again from the restored
    state: every verdict as the first time, no record counted twice."""
    y = digits.y_held.copy()
    y[::5] = (y[::5] + 1) % 10
    proba = digits.model.predict_proba(digits.x_held)
    guard = digits.guard()
    for i in range(50):
        guard.screen("s", digits.x_held[i], int(y[i]), proba[i], f"r{i}")
    snapshot = guard.snapshot(["s", "new"])
    batch = range(50, 120)
    first = [
        guard.screen(
            "s" if i % 2 else "new", digits.x_held[i], int(y[i]), proba[i], f"r{i}"
        )
        for i in batch
    ]
    guard.restore(snapshot)
    assert "new" not in guard.submitters()
    again = [
        guard.screen(
            "s" if i % 2 else "new", digits.x_held[i], int(y[i]), proba[i], f"r{i}"
        )
        for i in batch
    ]
    assert [(v.code, v.scores) for v in again] == [(v.code, v.scores) for v in first]
    blob = guard.dump_state("s")
    assert blob is not None and msgspec.json.decode(blob)["seen"] == 50 + 35


def test_a_restored_snapshot_keeps_the_drift_checks_warm_start(digits: Zoo) -> None:
    """Once a class window holds enough records for the drift check, a batch
    judged again from a restored snapshot gets the same scores to the last
    digit: the check's power iteration starts from the direction it had
    (restored cold, it converged to other last digits)."""
    zeros = np.flatnonzero(digits.y_held == 0)
    proba = digits.model.predict_proba(digits.x_held)
    guard = digits.guard()
    rng = np.random.default_rng(11)
    for k, i in enumerate(rng.choice(zeros, 60)):
        guard.screen(f"h{k % 3}", digits.x_held[i], 0, proba[i], f"w{k}")
    assert guard.window_size(0) >= PARAMS.spectral_min_records
    snapshot = guard.snapshot(["b"])
    batch = [(int(i), f"b{k}") for k, i in enumerate(rng.choice(zeros, 20))]
    first = [guard.screen("b", digits.x_held[i], 0, proba[i], r) for i, r in batch]
    assert all(v.scores["window_drift"] > 0.0 for v in first)  # the check ran
    guard.restore(snapshot)
    again = [guard.screen("b", digits.x_held[i], 0, proba[i], r) for i, r in batch]
    assert [(v.accepted, v.code, v.scores) for v in again] == [
        (v.accepted, v.code, v.scores) for v in first
    ]


def _patched_zeros(zoo: Zoo, n: int) -> Array:
    rows = zoo.x_held[zoo.y_held == 0][:n].astype(np.float64)
    rows[:, [54, 55, 62, 63]] = 16.0
    return rows


def test_a_window_set_from_outside_judges_as_the_one_it_replaces(
    digits: Zoo,
) -> None:
    # A shared window (gateway.feedback_windows) hands a fresh guard the rows
    # another one accepted: the fresh guard must judge exactly as that one.
    rows = _patched_zeros(digits, 6)
    first = digits.guard(SPECTRAL_ONLY)
    accepted = []
    for i, row in enumerate(rows[:3]):
        verdict = first.screen(
            "a", row, 0, digits.model.predict_proba(row[None])[0], f"p{i}"
        )
        if verdict.learned:
            accepted.append(i)
    assert accepted, "no carrier was accepted"
    fresh = digits.guard(SPECTRAL_ONLY)
    fresh.set_window(
        0, rows[accepted], [f"p{i}" for i in accepted], ["a"] * len(accepted)
    )
    assert fresh.window_size(0) == first.window_size(0) == len(accepted)
    for i, row in enumerate(rows[3:], start=3):
        proba = digits.model.predict_proba(row[None])[0]
        ours = first.screen("a", row, 0, proba, f"p{i}")
        theirs = fresh.screen("b", row, 0, proba, f"p{i}")
        assert ours.scores["spectral"] == pytest.approx(theirs.scores["spectral"])
        assert ours.code == theirs.code


def test_a_window_of_the_wrong_shape_is_refused(digits: Zoo) -> None:
    guard = digits.guard()
    with pytest.raises(ValueError, match="finite"):
        guard.set_window(0, np.zeros((2, 63)), ["a", "b"], ["s", "s"])
    with pytest.raises(ValueError, match="finite"):
        guard.set_window(0, np.full((1, 64), np.nan), ["a"], ["s"])
    with pytest.raises(ValueError, match="one id"):
        guard.set_window(0, np.zeros((2, 64)), ["a"], ["s", "s"])
    with pytest.raises(ValueError, match="class index"):
        guard.set_window(10, np.zeros((0, 64)), [], [])
    # Bounded like its own window: the last spectral_window rows are kept.
    guard.set_window(0, np.zeros((300, 64)), ["i"] * 300, ["s"] * 300)
    assert guard.window_size(0) == PARAMS.spectral_window


def test_a_held_back_repeat_goes_back_into_the_window_once(digits: Zoo) -> None:
    # Judged again, a record whose row the shared window holds is a repeat
    # (not learned) and was left out of the window: held back, it re-enters
    # once accepted, so the records after it are judged as the first time.
    rows = _patched_zeros(digits, 2)
    guard = digits.guard(SPECTRAL_ONLY)
    proba = digits.model.predict_proba(rows)
    first = guard.screen("a", rows[0], 0, proba[0], "p0")
    assert first.learned and guard.window_size(0) == 1
    digest = record_digest("p0", 0, rows[0])
    guard.set_window(0, np.empty((0, 64)), [], [])
    guard.set_held_back({digest: (0, rows[0], "p0", "a")})
    again = guard.screen("a", rows[0], 0, proba[0], "p0")
    assert again.accepted and not again.learned  # a repeat, counted once
    assert guard.window_size(0) == 1
    # Held back once: the same record a third time stays out.
    guard.screen("a", rows[0], 0, proba[0], "p0")
    assert guard.window_size(0) == 1
