"""``modelgate calibrate``: detector thresholds from benign replay.

Splits the served model's reference sample in two: one half teaches the
detectors' baselines (as the gateway does at start with all of it), the other
is replayed by simulated honest clients (detectors/calibrate.py). Prints each
detector's threshold for the target false-positive rate, and the live
configuration commands that apply them; ``--out`` writes them as a
``{"detectors": ...}`` JSON snippet to merge into a live-config document.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

logger = logging.getLogger(__name__)


def calibrate(
    model: Annotated[
        str | None, typer.Option(help="Model to calibrate for (default: first served).")
    ] = None,
    target_fpr: Annotated[
        float, typer.Option(min=1e-6, max=0.5, help="Honest queries allowed to flag.")
    ] = 0.01,
    clients: Annotated[int, typer.Option(min=1, help="Honest clients replayed.")] = 20,
    queries: Annotated[int, typer.Option(min=1, help="Requests per client.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the split and the replay.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Write the thresholds as a JSON snippet here.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Settings file (else MODELGATE_CONFIG).")
    ] = None,
) -> None:
    """Set every detector's threshold from benign traffic for a target
    false-positive rate (per query), and print them as live configuration."""
    # Here, not at the top: `modelgate --help` imports this module.
    import numpy as np

    from detectors.calibrate import benign_replay, silent, thresholds
    from detectors.registry import build_detectors
    from gateway.backends import close_backends, load_backends
    from gateway.cli import _settings
    from gateway.errors import ModelgateError
    from gateway.validation import scale_to_unit

    settings = _settings(config)
    try:
        backends = load_backends(settings)
    except ModelgateError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    try:
        name = model or next(iter(backends), None)
        if name is None or name not in backends:
            typer.echo(
                f"error [CONFIG_INVALID]: model {name!r} is not served", err=True
            )
            raise typer.Exit(1)
        backend = backends[name]
        reference = np.asarray(backend.reference)
        order = np.random.default_rng(seed).permutation(len(reference))
        half = len(reference) // 2
        if half < 10:
            typer.echo("error [CONFIG_INVALID]: reference sample too small", err=True)
            raise typer.Exit(1)
        learn_raw, replay_raw = reference[order[:half]], reference[order[half:]]
        learn = scale_to_unit(learn_raw, backend.signature)
        held_out = scale_to_unit(replay_raw, backend.signature)
        # The replay sends scaled rows; the model wants raw ones. Scaling is
        # affine per feature, so map each replayed row back to its raw row.
        raw_of = {
            row.tobytes(): raw for row, raw in zip(held_out, replay_raw, strict=True)
        }

        def answers(rows: np.ndarray) -> np.ndarray:
            raw = np.stack([raw_of[r.tobytes()] for r in rows])
            return np.asarray(backend.predict_proba(raw), dtype=np.float64)

        detectors = build_detectors(settings.detectors, seed=seed)
        for detector in detectors.values():
            detector.learn_baseline(learn)
            if detector.observes_outputs:
                detector.learn_output_baseline(
                    learn,
                    np.asarray(backend.predict_proba(learn_raw), dtype=np.float64),
                )
        replay = benign_replay(
            detectors,
            held_out,
            answers,
            n_clients=clients,
            n_queries=queries,
            seed=seed,
        )
        found = thresholds(detectors, replay, target_fpr)
        kept = silent(replay, target_fpr)
    finally:
        close_backends(backends)

    typer.echo(
        f"model {name}: {clients} honest clients x {queries} requests, "
        f"target false-positive rate {target_fpr:g} per query"
    )
    typer.echo(f"{'detector':<12}{'threshold':>11}{'now':>9}{'warm scores':>13}")
    for det, value in found.items():
        current = detectors[det].params.threshold
        typer.echo(
            f"{det:<12}{value:>11.4f}{current:>9.3f}{len(replay.scores[det]):>13}"
        )
    if kept:
        typer.echo(
            "kept as they are (every honest score that must not flag was 0, "
            f"so the replay cannot place a threshold): {', '.join(kept)}"
        )
    assignments = " ".join(f"detectors.{d}.threshold={v}" for d, v in found.items())
    typer.echo(f"\napply live:  modelgate config set {assignments}")
    lowered = [d for d, v in found.items() if v < detectors[d].params.threshold]
    if lowered:
        # The line above is one paste away from every worker: the caveats of
        # docs/fusion.md belong beside it, not only in the docs.
        typer.echo(
            f"warning: this lowers the threshold of {', '.join(lowered)}, so more "
            "honest traffic flags. The replay's honest clients are simulated and "
            "repeat about 900 rows; where honest scores are almost all 0 the "
            "threshold lands just above their top percentile and the fused risk "
            "becomes very sensitive. Try it with policy.shadow=true first "
            "(docs/fusion.md)."
        )
    if out is not None:
        snippet = {"detectors": {d: {"threshold": v} for d, v in found.items()}}
        out.write_text(json.dumps(snippet, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote {out}")
