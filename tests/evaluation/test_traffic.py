"""Benign traffic habits and the worker process's environment."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.benign import BenignProfile, arrival_plan, draw_profiles
from evaluation.process import settings_env
from gateway.config import load_settings


def test_profiles_are_uneven_and_bounded() -> None:
    profiles = draw_profiles(
        200, np.random.default_rng(0), queries=(40, 80), spread_s=30.0
    )
    rates = np.array([p.rate_per_s for p in profiles])
    assert rates.min() >= 3.0 and rates.max() <= 30.0
    # Lognormal around 10/s: most between 5 and 20, and not all alike.
    assert 0.6 <= np.mean((rates >= 5) & (rates <= 20)) <= 0.95
    assert rates.std() > 2.0
    assert all(40 <= p.n_queries <= 80 for p in profiles)
    assert all(0.0 <= p.start_delay_s <= 30.0 for p in profiles)


def test_profiles_are_seeded() -> None:
    first = draw_profiles(5, np.random.default_rng(3))
    second = draw_profiles(5, np.random.default_rng(3))
    assert first == second


def test_arrival_plan_sends_every_query_with_bursts_and_gaps() -> None:
    profile = BenignProfile(
        rate_per_s=10.0, n_queries=2000, start_delay_s=0.0, burst_prob=0.1
    )
    plan = arrival_plan(profile, np.random.default_rng(0))
    times = np.array([t for t, _ in plan])
    sizes = np.array([n for _, n in plan])

    assert sizes.sum() == 2000
    assert np.all(np.diff(times) >= 0)
    assert sizes.max() >= 3  # bursts happen
    assert 0.05 < np.mean(sizes > 1) < 0.15
    # Exponential gaps: mean about 1/rate plus the occasional pause; the
    # coefficient of variation of an exponential is 1 (regular would be 0).
    gaps = np.diff(times)
    assert 0.09 < np.median(gaps) / np.log(2) < 0.13
    assert gaps.std() / gaps.mean() > 0.8


def test_settings_env_round_trips_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(
        kafka={
            "bootstrap": "127.0.0.1:1",
            "group_id": "g-1",
            "topics": {"requests": "r.x", "alerts": "a.x"},
        },
        redis={"url": "redis://127.0.0.1:2/0", "key_prefix": "p1"},
        auth={"server_key": "k" * 43 + "="},
        models={"directory": "some/models", "serve": ["digits"]},
        policy={"shadow": True},
        detectors={"ood": {"threshold": 0.4}},
    )
    env = settings_env(
        settings, {"PATH": "/bin", "MODELGATE_KAFKA__BOOTSTRAP": "stale:9"}
    )

    assert env["PATH"] == "/bin"
    assert env["MODELGATE_KAFKA__BOOTSTRAP"] == "127.0.0.1:1"
    assert env["MODELGATE_KAFKA__TOPICS__ALERTS"] == "a.x"
    assert env["MODELGATE_AUTH__SERVER_KEY"] == "k" * 43 + "="
    assert env["MODELGATE_POLICY__SHADOW"] == "true"
    assert env["MODELGATE_MODELS__DIRECTORY"].startswith("/")
    assert "MODELGATE_WORKER__WORKER_ID" not in env

    for name in list(__import__("os").environ):
        if name.startswith("MODELGATE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("MODELGATE_"):
            monkeypatch.setenv(name, value)
    loaded = load_settings()

    assert loaded.kafka == settings.kafka
    assert loaded.redis == settings.redis
    assert loaded.policy == settings.policy
    assert loaded.limits == settings.limits
    assert loaded.detectors == settings.detectors
    assert loaded.models.serve == ["digits"]
    assert loaded.models.directory == settings.models.directory.resolve()
    assert loaded.auth.server_key is not None
    assert loaded.auth.server_key.get_secret_value() == "k" * 43 + "="
