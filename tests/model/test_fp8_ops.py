"""The FP8 dense and grouped matmuls against float64 references built from the quantizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.model.fp8 import fp8_contract, fp8_grouped_matmul, fp8_matmul
from ling_jax.model.fp8.grouped import qdq_columns_per_group
from pallas_kernels.fp8 import reference as ref


def qdq_rows(x, pow2=False):
    """float64 round trip in 1 x 128 tiles along the last dim of a 2-D array."""
    return np.asarray(
        ref.dequantize_rowwise(*ref.quantize_rowwise(x, power_of_two_scale=pow2)), np.float64
    )


def qdq_blocks(w, pow2=False):
    return np.asarray(
        ref.dequantize_blockwise(*ref.quantize_blockwise(w, power_of_two_scale=pow2)), np.float64
    )


def data(shape, seed, spread=2.0):
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-spread, spread, size=shape[:-1] + (1,))
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


# k = 200 and n = 300: partial last tiles and blocks; m = 40 tokens: a partial wgrad tile.
M, K, N = 40, 200, 300


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
@pytest.mark.parametrize("wgrad_fp8", [True, False], ids=["wgrad_fp8", "wgrad_input"])
def test_fp8_matmul_forward_and_gradients(native, wgrad_fp8):
    x, w, dy = data((M, K), 0), data((K, N), 1, 0.5), data((M, N), 2)
    f = jax.jit(lambda x, w: fp8_matmul(x, w, native=native, wgrad_fp8=wgrad_fp8))
    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(dy)

    w_dq = qdq_blocks(w)
    np.testing.assert_allclose(y, qdq_rows(x) @ w_dq, rtol=2e-5, atol=1e-5 * np.abs(y).max())
    dx_ref = qdq_rows(dy) @ w_dq.T
    np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5 * np.abs(dx_ref).max())
    if wgrad_fp8:  # Both operands in 1 x 128 tiles along the tokens.
        dw_ref = qdq_rows(x.T) @ qdq_rows(dy.T).T
    else:
        dw_ref = np.asarray(x, np.float64).T @ np.asarray(dy, np.float64)
    np.testing.assert_allclose(dw, dw_ref, rtol=2e-5, atol=1e-5 * np.abs(dw_ref).max())
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32


def test_native_feeds_e4m3_to_the_dot_and_matches_emulation():
    x, w = data((M, K), 3).astype(jnp.bfloat16), data((K, N), 4, 0.5)
    native = jax.jit(lambda x, w: fp8_matmul(x, w, native=True, out_dtype=jnp.bfloat16))
    hlo = native.lower(x, w).as_text()
    if jax.default_backend() == "gpu":  # The Triton kernel (its dot is checked in tests/kernels).
        assert "triton" in hlo and "stablehlo.dot_general" not in hlo
    else:
        dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
        assert dots and all("xf8E4M3FN>" in line for line in dots), dots
    emulated = fp8_matmul(x, w, native=False, out_dtype=jnp.bfloat16)
    assert native(x, w).dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(native(x, w), np.float32), np.asarray(emulated, np.float32), rtol=1e-2
    )


def test_fp8_contract_matches_einsum_shapes():
    x, w = data((2, 3, 128), 5), data((128, 4, 32), 6, 0.5)
    y = fp8_contract(x, w, 1, native=False)
    expected = qdq_rows(x.reshape(6, 128)) @ qdq_blocks(w.reshape(128, 128))
    np.testing.assert_allclose(
        y.reshape(6, 128), expected, rtol=2e-5, atol=1e-6 * abs(expected).max()
    )
    with pytest.raises(ValueError, match="cannot contract"):
        fp8_contract(x, w.reshape(4, 32, 128), 2, native=False)


GROUPS = np.array([50, 0, 7, 140, 3], np.int32)  # An empty group, one larger than a tile.
ROWS = 210  # 200 routed rows and 10 padding rows.


def per_group(fn, group_sizes, *arrays):
    out, start = [], 0
    for g, size in enumerate(group_sizes):
        out.append(fn(g, *(a[start : start + size] for a in arrays)))
        start += size
    return out


def test_qdq_columns_per_group_tiles_each_group_from_its_first_row():
    x = data((ROWS, 64), 7)
    got = np.asarray(qdq_columns_per_group(x, jnp.asarray(GROUPS), False))
    expected = per_group(lambda g, xg: qdq_rows(xg.T).T if len(xg) else xg, GROUPS, x)
    np.testing.assert_array_equal(got[: GROUPS.sum()], np.concatenate(expected))
    np.testing.assert_array_equal(got[GROUPS.sum() :], 0.0)


@pytest.mark.parametrize("backend", ["xla", "ragged_dot"])
@pytest.mark.parametrize("wgrad_fp8", [True, False], ids=["wgrad_fp8", "wgrad_input"])
def test_fp8_grouped_matmul_emulated(backend, wgrad_fp8):
    lhs, rhs, dout = data((ROWS, 192), 8), data((5, 192, 160), 9, 0.5), data((ROWS, 160), 10)
    sizes = jnp.asarray(GROUPS)

    def f(lhs, rhs):
        return fp8_grouped_matmul(
            lhs, rhs, sizes, backend=backend, native=False, wgrad_fp8=wgrad_fp8, tile_rows=16
        )

    out, vjp = jax.vjp(jax.jit(f), lhs, rhs)
    dlhs, drhs = vjp(dout)
    w_dq = qdq_blocks(rhs)
    lhs_dq, dout_dq = qdq_rows(lhs), qdq_rows(dout)
    used = GROUPS.sum()
    out_ref = per_group(lambda g, a: a @ w_dq[g], GROUPS, lhs_dq)
    dlhs_ref = per_group(lambda g, d: d @ w_dq[g].T, GROUPS, dout_dq)
    if wgrad_fp8:
        drhs_ref = per_group(
            lambda g, a, d: qdq_rows(a.T) @ qdq_rows(d.T).T if len(a) else np.zeros((192, 160)),
            GROUPS,
            lhs,
            dout,
        )
    else:
        drhs_ref = per_group(
            lambda g, a, d: np.asarray(a, np.float64).T @ np.asarray(d, np.float64),
            GROUPS,
            lhs,
            dout,
        )
    tol = {"rtol": 2e-5, "atol": 1e-5 * np.abs(out).max()}
    np.testing.assert_allclose(out[:used], np.concatenate(out_ref), **tol)
    np.testing.assert_array_equal(out[used:], 0.0)
    np.testing.assert_allclose(
        dlhs[:used], np.concatenate(dlhs_ref), rtol=2e-5, atol=1e-5 * np.abs(dlhs).max()
    )
    np.testing.assert_allclose(drhs, np.stack(drhs_ref), rtol=2e-5, atol=1e-5 * np.abs(drhs).max())


def test_fp8_grouped_matmul_pallas_native_is_gmm_fp8():
    """pallas + native + input-precision wgrad runs the FP8 Pallas kernel (interpreted here)."""
    lhs, rhs = data((64, 128), 11), data((2, 128, 128), 12, 0.5)
    sizes = jnp.asarray([30, 34], jnp.int32)
    kernel = fp8_grouped_matmul(lhs, rhs, sizes, backend="pallas", native=True, wgrad_fp8=False)
    emulated = fp8_grouped_matmul(lhs, rhs, sizes, backend="xla", native=False, wgrad_fp8=False)
    np.testing.assert_allclose(kernel, emulated, rtol=1e-5, atol=1e-5 * np.abs(emulated).max())
