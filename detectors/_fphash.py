"""Fingerprint hashing for the ``fingerprint`` detector
(:mod:`detectors.fingerprint`): quantise each input, hash every window of
consecutive features with its position and a seed, keep the largest hash
values as the query's fingerprint, and key exact copies of an input.

The compiled loops are in :mod:`detectors._fpkernels`; the public functions
are re-exported from :mod:`detectors.fingerprint`.

Imports numpy and :mod:`detectors._fpkernels` (numba) only; nothing from
Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detectors._fpkernels import input_keys_rows, mix_array

HashArray = npt.NDArray[np.uint64]

# 2**64 / golden ratio, odd: spreads a seed over 64 bits.
_GOLDEN_INT = 0x9E3779B97F4A7C15


def mix(values: HashArray) -> HashArray:
    """splitmix64's finaliser, element-wise (uint64 arithmetic wraps)."""
    flat = mix_array(np.ascontiguousarray(values).ravel())
    return flat.reshape(values.shape)


def input_keys(X: npt.NDArray[np.float64]) -> npt.NDArray[np.uint64]:
    """One 64-bit key per input, equal for inputs equal at 8 bits per feature
    (an exact copy), different otherwise but for hash collisions. Never 0.

    Eight quantised features per 64-bit word, each word mixed with its
    position: an eighth of the mixing of one word per feature (the order is
    in :func:`detectors._fpkernels.input_keys_rows`).
    """
    return input_keys_rows(np.ascontiguousarray(X, dtype=np.float64))


def window_hashes(
    X: npt.NDArray[np.float64], *, levels: int, width: int, seed: int = 0
) -> HashArray:
    """Hash of every window of ``width`` consecutive quantised features.

    Parameters
    ----------
    X
        Rows (n, d) scaled to [0, 1]; values outside are clipped.
    levels
        Quantisation levels per feature (Blacklight's step of 50 on 0-255 is
        about 5).
    width
        Features per window; ``levels ** width`` must fit in 48 bits.
    seed
        Mixed into every hash, so two deployments do not share hash values.

    Returns
    -------
    ndarray
        Shape (n, d - width + 1), uint64, never 0. The window's position is
        part of its hash: the same strokes at another place are another window.
    """
    code = window_codes(X, levels=levels, width=width)
    return hash_codes(code, seed)


def window_codes(
    X: npt.NDArray[np.float64], *, levels: int, width: int
) -> npt.NDArray[np.uint64]:
    """Code (base ``levels`` digits) of every window of ``width`` quantised
    features; shape (n, d - width + 1), each below ``levels ** width``."""
    n, d = X.shape
    q = np.minimum((np.clip(X, 0.0, 1.0) * levels).astype(np.uint64), levels - 1)
    n_windows = d - width + 1
    code = np.zeros((n, n_windows), dtype=np.uint64)
    base = np.uint64(levels)
    for offset in range(width):
        code = code * base + q[:, offset : offset + n_windows]
    return code


def seed_salt(seed: int) -> int:
    """What a seed XORs into every window before mixing."""
    return (seed * _GOLDEN_INT) & 0xFFFF_FFFF_FFFF_FFFF


def hash_codes(code: npt.NDArray[np.uint64], seed: int) -> HashArray:
    """Window codes (n, w) to hash values, each mixed with its position."""
    n_windows = code.shape[1]
    position = np.arange(n_windows, dtype=np.uint64) << np.uint64(48)
    salt = np.uint64(seed_salt(seed))
    mixed = mix((code | position[None, :]) ^ salt)
    # 0 marks an empty slot in a fingerprint; a real hash of 0 becomes 1.
    mixed[mixed == 0] = 1
    return mixed


def top_hashes(hashes: HashArray, k: int, common: HashArray | None = None) -> HashArray:
    """The ``k`` largest hash values of each row, leaving out ``common`` ones.

    Parameters
    ----------
    hashes
        Window hashes (n, w), as :func:`window_hashes` returns.
    k
        Fingerprint size.
    common
        Sorted hash values seen in too many reference rows to tell queries
        apart (blank corners of a digit); never part of a fingerprint.

    Returns
    -------
    ndarray
        Shape (n, k), each row sorted descending; 0 fills rows with fewer than
        ``k`` usable windows.
    """
    values = hashes
    if common is not None and len(common):
        index = np.minimum(np.searchsorted(common, values), len(common) - 1)
        values = np.where(common[index] == values, np.uint64(0), values)
    width = values.shape[1]
    # numpy's partition and sort of uint64 rows, not a compiled loop: they
    # are vectorised (measured 0.13 µs per row of 59 against 0.9 µs for an
    # insertion into a sorted top k, whose branches the CPU cannot predict).
    if k >= width:
        chosen = values
    else:
        chosen = np.partition(values, width - k, axis=1)[:, width - k :]
    out: HashArray = np.sort(chosen, axis=1)[:, ::-1]
    if k > width:
        pad = np.zeros((len(out), k - width), dtype=np.uint64)
        out = np.concatenate([out, pad], axis=1)
    return np.ascontiguousarray(out)
