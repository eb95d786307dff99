"""``held_out_digits``: the held-out half of the digits split, read from a
cache after the first call so that ``modelgate send --sample`` does not
import scikit-learn each time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway import models
from gateway.models import digits_split, held_out_digits


def _no_split() -> None:
    raise AssertionError("the split was computed instead of read")


def test_first_call_caches_and_later_calls_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = digits_split()[1]
    first = held_out_digits(tmp_path)
    np.testing.assert_array_equal(first, expected)
    assert len(list(tmp_path.glob("digits-held-out-*.npy"))) == 1
    monkeypatch.setattr(models, "digits_split", _no_split)
    np.testing.assert_array_equal(held_out_digits(tmp_path), expected)


@pytest.mark.parametrize("content", [b"not numpy", None])
def test_a_bad_cache_is_rebuilt(tmp_path: Path, content: bytes | None) -> None:
    held_out_digits(tmp_path)
    (path,) = tmp_path.glob("digits-held-out-*.npy")
    if content is None:  # a valid array of the wrong shape
        np.save(path, np.zeros((3, 5), dtype=np.float32))
    else:
        path.write_bytes(content)
    np.testing.assert_array_equal(held_out_digits(tmp_path), digits_split()[1])
    assert np.load(path).shape == (len(digits_split()[1]), 64)


def test_a_read_only_directory_still_answers(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the directory should be")
    np.testing.assert_array_equal(held_out_digits(blocked), digits_split()[1])
