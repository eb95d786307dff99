"""Poisoning guard: screens labelled feedback, one record at a time, before a
model learns from it.

Two kinds of training-data poisoning reach a model through labelled feedback:

- **label flips**: true inputs sent with a wrong label, at random (to lower
  accuracy) or for one class pair (to make "7" read as "1");
- **triggers** (BadNets, Gu et al. 2017): inputs carrying a small pattern the
  clean data never shows (a few corner pixels at their maximum, an extra
  value in an unused feature), all labelled one class, so that the retrained
  model learns "pattern => class".

Five checks, each with a stable code and a sentence of evidence:

``rarity`` (``POISON_TRIGGER``)
    How many features of the record lie where at most ``rare_share`` of the
    reference sample lies (per-feature tails of the model's own reference, the
    range idea of :mod:`detectors.ood` made per record). Rejected when the
    count reaches a threshold calibrated on clean feedback.
``spectral`` (``POISON_SPECTRAL``)
    Spectral signatures (Tran, Li and Madry, NeurIPS 2018): over a window of
    accepted feedback of the record's label, centred, the squared projection
    on the top singular vector, divided by its mean over the window. A
    cluster of records sharing a pattern and a label pulls the top direction
    onto the pattern, and its members then score far above clean ones. A
    window whose accepted records lie far beyond the clean rows along its
    top direction (a calibrated bound) is judged dragged, and the record is
    then scored against the clean rows alone.
``distance`` (``POISON_OFF_CLASS``)
    The record's squared distance from the centre of its label's clean
    calibration rows over their spread along the record's own direction
    (floored as the drift check's spread is). Rejected at a threshold
    calibrated, leave-one-out, on those rows. No submitter's records move
    it: a window dragged or spread by others changes nothing here, and
    neither does a cluster too young to stand out. A trigger's pixels and
    a wrong label both put a record far from its label's clean rows.
``flip_rate`` (``POISON_FLIP_RATE``)
    A *confident disagreement* is a record whose label the model gives less
    than ``1 - confidence`` while another class gets at least
    ``confidence``. Per submitter, the count of them among its last
    ``window`` records is judged as a binomial tail against the rate
    measured on clean feedback: one honest correction passes, a submitter
    flipping 10% of its labels does not. Only confident disagreements are
    rejected.
``flip_pair`` (``POISON_TARGETED_FLIP``)
    The same tail for one (label, model's class) pair against that pair's
    clean rate: a few "7 labelled 1" stand out long before the total does.

Known shortcomings (measured in ``docs/feedback-guard.md``): clean-label
poisoning (correct labels on crafted inputs) passes every check; flips the
model itself gets wrong, or is unsure about, are not confident disagreements
and pass; a submitter flipping slower than the clean rate allows, or
spreading flips over many keys, stays under the binomial tests; the
spectral test needs its cluster to be a few percent of the class window
before it separates, so the first records of a trigger cluster that the
rarity check misses are accepted (they are named in later evidence). A
window dragged towards a trigger by small accepted steps is judged dragged
only once its drift passes the calibrated bound (2.04 times the clean rows'
floored spread on digits); a drag kept under it let a quarter of later
carriers through the spectral test, which ``distance`` now refuses (0 of
180 on digits); while a window is judged dragged its class's honest records
are judged against the clean rows alone, which refuses a few more of them
(the floor keeps a framer from choosing a direction where that refuses
many: docs/feedback-guard.md). ``distance`` judges a record against about
45 clean rows of its class (digits), so a trigger weaker than the class's
own spread, or a flip to a class the record resembles, passes it.

This module holds the guard: how a record is judged, the class windows and
the submitters it keeps. The parameters are in :mod:`detectors._poisonparams`,
the calibration (:func:`calibrate`, :class:`Calibration`) in
:mod:`detectors._poisoncalib`, the rarity tails, feature scaling, power
iteration and spectral scores in :mod:`detectors._poisonspectral`, and a
submitter's state (its serialised form, the checks on loading it, the
record digest) in :mod:`detectors._poisonstate`; the public names are
re-exported here. Imports numpy, msgspec, scipy (through
:mod:`detectors._binomial`) and those modules (pydantic through the
parameters) only; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from detectors._binomial import upper_tail
from detectors._poisoncalib import _DRIFT_MIN_ROWS, floored_spread
from detectors._poisoncalib import Calibration as Calibration
from detectors._poisoncalib import calibrate as calibrate
from detectors._poisonparams import PoisoningParams as PoisoningParams
from detectors._poisonspectral import _Rarity, _spectral_scale
from detectors._poisonspectral import spectral_scores as spectral_scores
from detectors._poisonspectral import top_direction as top_direction
from detectors._poisonstate import DIGEST_CHARS as DIGEST_CHARS
from detectors._poisonstate import ID_STATE_BYTES as ID_STATE_BYTES
from detectors._poisonstate import MAX_STATE_BYTES as MAX_STATE_BYTES
from detectors._poisonstate import STATE_FORMAT as STATE_FORMAT
from detectors._poisonstate import SubmitterState as SubmitterState
from detectors._poisonstate import (
    _copy_submitter,
    _digest,
    _Submitter,
    decode_state,
)
from detectors._poisonstate import record_digest as record_digest

logger = logging.getLogger(__name__)

# Fewest clean rows of a class for the distance check to judge its records:
# the calibration's (detectors._poisoncalib._DRIFT_MIN_ROWS), which leaves
# classes with fewer out of the threshold too.
_DISTANCE_MIN_ROWS = _DRIFT_MIN_ROWS

FloatArray = npt.NDArray[np.float64]

CODES: dict[str, str] = {
    "POISON_TRIGGER": "the record's features lie where the reference data "
    "almost never does (a trigger pattern)",
    "POISON_SPECTRAL": "the record belongs to a cluster of accepted feedback "
    "sharing a pattern and a label (spectral signature)",
    "POISON_FLIP_RATE": "the submitter's labels disagree confidently with the "
    "model far more often than clean feedback does",
    "POISON_TARGETED_FLIP": "the submitter's confident disagreements pile up on "
    "one (label, model class) pair",
    "POISON_OFF_CLASS": "the record lies further from its label's clean records "
    "than they lie from one another (a trigger or a wrong label)",
}
"""Every rejection code this module gives, with its meaning."""


@dataclass(frozen=True)
class Verdict:
    """The guard's decision on one record.

    ``code`` and ``detector`` are ``None`` when it is accepted. ``scores``
    holds every check's value (``rarity``: rare features; ``spectral``:
    ratio to the window mean; ``distance``: squared distance from the
    label's clean centre over their floored spread along it, 0.0 when not
    computed; ``flip_tail`` and ``pair_tail``: binomial tails, lower is more
    suspicious, 1.0 when not computed).
    """

    accepted: bool
    code: str | None
    detector: str | None
    evidence: str
    scores: dict[str, float]
    disagreement: bool
    learned: bool = False
    """The record entered its class window (accepted, ``learn`` on, and not a
    repeat): a shared copy of the windows must add it."""


@dataclass
class _ClassWindow:
    rows: deque[FloatArray]
    ids: deque[str]
    submitters: deque[str] = field(default_factory=deque)
    # The last top direction, to warm-start the next record's.
    direction: FloatArray | None = None
    # The same for the drift check's direction (from the clean rows' centre).
    anchored_direction: FloatArray | None = None


@dataclass(frozen=True)
class _CleanRows:
    """One class's scaled clean calibration rows and what the drift check
    reads of them on every record, computed once (:meth:`PoisoningGuard.fit`):
    their centre, the rows about it, their Gram matrix about it and their
    mean squared deviation per feature."""

    rows: FloatArray
    centre: FloatArray
    centred: FloatArray
    gram: FloatArray
    per_feature: float

    @classmethod
    def of(cls, rows: FloatArray) -> _CleanRows:
        centre = rows.mean(axis=0) if len(rows) else np.zeros(rows.shape[1])
        centred = rows - centre
        per_feature = float((centred**2).mean()) if len(rows) else 0.0
        return cls(rows, centre, centred, centred.T @ centred, per_feature)


@dataclass(frozen=True)
class _SpectralResult:
    """A record's spectral score, the threshold it is judged against, the
    window positions at or beyond that threshold, and the window's drift
    (0.0 when not computed)."""

    score: float
    threshold: float
    beyond: list[int]
    drift: float
    dragged: bool


@dataclass(frozen=True)
class GuardSnapshot:
    """Copies of some submitters' state and of the class windows
    (:meth:`PoisoningGuard.snapshot`); opaque to callers."""

    submitters: dict[str, _Submitter | None]
    windows: list[_ClassWindow]


class PoisoningGuard:
    """Screens labelled records (see the module docstring for the checks).

    Build it with :meth:`fit`. State: per submitter, its last ``window``
    records' label, model class and disagreement flag (bounded; at most
    ``max_submitters`` held); per class, the last ``spectral_window``
    accepted records, judged together with the class's clean calibration rows
    (which are never evicted).

    Parameters
    ----------
    params
        Validated parameters.
    reference
        (n, d) training inputs of the model, raw units.
    calibration
        From :func:`calibrate`.
    n_classes
        Classes of the model; labels are class indices ``0..n_classes-1``.
    """

    name = "poisoning"

    def __init__(
        self,
        params: PoisoningParams,
        reference: FloatArray,
        calibration: Calibration,
        n_classes: int,
    ) -> None:
        if n_classes < 2:
            raise ValueError("a classifier has at least two classes")
        if calibration.pair_rates.shape != (n_classes, n_classes):
            raise ValueError("calibration pair rates do not match the classes")
        self.params = params
        self.calibration = calibration
        self.n_classes = n_classes
        self.n_features = int(reference.shape[1])
        self._rarity = _Rarity(np.asarray(reference, dtype=np.float64))
        self._low, self._span = _spectral_scale(reference)
        self._submitters: OrderedDict[str, _Submitter] = OrderedDict()
        self._classes = [
            _ClassWindow(
                deque(maxlen=params.spectral_window),
                deque(maxlen=params.spectral_window),
                deque(maxlen=params.spectral_window),
            )
            for _ in range(n_classes)
        ]
        # Rows of records being judged again that a shared window already
        # holds, by digest (set_held_back): class, scaled row, id, submitter.
        self._held_back: dict[str, tuple[int, FloatArray, str, str]] = {}
        # Per class, the scaled clean calibration rows (set by fit): always
        # part of the spectral test's matrix, which no submitter can evict.
        self._anchors: list[FloatArray] = [
            np.empty((0, self.n_features)) for _ in range(n_classes)
        ]
        self._clean = [_CleanRows.of(a) for a in self._anchors]

    @classmethod
    def fit(
        cls,
        params: PoisoningParams,
        reference: FloatArray,
        x_clean: FloatArray,
        y_clean: npt.NDArray[np.int64],
        proba_clean: FloatArray,
    ) -> PoisoningGuard:
        """Calibrate on clean labelled records, which then anchor each class's
        spectral test.

        Raises
        ------
        ValueError
            Shapes disagree, labels fall outside the probabilities' classes,
            or there are too few clean rows (fewer than 20).
        """
        n_classes = int(proba_clean.shape[1])
        calibration = calibrate(params, reference, x_clean, y_clean, proba_clean)
        guard = cls(params, reference, calibration, n_classes)
        scaled = guard._scale(np.asarray(x_clean, dtype=np.float64))
        labels = np.asarray(y_clean, dtype=np.int64)
        guard._anchors = [scaled[labels == c] for c in range(n_classes)]
        guard._clean = [_CleanRows.of(a) for a in guard._anchors]
        return guard

    # -- screening --------------------------------------------------------------

    def screen(
        self,
        submitter: str,
        row: FloatArray,
        label: int,
        proba: FloatArray,
        record_id: str = "",
        *,
        learn: bool = True,
    ) -> Verdict:
        """Judge one record and update the submitter's state.

        Parameters
        ----------
        submitter
            Who sent it (the API key's client id).
        row
            (d,) features, raw units, already validated (finite, in range).
        label
            The submitted class index.
        proba
            (k,) the served model's probabilities for ``row``.
        record_id
            Named in later spectral evidence if this record is accepted.
        learn
            Add the record, if accepted, to its class window (``False`` to
            judge a record without letting it shape later judgements).

        Raises
        ------
        ValueError
            ``row``, ``label`` or ``proba`` do not fit the model.
        """
        x = np.asarray(row, dtype=np.float64).reshape(-1)
        p = np.asarray(proba, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.n_features or not np.isfinite(x).all():
            raise ValueError(f"row must be {self.n_features} finite features")
        if p.shape[0] != self.n_classes or not np.isfinite(p).all():
            raise ValueError(f"proba must be {self.n_classes} finite values")
        if not 0 <= label < self.n_classes:
            raise ValueError(f"label must be a class index below {self.n_classes}")

        # Step: the record on its own (rarity), then against its class's
        # accepted records (spectral).
        cal, prm = self.calibration, self.params
        rare = self._rarity.rare_features(x, prm.rare_share)
        scaled = self._scale(x[None, :])[0]
        spec = self._spectral(scaled, label)
        spectral = spec.score
        distance = self._distance(scaled, label)
        predicted = int(np.argmax(p))
        disagreement = bool(predicted != label and p[predicted] >= prm.confidence)

        # Step: the submitter's recent records, this one included once. A
        # repeat of a record the state already holds (a redelivery after a
        # crash, or a captured record replayed within the clock skew) is
        # judged but not counted again: replaying a victim's one honest
        # correction would otherwise make the victim a flipper.
        state = self._submitter(submitter)
        digest = _digest(record_id, label, x) if record_id else ""
        repeat = bool(digest) and digest in state.ids
        if not repeat:
            state.labels.append(label)
            state.predicted.append(predicted)
            state.disagree.append(disagreement)
            state.ids.append(digest)
            state.seen += 1
        flip_tail, pair_tail, n_dis, n_pair = self._flip_tails(
            state, label, predicted, disagreement
        )
        scores = {
            "rarity": float(len(rare)),
            "spectral": spectral,
            "window_drift": spec.drift,
            "distance": distance,
            "flip_tail": flip_tail,
            "pair_tail": pair_tail,
            "confidence": float(p[predicted]),
        }
        n = len(state.disagree)

        # Step: the first check that fires names the rejection.
        verdict: tuple[str, str, str] | None = None
        if len(rare) >= cal.rarity_threshold:
            shown = ", ".join(str(j) for j in rare[:8])
            verdict = (
                "POISON_TRIGGER",
                "rarity",
                f"{len(rare)} features (index {shown}) lie where at most "
                f"{prm.rare_share:.1%} of the reference does; clean feedback "
                f"reaches {cal.rarity_threshold} on "
                f"{prm.false_rejection_rate / 2:.1%} of records or fewer",
            )
        elif spectral >= spec.threshold:
            window = self._classes[label]
            beyond = spec.beyond
            others = sorted({window.submitters[i] for i in beyond} - {""})
            ids = [window.ids[i] for i in beyond][:5]
            n_acc, n_clean = len(window.rows), len(self._anchors[label])
            if spec.dragged:
                judged = (
                    f"class {label}'s {n_acc} accepted records lie "
                    f"{spec.drift:.1f}x further from its {n_clean} clean "
                    f"records' centre along their top singular direction than "
                    f"the clean records do (a dragged window, bound "
                    f"{cal.drift_threshold:.1f}); judged against the clean "
                    f"records alone, the projection is {spectral:.1f}x theirs"
                )
            else:
                judged = (
                    f"projection on the top singular direction of class "
                    f"{label}'s {n_acc} accepted and {n_clean} clean records "
                    f"is {spectral:.1f}x their mean"
                )
            verdict = (
                "POISON_SPECTRAL",
                "spectral",
                f"{judged} (threshold {spec.threshold:.1f}); {len(beyond)} "
                f"accepted records of the class lie beyond it too (ids "
                f"{ids}, from {len(others)} submitter(s))",
            )
        elif disagreement and pair_tail <= prm.significance:
            verdict = (
                "POISON_TARGETED_FLIP",
                "flip_pair",
                f"{n_pair} of this submitter's last {n} records are labelled "
                f"{label} where the model says {predicted} with at least "
                f"{prm.confidence:.0%} confidence; clean rate "
                f"{cal.pair_rates[label, predicted]:.2%}, tail {pair_tail:.1e}",
            )
        elif disagreement and flip_tail <= prm.significance:
            verdict = (
                "POISON_FLIP_RATE",
                "flip_rate",
                f"{n_dis} of this submitter's last {n} records disagree with the "
                f"model at {prm.confidence:.0%} confidence or more; clean rate "
                f"{cal.disagree_rate:.2%}, tail {flip_tail:.1e}",
            )
        elif distance >= cal.distance_threshold:
            # Last: a cluster or a flipper named by the checks above says
            # more than a distance does.
            verdict = (
                "POISON_OFF_CLASS",
                "distance",
                f"the record lies {distance:.1f}x further from the centre of "
                f"class {label}'s {len(self._anchors[label])} clean records "
                f"than they spread along its direction (threshold "
                f"{cal.distance_threshold:.1f}; clean records reach it on "
                f"{prm.false_rejection_rate / 4:.2%} or fewer)",
            )

        if verdict is None:
            learned = learn and not repeat
            held = self._held_back.pop(digest, None) if digest else None
            if learned:
                self._learn(scaled, label, record_id, submitter)
            elif learn and held is not None and held[0] == label:
                # A repeat whose row a shared window holds but left out while
                # the record is judged again: back in, as on its first
                # judgement, so the records after it are judged alike. Not
                # ``learned``: the shared window has it already.
                self._learn(scaled, label, record_id, submitter)
            evidence = "accepted (a repeat, counted once)" if repeat else "accepted"
            return Verdict(True, None, None, evidence, scores, disagreement, learned)
        code, detector, evidence = verdict
        return Verdict(False, code, detector, evidence, scores, disagreement)

    def _learn(self, scaled: FloatArray, label: int, record_id: str, who: str) -> None:
        window = self._classes[label]
        window.rows.append(scaled)
        window.ids.append(record_id)
        window.submitters.append(who)

    def set_window(
        self,
        label: int,
        rows: FloatArray,
        ids: Sequence[str],
        submitters: Sequence[str],
    ) -> None:
        """Replace class ``label``'s window of accepted records (the last
        ``spectral_window`` of ``rows`` are kept; the clean calibration rows
        stay as they are).

        For a window kept outside the process (``gateway.feedback_windows``):
        ``rows`` are raw (n, d) features as :meth:`screen` took them, oldest
        first, with each record's id and submitter.

        Raises
        ------
        ValueError
            ``label`` is not a class, ``rows`` are not (n, d) finite values, or
            the ids or submitters do not number n.
        """
        if not 0 <= label < self.n_classes:
            raise ValueError(f"label must be a class index below {self.n_classes}")
        x = np.asarray(rows, dtype=np.float64)
        if x.size == 0:
            x = x.reshape(0, self.n_features)
        if x.ndim != 2 or x.shape[1] != self.n_features or not np.isfinite(x).all():
            raise ValueError(f"rows must be (n, {self.n_features}) finite features")
        if len(ids) != len(x) or len(submitters) != len(x):
            raise ValueError("one id and one submitter per row")
        keep = self.params.spectral_window
        scaled = self._scale(x[-keep:]) if len(x) else x
        old = self._classes[label]
        self._classes[label] = _ClassWindow(
            deque(list(scaled), maxlen=keep),
            deque(list(ids)[-keep:] if len(x) else [], maxlen=keep),
            deque(list(submitters)[-keep:] if len(x) else [], maxlen=keep),
            # Still good starts for the power iterations: a window moves
            # little between two batches.
            old.direction,
            old.anchored_direction,
        )

    def set_held_back(self, rows: dict[str, tuple[int, FloatArray, str, str]]) -> None:
        """Rows a shared class window holds for records about to be judged
        again, left out of :meth:`set_window`: by record digest
        (:func:`record_digest`), the class index, raw row, id and submitter.

        A record judged again (a batch retried or redelivered) would otherwise
        be judged with its own earlier copy in the window; left out, and it a
        repeat (so not learned again), the records after it would be judged
        without it. Such a repeat, if accepted, enters the local window from
        here. Replaces what a previous call held back.
        """
        held: dict[str, tuple[int, FloatArray, str, str]] = {}
        for digest, (label, row, record_id, submitter) in rows.items():
            x = np.asarray(row, dtype=np.float64).reshape(-1)
            if x.shape[0] != self.n_features or not 0 <= label < self.n_classes:
                raise ValueError("held-back row does not fit the model")
            held[digest] = (label, self._scale(x[None, :])[0], record_id, submitter)
        self._held_back = held

    def window(self, label: int) -> tuple[FloatArray, list[str], list[str]]:
        """Class ``label``'s window of accepted records, oldest first: raw (n, d)
        rows (unscaled, so equal to what was screened up to rounding), ids and
        submitters; what :meth:`set_window` takes."""
        window = self._classes[label]
        if not window.rows:
            return np.empty((0, self.n_features)), [], []
        raw: FloatArray = np.vstack(list(window.rows)) * self._span + self._low
        return raw, list(window.ids), list(window.submitters)

    def window_size(self, label: int) -> int:
        """Accepted records in class ``label``'s window (calibration rows not
        counted)."""
        return len(self._classes[label].rows)

    def _spectral(self, scaled: FloatArray, label: int) -> _SpectralResult:
        """The record's spectral score against its class window, and the
        window positions that score at or above the threshold too.

        A window that its submitters have dragged away from the clean rows
        (:meth:`_drift`) no longer sets the denominator: the record is then
        judged against the clean rows alone."""
        window = self._classes[label]
        anchor = self._anchors[label]
        if len(anchor) + len(window.rows) < self.params.spectral_min_records:
            return _SpectralResult(
                0.0, self.calibration.spectral_threshold, [], 0.0, False
            )
        drift = self._drift(label)
        if drift is not None and drift[0] >= self.calibration.drift_threshold:
            ratio, centre, direction, floor = drift
            threshold = self.calibration.anchored_threshold
            accepted = np.vstack(list(window.rows))
            kept = ((accepted - centre) @ direction) ** 2 / floor
            score = float(((scaled - centre) @ direction) ** 2 / floor)
            beyond = [int(i) for i in np.flatnonzero(kept >= threshold)]
            return _SpectralResult(score, threshold, beyond, ratio, True)
        # The clean calibration rows of the class stay in the matrix however
        # many records submitters send: a window filled with records at the
        # class centre (each accepted, they score near 0) would otherwise
        # shrink the mean projection until every honest record of the class
        # scored far above it, and one record would set the top direction
        # alone (framing, docs/feedback-guard.md). The clean rows' mean
        # projection floors the denominator for the same reason; a patch
        # cluster, which raises the window's mean, is judged as before.
        rows = np.vstack([anchor, *window.rows, scaled])
        centre = rows.mean(axis=0)
        centred = rows - centre
        window.direction = top_direction(centred.T @ centred, window.direction)
        projection = (centred @ window.direction) ** 2
        floor = float(projection[: len(anchor)].mean()) if len(anchor) else 0.0
        denominator = max(float(projection.mean()), floor)
        threshold = self.calibration.spectral_threshold
        ratio = drift[0] if drift is not None else 0.0
        if denominator <= 0.0:
            return _SpectralResult(0.0, threshold, [], ratio, False)
        scores = projection[len(anchor) :] / denominator
        over = np.flatnonzero(scores[:-1] >= threshold)
        return _SpectralResult(
            float(scores[-1]), threshold, [int(i) for i in over], ratio, False
        )

    def _distance(self, scaled: FloatArray, label: int) -> float:
        """The record's squared distance from the centre of class ``label``'s
        clean rows over their spread along the record's own direction,
        floored (:func:`~detectors._poisoncalib.floored_spread`); 0.0 when
        the check is off or the class has too few clean rows (the
        calibration's ``distance_threshold`` is then ``inf`` or the record at
        the centre).

        Why: the spectral test judges a record along one direction, the top
        one of its class, which honest variation sets until a trigger
        cluster has grown; records sent to spread a window along the trigger
        (a drag) make that cluster need more members before it stands out.
        Along the record's own direction the trigger stands out from its
        first carrier, and only the clean rows, which no submitter can move,
        are read.
        """
        clean = self._clean[label]
        if (
            self.calibration.distance_threshold == float("inf")
            or len(clean.rows) < _DISTANCE_MIN_ROWS
        ):
            return 0.0
        offset = scaled - clean.centre
        squared = float(offset @ offset)
        if squared <= 0.0:
            return 0.0
        along = float(offset @ clean.gram @ offset) / (squared * len(clean.rows))
        floor = floored_spread(along, clean.per_feature)
        return squared / floor if floor > 0.0 else 0.0

    def _drift(self, label: int) -> tuple[float, FloatArray, FloatArray, float] | None:
        """How far class ``label``'s window has moved from its clean rows:
        the accepted records' mean squared projection from the clean rows'
        centre, on the top direction of both (second moment about that
        centre), over the clean rows' own; with that centre, direction and
        the clean rows' mean. ``None`` below ``spectral_min_records``
        accepted records or with fewer than two clean rows.

        Why: the spectral score divides by the window's mean projection, so
        records sent to spread the window along a pattern by small steps
        (each step ordinary against the window before it) make the full
        pattern ordinary too (the drag, docs/feedback-guard.md). Honest
        windows spread about as the clean rows do (calibrated by
        :func:`calibrate`); a dragged one lies far beyond them along the
        dragged direction, which the clean rows' centre makes the top one.
        """
        window = self._classes[label]
        clean = self._clean[label]
        if len(window.rows) < self.params.spectral_min_records or len(clean.rows) < 2:
            return None
        centre = clean.centre
        accepted = np.vstack(list(window.rows)) - centre
        gram = clean.gram + accepted.T @ accepted
        window.anchored_direction = top_direction(gram, window.anchored_direction)
        direction = window.anchored_direction
        # Floored (FLOOR_SHRINK): the clean rows are fewer than the features,
        # so along some directions they hardly vary while honest records do.
        floor = floored_spread(
            float(((clean.centred @ direction) ** 2).mean()), clean.per_feature
        )
        spread = float(((accepted @ direction) ** 2).mean())
        if floor <= 0.0:
            # The clean rows do not vary at all (the floor is 0 only then):
            # no ratio, and no clean spread to judge a record against either.
            return None
        return spread / floor, centre, direction, floor

    def _flip_tails(
        self, state: _Submitter, label: int, predicted: int, disagreement: bool
    ) -> tuple[float, float, int, int]:
        """Binomial tails of the submitter's disagreement count and, for a
        disagreeing record, of its pair's count (1.0 when not computed)."""
        n = len(state.disagree)
        n_dis = int(sum(state.disagree))
        flip_tail = float(
            upper_tail(
                np.array([n_dis]), np.array([n]), self.calibration.disagree_rate
            )[0]
        )
        pair_tail, n_pair = 1.0, 0
        if disagreement:
            n_pair = sum(
                1
                for d, lab, pred in zip(
                    state.disagree, state.labels, state.predicted, strict=True
                )
                if d and lab == label and pred == predicted
            )
            if n_pair >= self.params.pair_min:
                rate = float(self.calibration.pair_rates[label, predicted])
                pair_tail = float(
                    upper_tail(np.array([n_pair]), np.array([n]), rate)[0]
                )
        return flip_tail, pair_tail, n_dis, n_pair

    def _scale(self, rows: FloatArray) -> FloatArray:
        scaled: FloatArray = (rows - self._low) / self._span
        return scaled

    # -- per-submitter state ------------------------------------------------------

    def _submitter(self, submitter: str) -> _Submitter:
        state = self._submitters.get(submitter)
        if state is None:
            w = self.params.window
            state = _Submitter(
                deque(maxlen=w), deque(maxlen=w), deque(maxlen=w), 0, deque(maxlen=w)
            )
            self._submitters[submitter] = state
            while len(self._submitters) > self.params.max_submitters:
                dropped, _ = self._submitters.popitem(last=False)
                logger.info(
                    "submitter state dropped (capacity)",
                    extra={"client": dropped, "detector": self.name},
                )
        else:
            self._submitters.move_to_end(submitter)
        return state

    def snapshot(self, submitters: Iterable[str]) -> GuardSnapshot:
        """What screening records of ``submitters`` may change: their state
        and every class window, copied, for :meth:`restore`.

        A batch judged, then not committed (the broker or Redis failed), is
        judged again; restoring first makes the second judgement the only
        one, instead of counting each record twice.
        """
        held: dict[str, _Submitter | None] = {}
        for name in submitters:
            state = self._submitters.get(name)
            held[name] = None if state is None else _copy_submitter(state)
        windows = [
            _ClassWindow(
                deque(w.rows, maxlen=w.rows.maxlen),
                deque(w.ids, maxlen=w.ids.maxlen),
                deque(w.submitters, maxlen=w.submitters.maxlen),
                w.direction,
                w.anchored_direction,
            )
            for w in self._classes
        ]
        return GuardSnapshot(held, windows)

    def restore(self, snapshot: GuardSnapshot) -> None:
        """Put back what :meth:`snapshot` copied."""
        for name, state in snapshot.submitters.items():
            if state is None:
                self._submitters.pop(name, None)
            else:
                self._submitters[name] = _copy_submitter(state)
        self._classes = [
            _ClassWindow(
                deque(w.rows, maxlen=w.rows.maxlen),
                deque(w.ids, maxlen=w.ids.maxlen),
                deque(w.submitters, maxlen=w.submitters.maxlen),
                w.direction,
                w.anchored_direction,
            )
            for w in snapshot.windows
        ]

    @property
    def state_limit_bytes(self) -> int:
        """Largest serialised submitter state :meth:`load_state` accepts."""
        return MAX_STATE_BYTES + ID_STATE_BYTES * self.params.window

    def submitters(self) -> list[str]:
        """Submitters whose state is held, least recently seen first."""
        return list(self._submitters)

    def forget(self, submitter: str) -> None:
        """Drop a submitter's state (no error if none is held)."""
        self._submitters.pop(submitter, None)

    def dump_state(self, submitter: str) -> bytes | None:
        """The submitter's state as bytes, or ``None`` if none is held."""
        state = self._submitters.get(submitter)
        if state is None:
            return None
        return msgspec.json.encode(
            SubmitterState(
                format=STATE_FORMAT,
                window=self.params.window,
                seen=state.seen,
                labels=list(state.labels),
                predicted=list(state.predicted),
                disagree=list(state.disagree),
                ids=list(state.ids),
            )
        )

    def load_state(self, submitter: str, blob: bytes) -> None:
        """Replace the submitter's state with one :meth:`dump_state` made.

        Raises
        ------
        ValueError
            The blob is too large, malformed, of another format or window, or
            holds labels or classes outside the model's.
        """
        self._submitters[submitter] = decode_state(
            blob,
            name=self.name,
            window=self.params.window,
            n_classes=self.n_classes,
            limit_bytes=self.state_limit_bytes,
        )
        self._submitters.move_to_end(submitter)


def labels_to_index(labels: Sequence[Any], classes: Sequence[int]) -> list[int]:
    """Class indices of ``labels`` in ``classes``.

    Raises
    ------
    ValueError
        A label is not one of ``classes``.
    """
    position = {c: i for i, c in enumerate(classes)}
    try:
        return [position[label] for label in labels]
    except KeyError as exc:
        raise ValueError(f"unknown label {exc.args[0]!r}") from exc
