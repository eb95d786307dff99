"""``margin``'s evidence names what flagged a key."""

from __future__ import annotations


def test_a_key_flagged_through_its_rank_cohort_early_is_told_why() -> None:
    """A key's uncertain share on its first answers (2 of 2) counts for
    nothing before ``min_answers``; the evidence compared it with the rank
    cohort's score all the same, and a key flagged through its cohort at
    its third answer was told only of its share."""
    from tests.detectors.cohort_attack_sim import frame_margin

    flagged = [
        e for seed in range(10) for e in frame_margin(seed, 50, rank_member_z=2.0)
    ]
    early = [
        e for e in flagged if e.startswith(("answer 1:", "answer 2:", "answer 3:"))
    ]
    assert early, "the replay must flag some honest key on its first answers"
    assert all("pooled with" in e for e in flagged), flagged
