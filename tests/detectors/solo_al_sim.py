"""Offline study: can ``margin`` see the single-key active learner on digits
timed like an honest client by its 112th query? For docs/evaluation.md.

Not a test module. Record the replays (on the shared 2-core machine about
10 to 25 minutes each, so run the two at once), then analyse them::

    python -m tests.detectors.solo_al_sim --out /tmp/al_a.npz
    python -m tests.detectors.solo_al_sim --out /tmp/al_b.npz \
        --seeds 5,6,7,8,9 --honest-only
    python -m tests.detectors.solo_al_sim --analyse /tmp/al_a.npz /tmp/al_b.npz

The analysis prints, per statistic and seed, the answer at which the learner
is first flagged with a threshold calibrated on honest keys of the *other*
seeds (no peeking), and how many honest keys of the tested seed that
threshold flags. Nothing here is used by the gateway.

What is replayed, per seed 0-4 (5-9: honest keys only, for thresholds):

- the thief: the evaluation's own uncertainty sampler on ``digits``
  (``evaluation.scenarios.run_attack("active")``: the seed's pool, the
  default budget and round schedule, 37 random rows then rounds of 75)
  answered by the real digits MLP. Its copy reaches 90% of the unhindered
  agreement at about its 112th query (end of its first uncertainty round);
- honest keys: ``HONEST_PER_RUN`` keys per run and ``RUNS`` runs (100 keys a
  seed), each replaying the held-out digits in its own random order with the
  evaluation's habits (``evaluation.benign``: near-duplicate runs, lognormal
  rates with median 1.5/s clipped to 0.3-10/s, Poisson arrivals, bursts,
  pauses, starts spread over 30 s), 300 to 600 queries each, replayed in
  full (the evaluation cuts them short when the attacks end);
- each run is one worker's ``margin`` detector for digits, built as
  ``gateway.scoring`` builds it (calibrated on the scaled reference sample,
  reference answers learnt), fed in arrival order in batches of up to 64
  rows or 50 ms, ``score_batch`` then ``observe_outputs``, a row teaching
  the shared baseline while its key is unflagged (good standing). The thief
  starts once the run's honest keys have been answered 600 times (the
  evaluation's honest lead) and sends at 40 per second with exponential
  gaps (``--attacker-arrivals poisson``); retraining pauses are left out
  (they move its rows later, not its answers).

Beside the detector, the replay keeps a mirror of the live baseline (the
last ``baseline_size`` answers of keys in good standing, reference answers
excluded, as the rank test uses) and records for every answer of every key
what the candidate statistics need, ranked against the mirror *as it stood
before the answer's batch*: the quantised margin's mid-rank (the shipped
rank test's input), the mid-rank of the full-resolution log-odds of the top
two classes (no ties at the confident end), the top-1 class and the top-2
pair with their shares in the baseline and the pair's honest tilt (how much
more common it is among the baseline's least confident 30% of answers),
the mid-rank of the row's distance to the nearest reference row and of the
answer's entropy (both turned so that low is unusual), and whether the row
re-sends the key's previous one (within ``rank_repeat_eps``; skipped by
every statistic, as the rank test skips it).

Statistics (see :func:`statistics`): each is a number per answer per key,
judged at every answer from ``MIN_ANSWERS`` on; the threshold for a tested
seed is the highest value any honest key of the other four seeds and of
the honest-only seeds reached (900 keys, about 400,000 answers), which is
"0 flags over at least 300 honest streams at every answer". Statistics
named ``_learnt`` know the learner's rank and pair distributions as
measured on the other four seeds' learners (the alternative of a
likelihood ratio); ``_generic`` ones assume only that its answers rank low
(density ``1 + 0.8 (1 - 2u)``) and favour the pairs honest answers are
unsure between.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as sps
from scipy.spatial import cKDTree

from detectors.calibration import calibrate
from detectors.margin import MarginDetector, MarginParams, margins_and_entropy
from detectors.registry import build_detectors
from evaluation.benign import (
    BenignProfile,
    arrival_plan,
    draw_habits,
    draw_profiles,
    query_stream,
)
from evaluation.scenarios import Budgets, ModelTask, build_task, run_attack
from gateway.models import load_model
from gateway.validation import FeatureScale, feature_scale
from gateway.zoo import ensure_model

Array = npt.NDArray[Any]

MODEL_DIR = Path("/tmp/modelgate-solo-al-sim-models")
SEEDS = (0, 1, 2, 3, 4)
HONEST_SEEDS = (5, 6, 7, 8, 9)
"""Seeds of honest-only runs: more honest streams for the thresholds."""
RUNS = 5
HONEST_PER_RUN = 20
LEAD_ANSWERS = 600
THIEF_RATE_PER_S = 40.0
BATCH_ROWS = 64
BATCH_S = 0.05
TARGET_QUERY = 112
MIN_ANSWERS = 20
THIEF = "thief"


@dataclass(frozen=True)
class Setup:
    task_by_seed: dict[int, ModelTask]
    scale: FeatureScale
    reference: Array
    margin_params: dict[str, Any]
    reference_proba: Array


@cache
def setup(name: str = "digits") -> Setup:
    ensure_model(MODEL_DIR, name)
    model = load_model(MODEL_DIR, name)
    scale = feature_scale(model.signature, model.reference)
    reference = scale.apply(model.reference)
    found = calibrate(lambda o: build_detectors(o, seed=0), {}, reference)
    tasks = {
        s: build_task(name, model, s, Budgets().probing_targets)
        for s in (*SEEDS, *HONEST_SEEDS)
    }
    return Setup(
        task_by_seed=tasks,
        scale=scale,
        reference=reference,
        margin_params=dict(found.params.get("margin", {})),
        reference_proba=np.asarray(model.predict_proba(model.reference), np.float64),
    )


def thief_rows(task: ModelTask, seed: int) -> tuple[Array, list[tuple[int, float]]]:
    """Every row the learner asks, in order, and its agreement curve."""
    asked: list[Array] = []

    def query(rows: Array) -> Array:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        asked.append(rows)
        return np.asarray(task.model.predict_proba(rows), dtype=np.float32)

    out = run_attack("active", query, task, Budgets(), seed)
    return np.concatenate(asked), [(int(q), float(a)) for q, a in out["curve"]]


def honest_keys(
    task: ModelTask, seed: int, run: int, n: int
) -> tuple[list[BenignProfile], list[Array], list[Array]]:
    """Profiles, arrival times and rows of ``n`` honest digits keys."""
    rng = np.random.default_rng([seed, run, 12])
    profiles = draw_profiles(
        n,
        rng,
        queries=(300, 600),
        spread_s=30.0,
        median_rate_per_s=1.5,
        rate_bounds=(0.3, 10.0),
    )
    spans = tuple(float(v) for v in np.ptp(task.replay, axis=0))
    times: list[Array] = []
    rows: list[Array] = []
    for profile, crng in zip(profiles, rng.spawn(n), strict=True):
        habits = draw_habits(1, crng, task.clip, feature_spans=spans)[0]
        order = task.replay[crng.permutation(len(task.replay))]
        plan = arrival_plan(profile, crng)
        stream = query_stream(order, habits, profile.n_queries, crng)
        at = np.concatenate([np.full(size, t) for t, size in plan])
        times.append(profile.start_delay_s + at[: len(stream)])
        rows.append(stream)
    return profiles, times, rows


@dataclass
class KeyRecord:
    """Per answer of one key (in its own order)."""

    u_q: list[float] = field(default_factory=list)
    u_f: list[float] = field(default_factory=list)
    var_q: list[float] = field(default_factory=list)
    n_base: list[int] = field(default_factory=list)
    repeat: list[bool] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)
    pair: list[int] = field(default_factory=list)
    pair_share: list[float] = field(default_factory=list)
    class_share: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    u_d: list[float] = field(default_factory=list)
    u_e: list[float] = field(default_factory=list)
    pair_tilt: list[float] = field(default_factory=list)
    flagged_at: int = 0  # the shipped detector's first flag (1-based), 0 never

    def arrays(self) -> dict[str, Array]:
        return {
            k: np.asarray(getattr(self, k))
            for k in (
                "u_q",
                "u_f",
                "var_q",
                "n_base",
                "repeat",
                "top1",
                "pair",
                "pair_share",
                "class_share",
                "margin",
                "u_d",
                "u_e",
                "pair_tilt",
            )
        }


def _log_odds(proba: Array) -> tuple[Array, Array, Array, Array]:
    """Top-2 log-odds, margin, top-1 class and unordered top-2 pair id."""
    order = np.argsort(-proba, axis=1, kind="stable")
    top1, top2 = order[:, 0], order[:, 1]
    rows = np.arange(len(proba))
    p1, p2 = proba[rows, top1], proba[rows, top2]
    odds = np.log(np.maximum(p1, 1e-300)) - np.log(np.maximum(p2, 1e-300))
    low, high = np.minimum(top1, top2), np.maximum(top1, top2)
    return odds, p1 - p2, top1, low * 10 + high


class Mirror:
    """The live baseline as the rank test sees it, with more per answer."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.q = np.zeros(size, dtype=np.uint8)
        self.odds = np.zeros(size)
        self.top1 = np.zeros(size, dtype=np.int64)
        self.pair = np.zeros(size, dtype=np.int64)
        self.dist = np.zeros(size)
        self.ent = np.zeros(size)
        self.pos = 0
        self.len = 0

    def add(
        self, q: Array, odds: Array, top1: Array, pair: Array, dist: Array, ent: Array
    ) -> None:
        for i in range(len(q)):
            self.dist[self.pos] = dist[i]
            self.ent[self.pos] = ent[i]
            self.q[self.pos] = q[i]
            self.odds[self.pos] = odds[i]
            self.top1[self.pos] = top1[i]
            self.pair[self.pos] = pair[i]
            self.pos = (self.pos + 1) % self.size
            self.len = min(self.len + 1, self.size)

    def far_ranks(self, dist: Array, ent: Array) -> tuple[Array, Array, Array]:
        """Mid-ranks of how *un*usual a row is (distance to the reference
        sample, answer entropy: 1 - mid-rank, so low is unusual as for the
        margins) and the honest pair tilt (see :func:`statistics`)."""
        n = self.len
        bd = np.sort(self.dist[:n])
        be = np.sort(self.ent[:n])

        def mid(base: Array, v: Array) -> Array:
            return np.asarray(
                (np.searchsorted(base, v, "left") + np.searchsorted(base, v, "right"))
                / (2.0 * n)
            )

        odds = self.odds[:n]
        cut = np.quantile(odds, 0.3)
        every = np.bincount(self.pair[:n], minlength=100) + 0.5
        doubtful = np.bincount(self.pair[:n][odds < cut], minlength=100) + 0.5
        tilt = np.log(0.5 * (doubtful / doubtful.sum()) / (every / every.sum()) + 0.5)
        return 1.0 - mid(bd, dist), 1.0 - mid(be, ent), tilt

    def ranks(
        self, q: Array, odds: Array, top1: Array, pair: Array
    ) -> tuple[Array, Array, float, Array, Array]:
        n = self.len
        bq = np.sort(self.q[:n])
        bo = np.sort(self.odds[:n])
        u_q = (np.searchsorted(bq, q, "left") + np.searchsorted(bq, q, "right")) / (
            2.0 * n
        )
        u_f = (
            np.searchsorted(bo, odds, "left") + np.searchsorted(bo, odds, "right")
        ) / (2.0 * n)
        shares = np.bincount(bq, minlength=256) / n
        var = float((1.0 - np.sum(shares**3)) / 12.0)
        pair_counts = np.bincount(self.pair[:n], minlength=100)
        class_counts = np.bincount(self.top1[:n], minlength=10)
        # Add-one smoothing: a pair never seen among honest answers is rare,
        # not impossible.
        pair_share = (pair_counts[pair] + 1.0) / (n + 45.0)
        class_share = (class_counts[top1] + 1.0) / (n + 10.0)
        return u_q, u_f, var, pair_share, class_share


def replay_run(
    seed: int, run: int, with_thief: bool, model: str = "digits"
) -> dict[str, KeyRecord]:
    """One worker's margin detector over one run's keys (see module); honest
    keys only unless ``with_thief`` (a learner on ``model``)."""
    s = setup(model)
    task = s.task_by_seed[seed]
    params = MarginParams(**s.margin_params)
    det = MarginDetector(params, seed=0)
    det.learn_baseline(s.reference)
    # As gateway.scoring._learn_outputs: the reference's answers seed the
    # (share) baseline; the rank test ignores them.
    det.learn_output_baseline(s.reference, s.reference_proba)
    _, times, rows = honest_keys(task, seed, run, HONEST_PER_RUN)
    names = [f"honest-{seed}-{run}-{k}" for k in range(len(rows))]
    events = [
        (float(t), name, i)
        for name, ts in zip(names, times, strict=True)
        for i, t in enumerate(ts)
    ]
    events.sort()
    stream = dict(zip(names, rows, strict=True))
    if with_thief:
        # Starts after the honest lead of LEAD_ANSWERS answers.
        start = events[LEAD_ANSWERS][0]
        trows, _ = thief_rows(task, seed)
        rng = np.random.default_rng([seed, run, 99])
        gaps = rng.exponential(1.0 / THIEF_RATE_PER_S, len(trows))
        tt = start + np.cumsum(gaps)
        events += [(float(t), THIEF, i) for i, t in enumerate(tt)]
        events.sort()
        stream[THIEF] = trows
    records = {name: KeyRecord() for name in stream}
    last_row: dict[str, Array] = {}
    mirror = Mirror(params.baseline_size)
    tree = cKDTree(s.reference)
    eps2 = (params.rank_repeat_eps * 255.0) ** 2 * s.reference.shape[1]
    flagged: set[str] = set()
    start = 0
    while start < len(events):
        end = start + 1
        while (
            end < len(events)
            and end - start < BATCH_ROWS
            and events[end][0] - events[start][0] < BATCH_S
        ):
            end += 1
        batch = events[start:end]
        start = end
        ids = [name for _, name, _ in batch]
        raw = np.vstack([stream[name][i] for _, name, i in batch])
        X = s.scale.apply(raw)
        scores = det.score_batch(ids, X)
        proba = np.asarray(task.model.predict_proba(raw), dtype=np.float64)
        learn = np.array([name not in flagged for name in ids])
        det.observe_outputs(ids, X, proba, learn=learn)
        odds, margin, top1, pair = _log_odds(proba)
        dist = tree.query(X, k=1)[0]
        ent = margins_and_entropy(proba)[1]
        q = np.rint(np.clip(margin, 0.0, 1.0) * 255.0).astype(np.uint8)
        ready = mirror.len >= params.rank_min_baseline
        if ready:
            u_q, u_f, var, pshare, cshare = mirror.ranks(q, odds, top1, pair)
            u_d, u_e, tilt = mirror.far_ranks(dist, ent)
        for j, name in enumerate(ids):
            rec = records[name]
            if scores[j].flagged and not rec.flagged_at:
                rec.flagged_at = len(rec.u_q) + 1
                flagged.add(name)
            row8 = np.rint(np.clip(X[j], 0.0, 1.0) * 255.0)
            prev = last_row.get(name)
            repeat = prev is not None and float(np.sum((row8 - prev) ** 2)) <= eps2
            last_row[name] = row8
            if not ready:
                # Not ranked before the baseline is ready; recorded as NaN so
                # positions stay the key's own query count.
                rec.u_q.append(math.nan)
                rec.u_f.append(math.nan)
                rec.var_q.append(math.nan)
                rec.n_base.append(0)
                rec.pair_share.append(math.nan)
                rec.class_share.append(math.nan)
                rec.u_d.append(math.nan)
                rec.u_e.append(math.nan)
                rec.pair_tilt.append(0.0)
            else:
                rec.u_d.append(float(u_d[j]))
                rec.u_e.append(float(u_e[j]))
                rec.pair_tilt.append(float(tilt[pair[j]]))
                rec.u_q.append(float(u_q[j]))
                rec.u_f.append(float(u_f[j]))
                rec.var_q.append(var)
                rec.n_base.append(mirror.len)
                rec.pair_share.append(float(pshare[j]))
                rec.class_share.append(float(cshare[j]))
            rec.repeat.append(repeat)
            rec.top1.append(int(top1[j]))
            rec.pair.append(int(pair[j]))
            rec.margin.append(float(margin[j]))
        if learn.any():
            mirror.add(
                q[learn], odds[learn], top1[learn], pair[learn], dist[learn], ent[learn]
            )
    return records


def record_all(
    out: Path, seeds: tuple[int, ...], with_thief: bool, model: str = "digits"
) -> None:
    """Replay every seed and run; save the per-answer records."""
    data: dict[str, Array] = {}
    for seed in seeds:
        for run in range(RUNS):
            t0 = time.monotonic()
            recs = replay_run(seed, run, with_thief=with_thief, model=model)
            for name, rec in recs.items():
                key = f"s{seed}/r{run}/{name}"
                for field_name, values in rec.arrays().items():
                    data[f"{key}/{field_name}"] = values
                data[f"{key}/flagged_at"] = np.asarray(rec.flagged_at)
            thief = recs.get(THIEF, KeyRecord())
            print(
                f"seed {seed} run {run}: {HONEST_PER_RUN} honest keys, thief "
                f"{len(thief.u_q)} rows, shipped margin flags thief at "
                f"{thief.flagged_at or 'never'}, honest flagged "
                f"{sum(1 for n, r in recs.items() if n != THIEF and r.flagged_at)}"
                f" ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
    save: Any = np.savez_compressed  # numpy's stubs mistype the **arrays form
    save(out, **data)


# -- analysis --------------------------------------------------------------------

Keys = dict[tuple[int, int, str], dict[str, Array]]
"""(seed, run, key name) -> that key's per-answer arrays."""

HORIZON = 192
TAIL_QS = (0.05, 0.1, 0.2, 0.3)
LR_BINS = 10
ROUNDS = (37, 187)
"""The learner's rows from which its rank distribution is measured (its
first two uncertainty rounds, queries 38 to 187)."""


def load(*paths: Path) -> Keys:
    keys: Keys = {}
    for path in paths:
        _load_into(keys, np.load(path))
    return keys


def _load_into(keys: Keys, raw: Any) -> None:
    for name in raw.files:
        seed_s, run_s, key, field_name = name.split("/")
        entry = keys.setdefault((int(seed_s[1:]), int(run_s[1:]), key), {})
        entry[field_name] = raw[name]


def _valid(k: dict[str, Array]) -> Array:
    return np.asarray(~np.isnan(k["u_f"]) & ~k["repeat"].astype(bool), dtype=bool)


def _decayed_z(u: Array, valid: Array, var: Array, n_base: Array) -> Array:
    """The shipped rank test's z at every answer (NaN before it speaks)."""
    decay = 1.0 - 1.0 / HORIZON
    w = w2 = wu = 0.0
    out = np.full(len(u), np.nan)
    for i in range(len(u)):
        if valid[i]:
            w, w2, wu = w * decay + 1.0, w2 * decay * decay + 1.0, wu * decay + u[i]
        if w > 0 and n_base[i] > 0:
            n_eff = w * w / w2
            if n_eff >= 48:
                mean = wu / w
                out[i] = (0.5 - mean) / math.sqrt(var[i] * (1 / n_eff + 1 / n_base[i]))
    return out


def _cum(values: Array, valid: Array) -> tuple[Array, Array]:
    """Cumulative sum of valid values and count, per answer."""
    v = np.where(valid, values, 0.0)
    return np.cumsum(v), np.cumsum(valid)


def _cusum(llr: Array, valid: Array) -> Array:
    s = 0.0
    out = np.zeros(len(llr))
    for i in range(len(llr)):
        if valid[i]:
            s = max(0.0, s + llr[i])
        out[i] = s
    return out


@dataclass
class Learnt:
    """What a statistic may know of the learner, measured on the training
    seeds' learners over their first two uncertainty rounds: log densities
    of its margin, distance and entropy ranks (``LR_BINS`` bins each) and
    its top-2 pair shares."""

    log_density: dict[str, Array]
    pair_share: Array


def learn_thief(keys: Keys, seeds: tuple[int, ...]) -> Learnt:
    found: dict[str, list[Array]] = {"u_f": [], "u_d": [], "u_e": [], "pair": []}
    for (seed, _run, name), k in keys.items():
        if name != THIEF or seed not in seeds:
            continue
        sl = slice(*ROUNDS)
        ok = _valid(k)[sl]
        for f, values in found.items():
            values.append(k[f][sl][ok])
    log_density = {}
    for f in ("u_f", "u_d", "u_e"):
        hist = np.histogram(np.concatenate(found[f]), bins=LR_BINS, range=(0, 1))[0]
        hist = hist + 1.0
        log_density[f] = np.log(hist / hist.sum() * LR_BINS)
    pc = np.bincount(np.concatenate(found["pair"]), minlength=100) + 0.5
    return Learnt(log_density=log_density, pair_share=pc / pc.sum())


GENERIC_TILT = 0.8
"""The generic alternative for a rank u: density ``1 + t (1 - 2 u)`` (t this
value; 1.8 at u = 0, 0.2 at u = 1), a learner's answers ranking low without
the statistic knowing by how much."""


def statistics(k: dict[str, Array], learnt: Learnt) -> dict[str, Array]:
    """Every candidate statistic at every answer of one key (higher is more
    suspicious; NaN or 0 while it cannot speak)."""
    valid = _valid(k)
    u_f = np.nan_to_num(k["u_f"], nan=0.5)
    u_q = np.nan_to_num(k["u_q"], nan=0.5)
    n_base = k["n_base"].astype(float)
    var_q = np.nan_to_num(k["var_q"], nan=1 / 12)
    out: dict[str, Array] = {}
    out["rank_q_decayed"] = _decayed_z(u_q, valid, var_q, n_base)
    out["rank_f_decayed"] = _decayed_z(u_f, valid, np.full(len(u_f), 1 / 12), n_base)
    total, n = _cum(u_f, valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        nb = np.maximum(n_base, 1)
        out["rank_f_cum"] = np.where(
            n >= MIN_ANSWERS,
            (0.5 - mean) / np.sqrt((1 / 12) * (1 / n + 1 / nb)),
            np.nan,
        )
    for q in TAIL_QS:
        low, n = _cum((u_f < q).astype(float), valid)
        # -log10 of the binomial upper tail P(X >= low | n, q).
        tail = sps.binom.logsf(low - 1, np.maximum(n, 1), q) / -math.log(10)
        out[f"tail_{q:g}"] = np.where(n >= MIN_ANSWERS, tail, np.nan)
        # Bernoulli CUSUM for a doubled low-tail rate.
        q1 = min(2 * q, 0.9)
        llr = np.where(u_f < q, math.log(q1 / q), math.log((1 - q1) / (1 - q)))
        out[f"cusum_tail_{q:g}"] = _cusum(llr, valid)
    ranks = {f: np.nan_to_num(k[f], nan=0.5) for f in ("u_f", "u_d", "u_e")}
    bins = {
        f: np.minimum((u * LR_BINS).astype(int), LR_BINS - 1) for f, u in ranks.items()
    }
    learnt_llr = {f: learnt.log_density[f][b] for f, b in bins.items()}
    generic_llr = {f: np.log1p(GENERIC_TILT * (1 - 2 * u)) for f, u in ranks.items()}
    pshare = np.nan_to_num(k["pair_share"], nan=1.0)
    pair_learnt = np.log(learnt.pair_share[k["pair"]] / pshare)
    pair_generic = k["pair_tilt"]
    for label, parts in (
        ("lr_f", ("u_f",)),
        ("lr_d", ("u_d",)),
        ("lr_e", ("u_e",)),
        ("lr_fd", ("u_f", "u_d")),
        ("lr_fde", ("u_f", "u_d", "u_e")),
    ):
        for pair_label, learnt_pair, generic_pair in (
            ("", 0.0, 0.0),
            ("_pair", pair_learnt, pair_generic),
        ):
            llr_l = np.asarray(sum(learnt_llr[f] for f in parts) + learnt_pair)
            llr_g = np.asarray(sum(generic_llr[f] for f in parts) + generic_pair)
            out[f"{label}{pair_label}_learnt"] = _cusum(llr_l, valid)
            out[f"{label}{pair_label}_generic"] = _cusum(llr_g, valid)
    out["lr_pair_learnt"] = _cusum(pair_learnt, valid)
    out["lr_pair_generic"] = _cusum(pair_generic, valid)
    return out


def _first(values: Array, threshold: float) -> int:
    """1-based first answer at or over ``threshold`` (0: never)."""
    hit = np.flatnonzero(np.nan_to_num(values, nan=-np.inf) >= threshold)
    return int(hit[0]) + 1 if len(hit) else 0


def evaluate(keys: Keys) -> dict[str, dict[int, dict[str, Any]]]:
    """Leave-one-seed-out: per statistic and tested seed, the threshold from
    the other seeds' honest keys and what it flags."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for test in SEEDS:
        train = tuple(s for s in SEEDS if s != test)
        learnt = learn_thief(keys, train)
        per_key = {key: statistics(k, learnt) for key, k in keys.items()}
        names = next(iter(per_key.values())).keys()
        for stat in names:
            honest_max = [
                float(np.nanmax(np.nan_to_num(v[stat], nan=-np.inf)))
                for (seed, _r, name), v in per_key.items()
                if (seed in train or seed in HONEST_SEEDS) and name != THIEF
            ]
            threshold = max(honest_max)
            thief_at = [
                _first(v[stat], threshold)
                for (seed, _r, name), v in per_key.items()
                if seed == test and name == THIEF
            ]
            thief_peak112 = [
                float(np.nanmax(np.nan_to_num(v[stat][:TARGET_QUERY], nan=-np.inf)))
                for (seed, _r, name), v in per_key.items()
                if seed == test and name == THIEF
            ]
            honest_test = [
                _first(v[stat], threshold)
                for (seed, _r, name), v in per_key.items()
                if seed == test and name != THIEF
            ]
            results.setdefault(stat, {})[test] = {
                "threshold": threshold,
                "n_train_honest": len(honest_max),
                "thief_at": thief_at,
                "thief_peak112": thief_peak112,
                "honest_flagged": sum(1 for h in honest_test if h),
                "n_test_honest": len(honest_test),
            }
    return results


def show(results: dict[str, dict[int, dict[str, Any]]]) -> None:
    """One line per statistic: seeds whose learner (median of its runs) is
    flagged at an answer before ``TARGET_QUERY`` (so its 112th query is
    refused), honest keys of the tested seeds flagged, then per seed the
    threshold, the learner's median peak by then and its runs' first flags."""
    for stat, by_seed in results.items():
        caught = 0
        honest = 0
        cells = []
        for seed in SEEDS:
            r = by_seed[seed]
            med = float(np.median([a if a else 10**6 for a in r["thief_at"]]))
            if med < TARGET_QUERY:
                caught += 1
            honest += r["honest_flagged"]
            firsts = ",".join(str(a) if a else "-" for a in sorted(r["thief_at"]))
            cells.append(
                f"s{seed} h {r['threshold']:.2f} "
                f"peak {np.median(r['thief_peak112']):.2f} at {firsts}"
                + (f" honest {r['honest_flagged']}" if r["honest_flagged"] else "")
            )
        n_test = sum(by_seed[s]["n_test_honest"] for s in SEEDS)
        n_train = by_seed[SEEDS[0]]["n_train_honest"]
        print(
            f"{stat}: learner by {TARGET_QUERY} in {caught}/5 seeds; honest "
            f"flagged {honest}/{n_test} (thresholds from {n_train} honest keys)"
        )
        print("    " + " | ".join(cells))


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("/tmp/solo_al_sim.npz"))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--honest-only", action="store_true")
    parser.add_argument(
        "--model",
        default="digits",
        help="the zoo model (honest keys only if not digits)",
    )
    parser.add_argument(
        "--analyse",
        type=Path,
        nargs="+",
        help="print the statistics from recorded replays instead of recording",
    )
    args = parser.parse_args()
    if args.analyse:
        show(evaluate(load(*args.analyse)))
        return
    seeds = tuple(int(v) for v in args.seeds.split(","))
    record_all(args.out, seeds, not args.honest_only, args.model)


if __name__ == "__main__":
    _main()
