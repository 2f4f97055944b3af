"""Public grouped matmuls: `gmm` (differentiable through a custom VJP) and `tgmm`.

    gmm(lhs [m, k], rhs [G_local, k, n], group_sizes [G]) -> [m, n]
    tgmm(lhs [m, k], grad [m, n], group_sizes [G]) -> [G_local, k, n]

Rows of lhs are sorted by group; rows past sum(group_sizes) are padding and produce zeros (and
zero gradients). `group_offset` selects the experts this shard holds: rhs[i] is global group
group_offset + i, and rows of other groups produce zeros, as with expert-sharded weights.

Gradients of gmm: d lhs = gmm(grad, rhs^T), where the transpose is the kernel reading rhs
blocks [tn, tk] and contracting their last dim (no transposed copy of the weights), and
d rhs = tgmm(lhs, grad). Accumulation is fp32 throughout.

Shapes need no padding: m, k, n may be any size (see `tpu.py` / `gpu.py` for how partial
blocks are masked); block sizes come from `tuning.default_tiling` unless `tiling` is given.

Targets: `target="tpu"` runs the Mosaic kernels of `tpu.py`, `target="gpu"` the Triton kernels
of `gpu.py` (forward, d lhs and d rhs alike); the default is "gpu" when jax's default backend
is a GPU, else "tpu". With `interpret=True` either runs on the CPU. On GPU, an unset `tiling`
is chosen per kernel call (`tuning.default_gpu_tiling`: forward, d lhs and d rhs each get
their own blocks); a given one (`GpuTiling`, `Tiling` or a tuple) serves all three as on TPU.

FP8: pass E4M3 operands with `lhs_scale` ([m, ceil(k / 128)], one per 1 x 128 tile) and
`rhs_scale` ([G_local, ceil(k / 128), ceil(n / 128)], one per 128 x 128 block; for
`transpose_rhs` the scale of the stored [n, k] matrices). This form is forward-only; the
differentiable FP8 recipe is `pallas_kernels.fp8.gmm_fp8`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from pallas_kernels.common import match_cotangent
from pallas_kernels.gmm import gpu, metadata, tpu
from pallas_kernels.gmm.tuning import (
    GpuTiling,
    Tiling,
    default_gpu_tiling,
    default_tiling,
    fit_tgmm,
    validate_gpu_tiling,
    validate_tiling,
)

_SCALE_BLOCK = 128
TARGETS = ("tpu", "gpu")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _device_kind() -> str | None:
    return jax.devices()[0].device_kind if jax.default_backend() == "tpu" else None


def resolve_target(target: str | None) -> str:
    if target is None:
        return "gpu" if jax.default_backend() == "gpu" else "tpu"
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS} (or None), got {target!r}.")
    return target


def _resolve_tiling(tiling, m, k, n, dtype, out_dtype, target) -> Tiling | GpuTiling | None:
    if target == "gpu":  # None: each kernel call picks its own (see the module docstring).
        return None if tiling is None else validate_gpu_tiling(tiling)
    if tiling is None:
        return default_tiling(m, k, n, dtype=dtype, out_dtype=out_dtype, device_kind=_device_kind())
    if isinstance(tiling, Tiling):
        return tiling
    if len(tiling) not in (3, 4):
        raise ValueError(f"tiling must be (tm, tk, tn[, sub_m]), got {tiling!r}.")
    return Tiling(*(int(t) for t in tiling))


def _swap_kn(t: Tiling | GpuTiling | None) -> Tiling | GpuTiling | None:
    return None if t is None else t._replace(tk=t.tn, tn=t.tk)


def _gmm_impl(
    lhs,
    rhs,
    group_sizes,
    group_offset,
    out_dtype,
    tiling,
    transpose_rhs,
    interpret,
    target,
    lhs_scale=None,
    rhs_scale=None,
):
    """One kernel call; `tiling` in this call's terms (tk: reduction, tn: output columns)."""
    m, r = lhs.shape
    c = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if target == "gpu":
        num_groups = group_sizes.shape[0]
        t = tiling or default_gpu_tiling(m, r, c, dtype=lhs.dtype, num_groups=num_groups)
        kernel = functools.partial(gpu.gmm_call, interpret=bool(interpret))
    else:
        t = validate_tiling(tiling, m, r, c, scaled=lhs_scale is not None)
        kernel = functools.partial(tpu.gmm_call, interpret=interpret)
    sched = metadata.gmm_schedule(
        group_sizes,
        m=m,
        tm=t.tm,
        num_reduction_blocks=_cdiv(r, t.tk),
        group_offset=group_offset,
        num_local=rhs.shape[0],
    )
    return kernel(
        lhs,
        rhs,
        sched,
        group_offset,
        tiling=t,
        transpose_rhs=transpose_rhs,
        out_dtype=out_dtype,
        lhs_scale=lhs_scale,
        rhs_scale=rhs_scale,
    )


def _tgmm_impl(
    lhs, grad, group_sizes, group_offset, num_local, out_dtype, tiling, interpret, target
):
    m, k = lhs.shape
    n = grad.shape[1]
    if target == "gpu":
        t = tiling or default_gpu_tiling(m, k, n, dtype=lhs.dtype, tgmm=True)
        return gpu.tgmm_call(
            lhs,
            grad,
            metadata.group_offsets(group_sizes),
            group_offset,
            num_local=num_local,
            tiling=t,
            out_dtype=out_dtype,
            interpret=bool(interpret),
        )
    in_bytes = max(lhs.dtype.itemsize, grad.dtype.itemsize)
    t = validate_tiling(tiling, m, k, n)
    t = fit_tgmm(t, k, n, in_bytes, jnp.dtype(out_dtype).itemsize, _device_kind())
    sched = metadata.tgmm_schedule(
        group_sizes, m=m, tm=t.tm, group_offset=group_offset, num_local=num_local
    )
    return tpu.tgmm_call(
        lhs,
        grad,
        sched,
        group_offset,
        num_local=num_local,
        tiling=t,
        out_dtype=out_dtype,
        interpret=interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _gmm(lhs, rhs, group_sizes, group_offset, out_dtype, tiling, transpose_rhs, interpret, target):
    return _gmm_impl(
        lhs, rhs, group_sizes, group_offset, out_dtype, tiling, transpose_rhs, interpret, target
    )


def _gmm_fwd(
    lhs, rhs, group_sizes, group_offset, out_dtype, tiling, transpose_rhs, interpret, target
):
    out = _gmm_impl(
        lhs, rhs, group_sizes, group_offset, out_dtype, tiling, transpose_rhs, interpret, target
    )
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(out_dtype, tiling, transpose_rhs, interpret, target, residuals, grad):
    del out_dtype
    lhs, rhs, group_sizes, group_offset = residuals
    # d lhs [m, k] = grad [m, n] @ rhs_g^T: reduce over n, write k columns.
    dlhs = _gmm_impl(
        grad,
        rhs,
        group_sizes,
        group_offset,
        lhs.dtype,
        _swap_kn(tiling),
        not transpose_rhs,
        interpret,
        target,
    )
    num_local = rhs.shape[0]
    if transpose_rhs:  # rhs_g is [n, k]: its gradient is grad_g^T @ lhs_g.
        drhs = _tgmm_impl(
            grad,
            lhs,
            group_sizes,
            group_offset,
            num_local,
            rhs.dtype,
            _swap_kn(tiling),
            interpret,
            target,
        )
    else:
        drhs = _tgmm_impl(
            lhs, grad, group_sizes, group_offset, num_local, rhs.dtype, tiling, interpret, target
        )
    return match_cotangent(dlhs, lhs), match_cotangent(drhs, rhs), None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _gmm_scaled(
    lhs,
    rhs,
    group_sizes,
    group_offset,
    lhs_scale,
    rhs_scale,
    out_dtype,
    tiling,
    transpose_rhs,
    interpret,
    target,
):
    return _gmm_impl(
        lhs,
        rhs,
        group_sizes,
        group_offset,
        out_dtype,
        tiling,
        transpose_rhs,
        interpret,
        target,
        lhs_scale,
        rhs_scale,
    )


def _gmm_scaled_fwd(*args):
    return _gmm_scaled(*args), None


def _gmm_scaled_bwd(*_):
    raise TypeError(
        "gmm with FP8 operands (lhs_scale/rhs_scale) is forward-only; differentiate "
        "pallas_kernels.fp8.gmm_fp8, which quantizes inside its custom VJP."
    )


_gmm_scaled.defvjp(_gmm_scaled_fwd, _gmm_scaled_bwd)


def _check_group_sizes(group_sizes, num_local):
    if group_sizes.ndim != 1 or group_sizes.dtype != jnp.int32:
        raise ValueError(
            f"group_sizes must be a 1-D int32 array, got {group_sizes.dtype}{group_sizes.shape}."
        )
    if num_local > group_sizes.shape[0]:
        raise ValueError(f"{num_local} local groups but only {group_sizes.shape[0]} group sizes.")


@functools.partial(
    jax.jit,
    static_argnames=("preferred_element_type", "tiling", "transpose_rhs", "interpret", "target"),
)
def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type: DTypeLike | None = None,
    tiling: Tiling | GpuTiling | tuple[int, ...] | None = None,
    group_offset: int | jax.Array = 0,
    transpose_rhs: bool = False,
    lhs_scale: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
    interpret=False,
    target: str | None = None,
) -> jax.Array:
    """Grouped matmul: out[rows of group g] = lhs[rows of g] @ rhs[g - group_offset].

    Args:
      lhs: [m, k], rows sorted by group; fp32, bf16, or E4M3 with `lhs_scale`.
      rhs: [G_local, k, n] ([G_local, n, k] if `transpose_rhs`).
      group_sizes: [G] int32, G >= G_local; sum(group_sizes) <= m.
      preferred_element_type: output dtype; default lhs.dtype (bf16 for FP8 operands).
      tiling: on the forward dims; TPU: `Tiling` or (tm, tk, tn[, sub_m]); GPU: `GpuTiling`
        or (tm, tk, tn[, num_warps[, num_stages]]), powers of two >= 16. Default from `tuning`.
      group_offset: global id of rhs[0] (int or int32 scalar array).
      transpose_rhs: multiply by rhs[g]^T (rhs stored [G_local, n, k]).
      lhs_scale, rhs_scale: FP8 scales (see the module docstring); both or neither.
      interpret: True (or a `pltpu.InterpretParams` for the TPU kernels) runs them on CPU.
      target: "tpu" (Mosaic) or "gpu" (Triton) kernels; default from `jax.default_backend()`.

    Returns:
      [m, n]; rows outside the local groups are zero.
    """
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"gmm expects lhs [m, k] and rhs [g, k, n], got {lhs.shape}, {rhs.shape}.")
    m, k = lhs.shape
    num_local, rhs_k, n = (rhs.shape[0], rhs.shape[2], rhs.shape[1]) if transpose_rhs else rhs.shape
    if rhs_k != k:
        raise ValueError(
            f"gmm contraction dims disagree: lhs {lhs.shape}, rhs {rhs.shape}, "
            f"transpose_rhs={transpose_rhs}."
        )
    _check_group_sizes(group_sizes, num_local)
    scaled = lhs_scale is not None
    if scaled != (rhs_scale is not None):
        raise ValueError("FP8 gmm needs both lhs_scale and rhs_scale.")
    if not scaled and jnp.dtype(lhs.dtype).itemsize == 1:
        raise ValueError(f"lhs has dtype {lhs.dtype}: 8-bit operands need lhs_scale/rhs_scale.")
    out_dtype = jnp.dtype(preferred_element_type or (jnp.bfloat16 if scaled else lhs.dtype))
    target = resolve_target(target)
    t = _resolve_tiling(tiling, m, k, n, lhs.dtype, out_dtype, target)
    goff = jnp.asarray(group_offset, jnp.int32).reshape(())
    if not scaled:
        return _gmm(lhs, rhs, group_sizes, goff, out_dtype, t, transpose_rhs, interpret, target)
    kb = _cdiv(k, _SCALE_BLOCK)
    if lhs_scale.shape != (m, kb):
        raise ValueError(f"lhs_scale must be [m, ceil(k/128)] = {(m, kb)}, got {lhs_scale.shape}.")
    stored = rhs.shape[1:]
    want = (num_local, _cdiv(stored[0], _SCALE_BLOCK), _cdiv(stored[1], _SCALE_BLOCK))
    if rhs_scale.shape != want:
        raise ValueError(f"rhs_scale must be {want} (128x128 blocks), got {rhs_scale.shape}.")
    # Kernel layout: [G_local, k / 128, n], each output column's block scale.
    block_scale = jnp.swapaxes(rhs_scale, 1, 2) if transpose_rhs else rhs_scale
    expanded = jnp.repeat(block_scale, _SCALE_BLOCK, axis=2)[:, :, :n]
    return _gmm_scaled(
        lhs,
        rhs,
        group_sizes,
        goff,
        lhs_scale.astype(jnp.float32),
        expanded.astype(jnp.float32),
        out_dtype,
        t,
        transpose_rhs,
        interpret,
        target,
    )


@functools.partial(
    jax.jit,
    static_argnames=("preferred_element_type", "tiling", "num_local", "interpret", "target"),
)
def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type: DTypeLike = jnp.float32,
    tiling: Tiling | GpuTiling | tuple[int, ...] | None = None,
    group_offset: int | jax.Array = 0,
    num_local: int | None = None,
    interpret=False,
    target: str | None = None,
) -> jax.Array:
    """Per-group lhs^T @ grad, the weight gradient of `gmm`: [num_local, k, n].

    Args:
      lhs: [m, k]; grad: [m, n]; rows sorted by group as for `gmm`.
      group_sizes: [G] int32.
      num_local: groups in the output (default G), global ids group_offset + [0, num_local).
      Others as for `gmm` (tiling on the dims m, k, n).

    Returns:
      [num_local, k, n]; zero for empty groups.
    """
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"tgmm expects lhs [m, k], grad [m, n], got {lhs.shape}, {grad.shape}.")
    num_local = group_sizes.shape[0] if num_local is None else num_local
    _check_group_sizes(group_sizes, num_local)
    (m, k), n = lhs.shape, grad.shape[1]
    out_dtype = jnp.dtype(preferred_element_type)
    target = resolve_target(target)
    t = _resolve_tiling(tiling, m, k, n, lhs.dtype, out_dtype, target)
    goff = jnp.asarray(group_offset, jnp.int32).reshape(())
    return _tgmm_impl(lhs, grad, group_sizes, goff, num_local, out_dtype, t, interpret, target)


def scaled_matmul_gpu(
    lq: jax.Array,
    ls: jax.Array,
    rq: jax.Array,
    rs: jax.Array,
    *,
    out_dtype: DTypeLike = jnp.float32,
    tiling: GpuTiling | tuple[int, ...] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Dense [m, n] = (lq * ls) @ (rq * rs) with per-128-slice scales along k, forward only.

    lq: [m, k] E4M3; ls: [m, ceil(k / 128)] (one scale per 1 x 128 tile of a row);
    rq: [k, n] E4M3; rs: [ceil(k / 128), n] (one per 128 x 1 tile of a column).
    The Triton gmm kernel with one group of m rows: each reduction step's FP8 product is scaled
    in registers and added to the fp32 accumulator (DeepGEMM's promotion), so no per-slice
    partial products go through memory.
    """
    (m, k), n = lq.shape, rq.shape[1]
    kb = _cdiv(k, _SCALE_BLOCK)
    if rq.shape[0] != k or ls.shape != (m, kb) or rs.shape != (kb, n):
        raise ValueError(
            f"scaled_matmul_gpu expects lq [m, k], ls [m, {kb}], rq [k, n], rs [{kb}, n]; got "
            f"{lq.shape}, {ls.shape}, {rq.shape}, {rs.shape}."
        )
    return _gmm_impl(
        lq,
        rq[None],
        jnp.asarray([m], jnp.int32),  # One group: every row.
        jnp.int32(0),
        jnp.dtype(out_dtype),
        None if tiling is None else validate_gpu_tiling(tiling),
        False,
        interpret,
        "gpu",
        ls.astype(jnp.float32),
        rs[None].astype(jnp.float32),  # The kernel's expanded per-column form.
    )
