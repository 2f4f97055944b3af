"""Expert parallelism: the MoE layer under `shard_map`, tokens sent to their experts' devices.

Every device routes its own tokens. Without an `expert` mesh axis it runs all experts locally
on its tokens (so sorting never spans devices). With one, experts are split over `expert`;
each device sends every (token, expert) row to the device that owns the expert with an
all-to-all, runs its local experts' grouped matmul, and sends the results back. Dropless: the
fixed-size transport buffer holds the worst case (every row to one device). Router counts and
the z-loss are summed over the batch axes, so the bias update sees the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from ling_jax.model.params import LAYERS_AXIS
from ling_jax.parallel.mesh import BATCH_AXES
from ling_jax.parallel.sharding import ShardingContext

EXPERT_AXIS = "expert"


def exchange_with_expert_owners(
    rows: jax.Array,
    group_sizes: jax.Array,
    compute: Callable[[jax.Array, jax.Array], jax.Array],
    axis: str,
    axis_size: int,
) -> jax.Array:
    """Runs `compute` on the devices that own each row's expert; returns results in row order.

    rows: [n, embed] sorted by (global) expert; group_sizes: [E] with E % axis_size == 0.
    compute(grouped_rows [axis_size * n, embed], local_group_sizes [E / axis_size]) -> rows,
    zeros past sum(local_group_sizes).
    """
    n, embed = rows.shape
    local_experts = group_sizes.shape[0] // axis_size
    per_dest = group_sizes.reshape(axis_size, local_experts)  # [devices, local experts]
    dest_end = jnp.cumsum(per_dest.sum(1))  # rows for devices < i end at dest_end[i - 1]
    row_dest = jnp.searchsorted(dest_end, jnp.arange(n), side="right")  # [n]
    slot = jnp.arange(n) - (dest_end - per_dest.sum(1))[row_dest]  # position in its message
    send = jnp.zeros((axis_size, n, embed), rows.dtype).at[row_dest, slot].set(rows)

    recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [src devices, n, embed]
    recv_counts = jax.lax.all_to_all(per_dest, axis, 0, 0, tiled=True)  # [src, local experts]
    # Each message is sorted by local expert; unused slots get key `local_experts` (last).
    ends = jnp.cumsum(recv_counts, axis=1)  # [src, local experts]
    local_expert = jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(n), side="right"))(ends)
    order = jnp.argsort(local_expert.reshape(-1), stable=True)
    grouped = recv.reshape(axis_size * n, embed)[order]
    out = compute(grouped, recv_counts.sum(0))
    out = out[jnp.argsort(order)].reshape(axis_size, n, -1)

    back = jax.lax.all_to_all(out, axis, 0, 0, tiled=True)  # [dest devices, n, embed]
    return back[row_dest, slot]


def _weight_spec(variable: nnx.Variable, expert_sharded: bool) -> PartitionSpec:
    """Routed-expert weights stay split over `expert`; everything else is gathered."""
    if not expert_sharded:
        return PartitionSpec()
    axes = variable.get_metadata().get("out_sharding") or ()
    # A layer sliced out of a scanned stack keeps the stack's metadata, "layers" axis included.
    axes = [a for a in axes if a != LAYERS_AXIS][-variable.ndim :]
    return PartitionSpec(*[EXPERT_AXIS if a == "exp" else None for a in axes])


def sharded_moe(module, flat: jax.Array, flat_mask: jax.Array, context: ShardingContext):
    """Runs `module.dispatch_tokens` per device under shard_map over the whole mesh.

    flat: [tokens, embed], flat_mask: [tokens]; tokens are split over the batch axes.
    """
    mesh = context.mesh
    axis_size = mesh.shape[EXPERT_AXIS]
    expert_sharded = axis_size > 1
    batch_axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    graphdef, state = nnx.split(module)
    state_specs = nnx.map_state(lambda _, v: _weight_spec(v, expert_sharded), state)

    def per_device(state, flat, flat_mask):
        local = nnx.merge(graphdef, state)
        return local.dispatch_tokens(
            flat,
            flat_mask,
            expert_axis=(EXPERT_AXIS, axis_size) if expert_sharded else None,
            batch_axes=batch_axes,
        )

    token_spec = PartitionSpec(batch_axes or None)
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(state_specs, token_spec, token_spec),
        out_specs=(token_spec, PartitionSpec()),
    )(nnx.as_pure(state), flat, flat_mask)
