"""RMSNorm, QK-norm and attention masking against plain numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ling_jax.configs import get_preset
from ling_jax.model.attention import Attention, attention_mask
from ling_jax.model.norms import RMSNorm
from ling_jax.model.rope import rope_tables
from tests.model import numpy_reference


def test_rmsnorm_fp32_statistics_and_input_dtype():
    cfg = get_preset("tiny")
    norm = RMSNorm(8, cfg)
    norm.scale[...] = jnp.arange(1.0, 9.0)
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32) * 100
    np.testing.assert_allclose(
        norm(jnp.asarray(x)), numpy_reference.rmsnorm(x, np.arange(1.0, 9.0), 1e-6), rtol=1e-5
    )
    x16 = jnp.asarray(x, jnp.bfloat16)
    assert norm(x16).dtype == jnp.bfloat16


def test_attention_mask_is_causal_and_per_document():
    segments = jnp.array([[1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(segments))[0, 0, 0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_attention_with_gqa_and_qk_norm_matches_reference():
    cfg = get_preset("tiny")
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    attn.qkv[...] = jnp.asarray(rng.normal(size=attn.qkv.shape) * 0.3, jnp.float32)
    attn.out[...] = jnp.asarray(rng.normal(size=attn.out.shape) * 0.3, jnp.float32)
    attn.q_norm.scale[...] = jnp.asarray(1 + 0.2 * rng.normal(size=cfg.head_dim), jnp.float32)
    attn.k_norm.scale[...] = jnp.asarray(1 + 0.2 * rng.normal(size=cfg.head_dim), jnp.float32)
    x = rng.normal(size=(1, 7, cfg.hidden_size)).astype(np.float32)
    positions = np.array([[0, 1, 2, 0, 1, 2, 3]], np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 2, 2]], np.int32)
    out = attn(jnp.asarray(x), rope_tables(jnp.asarray(positions), cfg), attention_mask(segments))
    params = {
        "qkv": np.asarray(attn.qkv[...], np.float64),
        "out": np.asarray(attn.out[...], np.float64),
        "q_norm": np.asarray(attn.q_norm.scale[...], np.float64),
        "k_norm": np.asarray(attn.k_norm.scale[...], np.float64),
    }
    ref = numpy_reference.attention(x[0].astype(np.float64), params, cfg, positions[0], segments[0])
    np.testing.assert_allclose(out[0], ref, atol=1e-4, rtol=1e-4)
