"""The demo's result, its pass/fail verdict, and its report files.

``DemoResult`` is plain data (the JSON report is its ``to_dict``), so the
verdict and the rendering are pure functions that tests can feed a fixed
result. ``write_report`` writes ``report.md``, ``report.json`` and
``surrogate.png``; it does blocking file I/O, so call it from an executor.

Imports numpy and matplotlib (Agg backend, no display needed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BENIGN = "benign"
EXTRACTION = "extraction"
PROBING = "probing"


@dataclass
class DemoResult:
    """Everything the demo measured.

    ``clients`` holds one ``ClientLedger.summary()`` per client. ``extraction``
    and ``probing`` hold the attack's client id, its budget, the outcome
    through the gateway (``gateway``) and directly against the model
    (``direct``), and where the first alert and the first refusal came (query
    positions in the attacker's own stream).
    """

    run_id: str
    quick: bool
    seed: int
    started_at: str
    duration_s: float
    traffic_s: float
    clients: list[dict[str, Any]]
    extraction: dict[str, Any]
    probing: dict[str, Any]
    alerts: dict[str, Any]
    worker_exit_code: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failures"] = failures(self)
        out["exit_code"] = exit_code(self)
        return out


def _clients_of(result: DemoResult, role: str) -> list[dict[str, Any]]:
    return [c for c in result.clients if c["role"] == role]


def failures(result: DemoResult) -> list[str]:
    """Why the demo failed, one sentence each; empty when it passed.

    It fails when a benign client was blocked even once, or when an attacker
    drew no alert at all.
    """
    problems = [
        f"benign client {c['client']} was blocked {c['blocked']} time(s)"
        for c in _clients_of(result, BENIGN)
        if c["blocked"] > 0
    ]
    for role in (EXTRACTION, PROBING):
        attackers = _clients_of(result, role)
        if not attackers:
            problems.append(f"no {role} attacker ran")
        for c in attackers:
            if c["alerts"] == 0:
                problems.append(f"{role} attacker {c['client']} was never flagged")
    return problems


def exit_code(result: DemoResult) -> int:
    """0 when the demo passed, 1 otherwise."""
    return 1 if failures(result) else 0


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(
    header: list[str],
    rows: list[list[Any]],
    cell: Callable[[Any], str] = _cell,
) -> list[str]:
    """Lines of a Markdown table; ``cell`` renders each value."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


_table = markdown_table


def _agreement_ratio(extraction: dict[str, Any]) -> float | None:
    gateway = extraction.get("gateway") or {}
    direct = extraction.get("direct") or {}
    if not direct.get("agreement"):
        return None
    return float(gateway.get("agreement", 0.0)) / float(direct["agreement"])


def render_markdown(result: DemoResult) -> str:
    """The report as markdown: verdict, per-client table, attack comparisons."""
    problems = failures(result)
    lines = [
        f"# modelgate demo report ({result.run_id})",
        "",
        f"Started {result.started_at}; {result.duration_s:.0f} s in all, "
        f"{result.traffic_s:.0f} s of live traffic"
        f"{' (quick run)' if result.quick else ''}; seed {result.seed}.",
        "",
        "**Result: PASS** (no benign client blocked, both attackers flagged)"
        if not problems
        else "**Result: FAIL**: " + "; ".join(problems),
        "",
        "## Clients",
        "",
        "Requests each client sent and how they ended. *Allowed* includes "
        "flagged answers; *first alert* is the position of the flagged query in "
        "the client's own stream.",
        "",
    ]
    order = {EXTRACTION: 0, PROBING: 1, BENIGN: 2}
    clients = sorted(
        result.clients, key=lambda c: (order.get(c["role"], 3), c["client"])
    )
    lines += _table(
        [
            "client",
            "role",
            "requests",
            "allowed",
            "flagged",
            "throttled",
            "blocked",
            "errors",
            "alerts",
            "first alert at query",
        ],
        [
            [
                c["client"],
                c["role"],
                c["requests"],
                c["allowed"],
                c["flagged"],
                c["throttled"],
                c["blocked"],
                c["errors"],
                c["alerts"],
                c["first_alert_query"],
            ]
            for c in clients
        ],
    )
    benign = _clients_of(result, BENIGN)
    if benign:
        flagged = sum(1 for c in benign if c["alerts"] > 0)
        lines += [
            "",
            f"Benign population: {len(benign)} clients, "
            f"{sum(c['requests'] for c in benign)} requests; "
            f"{flagged} drew an alert, "
            f"{sum(1 for c in benign if c['throttled'])} throttled, "
            f"{sum(1 for c in benign if c['blocked'])} blocked.",
        ]

    ext = result.extraction
    gateway, direct = ext.get("gateway") or {}, ext.get("direct") or {}
    lines += [
        "",
        "## Model extraction (Papernot et al. 2017, Jacobian-based augmentation)",
        "",
        "Agreement = share of held-out digits on which the attacker's surrogate "
        "and the real model predict the same class.",
        "",
    ]
    lines += _table(
        ["run", "queries answered", "rounds", "agreement", "ended by"],
        [
            [
                "through the gateway",
                gateway.get("queries"),
                gateway.get("rounds"),
                gateway.get("agreement"),
                gateway.get("stopped_by"),
            ],
            [
                "without the gateway",
                direct.get("queries"),
                direct.get("rounds"),
                direct.get("agreement"),
                direct.get("stopped_by"),
            ],
        ],
    )
    ratio = _agreement_ratio(ext)
    lines += [
        "",
        f"Budget {ext.get('budget')} queries. First alert at query "
        f"{_cell(ext.get('first_alert_query'))}, first refusal at query "
        f"{_cell(ext.get('first_refusal_query'))}. "
        + (
            f"Agreement when stopped is {ratio:.0%} of what the same attack "
            "reaches without the gateway."
            if ratio is not None
            else ""
        ),
    ]
    curve = direct.get("curve") or []
    if len(curve) >= 2 and curve[-1][1] < curve[0][1]:
        lines += [
            "",
            "Note: without the gateway the surrogate got *worse* as the attack "
            f"went on ({curve[0][1]:.2f} after the seed set, {curve[-1][1]:.2f} "
            "at the end): on this model, Jacobian-augmented points stray far "
            "from real digits, so a stop early in the attack is not by itself "
            "evidence that the gateway protected the model.",
        ]

    probe = result.probing
    pg, pd = probe.get("gateway") or {}, probe.get("direct") or {}
    lines += [
        "",
        "## Adversarial probing (HopSkipJump, ART)",
        "",
        "Found = inputs for which a query with another label was found near the "
        "original; L2 in pixel units (0..16 per pixel).",
        "",
    ]
    lines += _table(
        ["run", "queries", "inputs attacked", "found", "median L2", "ended by"],
        [
            [
                "through the gateway",
                pg.get("queries"),
                pg.get("attempted"),
                pg.get("found"),
                pg.get("median_l2"),
                pg.get("stopped_by"),
            ],
            [
                "without the gateway",
                pd.get("queries"),
                pd.get("attempted"),
                pd.get("found"),
                pd.get("median_l2"),
                pd.get("stopped_by"),
            ],
        ],
    )
    lines += [
        "",
        f"Budget {probe.get('budget')} queries. First alert at query "
        f"{_cell(probe.get('first_alert_query'))}, first refusal at query "
        f"{_cell(probe.get('first_refusal_query'))}.",
        "",
        "## Alerts",
        "",
        f"{result.alerts.get('total', 0)} alerts in all"
        + (
            f" ({result.alerts.get('foreign', 0)} about clients outside this run)"
            if result.alerts.get("foreign")
            else ""
        )
        + ". By detector: "
        + (
            ", ".join(
                f"{k} {v}"
                for k, v in sorted(result.alerts.get("by_detector", {}).items())
            )
            or "none"
        )
        + ".",
    ]
    for c in clients:
        if c.get("first_alert_evidence") and c["role"] != BENIGN:
            lines.append(
                f"- first alert for {c['client']} ({c['first_alert_detector']}): "
                f"{c['first_alert_evidence']}"
            )
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def plot_surrogate(result: DemoResult, path: Path) -> None:
    """Agreement against queries, with and without the gateway, with the first
    alert and the first refusal marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ext = result.extraction
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        for key, label, style in (
            ("direct", "without the gateway", "o--"),
            ("gateway", "through the gateway", "s-"),
        ):
            curve = (ext.get(key) or {}).get("curve") or []
            if curve:
                xs, ys = zip(*curve, strict=True)
                ax.plot(xs, ys, style, label=label, markersize=4)
        for key, label, color in (
            ("first_alert_query", "first alert", "tab:red"),
            ("first_refusal_query", "first refusal", "tab:purple"),
        ):
            at = ext.get(key)
            if at is not None:
                ax.axvline(
                    at, color=color, linestyle=":", label=f"{label} (query {at})"
                )
        ax.set_xlabel("queries answered by the oracle")
        ax.set_ylabel("surrogate agreement on held-out digits")
        ax.set_ylim(0.0, 1.0)
        ax.set_title("Jacobian-augmentation extraction: surrogate vs real model")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def write_report(result: DemoResult, report_dir: Path) -> dict[str, Path]:
    """Write report.md, report.json and surrogate.png; return their paths."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": report_dir / "report.md",
        "json": report_dir / "report.json",
        "plot": report_dir / "surrogate.png",
    }
    paths["markdown"].write_text(render_markdown(result))
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2, default=str))
    plot_surrogate(result, paths["plot"])
    logger.info("report written", extra={"dir": str(report_dir)})
    return paths
