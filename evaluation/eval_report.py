"""The evaluation's result, its targets table, and its report files.

``EvalResult`` is plain data (``report.json`` is its ``to_dict``); the
targets, the markdown and the plots are pure functions of it, so tests can
feed a fixed result. ``write_eval_report`` writes ``report.md``,
``report.json``, ``agreement.png`` (surrogate agreement against queries, with
the moments of first flag and of enforcement marked) and ``risk.png`` (every
client's risk over time); it does blocking file I/O.

The targets are the issue's, measured as they are, never adjusted: a missed
target shows how far off it was.

Imports matplotlib (Agg backend), the standard library and the demo report's
Markdown table helper.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evaluation.report import markdown_table

logger = logging.getLogger(__name__)

BENIGN = "benign"
# Issue 3's targets.
PROBING_FLAG_WITHIN = 50
EXTRACTION_AGREEMENT_RATIO = 0.9
BENIGN_FLAGGED_SHARE = 0.01


@dataclass
class EvalResult:
    """Everything one evaluation run measured.

    ``attacks`` holds one entry per (attack, model, variant) with the ledger
    summary, the first flag and enforcement positions (in the attacker's own
    stream over all its keys), and the outcome through the gateway and direct.
    ``clients`` holds one ledger summary per honest client and per attacker.
    """

    run_id: str
    quick: bool
    seed: int
    started_at: str
    duration_s: float
    traffic_s: float
    plan: dict[str, Any]
    policy: dict[str, Any]
    detectors: dict[str, Any]
    attacks: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    alerts_by_detector: dict[str, int] = field(default_factory=dict)
    decisions_by_action: dict[str, int] = field(default_factory=dict)
    worker_exit_code: int | None = None
    notes: list[str] = field(default_factory=list)
    # Cores and one-minute load averages at the start and at the end of the
    # live traffic: the timing detectors see less on a loaded machine.
    machine: dict[str, Any] = field(default_factory=dict)

    def benign(self) -> list[dict[str, Any]]:
        return [c for c in self.clients if c["role"] == BENIGN]

    def exit_code(self) -> int:
        """1 when an honest client was throttled or blocked, else 0."""
        return int(any(c["throttled"] or c["blocked"] for c in self.benign()))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["benign_summary"] = benign_summary(self)
        out["targets"] = targets(self)
        out["exit_code"] = self.exit_code()
        return out


def benign_summary(result: EvalResult) -> dict[str, Any]:
    """Shares (0..1) of honest clients flagged, throttled and blocked."""
    clients = result.benign()
    n = max(1, len(clients))
    flagged = [
        c["client"] for c in clients if c["first_flag_query"] is not None or c["alerts"]
    ]
    by_model: dict[str, dict[str, int]] = {}
    by_habit: dict[str, dict[str, int]] = {}
    by_detector: dict[str, int] = {}
    for c in clients:
        is_flagged = c["client"] in flagged
        habits = c.get("habits") or {}
        groups = [k for k, on in habits.items() if on] or ["plain"]
        for table, key in [(by_model, str(c.get("model")))] + [
            (by_habit, g) for g in groups
        ]:
            row = table.setdefault(
                key, {"clients": 0, "flagged": 0, "throttled": 0, "blocked": 0}
            )
            row["clients"] += 1
            row["flagged"] += int(is_flagged)
            row["throttled"] += int(c["throttled"] > 0)
            row["blocked"] += int(c["blocked"] > 0)
        if is_flagged:
            detector = str(c.get("first_alert_detector") or "(no alert)")
            by_detector[detector] = by_detector.get(detector, 0) + 1
    return {
        "clients": len(clients),
        "by_model": by_model,
        "by_habit": by_habit,
        "flagged_by_first_detector": by_detector,
        "queries": sum(c["requests"] for c in clients),
        "retries": sum(c.get("retries", 0) for c in clients),
        "flagged_share": len(flagged) / n,
        "throttled_share": sum(1 for c in clients if c["throttled"]) / n,
        "blocked_share": sum(1 for c in clients if c["blocked"]) / n,
        "flagged_clients": flagged,
    }


def agreement_at(curve: list[list[float]], queries: int | None) -> float | None:
    """The surrogate's agreement at ``queries`` (the last measurement at or
    before it); the final one when ``queries`` is None; 0.0 when the attacker
    was stopped before it had trained any surrogate."""
    if not curve:
        return 0.0 if queries is not None else None
    if queries is None:
        return float(curve[-1][1])
    before = [point for point in curve if point[0] <= queries]
    return float(before[-1][1]) if before else 0.0


def _target(
    name: str, measured: Any, goal: str, met: bool, missed_by: str | None
) -> dict[str, Any]:
    return {
        "target": name,
        "measured": measured,
        "goal": goal,
        "met": met,
        "missed_by": None if met else missed_by,
    }


def attack_targets(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets that apply to one attack run."""
    label = f"{entry['attack']} on {entry['model']} ({entry['variant']})"
    first = entry["first_flag_query"]
    sent = entry["ledger"]["requests"]
    rows = [
        _target(
            f"{label}: flagged",
            "yes" if entry["flagged"] else f"no ({sent} queries)",
            "flagged",
            bool(entry["flagged"]),
            "never flagged",
        )
    ]
    if entry["kind"] == "probing":
        within = PROBING_FLAG_WITHIN
        met = first is not None and first <= within
        rows.append(
            _target(
                f"{label}: flagged within {within} queries",
                first,
                f"<= {within}",
                met,
                f"{first - within} queries late"
                if first is not None
                else f"not flagged in {sent} queries",
            )
        )
        return rows
    if entry["attack"] == "equation":
        limit = 2 * entry["budget"]  # budget = d + 1
        met = first is not None and first <= limit
        rows.append(
            _target(
                f"{label}: flagged within 2(d+1) = {limit} queries",
                first,
                f"<= {limit}",
                met,
                f"{first - limit} queries late"
                if first is not None
                else f"not flagged in its {sent} queries",
            )
        )
    gateway = entry.get("gateway") or {}
    direct = entry.get("direct") or {}
    curve = gateway.get("curve", [])
    first_key = agreement_at(curve, entry["first_enforced_query"])
    # One refused key does not stop an attacker that owns ten: a distributed
    # attack is read when it ended (its last key refused, or its pool or
    # budget spent), a single key when it was first enforced.
    spread = int(entry.get("keys") or 1) > 1
    at_stop = agreement_at(curve, None) if spread and curve else first_key
    unhindered = direct.get("agreement")
    if at_stop is None or not unhindered:
        rows.append(
            _target(
                f"{label}: agreement when stopped < 90% of unhindered",
                None,
                f"< {EXTRACTION_AGREEMENT_RATIO}",
                False,
                "not measured (the attack did not run)",
            )
        )
        return rows
    ratio = at_stop / float(unhindered)
    caveat = _agreement_caveat(entry, float(unhindered))
    if spread and first_key is not None and entry["first_enforced_query"]:
        caveat += (
            f"; when its first key was enforced (query "
            f"{entry['first_enforced_query']}) its copy agreed {first_key:.3f}"
        )
    rows.append(
        _target(
            f"{label}: agreement when stopped < 90% of unhindered",
            round(ratio, 3),
            f"< {EXTRACTION_AGREEMENT_RATIO}",
            ratio < EXTRACTION_AGREEMENT_RATIO,
            f"ratio {ratio - EXTRACTION_AGREEMENT_RATIO:+.3f} over the bound "
            f"({at_stop:.3f} vs {float(unhindered):.3f}){caveat}",
        )
    )
    return rows


def _agreement_caveat(entry: dict[str, Any], unhindered: float) -> str:
    """Why the agreement bound may be out of any detector's reach for this
    attack, when it is: the unhindered attack learns nothing beyond the
    majority class, or its opening queries are rows honest clients send too
    and already teach a copy that reaches the bound (see
    ``scenarios.honest_opening``)."""
    majority = entry.get("majority_rate")
    if majority is not None and unhindered <= majority:
        return (
            f"; unhindered, the attack is no better than answering the majority "
            f"class ({majority:.3f})"
        )
    opening = int(entry.get("honest_opening") or 0)
    curve = (entry.get("direct") or {}).get("curve") or []
    reached = agreement_at(curve, opening) if opening else None
    if reached and reached / unhindered >= EXTRACTION_AGREEMENT_RATIO:
        return (
            f"; its first {opening} queries are rows the honest clients send "
            f"too, and a copy trained on them alone reaches {reached:.3f} "
            f"({reached / unhindered:.3f} of unhindered): meeting the bound "
            "means stopping it before it sends anything an honest client "
            "does not"
        )
    return ""


def targets(result: EvalResult) -> list[dict[str, Any]]:
    """Every target of the issue, measured: one row each."""
    rows: list[dict[str, Any]] = []
    summary = benign_summary(result)
    n = summary["clients"]
    for what, share, bound in (
        ("throttled", summary["throttled_share"], 0.0),
        ("blocked", summary["blocked_share"], 0.0),
        ("flagged", summary["flagged_share"], BENIGN_FLAGGED_SHARE),
    ):
        met = share <= bound
        rows.append(
            _target(
                f"honest clients {what}",
                f"{share:.1%} of {n}",
                f"<= {bound:.0%}",
                met,
                f"{share - bound:+.1%} ({round((share - bound) * n)} clients over)",
            )
        )
    flagged_runs = sum(1 for a in result.attacks if a["flagged"])
    rows.append(
        _target(
            "attack runs flagged (all, single-key and distributed)",
            f"{flagged_runs}/{len(result.attacks)}",
            f"{len(result.attacks)}/{len(result.attacks)}",
            flagged_runs == len(result.attacks),
            f"{len(result.attacks) - flagged_runs} runs never flagged",
        )
    )
    for entry in result.attacks:
        rows.extend(attack_targets(entry))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return markdown_table(header, rows, _cell)


def _success(entry: dict[str, Any], side: str) -> str:
    outcome = entry.get(side) or {}
    if not outcome:
        return "–"
    if entry["kind"] == "probing":
        text = f"{outcome.get('found', 0)}/{outcome.get('attempted', 0)} found"
        if outcome.get("median_l2") is not None:
            text += f", L2 {outcome['median_l2']:.2f}"
        return text
    text = f"agreement {outcome.get('agreement', 0.0):.3f}"
    if outcome.get("recovery_error") is not None:
        text += f", param. error {outcome['recovery_error']:.2g}"
    return text


# A run is called loaded when the one-minute load average passes the core count
# or an attacker's 99th-percentile pacing lag passes its whole mean gap (a late
# request then leaves after the next one's slot, and paced gaps merge). Set from
# two runs of seed 0 on the 2-core development machine: quiet (load 0.5-0.8)
# 10.7 ms on 25 ms gaps, loaded by a test suite beside it (load 1.2-2.7) 41.9 ms.
LOADED_LAG_SHARE = 1.0


def worst_pacing(result: EvalResult) -> dict[str, Any] | None:
    """The attack run whose pacing lag was the largest share of its gap."""
    paced = [a for a in result.attacks if a.get("pacing_lag_ms")]
    if not paced:
        return None
    worst = max(
        paced,
        key=lambda a: (
            a["pacing_lag_ms"]["p99_ms"] / max(a["pacing_lag_ms"]["gap_ms"], 1e-9)
        ),
    )
    lag = worst["pacing_lag_ms"]
    return {
        "attack": f"{worst['attack']}@{worst['model']}/{worst['keys']} keys",
        "p99_ms": lag["p99_ms"],
        "gap_ms": lag["gap_ms"],
        "share": lag["p99_ms"] / max(lag["gap_ms"], 1e-9),
    }


def is_loaded(result: EvalResult) -> bool:
    """Whether the run's machine was loaded (see ``LOADED_LAG_SHARE``)."""
    cores = result.machine.get("cores") or 0
    loads = [
        v
        for v in (
            result.machine.get("load_average_start"),
            result.machine.get("load_average_end"),
        )
        if v is not None
    ]
    worst = worst_pacing(result)
    return bool(
        (cores and any(v > cores for v in loads))
        or (worst is not None and worst["share"] > LOADED_LAG_SHARE)
    )


def machine_note(result: EvalResult) -> str:
    """One paragraph on the machine's load and the attackers' pacing lag."""
    if not result.machine:
        return "Machine load: not recorded (a report from an older version)."
    m = result.machine
    text = (
        f"Machine: {m.get('cores')} cores, one-minute load average "
        f"{m.get('load_average_start')} at the start and "
        f"{m.get('load_average_end')} at the end of the live traffic."
    )
    worst = worst_pacing(result)
    if worst is not None:
        text += (
            f" Attackers' pacing lag (how late a paced request left): worst 99th"
            f" percentile {worst['p99_ms']:.1f} ms against a mean gap of "
            f"{worst['gap_ms']:.1f} ms ({worst['attack']})."
        )
    if is_loaded(result):
        text += (
            " **The machine was loaded:** paced attackers' gaps were irregular, so"
            " the timing detectors saw less than on a quiet machine; compare with a"
            " quiet run before reading a timing result."
        )
    return text


def render_markdown(result: EvalResult) -> str:
    """The report: setup, targets table, attacks, honest population."""
    summary = benign_summary(result)
    rows = targets(result)
    missed = [r for r in rows if not r["met"]]
    budgets = result.plan.get("budgets", {})
    lines = [
        f"# modelgate evaluation report ({result.run_id})",
        "",
        f"Started {result.started_at}; {result.duration_s:.0f} s in all, "
        f"{result.traffic_s:.0f} s of live traffic"
        f"{' (quick run)' if result.quick else ''}; seed {result.seed}.",
        "",
        "Budgets (queries per attack run, the same with and without the gateway):"
        f" extraction {budgets.get('extraction_images')} on images, "
        f"{budgets.get('extraction_tabular')} on tabular models; equation solving"
        f" d + 1; probing {budgets.get('probing')} over "
        f"{budgets.get('probing_targets')} inputs. Attackers pace at "
        f"{result.plan.get('attacker_rate_per_s')} requests/s in total; a "
        f"distributed attacker spreads them round-robin over "
        f"{result.plan.get('distributed_keys')} API keys."
        + (
            f" The attacks began once honest clients of every model had been "
            f"answered {result.plan['attack_lead_answers']} times."
            if result.plan.get("attack_lead_answers")
            else " The attacks began with the honest clients."
        )
        + (
            " Attackers' queries arrive as a Poisson process (exponential gaps)."
            if result.plan.get("attacker_arrivals") == "poisson"
            else " Attackers space their queries exactly."
        ),
        "",
        f"Policy: {json.dumps(result.policy)}. Detector overrides: "
        f"{json.dumps(result.detectors) if result.detectors else 'none (defaults)'}."
        f" Alerts by detector: {json.dumps(result.alerts_by_detector)}.",
        "",
        machine_note(result),
        "",
        f"**{len(rows) - len(missed)} of {len(rows)} targets met.** Missed targets"
        " are reported as measured, with the distance to the goal.",
        "",
        "## Targets",
        "",
        *_table(
            ["target", "measured", "goal", "met?", "missed by"],
            [
                [r["target"], r["measured"], r["goal"], r["met"], r["missed_by"]]
                for r in rows
            ],
        ),
        "",
        "## Attacks",
        "",
        "Query positions count the attacker's whole stream (all its keys).",
        "",
        *_table(
            [
                "attack",
                "model",
                "keys",
                "sent",
                "flagged",
                "first flag",
                "enforced at",
                "stopped by",
                "success with gateway",
                "success without",
            ],
            [
                [
                    a["attack"],
                    a["model"],
                    a["keys"],
                    a["ledger"]["requests"],
                    a["flagged"],
                    a["first_flag_query"],
                    a["first_enforced_query"],
                    (a.get("gateway") or {}).get("stopped_by") or a.get("error"),
                    _success(a, "gateway"),
                    _success(a, "direct"),
                ]
                for a in result.attacks
            ],
        ),
        "",
        "## Honest population",
        "",
        f"{summary['clients']} clients "
        f"(median rate {result.plan.get('benign_median_rate_per_s')}/s, traffic for "
        f"at least {result.plan.get('benign_min_s', 0):.0f} s, near-duplicate runs "
        f"{'on' if result.plan.get('benign_near_duplicates', True) else 'off'}) "
        f"sent {summary['queries']} queries "
        f"({summary['retries']} retries of an already answered request id); "
        f"flagged {summary['flagged_share']:.1%}, throttled "
        f"{summary['throttled_share']:.1%}, blocked {summary['blocked_share']:.1%}.",
        "",
    ]
    lines += _table(
        ["honest clients of", "clients", "flagged", "throttled", "blocked"],
        [
            [f"model {name}", *row.values()]
            for name, row in sorted(summary["by_model"].items())
        ]
        + [
            [f"habit: {name}", *row.values()]
            for name, row in sorted(summary["by_habit"].items())
        ],
    )
    lines += [
        "",
        "Detector of the first alert of each flagged honest client: "
        f"{json.dumps(summary['flagged_by_first_detector'])}.",
        "",
    ]
    if summary["flagged_clients"]:
        lines += ["Flagged honest clients: " + ", ".join(summary["flagged_clients"])]
        lines.append("")
    lines += [
        "Plots: `agreement.png` (surrogate agreement against queries; dotted "
        "line = first flag, dashed = enforcement) and `risk.png` (each client's "
        "risk over time; grey = honest).",
    ]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _plot_agreement(result: EvalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in result.attacks:
        if entry["kind"] == "extraction":
            pairs.setdefault((entry["attack"], entry["model"]), []).append(entry)
    n = max(1, len(pairs))
    columns = min(4, n)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(
        rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False
    )
    colours = {"single": "tab:red", "distributed": "tab:purple"}
    for ax, ((attack, model), entries) in zip(axes.flat, pairs.items(), strict=False):
        direct = entries[0].get("direct") or {}
        curve = direct.get("curve") or []
        if curve:
            ax.plot(*zip(*curve, strict=True), color="grey", marker=".", label="direct")
        for entry in entries:
            colour = colours.get(entry["variant"], "black")
            curve = (entry.get("gateway") or {}).get("curve") or []
            if curve:
                ax.plot(
                    *zip(*curve, strict=True),
                    color=colour,
                    marker=".",
                    label=f"gateway, {entry['variant']}",
                )
            if entry["first_flag_query"] is not None:
                ax.axvline(entry["first_flag_query"], color=colour, linestyle=":")
            if entry["first_enforced_query"] is not None:
                ax.axvline(entry["first_enforced_query"], color=colour, linestyle="--")
        ax.set_title(f"{attack} on {model}", fontsize=9)
        ax.set_xlabel("queries")
        ax.set_ylabel("agreement")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_risk(result: EvalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    # tab20 without its two greys, which are the honest clients' colour.
    tab20 = plt.get_cmap("tab20")
    palette = [tab20(i) for i in range(20) if i not in (14, 15)]

    def cmap(index: int) -> Any:
        return palette[index % len(palette)]

    roles = sorted({c["role"] for c in result.clients if c["role"] != BENIGN})
    for client in result.clients:
        series = client.get("risk_series") or []
        if not series:
            continue
        points = sorted(series)
        t = [point[0] for point in points]
        risk = [point[1] for point in points]
        if client["role"] == BENIGN:
            ax.plot(t, risk, color="grey", alpha=0.3, linewidth=0.6)
        else:
            colour = cmap(roles.index(client["role"]))
            ax.plot(t, risk, color=colour, linewidth=0.9, alpha=0.8)
    for role in roles:
        ax.plot([], [], color=cmap(roles.index(role)), label=role)
    ax.plot([], [], color="grey", label="honest clients")
    flag_at = result.policy.get("flag_at")
    if flag_at is not None:
        ax.axhline(flag_at, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("seconds since traffic began")
    ax.set_ylabel("risk (1.0 = flag threshold)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_eval_report(result: EvalResult, out_dir: Path) -> dict[str, Path]:
    """Write the report files into ``out_dir``; return their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "json": out_dir / "report.json",
        "agreement": out_dir / "agreement.png",
        "risk": out_dir / "risk.png",
    }
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2))
    paths["markdown"].write_text(render_markdown(result))
    _plot_agreement(result, paths["agreement"])
    _plot_risk(result, paths["risk"])
    logger.info("wrote evaluation report", extra={"dir": str(out_dir)})
    return paths


def result_from_json(data: dict[str, Any]) -> EvalResult:
    """Rebuild a result from its ``report.json`` (derived keys dropped), to
    render the report again."""
    fields = set(EvalResult.__dataclass_fields__)
    return EvalResult(**{k: v for k, v in data.items() if k in fields})
