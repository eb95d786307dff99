"""Tamper evidence of the admin audit log: a hash chain over the entries and
an HMAC of each link under the server's ``admin.audit_key``.

Each entry carries ``seq`` (1, 2, 3, ... in the stream's order), ``prev``
(the ``hash`` of the entry before it; empty for the first), ``hash`` (the
SHA-256 of the entry's content, ``seq`` and ``prev`` included, see
:func:`canonical`) and ``mac`` (HMAC-SHA256 of ``hash`` under the key; empty
when no key is set) and ``kid``, the id of the key that made ``mac``
(:func:`key_id`; empty when unsigned, and in entries signed before key ids).
Editing an entry changes its hash; deleting, reordering or inserting one
breaks the next entry's ``prev``; and recomputing the whole chain after a
change needs the key, because every link is signed.

Keys rotate: the admin API signs under ``admin.audit_key`` and a verifier is
given that key and the retired ones (``admin.audit_retired_keys``), and picks
each entry's by its ``kid``. ``kid`` is outside the hash and the MAC: it only
chooses the key, and naming another key fails that key's MAC. An entry
without one (signed before key ids) passes if any given key made its MAC.

What it cannot show (docs/admin.md, "Tamper evidence"): entries cut from the
newest end (nothing after them points back), a wiped stream restarted from
``seq`` 1, and anything at all when the key is unset (whoever can write the
stream can then recompute every hash). The stream id (``entry_id``) is
Redis's, assigned after the hash, so it is not covered; the chain orders the
entries instead.

Pure: imports the standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Stable codes of a failed verification (``modelgate admin audit --verify``).
VERIFY_CODES: dict[str, str] = {
    "AUDIT_ENTRY_ALTERED": "the entry's content does not match its hash (edited)",
    "AUDIT_BAD_MAC": "the entry's signature does not match (forged or another key)",
    "AUDIT_UNSIGNED": "the entry has no signature although a key was given",
    "AUDIT_CHAIN_BROKEN": "the entry does not follow the one before it "
    "(an entry deleted, inserted or moved)",
    "AUDIT_UNCHAINED": "the entry has no chain fields after chained ones",
    "AUDIT_UNKNOWN_KEY": "the entry was signed under a key id none of the given "
    "keys has (a retired key missing from admin.audit_retired_keys?)",
}

# The content fields, besides ``detail``, in the order the stream holds them.
CONTENT_FIELDS = ("ts_ms", "actor", "action", "target", "source", "outcome")


def canonical(
    *,
    seq: int,
    prev: str,
    ts_ms: int,
    actor: str,
    action: str,
    target: str,
    source: str,
    outcome: str,
    detail: Mapping[str, str],
) -> bytes:
    """The bytes an entry's ``hash`` is taken over: its fields as JSON with
    sorted keys and no spaces, so any reader can rebuild them exactly."""
    document = {
        "seq": seq,
        "prev": prev,
        "ts_ms": ts_ms,
        "actor": actor,
        "action": action,
        "target": target,
        "source": source,
        "outcome": outcome,
        "detail": dict(detail),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def link_hash(content: bytes) -> str:
    """SHA-256 of :func:`canonical` bytes, hex."""
    return hashlib.sha256(content).hexdigest()


def key_id(key: bytes) -> str:
    """The public id of an audit key: an HMAC of a fixed label under it,
    16 hex digits. It tells keys apart and reveals no more about the key
    than any entry's MAC does.

    Examples
    --------
    >>> key_id(b"k" * 32) == key_id(b"k" * 32) != key_id(b"j" * 32)
    True
    """
    return hmac.new(key, b"modelgate audit key id", hashlib.sha256).hexdigest()[:16]


def sign(key: bytes | None, entry_hash: str) -> str:
    """HMAC-SHA256 of ``entry_hash`` under ``key``, hex; empty without a key."""
    if key is None:
        return ""
    return hmac.new(key, entry_hash.encode("ascii"), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Chained:
    """One entry as a verifier sees it (from the stream or the topic)."""

    entry_id: str
    seq: int
    prev: str
    hash: str
    mac: str
    ts_ms: int
    actor: str
    action: str
    target: str
    source: str
    outcome: str
    detail: Mapping[str, str]
    kid: str = ""

    @property
    def chained(self) -> bool:
        return bool(self.hash)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :func:`verify`.

    ``code`` is None when every chained entry checked out, else a key of
    :data:`VERIFY_CODES` and ``entry_id`` the first entry found broken.
    ``checked`` counts the chained entries read up to there, ``legacy`` the
    entries written before chaining (before the first chained one), which
    nothing protects. ``signed`` says whether MACs were checked.
    """

    code: str | None
    entry_id: str | None
    message: str
    checked: int
    legacy: int
    signed: bool


class ChainVerifier:
    """:func:`verify` one entry at a time, keeping only the entry before, so
    a chain of any length is checked in bounded memory.

    Parameters
    ----------
    keys
        The keys the MACs may be under: the current one and the retired
        ones, in any order; empty or None: hashes and links only.
    """

    def __init__(self, keys: Iterable[bytes] | None) -> None:
        self._keys = {key_id(k): k for k in keys or ()}
        self._before: Chained | None = None
        self.checked = 0
        self.legacy = 0

    @property
    def signed(self) -> bool:
        return bool(self._keys)

    def _broken(self, code: str, entry: Chained, why: str) -> Verdict:
        return Verdict(
            code,
            entry.entry_id,
            f"entry {entry.entry_id} (seq {entry.seq}): {VERIFY_CODES[code]}: {why}",
            self.checked,
            self.legacy,
            self.signed,
        )

    def feed(self, entry: Chained) -> Verdict | None:
        """Check the next entry (oldest first): its verdict if broken, else
        None. Feed no more after a broken one."""
        before = self._before

        # Step: entries from before chaining, only ahead of the first link.
        if not entry.chained:
            if before is None:
                self.legacy += 1
                return None
            return self._broken("AUDIT_UNCHAINED", entry, f"after seq {before.seq}")

        # Step: the entry against its own hash and signature.
        content = canonical(
            seq=entry.seq,
            prev=entry.prev,
            ts_ms=entry.ts_ms,
            actor=entry.actor,
            action=entry.action,
            target=entry.target,
            source=entry.source,
            outcome=entry.outcome,
            detail=entry.detail,
        )
        if not hmac.compare_digest(link_hash(content), entry.hash):
            return self._broken("AUDIT_ENTRY_ALTERED", entry, "content hash differs")
        if self._keys:
            broken = self._check_mac(entry)
            if broken is not None:
                return broken

        # Step: the link to the entry before.
        if before is None:
            if entry.seq == 1 and entry.prev:
                return self._broken("AUDIT_CHAIN_BROKEN", entry, "seq 1 with a prev")
        elif entry.prev != before.hash or entry.seq != before.seq + 1:
            return self._broken(
                "AUDIT_CHAIN_BROKEN",
                entry,
                f"expected seq {before.seq + 1} after {before.entry_id}",
            )
        self._before = entry
        self.checked += 1
        return None

    def _check_mac(self, entry: Chained) -> Verdict | None:
        if not entry.mac:
            return self._broken("AUDIT_UNSIGNED", entry, "no mac")
        if entry.kid:
            key = self._keys.get(entry.kid)
            if key is None:
                return self._broken("AUDIT_UNKNOWN_KEY", entry, f"key id {entry.kid!r}")
            candidates = [key]
        else:
            # Signed before key ids: by any of the keys.
            candidates = list(self._keys.values())
        if not any(
            hmac.compare_digest(sign(k, entry.hash), entry.mac) for k in candidates
        ):
            return self._broken("AUDIT_BAD_MAC", entry, "mac differs")
        return None

    def result(self) -> Verdict:
        """The verdict when every entry fed checked out."""
        signed = "signed" if self.signed else "NOT signed (no key given)"
        return Verdict(
            None,
            None,
            f"{self.checked} chained entries verified, {signed}; "
            f"{self.legacy} older unchained",
            self.checked,
            self.legacy,
            self.signed,
        )


def verify(entries: Iterable[Chained], keys: bytes | Iterable[bytes] | None) -> Verdict:
    """Check ``entries`` (oldest first) link by link; stop at the first
    broken one.

    The first chained entry's ``prev`` is taken on trust unless its ``seq``
    is 1 (its predecessor may have been trimmed away, by the stream's cap
    or the topic's retention). ``keys`` is one key or several (current and
    retired; see :class:`ChainVerifier`). With no key only the hashes and
    links are checked: that shows careless edits, not a forger with stream
    access.
    """
    verifier = ChainVerifier([keys] if isinstance(keys, bytes) else keys)
    for entry in entries:
        broken = verifier.feed(entry)
        if broken is not None:
            return broken
    return verifier.result()
