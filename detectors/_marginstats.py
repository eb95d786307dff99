"""The statistics the ``margin`` detector reads from answers.

Per answer: its margin and entropy (:func:`margins_and_entropy`). Per
client, over the order its answers arrived in: Kendall's tau of the window
(:func:`confidence_trend`), the Mann-Kendall S and its tie-corrected
variance of a key's first answers (:func:`mann_kendall`, extended answer by
answer as a key's opening grows, :func:`mann_kendall_extend`), and the
mid-rank table of honest margins with the decaying sums of a client's
ranks (:func:`rank_table`, :func:`rank_kernel`). The loops are compiled;
the detector (:mod:`detectors.margin`) says what each statistic catches
and when it is weak. The public functions are re-exported there.

Imports numpy and :mod:`detectors._jit` (numba) only; nothing from Kafka,
Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detectors._jit import jit


def margins_and_entropy(
    proba: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Top-1 minus top-2 probability and entropy over ``log(k)``, per row.

    Both in [0, 1]; a one-class answer has margin 1 and entropy 0.
    """
    p = np.clip(proba, 0.0, 1.0)
    k = p.shape[1]
    if k < 2:
        return np.ones(len(p)), np.zeros(len(p))
    top = np.partition(p, k - 2, axis=1)[:, k - 2 :]
    margin = top[:, 1] - top[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    entropy = -terms.sum(axis=1) / np.log(k)
    return np.clip(margin, 0.0, 1.0), np.clip(entropy, 0.0, 1.0)


def confidence_trend(
    ring: npt.NDArray[np.uint8],
    pos: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """Kendall's tau between arrival order and the ring's values, per ring.

    Parameters
    ----------
    ring
        Shape (n, W): each row a ring of quantised margins.
    pos, length
        Per ring, the next index to write and how many cells are filled.

    Returns
    -------
    array
        In [-1, 1]: +1 when every later answer is more confident than every
        earlier one, 0 for fewer than two answers. Ties count for neither
        side (tau-a), so the many equal margins of confident answers pull it
        towards 0, never away.

    Examples
    --------
    >>> ring = np.array([[40, 30, 10, 20]], dtype=np.uint8)  # oldest at 2
    >>> confidence_trend(ring, np.array([2]), np.array([4])).round(3).tolist()
    [0.667]
    """
    out = np.zeros(len(ring))
    if len(ring):
        trend_kernel(
            np.ascontiguousarray(ring, dtype=np.uint8),
            np.asarray(pos, dtype=np.int64) - np.asarray(length, dtype=np.int64),
            np.asarray(length, dtype=np.int64),
            out,
        )
    return out


@jit
def trend_kernel(
    ring: npt.NDArray[np.uint8],
    oldest: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    out: npt.NDArray[np.float64],
) -> None:
    """Kendall's tau-a per ring into ``out``; one pass over each ring's pairs
    (measured about 4 times cheaper than numpy's boolean pair tables)."""
    width = ring.shape[1]
    for r in range(ring.shape[0]):
        n = length[r]
        first = oldest[r] + width
        up = 0
        down = 0
        for i in range(n):
            a = ring[r, (first + i) % width]
            for j in range(i + 1, n):
                b = ring[r, (first + j) % width]
                if b > a:
                    up += 1
                elif b < a:
                    down += 1
        pairs = n * (n - 1) // 2
        out[r] = (up - down) / max(pairs, 1)


def mann_kendall(
    values: npt.NDArray[np.uint8], length: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mann-Kendall S and its variance under random order, per row.

    Parameters
    ----------
    values
        Shape (n, L), oldest first; only the first ``length[i]`` cells of row
        ``i`` count.
    length
        Filled cells per row.

    Returns
    -------
    tuple of arrays
        ``S`` (later-greater pairs minus later-smaller pairs) and its variance
        when every order of the values is equally likely, corrected for ties
        (Kendall 1975): ``(n(n-1)(2n+5) - sum t(t-1)(2t+5)) / 18`` over the
        groups of ``t`` equal values. ``S / sqrt(var)`` is close to standard
        normal from about 10 values on; the variances of independent rows add,
        which is what pooling a cohort relies on.

    Examples
    --------
    >>> s, v = mann_kendall(np.array([[1, 2, 3, 0]], dtype=np.uint8), np.array([3]))
    >>> s.tolist(), v.round(3).tolist()
    ([3.0], [3.667])
    """
    stat = np.zeros(len(values))
    var = np.zeros(len(values))
    if len(values):
        values = np.ascontiguousarray(values, dtype=np.uint8)
        mann_kendall_kernel(
            values,
            np.zeros(len(values), dtype=np.int64),
            np.asarray(length, dtype=np.int64),
            stat,
            var,
        )
    return stat, var


@jit
def mann_kendall_kernel(
    values: npt.NDArray[np.uint8],
    oldest: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    stat: npt.NDArray[np.float64],
    var: npt.NDArray[np.float64],
) -> None:
    """S and its tie-corrected variance per row of a ring read from
    ``oldest`` (cells wrap), into ``stat`` and ``var``."""
    width = values.shape[1]
    for r in range(values.shape[0]):
        n = length[r]
        first = oldest[r] + width
        s = 0
        ties = 0.0
        for i in range(n):
            a = values[r, (first + i) % width]
            equal = 1
            for j in range(n):
                if j == i:
                    continue
                b = values[r, (first + j) % width]
                if b == a:
                    equal += 1
                elif j > i:
                    s += 1 if b > a else -1
            # Each of a group of t equal values adds (t - 1)(2t + 5): the
            # group's t(t - 1)(2t + 5) of Kendall's correction.
            ties += (equal - 1.0) * (2.0 * equal + 5.0)
        size = float(n)
        var[r] = max((size * (size - 1.0) * (2.0 * size + 5.0) - ties) / 18.0, 0.0)
        stat[r] = float(s)


@jit
def mann_kendall_extend(
    values: npt.NDArray[np.uint8],
    oldest: npt.NDArray[np.int64],
    before: npt.NDArray[np.int64],
    stop: npt.NDArray[np.int64],
    stat: npt.NDArray[np.float64],
    var: npt.NDArray[np.float64],
) -> None:
    """Extend S and its tie-corrected variance per row of a ring read from
    ``oldest`` (cells wrap) from its first ``before`` values, whose results
    ``stat`` and ``var`` hold, to its first ``stop``: each new value is
    compared with the earlier ones once, so a key's whole stretch costs
    O(n^2) over its life rather than per batch. The ties' sum is recovered
    from the stored variance (an integer, rounded) and a value joining a
    group of ``c`` equal ones adds ``6 c (c + 2)`` to it, which is what
    :func:`mann_kendall_kernel` computes over the whole stretch."""
    width = values.shape[1]
    for r in range(values.shape[0]):
        first = oldest[r] + width
        size = float(before[r])
        ties = np.rint(size * (size - 1.0) * (2.0 * size + 5.0) - 18.0 * var[r])
        s = stat[r]
        for j in range(before[r], stop[r]):
            a = values[r, (first + j) % width]
            equal = 0
            for i in range(j):
                b = values[r, (first + i) % width]
                if a > b:
                    s += 1.0
                elif a < b:
                    s -= 1.0
                else:
                    equal += 1
            ties += 6.0 * equal * (equal + 2.0)
        size = float(max(stop[r], before[r]))
        var[r] = max((size * (size - 1.0) * (2.0 * size + 5.0) - ties) / 18.0, 0.0)
        stat[r] = s


def rank_table(
    margins: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.float64], float]:
    """Mid-rank of every quantised margin among ``margins``, and the variance
    of one answer's mid-rank when answers are drawn like ``margins``.

    Parameters
    ----------
    margins
        Honest answers' margins, quantised to 0..255.

    Returns
    -------
    tuple
        ``table[v]``: the share of ``margins`` below ``v`` plus half the share
        equal to it, so a value drawn like ``margins`` has mean rank exactly
        0.5 however many ties there are; and that rank's variance,
        ``(1 - sum p_v^3) / 12`` over the shares ``p_v`` of each value (1/12
        without ties, less with them: most confident answers tie at 255).

    Examples
    --------
    >>> table, var = rank_table(np.array([10, 10, 200, 255], dtype=np.uint8))
    >>> table[[10, 200, 255]].tolist(), round(var, 4)
    ([0.25, 0.625, 0.875], 0.0703)
    """
    counts = np.bincount(margins, minlength=256).astype(np.float64)
    share = counts / max(float(counts.sum()), 1.0)
    table = np.cumsum(share) - 0.5 * share
    return table, float((1.0 - np.sum(share**3)) / 12.0)


@jit
def rank_kernel(
    slots: npt.NDArray[np.int64],
    rank: npt.NDArray[np.float64],
    rows: npt.NDArray[np.uint8],
    decay: float,
    repeat_sq: float,
    weight: npt.NDArray[np.float64],
    weight_sq: npt.NDArray[np.float64],
    weighted: npt.NDArray[np.float64],
    last: npt.NDArray[np.uint8],
    has_last: npt.NDArray[np.uint8],
) -> None:
    """Fold each row's rank into its client's decaying sums, in arrival
    order (a client's rows of one batch decay each other in turn), except a
    row within ``repeat_sq`` (summed squared difference, in quantised levels)
    of the client's previous row: a retry or near-identical re-send repeats
    its predecessor's answer, and counting it again would make a run of
    copies weigh as independent evidence. Each row becomes its client's
    previous row."""
    width = rows.shape[1]
    for i in range(len(slots)):
        s = slots[i]
        repeat = False
        if has_last[s]:
            total = 0.0
            for j in range(width):
                diff = float(rows[i, j]) - float(last[s, j])
                total += diff * diff
            repeat = total <= repeat_sq
        for j in range(width):
            last[s, j] = rows[i, j]
        has_last[s] = 1
        if repeat:
            continue
        weight[s] = decay * weight[s] + 1.0
        weight_sq[s] = decay * decay * weight_sq[s] + 1.0
        weighted[s] = decay * weighted[s] + rank[i]
