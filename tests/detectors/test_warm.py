"""Whether a process must warm the kernels up (``warm_needed``), and the
worker's entry point that acts on it (``ensure_warm``), on a copy of a few
kernel modules in a temporary directory. The replay itself is replaced by a
recorder: compiling every kernel takes tens of seconds, and ``make test``
already runs the real one."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numba
import pytest

import detectors
from detectors import _jit, warm
from detectors._jit import drop_stale_kernels, mark_warm, warm_key, warm_needed

PACKAGE = Path(detectors.__file__).resolve().parent


@pytest.fixture
def package(tmp_path: Path) -> Path:
    copy = tmp_path / "pkg"
    copy.mkdir()
    for name in ("_numpysum.py", "_traffickernels.py", "bench.py"):
        shutil.copy(PACKAGE / name, copy / name)
    drop_stale_kernels(copy)  # as importing the package does
    return copy


def test_never_warmed_is_needed_then_not(package: Path) -> None:
    assert warm_needed(package)
    assert mark_warm(package)
    assert not warm_needed(package)


def test_an_edited_kernel_module_needs_it_again(package: Path) -> None:
    mark_warm(package)
    callee = package / "_numpysum.py"
    callee.write_text(callee.read_text() + "\n# edited\n")
    assert warm_needed(package)


def test_dropping_stale_kernels_drops_the_warm_stamp(package: Path) -> None:
    mark_warm(package)
    stamp = package / "__pycache__" / "modelgate-kernels.warm"
    assert stamp.exists()
    callee = package / "_numpysum.py"
    callee.write_text(callee.read_text() + "\n# edited\n")
    assert drop_stale_kernels(package)
    assert not stamp.exists()
    assert warm_needed(package)


def test_a_touched_kernel_module_needs_it_again(package: Path) -> None:
    """Same source, new modification time (a checkout): numba's own index
    is keyed on it and recompiles, so the warm-up must run."""
    mark_warm(package)
    module = package / "_traffickernels.py"
    st = module.stat()
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert warm_needed(package)


def test_a_module_without_kernels_does_not_count(package: Path) -> None:
    mark_warm(package)
    bench = package / "bench.py"
    bench.write_text(bench.read_text() + "\n# edited\n")
    assert not warm_needed(package)


def test_another_numba_or_cpu_needs_it_again(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark_warm(package)
    with monkeypatch.context() as patch:
        patch.setattr(numba, "__version__", "0.0.0")
        assert warm_needed(package)
    assert not warm_needed(package)
    monkeypatch.setattr(_jit.llvm, "get_host_cpu_name", lambda: "another-cpu")
    assert warm_needed(package)


def test_an_edit_during_the_warm_up_is_not_hidden(package: Path) -> None:
    key = warm_key(package)  # read before the kernels ran
    callee = package / "_numpysum.py"
    callee.write_text(callee.read_text() + "\n# edited meanwhile\n")
    mark_warm(package, key)
    assert warm_needed(package)


def test_a_read_only_cache_stays_needed(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As an installed image's site-packages is to its unprivileged user (the
    # tests may run as root, for whom a chmod would not bite).
    def refuse(self: Path, *args: Any, **kwargs: Any) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    assert not mark_warm(package)
    assert warm_needed(package)


# -- ensure_warm: what a worker calls before it consumes ---------------------------


class Replay:
    """Stands in for the benchmark replay; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        return {}


@pytest.fixture
def replay(monkeypatch: pytest.MonkeyPatch) -> Replay:
    fake = Replay()
    monkeypatch.setattr(warm, "measure", fake)
    monkeypatch.setattr(warm, "_ready", False)
    return fake


def test_a_stale_cache_is_warmed_once_and_logged(
    package: Path, replay: Replay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="detectors.warm")
    seconds = warm.ensure_warm(package)
    assert replay.calls == 1
    assert seconds > 0
    assert not warm_needed(package)
    done = [r for r in caplog.records if "warmed up in" in r.getMessage()]
    assert len(done) == 1, [r.getMessage() for r in caplog.records]
    assert done[0].__dict__["seconds"] == pytest.approx(seconds, abs=1e-3)

    assert warm.ensure_warm(package) == 0.0  # this process is ready now
    assert replay.calls == 1


def test_a_warm_cache_is_not_replayed(package: Path, replay: Replay) -> None:
    mark_warm(package)
    assert warm.ensure_warm(package) == 0.0
    assert replay.calls == 0


def test_a_process_warms_up_once_though_it_could_not_record_it(
    package: Path, replay: Replay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only cache: the stamp cannot be written, but the kernels this
    process compiled or loaded stay in memory for its other workers."""
    monkeypatch.setattr(warm, "mark_warm", lambda *a: False)
    warm.ensure_warm(package)
    warm.ensure_warm(package)
    assert replay.calls == 1
    assert warm_needed(package)


def test_workers_starting_together_warm_up_once(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second caller waits for the first one's warm-up, not replays it."""
    monkeypatch.setattr(warm, "_ready", False)
    entered = threading.Semaphore(0)
    second_started = threading.Event()
    calls: list[int] = []

    def slow_replay(**kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        entered.release()
        # Hold the warm-up until the other thread is running; without the
        # lock it would now enter the replay too.
        assert second_started.wait(10)
        return {}

    monkeypatch.setattr(warm, "measure", slow_replay)
    first = threading.Thread(target=warm.ensure_warm, args=(package,))
    first.start()
    assert entered.acquire(timeout=10)
    second = threading.Thread(target=warm.ensure_warm, args=(package,))
    second.start()
    second_started.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert calls == [1]


def test_the_worker_start_check_is_cheap_on_a_warm_cache() -> None:
    """``make test`` warmed the installed package first: deciding costs about
    a millisecond (the bound is loose for a loaded machine)."""
    if warm_needed(PACKAGE):
        pytest.skip("kernel cache not warm: run python -m detectors.warm")
    began = time.perf_counter()
    assert not warm_needed(PACKAGE)
    assert time.perf_counter() - began < 0.1


# -- hostile or broken stamps: a worker start never raises because of them -------


def test_a_garbage_warm_stamp_means_warm_up_again(
    package: Path, replay: Replay
) -> None:
    """Bytes that are not text (a torn write, a disk error, someone's junk)
    in the warm stamp: the cache is treated as stale, never as an error that
    fails the worker's start."""
    mark_warm(package)
    (package / "__pycache__" / "modelgate-kernels.warm").write_bytes(
        b"\xff\xfe\x00\x9c"
    )
    assert warm_needed(package)
    assert warm.ensure_warm(package) > 0
    assert replay.calls == 1
    assert not warm_needed(package)


def test_a_garbage_source_stamp_drops_the_cache_instead_of_failing_import(
    package: Path,
) -> None:
    """``drop_stale_kernels`` runs when ``detectors`` is imported: a stamp
    that is not text must not make every detector import raise."""
    stamp = package / "__pycache__" / "modelgate-kernels.digest"
    stamp.write_bytes(b"\xff\xfe\x00\x9c")
    assert drop_stale_kernels(package)
    assert not drop_stale_kernels(package)


def test_a_warm_stamp_that_is_a_directory_is_survived_and_leaves_no_litter(
    package: Path, replay: Replay
) -> None:
    cache = package / "__pycache__"
    (cache / "modelgate-kernels.warm").mkdir()
    assert warm_needed(package)
    assert not mark_warm(package)
    assert warm.ensure_warm(package) > 0  # warmed, could not record it
    assert sorted(p.name for p in cache.glob("modelgate-kernels.warm*")) == [
        "modelgate-kernels.warm"
    ]


def test_another_numba_cache_dir_needs_it_again(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image warms its kernels into ``NUMBA_CACHE_DIR`` at build and
    leaves the stamp in the package. Run with another cache directory (a
    tmpfs for a read-only root, say), the stamp still said warm, so every
    worker compiled its kernels inside its first batches instead of before
    consuming."""
    mark_warm(package)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "/elsewhere/numba-cache")
    assert warm_needed(package)
    mark_warm(package)
    assert not warm_needed(package)
