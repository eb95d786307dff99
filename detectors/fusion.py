"""One risk per client from every detector, remembered with a half-life.

Pure functions over plain values; the policy (gateway/policy.py) keeps the
memory per client and calls :func:`fuse` once per query.

How the detectors are combined: each warm detector's score is normalised by
its own threshold (1.0 = at threshold) and weighted; the client's risk is the
*largest* weighted, decayed contribution, not a noisy-OR of them. Noisy-OR
multiplies the detectors' "not an attack" beliefs as if they were
independent, but ours are not: a random-query thief lights ``ood``, ``prada``,
``coverage`` and ``margin`` at once, so noisy-OR would count one behaviour
four times, and nine detectors each at a third of their threshold (ordinary
honest noise) would add up to a flag. With the maximum, each detector's
calibrated false-positive rate bounds the fused one (at most their sum), and
a weight is the one knob that says how much a detector is trusted.

Memory: each detector's contribution decays by half every ``half_life_s``
seconds and is replaced by the current one when that is larger, so a client
that stops behaving suspiciously cools down smoothly, and one flagged
detector's evidence is not erased by its next ordinary query. The top
contributors are the detectors with the largest remembered contributions.

Imports nothing beyond the standard library and :mod:`detectors.base`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from detectors.base import DetectorScore

TOP_N = 3
"""Contributing detectors named with each fused risk."""


@dataclass(frozen=True, slots=True)
class Fused:
    """A client's fused risk just after one query.

    Attributes
    ----------
    risk
        Largest remembered contribution, in threshold units (1.0 = some
        detector at its threshold).
    top
        Up to :data:`TOP_N` ``(detector, contribution)`` pairs, largest first,
        leaving out contributions of 0.
    memory
        Every detector's remembered contribution, to keep for the next query.
    """

    risk: float
    top: tuple[tuple[str, float], ...]
    memory: dict[str, float]


def decay(value: float, elapsed_s: float, half_life_s: float) -> float:
    """``value`` halved every ``half_life_s`` seconds; a half-life of 0 (no
    memory) forgets at once, and time running backwards forgets nothing."""
    if half_life_s <= 0:
        return 0.0
    return float(value * 0.5 ** (max(elapsed_s, 0.0) / half_life_s))


def contributions(
    scores: Sequence[DetectorScore], weights: Mapping[str, float]
) -> dict[str, float]:
    """Each warm detector's weighted score over its threshold (cold ones and
    those with a zero threshold give nothing)."""
    found: dict[str, float] = {}
    for s in scores:
        if s.warm and s.threshold > 0:
            value = weights.get(s.detector, 1.0) * s.score / s.threshold
            found[s.detector] = max(found.get(s.detector, 0.0), value)
    return found


def fuse(
    memory: Mapping[str, float],
    elapsed_s: float,
    current: Mapping[str, float],
    *,
    half_life_s: float,
    exclude: Collection[str] = (),
) -> Fused:
    """Decay the memory by ``elapsed_s``, take the larger of it and the
    current contributions per detector, and rank.

    Parameters
    ----------
    memory
        Contributions remembered after the client's previous query.
    elapsed_s
        Seconds since then.
    current
        This query's contributions (:func:`contributions`).
    half_life_s
        Half-life of the memory; 0 means the current query alone counts.
    exclude
        Detectors left out of ``risk`` and ``top`` (those in shadow) but still
        remembered, so leaving shadow does not start them from nothing.

    Examples
    --------
    >>> f = fuse({"ood": 2.0}, 60.0, {"margin": 0.5}, half_life_s=60.0)
    >>> f.risk, f.top
    (1.0, (('ood', 1.0), ('margin', 0.5)))
    """
    factor = decay(1.0, elapsed_s, half_life_s)
    merged = (
        {name: value * factor for name, value in memory.items()}
        if factor != 1.0
        else dict(memory)
    )
    get = merged.get
    for name, value in current.items():
        if value > get(name, 0.0):
            merged[name] = value
    # Forget what has decayed to nothing, so the memory stays small; what is
    # kept is positive, so every kept detector not excluded is ranked.
    kept = {name: value for name, value in merged.items() if value >= 1e-3}
    if exclude:
        pairs = [(value, name) for name, value in kept.items() if name not in exclude]
    else:
        pairs = list(zip(kept.values(), kept.keys(), strict=True))
    if not pairs:
        return Fused(risk=0.0, top=(), memory=kept)
    ranked = sorted(pairs, reverse=True)[:TOP_N]
    top = tuple((name, value) for value, name in ranked)
    return Fused(risk=ranked[0][0], top=top, memory=kept)


def risk_without(memory: Mapping[str, float], exclude: Collection[str]) -> float:
    """The largest remembered contribution leaving out ``exclude`` (the
    enforced risk when some detectors are in shadow)."""
    return max(
        (value for name, value in memory.items() if name not in exclude),
        default=0.0,
    )


def with_group(risk: float, group_risk: float) -> float:
    """The risk policy acts on for a client in a linked group: the larger of
    its own and its group's, so the group is judged as one attacker."""
    return max(risk, group_risk)
