"""Margin detector: a client whose answers sit on the decision boundary.

Active-learning thieves (uncertainty sampling, Papernot-style Jacobian
augmentation, boundary walks) choose queries the model is unsure about,
because those teach a substitute the most. Honest inputs are mostly far from
the boundary, so the model answers them with a clear winner. This detector
counts, over each client's last ``window`` answers, the share that are
*uncertain* (top-1 minus top-2 probability below ``margin_at``, or normalised
entropy above ``entropy_at``) and compares it with the share among honest
clients' answers.

It needs the model's answers, so it learns in
:meth:`~detectors.base.Detector.observe_outputs` (after the model call) and
its score judges the client's next queries.

Imports numpy and pydantic only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from detectors._ring import push_ring
from detectors._state import FieldSpec, check_ring_counters, group_rows
from detectors.base import Detector, DetectorParams, DetectorScore

logger = logging.getLogger(__name__)

_LEVELS = 255.0
"""Margins and entropies are kept per client as uint8 in [0, 255]."""


class MarginParams(DetectorParams):
    """Parameters of :class:`MarginDetector`."""

    window: int = Field(64, ge=8, le=4096)
    """Recent answers per client over which the uncertain share is taken."""

    margin_at: float = Field(0.2, gt=0.0, le=1.0)
    """An answer whose top-1 minus top-2 probability is below this is
    uncertain."""

    entropy_at: float = Field(0.9, gt=0.0, le=1.0)
    """An answer whose entropy over ``log(k)`` is above this is uncertain."""

    baseline_size: int = Field(4096, ge=64, le=1_000_000)
    """Honest answers kept as the baseline (the newest replace the oldest)."""

    threshold: float = Field(0.3, gt=0.0, le=1.0)
    """Excess uncertain share (see the class) at which a client is flagged."""

    min_answers: int = Field(20, ge=1, le=100_000)
    """Answers a client must have had before it can be flagged."""


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


class MarginDetector(Detector[MarginParams]):
    """Excess share of uncertain answers among a client's last ``window``.

    With ``s`` the client's uncertain share and ``b`` the honest share (from
    the baseline of answers to the reference data and to clients in good
    standing), the score is ``max(0, s - b) / (1 - b)``: 0 at or below honest
    behaviour, 1 when every answer is uncertain.

    Score: in [0, 1], higher is more suspicious. Warm once the client has had
    ``min_answers`` answers.

    When it is weak:

    - equation-solving and random-query thieves (Tramèr et al. 2016) do not
      aim at the boundary: on the demo digits pipeline only 13% of uniform
      random inputs get a margin under 0.2 (honest: 2%), a score of about
      0.06, so this detector does not see them; ``coverage`` and ``ood`` do;
    - a thief that mixes honest-looking queries into its stream dilutes the
      share (by the mixing ratio);
    - the honest share comes from the reference (training) data until honest
      traffic replaces it; training data sits further from the boundary than
      new data, so set ``threshold`` with ``modelgate calibrate``;
    - answers degraded by policy are still judged on the model's raw output,
      which is what the query's position tells.

    Per-client state: two rings of ``window`` uint8 (margin and entropy) and
    three counters, 152 bytes at the default window.
    """

    name: ClassVar[str] = "margin"
    Params: ClassVar[type[MarginParams]] = MarginParams
    _mutable_params: ClassVar[frozenset[str]] = frozenset(
        {"margin_at", "entropy_at", "threshold", "min_answers"}
    )
    observes_outputs: ClassVar[bool] = True

    def __init__(self, params: MarginParams | None = None, *, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        size = self._params.baseline_size
        self._base_margin = np.zeros(size, dtype=np.float64)
        self._base_entropy = np.zeros(size, dtype=np.float64)
        self._base_pos = 0
        self._base_len = 0
        self._base_share: tuple[float, float, float] | None = None

    @property
    def baseline_share(self) -> float | None:
        """Share of honest answers that are uncertain; None before any."""
        if self._base_len == 0:
            return None
        p = self._params
        cached = self._base_share
        if cached is None or cached[:2] != (p.margin_at, p.entropy_at):
            n = self._base_len
            uncertain = (self._base_margin[:n] < p.margin_at) | (
                self._base_entropy[:n] > p.entropy_at
            )
            cached = (p.margin_at, p.entropy_at, float(uncertain.mean()))
            self._base_share = cached
        return cached[2]

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        window = self._params.window
        return {
            "margin": FieldSpec((window,), "u1"),
            "entropy": FieldSpec((window,), "u1"),
            "pos": FieldSpec((), "<i8"),
            "len": FieldSpec((), "<i8"),
            "n_answers": FieldSpec((), "<i8"),
        }

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        check_ring_counters(values, "margin", "pos", "len")
        if int(values["n_answers"]) < int(values["len"]):
            raise ValueError("state field 'n_answers' is below 'len'")

    def _learn_baseline_rows(
        self, margin: npt.NDArray[np.float64], entropy: npt.NDArray[np.float64]
    ) -> None:
        size = self._params.baseline_size
        margin, entropy = margin[-size:], entropy[-size:]
        at = (self._base_pos + np.arange(len(margin))) % size
        self._base_margin[at] = margin
        self._base_entropy[at] = entropy
        self._base_pos = int((self._base_pos + len(margin)) % size)
        self._base_len = min(self._base_len + len(margin), size)
        self._base_share = None

    def _learn_output_baseline(
        self, X: npt.NDArray[np.float64], proba: npt.NDArray[np.float64]
    ) -> None:
        self._learn_baseline_rows(*margins_and_entropy(proba))

    def _observe_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        proba: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> None:
        assert self._arena is not None
        arrays = self._arena.arrays
        margin, entropy = margins_and_entropy(proba)
        if learn.any():
            # Only clients in good standing teach what honest answers are.
            self._learn_baseline_rows(margin[learn], entropy[learn])
        groups = group_rows(slots)
        order = groups.order
        # Two rings share pos/len: push the first on copies of the counters.
        # No windows are wanted here (rows=[]): scoring reads the rings.
        none = np.zeros(0, dtype=np.int64)
        push_ring(
            arrays["margin"],
            arrays["pos"].copy(),
            arrays["len"].copy(),
            groups,
            np.rint(margin[order] * _LEVELS).astype(np.uint8),
            0,
            none,
        )
        push_ring(
            arrays["entropy"],
            arrays["pos"],
            arrays["len"],
            groups,
            np.rint(entropy[order] * _LEVELS).astype(np.uint8),
            0,
            none,
        )
        arrays["n_answers"][groups.unique] += groups.size

    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        # Nothing here changes: the answers to these rows are not known yet.
        assert self._arena is not None
        arrays = self._arena.arrays
        p = self._params
        length = arrays["len"][slots]
        filled = np.arange(p.window)[None, :] < length[:, None]
        uncertain = (arrays["margin"][slots] < p.margin_at * _LEVELS) | (
            arrays["entropy"][slots] > p.entropy_at * _LEVELS
        )
        count = (uncertain & filled).sum(axis=1)
        share = count / np.maximum(length, 1)
        base = self.baseline_share
        honest = 0.0 if base is None else base
        score = np.clip((share - honest) / max(1.0 - honest, 1e-9), 0.0, 1.0)
        warm = arrays["n_answers"][slots] >= p.min_answers
        margin_at, entropy_at = p.margin_at, p.entropy_at

        def evidence(row: int) -> str:
            return (
                f"{count[row]} of the last {length[row]} answers were uncertain "
                f"(margin under {margin_at:g} or entropy over {entropy_at:g}); "
                f"honest share {honest:.1%}"
            )

        return self._scores(score, warm, evidence)
