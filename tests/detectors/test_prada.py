"""Known answers for the PRADA-style detector on digits and recorded attacks.

The attack streams are recorded here, with a small budget and fixed seeds, by
running the demo's Jacobian augmentation attacker against the demo model in
process (``DirectOracle``), so the detector is tested on the real queries.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from detectors import (
    MAX_STATE_BYTES,
    DetectorScore,
    DistanceDistributionDetector,
    OutOfDistributionDetector,
    PradaParams,
)
from detectors import _pradakernels as _pk
from detectors.prada import shapiro_w
from evaluation.attacks.extraction import (
    JacobianParams,
    pick_seed_set,
    run_jacobian_extraction,
)
from evaluation.oracle import DirectOracle
from gateway.models import digits_split, ensure_digits_model, load_model

Array = npt.NDArray[np.float64]

# Queries the Jacobian attacker sends in the tests: seeds and four rounds
# (10 + 10 + 20 + 40 + 80 = 160), then 40 of the fifth round's candidates.
JACOBIAN_BUDGET = 200


@dataclass(frozen=True)
class Demo:
    """The demo's data as the detectors see it (X / 16) and recorded attacks."""

    train: Array
    test: Array
    jacobian: dict[int, Array]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    directory = tmp_path_factory.mktemp("model")
    ensure_digits_model(directory)
    model = load_model(directory, "digits")
    x_train, x_test, _, _ = digits_split()
    labels = model.predict_proba(x_test).argmax(axis=1)

    # The demo's attacker: one public held-out digit per class as seeds.
    jacobian: dict[int, Array] = {}
    for seed in range(3):
        seeds = pick_seed_set(x_test, labels, 1, np.random.default_rng(seed))
        others = np.setdiff1d(np.arange(len(x_test)), seeds)[:100]
        oracle = DirectOracle(model.predict_proba, JACOBIAN_BUDGET)
        sent: list[Array] = []

        def query(
            rows: Any, oracle: DirectOracle = oracle, sent: list[Array] = sent
        ) -> Any:
            sent.append(np.array(rows, dtype=np.float64))
            return oracle(rows)

        run_jacobian_extraction(
            query,
            x_test[seeds],
            x_test[others],
            labels[others],
            JacobianParams(budget=JACOBIAN_BUDGET, seed=seed),
        )
        # The oracle answers a prefix of each call; what it answered was sent.
        jacobian[seed] = np.concatenate(sent)[: oracle.used] / 16.0
    return Demo(
        train=np.asarray(x_train, dtype=np.float64) / 16.0,
        test=np.asarray(x_test, dtype=np.float64) / 16.0,
        jacobian=jacobian,
    )


def first_flag(scores: list[DetectorScore]) -> int:
    """1-based index of the first flagged score, 0 if none."""
    return next((i + 1 for i, s in enumerate(scores) if s.flagged), 0)


def benign_client(test: Array, rng: np.random.Generator) -> Array:
    """20-200 held-out digits in random order; three clients in ten also
    resend some digits 2-30 times with small noise (retries, bursts)."""
    n = int(rng.integers(20, 201))
    picks = rng.choice(len(test), size=n, replace=False)
    if rng.random() >= 0.3:
        return test[picks]
    rows: list[Array] = []
    for i in picks.tolist():
        rows.append(test[i])
        if rng.random() < 0.08:
            sigma = float(rng.choice([0.0, 0.005, 0.01, 0.02]))
            copies = int(rng.integers(2, 31))
            noise = rng.normal(0.0, sigma, (copies, test.shape[1]))
            rows.extend(np.clip(test[i] + noise, 0.0, 1.0))
    return np.array(rows[:n])


def interleave(
    streams: dict[str, Array], rng: np.random.Generator
) -> tuple[list[str], Array]:
    """Every client's rows in its own order, clients mixed at random."""
    owner = np.concatenate(
        [np.full(len(rows), i) for i, rows in enumerate(streams.values())]
    )
    order = rng.permutation(owner)
    names = list(streams)
    taken = dict.fromkeys(names, 0)
    ids: list[str] = []
    rows: list[Array] = []
    for i in order.tolist():
        name = names[i]
        ids.append(name)
        rows.append(streams[name][taken[name]])
        taken[name] += 1
    return ids, np.array(rows)


def score_in_batches(
    detector: DistanceDistributionDetector, ids: list[str], X: Array, size: int
) -> list[DetectorScore]:
    scores: list[DetectorScore] = []
    for start in range(0, len(ids), size):
        scores += detector.score_batch(
            ids[start : start + size], X[start : start + size]
        )
    return scores


def test_benign_digit_clients_are_not_flagged(demo: Demo) -> None:
    rng = np.random.default_rng(0)
    streams = {f"b{c}": benign_client(demo.test, rng) for c in range(200)}
    ids, X = interleave(streams, rng)
    scores = score_in_batches(DistanceDistributionDetector(), ids, X, 500)

    flagged = {c for c, s in zip(ids, scores, strict=True) if s.flagged}
    tested = {c for c, s in zip(ids, scores, strict=True) if s.warm}
    lowest_w = 1.0 - max(s.score for s in scores)
    # Measured on 1000 such clients (5 seeds): none flagged, lowest W 0.909.
    assert not flagged, sorted(flagged)
    assert len(tested) >= 100
    assert lowest_w > 0.90


@pytest.mark.parametrize("seed", range(3))
def test_jacobian_augmentation_is_flagged_at_the_first_test(
    demo: Demo, seed: int
) -> None:
    X = demo.jacobian[seed]
    assert X.shape == (JACOBIAN_BUDGET, 64)
    scores = DistanceDistributionDetector().score_batch(["thief"] * len(X), X)
    flagged_at = first_flag(scores)
    # Measured on 35 recorded streams: all flagged at query 60, the first
    # test (50 distances), with W 0.64-0.84; so risk = score / threshold is
    # at least 1.5, which the default policy blocks at once.
    assert flagged_at == 60
    assert scores[flagged_at - 1].score >= 0.15
    assert "Shapiro-Wilk W=" in scores[flagged_at - 1].evidence


def test_jacobian_hidden_among_benign_clients_is_still_flagged(demo: Demo) -> None:
    rng = np.random.default_rng(1)
    streams = {f"b{c}": benign_client(demo.test, rng) for c in range(30)}
    streams["thief"] = demo.jacobian[0]
    ids, X = interleave(streams, rng)
    scores = score_in_batches(DistanceDistributionDetector(), ids, X, 64)
    assert {c for c, s in zip(ids, scores, strict=True) if s.flagged} == {"thief"}


def test_uniform_random_is_left_to_the_ood_detector(demo: Demo) -> None:
    # A known weakness, kept visible: nearest distances among uniform points
    # in 64 dimensions are close to normal, so W stays high (lowest W
    # 0.93-0.98 over five 1000-query streams). The OOD detector catches them.
    X = np.random.default_rng(2).random((300, 64))
    prada = DistanceDistributionDetector().score_batch(["noise"] * len(X), X)
    assert first_flag(prada) == 0
    ood = OutOfDistributionDetector()
    ood.learn_baseline(demo.train)
    assert 0 < first_flag(ood.score_batch(["noise"] * len(X), X)) <= 10


def test_w_matches_scipy_shapiro() -> None:
    rng = np.random.default_rng(3)
    for n in [3, 4, 5, 6, 7, 11, 50, 128, 300]:
        for draw in (rng.normal, rng.exponential, rng.random, rng.standard_cauchy):
            x = draw(size=n)
            # The detector drops values beyond 3 sigma first, as PRADA's code.
            kept = x[np.abs(x - x.mean()) <= 3 * x.std()]
            assert shapiro_w(x) == pytest.approx(
                stats.shapiro(kept).statistic, abs=1e-8
            )
    assert shapiro_w(np.full(60, 0.2)) == 0.0
    assert shapiro_w(np.array([0.1, 0.2])) == 0.0


def _lattice(values: list[float], params: PradaParams) -> bool:
    """Plain-Python reference of the detector's lattice guard."""
    counts = Counter(round(v * 255) for v in values)
    top = sum(sorted(counts.values(), reverse=True)[:8])
    return len(counts) < params.min_distinct or top >= params.lattice_share * len(
        values
    )


def reference_scores(
    params: PradaParams, ids: list[str], X: Array
) -> list[tuple[float, bool]]:
    """Row-by-row reference of the detector (PRADA's Algorithm 1, bounded,
    class-agnostic, with the near-duplicate filter), using plain Python."""
    d = X.shape[1]
    scale = 255.0 * 255.0 * d
    state: dict[str, dict[str, Any]] = {}
    out = []
    for client, row in zip(ids, X, strict=True):
        s = state.setdefault(
            client,
            {
                "gs": deque(maxlen=params.growing_set),
                "recent": deque(maxlen=params.recent),
                "dist": deque(maxlen=params.window),
                "count": 0,
                "mean": 0.0,
                "m2": 0.0,
                "T": 0.0,
                "seen": 0,
                "score": 0.0,
                "tests": 0,
            },
        )
        q = np.rint(np.clip(row, 0, 1) * 255).astype(np.int64)
        s["seen"] += 1
        near = [int(((q - r) ** 2).sum()) for r in s["recent"]]
        s["recent"].append(q)
        if not (near and math.sqrt(min(near) / scale) < params.eps):
            if not s["gs"]:
                s["count"], s["mean"], s["m2"] = 1, 0.0, 0.0
                s["gs"].append(q)
            else:
                nearest = min(int(((q - g) ** 2).sum()) for g in s["gs"])
                dist = math.sqrt(nearest / scale)
                if dist >= params.eps:
                    s["dist"].append(float(np.float32(dist)))
                if dist > s["T"]:
                    std = math.sqrt(s["m2"] / s["count"])
                    s["T"] = max(s["T"], s["mean"] - std)
                    s["count"] += 1
                    step = dist - s["mean"]
                    s["mean"] += step / s["count"]
                    s["m2"] += step * (dist - s["mean"])
                    s["gs"].append(q)
        if (
            s["seen"] % params.test_every == 0
            and len(s["dist"]) >= params.min_queries
            and not _lattice(list(s["dist"]), params)
        ):
            s["score"] = 1.0 - shapiro_w(np.array(s["dist"]))
            s["tests"] += 1
        out.append((s["score"], s["tests"] > 0))
    return out


@pytest.mark.parametrize("growing_set", [8, 40])
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("window", [30, 300])
def test_matches_row_by_row_reference_including_eviction(
    growing_set: int, seed: int, window: int
) -> None:
    # Random walks with occasional jumps and resends, on 16 features, for a
    # skewed mix of clients; random batch cuts give groups of every size,
    # with and without eviction of growing-set members inside a batch, and
    # batches cut into pieces (a client with more rows than the growing
    # set). A window of 300 gives samples above 128 values, where numpy's
    # pairwise sum, which the kernel copies, splits in halves.
    rng = np.random.default_rng(seed)
    n = 1500
    ids = [f"c{c}" for c in rng.choice(4, n, p=[0.7, 0.1, 0.1, 0.1]).tolist()]
    X = np.empty((n, 16))
    last: dict[str, Array] = {}
    for i, client in enumerate(ids):
        previous = last.get(client, rng.random(16))
        kind = rng.random()
        if kind < 0.1:
            row = rng.random(16)
        elif kind < 0.2:
            row = previous + rng.normal(0, 0.005, 16)
        else:
            row = previous + rng.normal(0, rng.choice([0.05, 0.2]), 16)
        X[i] = last[client] = np.clip(row, 0, 1)
    params = PradaParams(
        growing_set=growing_set,
        window=window,
        recent=3,
        min_queries=12,
        test_every=4,
    )
    detector = DistanceDistributionDetector(params)
    cuts = sorted({0, n, *rng.integers(1, n, 12).tolist()})
    got: list[tuple[float, bool]] = []
    for a, b in itertools.pairwise(cuts):
        got += [(s.score, s.warm) for s in detector.score_batch(ids[a:b], X[a:b])]
    expected = reference_scores(params, ids, X)
    assert got == expected
    assert sum(warm for _, warm in got) > n // 2


def test_single_client_batches_equal_row_by_row(demo: Demo) -> None:
    # 200 rows of one client in one batch: more than the growing set holds
    # (so the batch is cut into pieces) and a big group on its own path.
    X = demo.jacobian[1]
    whole = DistanceDistributionDetector().score_batch(["t"] * len(X), X)
    single = DistanceDistributionDetector()
    one_by_one = [single.score_batch(["t"], X[i : i + 1])[0] for i in range(len(X))]
    assert whole == one_by_one


def test_state_round_trip_mid_stream(demo: Demo) -> None:
    X = demo.jacobian[2]
    straight = DistanceDistributionDetector().score_batch(["t"] * len(X), X)

    first = DistanceDistributionDetector()
    first.score_batch(["t"] * 55, X[:55])
    blob = first.dump_state("t")
    assert blob is not None
    second = DistanceDistributionDetector()
    second.load_state("t", blob)
    assert second.dump_state("t") == blob
    assert second.score_batch(["t"] * (len(X) - 55), X[55:]) == straight[55:]


def test_state_stays_bounded_after_5000_queries(demo: Demo) -> None:
    rng = np.random.default_rng(4)
    detector = DistanceDistributionDetector()
    detector.score_batch(["long"], demo.test[:1])
    early = detector.state_nbytes("long")
    for _ in range(10):
        picks = demo.test[rng.integers(0, len(demo.test), 500)]
        detector.score_batch(["long"] * 500, picks + rng.normal(0, 0.01, picks.shape))
    blob = detector.dump_state("long")
    assert blob is not None
    assert detector.state_nbytes("long") == early <= MAX_STATE_BYTES
    assert len(blob) <= MAX_STATE_BYTES
    # 64 x 64 growing set, 8 recent queries, 128 distances and counters.
    assert early == 64 * 68 + 8 * 68 + 128 * 4 + 15 * 8


def test_same_stream_same_scores(demo: Demo) -> None:
    rng = np.random.default_rng(5)
    streams = {f"b{c}": benign_client(demo.test, rng) for c in range(10)}
    streams["thief"] = demo.jacobian[0]
    ids, X = interleave(streams, rng)
    first = score_in_batches(DistanceDistributionDetector(seed=1), ids, X, 100)
    second = score_in_batches(DistanceDistributionDetector(seed=2), ids, X, 37)
    assert first == second


def test_evidence_names_w_and_the_distances(demo: Demo) -> None:
    X = demo.jacobian[0]
    scores = DistanceDistributionDetector().score_batch(["t"] * 60, X[:60])
    assert scores[0].evidence == (
        "0 of the 50 nearest-query distances needed for a normality test so far"
    )
    assert not scores[58].warm and scores[58].score == 0.0
    last = scores[59]
    w = 1.0 - last.score
    assert last.evidence == (
        f"Shapiro-Wilk W={w:.2f} over the last 59 nearest-query distances at "
        "query 60 (flagged below 0.90, the bound set for this model's honest "
        "traffic)"
    )


def test_threshold_and_test_every_change_live(demo: Demo) -> None:
    X = demo.jacobian[0]
    detector = DistanceDistributionDetector()
    detector.score_batch(["t"] * 60, X[:60])
    detector.set_params(threshold=0.9, test_every=1)
    nxt = detector.score_batch(["t"], X[60:61])[0]
    assert nxt.threshold == 0.9 and not nxt.flagged
    assert "at query 61" in nxt.evidence
    with pytest.raises(ValueError, match="growing_set"):
        detector.set_params(growing_set=128)
    with pytest.raises(ValueError, match="min_queries"):
        detector.set_params(min_queries=500)


def test_wide_inputs_keep_fewer_members_within_budget() -> None:
    detector = DistanceDistributionDetector()
    assert detector.capacity(64) == 64
    fixed = 8 * 1004 + 128 * 4 + 15 * 8
    # 1024 bytes stay free for the dump's msgpack envelope.
    assert detector.capacity(1000) == (32_768 - 1024 - fixed) // 1004
    rng = np.random.default_rng(6)
    detector.score_batch(["w"] * 40, rng.random((40, 1000)))
    blob = detector.dump_state("w")
    assert blob is not None and len(blob) <= MAX_STATE_BYTES
    with pytest.raises(ValueError, match="max_state_bytes"):
        DistanceDistributionDetector().score_batch(["w"], rng.random((1, 5000)))


def _phishing_stream(seed: int, n: int) -> Array:
    """An honest River Phishing client: held-out rows (features in {0, 0.5, 1},
    with duplicate rows in the data) in random order, cycled, so exact
    repeats of earlier queries occur; scaled by the declared range 0..1.05."""
    from gateway.zoo import phishing_split

    rows = phishing_split().x_test / 1.05
    rng = np.random.default_rng(seed)
    return np.asarray(rows[np.resize(rng.permutation(len(rows)), n)], np.float64)


def test_honest_stream_over_a_discrete_space_with_repeats_is_not_flagged() -> None:
    worst_untested = 0.0
    for seed in range(4):
        X = _phishing_stream(seed, 900)
        scores = DistanceDistributionDetector().score_batch(["c"] * len(X), X)
        assert not any(s.flagged for s in scores)
        # Without the distinct-values guard the lattice alone fails the test.
        loose = DistanceDistributionDetector(
            PradaParams(min_distinct=1, lattice_share=1.0)
        )
        scores = loose.score_batch(["c"] * len(X), X)
        worst_untested = max(worst_untested, max(s.score for s in scores))
    assert worst_untested >= PradaParams().threshold


def test_synthetic_steps_from_discrete_seeds_are_still_tested_and_flagged() -> None:
    # Jacobian-style augmentation seeded with phishing rows: steps of 0.1 leave
    # the lattice, so the distances take many values and the test runs.
    seeds = _phishing_stream(0, 10)
    rng = np.random.default_rng(0)
    X = seeds
    while len(X) < 200:
        steps = 0.1 * np.sign(rng.normal(size=X.shape))
        X = np.vstack([X, np.clip(X + steps, 0.0, 1.0)])
    scores = DistanceDistributionDetector().score_batch(["c"] * 200, X[:200])
    assert any(s.flagged for s in scores)


def test_on_lattice_equals_the_unique_count_rule() -> None:
    # on_lattice counts the 1/255 grid with bincount; it must decide as the
    # plain rule (distinct values via np.unique, top 8 counts) does.
    from detectors.prada import on_lattice

    rng = np.random.default_rng(0)
    for trial in range(200):
        levels = rng.integers(1, 40)
        base = rng.random(levels)
        sample = base[rng.integers(0, levels, rng.integers(20, 130))]
        if trial % 3 == 0:
            sample = rng.random(len(sample))
        grid = np.rint(sample * 255.0)
        _, counts = np.unique(grid, return_counts=True)
        expected = len(counts) < 12 or np.sort(counts)[::-1][:8].sum() >= 0.5 * len(
            grid
        )
        assert on_lattice(sample.astype(np.float32), 12, 0.5) == expected


@pytest.mark.parametrize("n_features", [64, 33025, 33026, 40000])
def test_kernel_distances_are_exact_at_any_width(n_features: int) -> None:
    # Up to 33025 features the squared distance is summed in int32
    # (vectorised); above, in int64. Both must equal the exact sum.
    rng = np.random.default_rng(n_features)
    ring = rng.integers(0, 256, (2, 3, n_features)).astype(np.uint8)
    ring[1, 2] = 255
    queries = rng.integers(0, 256, (2, n_features)).astype(np.uint8)
    queries[1] = 0
    for slot, row in [(0, 0), (1, 1)]:
        gaps = ring[slot].astype(np.int64) - queries[row].astype(np.int64)
        exact = int((gaps * gaps).sum(axis=1).min())
        assert _pk._nearest(ring, slot, 3, queries, row) == exact
    assert _pk._nearest(ring, 0, 0, queries, 0) == -1
    # The farthest pair at the int32 limit is 255**2 per feature.
    farthest = np.ascontiguousarray(ring[1:, 2:])
    assert _pk._nearest(farthest, 0, 1, queries, 1) == 255**2 * n_features


def test_kernel_sort_on_the_grid_equals_a_sort() -> None:
    # The test's sample is sorted by grid cell, then within cells; values on
    # the half-way points of the grid (rounded to even) and repeats included.
    rng = np.random.default_rng(11)
    counts = np.empty(256, dtype=np.int64)
    for trial in range(300):
        n = int(rng.integers(3, 400))
        x = rng.random(n).astype(np.float32).astype(np.float64)
        if trial % 3 == 0:
            x = (rng.integers(0, 255, n) + 0.5) / 255.0
        if trial % 3 == 1:
            x = x[rng.integers(0, max(n // 8, 1), n)]
        out = np.empty(n)
        _pk.sample_on_lattice(x, n, counts, 16, 0.85)
        _pk._sort_on_grid(x, n, counts, out)
        assert np.array_equal(out, np.sort(x))


def _breast_cancer() -> tuple[Array, Array]:
    """Reference and held-out breast-cancer rows scaled to [0, 1] by the
    reference's range, as the worker scales a tabular model's inputs."""
    from sklearn.datasets import load_breast_cancer

    X = np.asarray(load_breast_cancer().data, dtype=np.float64)
    reference, pool = X[::2], X[1::2]
    low, high = reference.min(axis=0), reference.max(axis=0)
    return (reference - low) / (high - low), np.clip((pool - low) / (high - low), 0, 1)


def test_skewed_honest_distances_are_tested_on_the_log_scale() -> None:
    # Nearest distances between breast-cancer patients are right-skewed
    # (reference W 0.91), so on their own scale honest clients fail the
    # normality test that digits pass (W 0.98): at the default threshold
    # every one of these honest replays was flagged.
    reference, pool = _breast_cancer()
    raw = DistanceDistributionDetector(PradaParams(log_scale=False))
    auto = DistanceDistributionDetector()
    for detector in (raw, auto):
        detector.learn_baseline(reference)
    assert auto.log_scale and not raw.log_scale
    flagged_raw = flagged_auto = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        X = pool[np.resize(rng.permutation(len(pool)), 280)]
        flagged_raw += any(s.flagged for s in raw.score_batch([f"r{seed}"] * 280, X))
        scores = auto.score_batch([f"a{seed}"] * 280, X)
        flagged_auto += any(s.flagged for s in scores)
        assert "log nearest-query distances" in scores[-1].evidence
    assert (flagged_raw, flagged_auto) == (4, 0)


def test_synthetic_steps_on_skewed_data_are_still_flagged_on_the_log_scale() -> None:
    # Jacobian-style augmentation from ten breast-cancer seeds: steps of 0.1
    # put many distances on a few values, which no monotone scale spreads.
    # The lattice guard holds both scales' first test back to query 120.
    reference, pool = _breast_cancer()
    rng = np.random.default_rng(0)
    X = pool[:10]
    while len(X) < 200:
        steps = 0.1 * np.sign(rng.normal(size=X.shape))
        X = np.vstack([X, np.clip(X + steps, 0.0, 1.0)])
    firsts = []
    for log_scale in (False, None):
        detector = DistanceDistributionDetector(PradaParams(log_scale=log_scale))
        detector.learn_baseline(reference)
        scores = detector.score_batch(["j"] * 200, X[:200])
        firsts.append(first_flag(scores))
    assert detector.log_scale
    assert firsts == [120, 120]
    assert 1.0 - scores[119].score < 0.85


def test_digits_keep_the_papers_scale(demo: Demo) -> None:
    from gateway.zoo import phishing_split

    detector = DistanceDistributionDetector()
    detector.learn_baseline(demo.train)
    assert not detector.log_scale
    # Phishing's lattice-valued distances are far from normal (W 0.28).
    lattice = DistanceDistributionDetector()
    lattice.learn_baseline(np.asarray(phishing_split().x_train / 1.05, np.float64))
    assert lattice.log_scale
    assert DistanceDistributionDetector(PradaParams(log_scale=True)).log_scale
