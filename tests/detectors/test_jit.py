"""Cached kernels are dropped when any kernel module's source changes.

numba keys a cached kernel on its own source file only, so a kernel calling
a kernel of another module (``prada``'s and ``traffic``'s kernels call
``detectors._numpysum``) would otherwise keep a stale copy of the callee
after an edit to it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import detectors
from detectors._jit import drop_stale_kernels, kernel_digest

PACKAGE = Path(detectors.__file__).resolve().parent


def _package_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "pkg"
    copy.mkdir()
    for name in ("_numpysum.py", "_traffickernels.py", "bench.py"):
        shutil.copy(PACKAGE / name, copy / name)
    return copy


def _fake_cache(package: Path) -> list[Path]:
    cache = package / "__pycache__"
    cache.mkdir(exist_ok=True)
    files = [cache / "_traffickernels.gap_stats-1.py311.nbi", cache / "x.py311.1.nbc"]
    for path in files:
        path.write_bytes(b"compiled")
    return files


def test_cached_kernels_stay_while_the_sources_are_unchanged(tmp_path: Path) -> None:
    package = _package_copy(tmp_path)
    assert drop_stale_kernels(package)  # no digest yet: nothing is trusted
    files = _fake_cache(package)
    assert not drop_stale_kernels(package)
    assert all(path.exists() for path in files)


def test_an_edited_callee_module_drops_every_cached_kernel(tmp_path: Path) -> None:
    package = _package_copy(tmp_path)
    drop_stale_kernels(package)
    files = _fake_cache(package)
    callee = package / "_numpysum.py"
    callee.write_text(callee.read_text() + "\n# edited\n")
    assert drop_stale_kernels(package)
    assert not any(path.exists() for path in files)
    assert not drop_stale_kernels(package)


def test_only_kernel_modules_count(tmp_path: Path) -> None:
    package = _package_copy(tmp_path)
    before = kernel_digest(package)
    bench = package / "bench.py"  # no kernel in it
    bench.write_text(bench.read_text() + "\n# edited\n")
    assert kernel_digest(package) == before


def test_a_read_only_cache_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _package_copy(tmp_path)
    drop_stale_kernels(package)
    files = _fake_cache(package)
    (package / "_traffickernels.py").write_text("@jit\n")

    # As an installed image's site-packages is to its unprivileged user (the
    # tests may run as root, for whom a chmod would not bite).
    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    assert not drop_stale_kernels(package)
    assert all(path.exists() for path in files)


def test_the_installed_package_cache_matches_its_sources() -> None:
    # Importing detectors ran the check; the kernels in use were built (or
    # will be) from the sources as they are now.
    stamp = PACKAGE / "__pycache__" / "modelgate-kernels.digest"
    assert stamp.read_text() == kernel_digest(PACKAGE)


def test_kernels_import_and_run_where_no_cache_can_be_written(tmp_path: Path) -> None:
    # The container image's service user may write neither site-packages
    # nor its home; numba then refused the import of every kernel module.
    # A regular file where a directory should be blocks each place numba
    # tries, whoever runs the test: the package's __pycache__, the user-wide
    # cache under XDG_CACHE_HOME (and HOME), and NUMBA_CACHE_DIR is unset.
    site = tmp_path / "site"
    shutil.copytree(
        PACKAGE, site / "detectors", ignore=shutil.ignore_patterns("__pycache__")
    )
    (site / "detectors" / "__pycache__").write_text("not a directory")
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("NUMBA_")
    }
    env.update(
        PYTHONPATH=str(site),
        HOME=str(blocked),
        XDG_CACHE_HOME=str(blocked / "cache"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    script = (
        "import numpy as np\n"
        "from detectors._numpysum import block_sum\n"
        "import detectors.margin, detectors.registry\n"
        "print(block_sum(np.ones(6), 0, 6))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "6.0"
    assert "no writable numba cache" in result.stderr
