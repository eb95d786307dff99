"""Degrade levels keep a valid tensor and the model's label; noise is seeded."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.shaping import LEVELS, seed_for, shape

RNG = np.random.default_rng(7)
PROBA = RNG.dirichlet(np.ones(10) * 0.5, size=200)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("noise", ["none", "laplace", "gaussian"])
def test_every_level_is_a_valid_distribution_with_the_same_label(
    level: str, noise: str
) -> None:
    out = shape(
        PROBA, level, top_k=3, decimals=1, noise=noise, noise_scale=0.05, seed=1
    )  # type: ignore[arg-type]
    assert out.shape == PROBA.shape
    assert (out >= 0).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-12)
    assert (out.argmax(axis=1) == PROBA.argmax(axis=1)).all()


def test_levels_reveal_less_and_less() -> None:
    top = shape(PROBA, "top_k", top_k=3)
    assert ((top > 0).sum(axis=1) <= 3).all()
    rounded = shape(PROBA, "rounded", decimals=1)
    np.testing.assert_allclose(rounded * 10, np.round(rounded * 10), atol=1e-9)
    label = shape(PROBA, "label")
    assert set(np.unique(label)) == {0.0, 1.0}
    assert (shape(PROBA, "full") == PROBA).all()


def test_rounding_keeps_the_label_even_when_others_round_up() -> None:
    p = np.array([[0.26, 0.25, 0.25, 0.24]])
    out = shape(p, "rounded", decimals=1)
    assert out.argmax() == 0 and out.sum() == pytest.approx(1.0)


def test_noise_is_seeded_per_request_and_has_the_configured_scale() -> None:
    seed = seed_for("request-1")
    assert seed == seed_for("request-1") != seed_for("request-2")
    flat = np.full((5000, 4), 0.25)
    a = shape(flat, "top_k", top_k=4, noise="gaussian", noise_scale=0.02, seed=seed)
    b = shape(flat, "top_k", top_k=4, noise="gaussian", noise_scale=0.02, seed=seed)
    c = shape(flat, "top_k", top_k=4, noise="gaussian", noise_scale=0.02, seed=seed + 1)
    assert (a == b).all() and not (a == c).all()
    # Away from the label lift and the clip, the perturbation keeps the scale:
    # renormalising a 4-class row of ~1.0 barely changes the spread.
    others = np.delete(
        a, a.argmax(axis=1)[:, None] + 4 * np.arange(len(a))[:, None], None
    )
    assert 0.012 < float(np.std(others)) < 0.03


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown degrade level"):
        shape(PROBA, "blurry")  # type: ignore[arg-type]
