"""Offline replay of the evaluation's honest digits clients through ``ood``.

Not a test module: ``python -m tests.detectors.ood_repeat_sim --seeds 1 2``
prints how many of the 60 honest clients of ``modelgate eval --models digits
--seed S`` ``ood`` alone flags and blocks, the numbers quoted in
``docs/detectors.md`` for the repeat rule. ``--before PATH`` replays with
another copy of ``detectors/ood.py`` (e.g. ``git show BASE:detectors/ood.py``)
for the before/after comparison (numba cannot reload that copy's kernels from
its on-disk cache: remove the copy's ``__pycache__`` before each run).

What is replayed, and how it follows the evaluation:

- the detector is built as a worker builds it for digits: the training half
  on the detectors' scale (the declared range 0..16, so ``X / 16``), the
  parameters calibrated on it (:func:`detectors.calibration.calibrate`),
  then ``learn_baseline``;
- the honest clients' streams are drawn exactly as
  :func:`evaluation.harness` draws them for a seed (profiles, then per client
  its habits, its shuffled copy of the held-out half, its arrival plan and
  its query stream with near-duplicate runs at 0.5% noise);
- rows are scored in arrival order, in batches of those arriving within
  ``BATCH_S`` of the batch's first; a client learns while not flagged;
- the policy's default ladder on ``ood`` alone: a score past ``BLOCK_AT``
  times the threshold, or a third flag, blocks the client, whose remaining
  rows are dropped.

Retries (the gateway answers them ``DUPLICATE_REQUEST`` unscored) and the
attack traffic (whose rows the shared trees do not learn once flagged) are
left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.calibration import calibrate
from detectors.ood import OutOfDistributionDetector
from detectors.registry import build_detectors
from evaluation.benign import arrival_plan, draw_habits, draw_profiles, query_stream
from gateway.models import digits_split

Array = npt.NDArray[Any]

BATCH_S = 0.01
BLOCK_AT = 1.5
BLOCK_AFTER_FLAGS = 3
N_BENIGN = 60
CLIP = (0.0, 16.0)


@cache
def reference() -> tuple[Array, Array]:
    """The digits reference (training half) and held-out half, as the
    detectors and the honest clients see them."""
    x_train, x_test, _, _ = digits_split()
    return np.asarray(x_train, dtype=np.float64) / 16.0, np.asarray(x_test)


CALIBRATE = True
"""Whether :func:`calibrated_params` runs the worker's calibration (about 40
s on a shared 2-core machine). The tests turn it off: on digits it leaves
``ood``'s parameters as they are (``_main`` prints them first)."""


@cache
def calibrated_params() -> dict[str, Any]:
    """``ood``'s parameters as a worker calibrates them on digits."""
    if not CALIBRATE:
        return {}
    calibration = calibrate(lambda o: build_detectors(o, seed=0), {}, reference()[0])
    return dict(calibration.params.get("ood", {}))


def honest_arrivals(seed: int) -> list[tuple[float, int, Array]]:
    """(arrival seconds, client, raw row) of every honest query of an
    evaluation run with ``seed``, in arrival order."""
    _, replay = reference()
    rng = np.random.default_rng(seed)
    profiles = draw_profiles(
        N_BENIGN,
        rng,
        queries=(300, 600),
        spread_s=10.0,
        median_rate_per_s=1.5,
        rate_bounds=(0.3, 10.0),
    )
    spans = tuple(float(v) for v in np.ptp(replay, axis=0))
    out: list[tuple[float, int, Array]] = []
    for index, crng in enumerate(rng.spawn(N_BENIGN)):
        habits = draw_habits(1, crng, CLIP, near_duplicates=True, feature_spans=spans)[
            0
        ]
        rows = replay[crng.permutation(len(replay))]
        profile = profiles[index]
        plan = arrival_plan(profile, crng)
        stream = query_stream(rows, habits, profile.n_queries, crng)
        position = 0
        for at_s, size in plan:
            for _ in range(size):
                if position < len(stream):
                    start = profile.start_delay_s + at_s
                    out.append((start, index, stream[position]))
                    position += 1
    out.sort(key=lambda item: (item[0], item[1]))
    return out


@dataclass
class Outcome:
    flagged: list[int]
    blocked: list[int]
    first_flag: dict[int, int]


def replay(seed: int, cls: type[OutOfDistributionDetector]) -> Outcome:
    """The honest clients of run ``seed`` through a fresh ``cls`` detector."""
    ref, _ = reference()
    params: Any = cls.Params(**calibrated_params())
    detector = cls(params, seed=0)
    detector.learn_baseline(ref)
    arrivals = honest_arrivals(seed)
    flags = [0] * N_BENIGN
    seen = [0] * N_BENIGN
    blocked = [False] * N_BENIGN
    first_flag: dict[int, int] = {}
    i = 0
    while i < len(arrivals):
        began = arrivals[i][0]
        j = i
        while j < len(arrivals) and arrivals[j][0] - began <= BATCH_S:
            j += 1
        batch = [a for a in arrivals[i:j] if not blocked[a[1]]]
        i = j
        if not batch:
            continue
        clients = [a[1] for a in batch]
        X = np.stack([a[2] for a in batch]).astype(np.float64) / 16.0
        learn = [flags[c] == 0 for c in clients]
        scores = detector.score_batch(
            [f"benign-{c:02d}" for c in clients],
            X,
            learn=learn,
            arrival_s=np.array([1.7e9 + a[0] for a in batch]),
        )
        for c, score in zip(clients, scores, strict=True):
            if blocked[c]:
                continue
            seen[c] += 1
            if score.flagged:
                flags[c] += 1
                first_flag.setdefault(c, seen[c])
                if (
                    score.score >= BLOCK_AT * params.threshold
                    or flags[c] >= BLOCK_AFTER_FLAGS
                ):
                    blocked[c] = True
    return Outcome(
        flagged=[c for c in range(N_BENIGN) if flags[c]],
        blocked=[c for c in range(N_BENIGN) if blocked[c]],
        first_flag=first_flag,
    )


def _load(path: Path) -> type[OutOfDistributionDetector]:
    spec = importlib.util.spec_from_file_location("ood_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    found: type[OutOfDistributionDetector] = module.OutOfDistributionDetector
    return found


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--before", type=Path, default=None)
    args = parser.parse_args()
    print("calibrated ood params:", calibrated_params())
    kinds: list[tuple[str, type[OutOfDistributionDetector]]] = [
        ("after", OutOfDistributionDetector)
    ]
    if args.before is not None:
        kinds.insert(0, ("before", _load(args.before)))
    for seed in args.seeds:
        for label, cls in kinds:
            got = replay(seed, cls)
            print(
                f"seed {seed} {label}: flagged {len(got.flagged)} of {N_BENIGN} "
                f"{got.flagged}, blocked {len(got.blocked)} {got.blocked}, "
                f"first flag at query {got.first_flag}"
            )


if __name__ == "__main__":
    _main()
