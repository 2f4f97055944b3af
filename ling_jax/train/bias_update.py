"""Aux-loss-free load balancing: the zero-mean sign update of the expert biases (SPEC 5.1).

Once per optimizer step, for every MoE layer (the MTP layer's included), with n_i the tokens
routed to expert i over the whole global batch (all micro-batches, all devices):

    e_i = mean_j(n_j) - n_i                  > 0: expert i is underloaded
    delta_i = sign(e_i) - mean_j(sign(e_j))  zero-mean, so sum_i b_i stays 0
    b_i <- b_i + u * delta_i

Underloaded experts get a larger bias and so are selected more often. The bias is fp32, never
receives a gradient, and is only used to choose experts (SPEC 4.4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.model.params import ExpertBias


def zero_mean_sign_update(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
    """bias: [..., E] fp32; counts: [..., E] tokens per expert (e.g. stacked [layers, E]).

    Returns bias + rate * (sign(e) - mean(sign(e))) with e = mean(counts) - counts, computed
    independently for every leading index.
    """
    counts = counts.astype(jnp.float32)
    error = counts.mean(axis=-1, keepdims=True) - counts
    sign = jnp.sign(error)
    delta = sign - sign.mean(axis=-1, keepdims=True)
    return (bias.astype(jnp.float32) + rate * delta).astype(bias.dtype)


def load_ratio(counts: jax.Array) -> jax.Array:
    """max(n) / mean(n) over the experts: [..., E] -> [...] (1 is perfect balance, 0 if empty)."""
    counts = counts.astype(jnp.float32)
    mean = counts.mean(axis=-1)
    return jnp.where(mean > 0, counts.max(axis=-1) / jnp.where(mean > 0, mean, 1.0), 0.0)


def expert_bias_variables(model: nnx.Module) -> dict[str, ExpertBias]:
    """The model's expert biases: "moe" ([num_moe_layers, E], stacked) and "mtp" ([E]).

    Entries are absent when the model has no such layer or `moe.use_expert_bias` is off.
    """
    found = {}
    moe_layers = getattr(model, "moe_layers", None)
    if moe_layers is not None:
        router = moe_layers.blocks.ffn.router
        if hasattr(router, "expert_bias"):
            found["moe"] = router.expert_bias
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        router = mtp.block.ffn.router
        if hasattr(router, "expert_bias"):
            found["mtp"] = router.expert_bias
    return found


def update_expert_biases(
    model: nnx.Module, counts: dict[str, jax.Array | None], rate: float
) -> None:
    """Applies `zero_mean_sign_update` in place to the model's `ExpertBias` variables.

    counts: {"moe": [num_moe_layers, E], "mtp": [E]} tokens per expert over the global batch
    (the `expert_counts` of `LingOutput.moe_stats` / `.mtp_stats`, summed over micro-batches).
    """
    for name, variable in expert_bias_variables(model).items():
        layer_counts = counts.get(name)
        if layer_counts is None:
            raise ValueError(f"expert counts for {name!r} are missing; got keys {sorted(counts)}")
        if layer_counts.shape != variable.shape:
            raise ValueError(
                f"expert counts for {name!r} have shape {layer_counts.shape}, expected "
                f"{variable.shape} (the expert bias's shape)"
            )
        variable[...] = zero_mean_sign_update(variable[...], layer_counts, rate)
