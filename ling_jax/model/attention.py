"""Grouped-query attention with a fused QKV projection, per-head QK-RMSNorm and partial RoPE.

SPEC section 4.3. The fused QKV weight keeps the reference row order (all q heads, then all k
heads, then all v heads); it is stored as [embed, q_heads + 2 kv_heads, head_dim].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.model import fp8
from ling_jax.model.chunked_attention import chunked_attention
from ling_jax.model.norms import RMSNorm
from ling_jax.model.params import cast, normal_param
from ling_jax.model.rope import apply_partial_rope

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal mask that also keeps attention inside each packed document.

    segment_ids: [batch, seq] (0 marks padding, which only attends to padding)
    returns: [batch, 1, 1, seq_q, seq_k] bool, broadcastable over kv heads and q groups
    """
    seq = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same_doc)[:, None, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention in fp32 with GQA head sharing.

    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]
    mask: [batch, 1, 1, seq_q, seq_k]
    returns: [batch, seq, q_heads, head_dim]
    """
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    q = q.reshape(batch, seq, kv_heads, group, head_dim)  # q head h uses kv head h // group
    scores = jnp.einsum("bsngk,btnk->bngst", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(head_dim), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bngst,btnk->bsngk", probs, v)
    return out.reshape(batch, seq, q_heads, head_dim)


# --- attention.impl dispatch (xla | chunked) ---
def make_attention_mask(segment_ids: jax.Array, impl: str) -> jax.Array:
    """What `attend` takes as `mask` for `impl`.

    "xla": the dense [batch, 1, 1, seq, seq] mask of `attention_mask`; "chunked": the
    segment ids [batch, seq] themselves, from which each tile's mask is built.
    """
    return segment_ids if impl == "chunked" else attention_mask(segment_ids)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, attention_config
) -> jax.Array:
    """Causal self-attention with the configured implementation (`attention.impl`).

    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]
    mask: from `make_attention_mask(segment_ids, attention_config.impl)`
    """
    if attention_config.impl == "chunked":
        return chunked_attention(q, k, v, mask, chunk_size=attention_config.chunk_size)
    return dot_product_attention(q, k, v, mask)


# --- end attention.impl dispatch ---


class Attention(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        qkv_heads = self.num_heads + 2 * self.num_kv_heads
        self.qkv = normal_param(
            rngs,
            (config.hidden_size, qkv_heads, config.head_dim),
            ("embed", "qkv_heads", "head_dim"),
            config,
        )
        if config.attention.use_qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config, axes=("head_dim",))
            self.k_norm = RMSNorm(config.head_dim, config, axes=("head_dim",))
        self.out = normal_param(
            rngs,
            (self.num_heads, config.head_dim, config.hidden_size),
            ("heads", "head_dim", "embed"),
            config,
        )

    # --- split into project_qkv / project_out so the KV-cache decode (ling_jax.infer) can
    # attend over cached keys between the two; __call__ computes exactly what it did before ---
    def project_qkv(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [batch, seq, q_heads, head_dim] and k, v [batch, seq, kv_heads, head_dim], with
        QK-norm and partial RoPE applied to q and k (the form a KV cache stores)."""
        # x: [batch, seq, embed]; rope: cos, sin [batch, seq, rotary_dim]
        if fp8.enabled(self.config):
            qkv = fp8.linear(self, "qkv", x, self.qkv[...])
        else:
            qkv = jnp.einsum("bsd,dhk->bshk", x, cast(self.qkv[...], self.config))
        q = qkv[:, :, : self.num_heads]
        k = qkv[:, :, self.num_heads : self.num_heads + self.num_kv_heads]
        v = qkv[:, :, self.num_heads + self.num_kv_heads :]
        if self.config.attention.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_partial_rope(q, *rope), apply_partial_rope(k, *rope)
        return q, k, v

    def project_out(self, o: jax.Array) -> jax.Array:
        # o: [batch, seq, q_heads, head_dim] -> [batch, seq, embed]
        if fp8.enabled(self.config):
            return fp8.linear(self, "out", o, self.out[...], contract=2)
        return jnp.einsum("bshk,hkd->bsd", o, cast(self.out[...], self.config))

    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array
    ) -> jax.Array:
        # x: [batch, seq, embed]; mask: from make_attention_mask(segment_ids, attention.impl)
        q, k, v = self.project_qkv(x, rope)
        o = attend(q, k, v, mask, self.config.attention)  # [batch, seq, q_heads, head_dim]
        return self.project_out(o)

    # --- end split ---
