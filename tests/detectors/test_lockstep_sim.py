"""The lockstep-links measurement's rule on synthetic timelines.

``tests/detectors/lockstep_sim.py`` backs the negative result of
``docs/lockstep-links.md``; these check that its rule does what the doc says
on timelines small enough to reason about (no model is loaded).
"""

from __future__ import annotations

import numpy as np

from tests.detectors.lockstep_sim import (
    THIEF,
    CohortLinks,
    Event,
    closed_loop_events,
    honest_events,
    poisson_tail,
    replay,
)


def _lockstep(t0_s: float, rounds: int, rng: np.random.Generator) -> list[Event]:
    """Ten keys starting within 2 ms, then each round 4 paced requests per
    key and a shared 1 s silence, all resuming within 2 ms."""
    out: list[Event] = []
    start_s = t0_s
    for _ in range(rounds):
        ends = []
        for k in range(10):
            at_s = start_s + float(rng.uniform(0, 0.002))
            for _ in range(4):
                out.append((at_s, f"{THIEF}{k}", at_s + 0.02))
                at_s += float(rng.exponential(0.25))
            ends.append(at_s)
        start_s = max(ends) + 1.0
    return out


def test_poisson_tail() -> None:
    assert poisson_tail(0, 3.0) == 1.0
    assert abs(poisson_tail(1, 2.0) - (1 - np.exp(-2.0))) < 1e-12
    # Far in the tail the complement underflows; the first term answers.
    assert 0 < poisson_tail(40, 0.01) < 1e-100


def test_cohort_that_resumes_together_is_linked() -> None:
    rng = np.random.default_rng(0)
    events = honest_events(60, rng, horizon_s=80.0) + _lockstep(40.0, 2, rng)
    found = replay(events, CohortLinks())
    # The start cohort, confirmed by the first resumption (requests 41 to 50)
    # once its cluster closes, at the next request more than 10 ms later.
    assert found.all_ten_at is not None and 41 <= found.all_ten_at <= 52
    assert found.honest_links == 0
    assert found.honest_in_thief_group == 0


def test_cohort_starting_before_warm_up_is_not_linked() -> None:
    rng = np.random.default_rng(1)
    events = honest_events(60, rng, horizon_s=80.0) + _lockstep(40.0, 2, rng)
    # A worker that started at 20 s has not run 30 s when the keys start.
    assert replay(events, CohortLinks(), from_s=20.0).all_ten_at is None


def test_global_stalls_link_no_closed_loop_client() -> None:
    rng = np.random.default_rng(2)
    stalls = [(50.0, 2.0), (70.0, 2.0), (90.0, 2.0)]
    events = honest_events(30, rng, horizon_s=100.0) + closed_loop_events(
        15, rng, 100.0, stalls
    )
    assert replay(events, CohortLinks(min_clusters=2)).honest_links == 0
    # Without the rule on answers, the clients that resume on our answer
    # after each stall are linked: the rule is what keeps them apart.
    assert replay(events, CohortLinks(min_idle_s=0.0, min_clusters=2)).honest_links
