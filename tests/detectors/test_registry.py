"""The registry builds every detector and names what it rejects."""

from __future__ import annotations

import pytest

from detectors import (
    DETECTORS,
    DistanceDistributionDetector,
    OutOfDistributionDetector,
    QuerySimilarityDetector,
    build_detectors,
)
from detectors.coverage import CoverageDetector
from detectors.fingerprint import FingerprintDetector
from detectors.knn import KnnDistanceDetector
from detectors.margin import MarginDetector
from detectors.structure import ChangeStructureDetector
from detectors.traffic import TrafficDetector


def test_registry_names_match_classes() -> None:
    expected = {
        "similarity": QuerySimilarityDetector,
        "ood": OutOfDistributionDetector,
        "prada": DistanceDistributionDetector,
        "knn": KnnDistanceDetector,
        "structure": ChangeStructureDetector,
        "fingerprint": FingerprintDetector,
        "coverage": CoverageDetector,
        "margin": MarginDetector,
        "traffic": TrafficDetector,
    }
    assert expected == DETECTORS
    for name, cls in DETECTORS.items():
        assert cls.name == name


def test_build_with_defaults_and_overrides() -> None:
    built = build_detectors({"similarity": {"eps": 0.04}, "ood": {}}, seed=3)
    assert list(built) == list(DETECTORS)
    assert built["similarity"].params.eps == 0.04
    assert built["ood"].params == OutOfDistributionDetector.Params()
    assert all(d.seed == 3 for d in built.values())


def test_unknown_detector_is_named() -> None:
    with pytest.raises(ValueError, match="'entropy'"):
        build_detectors({"entropy": {}}, seed=0)


def test_unknown_field_is_named() -> None:
    with pytest.raises(ValueError, match=r"similarity.*epsilon"):
        build_detectors({"similarity": {"epsilon": 0.1}}, seed=0)


def test_bad_value_is_named() -> None:
    with pytest.raises(ValueError, match=r"ood.*n_trees"):
        build_detectors({"ood": {"n_trees": 0}}, seed=0)
