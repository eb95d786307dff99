"""The detector contract: scores, validated parameters and per-client state.

A detector reads each client's stream of queries and says how suspicious the
client looks, with a sentence of evidence. It keeps bounded per-client state
that serialises to bytes (for hand-over between workers) and may keep a shared
baseline of what normal queries look like. Policy (allow, flag, block, shadow
mode) is not a detector's job.

The score type and how a batch of scores is built live in
:mod:`detectors._score` (:class:`DetectorScore` is re-exported here).

Imports numpy, pydantic and msgspec only; nothing from Kafka, Redis, FastAPI or
``gateway``, and it never configures logging.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from detectors._score import DetectorScore as DetectorScore
from detectors._score import Evidence as Evidence
from detectors._score import batch_scores
from detectors._state import (
    STATE_FORMAT,
    FieldSpec,
    LayoutMigration,
    SlotArena,
    StateBlob,
    decode_blob,
    decode_fields,
    describe_layout,
    encode_blob,
    encode_fields,
)
from detectors.baselines import (
    BASELINE_FORMAT,
    BaselineBlob,
    BaselineRefused,
    decode_baseline,
    encode_baseline,
)

MAX_STATE_BYTES = 32_768
"""Per-client state budget of every detector (issue 3: at most 32 KB)."""


LiveBaseline = tuple[dict[str, bytes], int, bool]
"""A detector's live baseline: its fields as bytes, the honest samples it
holds, and whether that is enough for the detector to use it."""


class DetectorParams(BaseModel):
    """Base of every detector's parameter model: frozen, unknown keys refused.

    Every detector flags a warm client whose score reaches ``threshold``;
    subclasses set its default and bounds.
    """

    # NaN and infinity are refused as not finite before any bound is
    # checked, so every parameter gives the same message for them.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

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
    :func:`~detectors._state.push_window` for a window of flags), returns
    ``self._scores(score, warm, evidence)`` with ``evidence`` a formatter of
    one row (formatting a sentence per row would cost more than scoring it),
    and is added to :data:`detectors.registry.DETECTORS`; the common test
    battery then runs on it. ``modelgate bench detectors`` then counts it
    against the suite's 20 µs per query and 32 KB per client.

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
    observes_outputs: ClassVar[bool] = False
    """Whether :meth:`observe_outputs` does anything (else the gateway may skip
    the call)."""
    observes_outcomes: ClassVar[bool] = False
    """Whether :meth:`observe_outcomes` does anything."""

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
        # Arrival times (wall clock, seconds) of the rows being scored, set by
        # score_batch for the duration of _score_rows; None when not given.
        # An attribute rather than an argument of _score_rows so that the
        # detectors that ignore time keep their signature.
        self._arrival_s: npt.NDArray[np.float64] | None = None

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
        arrival_s: Sequence[float] | npt.NDArray[np.float64] | None = None,
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
        arrival_s
            Per row, when the query arrived (wall clock, seconds), not
            decreasing within a client. Only timing detectors (``traffic``)
            read it; without it they take the time of the call for every row.

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
        times = None
        if arrival_s is not None:
            times = np.asarray(arrival_s, dtype=np.float64)
            if times.shape != (rows.shape[0],) or not np.isfinite(times).all():
                raise ValueError(
                    f"{self.name}: arrival_s must be {rows.shape[0]} finite times"
                )
        if rows.shape[0] == 0:
            return []
        arena = self._ensure_arena(rows.shape[1])
        slots = arena.slots(client_ids)
        self._arrival_s = times
        try:
            return self._score_rows(slots, rows, learn_mask)
        finally:
            self._arrival_s = None

    def observe_outputs(
        self,
        client_ids: Sequence[str],
        X: npt.NDArray[np.float64],
        proba: npt.NDArray[np.float64],
        *,
        learn: Sequence[bool] | npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """Show the detector the model's answers to queries already scored.

        Called after the model, on the rows it answered (a refused query
        reveals nothing, so it is not shown). What a detector learns here can
        only change the scores of the client's *next* queries: policy decides
        before the model runs, because a query it refuses must never reach the
        model. No-op unless ``observes_outputs``.

        Parameters
        ----------
        client_ids, X, learn
            As in :meth:`score_batch` (``X`` scaled to [0, 1]).
        proba
            Float array (n, k) of the model's class probabilities per row,
            before any degrading of the answer.

        Raises
        ------
        ValueError
            Shapes that do not match, or a non-finite value.
        """
        if not self.observes_outputs:
            return
        rows = self._check_rows(X)
        answers = np.asarray(proba, dtype=np.float64)
        n = rows.shape[0]
        if len(client_ids) != n or answers.ndim != 2 or answers.shape[0] != n:
            raise ValueError(
                f"{self.name}: {len(client_ids)} client ids, {n} rows and "
                f"probabilities of shape {answers.shape} do not match"
            )
        if not np.isfinite(answers).all():
            raise ValueError(f"{self.name}: probabilities hold NaN or infinity")
        learn_mask = (
            np.ones(n, dtype=bool) if learn is None else np.asarray(learn, dtype=bool)
        )
        if learn_mask.shape != (n,):
            raise ValueError(f"{self.name}: learn has shape {learn_mask.shape}")
        if n == 0:
            return
        arena = self._ensure_arena(rows.shape[1])
        self._observe_rows(arena.slots(client_ids), rows, answers, learn_mask)

    def observe_outcomes(
        self,
        client_ids: Sequence[str],
        errored: Sequence[bool] | npt.NDArray[np.bool_],
        rejected: Sequence[bool] | npt.NDArray[np.bool_],
        *,
        answered_s: float | Sequence[float] | npt.NDArray[np.float64] | None = None,
    ) -> None:
        """Show the detector how each request of a batch ended.

        One entry per request (not per row), in arrival order: ``errored``
        when it failed (invalid input, a model error), ``rejected`` when the
        gateway refused it (rate limit, throttle, block). Seen by the next
        batch's scores. No-op unless ``observes_outcomes``.

        ``answered_s`` (seconds since the epoch, one for the batch or one per
        request) is when the gateway answered: taken before the answers are
        produced, so no later than a client could have read them. None (the
        default) leaves the detector without answer times, as before.
        """
        if not self.observes_outcomes or self._arena is None:
            return
        err = np.asarray(errored, dtype=bool)
        rej = np.asarray(rejected, dtype=bool)
        if err.shape != (len(client_ids),) or rej.shape != err.shape:
            raise ValueError(f"{self.name}: outcomes do not match the client ids")
        answered: npt.NDArray[np.float64] | None = None
        if answered_s is not None:
            given = np.asarray(answered_s, dtype=np.float64)
            if given.ndim != 0 and given.shape != err.shape:
                raise ValueError(f"{self.name}: answered_s does not match the ids")
            answered = np.broadcast_to(given, err.shape).copy()
            if not np.isfinite(answered).all():
                raise ValueError(f"{self.name}: answered_s must be finite times")
        if len(client_ids):
            slots = self._arena.slots(client_ids)
            self._observe_outcome_rows(slots, err, rej)
            if answered is not None:
                self._observe_answer_times(slots, answered)

    def learn_output_baseline(
        self, X: npt.NDArray[np.float64], proba: npt.NDArray[np.float64]
    ) -> None:
        """Learn what the model's answers to normal queries look like.

        The gateway calls it at start with the reference sample and the
        model's probabilities for it. No-op unless ``observes_outputs``.
        """
        if not self.observes_outputs:
            return
        rows = self._check_rows(X)
        answers = np.asarray(proba, dtype=np.float64)
        if answers.ndim != 2 or answers.shape[0] != rows.shape[0]:
            raise ValueError(f"{self.name}: probabilities do not match the rows")
        if rows.shape[0]:
            self._ensure_arena(rows.shape[1])
            self._learn_output_baseline(rows, answers)

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

    def load_state(self, client_id: str, blob: bytes) -> bool:
        """Replace the client's state with one :meth:`dump_state` produced.

        A blob written under an older layout this detector declares a
        migration for (:meth:`_migrations`) is upgraded first; the upgraded
        state passes the same checks as any other.

        Returns
        -------
        bool
            True when the blob was migrated from an older layout.

        Raises
        ------
        ValueError
            The blob is malformed, from another detector, from one whose
            feature count differs, or from a layout with no migration (a
            structural parameter changed); the client's state is unchanged.
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
        layout = self._layout(state.n_features)
        expected = describe_layout(layout)
        fields: Mapping[str, bytes] = state.fields
        migrated = state.layout != expected
        if migrated:
            known = {m.layout: m for m in self._migrations(state.n_features)}
            migration = known.get(state.layout)
            if migration is None:
                raise ValueError(
                    f"{self.name}: state layout {state.layout!r} differs from "
                    f"{expected!r}; a structural parameter changed"
                )
            upgraded = migration.upgrade(decode_fields(migration.old, fields))
            fields = encode_fields(layout, upgraded)
        self._ensure_arena(state.n_features).load(client_id, fields, self._check_state)
        return migrated

    # -- live baseline --------------------------------------------------------

    def export_baseline(self) -> bytes | None:
        """What this detector learnt from honest live traffic, as bytes
        (:mod:`detectors.baselines`), or ``None`` when it learns nothing live
        (a reference-only detector) or has not seen a feature count yet.

        Never includes per-client state or what the reference sample taught.
        """
        live = self._export_live()
        if live is None or self._n_features is None:
            return None
        fields, samples, ready = live
        return encode_baseline(
            BaselineBlob(
                format=BASELINE_FORMAT,
                detector=self.name,
                n_features=self._n_features,
                samples=samples,
                ready=ready,
                fields=fields,
            )
        )

    def import_baseline(self, blob: bytes) -> int:
        """Merge a live baseline :meth:`export_baseline` produced (possibly
        on another worker) into this detector's live one.

        The imported samples count as older than this detector's own live
        ones; per-client state and the reference sample's part are left
        alone. Everything is checked before anything changes.

        Returns
        -------
        int
            Honest samples imported.

        Raises
        ------
        BaselineRefused
            With a stable ``code``: malformed, another format, detector or
            feature count, a field out of range, or a detector that keeps no
            live baseline. Nothing was changed.
        """
        state = decode_baseline(blob)
        if state.detector != self.name:
            raise BaselineRefused(
                "detector", f"{self.name}: baseline belongs to {state.detector!r}"
            )
        if not 1 <= state.n_features <= 1_000_000:
            raise BaselineRefused(
                "features", f"{self.name}: baseline has {state.n_features} features"
            )
        if self._n_features is not None and state.n_features != self._n_features:
            raise BaselineRefused(
                "features",
                f"{self.name}: baseline has {state.n_features} features, "
                f"this detector uses {self._n_features}",
            )
        try:
            apply = self._import_live(state.fields, state.samples)
        except BaselineRefused:
            raise
        except ValueError as exc:
            raise BaselineRefused("invalid", f"{self.name}: {exc}") from exc
        self._ensure_arena(state.n_features)
        apply()
        return state.samples

    def _export_live(self) -> LiveBaseline | None:
        """This detector's live baseline, or ``None`` if it keeps none."""
        return None

    def _import_live(
        self, fields: Mapping[str, bytes], samples: int
    ) -> Callable[[], None]:
        """Check a live baseline fully and return what merges it in; raise
        :class:`~detectors.baselines.BaselineRefused` (or ``ValueError``)
        without changing anything."""
        raise BaselineRefused(
            "unsupported", f"{self.name}: this detector keeps no live baseline"
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

    def _migrations(self, n_features: int) -> Sequence[LayoutMigration]:
        """Older layouts of this detector's per-client state that it can still
        read, each with the function producing the current fields; none by
        default (such a blob is refused). Declared per detector next to its
        :meth:`_layout`, for a layout that changed in a known way."""
        return ()

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        """Raise ``ValueError`` if loaded per-client arrays break an invariant.

        Blobs come back from a shared store; a corrupt one must be refused
        rather than crash a later batch.
        """
        return None

    def _learn_baseline(self, X: npt.NDArray[np.float64]) -> None:
        """Learn from validated reference rows; no-op without a baseline."""
        return None

    def _observe_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        proba: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> None:
        """Take the model's answers to validated rows (``observes_outputs``)."""
        return None

    def _observe_outcome_rows(
        self,
        slots: npt.NDArray[np.int64],
        errored: npt.NDArray[np.bool_],
        rejected: npt.NDArray[np.bool_],
    ) -> None:
        """Take how each request ended (``observes_outcomes``)."""
        return None

    def _observe_answer_times(
        self, slots: npt.NDArray[np.int64], answered_s: npt.NDArray[np.float64]
    ) -> None:
        """Take when each request was answered (``observes_outcomes``)."""
        return None

    def _learn_output_baseline(
        self, X: npt.NDArray[np.float64], proba: npt.NDArray[np.float64]
    ) -> None:
        """Learn from reference rows and the model's answers to them."""
        return None

    def _on_n_features(self, n_features: int) -> None:
        """Called once when the feature count becomes known."""
        return None

    def _warn_if_capped(
        self, n_features: int, capacity: int, wanted: int, what: str
    ) -> None:
        """Log, once per detector, that ``max_state_bytes`` keeps fewer than
        ``wanted`` of ``what`` per client at this feature count."""
        if capacity < wanted:
            logging.getLogger(type(self).__module__).warning(
                "%s keeps %d %s per client, not %d: %d features exceed max_state_bytes",
                self.name,
                capacity,
                what,
                wanted,
                n_features,
                extra={"detector": self.name},
            )

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
        evidence: list[str] | Evidence,
    ) -> list[DetectorScore]:
        """One :class:`DetectorScore` per row from per-row arrays.

        ``evidence`` is either one sentence per row or a formatter called
        with a row's index when (and only if) its evidence is read; a
        formatter must capture copies of the per-row arrays it reads.

        Raises
        ------
        ArithmeticError
            If a score is not finite: a bug, stopped here so it cannot reach
            policy as NaN.
        """
        return batch_scores(self.name, self._params.threshold, score, warm, evidence)
