"""RMSNorm with fp32 statistics (SPEC section 4.2)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ling_jax.model.params import ones_param


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    """w * cast_to_input_dtype(normalize_fp32(x)), as in the reference implementation."""

    def __init__(
        self,
        features: int,
        config: ml_collections.ConfigDict,
        axes: Sequence[str | None] = ("norm",),
    ):
        self.eps = config.rms_norm_eps
        self.scale = ones_param((features,), axes, config)

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [..., features]
        return self.scale[...].astype(x.dtype) * rms_normalize(x, self.eps)
