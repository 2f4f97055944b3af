"""Mosaic (TPU) kernels for FP8 quantization with 1 x 128 tile and 128 x 128 block scales.

Both kernels read each element once and write its E4M3 value and the tile/block scales in the
same pass (XLA would read the input twice: once for the amax reduction, once for the cast). The
arithmetic is `reference.compute_scale` / `reference.scale_and_cast`, so the results are
bit-identical to the jnp reference.

rowwise: grid over row blocks of `tm` rows with the whole k extent per step; each 1 x 128 tile
  is a static lane slice, so a partial last tile is just a narrower slice. The [tm, k / 128]
  scale block is assembled with selects (no dynamic lane writes).
blockwise: x viewed as [batch, k, n] (batch = experts, 1 for a plain matrix); grid over
  (batch blocks of `gb`, 128-row blocks) with the whole n extent per step. The block scale goes
  to a [batch, k / 128, 1, n / 128] array: its last two dims are full-extent, which is what lets a
  one-row scale block satisfy Mosaic's (8, 128) block rule.
Rows or batch entries of a partial last block are garbage in VMEM: they are excluded from the
amax (select), and their outputs are never written back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import out_struct, varying_axes
from pallas_kernels.fp8.reference import FP8_DTYPE, cdiv, compute_scale, scale_and_cast

_STEP_BYTES = 4 << 20  # Input + output bytes per grid step (double-buffered by Pallas).


def _rowwise_kernel(x_ref, q_ref, s_ref, *, k: int, tile: int, power_of_two_scale: bool):
    x = x_ref[...].astype(jnp.float32)  # [tm, k]
    num_tiles = cdiv(k, tile)
    lanes = jax.lax.broadcasted_iota(jnp.int32, s_ref.shape, 1)
    scales = jnp.zeros(s_ref.shape, jnp.float32)
    for j in range(num_tiles):
        lo, hi = j * tile, min((j + 1) * tile, k)
        xj = x[:, lo:hi]
        scale = compute_scale(jnp.max(jnp.abs(xj), axis=1, keepdims=True), power_of_two_scale)
        q_ref[:, lo:hi] = scale_and_cast(xj, scale)
        scales = jnp.where(lanes == j, scale, scales)
    s_ref[...] = scales


def rowwise_row_block(m: int, k: int, itemsize: int) -> int:
    """Rows per step: a multiple of 32 (E4M3 sublane tiling) within `_STEP_BYTES`, or m."""
    rows = max(32, _STEP_BYTES // (k * (itemsize + 1)) // 32 * 32)
    return m if m <= rows else min(rows, 1024)


def quantize_rowwise(
    x: jax.Array, tile: int = 128, power_of_two_scale: bool = False, *, interpret=False
) -> tuple[jax.Array, jax.Array]:
    """Kernel form of `reference.quantize_rowwise`: x [m, k] -> (q [m, k], scale [m, k / tile])."""
    m, k = x.shape
    num_tiles = cdiv(k, tile)
    tm = rowwise_row_block(m, k, x.dtype.itemsize)
    kernel = functools.partial(
        _rowwise_kernel, k=k, tile=tile, power_of_two_scale=power_of_two_scale
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            out_struct((m, k), FP8_DTYPE, varying_axes(x)),
            out_struct((m, num_tiles), jnp.float32, varying_axes(x)),
        ),
        grid=(cdiv(m, tm),),
        in_specs=[pl.BlockSpec((tm, k), lambda i: (i, 0))],
        out_specs=(
            pl.BlockSpec((tm, k), lambda i: (i, 0)),
            pl.BlockSpec((tm, num_tiles), lambda i: (i, 0)),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(
            flops=3 * m * k,
            transcendentals=0,
            bytes_accessed=m * k * (x.dtype.itemsize + 1) + m * num_tiles * 4,
        ),
        name="fp8_quantize_rowwise",
    )(x)


def _blockwise_kernel(
    x_ref, q_ref, s_ref, *, k: int, n: int, bk: int, bn: int, power_of_two_scale: bool
):
    x = x_ref[...].astype(jnp.float32)  # [gb, bk, n]
    if k % bk:
        rows = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) + pl.program_id(1) * bk
        x = jnp.where(rows < k, x, 0.0)
    col_amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)  # [gb, 1, n]
    lanes = jax.lax.broadcasted_iota(jnp.int32, s_ref.shape, 2)
    scales = jnp.zeros(s_ref.shape, jnp.float32)  # [gb, 1, n / bn]
    for j in range(cdiv(n, bn)):
        lo, hi = j * bn, min((j + 1) * bn, n)
        amax = jnp.max(col_amax[:, :, lo:hi], axis=2, keepdims=True)  # [gb, 1, 1]
        scale = compute_scale(amax, power_of_two_scale)
        q_ref[:, :, lo:hi] = scale_and_cast(x[:, :, lo:hi], scale)
        scales = jnp.where(lanes == j, scale, scales)
    s_ref[...] = scales


def quantize_blockwise(
    w: jax.Array,
    block: tuple[int, int] = (128, 128),
    power_of_two_scale: bool = False,
    *,
    interpret=False,
) -> tuple[jax.Array, jax.Array]:
    """Kernel form of `reference.quantize_blockwise` for w [..., k, n] (leading dims batched)."""
    *batch, k, n = w.shape
    bk, bn = block
    x = w.reshape(-1, k, n)
    b = x.shape[0]
    kb, nb = cdiv(k, bk), cdiv(n, bn)
    rows = min(bk, k)
    gb = max(1, min(b, _STEP_BYTES // (rows * n * (w.dtype.itemsize + 1))))
    kernel = functools.partial(
        _blockwise_kernel, k=k, n=n, bk=bk, bn=bn, power_of_two_scale=power_of_two_scale
    )
    q, scale = pl.pallas_call(
        kernel,
        out_shape=(
            out_struct((b, k, n), FP8_DTYPE, varying_axes(x)),
            out_struct((b, kb, 1, nb), jnp.float32, varying_axes(x)),
        ),
        grid=(cdiv(b, gb), kb),
        in_specs=[pl.BlockSpec((gb, rows, n), lambda g, i: (g, i, 0))],
        out_specs=(
            pl.BlockSpec((gb, rows, n), lambda g, i: (g, i, 0)),
            pl.BlockSpec((gb, None, 1, nb), lambda g, i: (g, i, 0, 0)),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(
            flops=3 * x.size,
            transcendentals=0,
            bytes_accessed=x.size * (w.dtype.itemsize + 1) + b * kb * nb * 4,
        ),
        name="fp8_quantize_blockwise",
    )(x)
    return q.reshape(*batch, k, n), scale.reshape(*batch, kb, nb)
