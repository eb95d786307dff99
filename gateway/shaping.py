"""Degrade: shape a model's probabilities so that they teach an attacker less.

Pure numpy; imports nothing from Kafka, Redis or the rest of the gateway. Each
level keeps the output a valid probability tensor of the same shape (rows are
non-negative and sum to 1), so a degraded client still gets answers its code
can read, and the label (the argmax) is the model's own label at every level:

``full``
    the model's probabilities unchanged.
``top_k``
    the ``k`` largest probabilities of each row, renormalised; the others 0.
``rounded``
    every other class truncated to ``decimals`` places and the predicted
    class given the rest, so that the row still sums to 1.
``label``
    one-hot on the predicted class: the label only.

Optional noise (Laplace or Gaussian, scale in probability units) is added
before the level's shaping, clipped at 0 and renormalised; it is seeded from
the request id so that a retried request gets the same answer (averaging
retries of one request cannot remove the noise). The argmax is restored after
noise, so noise blurs the confidence an extraction attack learns from but never
changes the label an honest client relies on.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import numpy as np

Level = Literal["full", "top_k", "rounded", "label"]
Noise = Literal["none", "laplace", "gaussian"]
LEVELS: tuple[Level, ...] = ("full", "top_k", "rounded", "label")


def seed_for(request_id: str) -> int:
    """A 64-bit seed derived from a request id (stable across processes,
    unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big")


def shape(
    proba: np.ndarray[Any, Any],
    level: Level,
    *,
    top_k: int = 3,
    decimals: int = 1,
    noise: Noise = "none",
    noise_scale: float = 0.0,
    seed: int = 0,
) -> np.ndarray[Any, Any]:
    """Return ``proba`` (rows x classes) shaped at ``level``.

    Parameters
    ----------
    proba
        Probabilities per row; rows are assumed to sum to 1.
    level
        One of :data:`LEVELS`, mildest first.
    top_k
        Classes kept per row at ``top_k``.
    decimals
        Decimal places at ``rounded``.
    noise, noise_scale
        Noise added at every level but ``full`` and ``label`` (where it could
        only be undone or would change nothing); scale 0 means none.
    seed
        Seeds the noise; use :func:`seed_for` of the request id.

    Returns
    -------
    numpy.ndarray
        float64, same shape, rows non-negative summing to 1 (to float
        precision; exactly representable sums at ``rounded`` and ``label``),
        same argmax per row as ``proba``.

    Examples
    --------
    >>> p = np.array([[0.1, 0.6, 0.3]])
    >>> shape(p, "label").tolist()
    [[0.0, 1.0, 0.0]]
    >>> shape(p, "top_k", top_k=2).round(3).tolist()
    [[0.0, 0.667, 0.333]]
    """
    if level not in LEVELS:
        raise ValueError(f"unknown degrade level {level!r}")
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError("probabilities must be a non-empty rows x classes matrix")
    if level == "full":
        return p.copy()
    labels = p.argmax(axis=1)
    rows = np.arange(len(p))
    if level == "label":
        return _one_hot(labels, p.shape[1])

    # Noise first, so that the shaping below still holds afterwards.
    if noise != "none" and noise_scale > 0:
        rng = np.random.default_rng(seed)
        if noise == "laplace":
            p = p + rng.laplace(0.0, noise_scale, size=p.shape)
        else:
            p = p + rng.normal(0.0, noise_scale, size=p.shape)
        p = np.clip(p, 0.0, None)
        # Keep the model's label: lift the true top class just above the rest.
        p[rows, labels] = p.max(axis=1) + 1e-9
        p = p / p.sum(axis=1, keepdims=True)

    if level == "top_k":
        k = min(top_k, p.shape[1])
        # Ties at the k-th place are broken by class index (argsort is stable).
        order = np.argsort(-p, axis=1, kind="stable")
        keep = np.zeros_like(p, dtype=bool)
        np.put_along_axis(keep, order[:, :k], True, axis=1)
        keep[rows, labels] = True
        shaped = np.where(keep, p, 0.0)
        out: np.ndarray[Any, Any] = shaped / shaped.sum(axis=1, keepdims=True)
        return out

    # rounded: in integer units of 10**-decimals, so that the sum is exact.
    # Every other class is truncated and the label takes the rest, which is
    # at least its own value: the label stays the argmax, nothing negative.
    unit = 10**decimals
    counts = np.floor(p * unit).astype(np.int64)
    counts[rows, labels] = 0
    counts[rows, labels] = unit - counts.sum(axis=1)
    rounded: np.ndarray[Any, Any] = counts.astype(np.float64) / unit
    return rounded


def _one_hot(labels: np.ndarray[Any, Any], classes: int) -> np.ndarray[Any, Any]:
    out = np.zeros((len(labels), classes), dtype=np.float64)
    out[np.arange(len(labels)), labels] = 1.0
    return out
