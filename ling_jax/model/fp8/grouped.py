"""FP8 grouped matmul for the routed experts, on every grouped-matmul backend.

    forward   out  = gmm(Q_row(lhs), Q_block(w))        w: [E, k, n], 128 x 128 blocks per expert
    dgrad     dlhs = gmm(Q_row(dout), Q_block(w)^T)
    wgrad     dw   = tgmm(Q_col(lhs), Q_col(dout))      wgrad="fp8": 1 x 128 tiles along each
                                                        expert's own rows (a tile never spans
                                                        two experts), else in the input dtype

`moe.backend = "pallas"` with a native mode and wgrad="input" runs the Pallas FP8 kernel
`pallas_kernels.fp8.gmm_fp8` (E4M3 operands: Mosaic kernels on TPU, Triton on GPU). Every
other combination emulates: quantize -> dequantize to fp32, then the configured grouped matmul
in fp32 at HIGHEST precision under a `custom_vjp` that quantizes the gradients as above.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ling_jax.model.moe.grouped_matmul import grouped_matmul
from pallas_kernels.common import match_cotangent
from pallas_kernels.fp8 import gmm_fp8
from pallas_kernels.fp8 import reference as ref

TILE = ref.BLOCK


def qdq_rowwise(x: jax.Array, pow2: bool) -> jax.Array:
    """[m, k] -> fp32 quantize -> dequantize round trip in 1 x 128 tiles along k."""
    return ref.dequantize_rowwise(*ref.quantize_rowwise(x, power_of_two_scale=pow2))


def qdq_blockwise(w: jax.Array, pow2: bool) -> jax.Array:
    """[..., k, n] -> fp32 round trip in 128 x 128 blocks of the last two dims."""
    return ref.dequantize_blockwise(*ref.quantize_blockwise(w, power_of_two_scale=pow2))


def qdq_columns_per_group(x: jax.Array, group_sizes: jax.Array, pow2: bool) -> jax.Array:
    """[m, k] rows sorted by group -> fp32 round trip in 128 x 1 tiles along the rows.

    Tiles start at each group's first row, so no tile mixes two groups' rows (the operands of
    a per-group wgrad). Rows past sum(group_sizes) come back as zeros.
    """
    m = x.shape[0]
    num_groups = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    tiles = (sizes + TILE - 1) // TILE
    first_tile = jnp.cumsum(tiles) - tiles
    num_tiles = -(-m // TILE) + num_groups  # Static worst case: every group ends mid-tile.
    row = jnp.arange(m, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), num_groups - 1)
    tile = first_tile[group] + (row - starts[group]) // TILE
    tile = jnp.where(row < ends[-1], tile, num_tiles)  # Out of range: dropped below.
    xf = x.astype(jnp.float32)
    amax = jax.ops.segment_max(jnp.abs(xf), tile, num_segments=num_tiles)  # [tiles, k]
    scale = ref.compute_scale(jnp.maximum(amax, 0.0), pow2)  # Empty tiles: -inf -> 0 -> 1.
    row_scale = jnp.take(scale, tile, axis=0, mode="fill", fill_value=0.0)  # [m, k]
    safe = jnp.where(row_scale == 0, 1.0, row_scale)
    return ref.e4m3_values(ref.scale_and_cast(xf, safe)) * row_scale


def _gmm(lhs, rhs, group_sizes, backend, tile_rows, out_dtype):
    with jax.default_matmul_precision("highest"):
        return grouped_matmul(
            lhs,
            rhs,
            group_sizes,
            backend=backend,
            tile_rows=tile_rows,
            preferred_element_type=out_dtype,
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _emulated(lhs, rhs, group_sizes, backend, tile_rows, pow2, wgrad_fp8, out_dtype):
    return _emulated_fwd(lhs, rhs, group_sizes, backend, tile_rows, pow2, wgrad_fp8, out_dtype)[0]


def _emulated_fwd(lhs, rhs, group_sizes, backend, tile_rows, pow2, wgrad_fp8, out_dtype):
    wq, ws = ref.quantize_blockwise(rhs, power_of_two_scale=pow2)
    w = ref.dequantize_blockwise(wq, ws)
    out = _gmm(qdq_rowwise(lhs, pow2), w, group_sizes, backend, tile_rows, out_dtype)
    rhs_dtype_token = jnp.zeros((0,), rhs.dtype)  # Residuals must be arrays.
    return out, (lhs, wq, ws, group_sizes, rhs_dtype_token)


def _emulated_bwd(backend, tile_rows, pow2, wgrad_fp8, out_dtype, residuals, dout):
    del out_dtype
    lhs, wq, ws, group_sizes, rhs_dtype_token = residuals
    w = ref.dequantize_blockwise(wq, ws)  # The transpose is built on demand from the blocks.
    wt = jnp.swapaxes(w, 1, 2)
    dlhs = _gmm(qdq_rowwise(dout, pow2), wt, group_sizes, backend, tile_rows, lhs.dtype)
    if wgrad_fp8:
        x = qdq_columns_per_group(lhs, group_sizes, pow2)
        g = qdq_columns_per_group(dout, group_sizes, pow2)
    else:
        x, g = lhs, dout.astype(lhs.dtype)
    _, vjp = jax.vjp(
        lambda w_: _gmm(x, w_.astype(x.dtype), group_sizes, backend, tile_rows, g.dtype), w
    )
    (dw,) = vjp(g)
    dw = match_cotangent(dw.astype(rhs_dtype_token.dtype), wq)
    return match_cotangent(dlhs, lhs), dw, None


_emulated.defvjp(_emulated_fwd, _emulated_bwd)


def fp8_grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str,
    native: bool,
    tile_rows: int = 0,
    power_of_two_scale: bool = False,
    wgrad_fp8: bool = True,
    out_dtype=None,
) -> jax.Array:
    """`grouped_matmul` in FP8. lhs: [m, k] rows sorted by group; rhs: [E, k, n] -> [m, n]."""
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if backend == "pallas" and native and not wgrad_fp8:
        return gmm_fp8(
            lhs,
            rhs,
            group_sizes,
            preferred_element_type=out_dtype,
            power_of_two_scale=power_of_two_scale,
            interpret=jax.default_backend() not in ("tpu", "gpu"),
        )
    return _emulated(
        lhs, rhs, group_sizes, backend, tile_rows, power_of_two_scale, wgrad_fp8, out_dtype
    )


def experts_run_native(backend: str, native: bool, wgrad_fp8: bool) -> bool:
    """Whether `fp8_grouped_matmul` feeds E4M3 operands to a kernel (else it emulates)."""
    return backend == "pallas" and native and not wgrad_fp8
