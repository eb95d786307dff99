"""``traffic``'s cohort test: keys that start together at one pace pool
their successive gap pairs, so a metronome spread over many keys is flagged
after a few requests per key, and honest keys that start together are not."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from detectors.base import DetectorScore
from detectors.traffic import TrafficDetector, TrafficParams

T0 = 1.7e9


def _ms(times: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Kafka record times are whole milliseconds."""
    return np.floor(times * 1000.0) / 1000.0


def _play(
    detector: TrafficDetector,
    streams: dict[str, npt.NDArray[np.float64]],
    *,
    batch: int = 8,
    learn: bool = True,
) -> dict[str, list[DetectorScore]]:
    """Score every stream's arrivals in time order, ``batch`` rows at a time."""
    ids = np.concatenate([[name] * len(t) for name, t in streams.items()])
    times = _ms(np.concatenate(list(streams.values())))
    order = np.argsort(times, kind="stable")
    ids, times = ids[order], times[order]
    out: dict[str, list[DetectorScore]] = {name: [] for name in streams}
    for start in range(0, len(ids), batch):
        part = slice(start, start + batch)
        n = len(ids[part])
        scores = detector.score_batch(
            list(ids[part]),
            np.zeros((n, 3)),
            learn=np.full(n, learn),
            arrival_s=times[part],
        )
        for name, score in zip(ids[part], scores, strict=True):
            out[str(name)].append(score)
    return out


def _first_flag(scores: list[DetectorScore]) -> int | None:
    return next((i + 1 for i, s in enumerate(scores) if s.flagged), None)


def _paced_keys(
    n_keys: int, rate: float, n: int, rng: np.random.Generator, *, stagger_s: float
) -> dict[str, npt.NDArray[np.float64]]:
    """``n_keys`` metronomes at ``rate`` each, the k-th starting ``k *
    stagger_s`` after the first; each arrival is up to 30 ms late, as when
    one process wakes every key's pacer at once and sends one at a time."""
    return {
        f"thief-{k}": T0
        + k * stagger_s
        + np.arange(n) / rate
        + rng.uniform(0.0, 0.03, n)
        for k in range(n_keys)
    }


def _poisson_keys(
    n_keys: int, rng: np.random.Generator, *, start_within_s: float, n: int = 30
) -> dict[str, npt.NDArray[np.float64]]:
    """Honest keys: Poisson arrivals at rates from 1 to 30 per second, some
    requests sent as bursts of a few within milliseconds."""
    streams = {}
    for k in range(n_keys):
        rate = 10 ** rng.uniform(0.0, 1.5)
        gaps = rng.exponential(1.0 / rate, n)
        gaps[rng.random(n) < 0.1] = rng.uniform(0.0, 0.003)
        start = T0 + rng.uniform(0.0, start_within_s)
        streams[f"honest-{k}"] = start + np.cumsum(gaps)
    return streams


def test_a_metronome_over_ten_keys_is_flagged_within_a_few_requests_per_key() -> None:
    rng = np.random.default_rng(1)
    detector = TrafficDetector(seed=0)
    thieves = _paced_keys(10, 4.0, 15, rng, stagger_s=0.005)
    scores = _play(detector, thieves)
    firsts = [_first_flag(s) for s in scores.values()]
    # Alone, a key is first judged at min_queries (16) requests: never here.
    assert all(f is not None and f <= 10 for f in firsts), firsts
    assert min(f for f in firsts if f is not None) <= 5, firsts
    flagged = next(s for s in scores["thief-0"] if s.flagged)
    assert "gap pairs within 10% of each other" in flagged.evidence
    assert "10 keys" in flagged.evidence


def test_honest_keys_that_start_with_the_thieves_are_not_flagged_through_them() -> None:
    rng = np.random.default_rng(2)
    detector = TrafficDetector(seed=0)
    streams = {
        **_paced_keys(10, 4.0, 15, rng, stagger_s=0.005),
        **_poisson_keys(6, rng, start_within_s=0.1, n=15),
    }
    # The honest keys keep the thieves' pace: four per second on average.
    for k in range(6):
        streams[f"honest-{k}"] = T0 + np.cumsum(rng.exponential(0.25, 15))
    scores = _play(detector, streams)
    assert all(_first_flag(scores[f"thief-{k}"]) for k in range(10))
    assert not any(s.flagged for k in range(6) for s in scores[f"honest-{k}"]), (
        "an honest key was flagged through the thieves' cohort"
    )


@pytest.mark.parametrize("seed", range(5))
def test_honest_keys_starting_together_are_never_flagged(seed: int) -> None:
    """Three hundred honest keys whose first requests all fall within one
    second, as after a deploy: many cohorts form, none flags."""
    rng = np.random.default_rng(100 + seed)
    detector = TrafficDetector(seed=0)
    scores = _play(detector, _poisson_keys(300, rng, start_within_s=1.0), batch=64)
    flagged = [name for name, s in scores.items() if any(x.flagged for x in s)]
    assert flagged == []


def test_keys_that_start_apart_are_not_pooled() -> None:
    rng = np.random.default_rng(3)
    detector = TrafficDetector(seed=0)
    staggered = _paced_keys(10, 4.0, 15, rng, stagger_s=1.0)
    scores = _play(detector, staggered)
    assert not any(s.flagged for key in scores.values() for s in key)


def test_a_window_of_zero_turns_the_cohort_test_off() -> None:
    rng = np.random.default_rng(4)
    detector = TrafficDetector(TrafficParams(cohort_window_s=0.0), seed=0)
    scores = _play(detector, _paced_keys(10, 4.0, 15, rng, stagger_s=0.005))
    assert not any(s.flagged for key in scores.values() for s in key)


def test_bursts_of_millisecond_gaps_are_not_compared() -> None:
    """Rows a client sends back to back arrive 0 to 2 ms apart: at Kafka's
    millisecond resolution they would all match, so gaps under 10 ms never
    form a pair."""
    detector = TrafficDetector(seed=0)
    bursts = {f"batch-{k}": T0 + k * 0.001 + np.arange(15) * 0.001 for k in range(10)}
    scores = _play(detector, bursts)
    assert not any(s.flagged for key in scores.values() for s in key)
    state = detector.dump_state("batch-0")
    assert state is not None


def test_cohort_parameters_change_live() -> None:
    rng = np.random.default_rng(5)
    detector = TrafficDetector(seed=0)
    detector.set_params(cohort_z=1000.0, strong_cohort_z=1000.0)
    scores = _play(detector, _paced_keys(10, 4.0, 15, rng, stagger_s=0.005))
    assert not any(s.flagged for key in scores.values() for s in key)


def test_counts_survive_a_hand_over_and_bad_counts_are_refused() -> None:
    rng = np.random.default_rng(6)
    detector = TrafficDetector(seed=0)
    _play(detector, _paced_keys(3, 4.0, 6, rng, stagger_s=0.005))
    blob = detector.dump_state("thief-0")
    assert blob is not None
    other = TrafficDetector(seed=0)
    other.load_state("thief-0", blob)
    assert other.dump_state("thief-0") == blob

    from detectors._state import StateBlob, decode_blob, encode_blob

    decoded = decode_blob(blob)
    fields = dict(decoded.fields)
    fields["matches"] = np.array(99, dtype="<i8").tobytes()
    forged = StateBlob(
        format=decoded.format,
        detector=decoded.detector,
        n_features=decoded.n_features,
        layout=decoded.layout,
        fields=fields,
    )
    with pytest.raises(ValueError, match="pairs"):
        other.load_state("forged", encode_blob(forged))


def test_past_cohort_z_each_cohort_step_z_adds_a_threshold() -> None:
    """A cohort's score is the threshold at ``cohort_z`` and 1.5 times it
    (the policy's default block level) ``cohort_step_z / 2`` later; with
    ``cohort_step_z`` equal to ``cohort_z`` it is the plain proportion
    ``threshold * z / cohort_z``, as before the step existed."""
    from detectors._binomial import binomial_z

    streams = {f"m{k}": 1.7e9 + k * 0.001 + np.arange(6) * 0.25 for k in range(4)}
    z = float(binomial_z(np.array([16]), np.array([16]), 0.18)[0])
    assert 7.5 < z < 9.0  # past the block level at the step, not in proportion

    def last_score(params: TrafficParams) -> float:
        detector = TrafficDetector(params, seed=0)
        keys = list(streams)
        score = 0.0
        for k in range(6):
            times = np.array([streams[key][k] for key in keys])
            out = detector.score_batch(keys, np.zeros((4, 3)), arrival_s=times)
            score = out[0].score
        return score

    stepped = last_score(TrafficParams())
    assert stepped == pytest.approx(min(0.6 * (1.0 + (z - 6.0) / 3.0), 0.999))
    assert stepped >= 1.5 * 0.6
    plain = last_score(TrafficParams(cohort_step_z=6.0))
    assert plain == pytest.approx(0.6 * z / 6.0)
    assert plain < 1.5 * 0.6
