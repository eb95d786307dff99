"""Parameters of the ``traffic`` detector (:mod:`detectors.traffic`).

Each parameter's bounds, and where its default comes from: the
measurements behind the solo and cohort tests' defaults are here, the
tests themselves in :mod:`detectors.traffic` (the detector and its solo
test) and :mod:`detectors._trafficcohort`. Which parameters change live is
the detector's ``_mutable_params``.

Imports pydantic and :mod:`detectors.base` only; nothing from Kafka,
Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from detectors.base import DetectorParams

_Z_MAX = 1000.0
"""Largest z bar or step a parameter takes: beyond it no key could be
flagged, and an infinite one turned ``(z - bar) / step`` into inf / inf on
every batch."""

_STEP_MIN = 0.01
"""Smallest z step: a step near 0 overflowed the step score."""


class TrafficParams(DetectorParams):
    """Parameters of :class:`~detectors.traffic.TrafficDetector` ("the class"
    below)."""

    window: int = Field(32, ge=8, le=1024)
    """Requests per client over which rate, burstiness and regularity are
    taken, and outcomes over which the error and rejection shares are."""

    stride: int = Field(8, ge=1, le=1024)
    """A client is judged (and may teach the baseline) every ``stride``
    requests."""

    regular_tolerance: float = Field(0.05, gt=0.0, lt=1.0)
    """A gap within this fraction of the median gap counts as regular."""

    stall_s: float = Field(1.0, ge=0.0, le=3600.0)
    """Seconds past which a wait for the gateway's answer is the gateway's,
    not the client's: a closed-loop client cannot send while it waits, so
    Redis frozen for 15 s (24 s without answers, with the worker's back-off)
    put one 24 s gap among a fast client's 30 to 100 ms ones (burstiness 4.9
    of at most 5.5, and a block) although the client never paused. Gaps
    after a longer wait are measured from the answer instead (see
    :func:`~detectors._traffickernels.push_and_measure`). Answers normally
    take tens of milliseconds; a worker taking over a second per batch under
    load also has its share of each gap taken out. 0 turns this off."""

    z_half: float = Field(3.0, gt=0.0, le=100.0)
    """z-score at which the score is 0.5 (score = z / (z + z_half))."""

    threshold: float = Field(0.6, gt=0.0, lt=1.0)
    """Score at which a client is flagged (0.6: z = 1.5 ``z_half``)."""

    min_queries: int = Field(16, ge=3, le=100_000)
    """Requests a client must have sent before it is judged."""

    min_baseline: int = Field(20, ge=2, le=1_000_000)
    """Honest judgements the baseline must have learned before any score is
    warm."""

    cohort_window_s: float = Field(0.25, ge=0.0, le=3600.0)
    """Keys whose first request came within this many seconds of each other
    form a cohort whose gap pairs are pooled (see the class); 0 turns the
    cohort test off."""

    cohort_pace_share: float = Field(0.2, ge=0.0, le=10.0)
    """Cohort members must also have sent as many rows as the key, within
    this share of its count (at least 2 either way)."""

    cohort_min_keys: int = Field(3, ge=2, le=10_000)
    """Keys (this one included) a cohort needs before its pooled z counts."""

    cohort_min_pairs: int = Field(12, ge=1, le=100_000)
    """Gap pairs the cohort must have pooled before its z counts."""

    cohort_tolerance: float = Field(0.1, gt=0.0, lt=1.0)
    """Two successive gaps match when they are within this fraction of the
    larger. Wider than ``regular_tolerance``: an attacker's keys paced by
    one process wake together and leave one at a time, so each arrival is
    late by up to tens of milliseconds, which the difference of two gaps
    doubles. With arrivals late by up to 30 ms at four per second, 76% of
    pairs match at 10%, 41% at 5%."""

    cohort_match_rate: float = Field(0.18, ge=1e-6, lt=1.0)
    """Share of an honest key's gap pairs taken to match by chance. Poisson
    arrivals match at about 0.053 with the default tolerance (two
    exponential gaps within 10% of the larger); the evaluation's honest
    population, bursts and pauses included, at 0.061. The default is three
    times that, so honest keys that happen to start together stay far
    below ``cohort_z``."""

    cohort_z: float = Field(6.0, gt=0.0, le=_Z_MAX)
    """Pooled binomial z of a cohort's matching pairs at which its members
    that match too (``member_z``) are flagged."""

    cohort_step_z: float = Field(3.0, ge=_STEP_MIN, le=_Z_MAX)
    """Pooled z beyond ``cohort_z`` that adds one ``threshold`` to a
    member's score: at the default 3, a cohort at z 7.5 scores 1.5 times
    the threshold (the policy's default block level) and its members are
    refused on their next request rather than after three flags each. Why
    not later: honest cohorts stayed under z 2 (a restart making 5,000
    honest keys young at once: -2.2), so past ``cohort_z`` more z says
    nothing more about the cohort; what an honest key risks is membership,
    which ``member_z`` and ``strong_member_z`` guard. Set it to
    ``cohort_z`` for the plain proportion ``threshold * z / cohort_z``
    (block level at z 9), as ``margin``'s cohorts score."""

    member_z: float = Field(3.0, ge=0.0, le=_Z_MAX)
    """A key's own binomial z of matching pairs needed to be flagged through
    its cohort: an honest key that started in the same moment as an
    attacker's keys must show the metronome itself. 3.0 takes two matching
    pairs of two (z 3.02), three of three, four of five, not one of one
    (z 2.1): one pair an honest key matches by chance one time in sixteen,
    two in a row one in 270."""

    strong_cohort_z: float = Field(6.0, gt=0.0, le=_Z_MAX)
    """Pooled z from which a cohort also scores its young keys whose own z
    reaches only ``strong_member_z``. The cohort must reach it twice: as a
    whole, and pooled over its members at ``member_z`` alone, so keys below
    that bar never count towards admitting each other. The default is
    ``cohort_z`` (6): any flagged cohort. At 9 (where the score reached the
    default block level before ``cohort_step_z``) the lower bar made no
    measurable difference in the evaluation, whose 10-key learner pauses
    between rounds and whose cohort seldom reached 9; at 6 its copy ended
    under 90% of unhindered in all three seeds, at the honest cost stated
    in docs/traffic-cohort.md."""

    strong_member_z: float = Field(2.0, ge=0.0, le=_Z_MAX)
    """A key's own binomial z of matching pairs, with at least
    :data:`~detectors._trafficcohort.STRONG_MIN_MATCHES` matching pairs,
    needed to be scored through a cohort at ``strong_cohort_z`` (by default
    any flagged one): 2 of 3 pairs (z 2.19), 3 of 5 or 6, 4 of 9, not 1 of 1
    (z 2.13, one pair). At or above ``member_z`` it adds no member: the
    lower bar is off."""

    solo_tolerance: float = Field(0.25, gt=0.0, lt=1.0)
    """The solo test (see the class) counts the gaps of a key's window within
    this fraction of their median. Wide, because the evaluation's paced key
    (one request every 25 ms) reached the gateway with gaps of 11 to 45 ms
    around a median of 26 ms (a shared producer's send delays), of which
    a 5% band (``regular_tolerance``) held one in seven."""

    solo_match_rate: float = Field(0.2, ge=1e-6, lt=1.0)
    """Share of a Poisson key's gaps within ``solo_tolerance`` of its
    window's median, against which the solo z is taken: 0.20 at 25%,
    measured over 32-arrival windows at millisecond times (the sample
    median sits where gaps are densest, so more than the 0.17 of the
    exponential's true median). The evaluation's honest habits (bursts,
    pauses, retries) give less."""

    solo_z: float = Field(5.0, ge=0.0, le=_Z_MAX)
    """Binomial z of a key's gaps within ``solo_tolerance`` of its median,
    against ``solo_match_rate``, at which the key is flagged by the solo
    test: its score is then ``threshold`` and one more ``threshold`` per
    ``solo_step_z`` past it (nothing below). 5, the default, is the
    measured setting (the highest of 5,000 honest Poisson or bursty keys
    was 4.85, docs/traffic-solo.md); 0 turns the solo test off.

    An honest client that sends each request when the last is answered (a
    script looping over its data) is as regular as a metronome: its gaps
    are the gateway's own round trip. So a key whose answer times the
    detector has seen is scored only with ``solo_min_overlaps`` open-loop
    requests in its window; through a real worker such closed-loop keys
    (``tests/integration/test_region_links.py``'s sequential keys) were
    refused at their 16th request without that gate."""

    solo_step_z: float = Field(3.0, ge=_STEP_MIN, le=_Z_MAX)
    """Solo z past ``solo_z`` that adds one ``threshold`` to the score: a
    key at z 6.5 is at 1.5 times the threshold, the policy's default block
    level. A window of 31 gaps all within the band is z 13."""

    solo_min_gaps: int = Field(15, ge=2, le=1024)
    """Gaps (positive, so a request's rows are one) a window needs before
    the solo test scores it: 15 is a key's 16th request, when it is first
    judged."""

    solo_min_overlaps: int = Field(2, ge=0, le=1024)
    """Requests of a key's last ``window`` rows that arrived before its
    previous request was answered (open-loop evidence, see the class)
    needed before the solo test scores a key whose answer times the
    detector has seen. A client that sends each request when the last is
    answered never has one, however regular its round trips; a key whose
    answers the detector never saw (an offline replay) is scored as
    without this gate. 0 turns the gate off."""

    @model_validator(mode="after")
    def _strong_cohort_is_stronger(self) -> Self:
        if self.strong_cohort_z < self.cohort_z:
            raise ValueError(
                f"strong_cohort_z ({self.strong_cohort_z:g}) is below cohort_z "
                f"({self.cohort_z:g}): a cohort that does not flag would admit "
                "keys below member_z"
            )
        return self
