"""The detectors the gateway can run, by name, and how to build them.

Imports only the detector modules; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic

from detectors.base import Detector, describe_validation_error
from detectors.coverage import CoverageDetector
from detectors.fingerprint import FingerprintDetector
from detectors.knn import KnnDistanceDetector
from detectors.margin import MarginDetector
from detectors.ood import OutOfDistributionDetector
from detectors.prada import DistanceDistributionDetector
from detectors.similarity import QuerySimilarityDetector
from detectors.structure import ChangeStructureDetector
from detectors.traffic import TrafficDetector

DETECTORS: dict[str, type[Detector[Any]]] = {
    QuerySimilarityDetector.name: QuerySimilarityDetector,
    OutOfDistributionDetector.name: OutOfDistributionDetector,
    DistanceDistributionDetector.name: DistanceDistributionDetector,
    KnnDistanceDetector.name: KnnDistanceDetector,
    ChangeStructureDetector.name: ChangeStructureDetector,
    FingerprintDetector.name: FingerprintDetector,
    CoverageDetector.name: CoverageDetector,
    MarginDetector.name: MarginDetector,
    TrafficDetector.name: TrafficDetector,
}
"""Every registered detector class by its ``name``."""


def build_detectors(
    overrides: Mapping[str, Mapping[str, Any]], seed: int
) -> dict[str, Detector[Any]]:
    """One instance of every registered detector, with parameter overrides.

    Parameters
    ----------
    overrides
        Detector name to parameter values (for example the ``[detectors]``
        table of the configuration); detectors not named get their defaults.
    seed
        Seed passed to every detector.

    Returns
    -------
    dict
        Detector name to a fresh instance, in registry order.

    Raises
    ------
    ValueError
        Naming the unknown detector, or the detector and the field that failed
        validation.

    Examples
    --------
    >>> detectors = build_detectors({"similarity": {"eps": 0.04}}, seed=0)
    >>> len(detectors), detectors["similarity"].params.eps
    (9, 0.04)
    """
    unknown = sorted(set(overrides) - set(DETECTORS))
    if unknown:
        raise ValueError(
            f"unknown detector {unknown[0]!r}; known: {', '.join(sorted(DETECTORS))}"
        )
    built: dict[str, Detector[Any]] = {}
    for name, cls in DETECTORS.items():
        try:
            params = cls.Params.model_validate(dict(overrides.get(name, {})))
        except pydantic.ValidationError as exc:
            raise ValueError(
                f"detector {name!r}: {describe_validation_error(exc)}"
            ) from exc
        built[name] = cls(params, seed=seed)
    return built
