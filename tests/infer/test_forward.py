"""Prefill + incremental decode with the KV cache reproduce the full-sequence forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.infer import decode, init_cache, prefill
from ling_jax.model.rope import rope_tables
from tests.infer.conftest import tiny_infer_model

SEQ = 12
PROMPT_LENS = (3, 6)  # Row 0 is left-padded by 3 slots.
PROMPT_SLOTS = max(PROMPT_LENS)


def check_cached_keys(model, tokens, start, cache):
    """The cache holds, per kv head, layer 0's keys after QK-norm and partial RoPE."""
    cfg = model.config
    dense = cache.k["dense_layers"]  # [layers, batch, max_len, kv_heads, head_dim]
    assert dense.shape == (cfg.first_k_dense_replace, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    assert cache.k["moe_layers"].shape[0] == cfg.num_layers - cfg.first_k_dense_replace
    graphdef, state = nnx.split(model.dense_layers.blocks)
    layer0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    positions = jnp.maximum(jnp.arange(tokens.shape[1])[None] - start[:, None], 0)
    x = layer0.input_norm(model.embed_tokens(jnp.asarray(tokens)))
    _, k, _ = layer0.attention.project_qkv(x, rope_tables(positions, cfg))
    for b in range(2):
        np.testing.assert_allclose(
            dense[0, b, start[b] : tokens.shape[1]], k[b, start[b] :], atol=1e-5
        )
    np.testing.assert_array_equal(dense[:, :, tokens.shape[1] :], 0.0)  # Not written yet.


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # The chunked prefill path, and YaRN-scaled partial RoPE continued across decode steps.
        {
            "attention.impl": "chunked",
            "attention.chunk_size": 4,
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": 4.0,
            "rope.scaling.original_max_position_embeddings": 8,
        },
    ],
    ids=["xla", "chunked_yarn"],
)
def test_incremental_decode_matches_full_forward(overrides):
    model = tiny_infer_model(**overrides)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, SEQ)).astype(np.int32)
    full = np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids)))  # [2, SEQ, V]

    tokens = np.zeros((2, PROMPT_SLOTS), np.int32)
    for b, n in enumerate(PROMPT_LENS):
        tokens[b, PROMPT_SLOTS - n :] = ids[b, :n]
    start = jnp.asarray([PROMPT_SLOTS - n for n in PROMPT_LENS], jnp.int32)
    cache = init_cache(model.config, start, max_len=16)
    logits, cache = nnx.jit(lambda m, t, c: prefill(m, t, c, all_logits=True))(
        model, jnp.asarray(tokens), cache
    )
    for b, n in enumerate(PROMPT_LENS):
        np.testing.assert_allclose(logits[b, PROMPT_SLOTS - n :], full[b, :n], atol=2e-5)
    check_cached_keys(model, tokens, start, cache)

    # Teacher-forced decoding: feed each row's true next token(s); one and two at a time.
    step = nnx.jit(decode)
    offset = 0
    for width in (1, 1, 2, 1, 1):
        fed = np.stack([ids[b, n + offset : n + offset + width] for b, n in enumerate(PROMPT_LENS)])
        logits, cache = step(model, jnp.asarray(fed), cache)
        for b, n in enumerate(PROMPT_LENS):
            expected = full[b, n + offset : n + offset + width]
            np.testing.assert_allclose(logits[b], expected, atol=2e-5, err_msg=f"offset {offset}")
        offset += width
    assert int(cache.length) == PROMPT_SLOTS + offset
