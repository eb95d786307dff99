"""The audit log's hash chain and signatures, without Redis: a chain built
as the admin API builds it verifies, and an edited, deleted, reordered or
inserted entry is found, with its stable code (gateway/admin/audit_chain.py).
"""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from gateway.admin.audit_chain import (
    VERIFY_CODES,
    Chained,
    canonical,
    key_id,
    link_hash,
    sign,
    verify,
)
from gateway.config import AdminConfig

KEY = b"k" * 32


def _chain(n: int, key: bytes | None = KEY, first_seq: int = 1) -> list[Chained]:
    """``n`` entries linked as ``AuditLog.record`` links them."""
    entries: list[Chained] = []
    prev = ""
    for i in range(n):
        seq = first_seq + i
        fields = {
            "ts_ms": 1_700_000_000_000 + i,
            "actor": f"user{i % 2}",
            "action": "POST /v1/keys",
            "target": f"mgk_{i:012d}",
            "source": "127.0.0.1",
            "outcome": "ok",
            "detail": {"plan": "gold", "n": str(i)},
        }
        entry_hash = link_hash(canonical(seq=seq, prev=prev, **fields))  # type: ignore[arg-type]
        entries.append(
            Chained(
                entry_id=f"{1_700_000_000_000 + i}-0",
                seq=seq,
                prev=prev,
                hash=entry_hash,
                mac=sign(key, entry_hash),
                **fields,  # type: ignore[arg-type]
            )
        )
        prev = entry_hash
    return entries


def _resign(entry: Chained, key: bytes | None, **changes: object) -> Chained:
    """``entry`` changed and its hash recomputed (and signed under ``key``),
    as a forger with write access to the stream would."""
    changed = dataclasses.replace(entry, **changes)  # type: ignore[arg-type]
    entry_hash = link_hash(
        canonical(
            seq=changed.seq,
            prev=changed.prev,
            ts_ms=changed.ts_ms,
            actor=changed.actor,
            action=changed.action,
            target=changed.target,
            source=changed.source,
            outcome=changed.outcome,
            detail=changed.detail,
        )
    )
    return dataclasses.replace(changed, hash=entry_hash, mac=sign(key, entry_hash))


def test_an_untouched_chain_verifies() -> None:
    verdict = verify(_chain(20), KEY)
    assert verdict.code is None, verdict.message
    assert (verdict.checked, verdict.legacy, verdict.signed) == (20, 0, True)


def test_a_chain_whose_oldest_entries_were_trimmed_verifies() -> None:
    # The stream's cap and the topic's retention drop the oldest entries:
    # the first one left links to an entry no longer there.
    verdict = verify(_chain(20)[7:], KEY)
    assert verdict.code is None, verdict.message


def test_an_edited_entry_is_found() -> None:
    entries = _chain(10)
    entries[4] = dataclasses.replace(entries[4], outcome="denied")
    verdict = verify(entries, KEY)
    assert (verdict.code, verdict.entry_id) == (
        "AUDIT_ENTRY_ALTERED",
        entries[4].entry_id,
    ), verdict.message


def test_an_edited_detail_is_found() -> None:
    entries = _chain(10)
    entries[2] = dataclasses.replace(entries[2], detail={"plan": "free", "n": "2"})
    assert verify(entries, KEY).code == "AUDIT_ENTRY_ALTERED"


def test_an_edit_with_a_recomputed_hash_fails_the_signature() -> None:
    entries = _chain(10)
    entries[4] = _resign(entries[4], None, outcome="denied")
    verdict = verify(entries, KEY)
    assert (verdict.code, verdict.entry_id) == ("AUDIT_UNSIGNED", entries[4].entry_id)
    entries[4] = _resign(entries[4], b"another key", outcome="denied")
    assert verify(entries, KEY).code == "AUDIT_BAD_MAC"


def test_a_deleted_entry_is_found_at_the_next() -> None:
    entries = _chain(10)
    del entries[5]
    verdict = verify(entries, KEY)
    assert (verdict.code, verdict.entry_id) == (
        "AUDIT_CHAIN_BROKEN",
        entries[5].entry_id,
    ), verdict.message
    assert verdict.checked == 5


def test_reordered_entries_are_found() -> None:
    entries = _chain(10)
    entries[3], entries[4] = entries[4], entries[3]
    verdict = verify(entries, KEY)
    assert (verdict.code, verdict.entry_id) == (
        "AUDIT_CHAIN_BROKEN",
        entries[3].entry_id,
    )


def test_an_inserted_entry_is_found() -> None:
    entries = _chain(10)
    # Linked to its predecessor and signed with the wrong key: the MAC
    # gives it away; with the right key the next entry's link still does.
    forged = _resign(entries[5], b"guessed", target="mgk_forged", seq=7)
    entries.insert(6, forged)
    assert verify(entries, KEY).code == "AUDIT_BAD_MAC"
    entries[6] = _resign(
        entries[5], KEY, target="mgk_forged", seq=7, prev=entries[5].hash
    )
    verdict = verify(entries, KEY)
    assert (verdict.code, verdict.entry_id) == (
        "AUDIT_CHAIN_BROKEN",
        entries[7].entry_id,
    )


def test_a_chain_recomputed_without_the_key_is_found() -> None:
    # Whoever can write the stream can rebuild every hash after an edit;
    # only the signatures show it.
    forged = _chain(10, key=None)
    assert verify(forged, None).code is None
    assert verify(forged, KEY).code == "AUDIT_UNSIGNED"


def test_entries_from_before_chaining_are_counted_not_checked() -> None:
    legacy = [
        Chained(f"{i}-0", 0, "", "", "", i, "old", "login", "", "", "ok", {})
        for i in range(3)
    ]
    verdict = verify([*legacy, *_chain(5)], KEY)
    assert verdict.code is None and verdict.legacy == 3, verdict.message


def test_chain_fields_stripped_after_chained_entries_are_found() -> None:
    entries = _chain(6)
    entries[3] = dataclasses.replace(entries[3], seq=0, prev="", hash="", mac="")
    assert verify(entries, KEY).code == "AUDIT_UNCHAINED"


def test_a_restarted_chain_is_found() -> None:
    # A wiped stream begins again at seq 1: a reader of the topic sees it.
    entries = [*_chain(5), *_chain(3)]
    assert verify(entries, KEY).code == "AUDIT_CHAIN_BROKEN"


@pytest.mark.parametrize("code", sorted(VERIFY_CODES))
def test_every_code_is_described(code: str) -> None:
    assert VERIFY_CODES[code]


def test_a_short_audit_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="audit_key"):
        AdminConfig(audit_key="too short")  # type: ignore[arg-type]


OLD_KEY = b"o" * 32


def _rotated() -> list[Chained]:
    """Ten entries signed under OLD_KEY before key ids (no kid), five under
    OLD_KEY with its id, five under KEY with its id: two rotations' worth."""
    entries = _chain(20, key=OLD_KEY)
    return (
        entries[:10]
        + [dataclasses.replace(e, kid=key_id(OLD_KEY)) for e in entries[10:15]]
        + [
            dataclasses.replace(e, mac=sign(KEY, e.hash), kid=key_id(KEY))
            for e in entries[15:]
        ]
    )


def test_a_rotation_verifies_with_the_retired_key_given() -> None:
    verdict = verify(_rotated(), [KEY, OLD_KEY])
    assert verdict.code is None and verdict.checked == 20, verdict.message


def test_a_key_id_no_given_key_has_is_named() -> None:
    verdict = verify(_rotated(), KEY)
    # The entries without a kid fail first: no given key made their MAC.
    assert verdict.code == "AUDIT_BAD_MAC", verdict.message
    verdict = verify(_rotated()[10:], KEY)
    assert verdict.code == "AUDIT_UNKNOWN_KEY", verdict.message
    assert key_id(OLD_KEY) in verdict.message


def test_a_forgery_claiming_a_retired_keys_id_is_refused() -> None:
    entries = _rotated()
    forged = _resign(entries[12], b"f" * 32, target="forged")
    entries[12] = forged  # kid still OLD_KEY's
    entries[13] = dataclasses.replace(entries[13], prev=forged.hash)
    verdict = verify(entries, [KEY, OLD_KEY])
    assert (verdict.code, verdict.entry_id) == ("AUDIT_BAD_MAC", forged.entry_id)


def test_a_key_id_does_not_show_the_key() -> None:
    assert len(key_id(KEY)) == 16
    assert KEY.hex()[:16] != key_id(KEY) != key_id(OLD_KEY)
