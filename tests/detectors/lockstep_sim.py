"""Offline measurement of lockstep links, for ``docs/lockstep-links.md``.

Not a test module: ``python -m tests.detectors.lockstep_sim`` prints the
measurements quoted in the doc (``--stress`` adds the 5,000-key population,
about a minute more). Nothing here is used by the gateway.

The question: can a worker link API keys that start, pause and resume
together (one program retraining between rounds, spread over several keys)
early enough, and without linking honest keys? What is replayed:

- the thief: the evaluation's own active-learning attack on ``digits``
  (``evaluation.scenarios.run_attack``, seed 0, default budgets) through
  :class:`evaluation.attacks.distributed.SpreadOracle` over 10 keys. Each
  key's requests are timed as ``evaluation.oracle.GatewayOracle`` with Poisson
  arrivals times them (one :class:`evaluation.oracle.Pacer`-like schedule per
  key at 4 requests per second, the evaluation's 40 per second over 10 keys;
  a round's first row goes at once unless the key's next slot is later),
  on a virtual clock that advances by the pacing and by the *measured* time
  the attack spends retraining its surrogate between rounds on this machine;
- honest keys: ``evaluation.benign`` profiles and plans with the full
  evaluation's settings (median 1.5 requests per second, 300 to 600 queries,
  bursts, pauses, a third of clients retrying 3% of queries);
- machine clients that wait for each answer (closed loop), for the global
  pause: the gateway stalls 1 to 5 s, every answer due in the stall comes at
  its end, and such clients resume together;
- a worker restart (state lost mid-run), 50 and 500 honest keys starting
  within the same 0.25 s, and a 5,000-key population.

Timestamps are the requests' Kafka record times (the client's clock), which
a worker reads as ``BatchItem.arrived_s``; answers are the worker's reply
times. Latency is lognormal around 20 ms.

The rule measured (:class:`CohortLinks`) is the best of those tried in the
session: a *resumption* is a request after the key's own silence of at least
``min_silence_s``, at least ``min_idle_s`` after its last answer (so a client
that was waiting for us does not count) and while at least ``flow_min``
other requests arrived in the last second of the silence (so a global pause
does not count); a *start* is a key's first request once the worker has run
``warm_s``. Resumptions (and starts) within ``delta_s`` of the first form a
cluster; a cluster counts when it has at least ``min_size`` keys and a
Poisson count at the recent rate of such events would reach its size with
probability at most ``alpha``. A pair of keys is linked once it shared
``min_clusters`` counted clusters.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from evaluation.attacks.distributed import SpreadOracle
from evaluation.benign import arrival_plan, draw_profiles
from evaluation.ledger import ClientLedger
from evaluation.oracle import GatewayOracle
from evaluation.scenarios import Budgets, run_attack
from gateway.client import GatewayClient
from gateway.protocol import InferResponse, Tensor
from tests.detectors.region_sim import setup

Array = npt.NDArray[Any]
Event = tuple[float, str, float]
"""(request time s, key, answer time s)."""

N_KEYS = 10
THIEF_RATE_PER_S = 40.0  # the evaluation: min(40, 0.8 x the 50/s rate limit)
THIEF = "thief-"


def _latency_s(rng: np.random.Generator) -> float:
    return float(rng.lognormal(math.log(0.02), 0.5))


# -- the thief -----------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0
        self.finish_s = 0.0
        self.lock = threading.Lock()


class _KeyOracle:
    """One key: Poisson pacing on the shared virtual clock, real answers."""

    def __init__(self, clock: _Clock, predict: Any, seed: int, key: int) -> None:
        self._clock = clock
        self._predict = predict
        self._rng = np.random.default_rng([seed, key])
        self._next_s = 0.0
        self.sends: list[float] = []

    def __call__(self, rows: Array) -> Array:
        start_s = self._clock.now_s
        done_s = start_s
        for _ in range(len(rows)):
            # Ten threads on one event loop send a round's first rows within
            # a couple of milliseconds of each other.
            slot_s = max(start_s + 0.002 * float(self._rng.random()), self._next_s)
            self._next_s = slot_s + float(
                self._rng.exponential(N_KEYS / THIEF_RATE_PER_S)
            )
            self.sends.append(slot_s)
            done_s = max(done_s, slot_s + _latency_s(self._rng))
        with self._clock.lock:
            self._clock.finish_s = max(self._clock.finish_s, done_s)
        return np.asarray(self._predict(rows), dtype=np.float32)


@dataclass
class ThiefRun:
    """One recorded thief: send times per key and retraining times."""

    sends: dict[str, list[float]]
    compute_s: list[float]
    curve: list[tuple[int, float]]


def record_thief(seed: int, slowdown: float = 1.0) -> ThiefRun:
    """Run the 10-key active-learning thief on a virtual clock (see module);
    ``slowdown`` multiplies the measured retraining times (a loaded machine)."""
    task = setup("digits", calibrated=False).task
    clock = _Clock()
    keys = [_KeyOracle(clock, task.model.predict_proba, seed, k) for k in range(N_KEYS)]
    spread = SpreadOracle(keys, budget=600, seed=0, n_classes=task.n_classes)
    compute_s: list[float] = []
    mark = [time.monotonic()]

    def query(rows: Array) -> Array:
        spent_s = (time.monotonic() - mark[0]) * slowdown
        compute_s.append(spent_s)
        clock.now_s += spent_s
        clock.finish_s = clock.now_s
        out = spread(rows)
        clock.now_s = clock.finish_s
        mark[0] = time.monotonic()
        return out

    outcome = run_attack("active", query, task, Budgets(), seed)
    spread.close()
    return ThiefRun(
        sends={f"{THIEF}{k}": key.sends for k, key in enumerate(keys)},
        compute_s=compute_s[1:],
        curve=[(int(q), float(a)) for q, a in outcome["curve"]],
    )


class _StandInClient:
    """Notes when each request leaves and answers from the model about 20 ms
    later: the real oracle's threads and pacing without Kafka."""

    def __init__(self, client_id: str, predict: Any, rng: np.random.Generator):
        self.client_id = client_id
        self._predict = predict
        self._rng = rng
        self.sends: list[float] = []

    async def infer(
        self, rows: Array, *, request_id: str, timeout_s: float
    ) -> InferResponse:
        self.sends.append(time.time())
        await asyncio.sleep(_latency_s(self._rng))
        proba = np.asarray(self._predict(rows), dtype=np.float32)
        return InferResponse(
            v=1,
            request_id=request_id,
            status="ok",
            ts_ms=0,
            outputs=[
                Tensor(
                    name="probabilities",
                    shape=list(proba.shape),
                    datatype="FP32",
                    data=proba.ravel().tolist(),
                )
            ],
        )


def real_thread_spread(seed: int) -> tuple[float, list[tuple[int, int, float]]]:
    """The thief through the real ``GatewayOracle``s (Poisson pacing, 8 in
    flight) under ``SpreadOracle``, each with a :class:`_StandInClient`.

    Returns the spread of the 10 keys' first requests (ms) and, per cluster
    of at least 5 keys resuming after 0.1 s or more within 10 ms of each
    other, (total query, keys, spread in ms).
    """
    task = setup("digits", calibrated=False).task
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    clients = [
        _StandInClient(
            f"{THIEF}{k}", task.model.predict_proba, np.random.default_rng([seed, k])
        )
        for k in range(N_KEYS)
    ]
    ledger = ClientLedger("lockstep", "active/distributed")
    oracles = [
        GatewayOracle(
            cast(GatewayClient, client),
            ledger,
            loop,
            budget=600,
            rate_per_s=THIEF_RATE_PER_S / N_KEYS,
            concurrency=8,
            n_classes=task.n_classes,
            arrival_rng=np.random.default_rng([seed, 100 + k]),
        )
        for k, client in enumerate(clients)
    ]
    spread = SpreadOracle(oracles, budget=600, seed=0, n_classes=task.n_classes)
    try:
        run_attack("active", spread, task, Budgets(), seed)
    finally:
        spread.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    firsts = [c.sends[0] for c in clients]
    events = sorted((t, c.client_id) for c in clients for t in c.sends)
    last: dict[str, float] = {}
    clusters: list[list[tuple[float, int]]] = []
    for query, (at_s, key) in enumerate(events, 1):
        if key in last and at_s - last[key] > 0.1:
            if clusters and at_s - clusters[-1][-1][0] <= 0.010:
                clusters[-1].append((at_s, query))
            else:
                clusters.append([(at_s, query)])
        last[key] = at_s
    return 1000 * (max(firsts) - min(firsts)), [
        (c[0][1], len(c), round(1000 * (c[-1][0] - c[0][0]), 1))
        for c in clusters
        if len(c) >= 5
    ]


def thief_events(run: ThiefRun, t0_s: float, rng: np.random.Generator) -> list[Event]:
    return [
        (t0_s + t, key, t0_s + t + _latency_s(rng))
        for key, times in run.sends.items()
        for t in times
    ]


# -- honest keys ---------------------------------------------------------------


def honest_events(
    n: int,
    rng: np.random.Generator,
    *,
    prefix: str = "h",
    spread_s: float = 10.0,
    t0_s: float = 0.0,
    horizon_s: float | None = None,
    starts_s: list[float] | None = None,
) -> list[Event]:
    """Open-loop honest keys with the full evaluation's habits."""
    profiles = draw_profiles(
        n,
        rng,
        queries=(300, 600),
        spread_s=spread_s,
        median_rate_per_s=1.5,
        rate_bounds=(0.3, 10.0),
    )
    out: list[Event] = []
    for i, profile in enumerate(profiles):
        start_s = t0_s + (profile.start_delay_s if starts_s is None else starts_s[i])
        retries = rng.random() < 1 / 3
        for at_s, _size in arrival_plan(profile, rng):
            t = start_s + at_s
            if horizon_s is not None and t > horizon_s:
                break
            out.append((t, f"{prefix}{i}", t + _latency_s(rng)))
            if retries and rng.random() < 0.03:
                again = t + _latency_s(rng) + float(rng.uniform(0.05, 0.5))
                out.append((again, f"{prefix}{i}", again + _latency_s(rng)))
    return out


def closed_loop_events(
    n: int,
    rng: np.random.Generator,
    end_s: float,
    stalls: list[tuple[float, float]],
    *,
    think: str = "zero",
    prefix: str = "c",
) -> list[Event]:
    """Clients that send their next request once answered; an answer due in
    a stall ``(start_s, length_s)`` comes at the stall's end. ``think`` zero:
    1-3 ms later (a script, the worst case); ``exp``: after an exponential
    wait at the client's own rate."""
    out: list[Event] = []
    for i in range(n):
        t = float(rng.uniform(0, 10))
        rate = float(np.clip(rng.lognormal(math.log(1.5), 0.45), 0.3, 10.0))
        while t < end_s:
            answer_s = t + _latency_s(rng)
            for stall_s, length_s in stalls:
                if stall_s <= answer_s and t < stall_s + length_s:
                    answer_s = stall_s + length_s + 0.2 * _latency_s(rng)
            out.append((t, f"{prefix}{i}", answer_s))
            wait_s = (
                0.001 + 0.002 * float(rng.random())
                if think == "zero"
                else float(rng.exponential(1 / rate))
            )
            t = answer_s + wait_s
    return out


# -- the rule --------------------------------------------------------------------


def poisson_tail(k: int, mu: float) -> float:
    """P(N >= k) for N ~ Poisson(mu)."""
    if k <= 0:
        return 1.0
    if mu <= 0:
        return 0.0
    term = math.exp(-mu)
    cdf = term
    for i in range(1, k):
        term *= mu / i
        cdf += term
    if cdf < 1 - 1e-12:
        return 1.0 - cdf
    # The complement underflows: the first term of the tail is close enough.
    return math.exp(k * math.log(mu) - mu - math.lgamma(k + 1))


class CohortLinks:
    """The rule of the module docstring, per worker, fed in time order.

    Clusters chain events at most ``delta_s`` apart and span at most
    ``3 * delta_s``. A counted start cluster is a *cohort*; a counted
    resumption cluster within ``confirm_window_s`` that holds at least
    ``confirm_share`` of a cohort (and ``min_size`` keys) links every member
    of the cohort, those that did not resume with the others included (a
    key whose next paced request was due later). ``min_clusters`` set also
    links any pair that shared that many counted clusters of either kind.

    Unbounded (a measurement, not the gateway's state): ``last`` and
    ``answered`` keep every key seen.
    """

    def __init__(
        self,
        *,
        delta_s: float = 0.010,
        min_silence_s: float = 0.25,
        min_idle_s: float = 0.05,
        flow_min: int = 3,
        warm_s: float = 30.0,
        min_size: int = 4,
        alpha: float = 1e-6,
        confirm_share: float = 0.5,
        confirm_window_s: float = 120.0,
        min_clusters: int | None = None,
        rate_window_s: float = 60.0,
    ) -> None:
        self.delta_s = delta_s
        self.min_silence_s = min_silence_s
        self.min_idle_s = min_idle_s
        self.flow_min = flow_min
        self.warm_s = warm_s
        self.min_size = min_size
        self.alpha = alpha
        self.confirm_share = confirm_share
        self.confirm_window_s = confirm_window_s
        self.min_clusters = min_clusters
        self.rate_window_s = rate_window_s
        self.last: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.t0_s: float | None = None
        self._times: list[float] = []
        self._from = 0
        self._history: dict[str, deque[float]] = {"s": deque(), "r": deque()}
        # kind -> [first s, last s, members] of the cluster being built
        self._open: dict[str, tuple[float, float, set[str]] | None] = {
            "s": None,
            "r": None,
        }
        self._cohorts: deque[tuple[float, frozenset[str]]] = deque()
        self.shared: dict[tuple[str, str], int] = defaultdict(int)
        self.links: set[tuple[str, str]] = set()

    def answer(self, key: str, at_s: float) -> None:
        self.answered[key] = at_s

    def _flow(self, low_s: float, high_s: float) -> int:
        times = self._times
        return bisect.bisect_left(times, high_s, self._from) - bisect.bisect_left(
            times, low_s, self._from
        )

    def _counted(self, kind: str, first_s: float, last_s: float, size: int) -> bool:
        """Whether a cluster is unlikely at the recent rate of such events."""
        assert self.t0_s is not None
        history = self._history[kind]
        while history and history[0] < first_s - self.rate_window_s:
            history.popleft()
        span_s = max(first_s - max(self.t0_s, first_s - self.rate_window_s), 1.0)
        before = sum(1 for x in history if x < first_s)
        rate = before / span_s + 1 / self.rate_window_s
        # A long window lags a surge (a fleet starting, a rebalance): the last
        # second's rate too, whichever is larger.
        rate = max(rate, sum(1 for x in history if first_s - 1.0 <= x < first_s))
        expected = rate * (last_s - first_s + self.delta_s)
        return size >= self.min_size and poisson_tail(size, expected) <= self.alpha

    def _link(self, members: Iterable[str]) -> list[tuple[str, str]]:
        ordered = sorted(members)
        new = [
            (a, b)
            for i, a in enumerate(ordered)
            for b in ordered[i + 1 :]
            if (a, b) not in self.links
        ]
        self.links.update(new)
        return new

    def _close(self, kind: str) -> list[tuple[str, str]]:
        cluster = self._open[kind]
        self._open[kind] = None
        if cluster is None:
            return []
        first_s, last_s, members = cluster
        if not self._counted(kind, first_s, last_s, len(members)):
            return []
        new: list[tuple[str, str]] = []
        if kind == "s":
            self._cohorts.append((first_s, frozenset(members)))
        else:
            while self._cohorts and self._cohorts[0][0] < (
                first_s - self.confirm_window_s
            ):
                self._cohorts.popleft()
            for _, cohort in self._cohorts:
                both = cohort & members
                if len(both) >= max(
                    self.min_size, math.ceil(self.confirm_share * len(cohort))
                ):
                    new += self._link(cohort)
        if self.min_clusters is not None:
            ordered = sorted(members)
            for i, a in enumerate(ordered):
                for b in ordered[i + 1 :]:
                    self.shared[(a, b)] += 1
                    if self.shared[(a, b)] >= self.min_clusters:
                        new += self._link((a, b))
        return new

    def arrive(self, key: str, at_s: float) -> list[tuple[str, str]]:
        """One request; returns the pairs it linked."""
        if self.t0_s is None:
            self.t0_s = at_s
        self._from = bisect.bisect_left(self._times, at_s - 2.0, self._from)
        new: list[tuple[str, str]] = []
        for kind, cluster in list(self._open.items()):
            if cluster is not None and (
                at_s - cluster[1] > self.delta_s or at_s - cluster[0] > 3 * self.delta_s
            ):
                new += self._close(kind)
        kind = ""
        previous = self.last.get(key)
        if previous is None:
            if at_s - self.t0_s >= self.warm_s:
                kind = "s"
        else:
            silence_s = at_s - previous
            idle_s = at_s - max(previous, self.answered.get(key, previous))
            if (
                silence_s >= self.min_silence_s
                and idle_s >= self.min_idle_s
                and self._flow(at_s - min(silence_s, 1.0), at_s) >= self.flow_min
            ):
                kind = "r"
        if kind:
            self._history[kind].append(at_s)
            cluster = self._open[kind]
            if cluster is None:
                self._open[kind] = (at_s, at_s, {key})
            else:
                cluster[2].add(key)
                self._open[kind] = (cluster[0], at_s, cluster[2])
        self.last[key] = at_s
        self._times.append(at_s)
        return new


def _groups(links: Iterable[tuple[str, str]]) -> list[set[str]]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    pairs = list(links)
    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    out: dict[str, set[str]] = defaultdict(set)
    for a, b in pairs:
        out[find(a)] |= {a, b}
    return list(out.values())


@dataclass
class Outcome:
    """What one replay linked. ``*_at`` are the thief's total queries (all
    keys together) when it happened; None: never."""

    first_thief_link_at: int | None = None
    all_ten_at: int | None = None
    honest_links: int = 0
    honest_in_thief_group: int = 0
    requests: int = 0


def replay(
    events: list[Event], rule: CohortLinks, *, from_s: float | None = None
) -> Outcome:
    """Feed requests and answers in time order (``from_s``: a worker started
    then, with no state)."""
    stream: list[tuple[float, int, str]] = []
    for at_s, key, answer_s in events:
        if from_s is not None and at_s < from_s:
            continue
        stream.append((at_s, 0, key))
        stream.append((answer_s, 1, key))
    stream.sort()
    out = Outcome()
    thief_queries = 0
    for at_s, what, key in stream:
        if what == 1:
            rule.answer(key, at_s)
            continue
        out.requests += 1
        thief_queries += key.startswith(THIEF)
        new = rule.arrive(key, at_s)
        if not any(a.startswith(THIEF) or b.startswith(THIEF) for a, b in new):
            continue
        if out.first_thief_link_at is None:
            out.first_thief_link_at = thief_queries
        if out.all_ten_at is None and any(
            sum(m.startswith(THIEF) for m in group) == N_KEYS
            for group in _groups(rule.links)
        ):
            out.all_ten_at = thief_queries
    out.honest_links = sum(
        1 for a, b in rule.links if not a.startswith(THIEF) and not b.startswith(THIEF)
    )
    out.honest_in_thief_group = sum(
        sum(not m.startswith(THIEF) for m in group)
        for group in _groups(rule.links)
        if any(m.startswith(THIEF) for m in group)
    )
    return out


def framing_events(rng: np.random.Generator) -> list[Event]:
    """An honest key whose first request comes at a known instant (a job
    started on the hour), and a framer who starts 9 keys within 3 ms of it,
    then sends from all 9 at once every 5 s (the framer's keys are named
    ``thief-`` so that the replay counts the honest key as pulled in)."""
    out = honest_events(60, rng, horizon_s=200.0)
    t = 60.0
    while t < 200.0:
        out.append((t, "h-cron", t + _latency_s(rng)))
        t += float(rng.exponential(1.0))
    for k in range(9):
        start_s = 60.0 + float(rng.uniform(-0.003, 0.003))
        out.append((start_s, f"{THIEF}{k}", start_s + _latency_s(rng)))
        for burst_s in np.arange(65.0, 200.0, 5.0):
            at_s = float(burst_s) + float(rng.uniform(0, 0.002))
            out.append((at_s, f"{THIEF}{k}", at_s + _latency_s(rng)))
    return out


def _show(label: str, found: Outcome) -> None:
    print(
        f"{label}: thief one group at {found.all_ten_at} "
        f"(first link {found.first_thief_link_at}), honest links "
        f"{found.honest_links}, honest keys in the thief's group "
        f"{found.honest_in_thief_group}, requests {found.requests}"
    )


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stress", action="store_true", help="add 5,000 keys")
    parser.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        help="multiply the measured retraining times (a loaded machine)",
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="only time the real oracle threads (stand-in client, 3 seeds)",
    )
    args = parser.parse_args()

    if args.threads:
        for seed in range(3):
            start_ms, clusters = real_thread_spread(seed)
            print(
                f"seed {seed}: first requests within {start_ms:.1f} ms; "
                "resumptions (query, keys, ms):",
                clusters,
            )
        return
    thieves = [record_thief(seed, args.slowdown) for seed in range(3)]
    for seed, run in enumerate(thieves):
        print(
            f"thief seed {seed}: retraining s",
            [round(s, 3) for s in run.compute_s],
            "curve",
            run.curve,
        )
    for seed, run in enumerate(thieves):
        for honest in range(3):
            rng = np.random.default_rng([honest, seed])
            events = honest_events(60, rng) + thief_events(run, 40.0, rng)
            _show(f"60 honest + thief {seed}/{honest}", replay(events, CohortLinks()))
            _show(
                "  with pairs after 2 clusters",
                replay(events, CohortLinks(min_clusters=2)),
            )
            for restart_s in (20.0, 45.0):
                _show(
                    f"  worker restart at {restart_s} s",
                    replay(events, CohortLinks(), from_s=restart_s),
                )
    for length_s in (1.0, 3.0, 5.0):
        for think in ("zero", "exp"):
            rng = np.random.default_rng([int(length_s), len(think)])
            stalls = [(100.0, length_s), (130.0, length_s), (160.0, length_s)]
            events = honest_events(60, rng, horizon_s=200.0) + closed_loop_events(
                30, rng, 200.0, stalls, think=think
            )
            for idle_s in (0.05, 0.0):
                _show(
                    f"3 stalls of {length_s} s, closed loop {think}, "
                    f"min_idle_s {idle_s}",
                    replay(events, CohortLinks(min_idle_s=idle_s, min_clusters=2)),
                )
    for seed in range(5):
        rng = np.random.default_rng([13, seed])
        for n in (50, 500):
            starts = [float(x) for x in rng.uniform(0, 0.25, n)]
            events = honest_events(
                n, rng, t0_s=60.0, starts_s=starts, horizon_s=200.0
            ) + honest_events(60, rng, prefix="o", horizon_s=200.0)
            _show(
                f"{n} keys starting within 0.25 s ({seed})",
                replay(events, CohortLinks()),
            )
            _show(
                "  with pairs after 2 clusters",
                replay(events, CohortLinks(min_clusters=2)),
            )
    for seed in range(3):
        rng = np.random.default_rng([17, seed])
        _show(
            f"framing a key with a known start ({seed})",
            replay(framing_events(rng), CohortLinks()),
        )
    if args.stress:
        for seed, run in enumerate(thieves[:2]):
            rng = np.random.default_rng([7, seed])
            events = honest_events(
                5000, rng, spread_s=30.0, horizon_s=130.0
            ) + thief_events(run, 60.0, rng)
            _show(f"5,000 honest + thief {seed}", replay(events, CohortLinks()))


if __name__ == "__main__":
    _main()
