"""The poisoning guard's spectral class windows, shared in Redis by every guard
process of a deployment.

The spectral check (``detectors.poisoning``) judges a record against the
last ``spectral_window`` accepted records of its class (and the class's clean
calibration rows, which stay in each process). Kept in one process, that window
was forgotten on a restart and split between guards by partition: a trigger
cluster spread over two guards, or sent across a restart, grew unseen. Here
each class window is a Redis list, per model and class::

    {prefix}:fbguard:{model}:window:{{prefix}:fbwin:{model}}:<class>

(the hash tag keeps one model's windows in one Redis Cluster slot, so each
read and each write is one atomic script). An entry is a record's 12-character
digest (``detectors.poisoning.record_digest``: id, label and row) followed
by msgpack ``{format, id, submitter, row, partition, offset}``, the row as
raw little-endian float64 features, the partition and offset those of the
feedback record's accepted delivery. Each list is trimmed to
``spectral_window`` entries on every write and expires
``feedback.state_ttl_s`` after its last write.

Per batch the guard reads the windows of the classes the batch touches
(:meth:`SharedWindows.load`), screens, then writes the outcome
(:meth:`SharedWindows.save`) together with the submitters' state, before any
verdict is produced:

- only records the guard accepted and learned (never a rejected or a shadow
  would-reject one, never a repeat) are added, each once: an entry whose
  digest the window holds is not added again, so a redelivered or retried
  batch adds nothing twice;
- the batch's own records are left out of the window it is judged against
  and each goes back in once judged and accepted, and an entry of a record
  the batch rejects is removed, so a batch judged a second time (after a
  failure, or redelivered to another guard) is judged as the first time was
  and the window ends holding the latest verdict's rows. "Own" means the same
  delivery (partition and offset), not the same record: a replay at a new
  offset is judged with its first delivery's entry in the window and, if
  refused, leaves that entry there (by digest alone, copies of accepted
  carriers sent after a new carrier hid the cluster from it, and refused
  copies cleared it). A batch that fails after its write therefore leaves
  rows in the window only until its retry, which must come before the
  commit;
- one model's write is one script, all or nothing. A batch spanning two
  models writes two; a failure between them leaves the first model's rows,
  which the retry finds there (added once, removed if now rejected).

Entries that are not what this module writes (another type at the key, bytes
that do not decode, a wrong dimension, a digest that does not match its
record, an oversized value) are refused with a warning and the window is
rebuilt from the entries that were sound at the next write.

Known shortcomings. Two guards screening at the same moment each judge
against the window as it was when their batch started: records accepted by
the other guard's batch in flight are not seen until the next batch (a
cluster spread over guards gains at most one batch per guard in flight). A
rebuild rewrites the window from what this guard read, losing entries
another guard added between that read and the write (only after foreign
data was found). A row of a batch that is evicted by a full window of other
guards' rows between the batch's first attempt and its retry in the same
process is added again by the retry (a later delivery in another process
finds the record in its submitter's state and adds nothing). Sharing also
widens the spectral test's drag evasion (docs/feedback-guard.md, "Attacked"):
accepted records that move a class window towards a trigger step by step
now reach every guard, through any partition, and outlive restarts until the
window expires.

Imports Redis (through ``gateway.store``), msgspec, numpy and the detector
library; nothing from Kafka.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import msgspec
import numpy as np
import numpy.typing as npt

from detectors.poisoning import (
    DIGEST_CHARS,
    PoisoningGuard,
    Verdict,
    record_digest,
)
from gateway.config import Settings
from gateway.store import RedisClient, redis_guard

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

ENTRY_FORMAT = 2
"""Version of a window entry; bump when its meaning changes (2: the record's
partition and offset)."""

READ_LUA: bytes = (
    resources.files("gateway").joinpath("lua/fbwindow_read.lua").read_bytes()
)
WRITE_LUA: bytes = (
    resources.files("gateway").joinpath("lua/fbwindow_write.lua").read_bytes()
)

# Record ids are the wire's (at most 128 characters) and submitters are client
# ids (at most 128); in UTF-8 at most 4 bytes each, plus msgpack's framing.
_MAX_TEXT_CHARS = 128
_ENTRY_OVERHEAD_BYTES = 64
_DIGEST = re.compile(rb"^[0-9a-f]{%d}$" % DIGEST_CHARS)

_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_TEXT_CHARS)]


class WindowEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One accepted record as a class window holds it (after its digest), with
    the partition and offset of the delivery that was accepted."""

    format: int
    id: _Text
    submitter: _Text
    row: bytes
    partition: Annotated[int, msgspec.Meta(ge=0)]
    offset: Annotated[int, msgspec.Meta(ge=0)]


@dataclass(frozen=True)
class WindowRecord:
    """A record of the batch that the guard screens.

    Attributes
    ----------
    model
        The model it is feedback for.
    label
        Its label as a class index of the model.
    record_id
        Its feedback id.
    submitter
        The client id of the key that signed it.
    row
        (d,) raw features, validated.
    partition
        The feedback topic partition it was read from.
    offset
        Its offset there: with the partition, which delivery of the record
        this is (a batch judged again brings the same; a replay, a new one).
    """

    model: str
    label: int
    record_id: str
    submitter: str
    row: npt.NDArray[Any]
    partition: int
    offset: int

    @property
    def digest(self) -> str:
        return record_digest(self.record_id, self.label, self.row)


def window_key(prefix: str, model: str, class_value: int) -> str:
    """The Redis key of one class window (``class_value`` is the model's class,
    not its index)."""
    return f"{prefix}:fbguard:{model}:window:{{{prefix}:fbwin:{model}}}:{class_value}"


def max_entry_bytes(n_features: int) -> int:
    """The largest entry a window of ``n_features`` features holds."""
    return DIGEST_CHARS + 8 * n_features + 8 * _MAX_TEXT_CHARS + _ENTRY_OVERHEAD_BYTES


def encode_entry(record: WindowRecord) -> bytes:
    """A window entry: the record's digest, then msgpack of the rest."""
    row = np.ascontiguousarray(record.row, dtype="<f8").reshape(-1)
    body = msgspec.msgpack.encode(
        WindowEntry(
            format=ENTRY_FORMAT,
            id=record.record_id,
            submitter=record.submitter,
            row=row.tobytes(),
            partition=record.partition,
            offset=record.offset,
        )
    )
    return record.digest.encode("ascii") + body


def decode_entry(raw: bytes, label: int, n_features: int) -> tuple[str, WindowEntry]:
    """The digest and entry in ``raw``, checked against the class it was read
    for.

    Raises
    ------
    ValueError
        Oversized, malformed, another format, a row of another dimension or
        not finite, or a digest that does not match the entry's record.
    """
    if not raw or len(raw) > max_entry_bytes(n_features):
        raise ValueError("empty or oversized entry")
    head = raw[:DIGEST_CHARS]
    if not _DIGEST.match(head):
        raise ValueError("entry does not start with a digest")
    try:
        entry = msgspec.msgpack.decode(raw[DIGEST_CHARS:], type=WindowEntry)
    except (
        msgspec.DecodeError,
        msgspec.ValidationError,
        UnicodeDecodeError,
        RecursionError,
    ) as exc:
        raise ValueError(f"malformed entry: {exc}") from exc
    if entry.format != ENTRY_FORMAT:
        raise ValueError(f"entry format {entry.format}")
    if len(entry.row) != 8 * n_features:
        raise ValueError(
            f"row of {len(entry.row)} bytes, expected {n_features} float64 features"
        )
    row = np.frombuffer(entry.row, dtype="<f8")
    if not np.isfinite(row).all():
        raise ValueError("row holds non-finite values")
    digest = head.decode("ascii")
    if record_digest(entry.id, label, row) != digest:
        # Moved from another class's key, or edited: the digest names another
        # record, and deduplication by digest would be unsound.
        raise ValueError("digest does not match the entry's record")
    return digest, entry


class SharedWindows:
    """Loads the guard's class windows from Redis before a batch is screened
    and writes the batch's verdicts to them after.

    Parameters
    ----------
    redis
        Client with ``decode_responses=False`` (one node or a cluster).
    settings
        ``redis.key_prefix``, ``redis.socket_timeout_s`` (bounds each call) and
        ``feedback.state_ttl_s`` (a window's expiry after its last write).
    guards
        The calibrated guard of each model, whose windows are replaced.
    classes
        Each model's class values in index order (the signature's
        ``classes``), which name the keys.
    """

    def __init__(
        self,
        redis: RedisClient,
        settings: Settings,
        guards: Mapping[str, PoisoningGuard],
        classes: Mapping[str, Sequence[int]],
    ) -> None:
        self._redis = redis
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        self._ttl_ms = max(1, round(settings.feedback.state_ttl_s * 1000))
        self._guards = guards
        self._classes = {name: list(values) for name, values in classes.items()}
        self._read = redis.register_script(READ_LUA)
        self._write = redis.register_script(WRITE_LUA)
        # (model, label) -> the sound entries read, for a window whose key held
        # something refused: the next write rebuilds it from them.
        self._rebuild: dict[tuple[str, int], list[bytes]] = {}
        self._held_back: dict[str, dict[str, tuple[int, FloatArray, str, str]]] = {}
        # (model, label) -> raw entry -> what decode_entry made of it, for the
        # entries of that window at its last read. decode_entry is a pure
        # function of the bytes, the class and the dimension (both fixed per
        # key), so a hit is exactly what decoding again would give, whoever
        # wrote the bytes; refused entries are not kept, and each read keeps
        # only the entries it saw, so this holds one window per class.
        self._decoded: dict[tuple[str, int], dict[bytes, tuple[str, WindowEntry]]] = {}

    def key(self, model: str, label: int) -> str:
        """The key of class index ``label``'s window of ``model``."""
        return window_key(self._prefix, model, self._classes[model][label])

    async def load(self, records: Sequence[WindowRecord]) -> None:
        """Replace the windows of every (model, class) of ``records`` with the
        shared ones, leaving out entries of ``records`` themselves.

        Raises
        ------
        StoreError
            Redis failed or did not answer in time (the batch is retried).
        """
        # Whole windows are read every time, so whatever another guard, an
        # expiry or a rebuild did to a list in between is seen; only the
        # decoding is skipped for entries read before (see _decoded).
        # TODO: the read itself (the script and the transfer, about 14 of
        # the 50 ms ten full digits windows cost, docs/feedback-guard.md)
        # could skip a window no write touched since this guard's last read,
        # with a token per window that every write replaces; not done, since
        # in a busy deployment a guard's own write changes the token of every
        # window it reads next.
        self._rebuild = {}
        by_model = _labels_by_model(records)
        # The deliveries of this batch, by digest: only an entry one of them
        # wrote (an earlier attempt at this batch) is held back. A replay (the
        # same record at a new offset) is judged with the entry its first
        # delivery left; held back by digest alone, copies of accepted
        # carriers sent after a new carrier hid the cluster from it.
        own: dict[str, set[tuple[int, int]]] = {}
        for r in records:
            own.setdefault(r.digest, set()).add((r.partition, r.offset))
        for model in by_model:
            self._held_back[model] = {}
        for model, labels in by_model.items():
            guard = self._guards[model]
            keys = [self.key(model, label) for label in labels]
            async with redis_guard(
                "feedback.load_windows", self._timeout_s, self._redis
            ):
                replies = await self._read(
                    keys=keys,
                    args=[
                        guard.params.spectral_window,
                        max_entry_bytes(guard.n_features),
                    ],
                )
            for label, reply in zip(labels, replies, strict=True):
                self._apply(model, label, reply, own)
            guard.set_held_back(self._held_back[model])

    def _apply(
        self,
        model: str,
        label: int,
        reply: Any,
        own: Mapping[str, set[tuple[int, int]]],
    ) -> None:
        guard = self._guards[model]
        state, raw_entries = int(reply[0]), list(reply[1:])
        extra = {"model": model, "label": label, "detector": guard.name}
        sound: list[bytes] = []
        rows: list[FloatArray] = []
        ids: list[str] = []
        submitters: list[str] = []
        refused, reason = 0, ""
        before = self._decoded.get((model, label), {})
        decoded: dict[bytes, tuple[str, WindowEntry]] = {}
        for item in raw_entries:
            raw = bytes(item)
            known = before.get(raw) or decoded.get(raw)
            if known is None:
                try:
                    known = decode_entry(raw, label, guard.n_features)
                except ValueError as exc:
                    refused += 1
                    reason = str(exc)
                    continue
            decoded[raw] = known
            digest, entry = known
            sound.append(raw)
            if (entry.partition, entry.offset) in own.get(digest, ()):
                # Written by an earlier attempt at this very delivery (here, or
                # in the guard that held the partition before): judged again
                # without itself, and back in the window once judged
                # (PoisoningGuard.set_held_back).
                self._held_back[model][digest] = (
                    label,
                    np.frombuffer(entry.row, dtype="<f8"),
                    entry.id,
                    entry.submitter,
                )
                continue
            rows.append(np.frombuffer(entry.row, dtype="<f8"))
            ids.append(entry.id)
            submitters.append(entry.submitter)
        self._decoded[(model, label)] = decoded
        if state == 1:
            logger.warning("class window refused: another type at its key", extra=extra)
            self._rebuild[(model, label)] = []
        elif state == 2 or refused:
            logger.warning(
                "class window entries refused (%d): %s",
                refused,
                reason if refused else "longer than a window",
                extra=extra,
            )
            self._rebuild[(model, label)] = sound
        guard.set_window(
            label,
            np.vstack(rows) if rows else np.empty((0, guard.n_features)),
            ids,
            submitters,
        )

    async def save(self, judged: Sequence[tuple[WindowRecord, Verdict | None]]) -> int:
        """Write the verdicts on the batch's records (in the order screened;
        ``None`` for a record that got none, e.g. the model failed) to the
        shared windows; returns the entries added.

        Raises
        ------
        StoreError
            Redis failed or did not answer in time (the batch is retried).
        """
        plan: dict[str, dict[int, tuple[list[bytes], list[bytes]]]] = {}
        for (model, label), sound in self._rebuild.items():
            plan.setdefault(model, {})[label] = ([], list(sound))
        for record, verdict in judged:
            if verdict is None:
                continue
            drops, adds = plan.setdefault(record.model, {}).setdefault(
                record.label, ([], [])
            )
            if not verdict.accepted:
                # The entry this delivery would have written, byte for byte:
                # only an earlier attempt at the same delivery is undone. A
                # refused replay leaves its first delivery's entry (copies of
                # a cluster's carriers, refused, would clear it otherwise).
                drops.append(encode_entry(record))
            elif verdict.learned:
                adds.append(encode_entry(record))
        added = 0
        for model, labels in sorted(plan.items()):
            keys: list[str] = []
            args: list[Any] = [
                self._guards[model].params.spectral_window,
                self._ttl_ms,
            ]
            for label, (drops, adds) in sorted(labels.items()):
                rebuild = (model, label) in self._rebuild
                if not (drops or adds or rebuild):
                    continue
                # Only the last window's worth: earlier ones would be evicted
                # by the later ones, and a retry of the batch would then find
                # them absent and add them again.
                adds = adds[-self._guards[model].params.spectral_window :]
                keys.append(self.key(model, label))
                args += ["1" if rebuild else "0", len(drops), *drops, len(adds), *adds]
            if not keys:
                continue
            async with redis_guard(
                "feedback.save_windows", self._timeout_s, self._redis
            ):
                added += int(await self._write(keys=keys, args=args))
            for label in labels:
                self._rebuild.pop((model, label), None)
        return added


def _labels_by_model(records: Sequence[WindowRecord]) -> dict[str, list[int]]:
    found: dict[str, set[int]] = {}
    for record in records:
        found.setdefault(record.model, set()).add(record.label)
    return {model: sorted(labels) for model, labels in sorted(found.items())}
