"""One battery run on every registered detector (as river/checks does).

State round-trip, finite and consistent scores, seeded determinism, batch
equals row by row, bounded state, parameter validation, input validation and
the package's import boundary.
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pydantic
import pytest

from detectors import DETECTORS, MAX_STATE_BYTES, Detector, DetectorScore
from detectors._state import decode_blob, encode_blob
from detectors.fingerprint import FingerprintDetector
from tests.detectors.conftest import Digits

NAMES = sorted(DETECTORS)


def build(name: str, digits: Digits, *, seed: int = 0, **params: Any) -> Detector[Any]:
    cls = DETECTORS[name]
    detector = cls(cls.Params(**params), seed=seed)
    detector.learn_baseline(digits.train)
    return detector


def mixed_stream(
    digits: Digits, n: int, n_clients: int, seed: int
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """Interleaved clients sending a mix of held-out digits, near-duplicates of
    earlier rows and uniform noise, so every detector's state moves both ways."""
    rng = np.random.default_rng(seed)
    rows = digits.test[rng.integers(0, len(digits.test), n)].copy()
    kind = rng.integers(0, 3, n)
    noise = kind == 1
    rows[noise] = rng.random((int(noise.sum()), rows.shape[1]))
    for i in np.flatnonzero(kind == 2):
        if i > 0:
            rows[i] = np.clip(rows[i - 1] + rng.normal(0, 0.005, rows.shape[1]), 0, 1)
    ids = [f"c{c}" for c in rng.integers(0, n_clients, n).tolist()]
    return ids, rows


_ANSWERS = np.random.default_rng(11).normal(0.0, 1.0, (64, 10))


def answers(X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A fixed stand-in model's probabilities (softmax of a random linear map),
    for the detectors that read the model's answers."""
    logits = (X - 0.3) @ _ANSWERS
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def arrivals(n: int, seed: int = 0) -> npt.NDArray[np.float64]:
    """Arrival times (seconds) of a stream's rows: increasing, Poisson-like."""
    return 1.7e9 + np.cumsum(np.random.default_rng(seed).exponential(0.2, n))


def observe(
    detector: Detector[Any],
    ids: list[str],
    X: npt.NDArray[np.float64],
    learn: Any = None,
) -> None:
    """Show the detector the stand-in model's answers to these rows."""
    detector.observe_outputs(ids, X, answers(X), learn=learn)


def run(
    detector: Detector[Any],
    ids: list[str],
    X: npt.NDArray[np.float64],
    learn: Any = None,
    times: npt.NDArray[Any] | None = None,
) -> list[DetectorScore]:
    """Score rows the way the gateway does for one batch: with arrival
    times, then the model's answers shown afterwards."""
    if times is None:
        times = arrivals(len(ids))
    scores = detector.score_batch(ids, X, learn=learn, arrival_s=times)
    observe(detector, ids, X, learn)
    return scores


def key(scores: list[DetectorScore]) -> list[tuple[float, bool, bool]]:
    return [(s.score, s.flagged, s.warm) for s in scores]


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_gives_identical_scores(name: str, digits: Digits) -> None:
    original = build(name, digits)
    ids, X = mixed_stream(digits, 400, 5, seed=1)
    # learn=False keeps the shared baseline equal to a fresh detector's, so only
    # per-client state can explain a difference.
    run(original, ids, X, learn=[False] * len(ids))

    restored = build(name, digits)
    if isinstance(original, FingerprintDetector) and isinstance(
        restored, FingerprintDetector
    ):
        # Its shared store keeps every row whatever `learn` says (it is
        # evidence across clients, not a baseline); the copy gets the same
        # store, so again only per-client state can explain a difference.
        restored.store = copy.deepcopy(original.store)
    for client in original.clients():
        blob = original.dump_state(client)
        assert blob is not None
        restored.load_state(client, blob)
        assert restored.dump_state(client) == blob
    assert sorted(restored.clients()) == sorted(original.clients())

    ids, X = mixed_stream(digits, 300, 5, seed=2)
    no_learning = [False] * len(ids)
    times = arrivals(len(ids), seed=2) + 1000.0
    assert run(original, ids, X, no_learning, times) == run(
        restored, ids, X, no_learning, times
    )


@pytest.mark.parametrize("name", NAMES)
def test_scores_are_finite_and_consistent(name: str, digits: Digits) -> None:
    detector = build(name, digits)
    ids, X = mixed_stream(digits, 500, 4, seed=3)
    run(detector, ids[:250], X[:250], times=arrivals(500)[:250])
    scores = run(detector, ids[250:], X[250:], times=arrivals(500)[250:])
    assert len(scores) == len(ids) - 250
    for s in scores:
        assert s.detector == name
        assert np.isfinite(s.score) and 0.0 <= s.score <= 1.0
        assert s.threshold == detector.params.threshold
        assert s.flagged == (s.warm and s.score >= s.threshold)
        assert isinstance(s.evidence, str) and s.evidence
    assert any(s.warm for s in scores)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_scores(name: str, digits: Digits) -> None:
    ids, X = mixed_stream(digits, 400, 6, seed=4)
    first = run(build(name, digits, seed=7), ids, X)
    second = run(build(name, digits, seed=7), ids, X)
    assert first == second


@pytest.mark.parametrize("name", NAMES)
def test_batch_scores_equal_row_by_row(name: str, digits: Digits) -> None:
    # 700 rows cross the similarity chunk size; 3 clients make groups of both
    # the vectorised-small and the per-client-big kind.
    ids, X = mixed_stream(digits, 700, 3, seed=5)
    learn = np.random.default_rng(5).random(len(ids)) < 0.7
    times = arrivals(len(ids), seed=5)

    # The model's answers are shown first, for the whole stream, in the same
    # cuts as the scoring: interleaving them with scoring would make the
    # answers a score sees depend on the cuts, by design (they arrive after
    # the model call, one batch later).
    whole = build(name, digits)
    observe(whole, ids, X, learn)
    whole_scores = whole.score_batch(ids, X, learn=learn, arrival_s=times)

    one_by_one = build(name, digits)
    for i in range(len(ids)):
        observe(one_by_one, ids[i : i + 1], X[i : i + 1], learn[i : i + 1])
    single = [
        one_by_one.score_batch(
            ids[i : i + 1],
            X[i : i + 1],
            learn=learn[i : i + 1],
            arrival_s=times[i : i + 1],
        )[0]
        for i in range(len(ids))
    ]

    uneven = build(name, digits)
    cuts = [0, 1, 9, 10, 150, 151, 420, 700]
    for a, b in itertools.pairwise(cuts):
        observe(uneven, ids[a:b], X[a:b], learn[a:b])
    pieces: list[DetectorScore] = []
    for a, b in itertools.pairwise(cuts):
        pieces += uneven.score_batch(
            ids[a:b], X[a:b], learn=learn[a:b], arrival_s=times[a:b]
        )

    assert key(whole_scores) == key(single) == key(pieces)


@pytest.mark.parametrize("name", NAMES)
def test_state_stays_bounded(name: str, digits: Digits) -> None:
    detector = build(name, digits)
    rng = np.random.default_rng(6)
    d = digits.train.shape[1]
    run(detector, ["long"] * 20, rng.random((20, d)))
    early = detector.state_nbytes("long")
    for i in range(10):
        run(detector, ["long"] * 500, rng.random((500, d)), times=arrivals(500, i) + i)
    blob = detector.dump_state("long")
    assert blob is not None
    assert detector.state_nbytes("long") == early
    assert 0 < detector.state_nbytes("long") <= MAX_STATE_BYTES
    assert len(blob) <= MAX_STATE_BYTES


@pytest.mark.parametrize("name", NAMES)
def test_set_params_validates(name: str) -> None:
    detector = DETECTORS[name]()
    before = detector.params

    detector.set_params(threshold=0.4)
    assert detector.params.threshold == 0.4

    with pytest.raises(ValueError, match="threshold"):
        detector.set_params(threshold=-1.0)
    with pytest.raises(ValueError, match="window"):
        detector.set_params(window=before.window + 1)
    with pytest.raises(ValueError, match="bogus"):
        detector.set_params(bogus=1)
    # A rejected update changes nothing, even its valid parts.
    with pytest.raises(ValueError, match="window"):
        detector.set_params(threshold=0.6, window=7)
    assert detector.params.threshold == 0.4

    # Re-applying a structural value unchanged is accepted.
    detector.set_params(window=before.window)


@pytest.mark.parametrize("name", NAMES)
def test_params_model_is_frozen_and_closed(name: str) -> None:
    cls = DETECTORS[name]
    assert cls._mutable_params <= set(cls.Params.model_fields)
    with pytest.raises(pydantic.ValidationError):
        cls.Params(bogus=1)  # type: ignore[call-arg]
    params = cls.Params()
    with pytest.raises(pydantic.ValidationError):
        params.threshold = 0.9  # type: ignore[misc]
    with pytest.raises(TypeError):
        cls(object())


@pytest.mark.parametrize("name", NAMES)
def test_load_state_refuses_foreign_blobs(name: str, digits: Digits) -> None:
    detector = build(name, digits)
    detector.score_batch(["a"], digits.test[:1])
    blob = detector.dump_state("a")
    assert blob is not None

    with pytest.raises(ValueError):
        detector.load_state("b", b"\x00not msgpack")
    other = next(n for n in NAMES if n != name)
    foreign = build(other, digits)
    foreign.score_batch(["a"], digits.test[:1])
    foreign_blob = foreign.dump_state("a")
    assert foreign_blob is not None
    with pytest.raises(ValueError, match=other):
        detector.load_state("b", foreign_blob)
    wider = build(name, digits, window=detector.params.window + 5)
    with pytest.raises(ValueError, match="layout"):
        wider.load_state("b", blob)
    assert "b" not in detector.clients()


@pytest.mark.parametrize("name", NAMES)
def test_forget_and_clients(name: str, digits: Digits) -> None:
    detector = build(name, digits)
    assert detector.dump_state("a") is None
    assert detector.state_nbytes("a") == 0
    detector.score_batch(["a", "b", "a"], digits.test[:3])
    assert detector.clients() == ["a", "b"]
    detector.forget("a")
    detector.forget("never-seen")
    assert detector.clients() == ["b"]
    assert detector.dump_state("a") is None
    # A forgotten client starts again from nothing.
    again = detector.score_batch(["a"], digits.test[3:4])[0]
    assert not again.warm
    assert again.score == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_score_batch_rejects_bad_input(name: str, digits: Digits) -> None:
    detector = build(name, digits)
    X = digits.test[:2].copy()
    with pytest.raises(ValueError, match="client ids"):
        detector.score_batch(["a"], X)
    with pytest.raises(ValueError, match="shape"):
        detector.score_batch(["a"], X[0])
    with pytest.raises(ValueError, match="learn"):
        detector.score_batch(["a", "b"], X, learn=[True])
    X[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detector.score_batch(["a", "b"], X)
    with pytest.raises(ValueError, match="features"):
        detector.score_batch(["a"], np.zeros((1, 10)))
    assert detector.score_batch([], np.zeros((0, 64))) == []


def test_detectors_import_no_service_code() -> None:
    code = (
        "import sys, detectors, detectors.bench\n"
        "bad = {'aiokafka', 'redis', 'fastapi', 'gateway'}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in bad)\n"
        "assert not loaded, loaded\n"
        "import logging\n"
        "assert not logging.getLogger().handlers, 'detectors configured logging'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_state_is_refused_or_harmless(name: str, digits: Digits) -> None:
    detector = build(name, digits)
    ids, X = mixed_stream(digits, 60, 1, seed=8)
    run(detector, ids, X)
    blob = detector.dump_state(ids[0])
    assert blob is not None
    state = decode_blob(blob)
    for field, raw in state.fields.items():
        for filler in (b"\xff", b"\x7f"):
            fields = {**state.fields, field: filler * len(raw)}
            tampered = encode_blob(msgspec.structs.replace(state, fields=fields))
            fresh = build(name, digits)
            try:
                fresh.load_state("x", tampered)
            except ValueError:
                assert fresh.clients() == []
                continue
            # Accepted: it must still score and observe without error.
            scores = run(fresh, ["x"] * 5, X[:5], times=arrivals(5) + 99.0)
            assert all(np.isfinite(s.score) for s in scores), field


@pytest.mark.parametrize("name", NAMES)
def test_flagged_clients_do_not_shape_the_baseline(name: str, digits: Digits) -> None:
    """Issue 3: baselines learn only from clients in good standing. A client
    whose rows come with learn=False (the gateway's flagged clients) must
    leave every other client's scores exactly as if it had never sent."""
    rng = np.random.default_rng(12)
    d = digits.train.shape[1]
    honest_ids, honest_X = mixed_stream(digits, 300, 4, seed=13)
    probe_ids, probe_X = mixed_stream(digits, 200, 3, seed=14)
    probe_ids = [f"probe-{c}" for c in probe_ids]
    flagged_X = rng.random((400, d))
    flagged_times = 1.7e9 + np.arange(400) * 0.01  # a fast metronome

    with_flagged = build(name, digits)
    without = build(name, digits)
    for detector in (with_flagged, without):
        run(detector, honest_ids, honest_X, times=arrivals(300, 13))
    run(with_flagged, ["flagged"] * 400, flagged_X, [False] * 400, flagged_times)
    if isinstance(with_flagged, FingerprintDetector) and isinstance(
        without, FingerprintDetector
    ):
        # Its shared store is cross-client evidence, not a baseline of
        # normal: it keeps a flagged client's rows on purpose.
        without.store = copy.deepcopy(with_flagged.store)
    times = arrivals(200, 14) + 500.0
    assert key(run(with_flagged, probe_ids, probe_X, None, times)) == key(
        run(without, probe_ids, probe_X, None, times)
    )
