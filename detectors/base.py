"""The detector contract: scores, validated parameters and per-client state.

A detector reads each client's stream of queries and says how suspicious the
client looks, with a sentence of evidence. It keeps bounded per-client state
that serialises to bytes (for hand-over between workers) and may keep a shared
baseline of what normal queries look like. Policy (allow, flag, block, shadow
mode) is not a detector's job.

Imports numpy, pydantic and msgspec only; nothing from Kafka, Redis, FastAPI or
``gateway``, and it never configures logging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from detectors._state import (
    STATE_FORMAT,
    FieldSpec,
    SlotArena,
    StateBlob,
    decode_blob,
    describe_layout,
    encode_blob,
)

MAX_STATE_BYTES = 32_768
"""Per-client state budget of every detector (issue 3: at most 32 KB)."""


@dataclass(frozen=True, slots=True)
class DetectorScore:
    """One detector's judgement of one client, just after one of its queries.

    Attributes
    ----------
    detector
        Name of the detector that produced the score.
    score
        Finite; higher means more suspicious. Each detector documents its range.
    threshold
        Score at or above which the client is flagged.
    flagged
        ``warm and score >= threshold``.
    evidence
        One sentence a person can read, naming what was counted.
    warm
        Whether the detector has seen enough of this client (and, where it has
        one, enough baseline) to judge. A cold score is never flagged.
    """

    detector: str
    score: float
    threshold: float
    flagged: bool
    evidence: str
    warm: bool


class DetectorParams(BaseModel):
    """Base of every detector's parameter model: frozen, unknown keys refused.

    Every detector flags a warm client whose score reaches ``threshold``;
    subclasses set its default and bounds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(0.5, gt=0.0)
    """Score at or above which a warm client is flagged."""


P = TypeVar("P", bound=DetectorParams)


def describe_validation_error(exc: pydantic.ValidationError) -> str:
    """Pydantic's errors as ``field: message; ...`` so the field is named."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or '(model)'}: {err['msg']}"
        for err in exc.errors()
    )


class Detector(ABC, Generic[P]):
    """Base of every detector.

    Subclasses set ``name``, ``Params`` (a :class:`DetectorParams` model holding
    every tunable, with bounds) and ``_mutable_params`` (those that may change
    while running), then implement :meth:`_layout` and :meth:`_score_rows`.

    Per-client state lives in a :class:`~detectors._state.SlotArena` created
    once the feature count is known; this class implements the state API on top
    of it, so every detector serialises, forgets and measures state the same way.
    A new detector (issue 3's suite) declares its per-client arrays in
    ``_layout``, updates them vectorised in ``_score_rows`` (see
    :func:`~detectors._state.push_window` for a window of flags), and is added
    to :data:`detectors.registry.DETECTORS`; the common test battery then runs
    on it.

    One feature space per instance: the first batch fixes ``d``, so a gateway
    serving several models keeps one set of detectors per model. Not
    thread-safe: call one instance from one thread at a time (an executor
    thread is fine; two at once are not).

    Parameters
    ----------
    params
        Validated parameters; the defaults of ``Params`` when omitted.
    seed
        Seed of any randomness, so equal inputs give equal scores.
    """

    name: ClassVar[str]
    Params: ClassVar[type[DetectorParams]]
    _mutable_params: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: P | None = None, *, seed: int = 0) -> None:
        if params is None:
            params = cast(P, self.Params())
        elif not isinstance(params, self.Params):
            raise TypeError(
                f"{self.name}: params must be {self.Params.__name__}, "
                f"not {type(params).__name__}"
            )
        self._params: P = params
        self._seed = seed
        self._n_features: int | None = None
        self._arena: SlotArena | None = None

    # -- parameters ---------------------------------------------------------

    @property
    def params(self) -> P:
        return self._params

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def n_features(self) -> int | None:
        """Features per query, fixed by the first batch (or loaded state)."""
        return self._n_features

    def set_params(self, **changes: Any) -> None:
        """Change parameters while running.

        Only names in ``_mutable_params`` may take a new value; passing a
        structural parameter with its current value is accepted, so a whole
        configuration can be re-applied. Nothing changes unless every value is
        valid.

        Raises
        ------
        ValueError
            Naming the field: unknown, invalid, or not changeable while running.
        """
        fields = type(self._params).model_fields
        for key in changes:
            if key not in fields:
                raise ValueError(f"{self.name}: unknown parameter {key!r}")
        try:
            updated = self.Params.model_validate(
                {**self._params.model_dump(), **changes}
            )
        except pydantic.ValidationError as exc:
            raise ValueError(
                f"{self.name}: invalid {describe_validation_error(exc)}"
            ) from exc
        for key in changes:
            if key in self._mutable_params:
                continue
            if getattr(updated, key) != getattr(self._params, key):
                raise ValueError(
                    f"{self.name}: parameter {key!r} cannot change while running "
                    "(it shapes stored or shared state); restart with the new value"
                )
        self._params = cast(P, updated)

    # -- scoring ------------------------------------------------------------

    def score_batch(
        self,
        client_ids: Sequence[str],
        X: npt.NDArray[np.float64],
        *,
        learn: Sequence[bool] | npt.NDArray[np.bool_] | None = None,
    ) -> list[DetectorScore]:
        """Score a batch of queries, updating each client's state row by row.

        Parameters
        ----------
        client_ids
            Client of each row. A client may appear several times; its rows are
            applied in order, so the result equals scoring them one at a time.
        X
            Float64 array of shape (n, d), each feature already scaled to [0, 1]
            by the caller (the gateway scales per model:
            ``gateway.validation.feature_scale``).
        learn
            Per row, whether the client is in good standing so the row may
            update a shared baseline (a flagged client never shapes what normal
            means). Per-client state always updates. Default: every row.

        Returns
        -------
        list of DetectorScore
            One per row, in row order.

        Raises
        ------
        ValueError
            Wrong shape, a non-finite value, or a feature count different from
            the one this detector was first used with.
        """
        rows = self._check_rows(X)
        if len(client_ids) != rows.shape[0]:
            raise ValueError(
                f"{self.name}: {len(client_ids)} client ids for {rows.shape[0]} rows"
            )
        if learn is None:
            learn_mask = np.ones(rows.shape[0], dtype=bool)
        else:
            learn_mask = np.asarray(learn, dtype=bool)
            if learn_mask.shape != (rows.shape[0],):
                raise ValueError(
                    f"{self.name}: learn has shape {learn_mask.shape}, "
                    f"expected ({rows.shape[0]},)"
                )
        if rows.shape[0] == 0:
            return []
        arena = self._ensure_arena(rows.shape[1])
        slots = arena.slots(client_ids)
        return self._score_rows(slots, rows, learn_mask)

    def learn_baseline(self, X: npt.NDArray[np.float64]) -> None:
        """Learn the shared baseline of normal queries from reference data.

        The gateway calls it at start with the model's training sample, scaled
        like queries. Detectors without a shared baseline ignore it.
        """
        rows = self._check_rows(X)
        if rows.shape[0]:
            self._ensure_arena(rows.shape[1])
            self._learn_baseline(rows)

    # -- per-client state ---------------------------------------------------

    def clients(self) -> list[str]:
        """Clients that currently hold state, in first-seen order."""
        return [] if self._arena is None else self._arena.clients()

    def forget(self, client_id: str) -> None:
        """Drop a client's state; unknown clients are ignored."""
        if self._arena is not None:
            self._arena.release(client_id)

    def state_nbytes(self, client_id: str) -> int:
        """Bytes of memory the client's state holds (0 if it holds none).

        The same for every client whatever the length of its stream.
        """
        if self._arena is None or self._arena.get(client_id) is None:
            return 0
        return self._arena.slot_nbytes

    def dump_state(self, client_id: str) -> bytes | None:
        """The client's state as bytes, or ``None`` if it holds none."""
        if self._arena is None or self._n_features is None:
            return None
        fields = self._arena.dump(client_id)
        if fields is None:
            return None
        return encode_blob(
            StateBlob(
                format=STATE_FORMAT,
                detector=self.name,
                n_features=self._n_features,
                layout=self._arena.layout,
                fields=fields,
            )
        )

    def load_state(self, client_id: str, blob: bytes) -> None:
        """Replace the client's state with one :meth:`dump_state` produced.

        Raises
        ------
        ValueError
            The blob is malformed, from another detector, or from one whose
            structural parameters or feature count differ.
        """
        state = decode_blob(blob)
        if state.detector != self.name:
            raise ValueError(
                f"{self.name}: state belongs to detector {state.detector!r}"
            )
        if self._n_features is not None and state.n_features != self._n_features:
            raise ValueError(
                f"{self.name}: state has {state.n_features} features, "
                f"this detector uses {self._n_features}"
            )
        if state.n_features < 1:
            raise ValueError(f"{self.name}: state has no feature count")
        expected = describe_layout(self._layout(state.n_features))
        if state.layout != expected:
            raise ValueError(
                f"{self.name}: state layout {state.layout!r} differs from "
                f"{expected!r}; a structural parameter changed"
            )
        self._ensure_arena(state.n_features).load(
            client_id, state.fields, self._check_state
        )

    # -- for subclasses -----------------------------------------------------

    @abstractmethod
    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        """Per-client state fields for queries of ``n_features`` features."""

    @abstractmethod
    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        """Score validated rows whose clients already hold slots."""

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        """Raise ``ValueError`` if loaded per-client arrays break an invariant.

        Blobs come back from a shared store; a corrupt one must be refused
        rather than crash a later batch.
        """
        return None

    def _learn_baseline(self, X: npt.NDArray[np.float64]) -> None:
        """Learn from validated reference rows; no-op without a baseline."""
        return None

    def _on_n_features(self, n_features: int) -> None:
        """Called once when the feature count becomes known."""
        return None

    def _ensure_arena(self, n_features: int) -> SlotArena:
        if self._n_features is None:
            self._on_n_features(n_features)
            self._arena = SlotArena(self._layout(n_features))
            self._n_features = n_features
        elif n_features != self._n_features:
            raise ValueError(
                f"{self.name}: rows have {n_features} features, "
                f"this detector uses {self._n_features}"
            )
        assert self._arena is not None
        return self._arena

    def _check_rows(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        rows = np.asarray(X, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise ValueError(f"{self.name}: X must have shape (n, d), not {rows.shape}")
        if not np.isfinite(rows).all():
            raise ValueError(f"{self.name}: X holds NaN or infinity")
        return rows

    def _scores(
        self,
        score: npt.NDArray[np.float64],
        warm: npt.NDArray[np.bool_],
        evidence: list[str],
    ) -> list[DetectorScore]:
        """One :class:`DetectorScore` per row from per-row arrays.

        Raises
        ------
        ArithmeticError
            If a score is not finite: a bug, stopped here so it cannot reach
            policy as NaN.
        """
        if not np.isfinite(score).all():
            raise ArithmeticError(f"{self.name}: non-finite score")
        name = self.name
        threshold = self._params.threshold
        flagged = warm & (score >= threshold)
        return [
            DetectorScore(name, value, threshold, flag, text, ready)
            for value, flag, text, ready in zip(
                score.tolist(), flagged.tolist(), evidence, warm.tolist(), strict=True
            )
        ]
