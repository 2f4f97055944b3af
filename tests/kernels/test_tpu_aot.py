"""Mosaic must accept every kernel: ahead-of-time compile for TPU v5e, v5p, v6e and v7x from CPU.

Interpret mode checks the math but not that Mosaic can lower and compile the kernels (block
shapes, layouts, supported ops, VMEM). With libtpu installed, `get_topology_desc` yields
compile-only TPU devices on a CPU host, and `.compile()` runs the real TPU compiler, Mosaic
included (a kernel Mosaic rejects fails here with "Mosaic failed to compile TPU kernel").

Not skipped when libtpu is missing: that fails, since silently skipping would let a kernel
that no TPU accepts pass CI.
"""

from __future__ import annotations

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.fp8 import gmm_fp8, quantize_blockwise, quantize_rowwise
from pallas_kernels.gmm import Tiling, gmm, tgmm

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2", "v7x": "tpu7x:2x2x1"}
M, K, N, G = 1024, 512, 384, 8
TILING = Tiling(256, 256, 128, sub_m=128)  # Several blocks on every dim, row sub-tiles.
BF16, F32, F8, I32 = jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn, jnp.int32


@functools.cache
def single_device_sharding(chip: str) -> NamedSharding:
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail(
            "libtpu is not installed, so the TPU ahead-of-time compile tests cannot run. "
            "Install it with `pip install -e .[tpu]` (or `pip install libtpu`).",
            pytrace=False,
        )
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(topology_name=TOPOLOGIES[chip], platform="tpu")
    return NamedSharding(Mesh(np.array(topology.devices[:1]), ("x",)), PartitionSpec())


def loss_grads(fn):
    """(lhs, rhs, sizes, cot) -> grads of sum(fn(lhs, rhs, sizes) * cot): forward + backward."""

    def loss(lhs, rhs, sizes, cot):
        return jnp.vdot(fn(lhs, rhs, sizes).astype(F32), cot)

    return jax.grad(loss, argnums=(0, 1))


CASES = {
    "gmm_fwd_bwd_bf16": (
        loss_grads(lambda a, b, s: gmm(a, b, s, tiling=TILING)),
        [((M, K), BF16), ((G, K, N), BF16), ((G,), I32), ((M, N), F32)],
    ),
    "gmm_fwd_bwd_f32_group_offset_odd_dims": (
        loss_grads(lambda a, b, s: gmm(a, b, s, tiling=TILING, group_offset=s[0] % 4)),
        [((1000, 300), F32), ((4, 300, 200), F32), ((G,), I32), ((1000, 200), F32)],
    ),
    "tgmm_bf16": (
        lambda a, d, s: tgmm(a, d, s, tiling=TILING),
        [((M, K), BF16), ((M, N), BF16), ((G,), I32)],
    ),
    "gmm_default_tiling_ling_mini": (
        lambda a, b, s: gmm(a, b, s),
        [((8192, 2048), BF16), ((32, 2048, 512), BF16), ((32,), I32)],
    ),
    "quantize_rowwise": (
        lambda x: quantize_rowwise(x, power_of_two_scale=True),
        [((256, 1000), BF16)],
    ),
    "quantize_blockwise_grouped": (
        lambda w: quantize_blockwise(w),
        [((4, 300, 520), BF16)],
    ),
    # Compiles the FP8 gmm both plain (forward) and with transposed weights (d lhs).
    "gmm_fp8_fwd_bwd": (
        loss_grads(lambda a, b, s: gmm_fp8(a, b, s, tiling=TILING)),
        [((M, K), BF16), ((G, K, N), BF16), ((G,), I32), ((M, N), F32)],
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chip", TOPOLOGIES)
def test_compiles_for_tpu(chip, case):
    sharding = single_device_sharding(chip)
    fn, arg_specs = CASES[case]
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in arg_specs]
    compiled = jax.jit(fn).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.parametrize("kernel", ["gmm", "gmm_fp8"])
@pytest.mark.parametrize("parallelism", ["data", "expert"])
def test_compiles_inside_shard_map(parallelism, kernel):
    """fwd + bwd inside `shard_map` (check_vma on) over a 4-chip v5e mesh: outputs declare
    their varying mesh axes, and a weight replicated over the data axis gets a psum'd gradient.
    Data parallel: rows split, weights replicated. Expert parallel: all rows, each chip holding
    G / 4 experts from group_offset = axis_index * G / 4."""
    single_device_sharding("v5e")  # Fails clearly without libtpu.
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = Mesh(np.array(devices), ("x",))
    op = gmm if kernel == "gmm" else gmm_fp8
    P = PartitionSpec

    def local_loss(lhs, rhs, sizes, cot):
        if parallelism == "data":
            sizes, offset = sizes[0], 0
        else:
            offset = jax.lax.axis_index("x") * (G // 4)
        out = op(lhs, rhs, sizes, group_offset=offset, tiling=TILING)
        return jax.lax.psum(jnp.vdot(out.astype(F32), cot), "x")

    rows, experts = (P("x"), P()) if parallelism == "data" else (P(), P("x"))
    sizes_spec = P("x") if parallelism == "data" else P()
    loss = jax.shard_map(
        local_loss, mesh=mesh, in_specs=(rows, experts, sizes_spec, rows), out_specs=P()
    )
    sizes_shape = (4, G) if parallelism == "data" else (G,)
    args = [
        jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
        for shape, dtype, spec in [
            ((4 * M, K), BF16, rows),
            ((G, K, N), BF16, experts),
            (sizes_shape, I32, sizes_spec),
            ((4 * M, N), F32, rows),
        ]
    ]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()


def test_native_fp8_matmul_keeps_e4m3_operands_for_tpu_v7():
    """`fp8.mode=native` off a GPU (the batched E4M3 dot) compiled for TPU v7, whose MXU
    multiplies FP8: forward, dgrad and the FP8 wgrad each reach XLA's TPU matmul (a
    convolution) with both operands still E4M3, not upcast."""
    from ling_jax.model.fp8.dense import fp8_matmul

    sharding = single_device_sharding("v7x")

    def loss(x, w, cot):
        y = fp8_matmul(x, w, native=True, wgrad_fp8=True, out_dtype=BF16)
        return jnp.vdot(y.astype(F32), cot)

    specs = [((M, K), BF16), ((K, N), BF16), ((M, N), F32)]
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in specs]
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    types = dict(re.findall(r"%([\w.-]+) = (\w+)\[", hlo))  # Instruction -> element type.
    matmuls = re.findall(r"= f32\[[^\]]*\]\S* (?:convolution|dot)\(%([\w.-]+), %([\w.-]+)\)", hlo)
    assert len(matmuls) >= 3, hlo
    assert all(types[a] == types[b] == "f8e4m3fn" for a, b in matmuls), matmuls
