"""Unit tests for gateway.store without Redis: the GCRA reference, item checks,
key layout and the Lua script's presence."""

from __future__ import annotations

import doctest
import hashlib
import itertools
import re

import pytest
from redis.asyncio import Redis

from gateway import keys, store
from gateway.config import load_settings
from gateway.store import (
    ADMIT_LUA,
    ADMIT_SHA,
    Admission,
    AdmitItem,
    CounterStore,
    gcra,
)

SECOND_US = 1_000_000.0


def run(
    times_us: list[float], rate_per_s: float, burst: int
) -> list[tuple[bool, float]]:
    """Feed arrivals through the reference; (allowed, retry_after_us) each."""
    tat: float | None = None
    out = []
    for now in times_us:
        decision = gcra(tat, now, rate_per_s, burst)
        tat = decision.tat_us
        out.append((decision.allowed, decision.retry_after_us))
    return out


# GCRA reference ------------------------------------------------------------------


def test_burst_then_refusal_with_one_interval_to_wait() -> None:
    # rate 10/s, burst 5: five at once, the sixth waits T = 100 ms.
    results = run([0.0] * 6, rate_per_s=10, burst=5)
    assert [allowed for allowed, _ in results] == [True] * 5 + [False]
    assert results[5][1] == pytest.approx(100_000.0)


def test_refusal_does_not_move_the_tat() -> None:
    first = gcra(None, 0.0, 10, 1)
    refused = gcra(first.tat_us, 1.0, 10, 1)
    assert not refused.allowed
    assert refused.tat_us == first.tat_us
    assert refused.retry_after_us == pytest.approx(100_000.0 - 1.0)


def test_admitted_exactly_at_retry_after() -> None:
    burst = run([0.0] * 5, 10, 5)
    assert all(a for a, _ in burst)
    tat = 500_000.0
    assert not gcra(tat, 99_999.0, 10, 5).allowed
    assert gcra(tat, 100_000.0, 10, 5).allowed


def test_steady_rate_over_time() -> None:
    # Arrivals every 1 ms for 10 s at rate 10/s, burst 5 (T = 100 ms, tau =
    # 400 ms): the burst goes through at t = 0..4 ms, then exactly one request
    # per T from t = 100 ms, i.e. 5 + 99 admitted by t = 9.999 s.
    times = [i * 1000.0 for i in range(10_000)]
    allowed = [t for t, (ok, _) in zip(times, run(times, 10, 5), strict=True) if ok]
    assert allowed[:6] == [0.0, 1000.0, 2000.0, 3000.0, 4000.0, 100_000.0]
    gaps = [b - a for a, b in itertools.pairwise(allowed[5:])]
    assert set(gaps) == {100_000.0}
    assert len(allowed) == 5 + 99


def test_rested_client_gets_its_burst_back() -> None:
    results = run([0.0] * 5 + [10 * SECOND_US] * 6, 10, 5)
    assert [a for a, _ in results] == [True] * 5 + [True] * 5 + [False]


def test_cost_uses_several_cells() -> None:
    first = gcra(None, 0.0, 10, 5, cost=5)
    assert first.allowed
    second = gcra(first.tat_us, 0.0, 10, 5, cost=1)
    assert not second.allowed
    assert second.retry_after_us == pytest.approx(100_000.0)


def test_burst_one_is_a_plain_interval() -> None:
    results = run([0.0, 50_000.0, 100_000.0], 10, 1)
    assert [a for a, _ in results] == [True, False, True]


def test_doctests() -> None:
    for module in (store, keys):
        failures, _ = doctest.testmod(module, raise_on_error=False)
        assert failures == 0, module.__name__


# AdmitItem / Admission ---------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"client_id": "bad:id"},
        {"client_id": "a}b"},
        {"client_id": ""},
        {"rate_per_s": 0.0},
        {"burst": 0},
        {"cost": 0},
        {"cost": 6},
    ],
)
def test_admit_item_rejects(changes: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "client_id": "alice",
        "request_id": "r",
        "delivery": "0:1",
        "rate_per_s": 10.0,
        "burst": 5,
    }
    fields.update(changes)
    with pytest.raises(ValueError):
        AdmitItem(**fields)  # type: ignore[arg-type]


def test_admission_serve() -> None:
    assert Admission("ok", 0, 1).serve
    assert Admission("redelivery", 0, 1).serve
    for outcome in ("duplicate", "rate_limited", "blocked"):
        assert not Admission(outcome, 0, 1).serve


# Key layout ----------------------------------------------------------------------


def test_every_client_key_shares_the_hash_tag() -> None:
    settings = load_settings(redis={"key_prefix": "mgt"})
    counters = CounterStore(Redis(), settings)
    names = [counters.client_key("alice", s) for s in ("tat", "block", "totals", "day")]
    names.append(counters.request_key("alice", "r-1"))
    names.append(counters.request_key("alice", "x" * 1000))
    tags = {re.search(r"\{([^}]*)\}", name).group(1) for name in names}  # type: ignore[union-attr]
    assert tags == {"c:alice"}
    assert all(name.startswith("mgt:{c:alice}:") for name in names)
    assert len(names[-1]) < 100


def test_decode_responses_is_refused() -> None:
    with pytest.raises(ValueError):
        CounterStore(Redis(decode_responses=True), load_settings())


def test_script_is_packaged_and_hashed() -> None:
    assert b"redis.call" in ADMIT_LUA
    assert hashlib.sha1(ADMIT_LUA).hexdigest() == ADMIT_SHA
