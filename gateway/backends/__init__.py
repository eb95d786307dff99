"""Model backends: where a served model's predictions come from.

A backend is anything with the ``ModelBackend`` shape: the model's signature
(what validation enforces), a reference sample of its training inputs (what
seeds the detectors' baseline), ``predict_proba`` and ``close``. Three kinds,
chosen per model by ``models.backends`` in the settings:

- ``skops``: the estimator in-process, loaded by skops with a trusted-types
  list (``gateway.models.load_model``); the default.
- ``onnx``: an ONNX graph run by onnxruntime in-process
  (``gateway.backends.onnx``).
- ``oip``: a remote Open Inference Protocol v2 server over HTTP, with
  timeouts, safe retries and a circuit breaker (``gateway.backends.oip``).

Whatever the kind, the signature and the reference sample are files of ours in
``models.directory``: ``<name>.signature.json`` and ``<name>.reference.npy``.
A remote backend's own metadata is merged into the signature at start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from gateway.config import BackendConfig, Settings
from gateway.errors import ConfigError
from gateway.models import (
    DIGITS,
    ModelSignature,
    ensure_digits_model,
    load_model,
)
from gateway.zoo import BUILDERS as ZOO_BUILDERS

if TYPE_CHECKING:
    from gateway.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


@runtime_checkable
class ModelBackend(Protocol):
    """What the worker needs from a served model, wherever it runs."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str:
        """``skops``, ``onnx`` or ``oip``: a metrics label."""
        ...

    @property
    def signature(self) -> ModelSignature: ...

    @property
    def reference(self) -> np.ndarray:
        """Training inputs, float32 (n, row_size), for detector baselines."""
        ...

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 of shape (n, n_classes).

        Raises ``BackendError`` (or its ``BackendTimeoutError`` and
        ``BackendUnavailableError`` subclasses) when no answer can be had.
        Called from an executor thread, never the event loop.
        """
        ...

    def close(self) -> None:
        """Release connections and sessions. Idempotent."""
        ...


def read_signature(directory: Path, name: str) -> ModelSignature:
    """``<name>.signature.json`` from ``directory``, checked to name ``name``."""
    path = directory / f"{name}.signature.json"
    try:
        signature = ModelSignature.from_json(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"model {name}: missing file {path}") from exc
    if signature.name != name:
        raise ConfigError(f"model {name}: its signature names it {signature.name!r}")
    return signature


def read_reference(directory: Path, name: str) -> np.ndarray:
    """``<name>.reference.npy``, loaded without pickle."""
    path = directory / f"{name}.reference.npy"
    try:
        reference: np.ndarray = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ConfigError(f"model {name}: missing file {path}") from exc
    return reference


def load_backend(
    directory: Path,
    name: str,
    config: BackendConfig,
    metrics: WorkerMetrics | None = None,
) -> ModelBackend:
    """Open the backend ``config`` describes for model ``name``.

    Raises
    ------
    ConfigError
        A file is missing or a declaration disagrees (e.g. local signature
        against the remote server's metadata).
    BackendError
        A remote backend could not be reached at start.
    """
    if config.kind == "skops":
        if name == DIGITS:
            ensure_digits_model(directory)
        elif name in ZOO_BUILDERS:
            # The evaluation's models (gateway.zoo) are built on first use too.
            ZOO_BUILDERS[name](directory)
        return load_model(directory, name)
    if config.kind == "onnx":
        from gateway.backends.onnx import OnnxBackend, ensure_digits_onnx

        if name == DIGITS:
            ensure_digits_onnx(directory)
        return OnnxBackend.load(directory, name, output=config.output)
    from gateway.backends.oip import OipBackend

    if name == DIGITS:
        ensure_digits_model(directory)  # for its signature and reference sample
    return OipBackend.connect(directory, name, config, metrics=metrics)


def load_backends(
    settings: Settings, metrics: WorkerMetrics | None = None
) -> dict[str, ModelBackend]:
    """Every model in ``models.serve`` with its configured backend (skops when
    none is configured). On failure, closes what was already opened."""
    backends: dict[str, ModelBackend] = {}
    try:
        for name in settings.models.serve:
            config = settings.models.backends.get(name, BackendConfig())
            backends[name] = load_backend(
                settings.models.directory, name, config, metrics
            )
            logger.info(
                "model backend ready", extra={"model": name, "kind": config.kind}
            )
    except BaseException:
        close_backends(backends)
        raise
    return backends


def close_backends(backends: dict[str, ModelBackend]) -> None:
    """Close each backend; one failing to close does not keep the others open."""
    for name, backend in backends.items():
        try:
            backend.close()
        except Exception:
            logger.exception("closing a model backend failed", extra={"model": name})


__all__ = [
    "ModelBackend",
    "close_backends",
    "load_backend",
    "load_backends",
    "read_reference",
    "read_signature",
]
