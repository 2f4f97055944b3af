"""The MoE feed-forward layer: router, dropless dispatch, routed experts, shared expert."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ling_jax.model.mlp import SwiGLU
from ling_jax.model.moe.dispatch import combine, sort_by_expert
from ling_jax.model.moe.expert_parallel import sharded_moe
from ling_jax.model.moe.experts import RoutedExperts
from ling_jax.model.moe.router import Router, expert_token_counts
from ling_jax.parallel import sharding


@struct.dataclass
class MoEStats:
    """Per-layer router statistics over the layer's valid tokens (the whole global batch)."""

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
        context = sharding.active()
        if context is None:
            y, stats = self.dispatch_tokens(flat, flat_mask)
        else:
            y, stats = sharded_moe(self, flat, flat_mask, context)
        return y.reshape(batch, seq, embed), stats

    def dispatch_tokens(
        self,
        flat: jax.Array,
        flat_mask: jax.Array,
        exchange: Callable[..., jax.Array] | None = None,
        batch_axes: tuple[str, ...] = (),
    ) -> tuple[jax.Array, MoEStats]:
        """Routes, runs and combines the experts for a flat batch of tokens.

        flat: [tokens, embed]; flat_mask: [tokens]. Under shard_map, `exchange(rows,
        group_sizes, compute)` sends rows to their experts' devices when this device holds
        only its share of the experts (`expert_parallel.expert_exchange`), and `batch_axes`
        are the axes whose devices hold other tokens (the statistics are summed over them).
        """
        num_experts = self.config.moe.num_experts
        routing = self.router(flat)
        rows, dispatch = sort_by_expert(flat, routing.expert_index, num_experts)
        if exchange is None:
            expert_out = self.experts(rows, dispatch.group_sizes)
        else:
            expert_out = exchange(rows, dispatch.group_sizes, self.experts)
        # The reference combines in fp32 and casts before adding the shared expert.
        y = combine(expert_out, routing.gate_weight, dispatch).astype(flat.dtype)
        if self.config.moe.num_shared_experts:
            y = y + self.shared_expert(flat)

        mask = flat_mask.astype(jnp.float32)
        counts = expert_token_counts(routing.expert_index, num_experts, flat_mask)
        z_sum = (jax.nn.logsumexp(routing.logits, axis=-1) ** 2 * mask).sum()
        valid = mask.sum()
        if batch_axes:
            counts, z_sum, valid = jax.lax.psum((counts, z_sum, valid), batch_axes)
        return y, MoEStats(expert_counts=counts, z_loss=z_sum / jnp.maximum(valid, 1.0))
