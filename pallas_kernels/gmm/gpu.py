"""Triton (NVIDIA GPU) kernels for the grouped matmul (gmm) and its transposed form (tgmm).

Pallas's Triton backend has no scalar prefetch, no dynamic grid and no block index maps that
read memory, so the kernels index their operands themselves: every operand is passed whole (a
pointer into global memory) and each program loads its blocks with `plgpu.load` at offsets it
computes from the schedule, masking rows and columns that fall outside. A masked-out element is
never read (Triton predicates the load), which also covers blocks overhanging the arrays, so
m, k and n need no padding. Triton's `dot` becomes wgmma on Hopper (mma on Ampere).

gmm: out [m, c] = lhs [m, r] @ rhs[g] ([r, c], or [c, r] read transposed), per row group.
  Grid (c blocks, max visits), static: `metadata.gmm_schedule` lists the visits (row tile,
  group), the same tile-major list as the TPU kernel; programs past `num_visits` exit. A visit
  loops over the reduction in `tk` steps (an scf.for that Triton software-pipelines), with the
  rows of other groups masked out of the lhs load, and stores only its group's rows, so the
  visits of a tile straddling groups write disjoint rows and need no ordering. The first visit
  of each tile also writes zeros to the tile's rows outside the local groups (padding rows,
  rows of other shards' experts); a tile with no local rows gets one zero visit that does only
  that. Straddling costs up to tm computed rows per group boundary.
tgmm: out [g, k, n] = lhs[rows of g]^T @ grad[rows of g]. Grid (k blocks, n blocks, local
  groups): each program reduces its group's rows in `tm` steps starting at the group's first row
  (global-memory loads need no tile alignment, so no visit list and no straddling waste), and
  stores its [tk, tn] block once; an empty group runs zero steps and stores zeros.

Numerics: accumulation in fp32; fp32 operands multiply at full fp32 precision (IEEE, not TF32),
16-bit ones natively. FP8: with `lhs_scale` ([m, r / 128]) and `rhs_scale` (expanded to
[num_local, r / 128, c], as for the TPU kernel), tk must divide 128, so each reduction step has
one scale per row and one per column: acc += (x @ w) * lhs_scale[rows] * rhs_scale[cols]. Two
E4M3 operands go into Triton's dot as they are (FP8 tensor-core instructions on compute
capability >= 8.9; `native_fp8_dot`); on older GPUs they are upcast to bf16 in registers
(exact) first. Either way each product is exact and the sums are fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import fp8_capable, out_struct, vary_like, varying_axes
from pallas_kernels.gmm.cost import gmm_cost, tgmm_cost
from pallas_kernels.gmm.metadata import Schedule
from pallas_kernels.gmm.tuning import GpuTiling

_SCALE_BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def native_fp8_dot() -> bool:
    """Whether Triton may multiply E4M3 operands natively (compute capability >= 8.9: Ada,
    Hopper, Blackwell). Without an attached GPU (interpret mode, export for CUDA) we assume our
    Hopper target."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return True
    return fp8_capable(device)


def _compute_dtype(*dtypes) -> jnp.dtype:
    """The dtype the dot sees: E4M3 pairs stay E4M3 where the GPU multiplies them natively
    (exact products, fp32 accumulation), other 1-byte types go to bf16 (exact for E4M3)."""
    dtype = jnp.result_type(*dtypes)
    if dtype.itemsize != 1:
        return dtype
    if all(jnp.dtype(d) == jnp.float8_e4m3fn for d in dtypes) and native_fp8_dot():
        return jnp.dtype(jnp.float8_e4m3fn)
    return jnp.dtype(jnp.bfloat16)


def _dot(x, w, dims):
    """fp32-accumulated dot; fp32 operands at IEEE precision (the default would be TF32)."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        x, w, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _span(start, size: int):
    """[size] int32: start, start + 1, ..."""
    return start + jax.lax.iota(jnp.int32, size)


def _gmm_kernel(
    group_offsets_ref,  # [num_groups + 1]
    visit_tile_ref,  # [max_visits]
    visit_group_ref,  # [max_visits]
    num_visits_ref,  # [1]
    group_offset_ref,  # [1]
    lhs_ref,  # [m, r]
    rhs_ref,  # [L, r, c] or [L, c, r]
    *rest,
    tiling: GpuTiling,
    transpose_rhs: bool,
    scaled: bool,
    compute_dtype,
):
    if scaled:
        lhs_scale_ref, rhs_scale_ref, out_ref = rest  # [m, r / 128], [L, r / 128, c]
    else:
        (out_ref,) = rest  # [m, c]
    tm, tr, tc = tiling.tm, tiling.tk, tiling.tn
    (m, r), c = lhs_ref.shape, out_ref.shape[1]
    num_local, num_groups = rhs_ref.shape[0], group_offsets_ref.shape[0] - 1
    c_i, v = pl.program_id(0), pl.program_id(1)

    @pl.when(v < num_visits_ref[0])
    def _visit():
        tile, group = visit_tile_ref[v], visit_group_ref[v]
        goff = group_offset_ref[0]
        real = group >= 0  # Else a zero visit: no local rows in the tile.
        safe_group = jnp.maximum(group, 0)
        lo = jnp.where(real, group_offsets_ref[safe_group], 0)
        hi = jnp.where(real, group_offsets_ref[safe_group + 1], 0)
        local_lo = group_offsets_ref[jnp.minimum(goff, num_groups)]
        local_hi = group_offsets_ref[jnp.minimum(goff + num_local, num_groups)]
        first = (v == 0) | (visit_tile_ref[jnp.maximum(v - 1, 0)] != tile)

        row0, col0 = tile * tm, c_i * tc
        rows, cols = _span(row0, tm), _span(col0, tc)  # [tm], [tc]
        mine = (rows >= lo) & (rows < hi)  # [tm]
        col_ok = cols < c  # [tc]
        g = jnp.clip(group - goff, 0, num_local - 1)  # rhs[g]: [r, c] or [c, r].

        def step(r_i, acc):  # acc: [tm, tc] fp32
            k0 = r_i * tr
            ks = _span(k0, tr)  # [tr]
            x = plgpu.load(
                lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tr)],
                mask=mine[:, None] & (ks < r)[None, :],
                other=0.0,
            ).astype(compute_dtype)  # [tm, tr]
            if transpose_rhs:
                w = plgpu.load(
                    rhs_ref.at[g, pl.ds(col0, tc), pl.ds(k0, tr)],
                    mask=col_ok[:, None] & (ks < r)[None, :],
                    other=0.0,
                )  # [tc, tr]
                part = _dot(x, w.astype(compute_dtype), ((1,), (1,)))
            else:
                w = plgpu.load(
                    rhs_ref.at[g, pl.ds(k0, tr), pl.ds(col0, tc)],
                    mask=(ks < r)[:, None] & col_ok[None, :],
                    other=0.0,
                )  # [tr, tc]
                part = _dot(x, w.astype(compute_dtype), ((1,), (0,)))
            if scaled:
                s = k0 // _SCALE_BLOCK
                row_scale = plgpu.load(lhs_scale_ref.at[pl.ds(row0, tm), s], mask=mine, other=0.0)
                col_scale = plgpu.load(
                    rhs_scale_ref.at[g, s, pl.ds(col0, tc)],
                    mask=col_ok,
                    other=0.0,
                )
                part = part * row_scale[:, None] * col_scale[None, :]
            return acc + part

        # int32 on both sides: with weak-typed Python ints, Triton's scf.for bounds disagree.
        num_steps = jnp.where(real, jnp.int32(_cdiv(r, tr)), jnp.int32(0))
        acc = jax.lax.fori_loop(0, num_steps, step, jnp.zeros((tm, tc), jnp.float32))
        outside = first & ((rows < local_lo) | (rows >= local_hi))  # Rows no visit owns.
        plgpu.store(
            out_ref.at[pl.ds(row0, tm), pl.ds(col0, tc)],
            jnp.where(mine[:, None], acc, 0.0).astype(out_ref.dtype),
            mask=((mine | outside) & (rows < m))[:, None] & col_ok[None, :],
        )


def gmm_call(
    lhs: jax.Array,
    rhs: jax.Array,
    sched: Schedule,
    group_offset: jax.Array,
    *,
    tiling: GpuTiling,
    transpose_rhs: bool,
    out_dtype,
    lhs_scale: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """out [m, c] = lhs [m, r] @ rhs[g] per visit of `sched`. rhs: [L, r, c] or [L, c, r].

    `tiling` is in this call's terms: tm rows, tk = reduction step, tn = output column block.
    `rhs_scale`, when given, is the expanded [L, r / 128, c] form (see the module docstring).
    """
    m, r = lhs.shape
    c = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    scaled = lhs_scale is not None
    if scaled and _SCALE_BLOCK % tiling.tk:
        raise ValueError(f"FP8 gmm on GPU needs tiling.tk <= 128 (got {tiling.tk}).")
    operands = [lhs, rhs] + ([lhs_scale, rhs_scale] if scaled else [])
    schedule = (sched.group_offsets, sched.visit_tile, sched.visit_group, sched.num_visits)
    kernel = functools.partial(
        _gmm_kernel,
        tiling=tiling,
        transpose_rhs=transpose_rhs,
        scaled=scaled,
        compute_dtype=_compute_dtype(lhs.dtype, rhs.dtype),
    )
    cost = gmm_cost(lhs, rhs, c, out_dtype, tiling.tn)
    axes = varying_axes(sched, group_offset, *operands)
    call = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, c), out_dtype, axes),
        grid=(_cdiv(c, tiling.tn), sched.visit_tile.shape[0]),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.num_warps, num_stages=tiling.num_stages
        ),
        interpret=interpret,
        cost_estimate=cost,
        name="gmm_transposed_rhs" if transpose_rhs else "gmm",
    )
    return call(*vary_like((*schedule, group_offset.reshape(1), *operands), axes))


def _tgmm_kernel(
    group_offsets_ref,  # [num_groups + 1]
    group_offset_ref,  # [1]
    lhs_ref,  # [m, k]
    grad_ref,  # [m, n]
    out_ref,  # [L, k, n]
    *,
    tiling: GpuTiling,
    compute_dtype,
):
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    (k, n), num_groups = out_ref.shape[1:], group_offsets_ref.shape[0] - 1
    k_i, n_i, local = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    group = group_offset_ref[0] + local
    exists = group < num_groups
    start = group_offsets_ref[jnp.minimum(group, num_groups)]
    end = jnp.where(exists, group_offsets_ref[jnp.minimum(group + 1, num_groups)], start)
    ks, ns = _span(k_i * tk, tk), _span(n_i * tn, tn)  # [tk], [tn]

    def step(i, acc):  # acc: [tk, tn] fp32
        row0 = start + i * tm
        in_group = _span(row0, tm) < end  # [tm]
        x = plgpu.load(
            lhs_ref.at[pl.ds(row0, tm), pl.ds(k_i * tk, tk)],
            mask=in_group[:, None] & (ks < k)[None, :],
            other=0.0,
        )  # [tm, tk]
        dy = plgpu.load(
            grad_ref.at[pl.ds(row0, tm), pl.ds(n_i * tn, tn)],
            mask=in_group[:, None] & (ns < n)[None, :],
            other=0.0,
        )  # [tm, tn]
        return acc + _dot(x.astype(compute_dtype), dy.astype(compute_dtype), ((0,), (0,)))

    num_steps = (end - start + tm - 1) // tm
    acc = jax.lax.fori_loop(0, num_steps, step, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(
        out_ref.at[local, pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)],
        acc.astype(out_ref.dtype),
        mask=(ks < k)[:, None] & (ns < n)[None, :],
    )


def tgmm_call(
    lhs: jax.Array,
    grad: jax.Array,
    group_offsets: jax.Array,
    group_offset: jax.Array,
    *,
    num_local: int,
    tiling: GpuTiling,
    out_dtype,
    interpret: bool = False,
) -> jax.Array:
    """out [num_local, k, n]: per local group, lhs[rows]^T @ grad[rows] (zeros if empty).

    group_offsets: [num_groups + 1] int32 (`metadata.group_offsets`).
    """
    m, k = lhs.shape
    n = grad.shape[1]
    kernel = functools.partial(
        _tgmm_kernel, tiling=tiling, compute_dtype=_compute_dtype(lhs.dtype, grad.dtype)
    )
    num_k, num_n = _cdiv(k, tiling.tk), _cdiv(n, tiling.tn)
    cost = tgmm_cost(lhs, grad, num_local, out_dtype, tiling.tk, tiling.tn)
    axes = varying_axes(group_offsets, group_offset, lhs, grad)
    call = pl.pallas_call(
        kernel,
        out_shape=out_struct((num_local, k, n), out_dtype, axes),
        grid=(num_k, num_n, num_local),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.num_warps, num_stages=tiling.num_stages
        ),
        interpret=interpret,
        cost_estimate=cost,
        name="tgmm",
    )
    return call(*vary_like((group_offsets, group_offset.reshape(1), lhs, grad), axes))
