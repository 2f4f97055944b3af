"""FP8 safeguard statistics (SPEC section 9) and the probe that collects them from the model.

Per tensor, against its quantize -> dequantize round trip:
  underflow   the fraction of its non-zero elements that quantize to zero (exact zeros, such
              as padding rows, do not count);
  distortion  the cosine similarity of the tensor with the round trip (1 = no distortion).

Inside `probing()` every FP8 op records these for its input activation (1 x 128 tiles) and its
weight (128 x 128 blocks) as an `nnx.Intermediate` named `fp8_<op>` on its module (`sow`, read
back with `nnx.capture`); the block stacks capture each layer's records and return them stacked
over the layer axis.

The output gradient dL/dy (what the dgrad and wgrad GEMMs quantize) is measured with gradient
taps: `add_grad_taps(model)` gives every FP8 op a zero `GradTap` variable ([2], or [layers, 2]
on stacked blocks), the op passes its output through an identity whose backward pass returns
dy's (underflow, distortion) as the tap's cotangent, so the gradient of the loss with respect
to the taps holds the statistics, per layer. Models without taps (training) are unaffected.

Outside `probing()` and without taps the model computes exactly what it computes without
monitoring.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.fp8 import reference as ref

STAT_PREFIX = "fp8_"

_PROBING: contextvars.ContextVar[bool] = contextvars.ContextVar("ling_jax_fp8_probe", default=False)


@contextlib.contextmanager
def probing() -> Iterator[None]:
    """Within this context (at trace time), FP8 ops record their safeguard statistics."""
    token = _PROBING.set(True)
    try:
        yield
    finally:
        _PROBING.reset(token)


def is_probing() -> bool:
    return _PROBING.get()


def round_trip_stats(x: jax.Array, q: jax.Array, x_dq: jax.Array) -> dict[str, jax.Array]:
    """{"underflow", "distortion"} (fp32 scalars) of x, its E4M3 values q and round trip x_dq."""
    x = x.astype(jnp.float32)
    x_dq = x_dq.astype(jnp.float32)
    nonzero = x != 0
    flushed = nonzero & (ref.e4m3_values(q) == 0)
    underflow = flushed.sum() / jnp.maximum(nonzero.sum(), 1)
    dot = jnp.sum(x * x_dq)
    norms = jnp.sqrt(jnp.sum(x * x)) * jnp.sqrt(jnp.sum(x_dq * x_dq))
    cosine = jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 1.0)
    return {"underflow": underflow.astype(jnp.float32), "distortion": cosine}


def rowwise_stats(x: jax.Array, power_of_two_scale: bool = False) -> dict[str, jax.Array]:
    """Statistics of x [..., k] quantized in 1 x 128 tiles along its last dim."""
    x2d = x.reshape(-1, x.shape[-1])
    q, scale = ref.quantize_rowwise(x2d, power_of_two_scale=power_of_two_scale)
    return round_trip_stats(x2d, q, ref.dequantize_rowwise(q, scale))


def blockwise_stats(w: jax.Array, power_of_two_scale: bool = False) -> dict[str, jax.Array]:
    """Statistics of w [..., k, n] quantized in 128 x 128 blocks of its last two dims."""
    q, scale = ref.quantize_blockwise(w, power_of_two_scale=power_of_two_scale)
    return round_trip_stats(w, q, ref.dequantize_blockwise(q, scale))


def record(module: nnx.Module, op: str, x: jax.Array, w: jax.Array, pow2: bool) -> None:
    """Inside `probing()`: sows the statistics of op input x [..., k] and weight w [..., k, n]."""
    if not is_probing():
        return
    stats = {"input": rowwise_stats(x, pow2), "weight": blockwise_stats(w, pow2)}
    module.sow(nnx.Intermediate, STAT_PREFIX + op, stats)


class GradTap(nnx.Variable):
    """A zero whose gradient carries an FP8 op's output-gradient statistics (see above)."""


GRAD_TAP_PREFIX = STAT_PREFIX + "grad_"
# FP8 ops per module class name (the classes import this module, hence names), and a parameter
# giving the leading (stacked-layer) dims: (attribute, its rank in an unstacked module).
_TAPPED = {
    "Attention": (("qkv", "out"), ("qkv", 3)),
    "SwiGLU": (("gate", "up", "down"), ("gate", 2)),
    "RoutedExperts": (("gate_up", "down"), ("gate", 3)),
}


def add_grad_taps(model: nnx.Module) -> None:
    """Attaches a zero `GradTap` to every FP8 op of the model (for a probe's backward pass)."""
    for _, module in nnx.iter_modules(model):
        spec = _TAPPED.get(type(module).__name__)
        if spec is None:
            continue
        ops, (param, rank) = spec
        lead = getattr(module, param).shape[: getattr(module, param).ndim - rank]
        for op in ops:
            setattr(module, GRAD_TAP_PREFIX + op, GradTap(jnp.zeros((*lead, 2), jnp.float32)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _grad_tap(y: jax.Array, tap: jax.Array, pow2: bool = False) -> jax.Array:
    del tap, pow2
    return y


def _grad_tap_fwd(y, tap, pow2):
    del tap, pow2
    return y, None


def _grad_tap_bwd(pow2, _, dy):
    stats = rowwise_stats(dy, pow2)  # dy as the dgrad GEMM quantizes it: 1 x 128 tiles.
    return dy, jnp.stack([stats["underflow"], stats["distortion"]])


_grad_tap.defvjp(_grad_tap_fwd, _grad_tap_bwd)


def tap_gradient(module: nnx.Module, op: str, y: jax.Array) -> jax.Array:
    """y unchanged; with a tap attached (`add_grad_taps`), dy's statistics reach the tap."""
    tap = getattr(module, GRAD_TAP_PREFIX + op, None)
    if tap is None:
        return y
    return _grad_tap(y, tap[...], module.config.fp8.power_of_two_scale)


def call_recording(module: nnx.Module, *args):
    """(module(*args), the statistics its FP8 ops record as a pure dict; {} unless probing)."""
    if not is_probing():
        return module(*args), {}
    out, records = nnx.capture(module, nnx.Intermediate)(*args)
    return out, nnx.to_pure_dict(records)
