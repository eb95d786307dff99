"""Scenarios that measure ``traffic``'s solo test: when a single key paced
at one request every 25 ms is flagged and at the block level, whatever the
phase of its millisecond stamps, and how high honest keys' solo z goes.

Shared by ``test_traffic_solo.py`` (few seeded runs, asserted) and by hand
for the numbers in ``docs/traffic-solo.md``::

    python -m tests.detectors.solo_scenarios [runs]

Imports numpy, the detector and the other traffic tests' helpers only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt

from detectors.traffic import TrafficDetector, TrafficParams
from tests.detectors.test_traffic_cohort import _play, _poisson_keys
from tests.detectors.test_traffic_cohort_honest import _honest_key, _replay

T0 = 1.7e9
PERIOD_S = 0.025
"""The evaluation's attackers send one request every 25 ms."""

BROKER_BATCH_S = 0.005
"""A shared producer's batch reaches the broker about every 5 ms."""

RECORDED = Path(__file__).parent / "data" / "paced_single_stamps.txt"

Times = npt.NDArray[np.float64]


def recorded_stream() -> Times:
    """The evaluation's paced single-key learner as the worker saw it (seed
    2, every detector in shadow): 449 rows, gaps of 11 to 45 ms around a
    median of 26, some 0 (two in one millisecond), pauses of 0.5 to 0.7 s
    while it retrains."""
    lines = RECORDED.read_text().splitlines()
    ms = np.array([int(x) for x in lines if x and not x.startswith("#")])
    return T0 + ms / 1000.0


def paced(
    offset_s: float,
    n_rows: int,
    rng: np.random.Generator,
    *,
    late_s: float = 0.0,
    batched: bool = False,
    split_share: float = 0.0,
) -> Times:
    """A key sending every 25 ms from ``offset_s`` past a millisecond (its
    phase against the record clock). Each send is late by up to ``late_s``
    (uniform); with ``batched`` it is stamped at the end of the 5 ms
    producer batch it joins; with ``split_share`` that share of sends slip
    into the next one's batch (its stamp is the next one's: gaps 0 and 50
    ms)."""
    ticks = T0 + offset_s + np.arange(n_rows) * PERIOD_S
    sent = ticks + rng.uniform(0.0, late_s, n_rows)
    if batched:
        sent = np.ceil(sent / BROKER_BATCH_S) * BROKER_BATCH_S
    slip = np.flatnonzero(rng.random(n_rows - 1) < split_share)
    sent[slip] = sent[slip + 1]
    return np.sort(sent)


def first_rows(
    params: TrafficParams, stream: Times, *, batch: int = 4
) -> tuple[int | None, int | None]:
    """Rows (from 1) at which the key is first flagged and first at the
    block level (score at least 1.5 times the threshold, the policy's
    default ``block_at``), None when never."""
    scores = _play(TrafficDetector(params, seed=0), {"key": stream}, batch=batch)
    rows = scores["key"]
    level = 1.5 * params.threshold
    flag = next((i + 1 for i, s in enumerate(rows) if s.flagged), None)
    block = next((i + 1 for i, s in enumerate(rows) if s.score >= level), None)
    return flag, block


def phases(
    params: TrafficParams, make: Callable[[float], Times]
) -> list[tuple[int | None, int | None]]:
    """First flag and block rows at every whole-millisecond phase 0 to 24 ms,
    each 0.3 ms past it (so some stamps round down, some not)."""
    return [first_rows(params, make(ms / 1000.0 + 0.0003)) for ms in range(25)]


def honest_solo_z(
    params: TrafficParams, streams: dict[str, Times], *, batch: int = 256
) -> tuple[int, float]:
    """The honest keys flagged by the solo test and the highest solo z any
    judged window of theirs reached."""
    detector = TrafficDetector(params, seed=0)
    judge = detector._solo_z
    highest = [-np.inf]

    def recording(
        gaps: npt.NDArray[np.float64], near: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        z = judge(gaps, near)
        highest[0] = max(highest[0], float(z.max(initial=-np.inf)))
        return z

    detector._solo_z = recording  # type: ignore[method-assign]
    scores, _ = _replay(detector, streams, batch=batch)
    flagged = sum(
        any(s.flagged and "beyond chance" in s.evidence for s in rows)
        for rows in scores.values()
    )
    return flagged, highest[0]


def honest_habits(
    seed: int, n_keys: int, *, multirow: bool, within_s: float = 1.0
) -> dict[str, Times]:
    """Keys shaped like the evaluation's honest clients (see
    :func:`tests.detectors.test_traffic_cohort_honest._honest_key`), all
    started within ``within_s`` (a worker restart without state: 1 s)."""
    rng = np.random.default_rng(seed)
    return {
        f"honest-{k}": _honest_key(
            rng, T0 + rng.uniform(0.0, within_s), multirow=multirow
        )
        for k in range(n_keys)
    }


def poisson(seed: int, n_keys: int, *, n_rows: int = 80) -> dict[str, Times]:
    """Plain Poisson keys at rates from 0.3 to 30 per second."""
    rng = np.random.default_rng(seed)
    streams = {}
    for k in range(n_keys):
        rate = 10 ** rng.uniform(-0.5, 1.5)
        start = T0 + rng.uniform(0.0, 60.0)
        streams[f"poisson-{k}"] = start + np.cumsum(rng.exponential(1 / rate, n_rows))
    return streams


def _summary(rows: list[int | None]) -> str:
    got = np.array([r for r in rows if r is not None], dtype=float)
    missing = sum(r is None for r in rows)
    if not len(got):
        return f"none of {len(rows)}"
    return (
        f"median {np.median(got):g}, max {got.max():g}, min {got.min():g}; "
        f"{missing} of {len(rows)} never"
    )


def main(runs: int) -> None:
    """Print the attack's rows per stamp model and the honest counts."""
    params = TrafficParams(solo_z=5.0)  # off by default
    print(f"recorded stream: flag, block rows {first_rows(params, recorded_stream())}")
    models: dict[str, Callable[[np.random.Generator, float], Times]] = {
        "exact": lambda rng, at: paced(at, 64, rng),
        "late up to 2 ms": lambda rng, at: paced(at, 64, rng, late_s=0.002),
        "late up to 10 ms": lambda rng, at: paced(at, 64, rng, late_s=0.01),
        "late up to 20 ms": lambda rng, at: paced(at, 64, rng, late_s=0.02),
        "5 ms producer batches": lambda rng, at: paced(
            at, 64, rng, late_s=0.002, batched=True
        ),
        "batches, 10% split 0/50": lambda rng, at: paced(
            at, 64, rng, late_s=0.002, batched=True, split_share=0.1
        ),
        "batches, 25% split 0/50": lambda rng, at: paced(
            at, 64, rng, late_s=0.002, batched=True, split_share=0.25
        ),
        "late up to 10 ms, 10% split": lambda rng, at: paced(
            at, 64, rng, late_s=0.01, split_share=0.1
        ),
    }
    for label, make in models.items():
        flags: list[int | None] = []
        blocks: list[int | None] = []
        for seed in range(runs):
            rng = np.random.default_rng(seed)
            for flag, block in phases(params, partial(make, rng)):
                flags.append(flag)
                blocks.append(block)
        print(f"{label}: first flag {_summary(flags)}; block {_summary(blocks)}")
        sys.stdout.flush()
    for seed in range(3):
        for n_keys, multirow in ((2000, False), (1000, True)):
            flagged, z = honest_solo_z(
                params, honest_habits(n_keys + seed, n_keys, multirow=multirow)
            )
            print(
                f"restart of {n_keys} honest keys, multirow {multirow}, seed "
                f"{seed}: {flagged} flagged, highest solo z {z:.2f}"
            )
        flagged, z = honest_solo_z(params, poisson(seed, 2000))
        print(f"2000 Poisson keys, seed {seed}: {flagged} flagged, highest {z:.2f}")
        rng = np.random.default_rng(50 + seed)
        flagged, z = honest_solo_z(
            params, _poisson_keys(2000, rng, start_within_s=60.0, n=80)
        )
        print(
            f"2000 Poisson keys with short bursts, seed {seed}: {flagged} "
            f"flagged, highest {z:.2f}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
