"""``traffic``'s cohort test at its edges: live parameter changes, times that
go backwards or repeat, and keys first seen at time 0 or before it."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from detectors._state import decode_blob
from detectors.traffic import TrafficDetector
from tests.detectors.test_traffic_cohort import _first_flag, _paced_keys, _play


def _thieves(start_s: float = 1.7e9, n: int = 15) -> dict[str, npt.NDArray[np.float64]]:
    streams = _paced_keys(10, 4.0, n, np.random.default_rng(1), stagger_s=0.005)
    return {key: times - 1.7e9 + start_s for key, times in streams.items()}


def _counts(detector: TrafficDetector, key: str) -> tuple[int, int, int]:
    """The key's request count, cohort pairs and matches."""
    fields = decode_blob(detector.dump_state(key) or b"").fields
    return tuple(  # type: ignore[return-value]
        int(np.frombuffer(fields[name], "<i8")[0])
        for name in ("n_seen", "pairs", "matches")
    )


def test_the_window_is_structural() -> None:
    detector = TrafficDetector(seed=0)
    with pytest.raises(ValueError, match="'window' cannot change while running"):
        detector.set_params(window=64)
    detector.set_params(window=32)  # re-applying the same value is accepted
    assert detector.params.window == 32


def test_a_window_of_zero_pauses_pooling_and_counting_goes_on() -> None:
    """Turned off, the test flags nobody but keeps each key's counts; turned
    back on, every later request is scored as if it had never been off."""
    streams = _thieves(n=12)
    head = {key: times[:8] for key, times in streams.items()}
    rest = {key: times[8:] for key, times in streams.items()}
    always = TrafficDetector(seed=0)
    _play(always, head)
    counted = [_counts(always, key) for key in streams]
    expected = _play(always, rest)
    detector = TrafficDetector(seed=0)
    detector.set_params(cohort_window_s=0.0)
    scores = _play(detector, head)
    assert not any(s.flagged for key in scores.values() for s in key)
    assert [_counts(detector, key) for key in streams] == counted
    assert counted[0][:2] == (8, 6)  # pairs of requests 3 to 8
    detector.set_params(cohort_window_s=0.25)
    assert _play(detector, rest) == expected
    assert any(s.flagged for key in expected.values() for s in key)


def test_a_live_tolerance_applies_to_the_next_pairs() -> None:
    """At 1% the thieves' arrivals, up to 30 ms late at 250 ms, rarely
    match; back at 10% the next pairs mostly do. Pairs already counted keep
    the verdict of the tolerance they were counted at."""
    detector = TrafficDetector(seed=0)
    detector.set_params(cohort_tolerance=0.01)
    streams = _thieves(n=20)
    scores = _play(detector, {key: times[:10] for key, times in streams.items()})
    assert not any(s.flagged for key in scores.values() for s in key)
    before = [_counts(detector, key) for key in streams]
    assert all(pairs == 8 and matches <= 3 for _, pairs, matches in before), before
    detector.set_params(cohort_tolerance=0.1)
    _play(detector, {key: times[10:] for key, times in streams.items()})
    after = [_counts(detector, key) for key in streams]
    new_pairs = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    new_matches = sum(a[2] - b[2] for a, b in zip(after, before, strict=True))
    assert new_pairs == [10] * 10
    assert new_matches >= 60, new_matches


def test_a_tolerance_that_leaves_no_gap_long_enough_counts_no_pair() -> None:
    """Gaps shorter than 0.001 / cohort_tolerance seconds cannot be told
    within the tolerance at millisecond times; at 0.4% that is 250 ms, so a
    key paced at exactly 4 per second (gaps of 250 ms) counts pairs and one
    a little faster does not."""
    detector = TrafficDetector(seed=0)
    detector.set_params(cohort_tolerance=0.004)
    start = 1.7e9
    for key, gap in (("at", 0.25), ("under", 0.249)):
        times = start + np.arange(10) * gap
        detector.score_batch([key] * 10, np.zeros((10, 3)), arrival_s=times)
    assert _counts(detector, "at")[1] == 8
    assert _counts(detector, "under")[1] == 0


@pytest.mark.parametrize("start_s", [0.0, -1000.0, -0.1])
def test_keys_first_seen_at_time_zero_or_before_pool_as_any(start_s: float) -> None:
    """A zeroed slot's first time is 0.0 too: nothing may take 0.0 for
    'no first request yet'. The same thieves are flagged at the same
    requests as at 1.7e9 s."""
    at_epoch = _play(TrafficDetector(seed=0), _thieves())
    scores = _play(TrafficDetector(seed=0), _thieves(start_s))
    firsts = [_first_flag(s) for s in scores.values()]
    assert firsts == [_first_flag(s) for s in at_epoch.values()]
    assert all(f is not None for f in firsts), firsts
    flagged = next(s for s in scores["thief-0"] if s.flagged)
    assert "10 keys" in flagged.evidence


def test_keys_at_zero_do_not_pool_with_unused_slots() -> None:
    """Two keys at time 0 beside hundreds of released (zeroed) slots: a
    cohort needs three keys, so neither is flagged."""
    detector = TrafficDetector(seed=0)
    crowd = [f"gone-{i}" for i in range(300)]
    detector.score_batch(crowd, np.zeros((300, 3)), arrival_s=np.full(300, 5.0))
    for key in crowd:
        detector.forget(key)
    streams = {k: v for k, v in _thieves(0.0).items() if k in ("thief-0", "thief-1")}
    scores = _play(detector, streams)
    assert not any(s.flagged for key in scores.values() for s in key)


def test_times_that_go_back_or_repeat_never_break_the_counts() -> None:
    """A hand-over can interleave two partitions' rows of one key, so its
    times may step back; rows of one request repeat a time. Neither may
    count a pair of its own, raise, or leave a state a hand-over refuses."""
    rng = np.random.default_rng(12)
    detector = TrafficDetector(seed=0)
    steady = 1.7e9 + np.arange(40) * 0.25
    shuffled = steady.copy()
    for i in range(0, 40, 5):  # every fifth pair of rows arrives swapped
        shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    repeated = np.repeat(steady[:20], 2)
    jumbled = 1.7e9 + rng.permutation(40) * 0.25
    for key, times in (
        ("swapped", shuffled),
        ("repeated", repeated),
        ("jumbled", jumbled),
    ):
        for start in range(0, 40, 7):
            part = times[start : start + 7]
            detector.score_batch(
                [key] * len(part), np.zeros((len(part), 3)), arrival_s=part
            )
        seen, pairs, matches = _counts(detector, key)
        assert 0 <= matches <= pairs <= max(0, min(seen, 32) - 2), (key, pairs)
        TrafficDetector(seed=0).load_state(key, detector.dump_state(key) or b"")
    # Rows sharing a time are one arrival: the repeated key's pairs are those
    # of its 20 distinct times within its first 32 rows (16 times, 14 pairs).
    assert _counts(detector, "repeated")[1:] == (14, 14)
