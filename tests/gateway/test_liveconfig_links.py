"""The ``links`` section of the live document (cross-client fields) and the
worker-side objects taking it: validation, edits, diffs, ``from_settings``,
``KeyLinks``/``CrossClient.reconfigure`` and the scorer's region thresholds
(pure logic: no Kafka, and the Redis client is never called)."""

from __future__ import annotations

import pytest

from detectors.linking import KeyLinks
from gateway.config import CrossClientConfig, load_settings
from gateway.errors import ConfigError
from gateway.groups import CrossClient
from gateway.liveconfig.document import (
    LIVE_LINK_FIELDS,
    ConfigRecord,
    LiveConfig,
    diff,
    get_path,
    validate_document,
    with_changes,
)
from gateway.liveconfig.service import ConfigService
from gateway.metrics import WorkerMetrics
from gateway.models import ServedModel
from gateway.scoring import Scorer
from gateway.store import redis_from_settings

# The fixture lives in test_liveconfig.py; importing it shares its models.
from tests.gateway.test_liveconfig import served_models  # noqa: F401


def _full() -> LiveConfig:
    return LiveConfig.from_settings(load_settings())


@pytest.mark.parametrize(
    ("changes", "field", "rule"),
    [
        ({"links.link_min_shared": 0}, "links.link_min_shared", "greater_than_equal"),
        ({"links.region_min_shared": 2_000_000}, "links.region_min_shared", "less"),
        ({"links.link_window_s": 0}, "links.link_window_s", "greater_than"),
        ({"links.link_ttl_s": 31 * 86_400}, "links.link_ttl_s", "less_than_equal"),
        ({"links.region_rare_share": 1.5}, "links.region_rare_share", "less"),
        ({"links.store_max_rows": "many"}, "links.store_max_rows", "int_parsing"),
        ({"links.enabled": "maybe"}, "links.enabled", "bool_parsing"),
        ({"links.region_components": 8}, "links.region_components", "restart"),
        ({"links.region_cell_sd": 2.0}, "links.region_cell_sd", "restart"),
        ({"links.entries_per_hash": 8}, "links.entries_per_hash", "restart"),
        ({"links.fingerprint_ttl_s": 60}, "links.fingerprint_ttl_s", "restart"),
        ({"links.region_entries": 8}, "links.region_entries", "restart"),
        ({"links.nosuch": 1}, "links.nosuch", "unknown field"),
        ({"links.link_min_shared.x": 1}, "links.link_min_shared", "no such section"),
    ],
)
def test_links_refusal_names_field_and_rule(
    changes: dict[str, object], field: str, rule: str
) -> None:
    for start in (_full(), LiveConfig()):
        with pytest.raises(ConfigError) as info:
            with_changes(start, changes)
        assert info.value.code == "CONFIG_INVALID"
        assert field in info.value.message, info.value.message
        assert rule in info.value.message, info.value.message


def test_links_bounds_come_from_the_settings_model() -> None:
    # Every live field exists in CrossClientConfig, and its largest allowed
    # value there is accepted here too (no second copy of the bounds).
    for name in LIVE_LINK_FIELDS:
        assert name in CrossClientConfig.model_fields
    doc = with_changes(_full(), {"links.link_ttl_s": 30 * 86_400})
    assert doc.links is not None and doc.links["link_ttl_s"] == 30 * 86_400


def test_from_settings_takes_the_live_cross_client_fields() -> None:
    settings = load_settings(
        cross_client={"link_min_shared": 4, "region_min_shared": 7, "region_cell_sd": 2}
    )
    doc = LiveConfig.from_settings(settings)
    assert doc.links is not None
    assert sorted(doc.links) == sorted(LIVE_LINK_FIELDS)
    assert doc.links["link_min_shared"] == 4
    assert doc.links["region_min_shared"] == 7
    assert "region_cell_sd" not in doc.links


def test_set_diff_and_get_on_links() -> None:
    old = _full()
    new = with_changes(
        old, {"links.region_min_shared": 5, "links.region_rare_share": 0.1}
    )
    assert get_path(new, "links.region_min_shared") == 5
    assert [(c.field, c.old, c.new) for c in diff(old, new)] == [
        ("links.region_min_shared", 10, 5),
        ("links.region_rare_share", 0.05, 0.1),
    ]
    # The rest of the section is untouched.
    assert old.links is not None and new.links is not None
    assert {k: v for k, v in new.links.items() if not k.startswith("region_")} == {
        k: v for k, v in old.links.items() if not k.startswith("region_")
    }


def test_a_document_without_links_keeps_the_settings_values() -> None:
    # Versions published before the section existed decode with links None
    # (each worker runs its settings file), not with the defaults.
    legacy = {"limits": {}, "policy": {}, "detectors": {}, "detector_shadow": {}}
    assert validate_document(legacy).links is None
    record = ConfigRecord.decode(
        ConfigRecord(
            version=1,
            parent=0,
            author="t",
            at_ms=0,
            kind="initial",
            document=validate_document(legacy),
        ).encode()
    )
    assert record.document.links is None
    # The publisher fills an absent section from its own settings before a set.
    service = ConfigService(load_settings(cross_client={"link_min_shared": 4}))
    filled = with_changes(service._with_links(LiveConfig()), {"links.link_ttl_s": 60})
    assert filled.links is not None
    assert filled.links["link_min_shared"] == 4 and filled.links["link_ttl_s"] == 60


def test_lowered_min_shared_links_at_the_next_report_and_keeps_counts() -> None:
    links = KeyLinks(min_shared=10, window_s=100)
    assert links.observe([("a", "b", 6), ("c", "d", 2)], now_s=0) == []
    links.reconfigure(min_shared=5)
    # Nothing is re-judged by the change itself...
    assert links.links() == []
    # ... the pair already past 5 links at its next report (6 + 1), the
    # other keeps its count (2 + 2 < 5, 2 + 2 + 1 = 5).
    assert links.observe([("a", "b", 1), ("c", "d", 2)], now_s=1) == [("a", "b")]
    assert links.observe([("d", "c", 1)], now_s=2) == [("c", "d")]


def test_raised_min_shared_keeps_links_and_delays_new_ones() -> None:
    links = KeyLinks(min_shared=2, window_s=100)
    assert links.observe([("a", "b", 2), ("c", "d", 1)], now_s=0) == [("a", "b")]
    links.reconfigure(min_shared=4)
    assert links.observe([("c", "d", 1)], now_s=1) == []  # 2 < 4
    assert links.observe([("c", "d", 2)], now_s=2) == [("c", "d")]
    assert ("a", "b") in links.links()


def test_shortened_windows_and_ttl_bite_at_the_next_observe() -> None:
    links = KeyLinks(min_shared=3, window_s=100, link_ttl_s=100)
    links.observe([("a", "b", 3), ("c", "d", 2)], now_s=0)
    links.reconfigure(window_s=10, link_ttl_s=10)
    assert links.links() == [("a", "b")]  # expiry waits for the next observe
    # At 20 the link is stale under the new TTL and the count under the new
    # window: c-d starts again from 1.
    assert links.observe([("c", "d", 1)], now_s=20) == []
    assert links.links() == [] and links.members("a") == ["a"]


def test_keylinks_reconfigure_refuses_without_changing() -> None:
    links = KeyLinks(min_shared=3, window_s=100, link_ttl_s=100)
    with pytest.raises(ValueError, match="positive"):
        links.reconfigure(min_shared=2, link_ttl_s=0)
    assert (links.min_shared, links.window_s, links.link_ttl_s) == (3, 100, 100)


def _cross(**cross_client: object) -> CrossClient:
    settings = load_settings(cross_client=cross_client)
    # Built but never called: reconfigure touches no server.
    return CrossClient(redis_from_settings(settings), settings)


def test_cross_client_reconfigure_updates_both_link_counters() -> None:
    cross = _cross(link_min_shared=10, region_min_shared=10)
    cross.links.observe([("a", "b", 6)], now_s=0)
    live = cross.merged(
        {"link_min_shared": 5, "region_min_shared": 3, "link_window_s": 30}
    )
    cross.reconfigure(live)
    assert cross.config.link_min_shared == 5
    assert (cross.links.min_shared, cross.links.window_s) == (5, 30)
    assert (cross.region_links.min_shared, cross.region_links.window_s) == (3, 30)
    assert cross._regions.ttl_ms == 30_000
    assert cross.links.observe([("a", "b", 1)], now_s=1) == [("a", "b")]
    # No section: back to the settings file's values.
    cross.reconfigure(cross.merged(None))
    assert cross.links.min_shared == 10 and cross.region_links.min_shared == 10


def test_cross_client_refuses_restart_only_and_bad_values() -> None:
    cross = _cross()
    with pytest.raises(ValueError, match="region_components"):
        cross.reconfigure(cross.config.model_copy(update={"region_components": 2}))
    with pytest.raises(ValueError, match=r"links\.link_min_shared"):
        cross.merged({"link_min_shared": 0})
    with pytest.raises(ValueError, match="positive"):
        cross.reconfigure(cross.config.model_copy(update={"region_min_shared": 0}))
    assert cross.links.min_shared == 10 and cross.region_links.min_shared == 10


def test_scorer_takes_region_thresholds_and_refuses_unfitted_regions(
    served_models: dict[str, ServedModel],  # noqa: F811
) -> None:
    scorer = Scorer(load_settings(), served_models, WorkerMetrics())
    cross = CrossClientConfig(region_rare_share=0.2, region_min_client_share=0.3)
    scorer.apply_links(cross)
    assert scorer._region_maps["digits"].rare_share == 0.2
    assert scorer._region_min_share == 0.3

    # Started with region links off: no map was fitted, so turning them on
    # live is refused (restart needed); keeping them off is fine.
    off = Scorer(
        load_settings(cross_client={"region_enabled": False}),
        served_models,
        WorkerMetrics(),
    )
    with pytest.raises(ValueError, match="region_enabled"):
        off.check_links(CrossClientConfig())
    off.apply_links(CrossClientConfig(region_enabled=False, link_min_shared=3))
