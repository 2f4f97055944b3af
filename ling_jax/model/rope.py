"""Partial rotary position embedding with optional YaRN scaling (SPEC section 4.3).

Only the first `rotary_dim = head_dim * partial_rotary_factor` channels of each head rotate, in
the NeoX "rotate-half" pairing (i, i + rotary_dim / 2); the remaining channels carry no position.
Frequencies are computed over the rotary width, not the head width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def rotary_dim(config: ml_collections.ConfigDict) -> int:
    return int(config.head_dim * config.rope.partial_rotary_factor)


def yarn_correction_range(
    dim: int, theta: float, original_max_position: int, beta_fast: float, beta_slow: float
) -> tuple[int, int]:
    """The band of frequency indices [lo, hi] over which YaRN blends interpolation in."""

    def correction_dim(num_rotations: float) -> float:
        return (
            dim
            * math.log(original_max_position / (num_rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    lo = max(math.floor(correction_dim(beta_fast)), 0)
    hi = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    return lo, hi


def yarn_mscale(scaling: ml_collections.ConfigDict) -> float:
    """The attention temperature YaRN folds into cos and sin: 0.1 * ln(factor) + 1 by default."""
    if scaling.mscale is not None:
        return float(scaling.mscale)
    if scaling.factor <= 1:
        return 1.0
    return 0.1 * math.log(scaling.factor) + 1.0


def inverse_frequencies(config: ml_collections.ConfigDict) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [rotary_dim / 2] float32, mscale) for the configured RoPE."""
    dim = rotary_dim(config)
    theta = config.rope.theta
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope.scaling
    if scaling.type == "none":
        return inv_freq.astype(np.float32), 1.0
    lo, hi = yarn_correction_range(
        dim,
        theta,
        scaling.original_max_position_embeddings,
        scaling.beta_fast,
        scaling.beta_slow,
    )
    span = hi - lo if hi > lo else 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / span, 0.0, 1.0)
    # ramp = 0 keeps the original (extrapolated) frequency, ramp = 1 interpolates by `factor`.
    blended = (inv_freq / scaling.factor) * ramp + inv_freq * (1.0 - ramp)
    return blended.astype(np.float32), yarn_mscale(scaling)


def rope_tables(
    positions: jax.Array, config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables, fp32.

    positions: [batch, seq] int
    returns: cos, sin each [batch, seq, rotary_dim]
    """
    inv_freq, mscale = inverse_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, r/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [b, s, r]
    return jnp.cos(angles) * mscale, jnp.sin(angles) * mscale


def apply_partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the leading rotary channels of every head.

    x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, rotary_dim]
    """
    rot = cos.shape[-1]
    x_rot = x[..., :rot].astype(jnp.float32)
    x_pass = x[..., rot:]
    half = rot // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot = (x_rot * cos + rotated_half * sin).astype(x.dtype)
    return jnp.concatenate([x_rot, x_pass], axis=-1)
