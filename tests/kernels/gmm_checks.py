"""Checks shared by the TPU (test_gmm.py) and GPU (test_gmm_gpu.py) grouped-matmul tests:
inputs, the jitted value and gradients of sum(gmm * cotangent), and the comparison with the
jnp reference (including exact zeros outside the local groups)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp8 import reference as fp8_ref
from pallas_kernels.gmm import gmm, gmm_reference, tgmm, tgmm_reference

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=2e-1)}


def make_inputs(seed: int, dtype, dims: tuple[int, int, int], num_local: int, transpose_rhs=False):
    """lhs [m, k], rhs [num_local, k, n] (or [num_local, n, k]), cotangent [m, n] fp32."""
    m, k, n = dims
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs_shape = (num_local, n, k) if transpose_rhs else (num_local, k, n)
    rhs = jnp.asarray(rng.normal(size=rhs_shape) / np.sqrt(k), dtype)
    cotangent = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    return lhs, rhs, cotangent


@functools.cache
def value_and_grads(
    fn_name: str, tiling, transpose_rhs: bool, target: str | None, interpret: bool = True
):
    """jit(lhs, rhs, sizes, offset, cot) -> (out, (d lhs, d rhs)) of sum(out * cot)."""

    def fn(lhs, rhs, sizes, offset):
        kwargs = dict(group_offset=offset, transpose_rhs=transpose_rhs)
        if fn_name == "reference":
            return gmm_reference(lhs, rhs, sizes, **kwargs)
        return gmm(lhs, rhs, sizes, tiling=tiling, interpret=interpret, target=target, **kwargs)

    def loss(lhs, rhs, sizes, offset, cot):
        out = fn(lhs, rhs, sizes, offset)
        return jnp.vdot(out.astype(jnp.float32), cot), out

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(lambda *args: (lambda r: (r[0][1], r[1]))(grad_fn(*args)))


def check_against_reference(
    sizes,
    dtype,
    *,
    dims: tuple[int, int, int],
    tiling,
    num_local: int,
    offset: int = 0,
    transpose_rhs: bool = False,
    seed: int = 0,
    target: str | None = None,
    interpret: bool = True,
):
    """The kernel's output and gradients equal the reference's; rows outside the local groups
    are exactly zero, with exactly zero gradient."""
    m, _, n = dims
    lhs, rhs, cot = make_inputs(seed, dtype, dims, num_local, transpose_rhs)
    sizes = jnp.asarray(sizes, jnp.int32)
    offset = jnp.int32(offset)
    kernel = value_and_grads("kernel", tiling, transpose_rhs, target, interpret)
    out, grads = kernel(lhs, rhs, sizes, offset, cot)
    ref_out, ref_grads = value_and_grads("reference", None, transpose_rhs, None)(
        lhs, rhs, sizes, offset, cot
    )
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (m, n)
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.float32(got), np.float32(want), **tol)
    ends = np.cumsum(np.asarray(sizes))
    starts = ends - np.asarray(sizes)
    outside = np.r_[0 : starts[offset], ends[offset + num_local - 1] : m]
    assert np.all(np.float32(out)[outside] == 0)
    assert np.all(np.float32(grads[0])[outside] == 0)
    return out, grads


def check_tgmm(sizes, *, dims, tiling, offset: int, num_local: int, **kwargs):
    """tgmm equals its reference; the local groups that are empty get exact zeros."""
    m, k, n = dims
    lhs, _, grad = make_inputs(1, jnp.float32, dims, num_local)
    sizes = jnp.asarray(sizes, jnp.int32)
    got = tgmm(lhs, grad, sizes, tiling=tiling, group_offset=offset, num_local=num_local, **kwargs)
    want = tgmm_reference(lhs, grad, sizes, num_local=num_local, group_offset=offset)
    assert got.shape == (num_local, k, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    empty = [g - offset for g in range(offset, offset + num_local) if sizes[g] == 0]
    assert np.all(np.asarray(got)[empty] == 0)


def check_fp8_operands(sizes, *, dims, num_local, transpose_rhs, tiling, offset=0, **kwargs):
    """E4M3 operands with 1x128 / 128x128 scales: equal to dequantize-then-matmul in fp32; the
    output defaults to bf16."""
    lhs, rhs, _ = make_inputs(2, jnp.float32, dims, num_local, transpose_rhs)
    lq, ls = fp8_ref.quantize_rowwise(lhs * 30)
    wq, ws = fp8_ref.quantize_blockwise(rhs)
    sizes = jnp.asarray(sizes, jnp.int32)
    scaled = dict(lhs_scale=ls, rhs_scale=ws, transpose_rhs=transpose_rhs, group_offset=offset)
    got = gmm(lq, wq, sizes, tiling=tiling, preferred_element_type=jnp.float32, **scaled, **kwargs)
    want = gmm_reference(lq, wq, sizes, preferred_element_type=jnp.float32, **scaled)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    assert gmm(lq, wq, sizes, tiling=tiling, **scaled, **kwargs).dtype == jnp.bfloat16
