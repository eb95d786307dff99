"""The margin detector's rank test: a client whose answers are, on the
whole, less confident than honest clients' answers, without many of them
falling under the uncertain cut.

Synthetic two-class answers with known margins. Honest clients draw margins
from one mixture; the thief's answers come from a mixture shifted towards the
boundary but never below 0.4, so the uncertain share (margin under 0.2, or
entropy over 0.9, about margin 0.32 for two classes) stays at the honest
level and only the ranks tell. That is what an uncertainty sampler on natural
digits looks like: its picks are answered a little less confidently than
honest inputs, rarely near the boundary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pydantic
import pytest

from detectors._state import StateBlob, decode_blob, encode_blob
from detectors.margin import MarginDetector, MarginParams, rank_table
from tests.detectors.test_margin_cohort import answers

Array = npt.NDArray[Any]
X = np.zeros((1, 4))
# Distinct inputs per answer: a row within rank_repeat_eps of the client's
# previous one is a re-send and is not ranked.
ROWS = np.random.default_rng(99)


def honest_margins(rng: np.random.Generator, n: int) -> Array:
    """Mostly near-certain answers, a tail towards the boundary."""
    return np.clip(1.0 - rng.exponential(0.06, n), 0.0, 1.0)


def doubtful_margins(rng: np.random.Generator, n: int) -> Array:
    """Less confident on the whole, yet never under 0.4."""
    return np.clip(1.0 - rng.exponential(0.2, n), 0.4, 1.0)


def serve(
    detector: MarginDetector,
    streams: dict[str, Array],
    learn: dict[str, bool],
    batch: int = 4,
) -> dict[str, list[Any]]:
    """Round-robin batches of ``batch`` answers per client; every score of
    each client, in order."""
    scores: dict[str, list[Any]] = {k: [] for k in streams}
    longest = max(len(s) for s in streams.values())
    for start in range(0, longest, batch):
        ids: list[str] = []
        margins: list[float] = []
        for key, stream in streams.items():
            part = stream[start : start + batch].tolist()
            ids += [key] * len(part)
            margins += part
        if not ids:
            continue
        rows = ROWS.random((len(ids), 4))
        flags = [learn[k] for k in ids]
        judged = detector.score_batch(ids, rows, learn=flags)
        for key, score in zip(ids, judged, strict=True):
            scores[key].append(score)
        detector.observe_outputs(ids, rows, answers(np.array(margins)), learn=flags)
    return scores


def prepared(**params: Any) -> MarginDetector:
    detector = MarginDetector(MarginParams(**params))
    rng = np.random.default_rng(0)
    detector.learn_baseline(rng.random((256, 4)))
    # A reference sample more confident than live traffic, as training data
    # is: ranked against it every honest client would look doubtful.
    reference = np.clip(1.0 - rng.exponential(0.01, 512), 0.0, 1.0)
    detector.learn_output_baseline(rng.random((512, 4)), answers(reference))
    return detector


def population(seed: int, n_honest: int, n: int) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    return {f"honest-{i}": honest_margins(rng, n) for i in range(n_honest)}


def test_rank_table_gives_mid_ranks_and_their_variance() -> None:
    table, var = rank_table(np.array([10, 10, 200, 255], dtype=np.uint8))
    assert table[[0, 10, 11, 200, 255]].tolist() == [0.0, 0.25, 0.5, 0.625, 0.875]
    assert var == pytest.approx((1 - 0.5**3 - 2 * 0.25**3) / 12)
    # Without ties the variance is the uniform's 1/12.
    _, var = rank_table(np.arange(256, dtype=np.uint8))
    assert var == pytest.approx((1 - 256 / 256**3) / 12)


def test_doubtful_client_is_flagged_by_rank_alone_honest_ones_are_not() -> None:
    detector = prepared()
    streams = population(1, 16, 400)
    streams["thief"] = doubtful_margins(np.random.default_rng(2), 400)
    learn = {k: k != "thief" for k in streams}
    scores = serve(detector, streams, learn)

    assert not any(s.flagged for k, v in scores.items() if k != "thief" for s in v)
    flags = [s for s in scores["thief"] if s.flagged]
    assert flags, max(s.score for s in scores["thief"])
    assert "mean rank among honest answers' margins" in flags[0].evidence
    # The share test alone sees nothing: no answer is under the cut.
    assert "confidence climbed" not in flags[0].evidence
    # It needs rank_min_answers effective answers (48): not before.
    first = scores["thief"].index(flags[0])
    assert first >= 48


def test_rank_test_waits_for_a_live_baseline() -> None:
    # 4 honest clients of 120 answers teach 480 live answers, under the 512
    # needed; later clients (not learnt from) are never ranked, although the
    # reference and live answers together would be enough, because ranks
    # against the over-confident reference make honest clients look doubtful.
    warmers = population(3, 4, 120)
    later = population(4, 6, 200)
    later["thief"] = doubtful_margins(np.random.default_rng(4), 200)

    detector = prepared()
    serve(detector, warmers, {k: True for k in warmers})
    assert detector._rank_baseline() is None
    scores = serve(detector, later, {k: False for k in later})
    assert not any("mean rank" in s.evidence for v in scores.values() for s in v)
    assert not any(s.flagged for k, v in scores.items() if k != "thief" for s in v)

    # The same live traffic with a smaller requirement does rank.
    detector = prepared(rank_min_baseline=256)
    serve(detector, warmers, {k: True for k in warmers})
    assert detector._rank_baseline() is not None
    scores = serve(detector, later, {k: False for k in later})
    assert any(s.flagged for s in scores["thief"])
    assert not any(s.flagged for k, v in scores.items() if k != "thief" for s in v)


def test_rank_test_is_live_tunable_and_can_be_turned_off() -> None:
    streams = population(5, 12, 300)
    streams["thief"] = doubtful_margins(np.random.default_rng(6), 300)
    learn = {k: k != "thief" for k in streams}

    detector = prepared(rank_min_baseline=512)
    detector.set_params(rank_test=False)
    scores = serve(detector, streams, learn)
    assert not any(s.flagged for s in scores["thief"])

    detector = prepared(rank_min_baseline=512)
    detector.set_params(rank_z=1000.0)
    assert not any(s.flagged for s in serve(detector, streams, learn)["thief"])


def test_rank_sums_survive_serialisation() -> None:
    detector = prepared(rank_min_baseline=512)
    streams = population(7, 12, 200)
    streams["thief"] = doubtful_margins(np.random.default_rng(8), 200)
    serve(detector, streams, {k: k != "thief" for k in streams})
    before = detector.score_batch(["thief"], X, learn=[False])[0]
    blob = detector.dump_state("thief")
    assert blob is not None

    other = prepared(rank_min_baseline=512)
    # The same live baseline, so only the client's own state differs.
    serve(other, population(7, 12, 200), {k: True for k in streams})
    other.load_state("thief", blob)
    after = other.score_batch(["thief"], X, learn=[False])[0]
    assert after.score == pytest.approx(before.score, abs=1e-12)
    assert after.evidence == before.evidence


def test_rank_parameters_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="rank_min_baseline"):
        MarginParams(baseline_size=256, rank_min_baseline=512)
    with pytest.raises(pydantic.ValidationError):
        MarginParams(rank_horizon=4)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank_w", -1.0),
        ("rank_w", 1e300),
        ("rank_w2", 1e9),
        ("rank_wu", -0.5),
        ("rank_wu", float("nan")),
    ],
)
def test_rank_sums_no_stream_gives_are_refused(field: str, value: float) -> None:
    """Weights are at most 1 each and ranks in [0, 1]: a stored sum outside
    what any stream gives would make the mean rank leave [0, 1] and the z
    meaningless, so the state is refused on load."""
    detector = prepared(rank_min_baseline=512)
    streams = population(9, 8, 100)
    serve(detector, streams, {k: True for k in streams})
    blob = decode_blob(detector.dump_state("honest-0") or b"")
    fields = {**blob.fields, field: np.array(value, dtype="<f8").tobytes()}
    hostile = encode_blob(
        StateBlob(blob.format, blob.detector, blob.n_features, blob.layout, fields)
    )
    with pytest.raises(ValueError, match="rank"):
        detector.load_state("other", hostile)
    detector.load_state("other", encode_blob(blob))


def test_keys_that_start_together_are_ranked_as_one_cohort() -> None:
    """A learner spread over 10 keys: each key has too few answers (30) for
    its own rank to count, but the keys start in the same moment at one pace,
    so their sums pool; 10 honest keys doing the same are not flagged."""
    warmers = population(10, 6, 120)
    rng = np.random.default_rng(11)
    thief = {f"thief-{i}": doubtful_margins(rng, 30) for i in range(10)}
    honest = {f"late-honest-{i}": honest_margins(rng, 30) for i in range(10)}

    detector = prepared()
    serve(detector, warmers, {k: True for k in warmers})
    scores = serve(detector, thief, {k: False for k in thief})
    flagged = [k for k, v in scores.items() if any(s.flagged for s in v)]
    assert len(flagged) >= 8, flagged
    first = next(s for s in scores["thief-0"] if s.flagged)
    assert "pooled with 9 other keys" in first.evidence
    assert "mean rank among honest answers' was" in first.evidence
    # Alone, none of them is ranked: 30 answers are under rank_min_answers.
    assert not any(
        "z" in s.evidence and "recent answers" in s.evidence
        for v in scores.values()
        for s in v
    )

    detector = prepared()
    serve(detector, warmers, {k: True for k in warmers})
    scores = serve(detector, honest, {k: False for k in honest})
    assert not any(s.flagged for v in scores.values() for s in v)

    # Pooling off: the same thieves go unseen by the rank test.
    detector = prepared(cohort_window_s=0.0)
    serve(detector, warmers, {k: True for k in warmers})
    scores = serve(detector, thief, {k: False for k in thief})
    assert not any(s.flagged for v in scores.values() for s in v)


def copy_runs(rng: np.random.Generator, events: int) -> tuple[Array, Array]:
    """An honest client that re-sends: every tenth input comes 8 times with
    tiny noise, and those happen to be its doubtful cases. Returns the rows
    and their answers' margins."""
    rows: list[Array] = []
    margins: list[float] = []
    for event in range(events):
        row = rng.random(4)
        if event % 10 == 9:
            margin = float(rng.uniform(0.45, 0.55))
            for _ in range(8):
                rows.append(np.clip(row + rng.normal(0.0, 0.002, 4), 0.0, 1.0))
                margins.append(margin)
        else:
            rows.append(row)
            margins.append(float(honest_margins(rng, 1)[0]))
    return np.array(rows), np.array(margins)


@pytest.mark.parametrize(("repeat_eps", "flagged"), [(0.02, False), (0.0, True)])
def test_re_sends_are_ranked_once(repeat_eps: float, flagged: bool) -> None:
    """Copies repeat their first answer: ranked each time, a client that
    re-sends its doubtful inputs looks like a learner (z well over 5); ranked
    once per run it is an honest client."""
    detector = prepared(rank_repeat_eps=repeat_eps)
    warmers = population(12, 8, 120)
    serve(detector, warmers, {k: True for k in warmers})
    rows, margins = copy_runs(np.random.default_rng(13), 120)
    seen = []
    for start in range(0, len(rows), 4):
        part = slice(start, start + 4)
        ids = ["resender"] * len(rows[part])
        seen += detector.score_batch(ids, rows[part], learn=[True] * len(ids))
        detector.observe_outputs(
            ids, rows[part], answers(margins[part]), learn=[True] * len(ids)
        )
    assert any(s.flagged for s in seen) is flagged


def test_a_previous_row_flag_other_than_0_or_1_is_refused() -> None:
    detector = prepared(rank_min_baseline=512)
    streams = population(14, 8, 100)
    serve(detector, streams, {k: True for k in streams})
    blob = decode_blob(detector.dump_state("honest-0") or b"")
    assert blob.fields["has_last"] == b"\x01"
    fields = {**blob.fields, "has_last": b"\x02"}
    hostile = encode_blob(
        StateBlob(blob.format, blob.detector, blob.n_features, blob.layout, fields)
    )
    with pytest.raises(ValueError, match="has_last"):
        detector.load_state("other", hostile)
