"""``traffic``'s solo test scores only keys that send without waiting for
their answers (open loop) once it knows their answer times: a key paced
every 25 ms whose requests arrive while the previous one is in flight is
flagged; the same stream answered before each next arrival (a script
looping over its data, closed loop) is not. A key whose answer times the
detector never saw is scored as before (offline replays, the pinned
recording).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from detectors._state import StateBlob, decode_blob, encode_blob
from detectors.traffic import TrafficDetector, TrafficParams

T0 = 1.7e9
PERIOD_S = 0.025
ON = TrafficParams(solo_z=5.0, solo_min_overlaps=2)


def _paced(n: int) -> npt.NDArray[np.float64]:
    """A metronome at whole milliseconds, one request every 25 ms."""
    return np.round((T0 + np.arange(n) * PERIOD_S) * 1000.0) / 1000.0


def _run(
    detector: TrafficDetector,
    times: npt.NDArray[np.float64],
    *,
    round_trip_s: float | None,
    per_batch: int = 1,
    rows: int = 1,
    key: str = "key",
) -> list[bool]:
    """Send ``times`` as requests of ``rows`` rows, ``per_batch`` requests a
    batch; each batch answered ``round_trip_s`` after its last arrival (None:
    no answer times). Returns each row's flag."""
    flags: list[bool] = []
    for start in range(0, len(times), per_batch):
        part = times[start : start + per_batch]
        arrivals = np.repeat(part, rows)
        scores = detector.score_batch(
            [key] * len(arrivals),
            np.zeros((len(arrivals), 3)),
            learn=[False] * len(arrivals),
            arrival_s=arrivals,
        )
        flags += [s.flagged for s in scores]
        ids = [key] * len(part)
        answered = None if round_trip_s is None else float(part[-1]) + round_trip_s
        detector.observe_outcomes(
            ids, [False] * len(part), [False] * len(part), answered_s=answered
        )
    return flags


def _first(flags: list[bool]) -> int | None:
    return next((i + 1 for i, flag in enumerate(flags) if flag), None)


def test_a_paced_key_answered_after_its_next_send_is_flagged() -> None:
    """Round trips of 40 ms at a 25 ms pace: every request from the second
    on arrives before the previous answer, and the solo test flags it on
    its 16th row, when it is first judged."""
    flags = _run(TrafficDetector(ON, seed=0), _paced(40), round_trip_s=0.04)
    assert _first(flags) == 16


def test_the_same_stream_answered_before_each_next_send_is_not() -> None:
    """Answered 20 ms after each arrival, 5 ms before the next: as regular,
    but never an overlap, so never scored by the solo test."""
    detector = TrafficDetector(ON, seed=0)
    assert not any(_run(detector, _paced(200), round_trip_s=0.02))
    # The regularity is there: without the gate the same key is flagged.
    ungated = TrafficDetector(TrafficParams(solo_z=5.0, solo_min_overlaps=0))
    assert _first(_run(ungated, _paced(40), round_trip_s=0.02)) == 16


def test_a_key_with_no_answer_times_is_scored_as_before() -> None:
    """Unknown is not closed loop: without answer times (an offline replay)
    the solo test flags the metronome at its 16th row, as without the gate."""
    flags = _run(TrafficDetector(ON, seed=0), _paced(40), round_trip_s=None)
    assert _first(flags) == 16


def test_requests_of_one_key_in_one_batch_overlap_and_its_rows_do_not() -> None:
    """Four requests a batch, answered 1 ms after the batch's last: the
    first of each batch was sent after the last answer, the other three
    while the first was unanswered. A closed-loop key sending requests of
    three rows in one batch each has no overlap: rows of one request are
    one request."""
    batched = TrafficDetector(ON, seed=0)
    assert _first(_run(batched, _paced(40), round_trip_s=0.001, per_batch=4)) == 16
    multirow = TrafficDetector(ON, seed=0)
    assert not any(_run(multirow, _paced(120), round_trip_s=0.02, rows=3))


def test_solo_min_overlaps_changes_live() -> None:
    """A closed-loop key is flagged from the next row once the gate is off,
    and left alone again once it is back; an open-loop key whose window
    holds fewer overlaps than the bar is not scored."""
    detector = TrafficDetector(ON, seed=0)
    times = _paced(96)
    assert not any(_run(detector, times[:32], round_trip_s=0.02))
    detector.set_params(solo_min_overlaps=0)
    assert all(_run(detector, times[32:40], round_trip_s=0.02))
    detector.set_params(solo_min_overlaps=2)
    assert not any(_run(detector, times[40:48], round_trip_s=0.02))
    # Open loop from here: the first arrives after a 20 ms answer, the next
    # two before 40 ms ones; flagged once two overlaps are in the window.
    flags = _run(detector, times[48:56], round_trip_s=0.04)
    assert flags == [False, False] + [True] * 6
    detector.set_params(solo_min_overlaps=1024)
    assert not any(_run(detector, times[56:64], round_trip_s=0.04))
    with pytest.raises(ValueError, match="solo_min_overlaps"):
        detector.set_params(solo_min_overlaps=-1)


def test_answer_times_are_checked() -> None:
    detector = TrafficDetector(ON, seed=0)
    _run(detector, _paced(2), round_trip_s=0.04)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="answered_s"):
            detector.observe_outcomes(["key"], [False], [False], answered_s=bad)
    with pytest.raises(ValueError, match="answered_s"):
        detector.observe_outcomes(["key"], [False], [False], answered_s=[T0, T0 + 1.0])


def _forged(blob: bytes, name: str, value: npt.NDArray[np.generic]) -> bytes:
    decoded = decode_blob(blob)
    fields = dict(decoded.fields)
    fields[name] = value.tobytes()
    return encode_blob(
        StateBlob(
            decoded.format,
            decoded.detector,
            decoded.n_features,
            decoded.layout,
            fields,
        )
    )


def test_the_open_loop_state_round_trips_and_forged_values_are_refused() -> None:
    """The last answer time and the window of overlaps travel with the key:
    on the other worker its next row is still scored as open loop. A NaN or
    far-off answer time, or an overlap bit other than 0 or 1, is refused."""
    detector = TrafficDetector(ON, seed=0)
    times = _paced(24)
    assert _first(_run(detector, times[:23], round_trip_s=0.04)) == 16
    blob = detector.dump_state("key")
    assert blob is not None
    other = TrafficDetector(ON, seed=0)
    other.load_state("key", blob)
    assert other.dump_state("key") == blob
    assert _run(other, times[23:], round_trip_s=0.04) == [True]
    fields = decode_blob(blob).fields
    assert np.frombuffer(fields["answered_s"], "<f8")[0] == pytest.approx(
        float(times[22]) + 0.04
    )
    assert int(np.frombuffer(fields["overlapped"], "u1").sum()) == 22

    window = ON.window
    for name, value, match in (
        ("answered_s", np.array(np.nan, "<f8"), "answered_s"),
        ("answered_s", np.array(1e300, "<f8"), "answered_s"),
        ("overlapped", np.full(window, 2, "u1"), "overlapped"),
    ):
        fresh = TrafficDetector(ON, seed=0)
        with pytest.raises(ValueError, match=match):
            fresh.load_state("key", _forged(blob, name, value))
        assert fresh.dump_state("key") is None
