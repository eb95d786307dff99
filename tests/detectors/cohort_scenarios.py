"""Scenarios that measure ``traffic``'s cohort test on an overwhelming cohort:
how many rows each of ten paced keys sends before it is at the block level,
and what that does to honest keys started beside them.

Shared by ``test_traffic_cohort_strong.py`` (few seeded runs, asserted) and
by hand for the numbers in ``docs/traffic-cohort.md``::

    python -m tests.detectors.cohort_scenarios [runs]

Imports numpy, the detector and the other cohort tests' helpers only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._binomial import binomial_z
from detectors.traffic import TrafficDetector, TrafficParams
from tests.detectors.test_traffic_cohort import _play
from tests.detectors.test_traffic_cohort_honest import _honest_key, _replay

T0 = 1.7e9
N_THIEVES = 10
RATE_PER_KEY = 4.0
BROKER_BATCH_S = 0.005
"""The shared producer's batches reach the broker about every 5 ms (its
linger), and each record is stamped with its batch's append time."""


def broker_batched_thieves(
    rng: np.random.Generator, n_rows: int, *, start_within_s: float = 0.05
) -> dict[str, npt.NDArray[np.float64]]:
    """Ten keys paced at four requests per second by one process: each key
    starts up to ``start_within_s`` after the first, every send leaves up to
    30 ms after its tick (the process sends one key at a time) and is
    stamped at the end of the 5 ms producer batch it joins, as the
    evaluation's shared producer does."""
    streams = {}
    for k in range(N_THIEVES):
        ticks = T0 + rng.uniform(0.0, start_within_s) + np.arange(n_rows) / RATE_PER_KEY
        sent = ticks + rng.uniform(0.0, 0.03, n_rows)
        streams[f"thief-{k}"] = np.ceil(sent / BROKER_BATCH_S) * BROKER_BATCH_S
    return streams


def block_rows(
    params: TrafficParams, runs: Iterable[int], *, n_rows: int = 20, batch: int = 8
) -> tuple[list[int | None], list[int | None]]:
    """Per key of every run, the row at which it is first at the block level
    (score at least 1.5 times the threshold, ``policy.block_at`` 1.5), None
    when not within ``n_rows``; and per run the row by which all ten are
    (None when one is not)."""
    per_key: list[int | None] = []
    per_run: list[int | None] = []
    level = 1.5 * params.threshold
    for seed in runs:
        detector = TrafficDetector(params, seed=0)
        rng = np.random.default_rng(seed)
        scores = _play(detector, broker_batched_thieves(rng, n_rows), batch=batch)
        firsts = [
            next((i + 1 for i, s in enumerate(rows) if s.score >= level), None)
            for rows in scores.values()
        ]
        per_key += firsts
        per_run.append(None if None in firsts else max(f for f in firsts if f))
    return per_key, per_run


def beside_the_thieves(
    params: TrafficParams, runs: Iterable[int], *, n_honest: int = 20
) -> tuple[int, int, list[str]]:
    """The hard case: ten paced keys and ``n_honest`` honest Poisson keys at
    their pace (four per second), all started within 0.25 s, 30 rows each.
    Returns the honest keys flagged, the honest keys in all, and the
    evidence of each flag."""
    flagged = 0
    total = 0
    evidence: list[str] = []
    for seed in runs:
        rng = np.random.default_rng(1000 + seed)
        streams = broker_batched_thieves(rng, 30, start_within_s=0.05)
        for k in range(n_honest):
            start = T0 + rng.uniform(0.0, 0.25)
            streams[f"honest-{k}"] = start + np.cumsum(rng.exponential(0.25, 30))
        scores = _play(TrafficDetector(params, seed=0), streams)
        for k in range(n_honest):
            total += 1
            hit = next((s for s in scores[f"honest-{k}"] if s.flagged), None)
            if hit is not None:
                flagged += 1
                evidence.append(hit.evidence)
    return flagged, total, evidence


def restart(
    params: TrafficParams, seed: int, n_keys: int, *, multirow: bool
) -> tuple[int, float, float, float]:
    """A worker restarted without state: ``n_keys`` honest keys shaped like
    the evaluation's, all first seen within 1 s. Returns the keys flagged
    through a cohort, the highest pooled z any key found (its cohort
    counted), and over every cohort any key looked up (keys under
    ``member_z`` included) with ``cohort_min_keys`` and ``cohort_min_pairs``,
    the highest pooled z, whole and over its members at ``member_z`` alone
    (-inf when none had enough of them): the lower bar needs both at
    ``strong_cohort_z``."""
    rng = np.random.default_rng(seed)
    streams = {
        f"honest-{k}": _honest_key(rng, T0 + rng.uniform(0.0, 1.0), multirow=multirow)
        for k in range(n_keys)
    }
    looked: list[npt.NDArray[np.int64]] = []
    detector = TrafficDetector(params, seed=0)
    # Every look goes through the detector's index of young keys.
    index = detector._cohort_index
    assert index is not None
    pool = index.pool

    def recording(*args: Any) -> npt.NDArray[np.int64]:
        found = pool(*args)
        looked.append(found.copy())
        return found

    # A recording wrapper in its place, for this detector only.
    index.pool = recording  # type: ignore[method-assign,assignment]
    scores, highest = _replay(detector, streams)
    through = sum(
        any(s.flagged and "successive gap pairs" in s.evidence for s in rows)
        for rows in scores.values()
    )
    cohorts = np.concatenate(looked, axis=1)
    rate = params.cohort_match_rate
    whole = (cohorts[0] >= params.cohort_min_keys) & (
        cohorts[1] >= params.cohort_min_pairs
    )
    whole_z = binomial_z(cohorts[2][whole], cohorts[1][whole], rate)
    enough = (cohorts[3] >= params.cohort_min_keys) & (
        cohorts[4] >= params.cohort_min_pairs
    )
    member_z = binomial_z(cohorts[5][enough], cohorts[4][enough], rate)
    return (
        through,
        max(highest.values(), default=-np.inf),
        float(whole_z.max(initial=-np.inf)),
        float(member_z.max(initial=-np.inf)),
    )


def _summary(rows: list[int | None]) -> str:
    got = np.array([r for r in rows if r is not None], dtype=float)
    missing = sum(r is None for r in rows)
    if not len(got):
        return f"none of {len(rows)}"
    return (
        f"median {np.median(got):g}, 90th {np.percentile(got, 90):g}, "
        f"max {got.max():g}, min {got.min():g}; {missing} of {len(rows)} not within"
    )


def main(runs: int) -> None:
    """Print the lower bar off, at ``strong_cohort_z`` 9 and at the defaults
    (6): ``runs`` attack runs and three times as many beside the thieves."""
    for label, params in (
        ("off", TrafficParams(strong_member_z=3.0)),
        ("at 9", TrafficParams(strong_cohort_z=9.0)),
        ("default", TrafficParams()),
    ):
        per_key, per_run = block_rows(params, range(runs))
        print(f"{label}: rows to block level per key: {_summary(per_key)}")
        print(f"{label}: rows until all ten: {_summary(per_run)}")
        flagged, total, evidence = beside_the_thieves(params, range(3 * runs))
        print(f"{label}: honest beside the thieves flagged: {flagged} of {total}")
        for line in evidence:
            print("   ", line)
        for n_keys, multirow in ((2000, False), (1000, True)):
            for seed in range(3):
                through, pooled, looked, members = restart(
                    params, n_keys + seed, n_keys, multirow=multirow
                )
                print(
                    f"{label}: restart of {n_keys} keys, multirow {multirow}, "
                    f"seed {seed}: {through} flagged, highest pooled z "
                    f"{pooled:.2f}; of any cohort looked up {looked:.2f}, "
                    f"over its members at member_z {members:.2f}"
                )
        sys.stdout.flush()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
