"""``traffic``'s cohort test against honest traffic shaped like the
evaluation's (:mod:`evaluation.benign`): what a worker restart, requests of
several rows, and clients that poll at a fixed period do to it.

Pooled z here is the cohort's binomial z before it is floored at 0, taken
from every key that found a counted cohort; the flag is at ``cohort_z`` 6.
Measured when these tests were written, over three seeds each: a restart
of 2,000 honest keys peaked at -0.8 (6 to 8 keys found a counted cohort);
of 1,000 keys sending requests of up to 8 rows, at 0.5.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from detectors._trafficcohort import CohortEvidence
from detectors.base import DetectorScore
from detectors.traffic import TrafficDetector, TrafficParams
from evaluation.benign import BenignProfile, arrival_plan

T0 = 1.7e9


def _honest_key(
    rng: np.random.Generator, start_s: float, *, multirow: bool
) -> npt.NDArray[np.float64]:
    """One honest key's arrival times: the evaluation's plan (Poisson at a
    lognormal rate between 0.3 and 30 per second, bursts, pauses), a
    burst's rows 0 to 3 ms apart, 3% of requests retried 50 to 500 ms
    later, and with ``multirow`` half of the requests carrying 1 to 8 rows
    that share its time."""
    rate = float(np.clip(rng.lognormal(np.log(10.0), 0.9), 0.3, 30.0))
    profile = BenignProfile(
        rate_per_s=rate, n_queries=int(rng.integers(40, 80)), start_delay_s=0.0
    )
    times: list[float] = []
    for at_s, size in arrival_plan(profile, rng):
        if multirow and rng.random() < 0.5:
            times += [at_s] * int(rng.integers(1, 9))
            continue
        for j in range(size):
            sent = at_s + (rng.uniform(0.0, 0.003) if j else 0.0)
            times.append(sent)
            if rng.random() < 0.03:
                times.append(sent + rng.uniform(0.05, 0.5))
    return start_s + np.sort(np.array(times))


def _replay(
    detector: TrafficDetector,
    streams: dict[str, npt.NDArray[np.float64]],
    batch: int = 256,
) -> tuple[dict[str, list[DetectorScore]], dict[str, float]]:
    """Every stream's rows in time order, ``batch`` at a time, with
    millisecond times; returns the scores per key and the highest pooled z
    per key that found a counted cohort.

    The cohort test reads the counts as they stand after the whole batch,
    so every row of a key in one batch gets one cohort verdict: a batch
    that spans a minute (a worker catching up) flags a key's first row of
    it from the later ones."""
    ids = np.concatenate([[key] * len(t) for key, t in streams.items()])
    times = np.floor(np.concatenate(list(streams.values())) * 1e3) / 1e3
    order = np.argsort(times, kind="stable")
    ids, times = ids[order], times[order]
    look_up = detector._cohort_evidence
    seen: list[CohortEvidence] = []

    def recording(slots: npt.NDArray[np.int64]) -> CohortEvidence:
        seen.append(look_up(slots))
        return seen[-1]

    detector._cohort_evidence = recording  # type: ignore[method-assign]
    rate = detector.params.cohort_match_rate
    scores: dict[str, list[DetectorScore]] = {key: [] for key in streams}
    highest: dict[str, float] = {}
    for start in range(0, len(ids), batch):
        part = ids[start : start + batch]
        out = detector.score_batch(
            list(part), np.zeros((len(part), 3)), arrival_s=times[start : start + batch]
        )
        found = seen[-1]
        for i, key in enumerate(part.tolist()):
            scores[key].append(out[i])
            if found.keys[i] > 0:
                total = float(found.pairs[i])
                z = (found.matches[i] - total * rate) / np.sqrt(
                    total * rate * (1.0 - rate)
                )
                highest[key] = max(highest.get(key, -np.inf), float(z))
    return scores, highest


def _through_cohort(scores: dict[str, list[DetectorScore]]) -> list[str]:
    return [
        key
        for key, rows in scores.items()
        if any(s.flagged and "successive gap pairs" in s.evidence for s in rows)
    ]


@pytest.mark.parametrize(("n_keys", "multirow"), [(2000, False), (1000, True)])
def test_a_worker_restart_flags_no_honest_key_through_a_cohort(
    n_keys: int, multirow: bool
) -> None:
    """A worker restarted without state sees every live key's first request
    within one second: hundreds of cohorts form at once."""
    rng = np.random.default_rng(n_keys)
    streams = {
        f"honest-{k}": _honest_key(rng, T0 + rng.uniform(0.0, 1.0), multirow=multirow)
        for k in range(n_keys)
    }
    scores, highest = _replay(TrafficDetector(seed=0), streams)
    assert _through_cohort(scores) == []
    assert highest, "some honest keys must have looked for a cohort"
    assert max(highest.values()) < 2.0, max(highest.values())


def _dashboard(
    rng: np.random.Generator, cohort_window_s: float
) -> dict[str, list[DetectorScore]]:
    """300 honest keys over 30 s warm the baseline; then a dashboard opens
    three panels, each polling on its own key every 5 s (up to 50 ms late).
    Two rows a batch, so each poll is scored with what came before it."""
    streams = {
        f"honest-{k}": _honest_key(rng, T0 + rng.uniform(0.0, 30.0), multirow=False)
        for k in range(300)
    }
    for k in range(3):
        opened = T0 + 60.0 + rng.uniform(0.0, 0.1)
        streams[f"panel-{k}"] = opened + np.arange(24) * 5.0 + rng.uniform(0, 0.05, 24)
    detector = TrafficDetector(TrafficParams(cohort_window_s=cohort_window_s), seed=0)
    scores, _ = _replay(detector, streams, batch=2)
    return scores


def test_a_polling_dashboard_is_flagged_sooner_not_newly() -> None:
    """Three keys polling in step are a metronome: the single-key test flags
    each at its 16th request (75 s in), from its regularity; the cohort
    test at its 6th or 7th (25 to 30 s in). It changes when, not whether;
    no honest key around them is flagged through a cohort."""
    alone = _dashboard(np.random.default_rng(7), 0.0)
    pooled = _dashboard(np.random.default_rng(7), 0.25)
    for k in range(3):
        first_alone = next(i for i, s in enumerate(alone[f"panel-{k}"]) if s.flagged)
        assert first_alone + 1 == 16
        assert "regularity" in alone[f"panel-{k}"][first_alone].evidence
        first = next(i for i, s in enumerate(pooled[f"panel-{k}"]) if s.flagged)
        assert first + 1 in (6, 7)  # 12 pooled pairs: 4, 4 and 3 or 4 each
        assert "successive gap pairs" in pooled[f"panel-{k}"][first].evidence
    assert [key for key in _through_cohort(pooled) if key.startswith("honest")] == []
