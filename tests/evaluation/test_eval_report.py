"""The evaluation report's targets and files, from a fixed result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluation.benign import BenignHabits, query_stream
from evaluation.eval_report import (
    EvalResult,
    agreement_at,
    benign_summary,
    is_loaded,
    render_markdown,
    targets,
    write_eval_report,
)
from evaluation.harness import EvalPlan


def _client(name: str, role: str, **counts: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "client": name,
        "role": role,
        "requests": 100,
        "throttled": 0,
        "blocked": 0,
        "alerts": 0,
        "retries": 1,
        "first_flag_query": None,
        "risk_series": [[0.5, 0.1], [1.0, 0.2]],
    }
    base.update(counts)
    return base


def _attack(
    attack: str, kind: str, first_flag: int | None, **extra: Any
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "attack": attack,
        "model": "digits",
        "variant": "single",
        "kind": kind,
        "keys": 1,
        "budget": 65 if attack == "equation" else 500,
        "flagged": first_flag is not None,
        "first_flag_query": first_flag,
        "first_enforced_query": extra.pop("enforced", None),
        "ledger": {"requests": 300},
        "majority_rate": 0.11,
    }
    entry.update(extra)
    return entry


def _result() -> EvalResult:
    return EvalResult(
        run_id="r",
        quick=True,
        seed=0,
        started_at="now",
        duration_s=1.0,
        traffic_s=1.0,
        plan={"budgets": {}},
        policy={"flag_at": 1.0},
        detectors={},
        attacks=[
            _attack("hopskipjump", "probing", 80, gateway={"found": 1}, direct={}),
            _attack("boundary", "probing", 12, gateway={}, direct={}),
            _attack(
                "random",
                "extraction",
                40,
                enforced=150,
                gateway={"curve": [[100, 0.3], [200, 0.5], [300, 0.6]]},
                direct={"agreement": 0.6, "curve": [[300, 0.6]]},
            ),
            _attack(
                "equation",
                "extraction",
                None,
                gateway={"curve": [[65, 1.0]], "agreement": 1.0},
                direct={"agreement": 1.0, "curve": [[65, 1.0]]},
            ),
        ],
        clients=[_client(f"b{i}", "benign") for i in range(99)]
        + [_client("b99", "benign", first_flag_query=7, blocked=2)]
        + [_client("attacker", "random/single", risk_series=[[0.2, 3.0]])],
    )


def test_targets_measure_each_goal_and_say_by_how_much_it_was_missed() -> None:
    rows = {row["target"]: row for row in targets(_result())}

    assert rows["honest clients flagged"]["met"]  # 1 of 100 is exactly 1%
    blocked = rows["honest clients blocked"]
    assert not blocked["met"] and blocked["missed_by"].startswith("+1.0%")
    late = rows["hopskipjump on digits (single): flagged within 50 queries"]
    assert not late["met"] and late["missed_by"] == "30 queries late"
    assert rows["boundary on digits (single): flagged within 50 queries"]["met"]
    # Enforced at query 150: the surrogate then agreed 0.3, half of 0.6.
    ratio = rows[
        "random on digits (single): agreement when stopped < 90% of unhindered"
    ]
    assert ratio["met"] and ratio["measured"] == 0.5
    never = rows["equation on digits (single): flagged within 2(d+1) = 130 queries"]
    assert not never["met"] and "not flagged" in never["missed_by"]
    runs = rows["attack runs flagged (all, single-key and distributed)"]
    assert runs["measured"] == "3/4" and not runs["met"]


def _agreement_row(entry: dict[str, Any]) -> dict[str, Any]:
    result = _result()
    result.attacks = [entry]
    name = f"{entry['attack']} on digits (single): agreement when stopped"
    return next(r for r in targets(result) if r["target"].startswith(name))


@pytest.mark.parametrize(
    ("opening", "first_round", "said"),
    [
        # Its 25 honest-looking rows already give 0.95 of the unhindered 0.97.
        (25, 0.95, True),
        # They give 0.7 of it: stopping it after them could meet the bound.
        (25, 0.70, False),
        # An attack whose first query is unlike honest traffic.
        (0, 0.95, False),
    ],
)
def test_a_missed_agreement_bound_says_when_the_honest_opening_reached_it(
    opening: int, first_round: float, said: bool
) -> None:
    row = _agreement_row(
        _attack(
            "active",
            "extraction",
            30,
            enforced=40,
            honest_opening=opening,
            gateway={"curve": [[25, first_round], [40, 0.96]]},
            direct={"agreement": 0.97, "curve": [[25, first_round], [300, 0.97]]},
        )
    )
    assert not row["met"]
    assert ("rows the honest clients send too" in row["missed_by"]) is said
    if said:
        assert f"first {opening} queries" in row["missed_by"]
        assert "0.950 (0.979 of unhindered)" in row["missed_by"]


def test_agreement_at_takes_the_last_measurement_before_the_moment() -> None:
    curve = [[10, 0.2], [20, 0.4]]
    assert agreement_at(curve, 15) == 0.2
    assert agreement_at(curve, 5) == 0.0
    assert agreement_at(curve, None) == 0.4
    assert agreement_at([], None) is None


def test_report_files_hold_the_targets_and_plots(tmp_path: Path) -> None:
    result = _result()
    paths = write_eval_report(result, tmp_path)

    report = json.loads(paths["json"].read_text())
    assert {"targets", "attacks", "benign_summary", "clients", "plan"} <= set(report)
    assert report["benign_summary"]["blocked_share"] == 0.01
    assert report["exit_code"] == 1  # an honest client was blocked
    text = paths["markdown"].read_text()
    assert "## Targets" in text and "30 queries late" in text
    for kind in ("agreement", "risk"):
        assert paths[kind].read_bytes()[:4] == b"\x89PNG"
    assert benign_summary(result)["flagged_clients"] == ["b99"]


def test_near_duplicate_runs_repeat_one_row_with_tiny_noise() -> None:
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    habits = BenignHabits(near_duplicate_prob=1.0, near_duplicate_run=(3, 3))
    stream = query_stream(rows, habits, 9, np.random.default_rng(0))

    assert stream.shape == (9, 4)
    for start in (0, 3, 6):
        run = stream[start : start + 3]
        assert np.allclose(run, rows[start // 3], atol=0.5)
    assert not np.array_equal(stream[1], stream[0])
    plain = query_stream(rows, BenignHabits(), 12, np.random.default_rng(0))
    assert np.array_equal(plain[:10], rows) and np.array_equal(plain[10:], rows[:2])


def test_decisions_place_flags_and_enforcement_on_the_clients_own_stream() -> None:
    from evaluation.ledger import ClientLedger
    from evaluation.observe import DecisionCollector

    shared = ClientLedger("attacker", "random/distributed")
    ledgers = {"attacker-k0": shared, "attacker-k1": shared}
    for i in range(6):
        shared.sent(f"r{i}")
    collector = DecisionCollector(None, "t", ledgers, t0_ms=1000)  # type: ignore[arg-type]
    records = [
        {
            "client_id": "attacker-k1",
            "request_id": "r1",
            "action": "allow",
            "ts_ms": 1500,
        },
        {
            "client_id": "attacker-k0",
            "request_id": "r3",
            "action": "flag",
            "risk": 1.2,
            "ts_ms": 2000,
        },
        {
            "client_id": "attacker-k1",
            "request_id": "r5",
            "action": "block",
            "risk": 2.0,
            "ts_ms": 2500,
        },
        {
            "client_id": "someone-else",
            "request_id": "x",
            "action": "allow",
            "ts_ms": 2600,
        },
    ]
    for record in records:
        collector.handle(json.dumps(record).encode())
    collector.handle(b"not json")

    assert shared.first_flag_query == 4
    assert shared.first_enforced_query == 6
    assert shared.risk_series[1] == (1.0, 1.2, "flag")
    assert (collector.total, collector.foreign, collector.undecodable) == (4, 1, 1)


def test_pair_selection_defaults_and_filters() -> None:
    import pytest

    from evaluation.scenarios import DEFAULT_PAIRS, select_pairs

    assert select_pairs(None, None) == list(DEFAULT_PAIRS)
    assert select_pairs(("phishing",), ("equation", "onepixel")) == [
        ("equation", "phishing")
    ]
    assert ("onepixel", "digits_lr") in select_pairs(("digits_lr",), None)
    with pytest.raises(ValueError, match="nope"):
        select_pairs(("nope",), None)


def test_a_report_renders_again_from_its_json(tmp_path: Path) -> None:
    from evaluation.eval_report import render_markdown, result_from_json

    paths = write_eval_report(_result(), tmp_path)
    again = result_from_json(json.loads(paths["json"].read_text()))
    assert render_markdown(again) == paths["markdown"].read_text()


def test_near_duplicate_noise_follows_each_features_span() -> None:
    # One declared range 0..4000 over a wide and a narrow feature (breast
    # cancer's shape): a near-duplicate moves each by a share of its own span.
    rows = np.array([[2000.0, 0.05], [1000.0, 0.08]], dtype=np.float32)
    habits = BenignHabits(
        near_duplicate_prob=1.0,
        near_duplicate_run=(50, 50),
        clip=(0.0, 4000.0),
        feature_spans=(1000.0, 0.03),
    )
    stream = query_stream(rows, habits, 50, np.random.default_rng(0))
    moved = np.abs(stream[1:] - rows[0])
    assert moved[:, 1].max() < 0.03 * 0.005 * 5
    assert moved[:, 0].max() < 1000.0 * 0.005 * 5
    assert moved[:, 0].max() > 0.0


def test_plan_takes_attacker_arrivals_and_refuses_others() -> None:
    plan = EvalPlan.build(
        quick=False,
        n_benign=60,
        budget=None,
        rate_limit_per_s=50.0,
        attacker_arrivals="poisson",
    )
    assert plan.attacker_arrivals == "poisson"
    assert plan.attack_lead_answers > 0
    assert (
        EvalPlan.build(
            quick=True, n_benign=8, budget=None, rate_limit_per_s=50.0
        ).attacker_arrivals
        == "paced"
    )
    with pytest.raises(ValueError, match="paced, poisson"):
        EvalPlan.build(
            quick=True,
            n_benign=8,
            budget=None,
            rate_limit_per_s=50.0,
            attacker_arrivals="bursty",
        )


def test_a_distributed_attack_is_read_when_its_last_key_stopped() -> None:
    """One refused key does not stop an attacker that owns ten: the copy it
    trains with the other keys counts, not the one it had when the first key
    was enforced. A single key is read when it was first enforced."""
    curve = {"curve": [[40, 0.70], [80, 0.80], [112, 0.90]], "agreement": 0.90}
    direct = {"agreement": 0.95, "curve": [[112, 0.95]]}
    spread = _attack(
        "active",
        "extraction",
        30,
        enforced=50,
        variant="distributed",
        keys=10,
        gateway=curve,
        direct=direct,
    )
    result = _result()
    result.attacks = [spread]
    row = next(
        r
        for r in targets(result)
        if r["target"].startswith("active on digits (distributed): agreement")
    )
    assert not row["met"] and row["measured"] == round(0.90 / 0.95, 3)
    assert (
        "when its first key was enforced (query 50) its copy agreed 0.700"
        in (row["missed_by"])
    )

    single = _agreement_row(
        _attack("active", "extraction", 30, enforced=50, gateway=curve, direct=direct)
    )
    assert single["met"] and single["measured"] == round(0.70 / 0.95, 3)


def test_the_report_states_the_machine_load_and_marks_a_loaded_run() -> None:
    """A run whose attackers' pacing lagged by more than their whole gap,
    or whose load average passed the core count, is marked loaded; a quiet run
    is not; a report from before the field existed says so."""
    quiet = _result()
    quiet.machine = {"cores": 2, "load_average_start": 0.4, "load_average_end": 1.1}
    quiet.attacks[0]["pacing_lag_ms"] = {
        "waits": 80.0,
        "gap_ms": 20.0,
        "p50_ms": 0.3,
        "p99_ms": 9.0,
        "max_ms": 14.0,
    }
    text = render_markdown(quiet)
    assert "2 cores" in text and "0.4 at the start" in text
    assert "9.0 ms against a mean gap of 20.0 ms" in text
    assert not is_loaded(quiet) and "was loaded" not in text

    lagging = _result()
    lagging.machine = dict(quiet.machine)
    lagging.attacks[0]["pacing_lag_ms"] = {
        "waits": 80.0,
        "gap_ms": 20.0,
        "p50_ms": 3.0,
        "p99_ms": 31.0,
        "max_ms": 60.0,
    }
    assert is_loaded(lagging) and "was loaded" in render_markdown(lagging)

    busy = _result()
    busy.machine = {"cores": 2, "load_average_start": 0.5, "load_average_end": 3.2}
    assert is_loaded(busy)

    assert "not recorded" in render_markdown(_result())
