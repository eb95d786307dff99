"""Poisoning margin's live rank baseline through the save/load path,
offline with the real detector: sybil keys in good standing (each under the
rank test's 48 answers, staggered so no cohort pools them) teach the
baseline low-margin answers that look like an active learner's. A worker
that started blind learns only theirs; its saved baseline must not be the
one later workers start from when a full honest one is saved too."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.baselines import (
    BASELINE_FORMAT,
    SavedBaseline,
    choose_baseline,
    decode_baseline,
    encode_saved,
)
from detectors.margin import MarginDetector
from tests.detectors.test_margin_cohort import answers
from tests.detectors.test_margin_rank import (
    ROWS,
    doubtful_margins,
    population,
    prepared,
)

Array = npt.NDArray[Any]


def serve(
    detector: MarginDetector,
    streams: dict[str, Array],
    learnable: bool,
    start_s: float,
    gap_s: float,
) -> dict[str, bool]:
    """Round-robin batches of 4 answers per key, key ``i`` starting
    ``i * gap_s`` after ``start_s`` at one answer a second; a key teaches the
    baseline while ``learnable`` and not yet flagged. Returns who was
    flagged."""
    flagged = dict.fromkeys(streams, False)
    longest = max(len(s) for s in streams.values())
    for start in range(0, longest, 4):
        ids: list[str] = []
        margins: list[float] = []
        arrival: list[float] = []
        for i, (key, stream) in enumerate(streams.items()):
            part = stream[start : start + 4].tolist()
            ids += [key] * len(part)
            margins += part
            arrival += [start_s + i * gap_s + start + j for j in range(len(part))]
        if not ids:
            continue
        rows = ROWS.random((len(ids), 4))
        learn = [learnable and not flagged[k] for k in ids]
        judged = detector.score_batch(ids, rows, learn=learn, arrival_s=arrival)
        for key, score in zip(ids, judged, strict=True):
            flagged[key] = flagged[key] or score.flagged
        detector.observe_outputs(ids, rows, answers(np.array(margins)), learn=learn)
    return flagged


def envelope(detector: MarginDetector, worker: str, at_s: float) -> bytes:
    blob = detector.export_baseline()
    assert blob is not None
    header = decode_baseline(blob)
    return encode_saved(
        SavedBaseline(
            BASELINE_FORMAT, "digits", "id", "margin", worker, at_s,
            header.samples, header.ready, blob,
        )
    )  # fmt: skip


def thief_caught(detector: MarginDetector) -> bool:
    later = population(102, 8, 300)
    later["thief"] = doubtful_margins(np.random.default_rng(2), 300)
    return serve(detector, later, False, 1e6, 7.0)["thief"]


def test_a_blind_workers_sybil_baseline_does_not_win_the_next_start() -> None:
    rich = prepared()
    honest = population(1, 16, 400)
    serve(rich, honest, True, 0.0, 3.0)

    blind = prepared()
    rng = np.random.default_rng(11)
    sybils = {f"sybil-{i}": doubtful_margins(rng, 40) for i in range(13)}
    # Each key alone, ten minutes apart: never pooled, never flagged.
    for i, (key, stream) in enumerate(sybils.items()):
        assert not serve(blind, {key: stream}, True, 10_000.0 + 600.0 * i, 0.0)[key]
    assert decode_baseline(blind.export_baseline() or b"").ready

    # What the poisoned baseline does to a worker that starts from it.
    poisoned = prepared()
    poisoned.import_baseline(blind.export_baseline() or b"")
    assert not thief_caught(poisoned)

    choice = choose_baseline(
        [envelope(rich, "rich", 1000.0), envelope(blind, "blind", 2000.0)],
        model="digits",
        model_id="id",
        detector="margin",
        now_s=2100.0,
        max_age_s=86_400.0,
    )
    fresh = prepared()
    fresh.import_baseline(choice.chosen[0].baseline)
    assert choice.chosen[0].worker == "rich"
    assert thief_caught(fresh)
