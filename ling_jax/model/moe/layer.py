"""The MoE feed-forward layer: router, dropless dispatch, routed experts, shared expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ling_jax.model.mlp import SwiGLU
from ling_jax.model.moe.dispatch import combine, sort_by_expert
from ling_jax.model.moe.experts import RoutedExperts
from ling_jax.model.moe.router import Router, expert_token_counts


@struct.dataclass
class MoEStats:
    """Per-layer router statistics, summed or averaged over the layer's valid tokens."""

    expert_counts: jax.Array  # [E] fp32, tokens that chose each expert (bias-update input)
    z_loss: jax.Array  # [] fp32, mean over valid tokens of logsumexp(router logits)^2


class MoE(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = config
        moe = config.moe
        self.router = Router(config, rngs=rngs)
        self.experts = RoutedExperts(config, rngs=rngs)
        if moe.num_shared_experts:
            width = moe.num_shared_experts * moe.shared_expert_intermediate_size
            self.shared_expert = SwiGLU(config.hidden_size, width, config, rngs=rngs)

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, MoEStats]:
        # x: [batch, seq, embed]; token_mask: [batch, seq] bool (False on padding)
        batch, seq, embed = x.shape
        flat = x.reshape(batch * seq, embed)
        flat_mask = token_mask.reshape(-1)
        routing = self.router(flat)
        rows, dispatch = sort_by_expert(flat, routing.expert_index, self.config.moe.num_experts)
        expert_out = self.experts(rows, dispatch.group_sizes)
        # The reference combines in fp32 and casts before adding the shared expert.
        y = combine(expert_out, routing.gate_weight, dispatch).astype(x.dtype)
        if self.config.moe.num_shared_experts:
            y = y + self.shared_expert(flat)
        stats = MoEStats(
            expert_counts=expert_token_counts(
                routing.expert_index, self.config.moe.num_experts, flat_mask
            ),
            z_loss=_masked_mean(jax.nn.logsumexp(routing.logits, axis=-1) ** 2, flat_mask),
        )
        return y.reshape(batch, seq, embed), stats


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)
