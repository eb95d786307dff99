"""``traffic``'s solo test: a single key paced at one request every 25 ms is
flagged within its first 32 rows at any phase of its millisecond stamps,
in producer batches and with sends split 0/50 ms, while honest keys (Poisson,
the evaluation's habits, requests of several rows) are not.

The stamp models and the honest populations are in
:mod:`tests.detectors.solo_scenarios`, which also prints the numbers in
docs/traffic-solo.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detectors._state import StateBlob, decode_blob, encode_blob
from detectors._traffickernels import solo_counts
from detectors.traffic import TrafficDetector, TrafficParams
from tests.detectors.solo_scenarios import (
    T0,
    first_rows,
    honest_habits,
    honest_solo_z,
    paced,
    phases,
    poisson,
    recorded_stream,
)
from tests.detectors.test_extraction import one_client

ON = TrafficParams(solo_z=5.0)
"""The solo test at its measured bar (also the default)."""

STAMPS: dict[str, dict[str, Any]] = {
    "exact": {},
    "late up to 2 ms": {"late_s": 0.002},
    "late up to 10 ms": {"late_s": 0.01},
    "5 ms producer batches": {"late_s": 0.002, "batched": True},
    "batches, 10% of sends split 0/50 ms": {
        "late_s": 0.002,
        "batched": True,
        "split_share": 0.1,
    },
}


@pytest.mark.parametrize("stamps", STAMPS)
def test_a_paced_key_is_flagged_by_row_32_at_every_phase(stamps: str) -> None:
    """Every whole-millisecond phase 0 to 24 ms against the record clock:
    flagged by its 32nd row (the 16th or 24th at most phases). The 5%
    regularity band held none of these keys' windows at some phases."""
    rng = np.random.default_rng(3)
    rows = phases(ON, lambda at: paced(at, 40, rng, **STAMPS[stamps]))
    flags = [flag for flag, _ in rows]
    assert all(flag is not None and flag <= 32 for flag in flags), flags
    if stamps in ("exact", "5 ms producer batches"):
        # All 31 gaps in the band: z past 6.5, the block level, at once.
        assert all(block == flag for flag, block in rows), rows


def test_the_evaluations_missed_key_is_flagged_and_blocked_at_row_24() -> None:
    """The evaluation's paced learner as the worker saw it, gaps of 11 to 45
    ms around 26: the regularity feature (off here: no warm baseline) and
    the pair counts saw too little; the solo test flags it at its 24th row
    at z 6.7, past the block level."""
    stream = recorded_stream()
    assert first_rows(ON, stream) == (24, 24)
    # On by default (see TrafficParams.solo_z); 0 turns it off.
    assert first_rows(TrafficParams(), stream) == (24, 24)
    assert first_rows(TrafficParams(solo_z=0.0), stream) == (None, None)


@pytest.mark.parametrize(
    ("label", "streams"),
    [
        ("restart of 2,000 keys", lambda: honest_habits(2000, 2000, multirow=False)),
        ("1,000 keys of 1-8 rows", lambda: honest_habits(1000, 1000, multirow=True)),
        ("2,000 Poisson keys", lambda: poisson(0, 2000)),
    ],
)
def test_honest_keys_are_not_flagged(label: str, streams: object) -> None:
    """Measured when written: highest solo z 3.95, 3.62 and 4.85."""
    assert callable(streams)
    flagged, highest = honest_solo_z(ON, streams())
    assert flagged == 0, label
    assert 2.0 < highest < ON.solo_z, (label, highest)


def test_the_count_is_the_gaps_within_the_band_of_their_median() -> None:
    """Known answers: gaps 20, 25, 25, 30, 40 ms (median 25, band 18.75 to
    31.25 ms) give 4 of 5; a request's rows (gap 0) are one arrival; a
    median under 4 ms (0.001 s over 25%) is not scored (-1)."""
    window = np.full(8, np.nan)
    window[2:] = T0 + np.cumsum([0, 20, 25, 25, 30, 40]) / 1000.0
    several = np.full(8, np.nan)
    several[1:] = T0 + np.cumsum([0, 20, 0, 25, 25, 30, 40]) / 1000.0
    burst = T0 + np.cumsum(np.full(8, 0.003))
    counts = solo_counts(np.stack([window, several, burst]), 0.25)
    assert counts.tolist() == [[5, 4], [5, 4], [7, -1]]


def test_the_solo_parameters_change_live() -> None:
    """solo_z 0 turns the test off from the next row; back on, the key's
    held z (from its last judgement) flags again; a wider band or a lower
    rate applies at the next judgement."""
    detector = TrafficDetector(ON, seed=0)
    stream = paced(0.0003, 40, np.random.default_rng(0), late_s=0.002)
    first = one_client(detector, "key", stream[:16])
    assert first[-1].flagged and "beyond chance" in first[-1].evidence
    detector.set_params(solo_z=0.0)
    assert not one_client(detector, "key", stream[16:17])[0].flagged
    detector.set_params(solo_z=5.0, solo_step_z=1.0)
    again = one_client(detector, "key", stream[17:18])[0]
    assert again.flagged and again.score == pytest.approx(0.999)

    # A Poisson key under solo_z, flagged once the rate is set below what
    # its windows hold.
    rng = np.random.default_rng(1)
    honest = T0 + np.cumsum(rng.exponential(0.2, 48))
    detector = TrafficDetector(ON, seed=0)
    assert not any(s.flagged for s in one_client(detector, "h", honest[:32]))
    detector.set_params(solo_match_rate=0.01, solo_tolerance=0.5)
    assert one_client(detector, "h", honest[32:40])[-1].flagged


def test_solo_z_round_trips_and_a_forged_one_is_refused() -> None:
    """The held solo z travels with the key: its next row, not judged, is
    flagged on the other worker. A NaN or infinite one is refused whole."""
    detector = TrafficDetector(ON, seed=0)
    one_client(detector, "key", paced(0.0, 24, np.random.default_rng(0)))
    blob = detector.dump_state("key")
    assert blob is not None
    other = TrafficDetector(ON, seed=0)
    other.load_state("key", blob)
    assert other.dump_state("key") == blob
    assert one_client(other, "key", np.array([T0 + 24 * 0.025]))[0].flagged

    decoded = decode_blob(blob)
    assert np.frombuffer(decoded.fields["solo_z"], "<f8")[0] > 6.5
    for bad in (np.nan, np.inf, -np.inf):
        fields = dict(decoded.fields)
        fields["solo_z"] = np.array(bad, dtype="<f8").tobytes()
        forged = encode_blob(
            StateBlob(
                decoded.format,
                decoded.detector,
                decoded.n_features,
                decoded.layout,
                fields,
            )
        )
        fresh = TrafficDetector(ON, seed=0)
        with pytest.raises(ValueError, match="solo_z"):
            fresh.load_state("key", forged)
        assert fresh.dump_state("key") is None
