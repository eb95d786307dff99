"""Export the demo digits model as an MLServer model repository.

MLServer's scikit-learn runtime loads a joblib file, which is a pickle: loading
it can run code chosen by whoever wrote the file. We write it ourselves, from
the skops file (trusted-type load), into a directory only we write
(``var/mlserver/repo`` by default, or a test's temporary directory); MLServer
unpickles it in its own process and venv. modelgate itself never unpickles
anything.

Run as ``python -m gateway.backends.mlserver REPO [MODELS_DIR]``
(``infra/mlserver/mlserver.sh start`` does so on first use).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from gateway.models import DIGITS, DIGITS_MODEL_VERSION, ensure_digits_model, load_model

logger = logging.getLogger(__name__)

# MLServer's scikit-learn runtime names the class-probability output so.
PROBA_OUTPUT = "predict_proba"
# Server-wide MLServer settings. Ports are not here: the launcher passes them as
# MLSERVER_* environment variables, so one exported repository serves any port.
SERVER_SETTINGS = {
    "host": "127.0.0.1",
    # No separate metrics server (it would open a third port).
    "metrics_endpoint": None,
    # Inference in the server process itself, not in a pool of workers.
    "parallel_workers": 0,
    "debug": False,
    "load_models_at_startup": True,
}


def export_digits_repository(repo: Path, models_dir: Path) -> Path:
    """Write ``repo/settings.json`` and ``repo/digits/`` (the joblib model and
    its ``model-settings.json``, which declares the input as in our signature).
    Returns ``repo``."""
    import joblib  # type: ignore[import-untyped]

    ensure_digits_model(models_dir)
    served = load_model(models_dir, DIGITS)
    spec = served.signature.inputs[0]
    model_dir = repo / DIGITS
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / "model.joblib.tmp"
    joblib.dump(served.estimator, tmp)
    tmp.replace(model_dir / "model.joblib")
    model_settings = {
        "name": DIGITS,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": DIGITS_MODEL_VERSION},
        "inputs": [
            {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
        ],
        "outputs": [
            # predict_proba of a float64 pipeline: MLServer encodes it as FP64.
            {
                "name": PROBA_OUTPUT,
                "datatype": "FP64",
                "shape": [-1, len(served.signature.classes)],
            }
        ],
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    # settings.json last: the launcher takes its presence to mean "exported".
    (repo / "settings.json").write_text(json.dumps(SERVER_SETTINGS, indent=2))
    logger.info("exported MLServer repository", extra={"repo": str(repo)})
    return repo


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python -m gateway.backends.mlserver REPO [MODELS_DIR]")
        return 2
    models_dir = Path(argv[1]) if len(argv) > 1 else Path("var/models")
    export_digits_repository(Path(argv[0]), models_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
