"""Sums that equal numpy's to the bit, for compiled kernels.

``np.add.reduce`` over a contiguous float64 run does not add left to right:
below 8 values it does; up to 128 it keeps 8 interleaved running sums and
combines them as a tree; above that it halves the run (the first half a
multiple of 8) and adds the halves' sums. A kernel that must give the same
floats as the numpy code it replaced (``prada``'s Shapiro-Wilk sums,
``traffic``'s window statistics) adds in that order with
:func:`pairwise_sum`. The order is numpy's (2.x) internal choice:
``tests/detectors/test_numpysum.py`` fails if an upgrade changes it.

Imports numpy and ``detectors._jit`` only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detectors._jit import jit

_BLOCK = 128
"""Longest run numpy sums with its 8 accumulators rather than halving."""


@jit
def block_sum(values: npt.NDArray[np.float64], start: int, n: int) -> float:
    """numpy's pairwise sum of at most ``_BLOCK`` values."""
    if n < 8:
        total = 0.0
        for i in range(start, start + n):
            total += values[i]
        return float(total)
    r0, r1 = values[start], values[start + 1]
    r2, r3 = values[start + 2], values[start + 3]
    r4, r5 = values[start + 4], values[start + 5]
    r6, r7 = values[start + 6], values[start + 7]
    i = start + 8
    stop = start + n - n % 8
    while i < stop:
        r0 += values[i]
        r1 += values[i + 1]
        r2 += values[i + 2]
        r3 += values[i + 3]
        r4 += values[i + 4]
        r5 += values[i + 5]
        r6 += values[i + 6]
        r7 += values[i + 7]
        i += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < start + n:
        total += values[i]
        i += 1
    return float(total)


@jit
def pairwise_sum(values: npt.NDArray[np.float64], start: int, n: int) -> float:
    """Sum of ``values[start : start + n]`` added in the order of numpy's
    pairwise summation, so equal to ``np.add.reduce`` of that slice.

    Above a block, numpy recurses on two halves cut at a multiple of 8; the
    same tree is walked here with an explicit stack, because numba's cache
    cannot reload a self-recursive function (the process crashes).
    """
    if n <= _BLOCK:
        return block_sum(values, start, n)
    # Frames (first value, count, next step: 0 left half, 1 right, 2 add);
    # each level halves the count, so 64 frames hold any int64 count.
    frame_start = np.empty(64, dtype=np.int64)
    frame_n = np.empty(64, dtype=np.int64)
    frame_step = np.empty(64, dtype=np.int64)
    partial = np.empty(64, dtype=np.float64)
    frame_start[0], frame_n[0], frame_step[0] = start, n, 0
    depth, held = 1, 0
    while depth:
        top = depth - 1
        first, count = frame_start[top], frame_n[top]
        if count <= _BLOCK:
            partial[held] = block_sum(values, first, count)
            held += 1
            depth -= 1
            continue
        half = count // 2
        half -= half % 8
        step = frame_step[top]
        frame_step[top] = step + 1
        if step == 0:
            frame_start[depth], frame_n[depth], frame_step[depth] = first, half, 0
            depth += 1
        elif step == 1:
            frame_start[depth], frame_n[depth] = first + half, count - half
            frame_step[depth] = 0
            depth += 1
        else:
            held -= 1
            partial[held - 1] = partial[held - 1] + partial[held]
            depth -= 1
    return float(partial[0])
