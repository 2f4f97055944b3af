"""`LingForCausalLM`: embeddings, dense then MoE block stacks, final norm, untied head, MTP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from ling_jax.configs.model_config import validate_model_config
from ling_jax.model.attention import make_attention_mask
from ling_jax.model.block import BlockStack
from ling_jax.model.moe.layer import MoEStats
from ling_jax.model.mtp import MTPLayer, shift_left
from ling_jax.model.norms import RMSNorm
from ling_jax.model.params import cast, normal_param
from ling_jax.model.rope import rope_tables


@struct.dataclass
class LingOutput:
    logits: jax.Array  # [batch, seq, vocab] fp32; position t predicts token t + 1
    mtp_logits: jax.Array | None  # [batch, seq, vocab] fp32; position t predicts token t + 2
    moe_stats: MoEStats | None  # fields with a leading [num_moe_layers] axis
    mtp_stats: MoEStats | None  # the MTP layer's own router statistics


class LingForCausalLM(nnx.Module):
    """The Ling 2.0 (BailingMoeV2) causal language model.

    Parameters live in `param_dtype`; matmuls run in `dtype`; router, norms' statistics, RoPE,
    the attention softmax and the logits are fp32. The first `first_k_dense_replace` layers have
    a dense SwiGLU FFN, the rest the MoE layer; each run of identical layers is one scanned stack.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        config = ml_collections.FrozenConfigDict(validate_model_config(config))
        self.config = config
        d, vocab = config.hidden_size, config.vocab_size
        self.embed = normal_param(rngs, (vocab, d), ("vocab", "embed"), config)
        num_dense = config.first_k_dense_replace
        num_moe = config.num_layers - num_dense
        self.dense_layers = (
            BlockStack(config, num_dense, use_moe=False, rngs=rngs) if num_dense else None
        )
        self.moe_layers = BlockStack(config, num_moe, use_moe=True, rngs=rngs) if num_moe else None
        self.final_norm = RMSNorm(d, config)
        self.lm_head = normal_param(rngs, (d, vocab), ("embed", "vocab"), config)
        self.mtp = MTPLayer(config, rngs=rngs) if config.mtp.num_layers else None

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        # [batch, seq] -> [batch, seq, embed] in the compute dtype
        return cast(jnp.take(self.embed[...], input_ids, axis=0), self.config)

    def head(self, h: jax.Array) -> jax.Array:
        # [batch, seq, embed] -> [batch, seq, vocab] fp32
        return jnp.einsum(
            "bsd,dv->bsv",
            h,
            cast(self.lm_head[...], self.config),
            preferred_element_type=jnp.float32,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> LingOutput:
        """input_ids, positions, segment_ids: [batch, seq] int.

        positions default to 0..seq-1; segment_ids (1, 2, ... per packed document, 0 for padding)
        default to one document per row. Attention never crosses documents, and padding tokens
        are left out of the router statistics.
        """
        batch, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, seq), jnp.int32)
        rope = rope_tables(positions, self.config)
        mask = make_attention_mask(segment_ids, self.config.attention.impl)
        token_mask = segment_ids != 0

        h = self.embed_tokens(input_ids)
        if self.dense_layers is not None:
            h, _ = self.dense_layers(h, rope, mask, token_mask)
        moe_stats = None
        if self.moe_layers is not None:
            h, moe_stats = self.moe_layers(h, rope, mask, token_mask)
        h = self.final_norm(h)
        logits = self.head(h)

        mtp_logits = mtp_stats = None
        if self.mtp is not None:
            next_embeddings = self.embed_tokens(shift_left(input_ids))
            h_mtp, mtp_stats = self.mtp(h, next_embeddings, rope, mask, token_mask)
            mtp_logits = self.head(h_mtp)
        return LingOutput(
            logits=logits, mtp_logits=mtp_logits, moe_stats=moe_stats, mtp_stats=mtp_stats
        )
