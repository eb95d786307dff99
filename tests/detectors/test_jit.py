"""Cached kernels are dropped when any kernel module's source changes.

numba keys a cached kernel on its own source file only, so a kernel calling
a kernel of another module (``prada``'s and ``traffic``'s call
``detectors._numpysum``) would otherwise keep a stale copy of the callee
after an edit to it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import detectors
from detectors._jit import drop_stale_kernels, kernel_digest

PACKAGE = Path(detectors.__file__).resolve().parent


def _package_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "pkg"
    copy.mkdir()
    for name in ("_numpysum.py", "traffic.py", "bench.py"):
        shutil.copy(PACKAGE / name, copy / name)
    return copy


def _fake_cache(package: Path) -> list[Path]:
    cache = package / "__pycache__"
    cache.mkdir(exist_ok=True)
    files = [cache / "traffic._gap_stats-1.py311.nbi", cache / "x.py311.1.nbc"]
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
    (package / "traffic.py").write_text("@jit\n")

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
