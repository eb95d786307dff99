"""ONNX backend: a model graph run in-process by onnxruntime.

The model is ``<name>.onnx`` next to its signature and reference sample. An
ONNX file is a protobuf graph of standard operators: loading it runs no code
of the file's choosing (no pickle), and only onnxruntime's built-in operators
are available, since we register no custom-op libraries.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from gateway.errors import BackendError, ConfigError
from gateway.models import (
    DIGITS,
    DIGITS_MODEL_VERSION,
    ModelSignature,
    build_lock,
    ensure_digits_model,
    load_model,
    write_atomically,
)

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = "probabilities"
# Stored in the ONNX file's metadata, so a stale conversion is redone.
_VERSION_KEY = "modelgate_version"
_EXPORT_LOCK = threading.Lock()


class OnnxBackend:
    """An onnxruntime session over one single-input classifier graph."""

    kind = "onnx"

    def __init__(
        self,
        path: Path,
        signature: ModelSignature,
        reference: np.ndarray,
        *,
        output: str | None = None,
    ) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        if len(signature.inputs) != 1:
            raise ConfigError(
                f"model {signature.name}: exactly one input tensor is supported"
            )
        options = ort.SessionOptions()
        # The worker's executor and the detectors share the host's cores; one
        # thread per session keeps a batch from starving the event loop.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except FileNotFoundError as exc:
            raise ConfigError(f"model {signature.name}: missing file {path}") from exc
        except Exception as exc:  # onnxruntime's own exception types vary
            raise ConfigError(
                f"model {signature.name}: cannot load {path}: {exc}"
            ) from exc
        self.signature = signature
        self.reference = reference
        self._output = output or DEFAULT_OUTPUT
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        expected = signature.inputs[0].name
        if inputs != [expected]:
            raise ConfigError(
                f"model {signature.name}: the ONNX graph takes inputs {inputs}, "
                f"the signature declares [{expected!r}]"
            )
        if self._output not in outputs:
            raise ConfigError(
                f"model {signature.name}: the ONNX graph has no output "
                f"{self._output!r} (it has {outputs})"
            )
        self._input = expected

    @classmethod
    def load(
        cls, directory: Path, name: str, *, output: str | None = None
    ) -> OnnxBackend:
        from gateway.backends import read_reference, read_signature

        return cls(
            directory / f"{name}.onnx",
            read_signature(directory, name),
            read_reference(directory, name),
            output=output,
        )

    @property
    def name(self) -> str:
        return self.signature.name

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        try:
            (proba,) = self._session.run(
                [self._output], {self._input: rows.astype(np.float32, copy=False)}
            )
        except Exception as exc:  # a backend may fail in any way; the batch survives
            raise BackendError(f"model {self.name} failed: {exc!r}") from exc
        result = np.asarray(proba, dtype=np.float32)
        if result.shape != (len(rows), len(self.signature.classes)):
            raise BackendError(
                f"model {self.name} answered shape {result.shape} for {len(rows)} rows"
            )
        return result

    def close(self) -> None:
        """onnxruntime frees the session with the object; nothing to do."""


def ensure_digits_onnx(directory: Path) -> Path:
    """Convert the demo digits model to ``digits.onnx`` unless this version is
    there. The estimator comes from the skops file (trusted-type load)."""
    import onnx
    from skl2onnx import convert_sklearn  # type: ignore[import-untyped]
    from skl2onnx.common.data_types import (  # type: ignore[import-untyped]
        FloatTensorType,
    )
    from sklearn.neural_network import MLPClassifier

    path = directory / f"{DIGITS}.onnx"
    # The thread lock for threads of this process, the file lock for other
    # processes on the same directory (a worker and a guard starting together).
    with _EXPORT_LOCK, build_lock(directory, path.name):
        if path.exists():
            try:
                meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
            except Exception:  # a truncated or foreign file: convert again
                meta = {}
            if meta.get(_VERSION_KEY) == DIGITS_MODEL_VERSION:
                return path
        ensure_digits_model(directory)
        served = load_model(directory, DIGITS)
        spec = served.signature.inputs[0]
        graph = convert_sklearn(
            served.estimator,
            initial_types=[(spec.name, FloatTensorType([None, spec.row_size]))],
            # Plain probability matrix instead of a list of {class: p} maps.
            options={MLPClassifier: {"zipmap": False}},
        )
        entry = graph.metadata_props.add()
        entry.key, entry.value = _VERSION_KEY, DIGITS_MODEL_VERSION
        payload = graph.SerializeToString()
        write_atomically(path, lambda p: p.write_bytes(payload))
        logger.info("converted demo model to ONNX", extra={"model": DIGITS})
    return path
