"""Detector thresholds from benign traffic, for a target false-positive rate.

:func:`benign_replay` plays simulated honest clients through a fresh set of
detectors the way a worker does (scores with arrival times, then the model's
answers, then the outcomes), keeping every warm score; :func:`thresholds`
then puts each detector's ``threshold`` at the score that leaves only
``target_fpr`` of honest queries at or above it.

Honest clients replay held-out rows in random order, one row per request,
with Poisson arrivals at a rate drawn from a lognormal around 10 requests per
second, with occasional bursts and pauses (the habits of
``evaluation/benign.py``). The detectors' baselines must be learned on
*other* rows than the replayed ones, or the replay looks more normal than
real traffic will.

Known shortcoming: the false-positive rate is per query, over simulated
clients; real honest clients that differ from the held-out data (another
population, a batch job's timing) need a replay of their own traffic.

Imports numpy and the detectors only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.base import Detector

Answers = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]
"""The model: rows scaled to [0, 1] in, class probabilities out."""


@dataclass(frozen=True)
class Replay:
    """Warm scores of honest queries per detector, and the replay's size."""

    scores: dict[str, npt.NDArray[np.float64]]
    n_clients: int
    n_queries: int


def benign_arrivals(
    n: int, rng: np.random.Generator, *, start_s: float = 1.7e9
) -> npt.NDArray[np.float64]:
    """Arrival times (seconds) of one honest client's ``n`` requests."""
    rate_per_s = float(np.clip(rng.lognormal(np.log(10.0), 0.5), 1.0, 100.0))
    gaps = rng.exponential(1.0 / rate_per_s, n)
    burst = rng.random(n) < 0.06
    gaps[burst] = rng.exponential(0.005, int(burst.sum()))
    pause = rng.random(n) < 0.03
    gaps[pause] += rng.uniform(0.5, 3.0, int(pause.sum()))
    return start_s + rng.uniform(0.0, 5.0) + np.cumsum(gaps)


def benign_replay(
    detectors: Mapping[str, Detector[Any]],
    held_out: npt.NDArray[np.float64],
    answers: Answers,
    *,
    n_clients: int = 20,
    n_queries: int = 200,
    batch_size: int = 64,
    seed: int = 0,
) -> Replay:
    """Replay honest clients through the detectors and keep warm scores.

    Parameters
    ----------
    detectors
        Fresh detectors whose baselines were learned on other rows.
    held_out
        Rows scaled to [0, 1] for the honest clients to send.
    answers
        The model (for detectors that read answers).
    n_clients, n_queries
        Honest clients, and requests each sends.
    batch_size
        Rows per scoring call (a worker's poll).
    seed
        Seed of the clients' rows and timing.
    """
    if n_clients < 1 or n_queries < 1 or len(held_out) == 0:
        raise ValueError("need at least one client, one query and one row")
    rng = np.random.default_rng(seed)
    times = np.concatenate([benign_arrivals(n_queries, rng) for _ in range(n_clients)])
    owner = np.repeat(np.arange(n_clients), n_queries)
    rows = held_out[rng.integers(0, len(held_out), len(owner))]
    order = np.argsort(times, kind="stable")
    times, owner, rows = times[order], owner[order], rows[order]
    ids = [f"benign-{c}" for c in owner.tolist()]
    kept: dict[str, list[float]] = {name: [] for name in detectors}
    for start in range(0, len(ids), batch_size):
        batch_ids = ids[start : start + batch_size]
        batch = rows[start : start + batch_size]
        proba = answers(batch)
        for name, detector in detectors.items():
            found = detector.score_batch(
                batch_ids, batch, arrival_s=times[start : start + batch_size]
            )
            kept[name] += [s.score for s in found if s.warm]
            detector.observe_outputs(batch_ids, batch, proba)
            ok = [False] * len(batch_ids)
            detector.observe_outcomes(batch_ids, ok, ok)
    return Replay(
        scores={name: np.asarray(v, dtype=np.float64) for name, v in kept.items()},
        n_clients=n_clients,
        n_queries=n_queries,
    )


def threshold_for(scores: npt.NDArray[np.float64], target_fpr: float) -> float | None:
    """The lowest threshold leaving at most ``target_fpr`` of ``scores`` at or
    above it (a detector flags at ``score >= threshold``); None without
    scores.

    Examples
    --------
    >>> round(threshold_for(np.array([0.0] * 98 + [0.5, 0.9]), 0.01), 4)
    0.5
    """
    keep = _highest_kept(scores, target_fpr)
    if keep is None:
        return None
    # The threshold sits just above the highest score that must not flag.
    return float(max(keep * (1.0 + 1e-6) + 1e-7, 1e-3))


def _highest_kept(scores: npt.NDArray[np.float64], target_fpr: float) -> float | None:
    """The highest score that must stay below the threshold so that at most
    ``target_fpr`` of ``scores`` flag (everything above index ``n - allowed
    - 1`` of the sorted scores may); None without scores."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if len(scores) == 0:
        return None
    ordered = np.sort(scores)
    allowed = int(np.floor(target_fpr * len(ordered)))
    return float(ordered[len(ordered) - allowed - 1])


def silent(replay: Replay, target_fpr: float) -> list[str]:
    """Detectors whose honest scores that must not flag are all 0: the replay
    shows where honest traffic is not, never where the threshold should be,
    and the floor :func:`threshold_for` would give (0.001) flags any score at
    all. :func:`thresholds` leaves them at their current value."""
    return [
        name
        for name, scores in replay.scores.items()
        if (keep := _highest_kept(scores, target_fpr)) is not None and keep <= 0.0
    ]


def thresholds(
    detectors: Mapping[str, Detector[Any]], replay: Replay, target_fpr: float
) -> dict[str, float]:
    """Per detector, the calibrated threshold clamped into what its
    parameters accept; detectors that never got warm, and :func:`silent`
    ones, are left out."""
    found: dict[str, float] = {}
    quiet = set(silent(replay, target_fpr))
    for name, detector in detectors.items():
        value = threshold_for(replay.scores[name], target_fpr)
        if value is None or name in quiet:
            continue
        field = detector.Params.model_fields["threshold"]
        upper = 1.0
        for rule in field.metadata:
            if getattr(rule, "le", None) is not None:
                upper = float(rule.le)
            if getattr(rule, "lt", None) is not None:
                upper = float(np.nextafter(float(rule.lt), 0.0))
        # Rounded up, so the printed value still leaves the highest honest
        # score that must not flag below it.
        found[name] = min(float(np.ceil(value * 1e6) / 1e6), upper)
    return found
