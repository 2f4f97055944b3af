"""FP8 block scaling: kernels (interpret mode) bit-exact against the jnp reference, the
reference's numerics (round trip, saturation, power-of-two scales), and the FP8 grouped matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8 import gmm_fp8, ops, tpu
from pallas_kernels.fp8 import reference as ref
from pallas_kernels.gmm import GpuTiling, Tiling, gmm_reference, tgmm_reference


def bits(q: jax.Array) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(q, jnp.uint8))


def heavy_tailed(shape, seed, dtype=jnp.float32):
    """Normal values times per-row magnitudes over 12 decades, some zero rows and tiles."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 10.0 ** rng.uniform(-6, 6, size=shape[:-1] + (1,))
    x[..., :3, :] = 0.0  # All-zero rows: amax 0 -> scale 1.
    x[..., 5, :130] = 0.0  # An all-zero tile next to a non-zero one.
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("power_of_two_scale", [False, True], ids=["amax", "pow2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 256), (200, 300)])
def test_quantize_rowwise_kernel_bit_exact(shape, dtype, power_of_two_scale, monkeypatch):
    """(200, 300): row blocks of 96 rows, the last one partial, and a partial last k tile."""
    monkeypatch.setattr(tpu, "_STEP_BYTES", 96 * 300 * 5)
    x = heavy_tailed(shape, 0, dtype)
    q, scale = ops.quantize_rowwise(x, power_of_two_scale=power_of_two_scale, interpret=True)
    q_ref, scale_ref = ref.quantize_rowwise(x, power_of_two_scale=power_of_two_scale)
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (shape[0], -(-shape[1] // 128))
    np.testing.assert_array_equal(bits(q), bits(q_ref))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(scale_ref))


@pytest.mark.parametrize("power_of_two_scale", [False, True], ids=["amax", "pow2"])
@pytest.mark.parametrize("shape", [(256, 384), (300, 260), (5, 200, 130), (3, 64, 96)])
def test_quantize_blockwise_kernel_bit_exact(shape, power_of_two_scale, monkeypatch):
    # Small steps: several experts per step with a partial last batch block.
    monkeypatch.setattr(tpu, "_STEP_BYTES", 200_000)
    w = heavy_tailed(shape, 1)
    q, scale = ops.quantize_blockwise(w, power_of_two_scale=power_of_two_scale, interpret=True)
    q_ref, scale_ref = ref.quantize_blockwise(w, power_of_two_scale=power_of_two_scale)
    *batch, k, n = shape
    assert scale.shape == (*batch, -(-k // 128), -(-n // 128))
    np.testing.assert_array_equal(bits(q), bits(q_ref))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(scale_ref))


@pytest.mark.parametrize("power_of_two_scale", [False, True], ids=["amax", "pow2"])
def test_round_trip_error_bound(power_of_two_scale):
    """E4M3 keeps 3 mantissa bits: |x - deq(q)| <= 2^-4 |x| for normals, half the smallest
    subnormal (2^-10 * scale) below; the scale maps the tile amax to <= 448."""
    x = heavy_tailed((64, 300), 2)
    q, scale = ref.quantize_rowwise(x, power_of_two_scale=power_of_two_scale)
    err = np.abs(np.asarray(ref.dequantize_rowwise(q, scale)) - np.asarray(x))
    full_scale = np.repeat(np.asarray(scale), 128, axis=1)[:, :300]
    assert np.all(err <= np.maximum(np.abs(np.asarray(x)) * 2.0**-4, full_scale * 2.0**-10))
    w = heavy_tailed((2, 300, 260), 3)
    q, scale = ref.quantize_blockwise(w, power_of_two_scale=power_of_two_scale)
    deq = np.asarray(ref.dequantize_blockwise(q, scale))
    full_scale = np.asarray(ref.expand_block_scale(scale, (300, 260), (128, 128)))
    err = np.abs(deq - np.asarray(w))
    assert np.all(err <= np.maximum(np.abs(np.asarray(w)) * 2.0**-4, full_scale * 2.0**-10))


def test_saturation_never_inf_or_nan():
    x = jnp.asarray([[3e38, -3e38, 1.0, 0.0] + [5.0] * 124], jnp.float32)
    q, scale = ref.quantize_rowwise(x)
    assert np.all(np.isfinite(np.float32(q)))
    assert np.float32(q)[0, 0] == 448 and np.float32(q)[0, 1] == -448
    # A scale too small for the data (as with a stale or delayed scale) must clip, not NaN.
    q = ref.scale_and_cast(jnp.asarray([1e6, -1e6, 460.0, 449.0]), jnp.float32(1.0))
    np.testing.assert_array_equal(np.float32(q), [448, -448, 448, 448])
    q, scale = ops.quantize_rowwise(x, interpret=True)
    assert np.all(np.isfinite(np.float32(q)))


def test_power_of_two_scales():
    x = heavy_tailed((32, 512), 4)
    _, scale = ref.quantize_rowwise(x, power_of_two_scale=True)
    _, exact = ref.quantize_rowwise(x)
    mantissa, _ = np.frexp(np.asarray(scale))
    assert np.all(mantissa == 0.5)  # Powers of two.
    amax_scale = np.asarray(exact)
    assert np.all(scale >= amax_scale) and np.all(scale < 2 * amax_scale + (amax_scale == 1))


def test_e4m3_values_decodes_every_code():
    """The bit decoder behind every dequantization equals the E4M3 value of each code (254
    finite codes; 0x7F / 0xFF are NaN, which the saturating quantizers never produce)."""
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    q = jax.lax.bitcast_convert_type(jnp.asarray(codes), jnp.float8_e4m3fn)
    got = np.asarray(jax.jit(ref.e4m3_values)(q))
    want = np.asarray(q).astype(np.float32)  # ml_dtypes' conversion on the host.
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[codes == 0x80]).all() and got.max() == 448 and got.min() == -448


def test_zero_tile_has_unit_scale():
    q, scale = ref.quantize_rowwise(jnp.zeros((8, 200)))
    assert np.all(np.asarray(scale) == 1) and np.all(bits(q) == 0)


M, K, N = 160, 256, 192
SIZES = jnp.asarray([40, 0, 33, 57, 10], jnp.int32)  # 140 rows + 20 padding rows.
TILING = Tiling(32, 128, 128)


def fp8_inputs(seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(M, K)) * 3, jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(5, K, N)) / 16, jnp.bfloat16)
    cot = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
    return lhs, rhs, cot


@pytest.mark.parametrize(
    "target,tiling", [("tpu", TILING), ("gpu", GpuTiling(32, 64, 64))], ids=["tpu", "gpu"]
)
def test_gmm_fp8_forward_and_grads(target, tiling):
    lhs, rhs, cot = fp8_inputs()
    interpret = not (target == "gpu" and jax.default_backend() == "gpu")  # Compiled on a GPU.

    def loss(a, b):
        out = gmm_fp8(a, b, SIZES, tiling=tiling, interpret=interpret, target=target)
        return jnp.vdot(out.astype(jnp.float32), cot), out

    (_, out), (dlhs, drhs) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(lhs, rhs)
    assert out.dtype == jnp.bfloat16 and dlhs.dtype == lhs.dtype and drhs.dtype == rhs.dtype

    # Forward: exactly the quantized operands' product (up to fp32 summation order and bf16).
    lq, ls = ref.quantize_rowwise(lhs)
    wq, ws = ref.quantize_blockwise(rhs)
    want = gmm_reference(
        lq, wq, SIZES, lhs_scale=ls, rhs_scale=ws, preferred_element_type=jnp.float32
    )
    np.testing.assert_allclose(np.float32(out), want, rtol=1e-2, atol=1e-2)
    # ... and within FP8 error of the bf16 product.
    exact = gmm_reference(lhs, rhs, SIZES, preferred_element_type=jnp.float32)
    assert np.linalg.norm(np.float32(out) - exact) < 0.05 * np.linalg.norm(exact)
    assert np.all(np.float32(out)[140:] == 0) and np.all(np.float32(dlhs)[140:] == 0)

    # d lhs: FP8 grad (1x128 tiles along n) times the same 128x128-block FP8 weights.
    gq, gs = ref.quantize_rowwise(cot.astype(jnp.bfloat16))
    want_dlhs = gmm_reference(
        gq,
        jnp.swapaxes(wq, 1, 2),
        SIZES,
        lhs_scale=gs,
        rhs_scale=jnp.swapaxes(ws, 1, 2),
        preferred_element_type=jnp.float32,
    )
    np.testing.assert_allclose(np.float32(dlhs), want_dlhs, rtol=2e-2, atol=2e-2)
    # d rhs: bf16 wgrad.
    want_drhs = tgmm_reference(lhs, cot.astype(jnp.bfloat16), SIZES)
    np.testing.assert_allclose(np.float32(drhs), want_drhs, rtol=2e-2, atol=5e-2)
