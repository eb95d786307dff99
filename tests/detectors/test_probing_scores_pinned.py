"""The probing detectors score a fixed stream exactly as recorded.

``similarity``, ``knn``, ``structure`` and ``fingerprint`` were made cheaper
(shared distances, fewer numpy calls) without meant changes to what they
detect. This test replays one seeded stream (honest digits with
re-submission runs, a HopSkipJump-like walk, a one-pixel-like search, a
search spread over three keys) in batches of several sizes, through each
detector alone and through all four in the worker's order, and compares every
score, flag and warm bit with ``data/probing_scores.npz``, recorded with the
code before the change (commit 3bcc719). Regenerate it only for a change
meant to alter scores: ``python -m tests.detectors.test_probing_scores_pinned``.
Re-recorded once since, for ``structure`` alone: its shares count only when
their counts are unlikely at the reference's honest rates (else 0), which set
244 scores below the threshold to 0; every flag and warm bit stayed as
recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tests.detectors.pinning import assert_matches, interleave, replay

FIXTURE = Path(__file__).parent / "data" / "probing_scores.npz"
PROBING = ("similarity", "knn", "structure", "fingerprint")
# Batch sizes cycled over the stream: single rows, small and worker-sized
# batches, and one above the 512-row chunk of the distance code.
BATCH_SIZES = (1, 7, 64, 500, 3, 600, 128)


def _stream() -> tuple[list[str], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Client ids, rows and reference rows of the pinned stream."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(1234)
    X = np.asarray(load_digits().data, dtype=np.float64) / 16.0
    order = rng.permutation(len(X))
    reference, pool = X[order[:1200]], X[order[1200:]]
    streams: dict[str, list[npt.NDArray[np.float64]]] = {}
    for c in range(12):  # honest, with re-submission runs of 3 to 8
        rows: list[npt.NDArray[np.float64]] = []
        while len(rows) < 150:
            row = pool[rng.integers(len(pool))]
            rows.append(row)
            if rng.random() < 0.1:
                copies = int(rng.integers(3, 9))
                noise = rng.normal(0.0, 0.005, (copies, len(row)))
                rows.extend(np.clip(row + noise, 0.0, 1.0))
        streams[f"honest-{c}"] = rows
    for c in range(2):  # HopSkipJump-like: binary searches and noisy steps
        x = pool[rng.integers(len(pool))].copy()
        target = pool[rng.integers(len(pool))]
        rows = []
        for _ in range(200):
            if rng.random() < 0.5:
                alpha = rng.random()
                rows.append(np.clip(alpha * x + (1 - alpha) * target, 0.0, 1.0))
            else:
                x = np.clip(x + rng.normal(0.0, 0.01, x.shape), 0.0, 1.0)
                rows.append(x.copy())
        streams[f"hsj-{c}"] = rows
    base = pool[rng.integers(len(pool))]
    rows = []
    for _ in range(200):  # one-pixel-like: 1 to 2 features set anew
        row = base.copy()
        row[rng.integers(0, len(row), int(rng.integers(1, 3)))] = rng.random()
        rows.append(row)
    streams["pixel"] = rows
    centre = pool[rng.integers(len(pool))]
    for c in range(3):  # one search spread over three keys
        streams[f"spread-{c}"] = [
            np.clip(centre + rng.normal(0.0, 0.01, centre.shape), 0.0, 1.0)
            for _ in range(60)
        ]
    names, ordered = interleave(streams, rng)
    return names, ordered, reference


def _scores(together: bool) -> dict[str, npt.NDArray[np.float64]]:
    """Per detector, (n, 3) of score, flagged, warm for every row."""
    ids, X, reference = _stream()
    return replay(ids, X, reference, PROBING, BATCH_SIZES, together)


@pytest.mark.parametrize("together", [False, True], ids=["alone", "together"])
def test_scores_match_recording(together: bool) -> None:
    assert_matches(_scores(together), dict(np.load(FIXTURE)), PROBING)


def test_stream_exercises_every_detector() -> None:
    """The recording is worth pinning: each detector flags someone in it and
    leaves some honest rows unflagged."""
    recorded = np.load(FIXTURE)
    for name in PROBING:
        assert recorded[name][:, 1].any(), name
        assert not recorded[name][:, 1].all(), name


if __name__ == "__main__":
    np.savez_compressed(FIXTURE, **_scores(False))
    print(f"wrote {FIXTURE}")
