"""Public FP8 ops: quantize/dequantize (kernels) and the differentiable FP8 grouped matmul.

`gmm_fp8(lhs, rhs, group_sizes)` is the SPEC section 9 recipe for the expert GEMMs, on bf16 or
fp32 inputs, in one `custom_vjp`:
  forward   out  = gmm(Q_row(lhs), Q_block(rhs))              1x128 tiles x 128x128 blocks
  d lhs          = gmm(Q_row(grad), Q_block(rhs)^T)           the transposed weight reuses the
                                                              row-wise 128x128 copy and its
                                                              scales ("on-demand transpose")
  d rhs          = tgmm(lhs, grad) in the input precision     (see below)
with fp32 accumulation and scales applied per 128-deep slice of the reduction. The quantizers
are straight-through: gradients flow as if Q were the identity.

Not done here yet: FP8 wgrad. TransformerEngine quantizes lhs and grad column-wise (1 x 128
along the tokens) for it; with ragged expert groups those tiles straddle groups unless each
group is padded to a multiple of 128 rows. SPEC's "FP8 padding routing map" pads to 16. The
weight gradient is a leaf (SPEC: elevated wgrad error judged harmless), so bf16 wgrad is the
conservative choice until that is measured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from pallas_kernels.common import match_cotangent
from pallas_kernels.fp8 import reference, tpu
from pallas_kernels.gmm import ops as gmm_ops
from pallas_kernels.gmm.tuning import GpuTiling, Tiling

dequantize_rowwise = reference.dequantize_rowwise
dequantize_blockwise = reference.dequantize_blockwise  # Elementwise: XLA fuses it into users.


def quantize_rowwise(
    x: jax.Array, tile: int = 128, power_of_two_scale: bool = False, *, interpret=False
) -> tuple[jax.Array, jax.Array]:
    """x [m, k] -> (E4M3 q [m, k], fp32 scale [m, ceil(k / tile)]): one scale per 1 x tile."""
    if x.ndim != 2:
        raise ValueError(f"quantize_rowwise expects [m, k], got shape {x.shape}.")
    return tpu.quantize_rowwise(x, tile, power_of_two_scale, interpret=interpret)


def quantize_blockwise(
    w: jax.Array,
    block: tuple[int, int] = (128, 128),
    power_of_two_scale: bool = False,
    *,
    interpret=False,
) -> tuple[jax.Array, jax.Array]:
    """w [..., k, n] -> (E4M3 q, fp32 scale [..., ceil(k / bk), ceil(n / bn)]).

    Leading dims are batched, so [groups, k, n] expert weights quantize in one call.
    """
    if w.ndim < 2:
        raise ValueError(f"quantize_blockwise expects [..., k, n], got shape {w.shape}.")
    return tpu.quantize_blockwise(w, block, power_of_two_scale, interpret=interpret)


def _quantizers(target: str, interpret):
    """(rowwise, blockwise) quantizers: the Pallas TPU kernels, or on GPU the jnp reference
    (bit-identical; XLA fuses it into its neighbours there)."""
    if target == "gpu":
        return reference.quantize_rowwise, reference.quantize_blockwise
    return (
        functools.partial(quantize_rowwise, interpret=interpret),
        functools.partial(quantize_blockwise, interpret=interpret),
    )


def _forward(lhs, rhs, group_sizes, group_offset, out_dtype, tiling, pow2, interpret, target):
    rowwise, blockwise = _quantizers(target, interpret)
    lq, ls = rowwise(lhs, power_of_two_scale=pow2)
    wq, ws = blockwise(rhs, power_of_two_scale=pow2)
    out = gmm_ops.gmm(
        lq,
        wq,
        group_sizes,
        lhs_scale=ls,
        rhs_scale=ws,
        group_offset=group_offset,
        preferred_element_type=out_dtype,
        tiling=tiling,
        interpret=interpret,
        target=target,
    )
    return out, (wq, ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _gmm_fp8(lhs, rhs, group_sizes, group_offset, out_dtype, tiling, pow2, interpret, target):
    args = (lhs, rhs, group_sizes, group_offset, out_dtype, tiling, pow2, interpret, target)
    return _forward(*args)[0]


def _gmm_fp8_fwd(lhs, rhs, group_sizes, group_offset, out_dtype, tiling, pow2, interpret, target):
    out, (wq, ws) = _forward(
        lhs, rhs, group_sizes, group_offset, out_dtype, tiling, pow2, interpret, target
    )
    dtype_token = jnp.zeros((0,), rhs.dtype)  # Residuals must be arrays: carries rhs.dtype.
    return out, (lhs, wq, ws, group_sizes, group_offset, dtype_token)


def _gmm_fp8_bwd(out_dtype, tiling, pow2, interpret, target, residuals, grad):
    del out_dtype
    lhs, wq, ws, group_sizes, group_offset, rhs_dtype_token = residuals
    gq, gs = _quantizers(target, interpret)[0](grad, power_of_two_scale=pow2)
    swapped = None if tiling is None else tiling._replace(tk=tiling.tn, tn=tiling.tk)
    dlhs = gmm_ops.gmm(
        gq,
        wq,
        group_sizes,
        lhs_scale=gs,
        rhs_scale=ws,
        transpose_rhs=True,
        group_offset=group_offset,
        preferred_element_type=lhs.dtype,
        tiling=swapped,
        interpret=interpret,
        target=target,
    )
    drhs = gmm_ops.tgmm(
        lhs,
        grad.astype(lhs.dtype),
        group_sizes,
        group_offset=group_offset,
        num_local=wq.shape[0],
        preferred_element_type=rhs_dtype_token.dtype,
        tiling=tiling,
        interpret=interpret,
        target=target,
    )
    return match_cotangent(dlhs, lhs), match_cotangent(drhs, wq), None, None


_gmm_fp8.defvjp(_gmm_fp8_fwd, _gmm_fp8_bwd)


@functools.partial(
    jax.jit,
    static_argnames=(
        "preferred_element_type",
        "tiling",
        "power_of_two_scale",
        "interpret",
        "target",
    ),
)
def gmm_fp8(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: int | jax.Array = 0,
    preferred_element_type: DTypeLike = jnp.bfloat16,
    tiling: Tiling | tuple[int, ...] | None = None,
    power_of_two_scale: bool = False,
    interpret=False,
    target: str | None = None,
) -> jax.Array:
    """`gmm` computed in FP8 with block scaling, differentiable (see the module docstring).

    Args:
      lhs: [m, k] bf16/fp32, rows sorted by group; rhs: [G_local, k, n] bf16/fp32 weights.
      group_sizes, group_offset: as for `pallas_kernels.gmm.gmm`.
      preferred_element_type: output dtype (SPEC: bf16).
      tiling: forward-dims tiling; on TPU tk and tn must be multiples of 128 (or the full
        dims), on GPU (`GpuTiling`) tk must divide 128.
      target: "tpu" or "gpu" kernels (default: "gpu" on a GPU backend, else "tpu"); on GPU
        the quantizers are the jnp reference, fused by XLA.
    """
    target = gmm_ops.resolve_target(target)
    if tiling is not None and not isinstance(tiling, (Tiling, GpuTiling)):
        tiling = (GpuTiling if target == "gpu" else Tiling)(*tiling)
    goff = jnp.asarray(group_offset, jnp.int32).reshape(())
    return _gmm_fp8(
        lhs,
        rhs,
        group_sizes,
        goff,
        jnp.dtype(preferred_element_type),
        tiling,
        power_of_two_scale,
        interpret,
        target,
    )
