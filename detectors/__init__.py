"""Detection library: per-client detectors of model extraction and probing.

Pure Python, numpy, scipy and River. Nothing here imports Kafka, Redis,
FastAPI or ``gateway``, and nothing configures logging.
"""

from __future__ import annotations

from detectors.base import MAX_STATE_BYTES, Detector, DetectorParams, DetectorScore
from detectors.fingerprint import (
    FingerprintDetector,
    FingerprintMatch,
    FingerprintParams,
    FingerprintStore,
    InMemoryFingerprintStore,
)
from detectors.knn import KnnDistanceDetector, KnnParams
from detectors.ood import OodParams, OutOfDistributionDetector
from detectors.prada import DistanceDistributionDetector, PradaParams
from detectors.registry import DETECTORS, build_detectors
from detectors.similarity import QuerySimilarityDetector, SimilarityParams
from detectors.structure import ChangeStructureDetector, StructureParams

__all__ = [
    "DETECTORS",
    "MAX_STATE_BYTES",
    "ChangeStructureDetector",
    "Detector",
    "DetectorParams",
    "DetectorScore",
    "DistanceDistributionDetector",
    "FingerprintDetector",
    "FingerprintMatch",
    "FingerprintParams",
    "FingerprintStore",
    "InMemoryFingerprintStore",
    "KnnDistanceDetector",
    "KnnParams",
    "OodParams",
    "OutOfDistributionDetector",
    "PradaParams",
    "QuerySimilarityDetector",
    "SimilarityParams",
    "StructureParams",
    "build_detectors",
]
