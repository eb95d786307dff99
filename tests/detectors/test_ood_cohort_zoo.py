"""``ood``'s cohort test on the real breast-cancer model, offline.

The replays of :mod:`tests.detectors.ood_cohort_sim` (equation solving spread
over ten keys as the evaluation's ``SpreadOracle`` does; honest keys with the
evaluation's habits), at sizes that keep this module to seconds. The numbers
in ``docs/ood-cohort.md`` come from the same replays at full size.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.detectors import ood_cohort_sim as sim


@pytest.fixture(autouse=True, scope="module")
def _uncalibrated() -> Iterator[None]:
    # For breast cancer the worker's calibration leaves ood's parameters as
    # they are; skipping it saves about 40 s.
    sim.CALIBRATE = False
    yield
    sim.CALIBRATE = True


def test_the_evaluation_seed_that_escaped_is_refused_on_every_key() -> None:
    before = sim.run_attack(2, cohort_window_s=0.0)
    assert before.answered == 31 and before.refused_keys == 6
    assert before.agreement == 1.0
    after = sim.run_attack(2)
    assert after.refused_keys == 10
    assert after.answered == 12
    assert after.agreement < 0.9
    assert sorted(after.refused_at) == [1, 1, 1, 1, 1, 1, 2, 2, 5, 7]


@pytest.mark.parametrize("seed", [0, 1, 3, 4])
def test_every_key_is_refused_within_its_first_two_queries(seed: int) -> None:
    outcome = sim.run_attack(seed)
    assert outcome.refused_keys == 10
    assert max(outcome.refused_at) <= 2, outcome
    assert outcome.answered <= 5, outcome
    assert outcome.through_cohort == 10


def test_a_worker_restart_flags_no_honest_key() -> None:
    verdicts, looks = sim.restart(2000, 0)
    assert not [k for k, v in verdicts.items() if v.flags], looks
    # The cohort test ran: hundreds of honest keys looked, and no pooled
    # count came near the 1e-4 it takes.
    assert looks.looks > 100
    assert looks.lowest_tail > 0.01


def test_honest_keys_started_with_the_thief_at_its_pace() -> None:
    # The honest risk, measured: 20 honest keys within 0.25 s of each of 20
    # thieves, at their pace. 7 of 400 flagged (those with a wide query among
    # their first two), 3 of them blocked; every thief key still refused.
    flagged = blocked = 0
    for seed in range(20):
        outcome, honest = sim.alongside(seed)
        assert outcome.refused_keys == 10
        flagged += sum(v.flags > 0 for v in honest.values())
        blocked += sum(v.blocked for v in honest.values())
    assert (flagged, blocked) == (7, 3)
