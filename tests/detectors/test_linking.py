"""Key links: counted in a window, grouped by union-find, expiring."""

from __future__ import annotations

import pytest

from detectors.linking import KeyLinks, group_risk


def test_pairs_link_at_the_threshold_and_groups_merge() -> None:
    links = KeyLinks(min_shared=3)
    assert links.observe([("a", "b", 2), ("c", "d", 1)], now_s=0) == []
    assert links.members("a") == ["a"]
    assert links.observe([("b", "a", 1)], now_s=1) == [("a", "b")]
    assert links.observe([("c", "d", 5), ("d", "b", 3)], now_s=2) == [
        ("c", "d"),
        ("b", "d"),
    ]
    assert links.members("c") == ["a", "b", "c", "d"]
    assert {links.group_of(x) for x in "abcd"} == {"a"}
    assert links.group_of("z") == "z"


def test_counts_restart_after_the_window() -> None:
    links = KeyLinks(min_shared=3, window_s=10)
    links.observe([("a", "b", 2)], now_s=0)
    assert links.observe([("a", "b", 2)], now_s=11) == []  # restarted at 11
    assert links.observe([("a", "b", 1)], now_s=12) == [("a", "b")]


def test_links_expire_and_groups_split() -> None:
    links = KeyLinks(min_shared=1, link_ttl_s=10)
    links.observe([("a", "b", 1), ("b", "c", 1)], now_s=0)
    links.observe([("b", "c", 1)], now_s=8)  # refreshes b-c only
    links.observe([], now_s=15)
    assert links.members("a") == ["a"]
    assert links.members("b") == ["b", "c"]
    links.forget("c")
    assert links.members("b") == ["b"]


def test_self_reports_and_bad_parameters() -> None:
    links = KeyLinks(min_shared=1)
    assert links.observe([("a", "a", 9), ("a", "b", 0)], now_s=0) == []
    with pytest.raises(ValueError):
        KeyLinks(min_shared=0)


def test_group_risk_is_the_worst_member() -> None:
    assert group_risk(["a", "b", "c"], {"a": 0.2, "b": 1.7}) == 1.7
    assert group_risk([], {}) == 0.0
