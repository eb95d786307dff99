"""Hostile traffic against the three cohort tests, measured by hand.

Not a test module: ``python -m tests.detectors.cohort_attack_sim cost``
prints what a batch of 256 rows (``--batch 1``: one row, the trickle)
costs each detector when N keys started in one instant and every one
of them looks for its cohort, with the keys sorted per batch (as before
``traffic`` and ``ood``'s index and ``margin``'s start order) and kept
across batches, and the ratio (``--only`` one detector);
``python -m tests.detectors.cohort_attack_sim frame-margin`` how many honest
keys a crowd of hostile keys started in the same quarter second gets
flagged through ``margin``'s cohorts. The numbers are quoted in
``docs/cohort-attacks.md``.

Imports numpy, the detectors and other tests' helpers only.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors import OodParams, OutOfDistributionDetector
from detectors.margin import MarginDetector, MarginParams
from detectors.traffic import TrafficDetector
from tests.detectors.test_margin_cohort import answers
from tests.detectors.test_ood import continuous_reference, wide_queries

T0 = 1.7e9
BATCH = 256
"""Rows per batch timed; ``--batch`` changes it."""


def _median_ms(step: Callable[[], None], reps: int = 5) -> float:
    spent = []
    # Small batches are quick and noisy: more of them.
    for _ in range(reps if BATCH >= 64 else 8 * reps + 1):
        began = time.perf_counter()
        step()
        spent.append(time.perf_counter() - began)
    return 1e3 * float(np.median(spent))


def traffic_cost(n_keys: int, indexed: bool = True) -> float:
    """ms per batch: keys of four requests at one pace (two matching pairs,
    so every key looks), a batch of their fifth. ``indexed`` False sorts
    the young keys per batch (the look-up before the index)."""
    detector = TrafficDetector(seed=0)
    if not indexed:
        detector._cohort_index = None
    ids = [f"k{i}" for i in range(n_keys)]
    for step in range(4):
        at = np.full(n_keys, T0 + step * 0.25)
        detector.score_batch(ids, np.zeros((n_keys, 3)), arrival_s=at)
    rng = np.random.default_rng(0)

    def batch() -> None:
        pick = [ids[i] for i in rng.choice(n_keys, BATCH, replace=False)]
        at = np.full(BATCH, T0 + 1.0)
        detector.score_batch(pick, np.zeros((BATCH, 3)), arrival_s=at)

    return _median_ms(batch)


def ood_cost(n_keys: int, indexed: bool = True) -> float:
    """ms per batch: keys of one wide query each (every key looks);
    ``indexed`` as in :func:`traffic_cost`."""
    detector = OutOfDistributionDetector(OodParams())
    if not indexed:
        detector._cohort_index = None
    detector.learn_baseline(continuous_reference())
    ids = [f"k{i}" for i in range(n_keys)]
    quiet = [False] * n_keys
    at = np.full(n_keys, T0)
    detector.score_batch(ids, wide_queries(n_keys, seed=2), learn=quiet, arrival_s=at)
    rng = np.random.default_rng(0)

    def batch() -> None:
        pick = [ids[i] for i in rng.choice(n_keys, BATCH, replace=False)]
        detector.score_batch(
            pick,
            wide_queries(BATCH, seed=3),
            learn=[False] * BATCH,
            arrival_s=np.full(BATCH, T0 + 0.25),
        )

    return _median_ms(batch)


def margin_cost(n_keys: int, indexed: bool = True) -> float:
    """ms per batch: keys of 12 answers whose confidence climbs from under
    honest answers' (every key looks for both cohorts). ``indexed`` False
    scans and sorts the keys per batch (the look-up before the start
    order)."""
    from tests.detectors.test_margin_cohort_cost import _crowd

    detector, ids = _crowd(n_keys)
    if not indexed:
        detector._start_order = None
    rng = np.random.default_rng(1)

    def batch() -> None:
        pick = [ids[i] for i in rng.choice(n_keys, BATCH, replace=False)]
        detector.score_batch(
            pick,
            rng.random((BATCH, 4)),
            learn=[False] * BATCH,
            arrival_s=np.full(BATCH, T0 + 104.0),
        )

    return _median_ms(batch, reps=3)


def _honest_margins(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    """15% of answers anywhere under 0.5, the rest over 0.9."""
    return np.where(rng.random(n) < 0.15, rng.random(n) * 0.5, 0.9 + rng.random(n) / 10)


def frame_margin(
    seed: int, n_hostile: int, *, n_honest: int = 20, n_rows: int = 40, **params: Any
) -> list[str]:
    """Honest keys and ``n_hostile`` keys answered at margin 0.01, all
    started within 0.25 s at four requests per second each (arrivals up to
    30 ms late); returns the evidence of each honest key flagged."""
    rng = np.random.default_rng(seed)
    detector = MarginDetector(MarginParams(**params))
    x = rng.random((800, 4))
    base = _honest_margins(rng, 800)
    detector.learn_baseline(x)
    detector.learn_output_baseline(x, answers(base))
    warm = [f"b{i}" for i in range(800)]
    detector.score_batch(warm, x, arrival_s=np.full(800, T0 - 1000.0))
    detector.observe_outputs(warm, x, answers(base))
    keys = [f"h{i}" for i in range(n_honest)] + [f"x{i}" for i in range(n_hostile)]
    starts = T0 + rng.uniform(0.0, 0.25, len(keys))
    flagged: dict[str, str] = {}
    quiet = [False] * len(keys)
    for step in range(n_rows):
        rows = rng.random((len(keys), 4))
        at = starts + step * 0.25 + rng.uniform(0.0, 0.03, len(keys))
        order = np.argsort(at)
        ids = [keys[i] for i in order]
        scores = detector.score_batch(
            ids, rows[order], learn=quiet, arrival_s=at[order]
        )
        for key, score in zip(ids, scores, strict=True):
            if key[0] == "h" and score.flagged and key not in flagged:
                flagged[key] = f"answer {step + 1}: {score.evidence}"
        margins = np.concatenate(
            [_honest_margins(rng, n_honest), np.full(n_hostile, 0.01)]
        )
        detector.observe_outputs(ids, rows[order], answers(margins[order]), learn=quiet)
    return list(flagged.values())


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["cost", "frame-margin"])
    parser.add_argument("--keys", type=int, nargs="*", default=[1_000, 10_000, 50_000])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rank-member-z", type=float, default=None)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--only", choices=["traffic", "ood", "margin"], default=None)
    args = parser.parse_args()
    globals()["BATCH"] = args.batch
    if args.what == "cost":
        costs = (("traffic", traffic_cost), ("ood", ood_cost), ("margin", margin_cost))
        for name, indexed_cost in costs:
            if args.only not in (None, name):
                continue
            for n in args.keys:
                before = indexed_cost(n, False)
                after = indexed_cost(n, True)
                print(
                    f"{name} {n} keys: {before:.3f} ms per {BATCH}-row batch "
                    f"sorted per batch, {after:.3f} ms indexed "
                    f"({before / after:.1f} times less)",
                    flush=True,
                )
        return
    params = {} if args.rank_member_z is None else {"rank_member_z": args.rank_member_z}
    for n_hostile in (0, 10, 50):
        found = [
            e
            for seed in range(args.runs)
            for e in frame_margin(seed, n_hostile, **params)
        ]
        print(
            f"{n_hostile} hostile keys: {len(found)} of {20 * args.runs} honest flagged"
        )
        for evidence in found[:3]:
            print("   ", evidence[-200:])


if __name__ == "__main__":
    _main()
