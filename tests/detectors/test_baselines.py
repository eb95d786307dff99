"""Live baselines as bytes: export, import, hostile input, and the choice
among several workers' saved baselines (detectors/baselines.py)."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from detectors import build_detectors
from detectors.baselines import (
    BASELINE_FORMAT,
    MAX_BASELINE_BYTES,
    MAX_CLOCK_SKEW_S,
    BaselineBlob,
    BaselineRefused,
    InMemoryBaselineStore,
    SavedBaseline,
    choose_baseline,
    decode_baseline,
    encode_baseline,
    encode_saved,
)
from detectors.margin import MarginDetector, MarginParams
from detectors.ood import HONEST_RATE_PRIOR_ROWS, OutOfDistributionDetector
from detectors.traffic import TrafficDetector
from tests.detectors.test_margin_rank import (
    doubtful_margins,
    population,
    prepared,
    serve,
)

LIVE_DETECTORS = {"coverage", "margin", "ood", "traffic"}


def warmed_margin() -> MarginDetector:
    """A margin detector whose live baseline is ready: 8 honest clients of
    100 answers (800 live answers, over the 512 needed)."""
    detector = prepared()
    warmers = population(3, 8, 100)
    serve(detector, warmers, {k: True for k in warmers})
    assert detector._rank_baseline() is not None
    return detector


def blob_with(detector: str = "margin", **changes: Any) -> bytes:
    fields = {
        "format": BASELINE_FORMAT,
        "detector": detector,
        "n_features": 4,
        "samples": 2,
        "ready": False,
        "fields": {
            "margin": np.array([0.5, 1.0]).tobytes(),
            "entropy": np.array([0.2, 0.0]).tobytes(),
        },
    }
    fields.update(changes)
    return msgspec.msgpack.encode(fields)


def test_margin_round_trip_keeps_the_live_answers_and_their_order() -> None:
    source = warmed_margin()
    blob = source.export_baseline()
    assert blob is not None
    decoded = decode_baseline(blob)
    assert decoded.samples == source._base_live and decoded.ready

    copy = prepared()
    assert copy.import_baseline(blob) == decoded.samples
    assert copy._base_live == source._base_live
    assert copy.export_baseline() == blob
    # Reference part plus the same live part: the share is the same too.
    assert copy.baseline_share == source.baseline_share


def test_rank_test_is_ready_right_after_an_import_into_a_fresh_detector() -> None:
    blob = warmed_margin().export_baseline()
    assert blob is not None
    later = population(4, 6, 200)
    later["thief"] = doubtful_margins(np.random.default_rng(4), 200)
    learn = {k: False for k in later}

    blind = prepared()
    scores = serve(blind, later, learn)
    assert not any("mean rank" in s.evidence for v in scores.values() for s in v)

    loaded = prepared()
    assert loaded._rank_baseline() is None
    loaded.import_baseline(blob)
    assert loaded._rank_baseline() is not None
    scores = serve(loaded, later, learn)
    flags = [s for s in scores["thief"] if s.flagged]
    assert flags and "mean rank among honest answers' margins" in flags[0].evidence
    assert not any(s.flagged for k, v in scores.items() if k != "thief" for s in v)


def test_import_merges_older_than_own_live_answers_and_keeps_clients() -> None:
    source = warmed_margin()
    blob = source.export_baseline()
    assert blob is not None
    target = prepared()
    own = population(5, 2, 50)
    serve(target, own, {k: True for k in own})
    own_live = target._base_live
    clients = target.clients()
    states = {c: target.dump_state(c) for c in clients}
    newest = target._base_margin[(target._base_pos - 1) % 4096]

    target.import_baseline(blob)
    assert target._base_live == own_live + source._base_live
    # The detector's own answers stay the newest.
    assert target._base_margin[(target._base_pos - 1) % 4096] == newest
    assert target.clients() == clients
    assert {c: target.dump_state(c) for c in clients} == states


def test_reference_only_detectors_export_nothing(digits: Any) -> None:
    detectors = build_detectors({}, seed=0)
    for detector in detectors.values():
        detector.learn_baseline(digits.train[:400])
    exported = {n: d.export_baseline() for n, d in detectors.items()}
    assert {n for n, b in exported.items() if b is not None} == LIVE_DETECTORS
    for name in set(detectors) - LIVE_DETECTORS:
        with pytest.raises(BaselineRefused) as info:
            detectors[name].import_baseline(blob_with(name, n_features=64))
        assert info.value.code == "unsupported"
    # Nothing learnt live yet: the live detectors export an empty baseline.
    for name in LIVE_DETECTORS:
        blob = exported[name]
        assert blob is not None
        assert decode_baseline(blob).samples == 0


def test_traffic_moments_merge_as_one_sample() -> None:
    rng = np.random.default_rng(0)
    values = rng.random((50, 5))
    a, b, whole = TrafficDetector(), TrafficDetector(), TrafficDetector()
    for detector, rows in ((a, values[:20]), (b, values[20:]), (whole, values)):
        detector._ensure_arena(1)
        for row in rows:
            detector._learned += 1
            delta = row - detector._mean
            detector._mean += delta / detector._learned
            detector._m2 += delta * (row - detector._mean)
    blob = b.export_baseline()
    assert blob is not None
    a.import_baseline(blob)
    assert a.baseline_size == 50
    np.testing.assert_allclose(a._mean, whole._mean)
    np.testing.assert_allclose(a._m2, whole._m2)


def test_ood_counts_add_and_ready_means_past_the_prior() -> None:
    source = OutOfDistributionDetector()
    source._ensure_arena(4)
    source._learned_rows, source._learned_outliers = HONEST_RATE_PRIOR_ROWS, 40
    blob = source.export_baseline()
    assert blob is not None and decode_baseline(blob).ready
    target = OutOfDistributionDetector()
    target._ensure_arena(4)
    target._learned_rows, target._learned_outliers = 10, 1
    target.import_baseline(blob)
    assert (target._learned_rows, target._learned_outliers) == (1010, 41)
    assert target.honest_rate == pytest.approx(
        source._rate(np.array([1010]), np.array([41]))[0]
    )


def margin_fields(margin: Any, entropy: Any) -> dict[str, bytes]:
    return {
        "margin": np.asarray(margin, dtype="<f8").tobytes(),
        "entropy": np.asarray(entropy, dtype="<f8").tobytes(),
    }


HOSTILE = [
    pytest.param(b"\x00garbage", "malformed", id="not-msgpack"),
    pytest.param(b"", "malformed", id="empty"),
    pytest.param(blob_with(format=2), "format", id="other-version"),
    pytest.param(blob_with(detector="traffic"), "detector", id="other-detector"),
    pytest.param(blob_with(n_features=64), "features", id="other-feature-count"),
    pytest.param(blob_with(n_features=0), "features", id="no-features"),
    pytest.param(blob_with(samples=-1), "invalid", id="negative-count"),
    pytest.param(blob_with(samples=2**60), "invalid", id="huge-count"),
    pytest.param(blob_with(samples=3), "invalid", id="count-not-length"),
    pytest.param(blob_with(samples=5000), "invalid", id="beyond-baseline-size"),
    pytest.param(
        blob_with(fields=margin_fields([np.nan, 1.0], [0.0, 0.0])), "invalid", id="nan"
    ),
    pytest.param(
        blob_with(fields=margin_fields([1.5, 1.0], [0.0, 0.0])),
        "invalid",
        id="margin-above-1",
    ),
    pytest.param(
        blob_with(fields={"margin": b"\x00" * 15, "entropy": b"\x00" * 16}),
        "invalid",
        id="ragged-bytes",
    ),
    pytest.param(
        blob_with(fields={"margin": np.zeros(2).tobytes()}), "invalid", id="missing"
    ),
    pytest.param(
        blob_with(fields={**margin_fields([0.5, 1], [0, 0]), "x": b""}),
        "invalid",
        id="extra-field",
    ),
    pytest.param(blob_with(extra=1), "malformed", id="unknown-key"),
]


@pytest.mark.parametrize(("blob", "code"), HOSTILE)
def test_hostile_margin_baselines_are_refused_and_change_nothing(
    blob: bytes, code: str
) -> None:
    detector = prepared()
    served = population(5, 2, 50)
    serve(detector, served, {k: True for k in served})
    before = detector.export_baseline()
    share = detector.baseline_share
    with pytest.raises(BaselineRefused) as info:
        detector.import_baseline(blob)
    assert info.value.code == code, str(info.value)
    assert detector.export_baseline() == before
    assert detector.baseline_share == share


def traffic_blob(samples: int, mean: Any, m2: Any) -> bytes:
    return encode_baseline(
        BaselineBlob(
            format=BASELINE_FORMAT,
            detector="traffic",
            n_features=1,
            samples=samples,
            ready=True,
            fields={
                "mean": np.asarray(mean, dtype="<f8").tobytes(),
                "m2": np.asarray(m2, dtype="<f8").tobytes(),
            },
        )
    )


@pytest.mark.parametrize(
    "blob",
    [
        traffic_blob(10, [0.0, 1.0, 0.5, 1.5, 0.0], [0.0] * 5),  # share above 1
        traffic_blob(10, [0.0, -1.0, 0.5, 0.0, 0.0], [0.0] * 5),  # burstiness < 0
        traffic_blob(10, [0.0] * 5, [-1.0, 0, 0, 0, 0]),  # negative spread
        traffic_blob(10, [0.0] * 5, [0, 0, 100.0, 0, 0]),  # spread beyond any
        traffic_blob(1, [0.0] * 5, [0, 0, 0.1, 0, 0]),  # spread of one sample
        traffic_blob(0, [1.0, 0, 0, 0, 0], [0.0] * 5),  # mean of none
        traffic_blob(10, [np.inf, 0, 0, 0, 0], [0.0] * 5),
        traffic_blob(10, [0.0] * 4, [0.0] * 5),  # a feature short
    ],
)
def test_hostile_traffic_baselines_are_refused(blob: bytes) -> None:
    detector = TrafficDetector()
    with pytest.raises(BaselineRefused) as info:
        detector.import_baseline(blob)
    assert info.value.code == "invalid"
    assert detector.baseline_size == 0 and not detector._m2.any()


@pytest.mark.parametrize("counts", [[10, 11], [10, -1], [9, 0]])
def test_hostile_ood_counts_are_refused(counts: list[int]) -> None:
    blob = encode_baseline(
        BaselineBlob(
            format=BASELINE_FORMAT,
            detector="ood",
            n_features=4,
            samples=10,
            ready=False,
            fields={"counts": np.asarray(counts, dtype="<i8").tobytes()},
        )
    )
    detector = OutOfDistributionDetector()
    with pytest.raises(BaselineRefused):
        detector.import_baseline(blob)
    assert detector._learned_rows == 0


def saved(worker: str, at_s: float, samples: int, ready: bool, **kw: Any) -> bytes:
    fields: dict[str, Any] = {
        "format": BASELINE_FORMAT,
        "model": "digits",
        "model_id": "id-1",
        "detector": "margin",
        "worker": worker,
        "saved_at_s": at_s,
        "samples": samples,
        "ready": ready,
        "baseline": b"",
        **kw,
    }
    return encode_saved(SavedBaseline(**fields))


def _choose(candidates: list[Any]) -> Any:
    """The choice for margin on digits (identity id-1) at t = 3000 s, with
    entries older than 2500 s stale."""
    return choose_baseline(
        candidates,
        model="digits",
        model_id="id-1",
        detector="margin",
        now_s=3000.0,
        max_age_s=2500.0,
    )


def test_choice_prefers_the_richest_ready_baseline_and_skips_the_unusable() -> None:
    candidates = [
        saved("old-ready", 1000.0, 4096, True),
        saved("new-ready", 2000.0, 600, True),
        saved("newest-blind", 2500.0, 10, False),
        saved("rich-blind", 2400.0, 400, False),
        saved("stale", 10.0, 4096, True),
        saved("other-version", 2600.0, 4096, True, model_id="id-2"),
        b"not a saved baseline",
    ]
    choice = _choose(candidates)
    assert [s.worker for s in choice.chosen] == [
        "old-ready",
        "new-ready",
        "rich-blind",
        "newest-blind",
    ]
    assert choice.skipped == {"stale": 1, "other_model": 1, "unreadable": 1}


def test_in_memory_store_keeps_one_entry_per_worker_until_it_expires() -> None:
    now = [100.0]
    store = InMemoryBaselineStore(clock_s=lambda: now[0])
    store.save(SavedBaseline(1, "m", "i", "margin", "a", 1.0, 1, False, b"x"), ttl_s=10)
    store.save(SavedBaseline(1, "m", "i", "margin", "a", 2.0, 2, False, b"y"), ttl_s=10)
    store.save(SavedBaseline(1, "m", "i", "margin", "b", 3.0, 3, False, b"z"), ttl_s=5)
    assert len(store.load("m", "margin")) == 2
    assert store.load("m", "traffic") == []
    now[0] = 106.0
    (only,) = store.load("m", "margin")
    assert msgspec.msgpack.decode(only, type=SavedBaseline).baseline == b"y"


def test_an_entry_from_the_future_does_not_win_forever() -> None:
    """An entry dated ahead of the loader's clock (a hostile write, or a
    writer whose clock is far ahead) would rank first among the ready ones
    and never turn stale; beyond the tolerated skew it is passed over."""
    candidates = [
        saved("honest", 2900.0, 4096, True),
        saved("future", 3000.0 + 10 * 86_400, 512, True),
        saved("slightly-ahead", 3000.0 + MAX_CLOCK_SKEW_S / 2, 600, True),
    ]
    choice = _choose(candidates)
    assert [s.worker for s in choice.chosen] == ["honest", "slightly-ahead"]
    assert choice.skipped == {"future": 1}


def test_a_newer_barely_ready_baseline_does_not_displace_a_full_one() -> None:
    """A worker that started blind (Redis down at its load) and learnt from
    a few sybil keys in good standing reaches ready at 512 answers; ranked
    newest-first it won every later load over full baselines (offline, 520
    staggered low-margin answers saved that way hid an active learner that
    the full honest baseline catches). Among full baselines (margin stops at
    its ring size) the newest still wins."""
    candidates = [
        saved("rich-older", 2000.0, 4096, True),
        saved("blind-newer", 2900.0, 520, True),
        saved("rich-newest", 2950.0, 4096, True),
    ]
    choice = _choose(candidates)
    assert [s.worker for s in choice.chosen] == [
        "rich-newest",
        "rich-older",
        "blind-newer",
    ]


def test_the_largest_margin_ring_round_trips() -> None:
    """``MarginParams`` allows a ring of 1,000,000 answers (16 bytes each,
    two float64s) and the size bound says that ring fits; it was 4 MiB, so
    a ring over about 262,000 answers could be neither imported nor saved
    (the keeper decodes its own export to read the count, and the refusal
    escaped the stop-time save)."""
    size = 1_000_000
    rng = np.random.default_rng(0)
    blob = blob_with(
        n_features=4,
        samples=size,
        ready=True,
        fields={
            "margin": rng.random(size).tobytes(),
            "entropy": rng.random(size).tobytes(),
        },
    )
    assert len(blob) > 16_000_000
    detector = MarginDetector(MarginParams(baseline_size=size))
    detector.learn_baseline(rng.random((256, 4)))
    assert detector.import_baseline(blob) == size
    exported = detector.export_baseline() or b""
    assert decode_baseline(exported).samples == size
    assert (
        len(
            encode_saved(
                SavedBaseline(1, "m", "i", "margin", "w", 1.0, size, True, exported)
            )
        )
        <= MAX_BASELINE_BYTES + 4096
    )
