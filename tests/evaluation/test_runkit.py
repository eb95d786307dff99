"""Each demo, evaluation or benchmark run gets topics, a group, a Redis key
prefix and a live configuration topic of its own, so nothing an earlier run
left behind, and no live change made to a deployment, reaches it."""

from __future__ import annotations

from evaluation.runkit import own_run_settings
from gateway.bench import bench_settings
from gateway.config import Settings
from gateway.topics import run_topics


def test_each_run_has_its_own_topics_group_and_redis_prefix() -> None:
    base = Settings()
    first, second = own_run_settings(base), own_run_settings(base)

    assert first.redis.key_prefix != second.redis.key_prefix
    assert first.redis.key_prefix.startswith(base.redis.key_prefix + "-")
    assert first.kafka.group_id != second.kafka.group_id
    assert first.kafka.topics.requests != base.kafka.topics.requests
    assert first.worker.metrics_port == 0
    # `modelgate config set` on the deployment's topic must not retune the
    # run's worker behind the settings its report prints.
    assert first.live.topic not in (base.live.topic, second.live.topic)
    assert first.live.topic in run_topics(first)
    assert set(first.kafka.topics.all_names()) <= set(run_topics(first))
    # Still valid settings: the prefix fits its pattern and length, even
    # from the longest prefix an operator may configure.
    Settings.model_validate(first.model_dump())
    longest = base.model_copy(
        update={"redis": base.redis.model_copy(update={"key_prefix": "p" * 32})}
    )
    Settings.model_validate(own_run_settings(longest).model_dump())


def test_each_benchmark_run_has_its_own_live_topic() -> None:
    base = Settings()
    first, second = bench_settings(base), bench_settings(base)
    assert first.live.topic not in (base.live.topic, second.live.topic)
    Settings.model_validate(first.model_dump())
