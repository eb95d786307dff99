"""Policy.decide_batch gives the verdicts of Policy.decide row by row, and the
scorer's bulk histogram observation counts what observe() would."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from detectors import DetectorScore
from gateway.config import PolicyConfig
from gateway.policy import Policy
from gateway.scoring import _observe_many

NAMES = ("ood", "prada", "margin", "traffic")


class Clock:
    """Advances a little at every reading, so decay differs row to row."""

    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        self.now_s += 0.37
        return self.now_s


def _columns(rng: np.random.Generator, n: int) -> list[list[DetectorScore]]:
    columns = []
    for j, name in enumerate(NAMES):
        threshold = [0.5, 1.0, 0.0, 2.0][j]
        column = []
        for row in range(n):
            score = float(rng.choice([0.0, -0.1, rng.uniform(0, 1.6 * (j + 1))]))
            warm = bool(rng.uniform() > 0.15)
            flagged = warm and threshold > 0 and score >= threshold
            column.append(
                DetectorScore(name, score, threshold, flagged, f"{name} {row}", warm)
            )
        columns.append(column)
    return columns


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_matches_row_by_row(seed: int) -> None:
    config = PolicyConfig.model_validate(
        {
            "risk_half_life_s": 30.0,
            "flag_half_life_s": 20.0,
            "detector_weights": {"prada": 0.5, "traffic": 2.0},
            "shadow_detectors": ["margin"],
            "plans": {"gold": {"flag_at": 1.4, "block_at": 3.0}},
        }
    )
    rng = np.random.default_rng(seed)
    n = 400
    columns = _columns(rng, n)
    clients = [f"c{int(i)}" for i in rng.integers(0, 12, n)]
    plans = [None if rng.uniform() < 0.6 else "gold" for _ in range(n)]

    one, many = Policy(config, clock=Clock()), Policy(config, clock=Clock())
    expected = [
        one.decide(
            clients[row],
            [column[row] for column in columns],
            model="m",
            plan=plans[row],
        )
        for row in range(n)
    ]
    got = many.decide_batch(clients, columns, model="m", plans=plans)

    assert got == expected
    assert {v.action for v in got} >= {"allow", "flag", "block"}
    for client in set(clients):
        assert many.dump_state(client) == one.dump_state(client)


def test_batch_with_a_detector_named_twice_merges_as_decide_does() -> None:
    config = PolicyConfig()
    twice = [
        [DetectorScore("ood", 0.9, 0.5, True, "a", True)],
        [DetectorScore("ood", 0.2, 0.5, False, "b", True)],
    ]
    expected = Policy(config, clock=Clock()).decide("c", [twice[0][0], twice[1][0]])
    got = Policy(config, clock=Clock()).decide_batch(["c"], twice, plans=[None])
    assert got == [expected]


def test_observe_many_counts_as_observe() -> None:
    registry = CollectorRegistry()
    buckets = (0.1, 0.5, 1.0)
    one = Histogram("one", "d", ["detector"], buckets=buckets, registry=registry)
    many = Histogram("many", "d", ["detector"], buckets=buckets, registry=registry)
    values = np.array([0.0, 0.1, 0.3, 0.5, 0.7, 1.0, 1.0, 0.05])
    for value in values.tolist():
        one.labels("ood").observe(value)
    _observe_many(many.labels("ood"), values)

    def samples(name: str) -> dict[str, float]:
        return {
            s.name.removeprefix(name) + s.labels.get("le", ""): s.value
            for metric in registry.collect()
            if metric.name == name
            for s in metric.samples
            if not s.name.endswith("_created")
        }

    assert samples("many") == pytest.approx(samples("one"))
    assert samples("many")["_bucket0.5"] == 5.0  # cumulative: 0, .05, .1, .3, .5
