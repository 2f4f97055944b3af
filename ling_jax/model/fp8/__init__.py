"""FP8 training of the model's linear layers (SPEC section 9), configured by `config.fp8`.

    dense.py       the FP8 dense matmul (custom_vjp): QKV/output projections, dense MLPs and
                   the shared expert
    grouped.py     the FP8 grouped matmul of the routed experts
    safeguards.py  underflow / distortion statistics and the probe that records them

Modules call `linear` and `grouped` below in place of their einsums when `config.fp8.enabled`.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from ling_jax.model.fp8 import safeguards
from ling_jax.model.fp8.dense import fp8_contract, fp8_matmul, scaled_matmul
from ling_jax.model.fp8.grouped import experts_run_native, fp8_grouped_matmul
from ling_jax.model.fp8.safeguards import probing
from pallas_kernels.common import fp8_capable

__all__ = [
    "enabled",
    "fp8_contract",
    "fp8_grouped_matmul",
    "fp8_matmul",
    "grouped",
    "linear",
    "native_hardware",
    "plan",
    "probing",
    "resolve_native",
    "scaled_matmul",
]


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the model runs its linear layers in FP8 (configs without the section: no)."""
    return "fp8" in config and bool(config.fp8.enabled)


def native_hardware(device: jax.Device | None = None) -> bool:
    """Whether the device multiplies E4M3 natively: GPUs of compute capability >= 8.9
    (Ada, Hopper, Blackwell) and TPU v7."""
    return fp8_capable(device or jax.devices()[0])


def resolve_native(fp8_config: ml_collections.ConfigDict) -> bool:
    """`fp8.mode` -> True for native E4M3 matmuls, False for emulation."""
    if fp8_config.mode == "auto":
        return native_hardware()
    return fp8_config.mode == "native"


def plan(config: ml_collections.ConfigDict) -> dict[str, str]:
    """How each kind of FP8 GEMM runs with this config on this machine ("native"/"emulated")."""
    native = resolve_native(config.fp8)
    wgrad_fp8 = config.fp8.wgrad == "fp8"
    experts = experts_run_native(config.moe.backend, native, wgrad_fp8)
    return {
        "dense": "native" if native else "emulated",
        "experts": "native" if experts else "emulated",
        "wgrad": config.fp8.wgrad,
    }


def linear(
    module: nnx.Module, op: str, x: jax.Array, w: jax.Array, *, contract: int = 1
) -> jax.Array:
    """FP8 x . w contracting x's last `contract` dims with w's first, output in `dtype`.

    w is the parameter itself (quantized from its stored precision, like TE's FP8 weights).
    """
    config = module.config
    safeguards.record(module, op, x, w, config.fp8.power_of_two_scale)
    y = fp8_contract(
        x,
        w,
        contract,
        native=resolve_native(config.fp8),
        power_of_two_scale=config.fp8.power_of_two_scale,
        wgrad_fp8=config.fp8.wgrad == "fp8",
        out_dtype=config.dtype,
    )
    return safeguards.tap_gradient(module, op, y)


def grouped(
    module: nnx.Module, op: str, lhs: jax.Array, w: jax.Array, group_sizes: jax.Array
) -> jax.Array:
    """FP8 grouped matmul of expert-sorted rows lhs [m, k] with w [E, k, n], output in `dtype`."""
    config = module.config
    safeguards.record(module, op, lhs, w, config.fp8.power_of_two_scale)
    y = fp8_grouped_matmul(
        lhs,
        w,
        group_sizes,
        backend=config.moe.backend,
        native=resolve_native(config.fp8),
        tile_rows=config.moe.xla_tile_rows,
        power_of_two_scale=config.fp8.power_of_two_scale,
        wgrad_fp8=config.fp8.wgrad == "fp8",
        out_dtype=config.dtype,
    )
    return safeguards.tap_gradient(module, op, y)
