"""Helpers shared by the kernels: typing pallas_call inside `jax.shard_map`, and whether a
device has FP8 matrix units.

With `check_vma=True` (the default), values inside `shard_map` carry the set of manual mesh
axes they vary over, and a pallas_call must declare its outputs' set. A kernel's output varies
over every axis any operand varies over; operands are cast up to that common set first. In a
custom VJP, a cotangent that varies over an axis its primal does not (a weight replicated over
the data axis, used by every data shard) is summed over that axis: what autodiff does for
ordinary ops. Outside `shard_map` all sets are empty and these are no-ops.
"""

from __future__ import annotations

import jax
from jax.sharding import ManualAxisType


def varying_axes(*xs: jax.Array) -> frozenset[str]:
    axes: frozenset[str] = frozenset()
    for x in jax.tree.leaves(xs):
        axes |= jax.typeof(x).manual_axis_type.varying
    return axes


def vary_like(tree, axes: frozenset[str]):
    """Casts every array in `tree` to vary over (at least) `axes`."""

    def cast(x):
        missing = axes - jax.typeof(x).manual_axis_type.varying
        return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x

    return jax.tree.map(cast, tree)


def out_struct(shape, dtype, axes: frozenset[str]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType(varying=axes))


def fp8_capable(device: jax.Device) -> bool:
    """Whether a device multiplies E4M3 natively: GPUs of compute capability >= 8.9 (Ada,
    Hopper, Blackwell) and TPU v7."""
    if device.platform == "gpu":
        capability = getattr(device, "compute_capability", None)
        return capability is not None and float(capability) >= 8.9
    if device.platform == "tpu":
        return device.device_kind.startswith(("TPU7", "TPU v7"))
    return False


def match_cotangent(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Sums `cotangent` over the manual axes it varies over and `primal` does not."""
    extra = varying_axes(cotangent) - varying_axes(primal)
    return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent
