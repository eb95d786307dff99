"""The statistics behind the poisoning guard's record checks
(:mod:`detectors.poisoning`): per-feature tails of the reference
(``rarity``), the features' scaling for the spectral test, and the top
direction of a Gram matrix by power iteration, alone or for a stack of
them, with the spectral scores of Tran, Li and Madry (NeurIPS 2018).

Imports numpy only; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Smallest per-feature spread used to scale features for the spectral test,
# as a share of the median spread: a feature constant in the reference (a
# corner pixel) would otherwise divide by zero.
_SPAN_FLOOR_SHARE = 0.1

# Power iteration for the top direction: stop when no coordinate moves more
# than the tolerance, or after this many products (a tiny eigengap: then the
# top two directions are about equally strong and either serves).
_POWER_ITERATIONS = 300
_POWER_TOLERANCE = 1e-9


class _Rarity:
    """Per-feature tails of the reference sample."""

    def __init__(self, reference: FloatArray) -> None:
        self._reference = reference
        self._n = len(reference)

    def rare_features(self, row: FloatArray, share: float) -> npt.NDArray[np.int64]:
        """Indices of the features where at most ``share`` of the reference
        lies at or beyond ``row``'s value, on its side."""
        # One comparison per reference value: O(n d), a few tens of
        # microseconds for the zoo's references, and no per-feature loop.
        at_or_above = (self._reference >= row).sum(axis=0)
        at_or_below = (self._reference <= row).sum(axis=0)
        tail = np.minimum(at_or_above, at_or_below) / self._n
        return np.flatnonzero(tail <= share)


def top_direction(gram: FloatArray, start: FloatArray | None = None) -> FloatArray:
    """The top eigenvector of a (d, d) Gram matrix, by power iteration.

    Warm-started from ``start`` (the previous record's direction for the same
    class window, which one row barely moves), it converges in a few
    matrix-vector products; LAPACK's full ``eigh`` costs 0.7 ms on 64
    features (3 ms with a contended threaded BLAS), the products tens of
    microseconds. Cold, it starts from the column of the largest diagonal
    entry, which cannot be orthogonal to the top direction unless the matrix
    is zero there too.
    """
    if start is not None and float(np.linalg.norm(start)) > 0.0:
        v = start / np.linalg.norm(start)
    else:
        column = gram[:, int(np.argmax(np.diag(gram)))]
        norm = float(np.linalg.norm(column))
        if norm == 0.0:
            unit: FloatArray = np.eye(len(gram))[0]
            return unit
        v = column / norm
    for _ in range(_POWER_ITERATIONS):
        w = gram @ v
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return v
        w /= norm
        # A Gram matrix is positive semi-definite: no sign flips to allow for.
        done = float(np.abs(w - v).max()) < _POWER_TOLERANCE
        v = w
        if done:
            break
    return v


def spectral_scores(
    rows: FloatArray, start: FloatArray | None = None
) -> tuple[FloatArray, FloatArray]:
    """Squared projections of the centred ``rows`` on their top right singular
    vector, divided by their mean (Tran, Li and Madry 2018), and that vector.

    Scores average 1; a cluster's members lie far above once the cluster sets
    the top direction. Zeros when the rows do not vary. ``start`` warm-starts
    the direction (:func:`top_direction`).
    """
    centred = rows - rows.mean(axis=0)
    # The top right singular vector of the centred rows is the top
    # eigenvector of their (d, d) Gram matrix.
    direction = top_direction(centred.T @ centred, start)
    projection = (centred @ direction) ** 2
    mean = float(projection.mean())
    if mean <= 0.0:
        return np.zeros(len(rows)), direction
    scores: FloatArray = projection / mean
    return scores, direction


def _top_directions(grams: FloatArray, start: FloatArray) -> FloatArray:
    """Top eigenvectors of a stack of (d, d) Gram matrices, (m, d), by power
    iteration from one start (:func:`top_direction` for many matrices at
    once: calibration scores hundreds of subsets of one class)."""
    v = np.repeat((start / np.linalg.norm(start))[None], len(grams), axis=0)
    for _ in range(_POWER_ITERATIONS):
        w = (grams @ v[:, :, None])[:, :, 0]
        norms = np.linalg.norm(w, axis=1, keepdims=True)
        # A zero product keeps its vector (the matrix is zero along it).
        w = np.where(norms > 0.0, w / np.where(norms > 0.0, norms, 1.0), v)
        done = float(np.abs(w - v).max()) < _POWER_TOLERANCE
        v = w
        if done:
            break
    return v


def _spectral_scale(reference: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per-feature location and spread for the spectral test: the reference's
    minimum and span, each span at least ``_SPAN_FLOOR_SHARE`` of the median
    span (so a pixel constant in the reference amplifies, not divides by 0)."""
    ref = np.asarray(reference, dtype=np.float64)
    low = ref.min(axis=0)
    span = ref.max(axis=0) - low
    positive = span[span > 0]
    floor = _SPAN_FLOOR_SHARE * (float(np.median(positive)) if len(positive) else 1.0)
    return low, np.maximum(span, floor)
