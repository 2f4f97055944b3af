"""Pure-jnp grouped matmuls: the targets the kernels are tested against.

Rows of `lhs` are sorted by group: group g owns rows [offsets[g], offsets[g + 1]) where
`offsets = [0, cumsum(group_sizes)]`; rows from `sum(group_sizes)` on are padding. With expert
sharding, `rhs` holds only `num_local = rhs.shape[0]` groups starting at `group_offset`; rows of
other groups, like padding rows, produce zeros. Written as one masked dense matmul per local
group (num_local times the useful FLOPs): simple and obviously right, for small test shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from pallas_kernels.fp8 import reference as fp8_reference

_HIGHEST = jax.lax.Precision.HIGHEST


def row_groups(group_sizes: jax.Array, m: int) -> jax.Array:
    """[m] int32: the group of each row; num_groups for padding rows."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def _local_masks(group_sizes, m, num_local, group_offset):
    """[num_local, m] bool: row i belongs to local group l (global group group_offset + l)."""
    local = row_groups(group_sizes, m) - jnp.asarray(group_offset, jnp.int32)
    return local[None, :] == jnp.arange(num_local, dtype=jnp.int32)[:, None]


def gmm_reference(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type: DTypeLike | None = None,
    group_offset: int | jax.Array = 0,
    transpose_rhs: bool = False,
    lhs_scale: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
) -> jax.Array:
    """out[rows of group g] = lhs[rows of g] @ rhs[g - group_offset], zeros elsewhere.

    Args:
      lhs: [m, k]. With `lhs_scale` ([m, ceil(k / 128)]): FP8 with 1 x 128 tile scales.
      rhs: [num_local, k, n], or [num_local, n, k] if `transpose_rhs`. With `rhs_scale`
        ([num_local, ceil(k / 128), ceil(n / 128)], transposed likewise): 128 x 128 block scales.
      group_sizes: [num_groups] int32.
      preferred_element_type: output dtype; default lhs.dtype (bf16 for FP8 inputs).

    Returns:
      [m, n]. FP8 operands are dequantized to fp32 first; accumulation is fp32.
    """
    out_dtype = jnp.dtype(preferred_element_type or _default_out_dtype(lhs.dtype))
    if lhs_scale is not None:
        lhs = fp8_reference.dequantize_rowwise(lhs, lhs_scale)
    if rhs_scale is not None:
        rhs = fp8_reference.dequantize_blockwise(rhs, rhs_scale)
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    masks = _local_masks(group_sizes, lhs.shape[0], rhs.shape[0], group_offset)
    lhs32, rhs32 = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    per_group = jnp.einsum("mk,gkn->gmn", lhs32, rhs32, precision=_HIGHEST)
    out = jnp.sum(jnp.where(masks[:, :, None], per_group, 0.0), axis=0)
    return out.astype(out_dtype)


def tgmm_reference(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    num_local: int | None = None,
    group_offset: int | jax.Array = 0,
    preferred_element_type: DTypeLike = jnp.float32,
) -> jax.Array:
    """[num_local, k, n]: per local group g, lhs[rows of g]^T @ grad[rows of g] (zeros if empty).

    Args:
      lhs: [m, k]; grad: [m, n]; group_sizes: [num_groups] int32.
      num_local: groups in the output (default all), starting at global group `group_offset`.
    """
    num_local = group_sizes.shape[0] if num_local is None else num_local
    masks = _local_masks(group_sizes, lhs.shape[0], num_local, group_offset)
    lhs32 = jnp.where(masks[:, :, None], lhs.astype(jnp.float32)[None], 0.0)  # [g, m, k]
    out = jnp.einsum("gmk,mn->gkn", lhs32, grad.astype(jnp.float32), precision=_HIGHEST)
    return out.astype(preferred_element_type)


def _default_out_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype).itemsize == 1 else jnp.dtype(dtype)
