"""RoPE / YaRN tables and the partial rotation against the SPEC formulas."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.configs import get_preset
from ling_jax.model.rope import (
    apply_partial_rope,
    inverse_frequencies,
    rope_tables,
    yarn_correction_range,
    yarn_mscale,
)
from tests.model import numpy_reference


def yarn_config(mscale=None):
    cfg = get_preset("ling_mini_2")
    cfg.rope.scaling.type = "yarn"
    cfg.rope.scaling.factor = 4.0
    cfg.rope.scaling.original_max_position_embeddings = 32768
    cfg.rope.scaling.mscale = mscale
    return cfg


def test_plain_frequencies_use_the_rotary_width():
    cfg = get_preset("ling_mini_2")
    inv, mscale = inverse_frequencies(cfg)
    assert inv.shape == (32,) and mscale == 1.0
    expected = [600000.0 ** (-2 * i / 64) for i in range(32)]
    np.testing.assert_allclose(inv, expected, rtol=1e-6)


def test_yarn_band_and_mscale_for_ling():
    # SPEC 4.3: lo = 12, hi = 21 for theta = 6e5 over r = 64 dims; mscale = 0.1 ln 4 + 1.
    assert yarn_correction_range(64, 600000.0, 32768, 32.0, 1.0) == (12, 21)
    cfg = yarn_config()
    assert yarn_mscale(cfg.rope.scaling) == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert yarn_mscale(yarn_config(mscale=1.0).rope.scaling) == 1.0


def test_yarn_frequencies_follow_the_formula():
    cfg = yarn_config()
    inv, mscale = inverse_frequencies(cfg)
    base = np.array([600000.0 ** (-2 * i / 64) for i in range(32)])
    ramp = np.clip((np.arange(32) - 12) / (21 - 12), 0, 1)
    expected = base / 4.0 * ramp + base * (1 - ramp)
    np.testing.assert_allclose(inv, expected, rtol=1e-6)
    # High-frequency dims are untouched, low-frequency ones fully interpolated.
    np.testing.assert_allclose(inv[:12], base[:12], rtol=1e-6)
    np.testing.assert_allclose(inv[21:], base[21:] / 4.0, rtol=1e-6)
    ref_inv, ref_mscale = numpy_reference.inv_freq_and_mscale(cfg)
    np.testing.assert_allclose(inv, ref_inv, rtol=1e-6)
    assert mscale == pytest.approx(ref_mscale)


@pytest.mark.parametrize("scaling", ["none", "yarn"])
def test_partial_rotation_matches_pairwise_reference(scaling):
    cfg = get_preset("tiny")
    cfg.rope.scaling.type = scaling
    cfg.rope.scaling.factor = 2.0
    cfg.rope.scaling.original_max_position_embeddings = 64
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, cfg.head_dim)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 100, 3, 0, 500]], np.int32)
    cos, sin = rope_tables(jnp.asarray(positions), cfg)
    out = np.asarray(apply_partial_rope(jnp.asarray(x), cos, sin))
    for b in range(2):
        for t in range(5):
            for h in range(3):
                ref = numpy_reference.rope_one(x[b, t, h].astype(np.float64), positions[b, t], cfg)
                np.testing.assert_allclose(out[b, t, h], ref, atol=2e-5, rtol=2e-5)
    # The pass-through half carries no position.
    np.testing.assert_array_equal(out[..., cfg.head_dim // 2 :], x[..., cfg.head_dim // 2 :])


def test_rotation_is_relative():
    """q.k after RoPE depends only on the position difference (no scaling)."""
    cfg = get_preset("tiny")
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 1, 1, cfg.head_dim)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, cfg.head_dim)).astype(np.float32)

    def dot(pq, pk):
        cq, sq = rope_tables(jnp.array([[pq]]), cfg)
        ck, sk = rope_tables(jnp.array([[pk]]), cfg)
        return float(jnp.sum(apply_partial_rope(q, cq, sq) * apply_partial_rope(k, ck, sk)))

    assert dot(10, 3) == pytest.approx(dot(107, 100), rel=1e-4)
