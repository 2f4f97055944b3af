"""Prefill and incremental decoding of `LingForCausalLM` with a KV cache.

Both run the model's own modules: each scanned block is rebuilt from its slice of the stacked
parameters (as `BlockStack` does) and applied as `DecoderBlock.__call__` is, except that the
attention core is swapped: `Attention.project_qkv` gives q, k, v after QK-norm and RoPE, k and v
are written into the cache, and the queries attend either over the prompt itself (prefill, with
the configured `attention.impl`, so "chunked" prefills 128K tokens without a [seq, seq] matrix)
or over the cached slots (decode). The MoE layer is the training one (same router and dispatch).
The cache rides in the scan carry and is updated in place, one layer slice at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.infer.cache import STACKS, KVCache
from ling_jax.model.attention import attend, dot_product_attention, make_attention_mask
from ling_jax.model.rope import rope_tables
from ling_jax.model.transformer import LingForCausalLM

# attend_fn(q, k, v, layer_k, layer_v) -> o: the new tokens' q, k, v [batch, seq, heads, dim]
# and this layer's whole cache [batch, max_len, kv_heads, dim] with k, v already written.
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _run_stack(stack, h, cache_k, cache_v, slot, rope, token_mask, attend_fn: AttendFn):
    """Scans the blocks of one stack; returns h and the stack's updated cache."""
    graphdef, state = nnx.split(stack.blocks)
    num_layers = cache_k.shape[0]

    def layer(carry, xs):
        h, cache_k, cache_v = carry
        layer_state, i = xs
        block = nnx.merge(graphdef, layer_state)
        # DecoderBlock.__call__, with the attention core taken apart.
        q, k, v = block.attention.project_qkv(block.input_norm(h), rope)
        where = (i, 0, slot, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), where)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), where)
        o = attend_fn(q, k, v, cache_k[i], cache_v[i])
        h = h + block.attention.project_out(o)
        x = block.post_attention_norm(h)
        ffn_out = block.ffn(x, token_mask)[0] if block.use_moe else block.ffn(x)
        return (h + ffn_out, cache_k, cache_v), None

    layer_ids = jnp.arange(num_layers, dtype=jnp.int32)
    (h, cache_k, cache_v), _ = jax.lax.scan(layer, (h, cache_k, cache_v), (state, layer_ids))
    return h, cache_k, cache_v


def _run_layers(model: LingForCausalLM, tokens, cache: KVCache, rope, token_mask, attend_fn):
    h = model.embed_tokens(tokens)
    new_k, new_v = {}, {}
    for name in STACKS:
        stack = getattr(model, name)
        if stack is None:
            continue
        h, new_k[name], new_v[name] = _run_stack(
            stack, h, cache.k[name], cache.v[name], cache.length, rope, token_mask, attend_fn
        )
    cache = cache.replace(k=new_k, v=new_v, length=cache.length + tokens.shape[1])
    return model.final_norm(h), cache


def prefill(
    model: LingForCausalLM, tokens: jax.Array, cache: KVCache, *, all_logits: bool = False
) -> tuple[jax.Array, KVCache]:
    """Runs left-padded prompts into an empty cache.

    tokens: [batch, prompt_len]; row b's prompt is tokens[b, cache.start[b]:].
    returns: logits fp32 of the last slot [batch, vocab] (every slot [batch, prompt_len, vocab]
    with `all_logits`; padding slots hold garbage), and the cache with length = prompt_len.
    """
    prompt_len = tokens.shape[1]
    slots = jnp.arange(prompt_len, dtype=jnp.int32)
    segment_ids = (slots[None, :] >= cache.start[:, None]).astype(jnp.int32)  # 0 on padding
    rope = rope_tables(cache.positions(prompt_len), model.config)
    attention_config = model.config.attention
    mask = make_attention_mask(segment_ids, attention_config.impl)

    def attend_prompt(q, k, v, layer_k, layer_v):
        del layer_k, layer_v  # The prompt sees only itself: the cache was empty.
        return attend(q, k, v, mask, attention_config)

    h, cache = _run_layers(model, tokens, cache, rope, segment_ids != 0, attend_prompt)
    if not all_logits:
        h = h[:, -1:]
    logits = model.head(h)
    return (logits if all_logits else logits[:, 0]), cache


def decode(model: LingForCausalLM, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Appends `tokens` [batch, num_tokens] (usually one per row) at slot `cache.length`.

    returns: logits fp32 [batch, num_tokens, vocab] and the cache, `num_tokens` slots longer.
    """
    num_tokens = tokens.shape[1]
    rope = rope_tables(cache.positions(num_tokens), model.config)
    mask = cache.key_mask(num_tokens)

    def attend_cache(q, k, v, layer_k, layer_v):
        del k, v  # Already in the cache.
        return dot_product_attention(q, layer_k, layer_v, mask)

    token_mask = jnp.ones(tokens.shape, bool)
    h, cache = _run_layers(model, tokens, cache, rope, token_mask, attend_cache)
    return model.head(h), cache
