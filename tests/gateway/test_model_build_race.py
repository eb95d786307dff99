"""Two real processes building the same model into one directory at once (the
worker and the poisoning guard starting together on one docker-compose
volume) end with one valid model, built once, and no torn or stray file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gateway.models import DIGITS, _save_npy, load_model, write_atomically
from gateway.zoo import BREAST_CANCER, ensure_model

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]

# Waits for the start file, so both processes reach the build together (the
# imports, which take seconds, are done by then), then builds.
_BUILDER = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from gateway.backends import load_backend
from gateway.config import BackendConfig
directory, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
print("ready", flush=True)
deadline = time.monotonic() + 60
while not go.exists():
    assert time.monotonic() < deadline, "never told to start"
    time.sleep(0.002)
model = load_backend(directory, name, BackendConfig())
print("loaded", model.signature.name, model.signature.version, flush=True)
"""


@pytest.mark.parametrize("name", [DIGITS, BREAST_CANCER])
def test_two_processes_building_one_model_build_it_once(
    tmp_path: Path, name: str
) -> None:
    models = tmp_path / "models"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILDER, str(models), name, str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:  # both past their imports, polling for the start file
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        go.touch()
        outputs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all(f"loaded {name}" in out for out in outputs), outputs
    # Built by one process; the other waited on the lock and loaded it.
    built = sum(out.count("trained") for out in outputs)
    assert built == 1, outputs

    model = load_model(models, name)
    assert model.predict_proba(model.reference[:3]).shape[0] == 3
    files = sorted(p.name for p in models.iterdir())
    assert files == sorted(
        [
            f"{name}.skops",
            f"{name}.reference.npy",
            f"{name}.signature.json",
            f".{name}.build.lock",
        ]
    ), files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "m.reference.npy"
    path.write_bytes(b"old")

    def half_then_fail(p: Path) -> None:
        p.write_bytes(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.reference.npy"]
    write_atomically(path, lambda p: _save_npy(p, np.zeros(2)))
    assert np.load(path).shape == (2,)


# Builds ``name`` with skops' dump replaced by one that writes half a file,
# says so, then waits to be killed: a builder killed -9 mid-write.
_KILLED_BUILDER = """
import sys
from pathlib import Path
import skops.io
def half_then_hang(obj, path):
    Path(path).write_bytes(b"half a mod")
    print("writing", flush=True)
    sys.stdin.read()
skops.io.dump = half_then_hang
from gateway.zoo import ensure_model
ensure_model(Path(sys.argv[1]), sys.argv[2])
"""


def test_a_builder_killed_mid_write_leaves_nothing_the_next_one_keeps(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BUILDER, str(models), BREAST_CANCER],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert killed.stdout is not None
        assert killed.stdout.readline().strip() == "writing"
    finally:
        killed.kill()  # SIGKILL: no finally, no cleanup in the builder
        killed.communicate()
    # The kill left the lock file and a torn temporary, nothing else.
    stray = [p.name for p in models.iterdir() if p.name.endswith(".tmp")]
    assert len(stray) == 1 and stray[0].startswith(f".{BREAST_CANCER}.skops.")

    # The next builder gets the lock (the kernel released it with the dead
    # process), builds the model whole and clears the dead one's temporary.
    ensure_model(models, BREAST_CANCER)
    model = load_model(models, BREAST_CANCER)
    assert model.predict_proba(model.reference[:3]).shape[0] == 3
    files = sorted(p.name for p in models.iterdir())
    assert files == sorted(
        [
            f"{BREAST_CANCER}.skops",
            f"{BREAST_CANCER}.reference.npy",
            f"{BREAST_CANCER}.signature.json",
            f".{BREAST_CANCER}.build.lock",
        ]
    ), files
