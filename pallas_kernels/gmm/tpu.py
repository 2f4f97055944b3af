"""Mosaic (TPU) kernels for the grouped matmul (gmm) and its transposed form (tgmm).

gmm: out [m, c] = lhs [m, r] @ rhs[g] ([r, c], or [c, r] read transposed), per row group.
  Grid (c blocks "parallel", visits, r blocks); `metadata.gmm_schedule` lists the visits. Each
  visit accumulates its row tile times its group's weights over the r blocks in an fp32 VMEM
  accumulator and, at the last r block, stores the rows that belong to its group: a select
  against the output block, which stays resident in VMEM while consecutive visits of a
  straddling tile fill in their rows. The first visit of a tile zeroes the rows no visit owns
  (padding, other shards' groups). Row sub-tiles of `sub_m` rows that miss the visited group are
  skipped, so straddling costs ~sub_m rows per group boundary, not tm.
tgmm: out [g, k, n] = lhs[rows of g]^T @ grad[rows of g]. Grid (k blocks, n blocks, visits),
  visits group-major (`metadata.tgmm_schedule`): the accumulator is zeroed at a group's first
  visit and stored at its last; rows of other groups are masked (select) in both operands.

Partial blocks: Pallas clips the DMA of a block that overhangs its array, leaving the overhang
of the VMEM buffer undefined. Overhanging rows only ever meet masked-out rows; an overhanging
reduction block is masked in both operands (a select, so garbage NaNs cannot leak); overhanging
output columns are never written back.

FP8: with `lhs_scale` ([m, r / 128], per 1 x 128 tile) and `rhs_scale` (expanded to
[num_local, r / 128, c], the 128 x 128 block scale of each output column), each 128-deep slice
of the reduction block is multiplied separately (operands upcast to bf16, exact for E4M3) and
added to the accumulator times its two scales. The scale of slice j is picked out of the
resident scale blocks with a masked reduction, which Mosaic lowers without dynamic lane slicing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import out_struct, vary_like, varying_axes
from pallas_kernels.gmm.cost import gmm_cost, tgmm_cost
from pallas_kernels.gmm.metadata import Schedule
from pallas_kernels.gmm.tuning import Tiling, gmm_vmem_bytes, tgmm_vmem_bytes

_SCALE_BLOCK = 128
_MIN_VMEM_LIMIT = 32 << 20
_MAX_VMEM_LIMIT = 60 << 20  # Under v5p's 64 MiB per core.
_VMEM_MARGIN = 6 << 20  # Mosaic's internal scratch and relayout temporaries.


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _vmem_limit(estimate: int) -> int:
    """The scoped VMEM limit for a kernel whose blocks and values need `estimate` bytes."""
    return int(min(max(estimate + _VMEM_MARGIN, _MIN_VMEM_LIMIT), _MAX_VMEM_LIMIT))


def _compute_dtype(*dtypes) -> jnp.dtype:
    dtype = jnp.result_type(*dtypes)
    return jnp.dtype(jnp.bfloat16) if dtype.itemsize == 1 else dtype


def _row_range(sched: Schedule, v, tm: int):
    """[lo, hi): the rows of visit v's tile that belong to its group (empty for zero visits)."""
    group = sched.visit_group[v]
    safe = jnp.maximum(group, 0)
    row0 = sched.visit_tile[v] * tm
    lo = jnp.clip(sched.group_offsets[safe] - row0, 0, tm)
    hi = jnp.clip(sched.group_offsets[safe + 1] - row0, 0, tm)
    return lo, jnp.where(group >= 0, hi, lo)


def _sub_tiles(tm: int, sub_m: int):
    sub = sub_m or tm
    return [(s * sub, sub) for s in range(tm // sub)]


def _select_lane(block: jax.Array, idx) -> jax.Array:
    """block[:, idx:idx + 1] for a traced idx, as a masked lane reduction."""
    lanes = jax.lax.broadcasted_iota(jnp.int32, block.shape, 1)
    return jnp.sum(jnp.where(lanes == idx, block, 0.0), axis=1, keepdims=True)


def _select_sublane(block: jax.Array, idx) -> jax.Array:
    """block[idx:idx + 1, :] for a traced idx, as a masked sublane reduction."""
    rows = jax.lax.broadcasted_iota(jnp.int32, block.shape, 0)
    return jnp.sum(jnp.where(rows == idx, block, 0.0), axis=0, keepdims=True)


def _gmm_kernel(
    sched,
    group_offset,
    lhs_ref,
    rhs_ref,
    *rest,
    tiling: Tiling,
    r: int,
    tr: int,
    transpose_rhs: bool,
    scaled: bool,
    compute_dtype,
):
    if scaled:
        lhs_scale_ref, rhs_scale_ref, out_ref, acc_ref = rest
    else:
        out_ref, acc_ref = rest
    del group_offset
    tm = tiling.tm
    v, r_i = pl.program_id(1), pl.program_id(2)
    lo, hi = _row_range(sched, v, tm)
    w_red_axis = 1 if transpose_rhs else 0

    @pl.when(r_i == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def mask_reduction(x, axis, start):
        if r % tr == 0:
            return x
        idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) + start
        return jnp.where(idx < r - r_i * tr, x, jnp.zeros_like(x))

    def dot(x, w):
        dims = (((1,), (w_red_axis,)), ((), ()))
        return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    for row, rows in _sub_tiles(tm, tiling.sub_m):

        @pl.when((row < hi) & (row + rows > lo))
        def _accumulate(row=row, rows=rows):
            x = lhs_ref[row : row + rows, :].astype(compute_dtype)
            w = rhs_ref[...].astype(compute_dtype)
            if not scaled:
                x, w = mask_reduction(x, 1, 0), mask_reduction(w, w_red_axis, 0)
                acc_ref[row : row + rows, :] += dot(x, w)
                return
            lhs_scale = lhs_scale_ref[row : row + rows, :]  # [rows, r / 128]
            rhs_scale = rhs_scale_ref[...]  # [r / 128, tc]
            part_sum = jnp.zeros((rows, acc_ref.shape[1]), jnp.float32)
            for j in range(_cdiv(tr, _SCALE_BLOCK)):
                lo_j, hi_j = j * _SCALE_BLOCK, min((j + 1) * _SCALE_BLOCK, tr)
                xj = mask_reduction(x[:, lo_j:hi_j], 1, lo_j)
                wj = w[:, lo_j:hi_j] if transpose_rhs else w[lo_j:hi_j, :]
                wj = mask_reduction(wj, w_red_axis, lo_j)
                idx = r_i * (tr // _SCALE_BLOCK) + j
                scale = _select_lane(lhs_scale, idx) * _select_sublane(rhs_scale, idx)
                part_sum += dot(xj, wj) * scale
            acc_ref[row : row + rows, :] += part_sum

    @pl.when(r_i == pl.num_programs(2) - 1)
    def _store():
        tile = sched.visit_tile[v]
        first = (v == 0) | (sched.visit_tile[jnp.maximum(v - 1, 0)] != tile)
        rows = jax.lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
        mine = (rows >= lo) & (rows < hi)
        prev = jnp.where(first, 0.0, out_ref[...].astype(jnp.float32))
        out_ref[...] = jnp.where(mine, acc_ref[...], prev).astype(out_ref.dtype)


def gmm_call(
    lhs: jax.Array,
    rhs: jax.Array,
    sched: Schedule,
    group_offset: jax.Array,
    *,
    tiling: Tiling,
    transpose_rhs: bool,
    out_dtype,
    lhs_scale: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
    interpret=False,
) -> jax.Array:
    """out [m, c] = lhs [m, r] @ rhs[g] per visit of `sched`. rhs: [L, r, c] or [L, c, r].

    `tiling` is in this call's terms: tm rows, tk = reduction block, tn = output column block.
    `rhs_scale`, when given, is the expanded [L, r / 128, c] form (see the module docstring).
    """
    m, r = lhs.shape
    c = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tr, tc = tiling.tm, tiling.tk, tiling.tn
    num_r = _cdiv(r, tr)
    scaled = lhs_scale is not None
    compute_dtype = _compute_dtype(lhs.dtype, rhs.dtype)

    def reduction_block(v, r_i, s):
        return jnp.where(s.fetch_k[v] < 0, r_i, s.fetch_k[v])

    def lhs_map(c_i, v, r_i, s, goff):
        return s.fetch_tile[v], reduction_block(v, r_i, s)

    def rhs_map(c_i, v, r_i, s, goff):
        group = s.fetch_group[v] - goff[0]
        k_blk = reduction_block(v, r_i, s)
        return (group, c_i, k_blk) if transpose_rhs else (group, k_blk, c_i)

    def out_map(c_i, v, r_i, s, goff):
        return s.visit_tile[v], c_i

    rhs_block = (None, tc, tr) if transpose_rhs else (None, tr, tc)
    in_specs = [pl.BlockSpec((tm, tr), lhs_map), pl.BlockSpec(rhs_block, rhs_map)]
    operands = [lhs, rhs]
    if scaled:
        num_scales = lhs_scale.shape[1]
        in_specs += [
            pl.BlockSpec((tm, num_scales), lambda c_i, v, r_i, s, goff: (s.fetch_tile[v], 0)),
            pl.BlockSpec(
                (None, num_scales, tc),
                lambda c_i, v, r_i, s, goff: (s.fetch_group[v] - goff[0], 0, c_i),
            ),
        ]
        operands += [lhs_scale, rhs_scale]

    kernel = functools.partial(
        _gmm_kernel,
        tiling=tiling,
        r=r,
        tr=tr,
        transpose_rhs=transpose_rhs,
        scaled=scaled,
        compute_dtype=compute_dtype,
    )
    out_itemsize = jnp.dtype(out_dtype).itemsize
    in_bytes = max(lhs.dtype.itemsize, rhs.dtype.itemsize)
    vmem = gmm_vmem_bytes(tiling, in_bytes, out_itemsize, scaled)
    num_c = _cdiv(c, tc)
    cost = gmm_cost(lhs, rhs, c, out_dtype, tc)
    axes = varying_axes(sched, group_offset, *operands)
    call = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, c), out_dtype, axes),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_c, sched.num_visits[0], num_r),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tc), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tc), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(vmem),
        ),
        interpret=interpret,
        cost_estimate=cost,
        name="gmm_transposed_rhs" if transpose_rhs else "gmm",
    )
    return call(*vary_like((sched, group_offset.reshape(1), *operands), axes))


def _tgmm_kernel(
    sched, group_offset, lhs_ref, grad_ref, out_ref, acc_ref, *, tiling, compute_dtype
):
    del group_offset
    tm = tiling.tm
    v = pl.program_id(2)
    last_v = sched.visit_group.shape[0] - 1
    group = sched.visit_group[v]
    first = (v == 0) | (sched.visit_group[jnp.maximum(v - 1, 0)] != group)
    last = (v == sched.num_visits[0] - 1) | (sched.visit_group[jnp.minimum(v + 1, last_v)] != group)
    lo, hi = _row_range(sched, v, tm)

    @pl.when(first)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    for row, rows in _sub_tiles(tm, tiling.sub_m):

        @pl.when((row < hi) & (row + rows > lo))
        def _accumulate(row=row, rows=rows):
            x = lhs_ref[row : row + rows, :].astype(compute_dtype)
            dy = grad_ref[row : row + rows, :].astype(compute_dtype)
            idx = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) + row
            mine = (idx >= lo) & (idx < hi)
            x = jnp.where(mine, x, jnp.zeros_like(x))
            dy = jnp.where(mine, dy, jnp.zeros_like(dy))
            dims = (((0,), (0,)), ((), ()))
            acc_ref[...] += jax.lax.dot_general(x, dy, dims, preferred_element_type=jnp.float32)

    @pl.when(last)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_call(
    lhs: jax.Array,
    grad: jax.Array,
    sched: Schedule,
    group_offset: jax.Array,
    *,
    num_local: int,
    tiling: Tiling,
    out_dtype,
    interpret=False,
) -> jax.Array:
    """out [num_local, k, n]: per local group, lhs[rows]^T @ grad[rows] (zeros if empty)."""
    m, k = lhs.shape
    n = grad.shape[1]
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    kernel = functools.partial(
        _tgmm_kernel, tiling=tiling, compute_dtype=_compute_dtype(lhs.dtype, grad.dtype)
    )
    num_k, num_n = _cdiv(k, tk), _cdiv(n, tn)
    out_itemsize = jnp.dtype(out_dtype).itemsize
    in_bytes = max(lhs.dtype.itemsize, grad.dtype.itemsize)
    vmem = tgmm_vmem_bytes(tiling, in_bytes, out_itemsize)
    cost = tgmm_cost(lhs, grad, num_local, out_dtype, tk, tn)
    axes = varying_axes(sched, group_offset, lhs, grad)
    call = pl.pallas_call(
        kernel,
        out_shape=out_struct((num_local, k, n), out_dtype, axes),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_k, num_n, sched.num_visits[0]),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda k_i, n_i, v, s, goff: (s.fetch_tile[v], k_i)),
                pl.BlockSpec((tm, tn), lambda k_i, n_i, v, s, goff: (s.fetch_tile[v], n_i)),
            ],
            out_specs=pl.BlockSpec(
                (None, tk, tn),
                lambda k_i, n_i, v, s, goff: (s.visit_group[v] - goff[0], k_i, n_i),
            ),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(vmem),
        ),
        interpret=interpret,
        cost_estimate=cost,
        name="tgmm",
    )
    return call(*vary_like((sched, group_offset.reshape(1), lhs, grad), axes))
