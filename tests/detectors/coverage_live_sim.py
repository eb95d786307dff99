"""Offline replay of the evaluation's honest digits clients, and one attacker,
through ``coverage`` on the digits MLP, with and without its live table.

Not a test module: ``python -m tests.detectors.coverage_live_sim --seeds 1 2 3``
prints, per seed, the largest decision-part deviation any of the 60 honest
clients of ``modelgate eval --models digits --seed S`` reaches, how many of
them ``coverage`` flags, and the first flagged query of a single-key attacker
(uniform random queries, the evaluation's ``random`` extraction; or the
``active`` sampling extraction) mixed into that population; "before" is the
reference-only expectation (``live_min_answers`` out of reach, which the
pinned-score test shows scores exactly as the code before the live table),
"after" the defaults. The numbers are the ones quoted in the coverage
class docstring and ``docs/detectors.md``.

What is replayed, and how it follows the evaluation:

- the model is the demo digits MLP (:func:`gateway.models.ensure_digits_model`,
  trained into ``--models``, default ``/tmp/cov-sim/models``); the detector
  learns its partition and the reference answers from the training half on
  the detectors' scale (``X / 16``), as a worker does;
- the honest streams are :func:`tests.detectors.ood_repeat_sim.honest_arrivals`
  (the evaluation's profiles, habits, held-out replay and near-duplicate
  runs); the attacker starts ``ATTACK_START_S`` into the run at
  ``ATTACK_RATE_PER_S``;
- rows are scored in arrival order in batches of ``BATCH_S``, then shown the
  model's answers; a client teaches the live table while not flagged.

No policy ladder: a flagged client keeps sending (so an honest client's
largest deviation is measured over its whole stream).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.coverage import CoverageDetector, CoverageParams
from tests.detectors.ood_repeat_sim import BATCH_S, N_BENIGN, honest_arrivals

Array = npt.NDArray[Any]

ATTACK_START_S = 30.0
ATTACK_RATE_PER_S = 5.0
ATTACK_QUERIES = 400
ATTACKER = N_BENIGN
"""Client index of the attacker (the honest ones are 0..59)."""

Predict = Callable[[Array], Array]

TEACHES = True
"""Whether the attacker's answers teach the live table until it is flagged
(as in the gateway); ``--attacker-silent`` turns it off to separate what its
own answers do from what the honest table does."""


def digits_model(directory: Path) -> tuple[Predict, Array]:
    """The demo MLP's ``predict_proba`` (raw pixels 0..16) and its training
    half (raw)."""
    from gateway.models import ensure_digits_model, load_model

    ensure_digits_model(directory)
    model = load_model(directory, "digits")
    return model.predict_proba, np.asarray(model.reference, dtype=np.float64)


def attack_rows(kind: str, predict: Predict, seed: int) -> Array:
    """The attacker's raw queries: ``random`` (uniform over 0..16, as the
    evaluation's random extraction draws them) or ``active`` (the
    evaluation's active-learning extraction on digits, answered by the
    model)."""
    rng = np.random.default_rng(seed + 1000)
    if kind == "random":
        from evaluation.attacks.sampling import uniform_queries

        return np.asarray(uniform_queries(ATTACK_QUERIES, 64, (0.0, 16.0), rng))
    from evaluation.attacks.sampling import SamplingParams, run_sampling_extraction
    from gateway.models import digits_split

    _, x_test, _, _ = digits_split()
    order = rng.permutation(len(x_test))
    pool, held = x_test[order[: len(order) // 2]], x_test[order[len(order) // 2 :]]
    asked: list[Array] = []

    def query(batch: Array) -> Array:
        asked.append(np.asarray(batch))
        return predict(batch)

    params = SamplingParams(
        budget=ATTACK_QUERIES,
        round_size=ATTACK_QUERIES // 8,
        initial=ATTACK_QUERIES // 16,
        clip=(0.0, 16.0),
        seed=seed,
    )
    run_sampling_extraction(
        query, "active", held, predict(held).argmax(axis=1), params, pool=pool
    )
    return np.concatenate(asked)


@dataclass
class Outcome:
    honest_max_deviation: float
    honest_flagged: list[int]
    attack_first_flag: int | None


def replay(
    seed: int, live: bool, predict: Predict, ref_raw: Array, attack: Array | None
) -> Outcome:
    """One run's honest clients (and ``attack``'s rows as one more client)
    through a fresh detector."""
    params = CoverageParams() if live else CoverageParams(live_min_answers=2**53)
    detector = CoverageDetector(params, seed=0)
    detector.learn_baseline(ref_raw / 16.0)
    detector.learn_output_baseline(ref_raw / 16.0, predict(ref_raw))
    arrivals = honest_arrivals(seed)
    if attack is not None:
        times = ATTACK_START_S + np.arange(len(attack)) / ATTACK_RATE_PER_S
        arrivals += [
            (float(t), ATTACKER, row) for t, row in zip(times, attack, strict=True)
        ]
        arrivals.sort(key=lambda item: (item[0], item[1]))
    flagged = [False] * (N_BENIGN + 1)
    seen = [0] * (N_BENIGN + 1)
    first_flag: int | None = None
    worst = 0.0
    i = 0
    while i < len(arrivals):
        began = arrivals[i][0]
        j = i
        while j < len(arrivals) and arrivals[j][0] - began <= BATCH_S:
            j += 1
        batch = arrivals[i:j]
        i = j
        clients = [a[1] for a in batch]
        ids = [f"c{c}" for c in clients]
        raw = np.stack([a[2] for a in batch]).astype(np.float64)
        learn = np.array(
            [not flagged[c] and (TEACHES or c != ATTACKER) for c in clients]
        )
        for c, score in zip(
            clients, detector.score_batch(ids, raw / 16.0, learn=learn), strict=True
        ):
            seen[c] += 1
            if score.flagged:
                flagged[c] = True
                if c == ATTACKER and first_flag is None:
                    first_flag = seen[c]
        detector.observe_outputs(ids, raw / 16.0, predict(raw), learn=learn)
        assert detector._arena is not None
        arrays = detector._arena.arrays
        for c in set(clients) - {ATTACKER}:
            slot = detector._arena.slots([f"c{c}"])[0]
            if arrays["n_answers"][slot] >= params.min_queries:
                worst = max(worst, float(arrays["region_score"][slot]) * 10.0)
    return Outcome(
        honest_max_deviation=worst,
        honest_flagged=[c for c in range(N_BENIGN) if flagged[c]],
        attack_first_flag=first_flag,
    )


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--attack", choices=("none", "random", "active"), default="none"
    )
    parser.add_argument("--models", type=Path, default=Path("/tmp/cov-sim/models"))
    parser.add_argument("--attacker-silent", action="store_true")
    args = parser.parse_args()
    global TEACHES
    TEACHES = not args.attacker_silent
    predict, ref_raw = digits_model(args.models)
    for seed in args.seeds:
        attack = (
            None if args.attack == "none" else attack_rows(args.attack, predict, seed)
        )
        for label, live in (("before", False), ("after", True)):
            got = replay(seed, live, predict, ref_raw, attack)
            print(
                f"seed {seed} {label}: honest max decision deviation "
                f"{got.honest_max_deviation:.2f}, honest flagged "
                f"{len(got.honest_flagged)} {got.honest_flagged}, "
                f"{args.attack} attacker first flag at query {got.attack_first_flag}",
                flush=True,
            )


if __name__ == "__main__":
    _main()
