"""Offline replays of region links on the real models, for their tests and docs.

Not a test module: ``test_region.py`` uses these replays, and
``python -m tests.detectors.region_sim`` prints the measurements quoted in
``docs/region-links.md``.

What is replayed, and how it follows the gateway:

- per model (the zoo's digits, breast_cancer, phishing), ``ood`` is built as a
  worker builds it: the reference put on the detectors' scale by
  :func:`gateway.validation.feature_scale`, ``ood``'s parameters calibrated on
  it (:func:`detectors.calibration.calibrate`, unless ``--no-calibrate``),
  then ``learn_baseline``; the :class:`detectors.region.RegionMap` is fitted
  on the same scaled reference with the gateway's defaults;
- a row counts when ``ood`` judged it an outlier (``last_outliers``), its
  region is rare for the reference, and at least ``region_min_client_share``
  of its client's window are outliers (``last_window_share``), as
  ``gateway.scoring`` decides; counted rows go through
  :class:`detectors.region.InMemoryRegionStore` and
  :func:`detectors.region.region_reports` into a
  :class:`detectors.linking.KeyLinks` with ``region_min_shared``;
- honest keys replay the whole held-out split in their own random order with
  the evaluation's habits (``evaluation.benign``: near-duplicate runs,
  retries); attacks are the evaluation's own code (``evaluation.scenarios``)
  run against the real model in this process, their rows spread round-robin
  over 10 keys as :class:`evaluation.attacks.distributed.SpreadOracle` does,
  interleaved with the honest keys;
- time is compressed: every row falls in one ``link_window_s`` window and
  nothing expires, the worst case for honest pairs. Every row is learned by
  ``ood``'s shared baseline (attack keys included, as keys in good standing
  are), which can only make attack rows look more ordinary.

Rows are scored in batches of ``BATCH_ROWS``, as a worker polling Kafka does.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.calibration import calibrate
from detectors.linking import KeyLinks
from detectors.ood import OodParams, OutOfDistributionDetector
from detectors.region import InMemoryRegionStore, RegionMap, region_reports
from detectors.registry import build_detectors
from evaluation.benign import draw_habits, query_stream
from evaluation.oracle import DirectOracle
from evaluation.scenarios import Budgets, ModelTask, build_task, run_attack
from gateway.config import CrossClientConfig
from gateway.models import load_model
from gateway.validation import FeatureScale, feature_scale
from gateway.zoo import ensure_model

Array = npt.NDArray[Any]

BATCH_ROWS = 64
N_KEYS = 10
MODEL_DIR = Path("/tmp/modelgate-region-sim-models")
_DEFAULTS = CrossClientConfig()
MIN_CLIENT_SHARE = [_DEFAULTS.region_min_client_share]


@dataclass(frozen=True)
class Setup:
    """One model as a worker sees it."""

    task: ModelTask
    scale: FeatureScale
    reference: Array
    ood_params: dict[str, Any]


@cache
def setup(name: str, calibrated: bool = True) -> Setup:
    ensure_model(MODEL_DIR, name)
    model = load_model(MODEL_DIR, name)
    task = build_task(name, model, 0, Budgets().probing_targets)
    scale = feature_scale(model.signature, model.reference)
    reference = scale.apply(model.reference)
    params: dict[str, Any] = {}
    if calibrated:
        found = calibrate(lambda o: build_detectors(o, seed=0), {}, reference)
        params = dict(found.params.get("ood", {}))
    return Setup(task=task, scale=scale, reference=reference, ood_params=params)


REGION_PARAMS: dict[str, Any] = {
    "n_components": _DEFAULTS.region_components,
    "cell_sd": _DEFAULTS.region_cell_sd,
    "rare_share": _DEFAULTS.region_rare_share,
}
"""The gateway's defaults; ``_main`` may override them for a sweep."""


def region_map(s: Setup) -> RegionMap:
    return RegionMap(**REGION_PARAMS).fit(s.reference)


def honest_streams(
    s: Setup, n_keys: int, queries: tuple[int, int], seed: int
) -> dict[str, Array]:
    """Each honest key's raw rows, in order (evaluation habits)."""
    rng = np.random.default_rng([seed, n_keys])
    spans = tuple(float(v) for v in np.ptp(s.task.replay, axis=0))
    out: dict[str, Array] = {}
    for k in range(n_keys):
        habits = draw_habits(1, rng, s.task.clip, feature_spans=spans)[0]
        rows = s.task.replay[rng.permutation(len(s.task.replay))]
        n = int(rng.integers(queries[0], queries[1] + 1))
        out[f"honest-{k}"] = query_stream(rows, habits, n, rng)
    return out


def attack_rows(s: Setup, attack: str, seed: int = 0) -> Array:
    """Every row ``attack`` asks the real model, in order, unhindered."""
    asked: list[Array] = []
    oracle = DirectOracle(s.task.model.predict_proba, 10**6, n_classes=s.task.n_classes)

    def query(rows: Array) -> Array:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        asked.append(rows)
        return oracle(rows)

    run_attack(attack, query, s.task, Budgets(), seed)
    return np.concatenate(asked) if asked else np.zeros((0, s.task.n_features))


@dataclass
class Outcome:
    """What one replay found."""

    honest_pairs_reported: int = 0
    honest_max_reports: int = 0
    honest_links: int = 0
    honest_counted_rows: int = 0
    honest_rows: int = 0
    regions_stored: int = 0
    entries_stored: int = 0
    attack_rows: int = 0
    attack_counted_rows: int = 0
    attack_links: int = 0
    attack_honest_links: int = 0
    # Queries per attack key (its own rows so far) when its first link was
    # made, and when all attack keys were one group (0: never).
    first_link_at: int = 0
    one_group_at: int = 0
    largest_attack_group: int = 0
    pair_reports: dict[tuple[str, str], int] = field(default_factory=dict)


def replay(
    s: Setup,
    honest: dict[str, Array],
    attack: Array | None = None,
    *,
    min_shared: int = _DEFAULTS.region_min_shared,
    seed: int = 0,
) -> Outcome:
    """Interleave honest keys and an attack spread over ``N_KEYS`` keys (rows
    round-robin), score them in batches, and count region reports."""
    rng = np.random.default_rng([seed, 7])
    ood = OutOfDistributionDetector(OodParams(**s.ood_params), seed=0)
    ood.learn_baseline(s.reference)
    regions = region_map(s)
    store = InMemoryRegionStore(
        ttl_s=_DEFAULTS.link_window_s, entries_per_region=_DEFAULTS.region_entries
    )
    links = KeyLinks(min_shared=min_shared, window_s=_DEFAULTS.link_window_s)

    # Arrival order: each key's rows in its own order, keys shuffled together
    # so every key is spread over the whole replay.
    streams: dict[str, Array] = dict(honest)
    if attack is not None:
        for k in range(N_KEYS):
            streams[f"thief-{k}"] = attack[k::N_KEYS]
    owners = np.concatenate(
        [np.full(len(rows), i) for i, rows in enumerate(streams.values())]
    )
    rng.shuffle(owners)
    names = list(streams)
    cursor = [0] * len(names)
    order: list[tuple[str, Array]] = []
    for i in owners.tolist():
        order.append((names[i], streams[names[i]][cursor[i]]))
        cursor[i] += 1

    out = Outcome()
    reports: dict[tuple[str, str], int] = {}
    sent: dict[str, int] = {}
    thieves = [f"thief-{k}" for k in range(N_KEYS)]
    for start in range(0, len(order), BATCH_ROWS):
        batch = order[start : start + BATCH_ROWS]
        ids = [c for c, _ in batch]
        for c in ids:
            sent[c] = sent.get(c, 0) + 1
        X = s.scale.apply(np.vstack([r for _, r in batch]))
        ood.score_batch(ids, X)
        rows = np.flatnonzero(ood.last_outliers)
        if rows.size:
            ids_out = regions.region_ids(X[rows])
            rare = regions.rare(ids_out) & (
                ood.last_window_share[rows] >= MIN_CLIENT_SHARE[0]
            )
            counted = rows[rare]
            clients = [ids[r] for r in counted.tolist()]
            for c in clients:
                if c.startswith("thief"):
                    out.attack_counted_rows += 1
                else:
                    out.honest_counted_rows += 1
            found = store.observe(clients, ids_out[rare], 0.0)
            batch_reports = region_reports(clients, found)
            for (a, b), n in batch_reports.items():
                pair = (a, b) if a < b else (b, a)
                reports[pair] = reports.get(pair, 0) + n
            new = links.observe(((a, b, n) for (a, b), n in batch_reports.items()), 0.0)
            if attack is not None and new:
                per_key = max(sent.get(t, 0) for t in thieves)
                if not out.first_link_at and any(
                    a.startswith("thief") and b.startswith("thief") for a, b in new
                ):
                    out.first_link_at = per_key
                if not out.one_group_at and len(links.members(thieves[0])) >= N_KEYS:
                    group = set(links.members(thieves[0]))
                    if set(thieves) <= group:
                        out.one_group_at = per_key

    honest_pairs = {
        p: n for p, n in reports.items() if not _thief(p[0]) and not _thief(p[1])
    }
    out.honest_pairs_reported = len(honest_pairs)
    out.honest_max_reports = max(honest_pairs.values(), default=0)
    live = links.links()
    out.honest_links = sum(not _thief(a) and not _thief(b) for a, b in live)
    out.attack_links = sum(_thief(a) and _thief(b) for a, b in live)
    out.attack_honest_links = sum(_thief(a) != _thief(b) for a, b in live)
    out.honest_rows = sum(len(r) for r in honest.values())
    out.attack_rows = 0 if attack is None else len(attack)
    out.regions_stored = len(store)
    out.entries_stored = store.entries()
    out.largest_attack_group = (
        max((sum(_thief(m) for m in links.members(t)) for t in thieves), default=0)
        if attack is not None
        else 0
    )
    out.pair_reports = reports
    return out


def _thief(name: str) -> bool:
    return name.startswith("thief")


ATTACKS: dict[str, tuple[str, ...]] = {
    "digits": ("papernot", "knockoff", "random", "hopskipjump", "boundary", "active"),
    "breast_cancer": ("equation", "random", "hopskipjump", "active"),
    "phishing": ("equation", "random", "hopskipjump", "active"),
}


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(ATTACKS))
    parser.add_argument("--no-calibrate", action="store_true")
    parser.add_argument("--min-shared", type=int, default=_DEFAULTS.region_min_shared)
    parser.add_argument("--heavy", action="store_true", help="100 keys x 1,000")
    parser.add_argument("--components", type=int)
    parser.add_argument("--cell-sd", type=float)
    parser.add_argument("--rare-share", type=float)
    parser.add_argument("--attacks", nargs="*")
    parser.add_argument("--min-client-share", type=float)
    args = parser.parse_args()
    for arg, key in (
        ("components", "n_components"),
        ("cell_sd", "cell_sd"),
        ("rare_share", "rare_share"),
    ):
        if getattr(args, arg) is not None:
            REGION_PARAMS[key] = getattr(args, arg)
    if args.min_client_share is not None:
        MIN_CLIENT_SHARE[0] = args.min_client_share
    print(
        f"region map {REGION_PARAMS}, min_shared {args.min_shared}, "
        f"min client share {MIN_CLIENT_SHARE[0]}"
    )
    for name in args.models:
        started = time.perf_counter()
        s = setup(name, not args.no_calibrate)
        regions = region_map(s)
        print(
            f"== {name}: {s.reference.shape[0]} reference rows, "
            f"{regions.regions_in_reference} regions in the reference; "
            f"ood params {s.ood_params} ({time.perf_counter() - started:.0f} s)"
        )
        honest = honest_streams(s, 60, (300, 600), seed=1)
        base = replay(s, honest, min_shared=args.min_shared)
        _print_honest("60 honest keys x 300-600", base)
        if args.heavy:
            heavy = replay(
                s,
                honest_streams(s, 100, (1000, 1000), seed=2),
                min_shared=args.min_shared,
            )
            _print_honest("100 honest keys x 1,000", heavy)
        for attack in args.attacks or ATTACKS[name]:
            rows = attack_rows(s, attack)
            found = replay(s, honest, rows, min_shared=args.min_shared)
            print(
                f"  {attack:12s} rows {found.attack_rows:5d} counted "
                f"{found.attack_counted_rows:5d}; thief links {found.attack_links:2d}, "
                f"largest thief group {found.largest_attack_group:2d}/{N_KEYS}; "
                f"first link at {found.first_link_at} queries/key, one group at "
                f"{found.one_group_at or '-'}; thief-honest links "
                f"{found.attack_honest_links}, honest links {found.honest_links}"
            )


def _print_honest(label: str, found: Outcome) -> None:
    print(
        f"  {label}: {found.honest_rows} rows, {found.honest_counted_rows} counted "
        f"({found.honest_counted_rows / max(found.honest_rows, 1):.2%}); pairs with "
        f"reports {found.honest_pairs_reported}, most reports of a pair "
        f"{found.honest_max_reports}, links {found.honest_links}; store "
        f"{found.regions_stored} regions, {found.entries_stored} entries"
    )


if __name__ == "__main__":
    _main()
