"""Live baselines: what detectors learnt from honest live traffic, as bytes.

Some detectors learn "what honest looks like" from the live traffic of
clients in good standing, on top of the model's reference sample: margin's
ring of live honest margins (its rank test is blind until it holds
``rank_min_baseline`` of them), traffic's running moments of honest sending
patterns, ood's tracked honest outlier rate. That knowledge lives in one
worker's memory; this module gives it a wire form so a worker can save it
and a restarted or added worker can start from it
(:meth:`detectors.base.Detector.export_baseline` and
:meth:`~detectors.base.Detector.import_baseline` produce and read it).

Two layers, both msgpack (msgspec, never pickle):

- :class:`BaselineBlob`: one detector's live baseline (versioned by
  :data:`BASELINE_FORMAT`, the detector's name, the feature count, how many
  honest samples it holds and whether that is enough for the detector to
  use it, and its arrays as raw little-endian bytes);
- :class:`SavedBaseline`: the envelope a store keeps: which model (name and
  identity, so a baseline learnt under another version of the model is never
  loaded), which worker wrote it and when.

The choice among several workers' saved baselines is one pure function,
:func:`choose_baseline`; :class:`BaselineStore` is the small protocol of a
store, with :class:`InMemoryBaselineStore` here and a Redis one in
``gateway.baselines``.

Imports numpy and msgspec only; nothing from Kafka, Redis, FastAPI or
``gateway``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

BASELINE_FORMAT = 1
"""Version of :class:`BaselineBlob` and :class:`SavedBaseline`; bump when
their meaning changes (a reader refuses any other)."""

MAX_BASELINE_BYTES = 16 * 1_048_576
"""Largest encoded baseline read, in bytes: margin's largest ring (1,000,000
answers at 16 bytes, 16,000,000 bytes and a little framing) fits, anything
bigger is refused before decoding."""

MAX_CLOCK_SKEW_S = 300.0
"""How far ahead of the loader's clock, in seconds, a saved baseline may be
dated and still be chosen: hosts' clocks differ by a little, but an entry
dated further ahead (a hostile write, a badly set clock) would otherwise rank
as the newest and never turn stale."""

MAX_SAMPLES = 2**53
"""Largest sample count accepted: counts above it are no longer exact in the
float arithmetic the detectors use."""


class BaselineRefused(ValueError):
    """A baseline that cannot be imported; nothing was changed.

    ``code`` is stable (tests and metrics match it, never the text):
    ``malformed`` (not a baseline, or too large), ``format`` (another
    version), ``detector`` (another detector's), ``features`` (another
    feature count), ``invalid`` (a field out of range, NaN, a count that does
    not match), ``unsupported`` (this detector keeps no live baseline).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class BaselineBlob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One detector's live baseline (see the module docstring)."""

    format: int
    detector: str
    n_features: int
    samples: int
    ready: bool
    fields: dict[str, bytes]


class SavedBaseline(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A stored live baseline: the blob and where and when it came from.

    Attributes
    ----------
    model, model_id
        The model's name and identity (``gateway.baselines.model_identity``:
        a digest of its signature, version included, and reference sample).
    worker
        Id of the worker that saved it.
    saved_at_s
        Wall-clock time of the save, in seconds since the epoch.
    samples, ready
        Copied from the blob so a loader can choose without decoding it.
    """

    format: int
    model: str
    model_id: str
    detector: str
    worker: str
    saved_at_s: float
    samples: int
    ready: bool
    baseline: bytes


_BLOB_ENCODER = msgspec.msgpack.Encoder()
_BLOB_DECODER = msgspec.msgpack.Decoder(BaselineBlob)
_SAVED_DECODER = msgspec.msgpack.Decoder(SavedBaseline)


def encode_baseline(blob: BaselineBlob) -> bytes:
    return _BLOB_ENCODER.encode(blob)


def decode_baseline(data: bytes) -> BaselineBlob:
    """Decode a :class:`BaselineBlob`.

    Raises
    ------
    BaselineRefused
        ``malformed`` or ``format`` (see the class).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BaselineRefused("malformed", "a baseline must be bytes")
    if len(data) > MAX_BASELINE_BYTES:
        raise BaselineRefused(
            "malformed", f"baseline of {len(data)} bytes exceeds {MAX_BASELINE_BYTES}"
        )
    try:
        blob = _BLOB_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BaselineRefused("malformed", f"not a detector baseline: {exc}") from exc
    if blob.format != BASELINE_FORMAT:
        raise BaselineRefused(
            "format",
            f"baseline format {blob.format} is not {BASELINE_FORMAT}, "
            "the one this version reads",
        )
    if not 0 <= blob.samples <= MAX_SAMPLES:
        raise BaselineRefused("invalid", f"sample count {blob.samples} out of range")
    return blob


def encode_saved(saved: SavedBaseline) -> bytes:
    return _BLOB_ENCODER.encode(saved)


def decode_saved(data: bytes) -> SavedBaseline:
    """Decode a :class:`SavedBaseline`; ``BaselineRefused`` as
    :func:`decode_baseline`."""
    if len(data) > MAX_BASELINE_BYTES + 4096:
        raise BaselineRefused("malformed", f"saved baseline of {len(data)} bytes")
    try:
        saved = _SAVED_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BaselineRefused("malformed", f"not a saved baseline: {exc}") from exc
    if saved.format != BASELINE_FORMAT:
        raise BaselineRefused(
            "format", f"saved baseline format {saved.format} is not {BASELINE_FORMAT}"
        )
    if not np.isfinite(saved.saved_at_s) or not 0 <= saved.samples <= MAX_SAMPLES:
        raise BaselineRefused("invalid", "saved baseline time or count out of range")
    return saved


def read_field(
    fields: Mapping[str, bytes],
    name: str,
    dtype: str,
    *,
    length: int | None = None,
    max_length: int | None = None,
) -> npt.NDArray[Any]:
    """One array of a baseline's fields, checked, as a writable copy.

    Parameters
    ----------
    fields
        The blob's fields.
    name, dtype
        The field and its numpy dtype (little-endian, e.g. ``"<f8"``).
    length, max_length
        Exact element count wanted, or the most allowed.

    Raises
    ------
    BaselineRefused
        ``invalid``: missing, a byte length that is not a whole number of
        elements, the wrong count, or (floats) a value that is not finite.
    """
    raw = fields.get(name)
    if raw is None:
        raise BaselineRefused("invalid", f"baseline field {name!r} is missing")
    kind = np.dtype(dtype)
    if len(raw) % kind.itemsize:
        raise BaselineRefused(
            "invalid",
            f"baseline field {name!r}: {len(raw)} bytes is not a whole "
            f"number of {kind.itemsize}-byte values",
        )
    values = np.frombuffer(raw, dtype=kind).copy()
    if length is not None and len(values) != length:
        raise BaselineRefused(
            "invalid", f"baseline field {name!r} has {len(values)} values, not {length}"
        )
    if max_length is not None and len(values) > max_length:
        raise BaselineRefused(
            "invalid",
            f"baseline field {name!r} has {len(values)} values, more than {max_length}",
        )
    if kind.kind == "f" and not np.isfinite(values).all():
        raise BaselineRefused("invalid", f"baseline field {name!r} is not finite")
    return values


def check_fields(fields: Mapping[str, bytes], expected: Iterable[str]) -> None:
    """Refuse (``invalid``) a baseline whose field names are not ``expected``."""
    wanted = set(expected)
    if set(fields) != wanted:
        raise BaselineRefused(
            "invalid",
            f"baseline fields {sorted(fields)} are not the expected {sorted(wanted)}",
        )


@dataclass(frozen=True, slots=True)
class Choice:
    """What :func:`choose_baseline` picked and why it passed over the rest.

    ``skipped`` counts candidates by reason: ``stale`` (older than the bound),
    ``future`` (dated more than :data:`MAX_CLOCK_SKEW_S` ahead),
    ``other_model`` (another identity of the model, or another detector),
    ``unreadable`` (not a saved baseline of this version).
    """

    chosen: list[SavedBaseline]
    skipped: dict[str, int] = field(default_factory=dict)


def choose_baseline(
    candidates: Iterable[bytes],
    *,
    model: str,
    model_id: str,
    detector: str,
    now_s: float,
    max_age_s: float,
) -> Choice:
    """Order the saved baselines of one model and detector, best first.

    The rule (one key per worker; the loader picks): candidates saved for
    another model identity or detector, older than ``max_age_s``, dated more
    than :data:`MAX_CLOCK_SKEW_S` ahead of ``now_s``, or unreadable are
    dropped. The rest are ranked: those that are ``ready`` (hold enough
    honest samples for the detector to use them) first, then the others;
    within each, most samples first, newest on a tie (margin's samples stop
    at its ring size, so among full baselines the newest wins). So a new
    worker starts from a usable baseline whenever any worker saved one, and
    a worker that just started blind and saved its few answers, ready or
    not, never hides a richer one. The caller imports the first that its
    detector accepts.

    Examples
    --------
    >>> old = SavedBaseline(1, "m", "id", "margin", "a", 100.0, 4096, True, b"")
    >>> new = SavedBaseline(1, "m", "id", "margin", "b", 200.0, 10, False, b"")
    >>> c = choose_baseline(
    ...     [encode_saved(new), encode_saved(old)], model="m", model_id="id",
    ...     detector="margin", now_s=300.0, max_age_s=3600.0)
    >>> [s.worker for s in c.chosen]
    ['a', 'b']
    """
    skipped: dict[str, int] = {}
    kept: list[SavedBaseline] = []
    for data in candidates:
        try:
            saved = decode_saved(data)
        except BaselineRefused:
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            continue
        if (
            saved.model != model
            or saved.model_id != model_id
            or saved.detector != detector
        ):
            skipped["other_model"] = skipped.get("other_model", 0) + 1
        elif now_s - saved.saved_at_s > max_age_s:
            skipped["stale"] = skipped.get("stale", 0) + 1
        elif saved.saved_at_s - now_s > MAX_CLOCK_SKEW_S:
            skipped["future"] = skipped.get("future", 0) + 1
        else:
            kept.append(saved)
    # Ready ones by samples too, not newest first: a worker that started
    # blind (Redis down at its load) and heard mostly one group of keys in
    # good standing reaches ready after a few hundred answers, and as the
    # newest save it displaced every richer baseline at every later start
    # (520 staggered low-margin answers hid an active learner on margin,
    # where about 2,600 are needed against a full live baseline).
    chosen = sorted(kept, key=lambda s: (not s.ready, -s.samples, -s.saved_at_s))
    return Choice(chosen=chosen, skipped=skipped)


class BaselineStore(Protocol):
    """Where workers keep their detectors' live baselines.

    One entry per (model, detector, worker): a worker's save replaces only
    its own, so concurrent writers never overwrite each other, and
    :func:`choose_baseline` picks among them at load.
    """

    def save(self, saved: SavedBaseline, *, ttl_s: float) -> None:
        """Keep ``saved`` as its worker's entry for ``ttl_s`` seconds."""

    def load(self, model: str, detector: str) -> list[bytes]:
        """Every entry (encoded :class:`SavedBaseline`) of the model and
        detector that has not expired."""


class InMemoryBaselineStore:
    """A :class:`BaselineStore` in one process (tests, a single worker).

    Parameters
    ----------
    clock_s
        Current time in seconds, for expiry; injectable for tests.
    """

    def __init__(self, clock_s: Callable[[], float] = time.time) -> None:
        self._clock_s = clock_s
        self._entries: dict[tuple[str, str], dict[str, tuple[float, bytes]]] = {}

    def save(self, saved: SavedBaseline, *, ttl_s: float) -> None:
        entries = self._entries.setdefault((saved.model, saved.detector), {})
        entries[saved.worker] = (float(self._clock_s()) + ttl_s, encode_saved(saved))

    def load(self, model: str, detector: str) -> list[bytes]:
        now = float(self._clock_s())
        entries = self._entries.get((model, detector), {})
        for worker in [w for w, (until, _) in entries.items() if until <= now]:
            del entries[worker]
        return [data for _, data in entries.values()]
