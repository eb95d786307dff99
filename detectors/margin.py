"""Margin detector: a client whose answers sit on the decision boundary.

Active-learning thieves (uncertainty sampling, Papernot-style Jacobian
augmentation, boundary walks) choose queries the model is unsure about,
because those teach a substitute the most. Honest inputs are mostly far from
the boundary, so the model answers them with a clear winner. This detector
counts, over each client's last ``window`` answers, the share that are
*uncertain* (top-1 minus top-2 probability below ``margin_at``, or normalised
entropy above ``entropy_at``) and compares it with the share among honest
clients' answers.

A second statistic reads the order of the same answers. A pool-based
uncertainty sampler sends each round most-uncertain first, so the model's
confidence climbs along the round even when, as on natural data, the answers
are no more uncertain in total than an honest client's. Kendall's tau between
arrival order and margin over the window measures that climb; honest clients
send their data in an order unrelated to the model's confidence, so theirs
stays near 0 whatever the model.

A third reads the same order over each key's *first* answers only, once per
key, where a distributed attacker's keys spend their whole short life: the
Mann-Kendall trend test of the opening, alone at a strict level, or pooled
(Stouffer) over the keys that started in the same moment at the same pace,
the cohort one attacker spreading a stream over many keys forms.

A fourth uses every answer's margin rather than a cut: each answer's margin
is ranked among honest clients' answers (its mid-rank, the share of honest
margins below it plus half the share equal), and the client's decaying mean
rank is tested against the 0.5 honest answers average. An uncertainty sampler
on natural data whose picks the model still answers clearly, yet less
clearly than honest inputs, moves the mean rank while hardly moving the
uncertain share.

It needs the model's answers, so it learns in
:meth:`~detectors.base.Detector.observe_outputs` (after the model call) and
its score judges the client's next queries.

This module holds the detector: its per-client state, its honest baseline
and how the four statistics become one score with its evidence. The
statistics and their compiled loops are in :mod:`detectors._marginstats`
(the public ones re-exported here), the tests over young keys and their
cohorts in :mod:`detectors._margincohort`, the parameters in
:mod:`detectors._marginparams`. Imports numpy, those three modules,
:mod:`detectors._ring`, :mod:`detectors._state` and ``traffic``'s time
bound; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detectors._margincohort import (
    RankEvidence,
    opening_evidence,
    rank_evidence,
    rank_z,
)
from detectors._marginparams import RANK_HORIZON_MAX
from detectors._marginparams import MarginParams as MarginParams
from detectors._marginstats import confidence_trend as confidence_trend
from detectors._marginstats import mann_kendall as mann_kendall
from detectors._marginstats import mann_kendall_extend, rank_kernel
from detectors._marginstats import margins_and_entropy as margins_and_entropy
from detectors._marginstats import rank_table as rank_table
from detectors._ring import push_ring
from detectors._startorder import StartOrder
from detectors._state import (
    FieldSpec,
    SlotArena,
    check_counters,
    check_ring_counters,
    group_rows,
)
from detectors.base import Detector, DetectorScore, LiveBaseline
from detectors.baselines import BaselineRefused, check_fields, read_field
from detectors.traffic import MAX_TIME_S

logger = logging.getLogger(__name__)

_LEVELS = 255.0
"""Margins and entropies are kept per client as uint8 in [0, 255]."""


class MarginDetector(Detector[MarginParams]):
    """Excess share of uncertain answers among a client's last ``window``.

    With ``s`` the client's uncertain share and ``b`` the honest share (from
    the baseline of answers to the reference data and to clients in good
    standing), the share score is ``max(0, s - b) / (1 - b)``: 0 at or below
    honest behaviour, 1 when every answer is uncertain.

    The trend score is ``trend_weight * max(0, tau)``, with tau Kendall's
    rank correlation between arrival order and margin over the window once it
    holds ``trend_min_answers`` answers; the score is the larger of the two.
    Replaying the evaluation's active-learning attack and 60 honest streams
    per model (300 to 600 held-out rows each, with retries and near-duplicate
    runs) offline, the highest tau of any honest window was 0.42 (digits),
    0.39 (breast_cancer) and 0.49 (phishing); the attack reached 0.70 on
    breast_cancer (by its 80th query) and 0.78 on phishing, but only 0.27 on
    digits, whose MLP answers the surrogate's doubtful picks as confidently
    as any.

    Score: in [0, 1], higher is more suspicious. Warm once the client has had
    ``min_answers`` answers.

    When it is weak:

    - equation-solving and random-query thieves (Tramèr et al. 2016) do not
      aim at the boundary: on the demo digits pipeline only 13% of uniform
      random inputs get a margin under 0.2 (honest: 2%), a score of about
      0.06, so this detector does not see them; ``coverage`` and ``ood`` do;
    - a thief that mixes honest-looking queries into its stream dilutes the
      share (by the mixing ratio);
    - the honest share comes from the reference (training) data until honest
      traffic replaces it; training data sits further from the boundary than
      new data, so set ``threshold`` with ``modelgate calibrate``;
    - answers degraded by policy are still judged on the model's raw output,
      which is what the query's position tells;
    - the trend and the opening see only an attacker that sends each round
      in its ranked order: one that shuffles its rounds leaves them near 0,
      and one that spreads them over many keys is seen through its cohort
      only when the keys start together at one pace (each key alone has too
      few answers). An honest client whose data arrive sorted by something
      the model's confidence follows (hardest cases first, say) would climb
      too: raise ``opening_z`` and ``member_z``, or set ``cohort_window_s``
      to 0 where honest keys start in lockstep;
    - single-key active learning is seen no earlier than the window trend
      allows (query 84 in the evaluation): its opening is random pool rows;
      on digits, whose models answer its picks almost as clearly as any,
      only the rank test sees it, from about its 160th query.

    Opening score: with ``z`` the Mann-Kendall z of the key's first
    ``opening_answers`` answers (see :func:`mann_kendall`), counted from
    ``opening_min`` answers on and while the key has had at most ``window``,
    the score is ``threshold * z / opening_z`` (flagged at ``opening_z``).
    Cohort score: the same test over a key's first ``cohort_answers``
    (by default ``window``: its whole young life); a key whose own ``z``
    over them reaches ``member_z`` pools its S and variance with every key
    of this detector whose first scored query came within
    ``cohort_window_s`` of its own and whose answer count is within
    ``cohort_pace_share`` of its own; with at least ``cohort_min_keys`` keys,
    the score is ``threshold * z_pooled / cohort_z``. Membership depends on
    time and pace only, never on margins, so an honest cohort's pooled z is
    as honest as one key's. The assumption is that one attacker's
    keys start together and keep one pace and honest keys do not; a key
    that is staggered or paced apart is judged alone, and keys served by
    other workers are never pooled. Replayed offline, the evaluation's
    learner over 10 keys gives per-key opening z of 1.4 to 4.0 on
    breast_cancer (pooled about 9) and 4.2 to 5.7 on phishing; 0.3-0.4% of
    honest openings reach 4. On digits the learner spends its whole pool
    (449 rows, about 45 per key): each key's first 32 answers hardly climb
    (pooled z 1.3 to 4.2 over seeds 0-4, its second and third rounds being
    its least confident) but its first 40 do (pooled 6.4 to 8.4; all 45:
    9.3 to 10.9), hence the longer stretch for cohorts. Honest keys' trend
    z over 64 answers has a spread of 1.1 to 1.2 (near-duplicate runs
    correlate neighbours), and over 160,000 random groups of 3 to 10 honest
    keys pooled at every length from 10 to 64 answers none reached
    ``cohort_z`` with a member at ``member_z`` (highest pooled z 6.0).

    Rank score: with ``u`` each answer's mid-rank among the live honest
    answers' margins in the baseline (see :func:`rank_table`) and ``m`` the
    client's mean of ``u`` with weights decaying by ``1 - 1 / rank_horizon``
    per answer, ``z = (0.5 - m) / sqrt(var (1 / n_eff + 1 / n_base))`` with
    ``var`` the honest mid-rank variance, ``n_eff`` the effective number of
    answers and ``n_base`` the live honest answers ranked against;
    the score is ``threshold * z / rank_z``, counted once ``n_eff`` reaches
    ``rank_min_answers`` and only while the baseline holds at least
    ``rank_min_baseline`` answers from clients in good standing (answers to
    the reference sample are not used: training data is answered more
    confidently than new data). A row within ``rank_repeat_eps`` of the
    client's previous row is a re-send and is not ranked again: copies repeat
    their first answer, and counted as independent they spread honest z
    wide (the highest of 150 honest digits streams with 3 to 8 copy runs in
    5% of arrivals was 7.0 counted, about 3.5 without the copies).

    Measured offline, the evaluation's learner on its pool against honest
    replays of held-out digits: its highest z is 8.1 (seed 0) and 6.4 (seed
    2) on the digits MLP, 9.1 on the logistic regression; ranked with the
    worker's own calibrated detectors among 60 honest clients it crosses 5
    at about its 160th (seed 0) and 200th (seed 2) query. Over 300 honest
    replays (4 models, several seeds) the rank test flagged no one.

    Rank cohort: a young key (at most ``window`` answers) whose own rank z
    reaches ``rank_member_z`` sums its three rank sums with its cohort's
    (the same members as the openings' cohort: first query within
    ``cohort_window_s``, answer count within ``cohort_pace_share``); with at
    least ``cohort_min_keys`` keys and ``rank_min_answers`` effective
    answers pooled, the score is ``threshold * z_pooled / rank_z``: the
    pooled sums are one stream's, and membership never looks at the answers.
    The evaluation's learner over 10 keys on digits, replayed offline among
    40 honest clients, had 7 (seed 0) and 4 (seed 2) of its 10 keys flagged
    at their 16th to 23rd answer, and no honest client, measured with
    ``rank_member_z`` 2. At 3, through a real worker (seed 0, one run), the
    rank cohort raised no alert on that learner (2 at 2); ``traffic``
    stopped it at its 31st to 33rd query either way
    (docs/cohort-attacks.md).

    When the rank test is weak or wrong:

    - it assumes a client's queries are like the population's: an honest
      client whose data are really harder than most (a specialist sending
      only its ambiguous cases) ranks low and is flagged like a thief. Its
      cases are distinguishable from a thief's only by who it is: raise
      ``rank_z`` or turn ``rank_test`` off for such a population, or exempt
      the key;
    - only a re-send of the *previous* row is skipped: an honest client that
      interleaves re-sends of its doubtful inputs with other queries has
      them ranked again;
    - it is blind until the baseline holds ``rank_min_baseline`` answers of
      clients in good standing, learnt since the detector was made or
      imported (:meth:`import_baseline`; the gateway saves and loads it
      through Redis), and a client's answers before that are not ranked;
    - a thief that mixes honest-looking queries in dilutes the mean rank by
      the mixing ratio, and one that re-ranks its pool so that each round is
      as confident as honest traffic (giving up most of what uncertainty
      sampling buys) is not seen;
    - a learner's keys pool only when they start together at one pace and
      are served by one worker, as for the openings.

    Per-client state: two rings of ``window`` uint8 (margin and entropy),
    three counters, the opening's and the young stretch's S and variance,
    the first query's time, the rank test's three sums and the previous row
    at one byte per feature, 217 bytes plus one per feature at the default
    window (281 for digits).
    """

    name: ClassVar[str] = "margin"
    Params: ClassVar[type[MarginParams]] = MarginParams
    _mutable_params: ClassVar[frozenset[str]] = frozenset(
        {
            "margin_at",
            "entropy_at",
            "threshold",
            "min_answers",
            "trend_weight",
            "opening_z",
            "cohort_window_s",
            "cohort_pace_share",
            "cohort_min_keys",
            "cohort_z",
            "member_z",
            "rank_test",
            "rank_horizon",
            "rank_z",
            "rank_min_answers",
            "rank_member_z",
            "rank_repeat_eps",
            "rank_min_baseline",
        }
    )
    observes_outputs: ClassVar[bool] = True

    def __init__(self, params: MarginParams | None = None, *, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        size = self._params.baseline_size
        self._base_margin = np.zeros(size, dtype=np.float64)
        self._base_entropy = np.zeros(size, dtype=np.float64)
        self._base_pos = 0
        self._base_len = 0
        self._base_share: tuple[float, float, float] | None = None
        # How many of the newest baseline answers came from live traffic
        # (not the reference sample), and the rank table made from them.
        self._base_live = 0
        self._rank: tuple[npt.NDArray[np.float64], float] | None = None
        # Keys in order of first time, kept across batches for the cohort
        # look-ups; None scans and sorts per batch (the reference).
        self._start_order: StartOrder | None = StartOrder()

    @property
    def baseline_share(self) -> float | None:
        """Share of honest answers that are uncertain; None before any."""
        if self._base_len == 0:
            return None
        p = self._params
        cached = self._base_share
        if cached is None or cached[:2] != (p.margin_at, p.entropy_at):
            n = self._base_len
            uncertain = (self._base_margin[:n] < p.margin_at) | (
                self._base_entropy[:n] > p.entropy_at
            )
            cached = (p.margin_at, p.entropy_at, float(uncertain.mean()))
            self._base_share = cached
        return cached[2]

    def _layout(self, n_features: int) -> dict[str, FieldSpec]:
        window = self._params.window
        return {
            "margin": FieldSpec((window,), "u1"),
            "entropy": FieldSpec((window,), "u1"),
            "pos": FieldSpec((), "<i8"),
            "len": FieldSpec((), "<i8"),
            "n_answers": FieldSpec((), "<i8"),
            # The opening's Mann-Kendall S and variance (frozen once the key
            # has had opening_answers answers) and the wall-clock second of
            # its first scored query (0: none yet), for cohorts.
            "open_s": FieldSpec((), "<f8"),
            "open_v": FieldSpec((), "<f8"),
            # The same over the first cohort_answers answers, which a cohort
            # pools.
            "young_s": FieldSpec((), "<f8"),
            "young_v": FieldSpec((), "<f8"),
            "first_s": FieldSpec((), "<f8"),
            # The rank test's decaying sums: weights, squared weights, and
            # weighted ranks of the client's answers.
            "rank_w": FieldSpec((), "<f8"),
            "rank_w2": FieldSpec((), "<f8"),
            "rank_wu": FieldSpec((), "<f8"),
            # The client's previous row quantised to 1/255 per feature, so a
            # near-identical re-send is not ranked twice.
            "last_row": FieldSpec((n_features,), "u1"),
            "has_last": FieldSpec((), "u1"),
        }

    def _check_state(self, values: Mapping[str, npt.NDArray[Any]]) -> None:
        check_ring_counters(values, "margin", "pos", "len")
        check_counters(values, "n_answers")
        if int(values["n_answers"]) < int(values["len"]):
            raise ValueError("state field 'n_answers' is below 'len'")
        for name in (
            "open_s",
            "open_v",
            "young_s",
            "young_v",
            "first_s",
            "rank_w",
            "rank_w2",
            "rank_wu",
        ):
            if not np.isfinite(values[name]).all():
                raise ValueError(f"state field {name!r} is not finite")
        if float(values["open_v"]) < 0 or float(values["first_s"]) < 0:
            raise ValueError("state fields 'open_v' and 'first_s' must be >= 0")
        # As traffic and ood bound theirs: no record time is later, and one
        # asking key dated 1e308 made the cohort look-up sort every young
        # key between now and then.
        if float(values["first_s"]) > MAX_TIME_S:
            raise ValueError(f"state field 'first_s' is beyond {MAX_TIME_S:g} s")
        for stat, var in (("open_s", "open_v"), ("young_s", "young_v")):
            if float(values[var]) < 0:
                raise ValueError(f"state field {var!r} must be >= 0")
            if abs(float(values[stat])) > 0 and float(values[var]) == 0:
                raise ValueError(f"state field {stat!r} is set without {var!r}")
        if int(values["has_last"]) > 1:
            raise ValueError("state field 'has_last' must be 0 or 1")
        # Each weight is at most 1 and their sum at most the longest
        # horizon's 1 / (1 - decay); ranks lie in [0, 1].
        w = float(values["rank_w"])
        if not (
            0.0 <= w <= RANK_HORIZON_MAX
            and 0.0 <= float(values["rank_w2"]) <= w
            and 0.0 <= float(values["rank_wu"]) <= w
        ):
            raise ValueError("state fields 'rank_*' are beyond any stream's")
        # A key's sums are pooled with its cohort's, so they are bounded by
        # what its own answers give, not the longest stream's: one forged
        # key of 10 answers carried the ranks of 100,000 doubtful ones, or
        # the trend of 64 climbing ones, into an honest cohort. Each ranked
        # answer weighs at most 1, the newest exactly 1.
        answered = float(values["n_answers"])
        if w > answered or (w > 0.0 and min(w, float(values["rank_w2"])) < 1.0):
            raise ValueError("state fields 'rank_*' are beyond the key's answers")
        # S and its variance over at most `window` answers (the ring's width),
        # and at most the key's own, are bounded; a finite S beyond that
        # (1.7e308) made a cohort's pooled S overflow to NaN, and every batch
        # with a member raise.
        n = min(float(values["margin"].shape[0]), answered)
        for stat, var in (("open_s", "open_v"), ("young_s", "young_v")):
            if abs(float(values[stat])) > n * (n - 1.0) / 2.0:
                raise ValueError(f"state field {stat!r} is beyond any opening's")
            if float(values[var]) > n * (n - 1.0) * (2.0 * n + 5.0) / 18.0:
                raise ValueError(f"state field {var!r} is beyond any opening's")

    def _learn_baseline_rows(
        self,
        margin: npt.NDArray[np.float64],
        entropy: npt.NDArray[np.float64],
        *,
        live: bool,
    ) -> None:
        size = self._params.baseline_size
        margin, entropy = margin[-size:], entropy[-size:]
        at = (self._base_pos + np.arange(len(margin))) % size
        self._base_margin[at] = margin
        self._base_entropy[at] = entropy
        self._base_pos = int((self._base_pos + len(margin)) % size)
        self._base_len = min(self._base_len + len(margin), size)
        self._base_live = min(self._base_live + len(margin), size) if live else 0
        self._base_share = None
        self._rank = None

    def _learn_output_baseline(
        self, X: npt.NDArray[np.float64], proba: npt.NDArray[np.float64]
    ) -> None:
        self._learn_baseline_rows(*margins_and_entropy(proba), live=False)

    def _export_live(self) -> LiveBaseline:
        """The live honest answers' margins and entropies, oldest first."""
        size = self._params.baseline_size
        live = self._base_live
        newest_last = (self._base_pos - live + np.arange(live)) % size
        fields = {
            "margin": self._base_margin[newest_last].astype("<f8").tobytes(),
            "entropy": self._base_entropy[newest_last].astype("<f8").tobytes(),
        }
        return fields, live, live >= self._params.rank_min_baseline

    def _import_live(
        self, fields: Mapping[str, bytes], samples: int
    ) -> Callable[[], None]:
        size = self._params.baseline_size
        check_fields(fields, ("margin", "entropy"))
        if samples > size:
            raise BaselineRefused(
                "invalid",
                f"{self.name}: baseline of {samples} answers exceeds baseline_size "
                f"({size}); a structural parameter changed",
            )
        margin = read_field(fields, "margin", "<f8", length=samples)
        entropy = read_field(fields, "entropy", "<f8", length=samples)
        for name, values in (("margin", margin), ("entropy", entropy)):
            if len(values) and not (values.min() >= 0.0 and values.max() <= 1.0):
                raise BaselineRefused(
                    "invalid", f"{self.name}: baseline {name}s outside [0, 1]"
                )

        def apply() -> None:
            # Rebuild the ring oldest first: the reference sample's answers
            # still in it, then the imported live ones, then this detector's
            # own live ones (the newest); the newest baseline_size stay.
            n = self._base_len
            order = (self._base_pos - n + np.arange(n)) % size
            ref = n - self._base_live
            parts_m = (self._base_margin[order[:ref]], margin)
            parts_e = (self._base_entropy[order[:ref]], entropy)
            own_m = self._base_margin[order[ref:]]
            own_e = self._base_entropy[order[ref:]]
            all_m = np.concatenate([*parts_m, own_m])[-size:]
            all_e = np.concatenate([*parts_e, own_e])[-size:]
            self._base_margin[: len(all_m)] = all_m
            self._base_entropy[: len(all_e)] = all_e
            self._base_len = len(all_m)
            self._base_pos = len(all_m) % size
            self._base_live = min(self._base_live + samples, len(all_m))
            self._base_share = None
            self._rank = None

        return apply

    def _rank_baseline(self) -> tuple[npt.NDArray[np.float64], float] | None:
        """The rank table of the live honest answers in the baseline, or None
        while it holds fewer than ``rank_min_baseline`` (or the test is off)."""
        p = self._params
        if not p.rank_test or self._base_live < p.rank_min_baseline:
            return None
        if self._rank is None:
            size = p.baseline_size
            newest = (self._base_pos - 1 - np.arange(self._base_live)) % size
            quantised = np.rint(self._base_margin[newest] * _LEVELS).astype(np.uint8)
            self._rank = rank_table(quantised)
        return self._rank

    def _observe_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        proba: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> None:
        assert self._arena is not None
        arrays = self._arena.arrays
        margin, entropy = margins_and_entropy(proba)
        quantised = np.rint(margin * _LEVELS).astype(np.uint8)
        # Ranked against the honest answers known before these, so a client
        # in good standing is never compared with its own answers.
        ranks = self._rank_baseline()
        if ranks is not None:
            p = self._params
            rank_kernel(
                np.ascontiguousarray(slots, dtype=np.int64),
                ranks[0][quantised],
                np.rint(np.clip(X, 0.0, 1.0) * _LEVELS).astype(np.uint8),
                1.0 - 1.0 / p.rank_horizon,
                (p.rank_repeat_eps * _LEVELS) ** 2 * X.shape[1],
                arrays["rank_w"],
                arrays["rank_w2"],
                arrays["rank_wu"],
                arrays["last_row"],
                arrays["has_last"],
            )
        if learn.any():
            # Only clients in good standing teach what honest answers are.
            self._learn_baseline_rows(margin[learn], entropy[learn], live=True)
        groups = group_rows(slots)
        order = groups.order
        # Two rings share pos/len: push the first on copies of the counters.
        # No windows are wanted here (rows=[]): scoring reads the rings.
        none = np.zeros(0, dtype=np.int64)
        push_ring(
            arrays["margin"],
            arrays["pos"].copy(),
            arrays["len"].copy(),
            groups,
            quantised[order],
            0,
            none,
        )
        push_ring(
            arrays["entropy"],
            arrays["pos"],
            arrays["len"],
            groups,
            np.rint(entropy[order] * _LEVELS).astype(np.uint8),
            0,
            none,
        )
        before = arrays["n_answers"][groups.unique].copy()
        arrays["n_answers"][groups.unique] += groups.size
        self._update_openings(groups.unique, before)

    def _update_openings(
        self, unique: npt.NDArray[np.int64], before: npt.NDArray[np.int64]
    ) -> None:
        """Extend S and its variance over the opening (``opening_answers``)
        and over the first ``cohort_answers`` of the clients that were still
        in them before these answers by the new answers, from the ring (which
        holds both while a client has had at most ``window`` answers; a
        client pushed past that by one huge batch keeps its last values)."""
        assert self._arena is not None
        arrays = self._arena.arrays
        p = self._params
        after = arrays["n_answers"][unique]
        for count, stat_name, var_name in (
            (p.opening_answers, "open_s", "open_v"),
            (p.young_answers, "young_s", "young_v"),
        ):
            todo = (before < count) & (after <= p.window)
            if not todo.any():
                continue
            slots = unique[todo]
            stat = arrays[stat_name][slots]
            var = arrays[var_name][slots]
            mann_kendall_extend(
                arrays["margin"][slots],
                arrays["pos"][slots] - arrays["len"][slots],
                before[todo],
                np.minimum(arrays["len"][slots], count),
                stat,
                var,
            )
            arrays[stat_name][slots] = stat
            arrays[var_name][slots] = var

    def _score_rows(
        self,
        slots: npt.NDArray[np.int64],
        X: npt.NDArray[np.float64],
        learn: npt.NDArray[np.bool_],
    ) -> list[DetectorScore]:
        # Nothing here changes: the answers to these rows are not known yet.
        assert self._arena is not None
        arrays = self._arena.arrays
        p = self._params
        first = arrays["first_s"]
        fresh = first[slots] == 0.0
        if fresh.any():
            # A key's first scored query dates it; a later row of the same
            # batch does not move it (np.minimum.at keeps the earliest).
            at = self._arrival_s
            times = np.full(len(slots), time.time()) if at is None else at
            new = slots[fresh]
            first[new] = np.inf
            np.minimum.at(first, new, times[fresh])
            if self._start_order is not None:
                self._start_order.touch(self._arena, new)
        length = arrays["len"][slots]
        filled = np.arange(p.window)[None, :] < length[:, None]
        uncertain = (arrays["margin"][slots] < p.margin_at * _LEVELS) | (
            arrays["entropy"][slots] > p.entropy_at * _LEVELS
        )
        count = (uncertain & filled).sum(axis=1)
        share = count / np.maximum(length, 1)
        base = self.baseline_share
        honest = 0.0 if base is None else base
        share_score = np.clip((share - honest) / max(1.0 - honest, 1e-9), 0.0, 1.0)
        tau = np.zeros(len(slots))
        if p.trend_weight > 0 and len(slots):
            # Once per client: the rings do not change while scoring.
            unique, inverse = np.unique(slots, return_inverse=True)
            enough = arrays["len"][unique] >= p.trend_min_answers
            per_client = np.zeros(len(unique))
            if enough.any():
                ready = unique[enough]
                per_client[enough] = confidence_trend(
                    arrays["margin"][ready], arrays["pos"][ready], arrays["len"][ready]
                )
            tau = per_client[inverse]
        trend_score = p.trend_weight * np.clip(tau, 0.0, 1.0)
        own_z, young_z, pooled_z, cohort_keys = self._opening_evidence(slots)
        # Both on the flag scale: the threshold at opening_z alone, or at
        # cohort_z pooled for a key that contributes member_z itself.
        opening_score = np.clip(p.threshold * own_z / p.opening_z, 0.0, 1.0)
        cohort_score = np.where(
            young_z >= p.member_z,
            np.clip(p.threshold * pooled_z / p.cohort_z, 0.0, 1.0),
            0.0,
        )
        ranks = self._rank_evidence(slots)
        rank_score = np.where(
            ranks.ready, np.clip(p.threshold * ranks.z / p.rank_z, 0.0, 1.0), 0.0
        )
        # A cohort's pooled ranks are one stream's, judged at the same rank_z:
        # membership never looks at the answers.
        rank_cohort_score = np.clip(p.threshold * ranks.pooled_z / p.rank_z, 0.0, 1.0)
        # The share and trend need min_answers; the opening and cohort tests
        # are warm from opening_min on (own_z is 0 before).
        warm = arrays["n_answers"][slots] >= p.min_answers
        judged = np.where(warm, np.maximum(share_score, trend_score), 0.0)
        score = np.maximum.reduce(
            [
                judged,
                opening_score,
                cohort_score,
                rank_score,
                rank_cohort_score,
            ]
        )
        warm |= (own_z != 0.0) | (young_z != 0.0) | ranks.ready
        warm |= ranks.pooled_z != 0.0
        margin_at, entropy_at = p.margin_at, p.entropy_at
        opening_z, cohort_z, cohort_s = p.opening_z, p.cohort_z, p.cohort_window_s
        young_answers = p.young_answers
        rank_at = p.rank_z
        trend_at = p.threshold / p.trend_weight if p.trend_weight > 0 else None

        def evidence(row: int) -> str:
            text = (
                f"{count[row]} of the last {length[row]} answers were uncertain "
                f"(margin under {margin_at:g} or entropy over {entropy_at:g}); "
                f"honest share {honest:.1%}"
            )
            if trend_at is not None and trend_score[row] > share_score[row]:
                text += (
                    f"; confidence climbed along the window, Kendall tau "
                    f"{tau[row]:.2f} between arrival order and margin "
                    f"(flagged from {trend_at:.2f}; honest order gives about 0)"
                )
            # What the share and trend gave the score: nothing before
            # min_answers, however high they stand, or a key flagged through
            # its rank cohort on its first answers got no word of why.
            best = judged[row]
            if opening_score[row] > best:
                text += (
                    f"; confidence climbed over the key's first answers, "
                    f"Mann-Kendall z {own_z[row]:.1f} (flagged alone from "
                    f"{opening_z:g})"
                )
            if cohort_score[row] > max(best, opening_score[row]):
                text += (
                    f"; confidence climbed over the key's first "
                    f"{min(int(length[row]), young_answers)} answers, "
                    f"Mann-Kendall z {young_z[row]:.1f}"
                    f"; pooled with {cohort_keys[row] - 1} other keys whose "
                    f"first query came within {cohort_s:g} s of its own, z "
                    f"{pooled_z[row]:.1f} (flagged from {cohort_z:g})"
                )
            best = max(best, opening_score[row], cohort_score[row])
            if rank_score[row] > best:
                text += (
                    f"; its recent answers were less confident than honest "
                    f"clients' overall: their margins' mean rank among honest "
                    f"answers' margins was {ranks.mean[row]:.3f} (honest 0.5), "
                    f"z {ranks.z[row]:.1f} (flagged from {rank_at:g})"
                )
            if rank_cohort_score[row] > max(best, rank_score[row]):
                text += (
                    f"; pooled with {ranks.keys[row] - 1} other keys whose first "
                    f"query came within {cohort_s:g} s of its own, their "
                    f"answers' margins' mean rank among honest answers' was "
                    f"{ranks.pooled_mean[row]:.3f} (honest 0.5), z "
                    f"{ranks.pooled_z[row]:.1f} (flagged from {rank_at:g})"
                )
            return text

        return self._scores(score, warm, evidence)

    def _rank_evidence(self, slots: npt.NDArray[np.int64]) -> RankEvidence:
        """Per row: the rank test alone and over the key's cohort
        (:func:`detectors._margincohort.rank_evidence`)."""
        assert self._arena is not None
        return rank_evidence(
            self._arena.arrays,
            slots,
            self._params,
            self._rank_baseline(),
            self._base_live,
            self._order(),
        )

    def _rank_z(
        self,
        mean: npt.NDArray[np.float64],
        effective: npt.NDArray[np.float64],
        var: float,
    ) -> npt.NDArray[np.float64]:
        """z of mean ranks against the honest 0.5, with this detector's live
        baseline (:func:`detectors._margincohort.rank_z`)."""
        return rank_z(mean, effective, var, self._base_live)

    def _opening_evidence(
        self, slots: npt.NDArray[np.int64]
    ) -> tuple[
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
        npt.NDArray[np.int64],
    ]:
        """Per row: the key's opening z, its young z, its cohort's pooled z
        and the cohort's size (:func:`detectors._margincohort.opening_evidence`)."""
        assert self._arena is not None
        return opening_evidence(self._arena.arrays, slots, self._params, self._order())

    def _order(self) -> tuple[StartOrder, SlotArena] | None:
        """The keys in order of first time for the cohort look-ups, or None
        (the reference: a scan and sort per batch)."""
        assert self._arena is not None
        return None if self._start_order is None else (self._start_order, self._arena)
