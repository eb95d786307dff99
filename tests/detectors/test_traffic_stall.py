"""``traffic`` takes a wait for the gateway's answer out of a closed-loop
client's gaps once it is longer than ``STALL_S``: a client that waits for
each answer cannot send while the gateway stalls (Redis frozen, a worker
paused), and the gap that leaves is the gateway's, not the client's. Keys
that kept sending during the stall, and waits under ``STALL_S``, are
measured exactly as before."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detectors.traffic import STALL_S, TrafficDetector, TrafficParams

T0 = 1.7e9
ROUND_TRIP_S = 0.03


def _burstiness(detector: TrafficDetector, key: str) -> float:
    arena = detector._arena
    assert arena is not None
    return float(arena.arrays["features"][int(arena.slots([key])[0])][1])


def _send(
    detector: TrafficDetector,
    key: str,
    batches: list[tuple[npt.NDArray[np.float64], float | None]],
) -> None:
    """Each batch: its requests' arrival times and when they were answered
    (None: no answer time given, as in an offline replay)."""
    for times, answered in batches:
        detector.score_batch(
            [key] * len(times),
            np.zeros((len(times), 3)),
            learn=[True] * len(times),
            arrival_s=times,
        )
        detector.observe_outcomes(
            [key] * len(times),
            [False] * len(times),
            [False] * len(times),
            answered_s=answered,
        )


def _closed_loop(
    rng: np.random.Generator, n: int, stall_at: int, stall_s: float
) -> list[tuple[npt.NDArray[np.float64], float]]:
    """One request a batch, each sent a few ms after the previous answer;
    request ``stall_at`` answered ``stall_s`` late."""
    batches = []
    now = T0
    for i in range(n):
        now = round(now, 3)
        answered = now + ROUND_TRIP_S + (stall_s if i == stall_at else 0.0)
        batches.append((np.array([now]), answered))
        now = answered + float(rng.uniform(0.002, 0.02))
    return batches


def test_a_stalled_answer_is_not_the_closed_loop_clients_gap() -> None:
    batches = _closed_loop(np.random.default_rng(3), 64, stall_at=40, stall_s=15.0)
    with_answers, replay = TrafficDetector(), TrafficDetector()
    _send(with_answers, "k", batches)
    # The same arrivals without answer times: the 15 s gap is in them.
    _send(replay, "k", [(times, None) for times, _ in batches])
    assert _burstiness(replay, "k") > 4.0
    assert _burstiness(with_answers, "k") < 1.5


def test_waits_under_stall_s_and_open_loop_keys_are_measured_as_before() -> None:
    rng = np.random.default_rng(5)
    # Closed loop, answers slow but under STALL_S.
    slow = _closed_loop(rng, 64, stall_at=40, stall_s=STALL_S - 0.1)
    # Open loop through a 15 s stall: it keeps sending every 40 to 80 ms,
    # and what it sent meanwhile is answered in one batch after the stall.
    times = np.round(T0 + np.cumsum(rng.uniform(0.04, 0.08, 400)), 3)
    stall_from, stall_to = times[100], times[100] + 15.0
    batches: list[tuple[npt.NDArray[np.float64], float]] = []
    held = times[(times > stall_from) & (times <= stall_to)]
    for t in times[times <= stall_from]:
        batches.append((np.array([t]), float(t) + ROUND_TRIP_S))
    batches.append((held, float(stall_to) + 1.0))
    # Few enough after it that the window still holds the stall's arrivals.
    for t in times[times > stall_to][:10]:
        batches.append((np.array([t]), float(t) + ROUND_TRIP_S))
    for stream in (slow, batches):
        with_answers, replay = TrafficDetector(), TrafficDetector()
        _send(with_answers, "k", stream)
        _send(replay, "k", [(t, None) for t, _ in stream])
        assert with_answers.dump_state("k") is not None
        ring = with_answers._arena.arrays["times"]  # type: ignore[union-attr]
        assert np.array_equal(ring, replay._arena.arrays["times"])  # type: ignore[union-attr]
        assert _burstiness(with_answers, "k") == _burstiness(replay, "k")


def test_stall_s_is_a_live_parameter_and_zero_turns_the_rule_off() -> None:
    batches = _closed_loop(np.random.default_rng(3), 64, stall_at=40, stall_s=15.0)
    off = TrafficDetector(TrafficParams(stall_s=0.0))
    _send(off, "k", batches)
    assert _burstiness(off, "k") > 4.0
    # Raised live past the stall before it happens: the wait is the client's.
    above = TrafficDetector()
    _send(above, "k", batches[:30])
    above.set_params(stall_s=20.0)
    _send(above, "k", batches[30:])
    assert _burstiness(above, "k") > 4.0
    below = TrafficDetector()
    _send(below, "k", batches[:30])
    below.set_params(stall_s=10.0)
    _send(below, "k", batches[30:])
    assert _burstiness(below, "k") < 1.5
