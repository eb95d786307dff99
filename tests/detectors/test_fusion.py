"""Fusion: decaying per-detector memory, maximum not sum, top contributors."""

from __future__ import annotations

import pytest

from detectors.base import DetectorScore
from detectors.fusion import contributions, decay, fuse, with_group


def score(
    name: str, value: float, threshold: float = 0.5, warm: bool = True
) -> DetectorScore:
    return DetectorScore(name, value, threshold, warm and value >= threshold, "e", warm)


def test_decay_halves_per_half_life_and_zero_means_no_memory() -> None:
    assert decay(4.0, 120.0, 60.0) == pytest.approx(1.0)
    assert decay(4.0, 0.0, 60.0) == 4.0
    assert decay(4.0, -5.0, 60.0) == 4.0
    assert decay(4.0, 1.0, 0.0) == 0.0


def test_contributions_normalise_weight_and_skip_cold() -> None:
    found = contributions(
        [
            score("ood", 0.3, 0.3),
            score("margin", 0.15, 0.3),
            score("knn", 0.9, warm=False),
        ],
        {"margin": 2.0},
    )
    assert found == pytest.approx({"ood": 1.0, "margin": 1.0})


def test_many_weak_detectors_do_not_add_up() -> None:
    # Nine detectors each at a third of their threshold: honest noise, still
    # a third, where a noisy-OR or a sum would reach a flag.
    weak = {f"d{i}": 1 / 3 for i in range(9)}
    assert fuse({}, 0.0, weak, half_life_s=60.0).risk == pytest.approx(1 / 3)


def test_memory_decays_and_is_renewed_by_a_larger_score() -> None:
    first = fuse({}, 0.0, {"ood": 2.0, "margin": 1.2}, half_life_s=60.0)
    assert first.risk == 2.0
    later = fuse(first.memory, 60.0, {"margin": 0.1}, half_life_s=60.0)
    assert later.risk == pytest.approx(1.0)
    assert [n for n, _ in later.top] == ["ood", "margin"]
    assert [v for _, v in later.top] == pytest.approx([1.0, 0.6])
    renewed = fuse(later.memory, 0.0, {"margin": 1.5}, half_life_s=60.0)
    assert renewed.top[0] == ("margin", 1.5)
    gone = fuse(renewed.memory, 3600.0, {}, half_life_s=60.0)
    assert gone.risk == 0.0 and gone.memory == {}


def test_top_names_three_largest_and_excluded_are_kept_but_not_counted() -> None:
    current = {"a": 0.2, "b": 1.4, "c": 0.9, "d": 1.1, "e": 0.0}
    fused = fuse({}, 0.0, current, half_life_s=60.0, exclude={"b"})
    assert fused.top == (("d", 1.1), ("c", 0.9), ("a", 0.2))
    assert fused.risk == 1.1
    assert fused.memory["b"] == 1.4


def test_group_risk_is_the_larger() -> None:
    assert with_group(0.4, 1.7) == 1.7
    assert with_group(2.0, 1.7) == 2.0
