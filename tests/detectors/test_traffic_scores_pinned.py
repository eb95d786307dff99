"""The timing detector ``traffic`` scores a fixed stream exactly as recorded.

``traffic`` and the per-client helpers every detector uses
(``detectors._state``, ``Detector._scores``) were made cheaper without meant
changes to what they compute. This test replays one seeded stream of arrival
times (Poisson clients at rates spread over a factor of ten, metronome bots,
a client that turns to bursts, requests of several rows sharing one time)
with outcomes shown after every batch (some clients often fail or are
refused) and some rows not allowed to teach the baseline, in batches of 1 to
600 rows, and compares every score, flag, warm bit and evidence sentence with
``data/traffic_scores.npz``, recorded with the code before the change
(commit 6334500) and recorded again when the cohort test came in: it flags
the metronomes ``bot-0`` and ``bot-1``, which start in the same instant,
earlier, and changed no other client's row. Recorded a third time when the
cohort evidence said "first rows" instead of "first requests": the
evidence of 37 rows of ``bot-0`` (22) and ``bot-1`` (15) changed in that
word only; every score, flag and warm bit stayed as recorded. The lower
member bar (``strong_member_z``) and the score's step past ``cohort_z``
(``cohort_step_z``) changed no row: the highest pooled z here is 5.9, under
``cohort_z`` 6, where both begin. Recorded a fourth time when the solo
test came in (``solo_z``): 297 rows changed, all of the three metronomes
``bot-0`` (110), ``bot-1`` (103) and ``bot-2`` (84), each now with the solo
test's evidence and score; ``bot-0`` is flagged from its 32nd row and
``bot-2`` from its 16th (neither was before), ``bot-1`` from its 16th as
before. No other client's row changed. The replay sets ``SOLO_Z`` (5),
the setting it was recorded with, whatever the default; it gives no answer
times, so the open-loop gate (``solo_min_overlaps``) never applies here.

It lives apart from ``test_extraction_scores_pinned.py`` because traffic
reads arrival times and outcomes, which the shared replay
(:func:`tests.detectors.pinning.replay`) does not pass, and that recording
must not be redone. Regenerate this one only for a change meant to alter
scores: ``python -m tests.detectors.test_traffic_scores_pinned``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from detectors.traffic import TrafficDetector, TrafficParams
from tests.detectors.pinning import assert_matches, batches, interleave

FIXTURE = Path(__file__).parent / "data" / "traffic_scores.npz"

SOLO_Z = 5.0
"""The solo test's bar the recording was made with. The replay gives no
answer times, so its keys are scored without the open-loop gate (unknown
is not closed loop)."""

# Batch sizes cycled over the stream: single rows, small and worker-sized
# batches, and one larger than a client's window many times over.
BATCH_SIZES = (1, 9, 600, 2, 64, 500, 5, 128, 1, 333)

Stream = tuple[
    list[str],
    npt.NDArray[np.float64],
    npt.NDArray[np.bool_],
    npt.NDArray[np.bool_],
    npt.NDArray[np.bool_],
]


def _stream() -> Stream:
    """Client ids, arrival times (s), learn, errored and rejected per row.

    Each client's rows carry (time, learn, errored, rejected); interleaving
    keeps each client's order, then times are sorted within a client so they
    never decrease, as Kafka record times do.
    """
    rng = np.random.default_rng(2468)
    streams: dict[str, list[npt.NDArray[np.float64]]] = {}

    def rows_of(
        name: str, times: npt.NDArray[np.float64], err: float, rej: float
    ) -> None:
        n = len(times)
        learn = rng.random(n) > 0.1
        errored = rng.random(n) < err
        rejected = rng.random(n) < rej
        # Some requests carry several rows, sharing the request's time.
        repeats = np.where(rng.random(n) < 0.1, rng.integers(2, 5, n), 1)
        row = np.stack([times, learn, errored, rejected], axis=1)
        streams[name] = list(np.repeat(row, repeats, axis=0))

    for c in range(24):  # honest: Poisson at rates from 0.3 to 3 per second
        rate = 10 ** rng.uniform(-0.5, 0.5)
        start = 1.7e9 + rng.uniform(0, 10)
        times = start + np.cumsum(rng.exponential(1.0 / rate, rng.integers(60, 220)))
        rows_of(f"honest-{c}", times, 0.02, 0.01)
    for c in range(3):  # metronomes, one with jitter below the tolerance
        step = 0.5 + c * 0.25
        times = 1.7e9 + np.arange(rng.integers(80, 200)) * step
        times += rng.normal(0.0, 0.005 * step, len(times)) * (c == 2)
        rows_of(f"bot-{c}", np.sort(times), 0.0, 0.0)
    for c in range(2):  # calm, then bursts of 5 ms gaps
        calm = 1.7e9 + np.cumsum(rng.exponential(1.0, 40))
        burst = calm[-1] + np.cumsum(rng.exponential(0.005, 120))
        rows_of(f"burst-{c}", np.concatenate([calm, burst]), 0.05, 0.0)
    for c in range(2):  # probers the gateway keeps failing and refusing
        times = 1.7e9 + np.cumsum(rng.exponential(0.8, 150))
        rows_of(f"prober-{c}", times, 0.4, 0.5)
    ids, rows = interleave(streams, rng)
    return (
        ids,
        rows[:, 0].copy(),
        rows[:, 1] > 0,
        rows[:, 2] > 0,
        rows[:, 3] > 0,
    )


def _scores() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.str_]]:
    """(n, 3) of score, flagged, warm per row, and each row's evidence."""
    ids, times, learn, errored, rejected = _stream()
    # The recording has the solo test on, whatever the default.
    detector = TrafficDetector(TrafficParams(solo_z=SOLO_Z), seed=0)
    X = np.zeros((len(ids), 3))
    out: list[tuple[float, bool, bool]] = []
    evidence: list[str] = []
    for part in batches(len(ids), BATCH_SIZES):
        scores = detector.score_batch(
            ids[part], X[part], learn=learn[part], arrival_s=times[part]
        )
        detector.observe_outcomes(ids[part], errored[part], rejected[part])
        out += [(s.score, s.flagged, s.warm) for s in scores]
        evidence += [s.evidence for s in scores]
    return np.asarray(out, dtype=np.float64), np.asarray(evidence)


def test_scores_match_recording() -> None:
    got, evidence = _scores()
    recorded = dict(np.load(FIXTURE))
    assert_matches({"traffic": got}, recorded, ("traffic",))
    assert evidence.tolist() == recorded["evidence"].tolist()


def test_stream_exercises_the_detector() -> None:
    """The recording is worth pinning: it flags some rows, leaves some warm
    rows unflagged, and its evidence names several features."""
    recorded = np.load(FIXTURE)
    flagged = recorded["traffic"][:, 1] > 0
    warm = recorded["traffic"][:, 2] > 0
    assert flagged.any() and (warm & ~flagged).any()
    named = {
        text.split(" against")[0].rsplit(" ", 1)[0] for text in recorded["evidence"]
    }
    assert {"regularity", "error share", "rejection share"} <= named


if __name__ == "__main__":
    scores, texts = _scores()
    np.savez_compressed(FIXTURE, traffic=scores, evidence=texts)
    print(f"wrote {FIXTURE}")
