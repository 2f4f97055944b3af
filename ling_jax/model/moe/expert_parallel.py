"""Expert parallelism: the MoE layer under `shard_map`, tokens sent to their experts' devices.

Every device routes its own tokens. Without an `expert` mesh axis it runs all experts locally
on its tokens (so sorting never spans devices). With one, experts are split over `expert`;
each device sends every (token, expert) row to the device that owns the expert, runs its local
experts' grouped matmul, and sends the results back. Dropless either way. Router counts and
the z-loss are summed over the batch axes, so the bias update sees the whole global batch.

Two transports (`moe.ep_dispatch`):
  "ragged"  `jax.lax.ragged_all_to_all`: each device sends exactly its rows for each peer, so
            the bytes on the wire are the routed rows. The receive buffer is still sized for
            the dropless worst case (EP x n rows: memory, not traffic), and the grouped matmul
            is told the real local group sizes and the expected load (n rows), so its cost
            follows the rows received ("xla" backend: data-dependent loop over used tiles;
            "pallas": the grid follows the group sizes). XLA:CPU has no ragged-all-to-all, so
            on CPU meshes (tests) the same exchange is emulated with a dense all_to_all plus
            the primitive's exact offset semantics.
  "dense"   the fixed [EP, n, embed] buffer per device in a plain all_to_all (EP x the bytes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from ling_jax.configs.model_config import EP_DISPATCH
from ling_jax.model.moe.grouped_matmul import varying_like
from ling_jax.model.params import LAYERS_AXIS
from ling_jax.parallel.mesh import BATCH_AXES
from ling_jax.parallel.sharding import ShardingContext

EXPERT_AXIS = "expert"
# Platforms whose XLA backend implements ragged-all-to-all.
_NATIVE_RAGGED_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")


def exchange_with_expert_owners(
    rows: jax.Array,
    group_sizes: jax.Array,
    compute: Callable[..., jax.Array],
    axis: str,
    axis_size: int,
) -> jax.Array:
    """Runs `compute` on the devices that own each row's expert; returns results in row order.

    The "dense" transport: a fixed [axis_size, n, embed] message buffer per device.
    rows: [n, embed] sorted by (global) expert; group_sizes: [E] with E % axis_size == 0.
    compute(grouped_rows [axis_size * n, embed], local_group_sizes [E / axis_size],
    expected_rows=n) -> rows, zeros past sum(local_group_sizes).
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
    out = compute(grouped, recv_counts.sum(0), expected_rows=n)
    out = out[jnp.argsort(order)].reshape(axis_size, n, -1)

    back = jax.lax.all_to_all(out, axis, 0, 0, tiled=True)  # [dest devices, n, embed]
    return back[row_dest, slot]


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all`'s semantics from a dense all_to_all (for XLA:CPU, which
    lacks the primitive). Sends worst-case [peers, n] messages: for tests, not for speed."""
    n = operand.shape[0]
    peers = send_sizes.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    src = jnp.where(pos < send_sizes[:, None], input_offsets[:, None] + pos, n)  # [peers, n]
    messages = jnp.take(operand, src, axis=0, mode="fill", fill_value=0)  # [peers, n, ...]
    messages = jax.lax.all_to_all(messages, axis_name, 0, 0, tiled=True)  # [src peers, n, ...]
    # Where each source's chunk starts in this device's output (the source's output_offsets).
    starts = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [src peers]
    dest = jnp.where(pos < recv_sizes[:, None], starts[:, None] + pos, output.shape[0])
    flat = messages.reshape(peers * n, *operand.shape[1:])
    return output.at[dest.reshape(-1)].set(flat, mode="drop")


def _ragged_transport(native: bool) -> Callable[..., jax.Array]:
    return jax.lax.ragged_all_to_all if native else emulated_ragged_all_to_all


def exchange_ragged(
    rows: jax.Array,
    group_sizes: jax.Array,
    compute: Callable[..., jax.Array],
    axis: str,
    axis_size: int,
    native: bool = True,
) -> jax.Array:
    """`exchange_with_expert_owners` with a ragged all-to-all: only routed rows travel.

    Same contract. Each device's rows for peer j are contiguous (rows are sorted by expert and
    experts are split contiguously), so one ragged message per peer carries them; received
    messages land source-major in a [axis_size * n, embed] buffer, are regrouped by local
    expert for `compute`, and the results return the same way. native=False emulates the
    primitive (CPU).
    """
    n, embed = rows.shape
    transport = _ragged_transport(native)
    local_experts = group_sizes.shape[0] // axis_size
    per_dest = group_sizes.reshape(axis_size, local_experts).astype(jnp.int32)
    send_sizes = per_dest.sum(1)  # [dest]
    send_offsets = _exclusive_cumsum(send_sizes)  # [dest], where each message starts in rows
    recv_counts = jax.lax.all_to_all(per_dest, axis, 0, 0, tiled=True)  # [src, local experts]
    recv_sizes = recv_counts.sum(1)  # [src]
    recv_offsets = _exclusive_cumsum(recv_sizes)  # [src], source-major receive layout
    # Where my message starts in each destination's buffer: its recv_offsets[me].
    remote_offsets = jax.lax.all_to_all(recv_offsets, axis, 0, 0, tiled=True)  # [dest]
    # The buffers vary like the rows: a fresh zeros array would be typed replicated, and the
    # transpose would then all-reduce its cotangent over the batch axes.
    buffer = varying_like(jnp.zeros((axis_size * n, embed), rows.dtype), rows)
    received = transport(
        rows, buffer, send_offsets, send_sizes, remote_offsets, recv_sizes, axis_name=axis
    )

    from_received = _expert_major_order(recv_counts, recv_offsets, axis_size * n)
    grouped = jnp.take(received, from_received, axis=0, mode="fill", fill_value=0)
    out = compute(grouped, recv_counts.sum(0), expected_rows=n)  # [axis_size * n, out]
    to_grouped = jnp.full(axis_size * n, axis_size * n, jnp.int32)
    to_grouped = to_grouped.at[from_received].set(jnp.arange(axis_size * n), mode="drop")
    out = jnp.take(out, to_grouped, axis=0, mode="fill", fill_value=0)  # source-major

    # The way back: the received layout is the message layout, and vice versa.
    home_offsets = jax.lax.all_to_all(send_offsets, axis, 0, 0, tiled=True)  # [src]
    back = varying_like(jnp.zeros((n, out.shape[1]), out.dtype), rows, out)
    return transport(out, back, recv_offsets, recv_sizes, home_offsets, send_sizes, axis_name=axis)


def _expert_major_order(recv_counts: jax.Array, recv_offsets: jax.Array, size: int):
    """[size] int32: for each row of the expert-major layout (local expert, then source), its
    row in the source-major receive buffer; `size` (out of range) past the received rows.

    recv_counts: [src, local experts]; recv_offsets: [src], where each source's message starts.
    """
    per_expert = recv_counts.sum(0)  # [local experts]
    expert_end = jnp.cumsum(per_expert)
    p = jnp.arange(size, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(expert_end, p, side="right"), per_expert.shape[0] - 1)
    rank = p - (expert_end - per_expert)[expert]  # position among this expert's rows
    source_end = jnp.cumsum(recv_counts, axis=0)[:, expert]  # [src, size]
    source = jnp.sum(source_end <= rank[None], axis=0)  # the source this row comes from
    source = jnp.minimum(source, recv_counts.shape[0] - 1)
    within_source = rank - (source_end - recv_counts[:, expert])[source, p]
    within_message = _exclusive_cumsum(recv_counts, axis=1)[source, expert]
    row = recv_offsets[source] + within_message + within_source
    return jnp.where(p < expert_end[-1], row, size).astype(jnp.int32)


def expert_exchange(dispatch: str, axis_size: int, platform: str) -> Callable[..., jax.Array]:
    """The exchange(rows, group_sizes, compute) for `moe.ep_dispatch` on `platform`'s mesh."""
    if dispatch == "dense":
        return functools.partial(exchange_with_expert_owners, axis=EXPERT_AXIS, axis_size=axis_size)
    if dispatch == "ragged":
        native = platform in _NATIVE_RAGGED_PLATFORMS
        return functools.partial(
            exchange_ragged, axis=EXPERT_AXIS, axis_size=axis_size, native=native
        )
    raise ValueError(f"moe.ep_dispatch {dispatch!r}: expected one of {EP_DISPATCH}")


def _weight_spec(variable: nnx.Variable, expert_sharded: bool) -> PartitionSpec:
    """Routed-expert weights stay split over `expert`; everything else is gathered."""
    if not expert_sharded:
        return PartitionSpec()
    axes = variable.get_metadata().get("out_sharding") or ()
    # A layer sliced out of a scanned stack keeps the stack's metadata, "layers" axis included.
    axes = [a for a in axes if a != LAYERS_AXIS][-variable.ndim :]
    return PartitionSpec(*[EXPERT_AXIS if a == "exp" else None for a in axes])


def ep_dispatch(moe_config) -> str:
    """`moe.ep_dispatch`; configs written before the field existed used the dense buffer."""
    return moe_config.get("ep_dispatch", "dense")


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

    exchange = None
    if expert_sharded:
        platform = mesh.devices.flat[0].platform
        exchange = expert_exchange(ep_dispatch(module.config.moe), axis_size, platform)

    def per_device(state, flat, flat_mask):
        local = nnx.merge(graphdef, state)
        return local.dispatch_tokens(flat, flat_mask, exchange=exchange, batch_axes=batch_axes)

    token_spec = PartitionSpec(batch_axes or None)
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(state_specs, token_spec, token_spec),
        out_specs=(token_spec, PartitionSpec()),
    )(nnx.as_pure(state), flat, flat_mask)
