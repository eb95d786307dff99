"""Shared machinery of the pinned-score tests (``test_*_scores_pinned.py``):
interleave seeded per-client streams, cut them into batches of cycling
sizes, replay them through chosen detectors, and compare with a recording.

Each test module builds its own stream and names its detectors; what a
recording means and when to regenerate it is said there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from detectors.registry import build_detectors

Rows = npt.NDArray[np.float64]


def interleave(
    streams: dict[str, list[Rows]], rng: np.random.Generator
) -> tuple[list[str], Rows]:
    """Client ids and rows of ``streams`` interleaved at random, each
    client's rows kept in order."""
    names = [name for name, rows in streams.items() for _ in rows]
    names = [names[i] for i in rng.permutation(len(names))]
    cursor = dict.fromkeys(streams, 0)
    ordered = []
    for name in names:
        ordered.append(streams[name][cursor[name]])
        cursor[name] += 1
    return names, np.asarray(ordered)


def batches(n: int, sizes: Sequence[int]) -> list[slice]:
    """Consecutive slices of ``n`` rows whose sizes cycle through ``sizes``."""
    out, start, i = [], 0, 0
    while start < n:
        size = sizes[i % len(sizes)]
        out.append(slice(start, min(start + size, n)))
        start += size
        i += 1
    return out


def replay(
    ids: list[str],
    X: Rows,
    reference: Rows,
    names: Sequence[str],
    sizes: Sequence[int],
    together: bool,
) -> dict[str, Rows]:
    """Per detector, (n, 3) of score, flagged, warm for every row.

    ``together`` runs the detectors batch by batch in the worker's order;
    otherwise each detector replays the whole stream alone.
    """
    detectors = build_detectors({}, seed=0)
    chosen = {name: detectors[name] for name in names}
    for detector in chosen.values():
        detector.learn_baseline(reference)
    out: dict[str, list[tuple[float, bool, bool]]] = {name: [] for name in chosen}
    parts = batches(len(ids), sizes)
    if together:
        for part in parts:
            for name, detector in chosen.items():
                scores = detector.score_batch(ids[part], X[part])
                out[name] += [(s.score, s.flagged, s.warm) for s in scores]
    else:
        for name, detector in chosen.items():
            for part in parts:
                scores = detector.score_batch(ids[part], X[part])
                out[name] += [(s.score, s.flagged, s.warm) for s in scores]
    return {name: np.asarray(rows, dtype=np.float64) for name, rows in out.items()}


def assert_matches(
    got: dict[str, Rows], recorded: dict[str, Rows], names: Sequence[str]
) -> None:
    """Scores equal the recording within 1e-12, flags and warm bits exactly."""
    for name in names:
        want = recorded[name]
        assert got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name][:, 0], want[:, 0], rtol=0, atol=1e-12)
        assert np.array_equal(got[name][:, 1:], want[:, 1:]), name
