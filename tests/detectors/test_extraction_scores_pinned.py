"""The extraction detectors ``prada`` and ``ood`` score a fixed stream exactly
as recorded.

Both were made cheaper without meant changes to what they detect. This test
replays one seeded stream (honest digits with near-duplicate runs, uniform
random queries, Papernot-like augmentation from a few seeds) in batches of
1 to 600 rows, through each detector alone and through both in the worker's
order, and compares every score, flag and warm bit with
``data/extraction_scores.npz``, recorded with the code before the change
(commit 5ef0c4c). Regenerate it only for a change meant to alter scores:
``python -m tests.detectors.test_extraction_scores_pinned``.
Re-recorded once since, for ``ood`` alone: its share counts only when the
count of outliers behind it is unlikely for an honest client (else 0), which
set 374 scores of honest rows below the threshold to 0; every flag and warm
bit stayed as recorded, and prada's recording is unchanged. And once more
for ``ood``'s ``lattice_block`` (a client with three off-lattice queries in
its window scores the block level): 24 rows of the Jacobian-like clients
changed, 8 of them newly flagged; no honest or uniform row changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from detectors import prada
from tests.detectors.pinning import assert_matches, interleave, replay

FIXTURE = Path(__file__).parent / "data" / "extraction_scores.npz"
PINNED = ("ood", "prada")
# Batch sizes cycled over the stream: single rows, small and worker-sized
# batches, and one above prada's 512-row chunk.
BATCH_SIZES = (1, 9, 600, 2, 64, 500, 5, 128, 1, 333)


def _stream() -> tuple[list[str], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Client ids, rows and reference rows of the pinned stream."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(4321)
    X = np.asarray(load_digits().data, dtype=np.float64) / 16.0
    order = rng.permutation(len(X))
    reference, pool = X[order[:1000]], X[order[1000:]]
    streams: dict[str, list[npt.NDArray[np.float64]]] = {}
    for c in range(10):  # honest, with near-duplicate runs of 2 to 10
        rows: list[npt.NDArray[np.float64]] = []
        length = int(rng.integers(40, 260))
        while len(rows) < length:
            row = pool[rng.integers(len(pool))]
            rows.append(row)
            if rng.random() < 0.15:
                copies = int(rng.integers(2, 11))
                noise = rng.normal(0.0, 0.01 * rng.random(), (copies, len(row)))
                rows.extend(np.clip(row + noise, 0.0, 1.0))
        streams[f"honest-{c}"] = rows
    for c in range(3):  # uniform random extraction queries
        streams[f"uniform-{c}"] = list(rng.random((int(rng.integers(80, 300)), 64)))
    for c in range(4):  # Papernot-like: seeds, then signed Jacobian-like steps
        points = [pool[i] for i in rng.integers(len(pool), size=10)]
        while len(points) < 250:
            grown = [
                np.clip(p + 0.1 * np.sign(rng.normal(size=p.shape)), 0.0, 1.0)
                for p in points
            ]
            points.extend(grown)
        streams[f"jacobian-{c}"] = points[:250]
    names, ordered = interleave(streams, rng)
    return names, ordered, reference


def _scores(together: bool) -> dict[str, npt.NDArray[np.float64]]:
    """Per detector, (n, 3) of score, flagged, warm for every row."""
    ids, X, reference = _stream()
    return replay(ids, X, reference, PINNED, BATCH_SIZES, together)


@pytest.mark.parametrize("together", [False, True], ids=["alone", "together"])
@pytest.mark.parametrize(
    "rows_per_position", [None, 0, 10**9], ids=["chosen", "by-position", "by-row"]
)
def test_scores_match_recording(
    together: bool, rows_per_position: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever way prada runs its growing-set rule (numpy steps per
    position, or a Python loop per row), the recording is matched."""
    if rows_per_position is not None:
        monkeypatch.setattr(prada, "_ROWS_PER_POSITION", rows_per_position)
    assert_matches(_scores(together), dict(np.load(FIXTURE)), PINNED)


def test_stream_exercises_every_detector() -> None:
    """The recording is worth pinning: each detector flags someone in it and
    leaves some honest rows unflagged, and prada tests some clients."""
    recorded = np.load(FIXTURE)
    for name in PINNED:
        assert recorded[name][:, 1].any(), name
        assert not recorded[name][:, 1].all(), name
    assert recorded["prada"][:, 2].any()


if __name__ == "__main__":
    np.savez_compressed(FIXTURE, **_scores(False))
    print(f"wrote {FIXTURE}")
