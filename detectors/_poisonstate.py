"""A submitter's state in the poisoning guard (:mod:`detectors.poisoning`):
its recent records as held (``_Submitter``) and as serialised
(:class:`SubmitterState`, msgspec, never pickle), the checks a serialised
state passes before it is loaded (:func:`decode_state`), the state's size
limits, and the digest by which a record is recognised as a repeat.

Imports numpy and msgspec only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field

import msgspec
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

STATE_FORMAT = 1
"""Version of a submitter's serialised state; bump when its meaning changes."""

MAX_STATE_BYTES = 32_768
"""Largest serialised submitter state accepted by
:meth:`~detectors.poisoning.PoisoningGuard.load_state` (the detectors'
per-client budget, ``detectors.base.MAX_STATE_BYTES``), plus
:data:`ID_STATE_BYTES` per record of the window
(:attr:`~detectors.poisoning.PoisoningGuard.state_limit_bytes`)."""

ID_STATE_BYTES = 16
"""Serialised bytes of one record's digest in a submitter's state (12
hex characters, quotes and a comma)."""

# Digest of a record id kept per submitter to recognise a repeat: 48 bits, so
# that two of a window's ids (2,000 at most) collide with odds below 1e-8.
_ID_DIGEST_BYTES = 6

DIGEST_CHARS = 2 * _ID_DIGEST_BYTES
"""Characters of a record's digest (:func:`record_digest`)."""


class SubmitterState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One submitter's recent records, as serialised (msgspec, never pickle)."""

    format: int
    window: int
    seen: int
    labels: list[int]
    predicted: list[int]
    disagree: list[bool]
    # Digests of the last ``window`` records (id, label and row; empty in
    # states saved before repeats were recognised: those submitters' repeats
    # count once more).
    ids: list[str] = []


@dataclass
class _Submitter:
    """One submitter's last ``window`` records as the guard holds them
    (label, model class, confident disagreement, digest) and how many it
    has sent."""

    labels: deque[int]
    predicted: deque[int]
    disagree: deque[bool]
    seen: int = 0
    ids: deque[str] = field(default_factory=deque)


def _copy_submitter(state: _Submitter) -> _Submitter:
    w = state.labels.maxlen
    return _Submitter(
        deque(state.labels, maxlen=w),
        deque(state.predicted, maxlen=w),
        deque(state.disagree, maxlen=w),
        state.seen,
        deque(state.ids, maxlen=w),
    )


def decode_state(
    blob: bytes, *, name: str, window: int, n_classes: int, limit_bytes: int
) -> _Submitter:
    """A submitter's state from bytes that
    :meth:`~detectors.poisoning.PoisoningGuard.dump_state` made, checked
    against the guard that loads it (its ``name`` heads every message).

    Raises
    ------
    ValueError
        The blob is over ``limit_bytes``, malformed, of another format or
        window, or holds labels or classes outside ``n_classes``.
    """
    if len(blob) > limit_bytes:
        raise ValueError(f"{name}: state over {limit_bytes} bytes")
    try:
        state = msgspec.json.decode(blob, type=SubmitterState)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{name}: malformed state: {exc}") from exc
    if state.format != STATE_FORMAT:
        raise ValueError(f"{name}: state format {state.format}")
    if state.window != window:
        raise ValueError(
            f"{name}: state window {state.window}, this guard uses {window}"
        )
    n = len(state.labels)
    if not (len(state.predicted) == len(state.disagree) == n <= state.window):
        raise ValueError(f"{name}: state arrays disagree in length")
    if len(state.ids) > state.window or any(
        len(i) > 2 * _ID_DIGEST_BYTES for i in state.ids
    ):
        raise ValueError(f"{name}: state holds malformed record ids")
    if state.seen < n:
        raise ValueError(f"{name}: state has seen fewer records than held")
    classes = range(n_classes)
    if any(v not in classes for v in (*state.labels, *state.predicted)):
        raise ValueError(f"{name}: state holds an unknown class")
    if any(
        d and lab == pred
        for d, lab, pred in zip(
            state.disagree, state.labels, state.predicted, strict=True
        )
    ):
        raise ValueError(f"{name}: state disagrees with its own label")
    return _Submitter(
        deque(state.labels, maxlen=window),
        deque(state.predicted, maxlen=window),
        deque(state.disagree, maxlen=window),
        state.seen,
        deque(state.ids, maxlen=window),
    )


def record_digest(record_id: str, label: int, row: FloatArray) -> str:
    """The 12-hex digest by which a record is recognised as a repeat (its id,
    label index and raw row); the same for the same record in every process."""
    return _digest(record_id, label, np.asarray(row, dtype=np.float64).reshape(-1))


def _digest(record_id: str, label: int, row: FloatArray) -> str:
    """A record's digest as kept in a submitter's state: its id, label and
    row, so that only a true repeat matches. By id alone, a flipper reusing
    one id for every record would have had each flip taken for a repeat and
    never counted."""
    digest = hashlib.blake2b(digest_size=_ID_DIGEST_BYTES)
    digest.update(record_id.encode("utf-8", "surrogatepass"))
    digest.update(label.to_bytes(8, "little", signed=True))
    digest.update(np.ascontiguousarray(row, dtype=np.float64).tobytes())
    return digest.hexdigest()
