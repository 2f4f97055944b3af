"""The Triton (GPU) gmm/tgmm kernels: values and gradients against the jnp references, and
lowering to Triton for CUDA from a CPU-only machine.

The value tests run the kernels in interpret mode on the CPU, and compiled where jax's default
backend is a GPU: `JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest
tests/kernels/test_gmm_gpu.py` checks the real kernels on a GPU (the precision flag keeps the
fp32 references off TF32).

As in test_gmm.py, shapes are fixed and deliberately not multiples of the blocks, and the
interpreter pads overhanging loads and uninitialised outputs with NaN, so an unmasked read or
an unwritten output row shows up. Row tiles of 16 make most tiles straddle groups.

The lowering tests export for the "cuda" platform: Pallas lowers each kernel to a Triton
module that XLA would compile on the GPU. The module travels as bytecode inside the custom
call; the tests parse it back, which runs MLIR's verifier on every Triton op (an ill-typed op,
e.g. an scf.for with bounds of different types, fails here rather than on the GPU).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8 import gmm_fp8
from pallas_kernels.fp8 import reference as fp8_ref
from pallas_kernels.gmm import (
    GpuTiling,
    gmm,
    scaled_matmul_gpu,
    tuning,
)
from tests.kernels import gmm_checks

M, K, N, G = 64, 72, 40, 5
TILING = GpuTiling(16, 32, 32)  # K: 2 full + 1 partial reduction step; N: 1 full + 1 partial.
GROUP_SIZES = {
    "uneven": [13, 2, 20, 5, 17],  # 57 rows: 7 padding rows.
    "first_and_last_empty": [0, 30, 3, 31, 0],
    "all_in_one_group": [0, 0, 64, 0, 0],
    "tile_multiples": [16, 32, 0, 16, 0],
    "all_padding": [0, 0, 0, 0, 0],
}
TRITON_CALL = "__gpu$xla.gpu.triton"  # jaxlib <= 0.10.2; later ones compile to an FFI call.
TRITON_CALL_NAMES = (TRITON_CALL, "triton_kernel_call")
H100_KIND = "NVIDIA H100 80GB HBM3"
INTERPRET = jax.default_backend() != "gpu"  # Compiled Triton kernels where a GPU is attached.
KERNEL = dict(interpret=INTERPRET, target="gpu")  # How the shared checks call the kernels.


def make_inputs(seed: int, dtype, num_local: int = G, transpose_rhs: bool = False):
    return gmm_checks.make_inputs(seed, dtype, (M, K, N), num_local, transpose_rhs)


def check_against_reference(sizes, dtype, *, tiling=TILING, num_local=G, **kwargs):
    return gmm_checks.check_against_reference(
        sizes,
        dtype,
        dims=(M, K, N),
        tiling=tiling,
        num_local=num_local,
        target="gpu",
        interpret=INTERPRET,
        **kwargs,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", GROUP_SIZES)
def test_gmm_values_and_grads(case, dtype):
    check_against_reference(GROUP_SIZES[case], dtype)


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_gmm_group_offset(offset):
    """rhs holds 2 of the 5 groups (expert sharding); other groups' rows give zeros."""
    check_against_reference(GROUP_SIZES["uneven"], jnp.float32, num_local=2, offset=offset)
    check_against_reference(
        GROUP_SIZES["first_and_last_empty"], jnp.float32, num_local=2, offset=offset
    )


@pytest.mark.parametrize("case", ["uneven", "first_and_last_empty"])
def test_gmm_transpose_rhs(case):
    check_against_reference(GROUP_SIZES[case], jnp.float32, transpose_rhs=True)


def test_gmm_default_tiling():
    """The default rule's blocks (64 rows, 32-64 deep, 128 columns) overhang every dim here."""
    check_against_reference(GROUP_SIZES["uneven"], jnp.bfloat16, tiling=None)


@pytest.mark.parametrize("offset,num_local", [(0, G), (1, 3), (3, 2)])
def test_tgmm(offset, num_local):
    gmm_checks.check_tgmm(
        GROUP_SIZES["first_and_last_empty"],
        dims=(M, K, N),
        tiling=TILING,
        offset=offset,
        num_local=num_local,
        **KERNEL,
    )


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_fp8_operands(transpose_rhs):
    """k = 160: two scale blocks along the reduction, the second partial; 2 local groups."""
    gmm_checks.check_fp8_operands(
        GROUP_SIZES["uneven"],
        dims=(M, 160, N),
        num_local=2,
        offset=1,
        transpose_rhs=transpose_rhs,
        tiling=GpuTiling(16, 64, 32),
        **KERNEL,
    )


@pytest.mark.parametrize("m,k,n", [(64, 300, 40), (100, 128, 200)])
def test_dense_scaled_matmul(m, k, n):
    """One group of all rows: the dense FP8 product with 1 x 128 row and 128 x 1 column scales
    (per-column, not block, scales: the FP8 wgrad's form), equal to dequantize-then-matmul."""
    rng = np.random.default_rng(3)
    lq, ls = fp8_ref.quantize_rowwise(jnp.asarray(rng.normal(size=(m, k)) * 5, jnp.float32))
    rq_t, rs_t = fp8_ref.quantize_rowwise(jnp.asarray(rng.normal(size=(n, k)), jnp.float32))
    rq, rs = rq_t.T, rs_t.T  # [k, n], [k / 128, n]
    got = scaled_matmul_gpu(lq, ls, rq, rs, tiling=GpuTiling(32, 64, 32), interpret=INTERPRET)
    lhs = lq.astype(jnp.float32) * jnp.repeat(ls, 128, axis=1)[:, :k]
    rhs = rq.astype(jnp.float32) * jnp.repeat(rs, 128, axis=0)[:k]
    want = jnp.dot(lhs, rhs, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3 * float(jnp.abs(want).max()))
    with pytest.raises(ValueError, match="rs"):
        scaled_matmul_gpu(lq, ls, rq, rs[:, :-1], interpret=True)


def test_rejects_bad_gpu_inputs():
    lhs, rhs, _ = make_inputs(0, jnp.float32)
    sizes = jnp.asarray(GROUP_SIZES["uneven"], jnp.int32)
    with pytest.raises(ValueError, match="target"):
        gmm(lhs, rhs, sizes, interpret=True, target="cuda")
    with pytest.raises(ValueError, match="tiling.tm"):
        gmm(lhs, rhs, sizes, tiling=(24, 32, 32), interpret=True, target="gpu")
    with pytest.raises(ValueError, match="tiling.tk"):
        gmm(lhs, rhs, sizes, tiling=(16, 8, 32), interpret=True, target="gpu")


def test_default_gpu_tiling_rule():
    t = tuning.default_gpu_tiling(65536, 2048, 512, dtype=jnp.bfloat16, num_groups=32)
    assert t == GpuTiling(128, 64, 128, num_warps=8, num_stages=3)
    t = tuning.default_gpu_tiling(8192, 2048, 512, dtype=jnp.bfloat16, num_groups=256)
    assert (t.tm, t.num_warps) == (64, 4)  # Small groups: less straddling waste.
    assert tuning.default_gpu_tiling(100, 40, 20, dtype=jnp.float32) == GpuTiling(64, 32, 32)
    t = tuning.default_gpu_tiling(4096, 1024, 2048, dtype=jnp.float32, tgmm=True)
    assert t == GpuTiling(32, 128, 256, num_warps=8, num_stages=3)
    assert tuning.validate_gpu_tiling(tuning.Tiling(64, 128, 256, 32)) == GpuTiling(64, 128, 256)


# --- Lowering to Triton for CUDA ------------------------------------------------------------


def triton_modules(fn, *arg_specs) -> tuple[str, list[str]]:
    """Export jit(fn) for CUDA; return the StableHLO text and each Triton module's text."""
    # Lowering reads the target GPU's compute capability: newer jax takes it from an abstract
    # device when none is attached (older jax assumes one); name an H100, our Hopper target.
    h100 = jax.sharding.AbstractDevice(device_kind=H100_KIND, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=h100)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(fn),
            platforms=["cuda"],
            # The Triton custom call carries no serialization-compatibility guarantee; we only
            # inspect the module, we do not store it.
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*arg_specs)
    text = exported.mlir_module()
    # Private jax APIs, needed to read the Triton bytecode back: if they move, update here.
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering

    blobs = []
    with jax_mlir.make_ir_context():
        module = ir.Module.parse(text)

        def collect(op):
            if op.name == "stablehlo.custom_call":
                config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                blobs.append(ir.StringAttr(config["ir"]).value_bytes)
            return ir.WalkResult.ADVANCE

        module.operation.walk(collect)
    triton = []
    for blob in blobs:
        with triton_lowering._new_ir_context():
            triton.append(str(ir.Module.parse(blob)))  # Parsing verifies every op.
    return text, triton


def assert_triton_kernels(text: str, modules: list[str], names: list[str]):
    assert any(name in text for name in TRITON_CALL_NAMES), "no Triton custom call"
    assert "tpu_custom_call" not in text and "mosaic_gpu" not in text
    assert sorted(re.findall(r"tt\.func public @(\w+)", "\n".join(modules))) == sorted(names)
    for module in modules:
        assert "tt.dot" in module  # Triton's dot: wgmma on Hopper.
        assert "scf.for" in module and "scf.while" not in module  # Pipelinable loops.


S, BF16, F32, F8, I32 = (
    jax.ShapeDtypeStruct,
    jnp.bfloat16,
    jnp.float32,
    jnp.float8_e4m3fn,
    jnp.int32,
)
# Odd dims (not multiples of any block), 8 groups of which 6 are local from offset s[0] % 3.
GMM_SPECS = (S((1000, 300), BF16), S((6, 300, 200), BF16), S((8,), I32))


def _gmm_gpu(lhs, rhs, sizes, **kwargs):
    return gmm(lhs, rhs, sizes, group_offset=sizes[0] % 3, target="gpu", **kwargs)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
def test_gmm_forward_lowers_to_triton_for_cuda(dtype):
    specs = [S(s.shape, dtype if s.dtype != I32 else I32) for s in GMM_SPECS]
    text, modules = triton_modules(_gmm_gpu, *specs)
    assert_triton_kernels(text, modules, ["gmm"])


def test_gmm_gradient_lowers_to_triton_for_cuda():
    def loss(lhs, rhs, sizes, cot):
        return jnp.vdot(_gmm_gpu(lhs, rhs, sizes).astype(F32), cot)

    fn = jax.value_and_grad(loss, argnums=(0, 1))
    text, modules = triton_modules(fn, *GMM_SPECS, S((1000, 200), F32))
    # Forward, d lhs (the transposed-weight gmm) and d rhs (tgmm).
    assert_triton_kernels(text, modules, ["gmm", "gmm_transposed_rhs", "tgmm"])


def test_gmm_fp8_forward_lowers_to_triton_for_cuda():
    def fn(lhs, lhs_scale, rhs, rhs_scale, sizes):
        return _gmm_gpu(lhs, rhs, sizes, lhs_scale=lhs_scale, rhs_scale=rhs_scale)

    specs = (
        S((1000, 300), F8),
        S((1000, 3), F32),
        S((6, 300, 200), F8),
        S((6, 3, 2), F32),
        S((8,), I32),
    )
    text, modules = triton_modules(fn, *specs)
    assert_triton_kernels(text, modules, ["gmm"])
    # Native FP8: the dot multiplies the E4M3 tiles as they are (FP8 wgmma on Hopper).
    assert re.search(r"tt\.dot .*: tensor<\d+x\d+xf8E4M3FN>", modules[0]), modules[0]


def test_gmm_fp8_gradient_lowers_to_triton_for_cuda():
    """The differentiable FP8 recipe (`gmm_fp8`): quantizers in XLA, the three GEMMs in Triton."""

    def loss(lhs, rhs, sizes, cot):
        out = gmm_fp8(lhs, rhs, sizes, group_offset=sizes[0] % 3, target="gpu")
        return jnp.vdot(out.astype(F32), cot)

    fn = jax.value_and_grad(loss, argnums=(0, 1))
    text, modules = triton_modules(fn, *GMM_SPECS, S((1000, 200), F32))
    assert_triton_kernels(text, modules, ["gmm", "gmm_transposed_rhs", "tgmm"])
