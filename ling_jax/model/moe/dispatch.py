"""Dropless token dispatch: sort (token, expert) assignments by expert and undo it afterwards.

Every token is sent to each of its k experts, so the expert FFNs see `tokens * k` rows, grouped
by expert and fed to one grouped matmul per projection. Nothing is dropped and no capacity is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Dispatch:
    """How assignment rows were permuted; enough to put expert outputs back."""

    sort_order: jax.Array  # [tokens * k] int32: sorted row r came from assignment sort_order[r]
    group_sizes: jax.Array  # [E] int32: rows per expert, in sorted order


def sort_by_expert(x: jax.Array, expert_index: jax.Array, num_experts: int):
    """Gathers each token once per chosen expert, grouped by expert.

    x: [tokens, embed]; expert_index: [tokens, k]
    returns: rows [tokens * k, embed] sorted by expert, and the Dispatch to undo it
    """
    k = expert_index.shape[-1]
    flat_expert = expert_index.reshape(-1)  # [tokens * k]; assignment a = token * k + slot
    sort_order = jnp.argsort(flat_expert, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    rows = x[sort_order // k]  # [tokens * k, embed]
    return rows, Dispatch(sort_order=sort_order, group_sizes=group_sizes)


def combine(rows: jax.Array, gate_weight: jax.Array, dispatch: Dispatch) -> jax.Array:
    """Weighted sum of each token's expert outputs, in fp32.

    rows: [tokens * k, embed] in sorted order; gate_weight: [tokens, k] fp32
    returns: [tokens, embed] fp32
    """
    tokens, k = gate_weight.shape
    inverse = jnp.argsort(dispatch.sort_order).astype(jnp.int32)
    per_assignment = rows[inverse].reshape(tokens, k, -1)  # [tokens, k, embed]
    return jnp.einsum(
        "tke,tk->te",
        per_assignment.astype(jnp.float32),
        gate_weight,
        precision=jax.lax.Precision.HIGHEST,
    )
