"""The ``modelgate eval`` command: the evaluation harness from the command line.

Kept apart from ``gateway.cli`` so the evaluation's options live in one place;
``gateway.cli`` registers ``evaluate`` with one line. The heavy imports
(``evaluation``, ART, scikit-learn) happen only when the command runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from gateway import logs

logger = logging.getLogger(__name__)


def _names(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    return names or None


def evaluate(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML settings file (else MODELGATE_CONFIG)."
        ),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated models (digits, digits_lr, breast_cancer, "
            "phishing); default: the default attack/model pairs."
        ),
    ] = None,
    attacks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated attacks (equation, random, knockoff, active, "
            "papernot, hopskipjump, boundary, onepixel, square, nes); default: all."
        ),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(
            help="Queries per attack run (equation solving always uses d + 1); "
            "default 600 image extraction, 300 tabular, 500 probing."
        ),
    ] = None,
    external_worker: Annotated[
        bool,
        typer.Option(
            help="Use a worker already running on the configured topics "
            "instead of starting one."
        ),
    ] = False,
    benign: Annotated[int, typer.Option(help="Honest clients (at least 50).")] = 60,
    quick: Annotated[bool, typer.Option(help="A small, fast run.")] = False,
    out: Annotated[Path, typer.Option("--out", help="Report folder.")] = Path(
        "report/eval"
    ),
    seed: Annotated[int, typer.Option(help="Seeds traffic and attacks.")] = 0,
    near_duplicates: Annotated[
        bool,
        typer.Option(
            help="Let some honest clients send runs of near-identical inputs."
        ),
    ] = True,
    attacker_arrivals: Annotated[
        str,
        typer.Option(
            "--attacker-arrivals",
            help=(
                "paced: attackers space queries exactly; poisson: exponential "
                "gaps of the same mean, timed like honest clients."
            ),
        ),
    ] = "paced",
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING.")
    ] = "INFO",
) -> None:
    """Run every attack (single-key and over 10 keys) beside an honest population
    through a real worker, and write report.md, report.json and PNG plots.

    Exits 1 if an honest client was throttled or blocked; missed detection
    targets are reported, not failed.
    """
    from gateway.cli import _run, _settings

    if not quick and benign < 50:
        typer.echo(
            "error [BAD_ARGUMENT]: the full run needs at least 50 honest clients",
            err=True,
        )
        raise typer.Exit(2)
    if attacker_arrivals not in ("paced", "poisson"):
        typer.echo(
            "error [BAD_ARGUMENT]: --attacker-arrivals must be paced or poisson",
            err=True,
        )
        raise typer.Exit(2)
    if budget is not None and budget <= 0:
        typer.echo("error [BAD_ARGUMENT]: --budget must be positive", err=True)
        raise typer.Exit(2)
    from evaluation.harness import run_eval

    logs.configure(log_level)
    settings = _settings(config)
    code = _run(
        run_eval(
            settings,
            out,
            models=_names(models),
            attacks=_names(attacks),
            n_benign=benign,
            budget=budget,
            external_worker=external_worker,
            quick=quick,
            seed=seed,
            near_duplicates=near_duplicates,
            attacker_arrivals=attacker_arrivals,
        )
    )
    raise typer.Exit(int(code))
