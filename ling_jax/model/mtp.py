"""Multi-token prediction (DeepSeek-V3 style, one layer; SPEC section 4.5).

Position t of the MTP branch predicts token t + 2 from the main model's final-normed hidden
state at t and the embedding of token t + 1:

    u = [RMSNorm_e(E[x_{t+1}]), RMSNorm_h(h_t)] W_eh     (embedding first, then hidden)
    u = Block(u)                                          (attention + MoE, own expert bias)
    logits_mtp = RMSNorm_final(u) W_head                  (shared embedding and head)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.model.block import DecoderBlock
from ling_jax.model.moe.layer import MoEStats
from ling_jax.model.norms import RMSNorm
from ling_jax.model.params import cast, normal_param


def shift_left(input_ids: jax.Array) -> jax.Array:
    """[batch, seq] -> tokens t + 1 at position t, with 0 after the last token."""
    return jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)


class MTPLayer(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.embed_norm = RMSNorm(d, config)
        self.hidden_norm = RMSNorm(d, config)
        self.eh_proj = normal_param(rngs, (2 * d, d), ("mtp_concat", "embed"), config)
        self.block = DecoderBlock(config, use_moe=True, rngs=rngs)
        self.final_norm = RMSNorm(d, config)

    def __call__(
        self, h_out, next_token_embeddings, rope, mask, token_mask
    ) -> tuple[jax.Array, MoEStats]:
        # h_out: [batch, seq, embed], main-model hidden states after the final norm;
        # next_token_embeddings: [batch, seq, embed], embeddings of shift_left(input_ids).
        u = jnp.concatenate(
            [self.embed_norm(next_token_embeddings), self.hidden_norm(h_out)], axis=-1
        )
        u = jnp.einsum("bsc,cd->bsd", u, cast(self.eh_proj[...], self.config))
        u, stats = self.block(u, rope, mask, token_mask)
        return self.final_norm(u), stats
