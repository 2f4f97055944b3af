"""The FP8 dense matmul of SPEC section 9, differentiable: `fp8_matmul(x, w)`.

    forward   y  = Q_row(x) Q_block(w)         x: [m, k] in 1 x 128 tiles, w: [k, n] in 128 x 128
    dgrad     dx = Q_row(dy) Q_block(w)^T      the transposed weight reuses the 128 x 128 copy
                                               and its scales ("on-demand transpose")
    wgrad     dw = Q_col(x)^T Q_col(dy)        1 x 128 tiles along the tokens (wgrad="fp8"),
                                               or x^T dy in the compute dtype (wgrad="input")

E4M3 values, fp32 scales, fp32 accumulation, outputs in the caller's dtype. The quantizers are
straight-through: gradients flow as if Q were the identity, apart from the FP8 backward GEMMs.

Two ways to run the same numerics (`native`):
  native    E4M3 operands multiplied by FP8 matrix units, one product per 128-deep slice of
            the reduction, each scaled by its tiles' scales and summed in fp32: the promotion
            DeepGEMM and TE's blockwise GEMMs do. On a GPU the Triton gmm kernel with one
            group (`pallas_kernels.gmm.scaled_matmul_gpu`) scales each slice's product in
            registers; elsewhere (TPU v7) E4M3 operands go into a batched `lax.dot_general`
            (preferred fp32) that holds [k / 128, m, n] fp32 partial products.
  emulated  dequantize (E4M3 value x fp32 scale, exact in fp32) and one fp32 matmul at HIGHEST
            precision. Equal to native up to fp32 summation order; runs anywhere.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import match_cotangent
from pallas_kernels.fp8 import reference as ref
from pallas_kernels.gmm import scaled_matmul_gpu

TILE = ref.BLOCK


def _expand(scale: jax.Array, axis: int, size: int) -> jax.Array:
    """Repeats per-128 scales along `axis` to `size` elements."""
    full = jnp.repeat(scale, TILE, axis=axis, total_repeat_length=scale.shape[axis] * TILE)
    return jax.lax.slice_in_dim(full, 0, size, axis=axis)


def _pad_k(x: jax.Array, axis: int) -> jax.Array:
    pad = (-x.shape[axis]) % TILE
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def scaled_matmul(
    lq: jax.Array, ls: jax.Array, rq: jax.Array, rs: jax.Array, *, native: bool
) -> jax.Array:
    """fp32 [m, n] = (lq * ls) @ (rq * rs) with per-128-slice scales along the reduction k.

    lq: [m, k] E4M3, ls: [m, ceil(k / 128)] (one scale per 1 x 128 tile of a row);
    rq: [k, n] E4M3, rs: [ceil(k / 128), n] (one scale per 128 x 1 tile of a column; a
    128 x 128 block scale is that repeated over the block's columns).
    """
    k = lq.shape[1]
    if not native:
        lhs = ref.e4m3_values(lq) * _expand(ls, 1, k)
        rhs = ref.e4m3_values(rq) * _expand(rs, 0, k)
        return jnp.dot(
            lhs, rhs, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )
    if jax.default_backend() == "gpu":
        return scaled_matmul_gpu(lq, ls, rq, rs)
    return batched_scaled_matmul(lq, ls, rq, rs)


def batched_scaled_matmul(lq: jax.Array, ls: jax.Array, rq: jax.Array, rs: jax.Array):
    """`scaled_matmul` as one batched E4M3 dot_general over the 128-deep slices of k."""
    m = lq.shape[0]
    n, kb = rq.shape[1], ls.shape[1]
    lhs = _pad_k(lq, 1).reshape(m, kb, TILE)  # Zero padding adds nothing to a product.
    rhs = _pad_k(rq, 0).reshape(kb, TILE, n)
    partial = jax.lax.dot_general(
        lhs, rhs, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32
    )  # [kb, m, n]: exact sums of E4M3 products, one per 128-deep slice
    return jnp.sum(partial * ls.T[:, :, None] * rs[:, None, :], axis=0)


def _quantize_forward(x, w, pow2):
    xq, xs = ref.quantize_rowwise(x, power_of_two_scale=pow2)  # [m, k], [m, kb]
    wq, ws = ref.quantize_blockwise(w, power_of_two_scale=pow2)  # [k, n], [kb, nb]
    return xq, xs, wq, ws


def _forward(x, w, native, pow2, wgrad_fp8, out_dtype):
    del wgrad_fp8
    xq, xs, wq, ws = _quantize_forward(x, w, pow2)
    y = scaled_matmul(xq, xs, wq, _expand(ws, 1, w.shape[1]), native=native)
    return y.astype(out_dtype), (x, wq, ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fp8_matmul(x, w, native, pow2, wgrad_fp8, out_dtype):
    return _forward(x, w, native, pow2, wgrad_fp8, out_dtype)[0]


def _fp8_matmul_fwd(x, w, native, pow2, wgrad_fp8, out_dtype):
    y, (x, wq, ws) = _forward(x, w, native, pow2, wgrad_fp8, out_dtype)
    w_dtype_token = jnp.zeros((0,), w.dtype)  # Residuals must be arrays: carries w.dtype.
    return y, (x, wq, ws, w_dtype_token)


def _fp8_matmul_bwd(native, pow2, wgrad_fp8, out_dtype, residuals, dy):
    del out_dtype
    x, wq, ws, w_dtype_token = residuals
    k, n = wq.shape
    gq, gs = ref.quantize_rowwise(dy, power_of_two_scale=pow2)  # [m, n], [m, nb]
    dx = scaled_matmul(gq, gs, wq.T, _expand(ws.T, 1, k), native=native)
    if wgrad_fp8:
        xtq, xts = ref.quantize_rowwise(x.T, power_of_two_scale=pow2)  # [k, m], [k, mb]
        gtq, gts = ref.quantize_rowwise(dy.T, power_of_two_scale=pow2)  # [n, m], [n, mb]
        dw = scaled_matmul(xtq, xts, gtq.T, gts.T, native=native)
    else:
        dw = jnp.einsum("mk,mn->kn", x, dy.astype(x.dtype), preferred_element_type=jnp.float32)
    # Under shard_map (the shared expert) a replicated weight gets the sum over the shards.
    dw = match_cotangent(dw.astype(w_dtype_token.dtype), wq)
    return match_cotangent(dx.astype(x.dtype), x), dw


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    native: bool,
    power_of_two_scale: bool = False,
    wgrad_fp8: bool = True,
    out_dtype=None,
) -> jax.Array:
    """[m, k] x [k, n] -> [m, n] in FP8 (see the module docstring); out_dtype defaults to x's."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"fp8_matmul expects [m, k] x [k, n], got {x.shape} x {w.shape}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    return _fp8_matmul(x, w, native, power_of_two_scale, wgrad_fp8, out_dtype)


def fp8_contract(x: jax.Array, w: jax.Array, contract: int, **kwargs) -> jax.Array:
    """`fp8_matmul` contracting the last `contract` dims of x with the first of w.

    E.g. x [b, s, d] with w [d, h, k] (contract=1) -> [b, s, h, k]; x [b, s, h, k] with
    w [h, k, d] (contract=2) -> [b, s, d]. The weight's 128 x 128 blocks tile its 2-D view.
    """
    if x.shape[x.ndim - contract :] != w.shape[:contract]:
        raise ValueError(
            f"cannot contract the last {contract} dims of {x.shape} with the first of {w.shape}"
        )
    lead, out = x.shape[: x.ndim - contract], w.shape[contract:]
    k = math.prod(w.shape[:contract])
    y = fp8_matmul(x.reshape(-1, k), w.reshape(k, -1), **kwargs)
    return y.reshape(*lead, *out)
