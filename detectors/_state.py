"""Per-client state storage shared by the detectors: slot arenas, windows, blobs.

Every detector keeps each client's state as one row ("slot") of a few
preallocated numpy arrays, so a batch touching many clients is updated with a
handful of vectorised operations (or one compiled loop) instead of a Python
loop per client. This
module also holds the serialised form of one client's state (msgspec, never
pickle) and the grouping helper that lets a batch hold the same client several
times while keeping the result identical to processing rows one by one.

Imports numpy, msgspec and :mod:`detectors._jit` (numba) only; nothing from
Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from detectors._jit import jit

STATE_FORMAT = 1
"""Version of the serialised state blob; bump when its meaning changes."""

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """Shape (per client) and dtype of one array of per-client state."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def describe_layout(fields: Mapping[str, FieldSpec]) -> str:
    """A canonical string naming every field, its shape and dtype.

    Two detectors can exchange a client's state only if their layouts are equal;
    a structural parameter (``history``, ``window``) or the feature count changes
    it.
    """
    return ";".join(
        f"{name}:{np.dtype(spec.dtype).str}:{'x'.join(str(n) for n in spec.shape)}"
        for name, spec in sorted(fields.items())
    )


CHANGED_MAX = 4096
"""Slots :meth:`SlotArena.changed` lists at most between two calls."""


class SlotArena:
    """Per-client state as rows of preallocated arrays, one row per client.

    Rows freed by :meth:`release` are zeroed and reused. Arrays grow by doubling
    and never shrink, so memory follows the peak number of clients held at once.

    Parameters
    ----------
    fields
        Name to per-client shape and dtype. A fresh slot is all zeros, so every
        field must mean "no history yet" when zero.
    initial_slots
        Rows allocated up front.
    """

    def __init__(self, fields: Mapping[str, FieldSpec], *, initial_slots: int = 16):
        self.fields = dict(fields)
        self.layout = describe_layout(self.fields)
        self.arrays: dict[str, npt.NDArray[Any]] = {
            name: np.zeros((initial_slots, *spec.shape), dtype=spec.dtype)
            for name, spec in self.fields.items()
        }
        self._capacity = initial_slots
        self._index: dict[str, int] = {}
        self._free: list[int] = []
        self._high_water = 0
        # Slots released or loaded since changed() last ran, once watch() ran;
        # None past CHANGED_MAX (the reader then rebuilds what it derived).
        self._watched = False
        self._changed: list[int] | None = []

    @property
    def slot_nbytes(self) -> int:
        """Bytes of state one client holds, the same for every client."""
        return sum(spec.nbytes for spec in self.fields.values())

    def clients(self) -> list[str]:
        return list(self._index)

    def get(self, client_id: str) -> int | None:
        return self._index.get(client_id)

    def slots(self, client_ids: Sequence[str]) -> IntArray:
        """Slot of each client, allocating zeroed slots for new ones."""
        index = self._index
        n = len(client_ids)
        if n > 1:
            # Usually every client is known: one itemgetter looks them all up
            # at C speed (a quarter cheaper than map(index.get, ...)).
            try:
                found = itemgetter(*client_ids)(index)
            except KeyError:
                pass
            else:
                return np.fromiter(found, dtype=np.int64, count=n)
        # Known clients are looked up at C speed; only new ones take the loop.
        out = np.fromiter(
            map(index.get, client_ids, [-1] * n),
            dtype=np.int64,
            count=n,
        )
        if (out < 0).any():
            for i in np.flatnonzero(out < 0).tolist():
                client_id = client_ids[i]
                slot = index.get(client_id)
                if slot is None:
                    slot = self._allocate()
                    index[client_id] = slot
                out[i] = slot
        return out

    def release(self, client_id: str) -> None:
        slot = self._index.pop(client_id, None)
        if slot is None:
            return
        for array in self.arrays.values():
            array[slot] = 0
        self._free.append(slot)
        self._note_change(slot)

    def dump(self, client_id: str) -> dict[str, bytes] | None:
        slot = self._index.get(client_id)
        if slot is None:
            return None
        return {name: array[slot].tobytes() for name, array in self.arrays.items()}

    def load(
        self,
        client_id: str,
        fields: Mapping[str, bytes],
        check: Callable[[Mapping[str, npt.NDArray[Any]]], None] | None = None,
    ) -> None:
        """Replace a client's state with ``fields`` (as :meth:`dump` returned).

        ``check`` sees the decoded arrays first and raises ``ValueError`` if
        they break an invariant; the client's state changes only after it
        passes.
        """
        values = decode_fields(self.fields, fields)
        if check is not None:
            check(values)
        (slot,) = self.slots([client_id])
        for name, array in values.items():
            self.arrays[name][slot] = array
        self._note_change(slot)

    def watch(self) -> None:
        """Record, from now on, each slot :meth:`release` or :meth:`load`
        changes, for :meth:`changed`: for an index derived from the arrays
        (:class:`detectors._cohortindex.CohortIndex`), which sees a batch's
        own slots but not these."""
        self._watched = True

    def changed(self) -> IntArray | None:
        """The slots released or loaded since the last call (repeats
        possible), or None when more than :data:`CHANGED_MAX` were: the
        caller then rebuilds from the arrays rather than the list grow
        with a restore of every client."""
        changed = self._changed
        self._changed = []
        if changed is None:
            return None
        return np.asarray(changed, dtype=np.int64)

    def _note_change(self, slot: int) -> None:
        if not self._watched or self._changed is None:
            return
        if len(self._changed) >= CHANGED_MAX:
            self._changed = None
        else:
            self._changed.append(slot)

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        if self._high_water == self._capacity:
            self._grow()
        slot = self._high_water
        self._high_water += 1
        return slot

    def _grow(self) -> None:
        new_capacity = self._capacity * 2
        for name, array in self.arrays.items():
            grown = np.zeros((new_capacity, *array.shape[1:]), dtype=array.dtype)
            grown[: self._capacity] = array
            self.arrays[name] = grown
        self._capacity = new_capacity


def decode_fields(
    specs: Mapping[str, FieldSpec], fields: Mapping[str, bytes]
) -> dict[str, npt.NDArray[Any]]:
    """One client's state fields as read-only arrays of ``specs``' shapes.

    Raises ``ValueError`` unless ``fields`` names exactly the fields of
    ``specs``, each with the bytes its shape and dtype take.
    """
    if set(fields) != set(specs):
        raise ValueError(
            f"state holds fields {sorted(fields)}, expected {sorted(specs)}"
        )
    values: dict[str, npt.NDArray[Any]] = {}
    for name, spec in specs.items():
        if len(fields[name]) != spec.nbytes:
            raise ValueError(
                f"state field {name!r} has {len(fields[name])} bytes, "
                f"expected {spec.nbytes}"
            )
        values[name] = np.frombuffer(fields[name], dtype=spec.dtype).reshape(spec.shape)
    return values


def encode_fields(
    specs: Mapping[str, FieldSpec], values: Mapping[str, npt.ArrayLike]
) -> dict[str, bytes]:
    """The bytes of each field of ``specs`` from ``values`` (the inverse of
    :func:`decode_fields`); ``ValueError`` when a field is missing, extra or
    of another shape. Values are cast to the field's dtype."""
    if set(values) != set(specs):
        raise ValueError(
            f"state holds fields {sorted(values)}, expected {sorted(specs)}"
        )
    out: dict[str, bytes] = {}
    for name, spec in specs.items():
        array = np.asarray(values[name])
        if array.shape != spec.shape:
            raise ValueError(
                f"state field {name!r} has shape {array.shape}, expected {spec.shape}"
            )
        out[name] = np.ascontiguousarray(array, dtype=spec.dtype).tobytes()
    return out


@dataclass(frozen=True, slots=True)
class LayoutMigration:
    """How a detector reads a client's state written under an older layout.

    A detector declares these next to its layout
    (:meth:`detectors.base.Detector._migrations`): ``old`` is the older
    layout's fields (at the detector's current structural parameters and the
    blob's feature count), ``upgrade`` turns that state's arrays (read-only)
    into every field of the current layout. The result is then checked by the
    detector's ``_check_state`` like any loaded blob, so a migration cannot
    smuggle in a state a current blob could not hold; ``upgrade`` raises
    ``ValueError`` for an old state it cannot carry over.
    """

    old: Mapping[str, FieldSpec]
    upgrade: Callable[[Mapping[str, npt.NDArray[Any]]], Mapping[str, npt.ArrayLike]]

    @property
    def layout(self) -> str:
        return describe_layout(self.old)


class StateBlob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The serialised state of one client of one detector (msgpack)."""

    format: int
    detector: str
    n_features: int
    layout: str
    fields: dict[str, bytes]


_BLOB_ENCODER = msgspec.msgpack.Encoder()
_BLOB_DECODER = msgspec.msgpack.Decoder(StateBlob)


def encode_blob(blob: StateBlob) -> bytes:
    return _BLOB_ENCODER.encode(blob)


def decode_blob(data: bytes) -> StateBlob:
    """Decode a blob, turning any malformation into ``ValueError``."""
    try:
        blob = _BLOB_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a detector state blob: {exc}") from exc
    if blob.format != STATE_FORMAT:
        raise ValueError(
            f"state blob format {blob.format} is not {STATE_FORMAT}, "
            "the one this version reads"
        )
    return blob


@dataclass(frozen=True, slots=True)
class Groups:
    """Rows of a batch grouped by client, keeping each client's row order.

    Attributes
    ----------
    order
        Permutation that sorts rows by slot, stable, so each client's rows stay
        in arrival order; ``sorted = rows[order]``.
    slot
        Slot of each sorted row.
    position
        Index of each sorted row among its client's rows in this batch (0, 1, ...).
    group
        Group number of each sorted row, indexing ``unique``, ``start``, ``size``.
    unique
        Slot of each group.
    start
        Index (in sorted order) of each group's first row.
    size
        Rows in each group.
    """

    order: IntArray
    slot: IntArray
    position: IntArray
    group: IntArray
    unique: IntArray
    start: IntArray
    size: IntArray


def group_rows(slots: IntArray) -> Groups:
    """Group a batch's rows by slot (see :class:`Groups`).

    One compiled pass (:func:`_group_kernel`) into one buffer, of which the
    fields are views; ``slots`` may be any one-dimensional integer array.
    """
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    # One buffer filled in place: each array a kernel returns costs about a
    # microsecond to hand back to Python, more than grouping 500 rows.
    out = np.empty((7, len(slots)), dtype=np.int64)
    n_groups = _group_kernel(slots, out)
    return Groups(
        order=out[0],
        slot=out[1],
        position=out[2],
        group=out[3],
        unique=out[4, :n_groups],
        start=out[5, :n_groups],
        size=out[6, :n_groups],
    )


@jit
def _group_kernel(slots: IntArray, out: IntArray) -> int:
    """Fill ``out`` (7, n) with the arrays of :class:`Groups`, in its field
    order, for ``slots``; return the number of groups (the length of the last
    three).

    First the stable order by slot: a counting sort when the batch's slots
    span a range not much wider than the batch (the usual case, and ten
    times faster than a comparison sort), else a sort of the keys
    ``slot * n + row``, which are distinct, so any sort is stable (a merge
    sort if those would overflow). Then one
    pass over the sorted rows numbering groups and positions. Integers only,
    so the result is exact whatever the order of the arithmetic.
    """
    n = len(slots)
    order, sorted_slots, position, group, unique, start, size = out
    if n:
        low = slots.min()
        span = slots.max() - low + 1
        if 0 < span <= 4 * n + 256:
            # Counting sort: bucket starts by prefix sums, rows in row order.
            next_row = np.zeros(span + 1, dtype=np.int64)
            for i in range(n):
                next_row[slots[i] - low + 1] += 1
            for k in range(span):
                next_row[k + 1] += next_row[k]
            for i in range(n):
                bucket = slots[i] - low
                order[next_row[bucket]] = i
                next_row[bucket] += 1
        elif 0 < span <= 2**62 // n:
            keys = (slots - low) * n + np.arange(n)
            keys.sort()
            for i in range(n):
                order[i] = keys[i] % n
        else:
            # Keys would overflow (slots no arena hands out): merge sort,
            # stable but four times slower.
            order[:] = np.argsort(slots, kind="mergesort")

    n_groups = 0
    for i in range(n):
        slot = slots[order[i]]
        sorted_slots[i] = slot
        if i == 0 or slot != sorted_slots[i - 1]:
            start[n_groups] = i
            unique[n_groups] = slot
            n_groups += 1
        group[i] = n_groups - 1
        position[i] = i - start[n_groups - 1]
    for k in range(n_groups):
        stop = start[k + 1] if k + 1 < n_groups else n
        size[k] = stop - start[k]
    return n_groups


def push_window(
    ring: npt.NDArray[np.uint8],
    pos: IntArray,
    length: IntArray,
    groups: Groups,
    sorted_bits: npt.NDArray[np.bool_],
) -> tuple[IntArray, IntArray]:
    """Append one bit per row to each client's ring of the last ``window`` bits.

    Rows are applied in order, so a client appearing several times in the batch
    sees its own earlier rows, exactly as if the rows came one at a time; the
    work is one compiled pass over the batch (:func:`_push_window_kernel`).

    Parameters
    ----------
    ring, pos, length
        Arena arrays: ``ring[slot]`` holds ``window`` bits, ``pos[slot]`` the
        next index to write, ``length[slot]`` how many are filled. Updated in
        place.
    groups
        The batch grouped by client.
    sorted_bits
        The bit of each row, in ``groups`` (sorted) order.

    Returns
    -------
    tuple of arrays
        For each row in sorted order: the number of set bits in the client's
        window just after that row, and the window's length (≤ ``window``).
    """
    # Filled in place, as in group_rows: cheaper than two returned arrays.
    out = np.empty((2, len(groups.slot)), dtype=np.int64)
    _push_window_kernel(
        ring,
        pos,
        length,
        groups.slot,
        groups.start,
        groups.size,
        np.asarray(sorted_bits).astype(np.int64),
        out,
    )
    return out[0], out[1]


@jit
def _push_window_kernel(
    ring: npt.NDArray[Any],
    pos: IntArray,
    length: IntArray,
    sorted_slots: IntArray,
    start: IntArray,
    size: IntArray,
    bits: IntArray,
    out: IntArray,
) -> None:
    """:func:`push_window` on the arrays of its :class:`Groups`, the counts
    and lengths into ``out`` (2, n).

    Per group, the set bits of the client's window (its ``length`` cells
    before ``pos``) are counted once; then its rows, in order, each drop the
    cell they overwrite from the count when the window is full, write their
    bit, and add it. Integers only, so exact.
    """
    window = ring.shape[1]
    counts, lengths = out
    for k in range(len(start)):
        slot = sorted_slots[start[k]]
        cells = ring[slot]
        # One modulo per client (Python's, as numpy's %), then plain wrap
        # tests: a division per bit cost more than the rest of the loop.
        p = pos[slot] % window
        filled = length[slot]
        first = (p - filled) % window
        count = 0
        if first + filled <= window:
            for j in range(first, first + filled):
                count += int(cells[j])
        else:
            for j in range(first, window):
                count += int(cells[j])
            for j in range(first + filled - window):
                count += int(cells[j])
        for i in range(start[k], start[k] + size[k]):
            if filled == window:
                count -= int(cells[p])
            else:
                filled += 1
            cells[p] = bits[i]
            count += bits[i]
            p += 1
            if p == window:
                p = 0
            counts[i] = count
            lengths[i] = filled
        pos[slot] = p
        length[slot] = filled


def window_fields(
    name: str, length: int, dtype: str, row_shape: tuple[int, ...] = ()
) -> dict[str, FieldSpec]:
    """Arena fields of a per-client ring ``name`` of ``length`` entries.

    The ring itself, then ``{name}_pos`` (next index to write) and
    ``{name}_len`` (entries filled), the layout :func:`push_window` and
    :func:`check_ring_counters` expect. ``row_shape`` is the shape of one entry.
    """
    return {
        name: FieldSpec((length, *row_shape), dtype),
        f"{name}_pos": FieldSpec((), "<i8"),
        f"{name}_len": FieldSpec((), "<i8"),
    }


def check_ring_counters(
    values: Mapping[str, npt.NDArray[Any]], ring: str, pos: str, length: str
) -> None:
    """Raise ``ValueError`` unless a loaded ring's counters are in range."""
    size = values[ring].shape[0]
    if not 0 <= int(values[pos]) < size or not 0 <= int(values[length]) <= size:
        raise ValueError(f"state field {pos!r} or {length!r} is out of range")


MAX_COUNT = 2**62
"""Largest per-client counter a loaded state may hold: far beyond any
client's queries (a million a second for 146,000 years), and far enough
below int64's top that the kernels' ``+= 1`` cannot wrap it to negative."""


def check_counters(values: Mapping[str, npt.NDArray[Any]], *names: str) -> None:
    """Raise ``ValueError`` unless each named counter is in [0, MAX_COUNT].

    A counter at int64's top wraps negative on the next query: the client
    turns cold for good and its next dump is refused on hand-over.
    """
    for name in names:
        if not 0 <= int(values[name]) <= MAX_COUNT:
            raise ValueError(f"state counter {name!r} is out of range")


def check_window(
    values: Mapping[str, npt.NDArray[Any]], ring: str, pos: str, length: str
) -> None:
    """Raise ``ValueError`` unless a loaded window of bits is self-consistent."""
    check_ring_counters(values, ring, pos, length)
    if int(values[ring].max(initial=0)) > 1:
        raise ValueError(f"state field {ring!r} holds values other than 0 and 1")
