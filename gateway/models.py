"""Model backends served in-process, their declared signatures, and the demo model.

A model lives in a directory as three files: ``<name>.skops`` (loaded by skops
with an explicit list of trusted types, so a tampered file cannot run code),
``<name>.signature.json`` (input names, shapes, datatypes and value ranges that
validation enforces) and ``<name>.reference.npy`` (a sample of the training
inputs, loaded with ``allow_pickle=False``, that seeds the detectors' notion of
normal traffic). The demo model is trained on scikit-learn's bundled digits.

A model missing from the directory is trained on first use, by whichever
process needs it first (the worker and the poisoning guard start together in
docker-compose.yml, on one volume). Building takes an exclusive file lock per
model (``.<name>.build.lock`` in the directory, ``fcntl.flock``: released by
the kernel if the process dies), so one process builds and the others wait
and then load its result; each file is written under a unique temporary name,
flushed to disk and renamed into place, so no reader ever sees a torn file.
The lock needs a file system with working ``flock`` (a local disk or Docker
volume; not every network file system).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import BackendError, ConfigError

logger = logging.getLogger(__name__)

# skops refuses any type not listed here; these are exactly the types the demo
# models are made of. Adding a model family means adding its types, on purpose.
TRUSTED_TYPES: tuple[str, ...] = (
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._data.MinMaxScaler",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.float64",
    "numpy.int64",
)

DIGITS = "digits"
DIGITS_SPLIT_SEED = 0
# Bump when the demo model's training changes, so cached copies are retrained.
DIGITS_MODEL_VERSION = "2"

MODEL_SUFFIXES = (".skops", ".signature.json", ".reference.npy")
"""The files of one model, each written atomically by ``write_model_files``."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One declared tensor. ``shape`` uses -1 for the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    min: float | None = None
    max: float | None = None

    @property
    def row_size(self) -> int:
        """Elements per row: the product of every dimension after the first."""
        return int(np.prod(self.shape[1:], dtype=np.int64))


@dataclass(frozen=True, slots=True)
class ModelSignature:
    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    classes: tuple[int, ...]
    max_batch_rows: int = 32

    @classmethod
    def from_json(cls, text: str) -> ModelSignature:
        try:
            raw = json.loads(text)
            return cls(
                name=str(raw["name"]),
                version=str(raw["version"]),
                inputs=tuple(_spec(s) for s in raw["inputs"]),
                outputs=tuple(_spec(s) for s in raw["outputs"]),
                classes=tuple(int(c) for c in raw["classes"]),
                max_batch_rows=int(raw.get("max_batch_rows", 32)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad model signature: {exc!r}") from exc

    def to_json(self) -> str:
        def spec(s: TensorSpec) -> dict[str, Any]:
            out: dict[str, Any] = {
                "name": s.name,
                "datatype": s.datatype,
                "shape": list(s.shape),
            }
            if s.min is not None:
                out["min"] = s.min
            if s.max is not None:
                out["max"] = s.max
            return out

        return json.dumps(
            {
                "name": self.name,
                "version": self.version,
                "inputs": [spec(s) for s in self.inputs],
                "outputs": [spec(s) for s in self.outputs],
                "classes": list(self.classes),
                "max_batch_rows": self.max_batch_rows,
            },
            indent=2,
        )


def _spec(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=str(raw["name"]),
        datatype=str(raw["datatype"]),
        shape=tuple(int(d) for d in raw["shape"]),
        min=None if raw.get("min") is None else float(raw["min"]),
        max=None if raw.get("max") is None else float(raw["max"]),
    )


class ServedModel:
    """A classifier loaded in-process with its signature and reference sample.

    Only single-input models are served for now; ``predict_proba`` takes the
    rows of that input as float32 of shape (n, row_size).
    """

    def __init__(
        self, signature: ModelSignature, estimator: Any, reference: np.ndarray
    ) -> None:
        if len(signature.inputs) != 1:
            raise ConfigError(
                f"model {signature.name}: exactly one input tensor is supported"
            )
        self.signature = signature
        self._estimator = estimator
        self.reference = reference

    @property
    def name(self) -> str:
        return self.signature.name

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 of shape (n, n_classes)."""
        try:
            proba = self._estimator.predict_proba(rows)
        except Exception as exc:  # a backend may fail in any way; the batch survives
            raise BackendError(f"model {self.name} failed: {exc!r}") from exc
        return np.asarray(proba, dtype=np.float32)

    # The in-process backend of gateway.backends.ModelBackend.
    kind = "skops"

    @property
    def estimator(self) -> Any:
        """The loaded estimator, for exporting it to other formats."""
        return self._estimator

    def close(self) -> None:
        """Nothing to release: the estimator is plain memory."""


def load_model(directory: Path, name: str) -> ServedModel:
    """Load ``name`` from ``directory`` with skops' trusted-type check.

    Raises
    ------
    ConfigError
        A file is missing, or the skops file holds a type not in TRUSTED_TYPES.
    """
    import skops.io as sio

    base = directory / name
    try:
        signature = ModelSignature.from_json(
            base.with_suffix(".signature.json").read_text()
        )
        if signature.name != name:
            raise ConfigError(
                f"model {name}: its signature names it {signature.name!r}"
            )
        untrusted = [
            t
            for t in sio.get_untrusted_types(file=base.with_suffix(".skops"))
            if t not in TRUSTED_TYPES
        ]
        if untrusted:
            raise ConfigError(f"model {name}: untrusted types in file: {untrusted}")
        estimator = sio.load(base.with_suffix(".skops"), trusted=list(TRUSTED_TYPES))
        reference = np.load(base.with_suffix(".reference.npy"), allow_pickle=False)
    except FileNotFoundError as exc:
        raise ConfigError(f"model {name}: missing file {exc.filename}") from exc
    logger.info("loaded model", extra={"model": name, "version": signature.version})
    return ServedModel(signature, estimator, reference)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits split 50/50 into (X_train, X_test, y_train, y_test).

    Pixels are raw intensities 0..16 as float32. The split is fixed so that the
    model, the detectors' reference sample and the demo's held-out replay never
    overlap.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.5, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return x_train, x_test, y_train, y_test


def held_out_digits(directory: Path) -> np.ndarray:
    """The held-out half of :func:`digits_split`, cached under ``directory``.

    ``modelgate send --sample`` needs one held-out image; computing the split
    imports scikit-learn, about 3 s of a 4.5 s call on this machine. The cache
    is named by scikit-learn's version (read from its metadata, which does not
    import it) and the split seed; a file that does not load as the expected
    (n, 64) float32 array is rebuilt.
    """
    from importlib.metadata import version

    path = directory / (
        f"digits-held-out-sklearn{version('scikit-learn')}-seed{DIGITS_SPLIT_SEED}.npy"
    )
    try:
        cached: np.ndarray = np.load(path, allow_pickle=False)
        if cached.dtype == np.float32 and cached.ndim == 2 and cached.shape[1] == 64:
            return cached
        logger.warning("held-out digits cache has the wrong shape; rebuilding")
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        logger.warning("held-out digits cache unreadable (%s); rebuilding", exc)
    held_out = digits_split()[1]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda p: _save_npy(p, held_out))
    except OSError as exc:  # a read-only models directory still answers
        logger.warning("held-out digits not cached: %s", exc)
    return held_out


def ensure_digits_model(directory: Path) -> Path:
    """Train and save the demo digits model unless this version is there.

    A small MLP (64 hidden units) on the training half of digits, about 97%
    accuracy on the held-out half. Deterministic for a given scikit-learn.

    Inputs are scaled by the declared pixel range (x / 16), not by statistics
    of the training set: a standardising scaler divides by the tiny spread of
    border pixels, so any query that lights one up (a synthetic extraction
    query, say) lands far outside anything the network was trained on.
    """
    base = directory / DIGITS
    if _has_version(base, DIGITS_MODEL_VERSION):
        return base
    with build_lock(directory, DIGITS):
        # Another process may have built it while this one waited.
        if not _has_version(base, DIGITS_MODEL_VERSION):
            _train_digits_model(directory)
    return base


def _train_digits_model(directory: Path) -> None:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler

    logger.info("training demo model", extra={"model": DIGITS})

    x_train, x_test, y_train, y_test = digits_split()
    # Fitted on the declared range itself, so the scaler is exactly x / 16.
    scaler = MinMaxScaler().fit(np.array([[0.0] * 64, [16.0] * 64]))
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0)
    mlp.fit(scaler.transform(x_train), y_train)
    estimator = Pipeline([("scale", scaler), ("mlp", mlp)])
    accuracy = float(estimator.score(x_test, y_test))

    signature = ModelSignature(
        name=DIGITS,
        version=DIGITS_MODEL_VERSION,
        inputs=(TensorSpec("pixels", "FP32", (-1, 64), 0.0, 16.0),),
        outputs=(
            TensorSpec("probabilities", "FP32", (-1, 10)),
            TensorSpec("label", "INT64", (-1,)),
        ),
        classes=tuple(range(10)),
    )
    write_model_files(directory, DIGITS, estimator, x_train, signature)
    logger.info(
        "trained demo model", extra={"model": DIGITS, "accuracy": round(accuracy, 4)}
    )


@contextlib.contextmanager
def build_lock(directory: Path, name: str) -> Iterator[None]:
    """Hold the exclusive lock on building ``name`` in ``directory`` (blocks
    until no other process holds it).

    Callers check for the model again once they hold it: the process that
    waited finds what the other one built. A builder killed mid-write (kill -9,
    out of memory) leaves its temporary file; the next holder removes it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    # Opened for append: never truncated, never removed (removing a lock file
    # another process has open would let a third lock a new one).
    with (directory / f".{name}.build.lock").open("ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            _remove_dead_temporaries(directory, name)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_dead_temporaries(directory: Path, name: str) -> None:
    """Remove the temporaries of ``name``'s model files that a dead builder
    left. Called with the build lock held: every writer of these files holds
    it (``write_model_files`` runs only under it), so none is in use."""
    for suffix in MODEL_SUFFIXES:
        for stray in directory.glob(f".{name}{suffix}.*.tmp"):
            logger.warning(
                "removing a temporary file a dead builder left",
                extra={"model": name, "path": str(stray)},
            )
            stray.unlink(missing_ok=True)


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Have ``write`` write a temporary file next to ``path``, flush it to disk,
    then rename it over ``path``: a reader sees the old file or the whole new
    one. The temporary name is unique, so two writers never share one."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # mkstemp makes it 0600; a model is not a secret, and other users of
        # the directory (a host account reading a volume) may load it.
        os.chmod(tmp, 0o644)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_model_files(
    directory: Path,
    name: str,
    estimator: Any,
    reference: np.ndarray,
    signature: ModelSignature,
) -> None:
    """The three files of a model, each written atomically; the signature
    last, since its version is what :func:`_has_version` trusts."""
    import skops.io as sio

    directory.mkdir(parents=True, exist_ok=True)
    base = directory / name
    write_atomically(base.with_suffix(".skops"), lambda p: sio.dump(estimator, p))
    write_atomically(
        base.with_suffix(".reference.npy"), lambda p: _save_npy(p, reference)
    )
    write_atomically(
        base.with_suffix(".signature.json"), lambda p: p.write_text(signature.to_json())
    )


def _has_version(base: Path, version: str) -> bool:
    """True when all three files exist and the signature has ``version``."""
    paths = [base.with_suffix(s) for s in MODEL_SUFFIXES]
    if not all(p.exists() for p in paths):
        return False
    try:
        found = json.loads(base.with_suffix(".signature.json").read_text())["version"]
    except (ValueError, KeyError):
        return False
    return str(found) == version


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through a file object: given a path, numpy would append ".npy" to the
    # temporary name and the rename would miss it.
    with path.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)
