"""``isolated_settings`` keeps every run on topics of its own, whatever the
test overrides; no broker is needed to check the names.

A partial ``kafka.topics`` override once replaced the isolated topic names
with the shared defaults (``modelgate.alerts``...): two suites on one broker
then read each other's alerts, and every session's clean-up deleted the
default topics.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import LiveSettings, TopicsConfig
from gateway.topics import run_topics
from tests.integration import helpers
from tests.integration.helpers import isolated_settings

# Never contacted: the settings are only built and inspected.
_BOOTSTRAP = "127.0.0.1:19092"
_REDIS = "redis://127.0.0.1:16379/0"
_SHARED = {*TopicsConfig().all_names(), TopicsConfig().audit, LiveSettings().topic}


@pytest.fixture(autouse=True)
def _unregistered(monkeypatch: pytest.MonkeyPatch) -> None:
    # These runs create nothing; the session's clean-up must not see them.
    monkeypatch.setattr(helpers, "_ISOLATED", [])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"kafka": {"topics": {"other_partitions": 2}}},
        {"kafka": {"topics": {"replication_factor": 1}, "poll_timeout_ms": 50}},
        {"live": {"ack_ttl_s": 5.0}},
    ],
    ids=["none", "partitions", "topics-and-kafka", "live"],
)
def test_overrides_keep_the_run_on_topics_of_its_own(
    tmp_path: Path, overrides: dict[str, dict[str, object]]
) -> None:
    one = isolated_settings(_BOOTSTRAP, _REDIS, tmp_path, **overrides)
    two = isolated_settings(_BOOTSTRAP, _REDIS, tmp_path, **overrides)

    assert not set(helpers.isolated_topics(one)) & _SHARED, run_topics(one)
    assert not set(helpers.isolated_topics(one)) & set(helpers.isolated_topics(two))
    assert len(set(run_topics(one))) == len(run_topics(one))
    assert [one, two] == helpers._ISOLATED


def test_a_partial_topics_override_still_applies(tmp_path: Path) -> None:
    settings = isolated_settings(
        _BOOTSTRAP, _REDIS, tmp_path, kafka={"topics": {"other_partitions": 2}}
    )

    assert settings.kafka.topics.other_partitions == 2
    assert settings.kafka.topics.requests_partitions == 2
    assert settings.kafka.topics.alerts.startswith("test-")


@pytest.mark.parametrize(
    "overrides",
    [
        {"kafka": {"topics": {"alerts": "modelgate.alerts"}}},
        {"live": {"topic": "modelgate.config"}},
    ],
    ids=["alerts", "live"],
)
def test_a_shared_topic_is_refused_and_never_registered(
    tmp_path: Path, overrides: dict[str, dict[str, object]]
) -> None:
    with pytest.raises(ValueError, match="topics other runs share"):
        isolated_settings(_BOOTSTRAP, _REDIS, tmp_path, **overrides)

    # Registered runs have their topics deleted when the session ends.
    assert helpers._ISOLATED == []
