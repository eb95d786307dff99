"""Per-model calibration of the detectors from the model's reference sample.

The detectors' defaults were measured on 8x8 digits scaled to [0, 1]. A model
with other inputs (30 correlated tabular features, 9 features taking only 0,
0.5 and 1) puts honest queries at other distances from each other, so a
distance or share threshold right for digits flags honest clients there. At
worker start, for each model, this module

1. lowers each near-duplicate radius (``eps`` of similarity and PRADA) to
   ``EPS_SHARE`` of the 1% quantile of the reference rows' distances to their
   nearest distinct neighbour, when that is below the default: a
   near-duplicate must stay much closer than two distinct honest inputs;
2. replays simulated honest streams (the reference rows in random order,
   cycled, so exact repeats occur as when an honest client replays its data)
   through fresh detectors and raises each detector's flag ``threshold`` to
   just above the ``1 - target_fpr`` quantile of the streams' highest warm
   scores, when that is above the configured one.

Only ever lowers ``eps`` and raises ``threshold``: the defaults were chosen
against attacks, and the reference sample says only what honest traffic looks
like, so it may make a detector more tolerant, never more trigger-happy. A
parameter the operator set explicitly is left alone. Detectors without a
``threshold`` or whose score is not on the same scale are skipped.

Imports numpy and the detector registry only; nothing from ``gateway``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.base import Detector

logger = logging.getLogger(__name__)

# Share of the reference's 1% nearest-distinct-neighbour distance that a
# near-duplicate radius may reach: the ratio of the defaults measured on digits
# (eps 0.05 against a 1% quantile of 0.08 on the digits reference), so digits
# keep their eps and other inputs get the same margin below their own
# distinct distances.
EPS_SHARE = 0.65

# Detectors whose near-duplicate radius is calibrated.
EPS_DETECTORS = ("similarity", "prada")

# Simulated honest streams, their length and the rows each sends per batch:
# 16 streams of 320 queries (a long honest client of the full evaluation) in
# batches of 8 rows each.
N_STREAMS = 16
STREAM_QUERIES = 320
_ROWS_PER_BATCH = 8

# Relative headroom above the quantile of honest maxima, so a held-out
# population (not the reference itself) rarely reaches the threshold.
HEADROOM = 1.1

# Rows of the reference used to measure nearest-neighbour distances (bounds
# the pairwise matrix at 1000 x 1000 float64, 8 MB).
_MAX_NN_ROWS = 1000


@dataclass
class Calibration:
    """What calibration changed for one model.

    Attributes
    ----------
    params
        Detector name to the parameters set (only those that changed).
    honest_max
        Detector name to the ``1 - target_fpr`` quantile of the simulated
        honest streams' highest warm score (before any raise).
    seconds
        Wall time the calibration took.
    """

    params: dict[str, dict[str, float]] = field(default_factory=dict)
    honest_max: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def nearest_distinct_distances(
    reference: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Per-feature RMS distance from each reference row to its nearest row that
    is not an exact copy of it (rows with no distinct neighbour are dropped)."""
    x = reference[:_MAX_NN_ROWS]
    sq = np.einsum("ij,ij->i", x, x)
    d_sq = np.maximum(sq[:, None] - 2.0 * (x @ x.T) + sq[None, :], 0.0)
    # Exact copies (and the row itself) are not neighbours; the tolerance is
    # far below any distance between distinct rows on [0, 1].
    d_sq[d_sq <= 1e-12] = np.inf
    nearest = np.sqrt(d_sq.min(axis=1) / x.shape[1])
    out: npt.NDArray[np.float64] = nearest[np.isfinite(nearest)]
    return out


def honest_streams(
    reference: npt.NDArray[np.float64], rng: np.random.Generator
) -> list[npt.NDArray[np.float64]]:
    """``N_STREAMS`` honest streams: the reference in a random order each,
    cycled to ``STREAM_QUERIES`` rows."""
    n = len(reference)
    return [
        reference[np.resize(rng.permutation(n), STREAM_QUERIES)]
        for _ in range(N_STREAMS)
    ]


def stream_maxima(
    detectors: Mapping[str, Detector[Any]],
    streams: list[npt.NDArray[np.float64]],
) -> dict[str, npt.NDArray[np.float64]]:
    """Per detector, each stream's highest score among its warm rows (0 when
    never warm). Streams are interleaved in batches, one client each, as a
    worker sees them."""
    n = len(streams)
    length = min(len(s) for s in streams)
    ids = [f"calibration-{i}" for i in range(n)]
    maxima = {name: np.zeros(n) for name in detectors}
    # A few rows per client per batch, every client in each batch (detectors
    # apply each client's rows in order, so the scores equal one at a time).
    step = _ROWS_PER_BATCH
    client = np.repeat(np.arange(n), step)
    for t in range(0, length, step):
        width = min(step, length - t)
        batch = np.concatenate([s[t : t + width] for s in streams])
        batch_ids = [ids[i] for i in np.repeat(np.arange(n), width)]
        owner = client if width == step else np.repeat(np.arange(n), width)
        for name, detector in detectors.items():
            found = detector.score_batch(batch_ids, batch)
            warm_scores = np.array([s.score if s.warm else 0.0 for s in found])
            np.maximum.at(maxima[name], owner, warm_scores)
    for detector in detectors.values():
        for client_id in ids:
            detector.forget(client_id)
    return maxima


def calibrate(
    build: Callable[[Mapping[str, Mapping[str, Any]]], dict[str, Detector[Any]]],
    overrides: Mapping[str, Mapping[str, Any]],
    reference: npt.NDArray[np.float64],
    *,
    target_fpr: float = 0.01,
    seed: int = 0,
) -> Calibration:
    """Parameters for one model's detectors, from its scaled reference sample.

    Parameters
    ----------
    build
        Builds a fresh detector set from parameter overrides (for example
        ``lambda o: build_detectors(o, seed=0)``).
    overrides
        The operator's overrides; a parameter named there is never changed.
    reference
        The model's reference sample, already on the detectors' [0, 1] scale.
    target_fpr
        Share of simulated honest streams allowed to reach a threshold.
    seed
        Seeds the streams' order.

    Returns
    -------
    Calibration
        ``params`` to merge into each detector of the model (``set_params``).
    """
    started = time.perf_counter()
    result = Calibration()
    if len(reference) < 10:
        return result

    def explicit(detector: str, param: str) -> bool:
        return param in overrides.get(detector, {})

    # Step 1: near-duplicate radii below the reference's distinct distances.
    nearest = nearest_distinct_distances(reference)
    if len(nearest):
        floor = EPS_SHARE * float(np.quantile(nearest, 0.01))
        defaults = build(overrides)
        for name in EPS_DETECTORS:
            detector = defaults.get(name)
            if detector is None or explicit(name, "eps"):
                continue
            eps = float(getattr(detector.params, "eps", 0.0))
            if 0.0 < floor < eps:
                # Two significant digits: a readable number in the log.
                result.params.setdefault(name, {})["eps"] = float(f"{floor:.2g}")

    # Step 2: thresholds above the simulated honest streams' maxima.
    merged = {
        name: {**overrides.get(name, {}), **result.params.get(name, {})}
        for name in set(overrides) | set(result.params)
    }
    detectors = build(merged)
    for detector in detectors.values():
        detector.learn_baseline(reference)
    streams = honest_streams(reference, np.random.default_rng(seed))
    maxima = stream_maxima(detectors, streams)
    for name, detector in detectors.items():
        threshold = getattr(detector.params, "threshold", None)
        if not isinstance(threshold, float) or explicit(name, "threshold"):
            continue
        # The simulated streams carry neither the model's answers nor real
        # arrival times, so detectors that score those would be calibrated on
        # a stream they never see in service; they keep their own thresholds.
        if detector.observes_outputs or detector.observes_outcomes:
            continue
        honest = float(np.quantile(maxima[name], 1.0 - target_fpr))
        result.honest_max[name] = honest
        needed = honest * HEADROOM
        if needed >= threshold:
            # Thresholds live in (0, 1]; a detector whose honest maxima reach
            # 1 cannot be calibrated by its threshold and is left flagging.
            raised = min(1.0, float(f"{needed + 0.005:.2f}"))
            if raised > threshold:
                result.params.setdefault(name, {})["threshold"] = raised
            if needed >= 1.0:
                logger.warning(
                    "detector cannot separate this model's honest streams",
                    extra={"detector": name, "honest_max": honest},
                )
    result.seconds = time.perf_counter() - started
    return result
