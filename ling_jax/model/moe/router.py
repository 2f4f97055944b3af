"""The Ling 2.0 router: fp32 scores, bias-for-selection-only, group-limited top-k (SPEC 4.4).

    z      = x_f32 W_f32                              router logits          [tokens, E]
    s      = sigmoid(z) (or softmax)                  affinities (unbiased)  [tokens, E]
    s_sel  = s + b                                    used ONLY to choose experts
    groups ranked by the sum of their top-2 s_sel; experts outside the top `topk_group` groups
    are masked; top-k of s_sel picks the experts; gate weights come from the unbiased s,
    normalised over the k selected experts and multiplied by `routed_scaling_factor`.

Ties break toward the lower expert (and group) index, as `jax.lax.top_k` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ling_jax.model.params import ExpertBias, normal_param


@struct.dataclass
class Routing:
    """The router's decision for a flat batch of tokens."""

    expert_index: jax.Array  # [tokens, k] int32, the selected experts
    gate_weight: jax.Array  # [tokens, k] fp32, including routed_scaling_factor
    logits: jax.Array  # [tokens, E] fp32, raw router logits (for the z-loss)


def expert_scores(logits: jax.Array, score_function: str) -> jax.Array:
    """logits: [tokens, E] fp32 -> affinities [tokens, E] fp32."""
    if score_function == "sigmoid":
        return jax.nn.sigmoid(logits)
    if score_function == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    raise ValueError(f"moe.score_function {score_function!r} is not 'sigmoid' or 'softmax'")


def group_limited_topk(selection_scores: jax.Array, moe_config) -> jax.Array:
    """Top-k experts restricted to the best `topk_group` of `n_group` contiguous groups.

    selection_scores: [tokens, E] fp32 (biased scores)
    returns: expert indices [tokens, k] int32
    """
    tokens, num_experts = selection_scores.shape
    n_group, topk_group = moe_config.n_group, moe_config.topk_group
    if topk_group < n_group:
        grouped = selection_scores.reshape(tokens, n_group, num_experts // n_group)
        group_scores = jax.lax.top_k(grouped, moe_config.group_score_topk)[0].sum(-1)  # [t, G]
        _, best_groups = jax.lax.top_k(group_scores, topk_group)  # [t, topk_group]
        keep_group = jnp.zeros((tokens, n_group), bool)
        keep_group = keep_group.at[jnp.arange(tokens)[:, None], best_groups].set(True)
        keep = jnp.repeat(keep_group, num_experts // n_group, axis=1)  # [t, E]
        selection_scores = jnp.where(keep, selection_scores, -jnp.inf)
    _, expert_index = jax.lax.top_k(selection_scores, moe_config.num_experts_per_tok)
    return expert_index.astype(jnp.int32)


def route(logits: jax.Array, expert_bias: jax.Array | None, moe_config) -> Routing:
    """logits: [tokens, E] fp32; expert_bias: [E] fp32 or None."""
    scores = expert_scores(logits, moe_config.score_function)
    selection = scores if expert_bias is None else scores + expert_bias
    expert_index = group_limited_topk(selection, moe_config)
    gate = jnp.take_along_axis(scores, expert_index, axis=-1)  # [tokens, k], unbiased
    if moe_config.norm_topk_prob:
        gate = gate / (gate.sum(-1, keepdims=True) + 1e-20)
    gate = gate * moe_config.routed_scaling_factor
    return Routing(expert_index=expert_index, gate_weight=gate, logits=logits)


def expert_token_counts(expert_index: jax.Array, num_experts: int, token_mask=None) -> jax.Array:
    """How many (valid) tokens chose each expert: [E] fp32.

    expert_index: [tokens, k]; token_mask: [tokens] bool or None
    """
    weights = jnp.ones(expert_index.shape, jnp.float32)
    if token_mask is not None:
        weights = weights * token_mask[:, None]
    return jnp.bincount(expert_index.reshape(-1), weights.reshape(-1), length=num_experts)


class Router(nnx.Module):
    """Router weight (trained) and expert bias (not trained, fp32)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.moe_config = config.moe
        num_experts = config.moe.num_experts
        self.kernel = normal_param(rngs, (config.hidden_size, num_experts), ("embed", None), config)
        if config.moe.use_expert_bias:
            self.expert_bias = ExpertBias(
                jnp.zeros((num_experts,), jnp.float32), out_sharding=(None,), eager_sharding=False
            )

    def __call__(self, x: jax.Array) -> Routing:
        # x: [tokens, embed]; the router math is fp32 whatever the activation dtype.
        logits = jnp.dot(
            x.astype(jnp.float32),
            self.kernel[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        bias = self.expert_bias[...] if self.moe_config.use_expert_bias else None
        return route(logits, bias, self.moe_config)
