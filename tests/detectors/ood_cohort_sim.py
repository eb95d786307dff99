"""Offline replays of ``ood`` on the real breast-cancer model, for its cohort test.

Not a test module: the tests in ``test_ood_cohort*.py`` use these replays, and
``python -m tests.detectors.ood_cohort_sim`` prints the measurements quoted in
``docs/detectors.md`` (before and after: pass ``--cohort-window-s 0``).

What is replayed, and how it follows the evaluation:

- the detector is built as a worker builds it: the zoo's breast-cancer split,
  the reference (training half) put on the detectors' scale by
  :func:`gateway.validation.feature_scale`, the parameters calibrated on it
  (:func:`detectors.calibration.calibrate`), then ``learn_baseline``;
- equation solving (:func:`evaluation.attacks.equation.equation_queries`, d + 1
  = 31 rows around the public pool's first row, as ``evaluation.scenarios``
  draws it for a seed) spread over 10 keys as
  :class:`evaluation.attacks.distributed.SpreadOracle` does: rows
  round-robin, every key's share sent at once, each key paced at 4 requests
  per second (the harness's 40 per second over 10 keys), one row per request;
  a key refused by the policy drops out and its unanswered rows go to the keys
  still alive in the next round;
- the policy's default ladder on ``ood`` alone: a row whose score reaches
  ``block_at`` (1.5) times the threshold is refused and blocks its key, as
  does a third flag (``block_after_flags``);
- honest keys replay the held-out half (``evaluation.benign`` habits: Poisson
  arrivals with bursts and pauses, near-duplicate runs at 0.5% of each
  feature's span, 3% of requests retried 50 to 500 ms later).

Rows are scored in batches of those arriving within ``BATCH_S`` of the
batch's first, with millisecond arrival times, as a worker polling Kafka does.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors._binomial import upper_tail
from detectors._cohort import Pooled
from detectors.calibration import calibrate
from detectors.ood import OodParams, OutOfDistributionDetector
from detectors.registry import build_detectors
from evaluation.attacks.equation import EquationParams, equation_queries, solve
from evaluation.benign import BenignProfile, arrival_plan
from gateway.validation import FeatureScale, feature_scale
from gateway.zoo import (
    BREAST_CANCER,
    _signature,
    breast_cancer_split,
    declared_range,
)

Array = npt.NDArray[Any]

T0 = 1.7e9
BATCH_S = 0.01
"""Rows arriving within this many seconds of a batch's first are one batch."""
KEY_RATE_PER_S = 4.0
"""Each attack key's pace: the harness's 40 per second over 10 keys."""
JITTER_S = 0.03
"""Arrivals late by up to this (thread start, producer batching)."""
REPLY_S = 0.01
"""From a round's last arrival to the attacker's next round."""
BLOCK_AT = 1.5
FLAG_AT = 1.0
BLOCK_AFTER_FLAGS = 3


@dataclass(frozen=True)
class Setup:
    """The breast-cancer model as a worker sees it."""

    scale: FeatureScale
    reference: Array
    x_test: Array
    clip: tuple[float, float]
    model: Any


@cache
def setup() -> Setup:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    split = breast_cancer_split()
    value_range = declared_range(np.concatenate([split.x_train, split.x_test]))
    signature = _signature(
        BREAST_CANCER, "features", split.x_train.shape[1], value_range
    )
    scale = feature_scale(signature, split.x_train)
    reference = scale.apply(split.x_train)
    model = Pipeline(
        [("scale", StandardScaler()), ("lr", LogisticRegression(max_iter=2000))]
    )
    model.fit(split.x_train, split.y_train)
    return Setup(
        scale=scale,
        reference=reference,
        x_test=split.x_test,
        clip=value_range,
        model=model,
    )


CALIBRATE = True
"""Whether :func:`detector` takes the parameters a worker calibrates on the
reference (about 40 s on a shared 2-core machine, once per process). The
tests turn it off: for breast cancer the calibration leaves ``ood``'s
parameters as they are (``_main`` prints them first)."""


@cache
def calibrated_params() -> dict[str, Any]:
    """``ood``'s parameters from :func:`detectors.calibration.calibrate`."""
    reference = setup().reference
    calibration = calibrate(lambda o: build_detectors(o, seed=0), {}, reference)
    return dict(calibration.params.get("ood", {}))


def detector(**params: Any) -> OutOfDistributionDetector:
    """A fresh ``ood`` as a worker builds it for breast cancer, with ``params``
    over the calibrated ones."""
    s = setup()
    base = calibrated_params() if CALIBRATE else {}
    built = OutOfDistributionDetector(OodParams(**{**base, **params}), seed=0)
    built.learn_baseline(s.reference)
    return built


def attack_points(seed: int) -> Array:
    """The equation-solving queries of an evaluation run with ``seed``
    (raw inputs): the public pool's first row, as ``build_task`` draws it."""
    s = setup()
    order = np.random.default_rng(seed).permutation(len(s.x_test))
    sample = s.x_test[order[0]]
    return equation_queries(sample, EquationParams(clip=s.clip, seed=seed))


# -- the replay ---------------------------------------------------------------


@dataclass
class _KeyVerdicts:
    flags: int = 0
    blocked: bool = False
    first_flag: int = 0  # 1-based row of the key's first flag, 0: none
    rows: int = 0
    max_ratio: float = 0.0
    evidence: str = ""


@dataclass
class SpreadAttack:
    """Equation solving spread round-robin over ``n_keys`` keys."""

    points: Array
    n_keys: int
    start_s: float
    rng: np.random.Generator
    prefix: str = "thief"
    alive: list[bool] = field(init=False)
    pending: list[int] = field(init=False)
    answered: list[int] = field(default_factory=list)
    in_flight: int = 0
    _next_key: int = 0
    _slot: list[float] = field(init=False)
    _round: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.alive = [True] * self.n_keys
        self.pending = list(range(len(self.points)))
        self._slot = [self.start_s] * self.n_keys

    def key(self, k: int) -> str:
        return f"{self.prefix}-{k}"

    def start_round(self, now_s: float) -> list[tuple[float, str, int]]:
        """The round's requests: (arrival time, key, row index)."""
        live = [k for k in range(self.n_keys) if self.alive[k]]
        if not self.pending or not live:
            return []
        out = []
        for i, row in enumerate(self.pending):
            k = live[(self._next_key + i) % len(live)]
            slot = max(now_s, self._slot[k])
            self._slot[k] = slot + 1.0 / KEY_RATE_PER_S
            out.append(
                (slot + float(self.rng.uniform(0.0, JITTER_S)), self.key(k), row)
            )
        self._next_key = (self._next_key + len(self.pending)) % len(live)
        self.pending = []
        self.in_flight = len(out)
        return out


def replay(
    ood: OutOfDistributionDetector,
    honest: dict[str, tuple[Array, Array]],
    attacks: list[SpreadAttack],
    batch_s: float = BATCH_S,
) -> dict[str, _KeyVerdicts]:
    """Every request in arrival order, in batches; returns each key's
    verdicts. ``honest`` maps a key to its (arrival times, raw rows)."""
    s = setup()
    threshold = ood.params.threshold
    seq = itertools.count()
    heap: list[tuple[float, int, str, Array, SpreadAttack | None, int]] = []
    for key, (times, rows) in honest.items():
        for t, row in zip(times.tolist(), rows, strict=True):
            heapq.heappush(heap, (t, next(seq), key, row, None, -1))

    def push_round(attack: SpreadAttack, now_s: float) -> None:
        for t, key, index in attack.start_round(now_s):
            row = attack.points[index]
            heapq.heappush(heap, (t, next(seq), key, row, attack, index))

    for attack in attacks:
        push_round(attack, attack.start_s)
    verdicts: dict[str, _KeyVerdicts] = {}
    while heap:
        first = heap[0][0]
        batch = []
        while heap and heap[0][0] < first + batch_s:
            batch.append(heapq.heappop(heap))
        # A blocked attack key sends nothing more (it saw the refusal a
        # reply earlier, a quarter second before its next slot); its row
        # goes back to the attacker.
        sent = []
        for item in batch:
            _, _, key, _, attack, index = item
            if attack is not None and verdicts.get(key, _KeyVerdicts()).blocked:
                attack.pending.append(index)
                attack.in_flight -= 1
                continue
            sent.append(item)
        if sent:
            ids = [item[2] for item in sent]
            X = s.scale.apply(np.vstack([item[3] for item in sent]))
            times = np.floor(np.array([item[0] for item in sent]) * 1e3) / 1e3
            learn = [not (verdicts.get(k, _KeyVerdicts()).flags > 0) for k in ids]
            scores = ood.score_batch(ids, X, learn=learn, arrival_s=times)
            for item, score in zip(sent, scores, strict=True):
                _, _, key, _, attack, index = item
                v = verdicts.setdefault(key, _KeyVerdicts())
                v.rows += 1
                ratio = score.score / threshold if score.warm else 0.0
                if ratio > v.max_ratio:
                    v.max_ratio, v.evidence = ratio, score.evidence
                refused = v.blocked
                if not refused and ratio >= FLAG_AT:
                    v.flags += 1
                    v.first_flag = v.first_flag or v.rows
                    if ratio >= BLOCK_AT or v.flags >= BLOCK_AFTER_FLAGS:
                        v.blocked = refused = True
                if attack is not None:
                    attack.in_flight -= 1
                    if refused:
                        attack.alive[int(key.rsplit("-", 1)[1])] = False
                        attack.pending.append(index)
                    else:
                        attack.answered.append(index)
        end = max(item[0] for item in batch)
        for attack in attacks:
            if attack.in_flight == 0 and attack.pending:
                push_round(attack, end + REPLY_S)
    return verdicts


@dataclass(frozen=True)
class AttackOutcome:
    seed: int
    answered: int
    refused_keys: int
    refused_at: list[int]  # per key, the row it was refused at (0: never)
    agreement: float
    through_cohort: int  # keys whose highest score came from their cohort


def run_attack(seed: int, **params: Any) -> AttackOutcome:
    ood = detector(**params)
    attack = SpreadAttack(attack_points(seed), 10, T0, np.random.default_rng([seed, 1]))
    verdicts = replay(ood, {}, [attack])
    return _outcome(seed, attack, verdicts)


def _outcome(
    seed: int, attack: SpreadAttack, verdicts: dict[str, _KeyVerdicts]
) -> AttackOutcome:
    s = setup()
    keys = [attack.key(k) for k in range(attack.n_keys)]
    got = sorted(attack.answered)
    agree = 0.0
    if len(got) >= 2:
        proba = s.model.predict_proba(attack.points[got])
        recovered = solve(attack.points[got], proba)
        truth = s.model.predict(s.x_test)
        agree = float(np.mean(recovered.predict(s.x_test) == truth))
    return AttackOutcome(
        seed=seed,
        answered=len(got),
        refused_keys=sum(verdicts[k].blocked for k in keys if k in verdicts),
        refused_at=[
            verdicts[k].rows if k in verdicts and verdicts[k].blocked else 0
            for k in keys
        ],
        agreement=agree,
        through_cohort=sum(
            "keys whose first query" in verdicts[k].evidence
            for k in keys
            if k in verdicts
        ),
    )


# -- honest keys ----------------------------------------------------------------


def honest_key(
    rng: np.random.Generator,
    start_s: float,
    *,
    rate_per_s: float | None = None,
    n_queries: tuple[int, int] = (40, 80),
) -> tuple[Array, Array]:
    """One honest key's (arrival times, raw rows): held-out rows in random
    order with the evaluation's habits."""
    s = setup()
    rate = (
        float(np.clip(rng.lognormal(np.log(1.5), 0.45), 0.3, 10.0))
        if rate_per_s is None
        else rate_per_s
    )
    profile = BenignProfile(
        rate_per_s=rate,
        n_queries=int(rng.integers(n_queries[0], n_queries[1] + 1)),
        start_delay_s=0.0,
    )
    replay_rows = s.x_test[rng.permutation(len(s.x_test))]
    spans = np.ptp(s.x_test, axis=0)
    duplicates = rng.random() < 1 / 3
    retries = rng.random() < 1 / 3
    times: list[float] = []
    rows: list[Array] = []
    position = 0
    for at_s, size in arrival_plan(profile, rng):
        for j in range(size):
            row = replay_rows[position % len(replay_rows)]
            position += 1
            sent = at_s + (rng.uniform(0.0, 0.003) if j else 0.0)
            times.append(sent)
            rows.append(row)
            if duplicates and rng.random() < 0.05:
                for _ in range(int(rng.integers(3, 9)) - 1):
                    noisy = row + rng.normal(0.0, 0.005 * spans, row.shape)
                    sent += float(rng.exponential(1.0 / rate))
                    times.append(sent)
                    rows.append(np.clip(noisy, *s.clip))
            if retries and rng.random() < 0.03:
                times.append(sent + rng.uniform(0.05, 0.5))
                rows.append(row)
    order = np.argsort(times, kind="stable")
    return start_s + np.asarray(times)[order], np.asarray(rows)[order]


@dataclass
class Looks:
    """What the honest keys' looks for a cohort found: how many looks, and
    the most unlikely pooled count among cohorts of ``cohort_min_keys``."""

    looks: int = 0
    counted_cohorts: int = 0
    lowest_tail: float = 1.0
    share_at_lowest: float = 0.0


def restart(
    n_keys: int, seed: int, **params: Any
) -> tuple[dict[str, _KeyVerdicts], Looks]:
    """A worker restarted without state: ``n_keys`` honest keys' first
    requests within one second."""
    rng = np.random.default_rng([seed, n_keys])
    streams = {
        f"honest-{k}": honest_key(rng, T0 + rng.uniform(0.0, 1.0))
        for k in range(n_keys)
    }
    ood = detector(**params)
    looks = Looks()
    # Every look goes through the detector's index of young keys.
    index = ood._cohort_index
    assert index is not None
    real_pool = index.pool

    def recording(*args: Any) -> npt.NDArray[np.int64]:
        sums = real_pool(*args)
        found = Pooled(sums[0], sums[1], sums[2])
        looks.looks += len(found.keys)
        big = found.keys >= ood.params.cohort_min_keys
        if big.any():
            looks.counted_cohorts += int(big.sum())
            tail = upper_tail(found.total_b[big], found.total_a[big], ood.honest_rate)
            at = int(np.argmin(tail))
            if tail[at] < looks.lowest_tail:
                looks.lowest_tail = float(tail[at])
                looks.share_at_lowest = float(
                    found.total_b[big][at] / found.total_a[big][at]
                )
        return sums

    # A recording wrapper in its place, for this detector only.
    index.pool = recording  # type: ignore[method-assign,assignment]
    return replay(ood, streams, [], batch_s=0.05), looks


def alongside(
    seed: int, n_honest: int = 20, **params: Any
) -> tuple[AttackOutcome, dict[str, _KeyVerdicts]]:
    """An equation cohort with ``n_honest`` honest keys started within
    0.25 s of it, Poisson at the attack keys' pace."""
    rng = np.random.default_rng([seed, 2])
    streams = {
        f"honest-{k}": honest_key(
            rng, T0 + rng.uniform(0.0, 0.25), rate_per_s=KEY_RATE_PER_S
        )
        for k in range(n_honest)
    }
    attack = SpreadAttack(attack_points(seed), 10, T0, np.random.default_rng([seed, 1]))
    verdicts = replay(detector(**params), streams, [attack])
    honest = {k: v for k, v in verdicts.items() if k.startswith("honest")}
    return _outcome(seed, attack, verdicts), honest


def _flagged(verdicts: dict[str, _KeyVerdicts]) -> list[str]:
    return [k for k, v in verdicts.items() if v.flags > 0]


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohort-window-s", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--set", nargs=2, action="append", metavar=("PARAM", "VALUE"))
    parser.add_argument("--restart-keys", type=int, nargs="*", default=[500, 2000])
    parser.add_argument("--alongside-runs", type=int, default=20)
    args = parser.parse_args()
    params: dict[str, Any] = {}
    if args.cohort_window_s is not None:
        params["cohort_window_s"] = args.cohort_window_s
    for key, value in args.set or []:
        params[key] = float(value)
    print("calibrated ood params:", calibrated_params())
    for seed in range(args.seeds):
        print(run_attack(seed, **params))
    for n in args.restart_keys:
        for seed in range(2):
            verdicts, looks = restart(n, seed, **params)
            worst = max(v.max_ratio for v in verdicts.values())
            flagged = _flagged(verdicts)
            print(
                f"restart {n} keys seed {seed}: {len(flagged)} flagged, "
                f"{sum(v.blocked for v in verdicts.values())} blocked, "
                f"highest ratio {worst:.2f}; {looks}",
                [verdicts[k].evidence for k in flagged[:3]],
            )
    n_flagged = n_blocked = n_total = 0
    for seed in range(args.alongside_runs):
        outcome, honest = alongside(seed, **params)
        flagged = _flagged(honest)
        n_flagged += len(flagged)
        n_blocked += sum(v.blocked for v in honest.values())
        n_total += len(honest)
        print(
            f"alongside seed {seed}: attack answered {outcome.answered}, "
            f"{outcome.refused_keys} keys refused; honest flagged {len(flagged)}",
            [honest[k].evidence for k in flagged[:2]],
        )
    print(
        f"alongside: {n_flagged} of {n_total} honest keys flagged, {n_blocked} blocked"
    )


if __name__ == "__main__":
    _main()
