"""The chunked (flash) attention path equals the XLA path: values, gradients, whole model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.model import LingForCausalLM
from ling_jax.model.attention import attention_mask, dot_product_attention
from ling_jax.model.chunked_attention import chunked_attention
from tests.model.conftest import tiny_config


def _inputs(seq, q_heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, seq, q_heads, head_dim))
    k = rng.normal(size=(2, seq, kv_heads, head_dim))
    v = rng.normal(size=(2, seq, kv_heads, head_dim))
    # Row 0: one document; row 1: three packed documents and trailing padding (segment 0).
    cuts = [seq // 4, seq // 2, seq - 3]
    row1 = np.concatenate(
        [
            np.full(cuts[0], 1),
            np.full(cuts[1] - cuts[0], 2),
            np.full(cuts[2] - cuts[1], 3),
            np.zeros(3),
        ]
    )
    segment_ids = np.stack([np.ones(seq), row1]).astype(np.int32)
    return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(segment_ids))


def _xla(q, k, v, segment_ids):
    return dot_product_attention(q, k, v, attention_mask(segment_ids))


@pytest.mark.parametrize("seq, chunk", [(37, 8), (20, 64)])  # Padded last chunk; one chunk.
def test_values_and_gradients_match_xla(seq, chunk):
    q, k, v, seg = _inputs(seq)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    chunked = lambda q, k, v: chunked_attention(q, k, v, seg, chunk_size=chunk)
    np.testing.assert_allclose(chunked(q, k, v), _xla(q, k, v, seg), atol=2e-6)
    grads = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(loss(lambda q, k, v: _xla(q, k, v, seg)), argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", grads, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5, err_msg=f"d{name}")


def test_bfloat16_inputs_accumulate_in_fp32():
    q, k, v, seg = _inputs(32, dtype=jnp.bfloat16)
    out = chunked_attention(q, k, v, seg, chunk_size=8)
    assert out.dtype == jnp.bfloat16
    exact = _xla(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    np.testing.assert_allclose(out.astype(jnp.float32), exact, atol=3e-2)


def test_memory_is_linear_in_sequence_length():
    """Compiled temp memory of forward + backward at 8K tokens: the XLA path holds the
    [seq, seq] scores, the chunked one [chunk, chunk] tiles and O(seq) accumulators."""
    seq, shapes = 8192, jax.ShapeDtypeStruct
    q = shapes((1, seq, 4, 64), jnp.float32)
    kv = shapes((1, seq, 1, 64), jnp.float32)
    seg = shapes((1, seq), jnp.int32)

    def temp_bytes(fn):
        grad = jax.grad(lambda q, k, v, s: fn(q, k, v, s).sum(), argnums=(0, 1, 2))
        compiled = jax.jit(grad).lower(q, kv, kv, seg).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores_bytes = 4 * seq * seq * 4  # One fp32 score matrix per q head.
    xla = temp_bytes(_xla)
    chunked = temp_bytes(lambda q, k, v, s: chunked_attention(q, k, v, s, chunk_size=512))
    assert xla >= scores_bytes
    assert chunked < scores_bytes / 8


def test_model_logits_and_gradients_match_xla(tiny_model, packed_batch):
    """The whole model (training path) with attention.impl = "chunked", same parameters."""
    cfg = tiny_config()
    cfg.attention.impl = "chunked"
    cfg.attention.chunk_size = 4
    chunked_model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    nnx.update(chunked_model, nnx.state(tiny_model))
    input_ids, positions, segment_ids = (jnp.asarray(x) for x in packed_batch)

    @nnx.jit
    def loss_and_grad(model):
        def loss(model):
            out = model(input_ids, positions, segment_ids)
            return jnp.sum(out.logits**2) * 1e-3 + jnp.sum(out.mtp_logits**2) * 1e-3

        return nnx.value_and_grad(loss)(model)

    loss_xla, grads_xla = loss_and_grad(tiny_model)
    loss_chunked, grads_chunked = loss_and_grad(chunked_model)
    np.testing.assert_allclose(loss_chunked, loss_xla, rtol=1e-5)
    flat_xla = jax.tree_util.tree_leaves_with_path(nnx.state(grads_xla))
    flat_chunked = jax.tree.leaves(nnx.state(grads_chunked))
    for (path, g_xla), g_chunked in zip(flat_xla, flat_chunked, strict=True):
        scale = float(jnp.abs(g_xla).max()) + 1e-6
        np.testing.assert_allclose(
            g_chunked, g_xla, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path)
        )
